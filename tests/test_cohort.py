"""Cohorts (run config cohort-size; strategies/cohort.py): M virtual clients on one SuperNode must be
exactly M clients on nodes of their own -- the same students, the same replies, the same bytes per
client -- with one message per node instead of M."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict

from app.config import ConfigError, parse_config
from models import DCGANDiscriminator, DCGANGenerator
from strategies import cohort, wire
from strategies.base import NullRecorder, exchange
from strategies.cohort import CohortGrid, merge, run_cohort, split
from strategies.privacygan import (CLIENT_STATE, PrivacyGAN, PrivacyGANSettings, client_discriminate,
                                   client_discriminate_cohort, cohort_can_batch, load_client_state)

from test_faults import FakeMessage, LoopGrid   # Flower's push/pull interface in process; a server-built message

SIDE, C, NZ, F = 16, 1, 8, 8


@pytest.fixture(autouse=True)
def server_side_messages(monkeypatch):
    import strategies.privacygan as privacygan_module

    monkeypatch.setattr(privacygan_module, "Message", FakeMessage)


def strategy():
    torch.manual_seed(0)
    G_T, D_T = DCGANGenerator(NZ, C, SIDE, F), DCGANDiscriminator(C, SIDE, F)
    s = PrivacyGANSettings(latent_dim=NZ, batch_size=8, samples_per_client=4, min_nodes=1, steps_per_round=2,
                           server_batching="off")
    return PrivacyGAN(s, teacher_g=G_T, teacher_d=D_T, make_generator=lambda: DCGANGenerator(NZ, C, SIDE, F),
                      make_gen_optimizer=lambda G: torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                      recorder=NullRecorder(), sample_shape=(C, SIDE, SIDE))


DATA = {p: torch.rand(40, C, SIDE, SIDE, generator=torch.Generator().manual_seed(10 + p)) * 2 - 1 for p in range(6)}


def client(pid, content, state):
    """Client ``pid``'s handler: its own data, a D_i initialised the same way wherever it runs."""
    def build():
        torch.manual_seed(123 + pid)
        return DCGANDiscriminator(C, SIDE, F)

    data = DATA[pid]
    return client_discriminate(content, state, sample_real=lambda b, g: data[torch.randint(len(data), (b,), generator=g)],
                               build_discriminator=build, disc_lr=1e-3, betas=(0.5, 0.999), device="cpu", seed=0,
                               partition_id=pid)


def rounds(grid, n=3):
    strat = strategy()
    records = []
    for rnd in range(1, n + 1):
        nodes = sorted(grid.get_node_ids())
        records.append(strat.run_round(grid, rnd, nodes))
    return strat, records


def test_merge_and_split_give_each_client_its_own_records_back():
    a = RecordDict({"config": ConfigRecord({"round": 1}), "fakes": wire.tensor_record(fakes=torch.ones(2, 3))})
    b = RecordDict({"config": ConfigRecord({"round": 2})})
    merged = merge({0: a, 3: b}, size=4)
    assert sorted(merged.keys()) == ["c0/config", "c0/fakes", "c3/config", "cohort"]
    parts = split(merged)
    assert sorted(parts) == [0, 3] and sorted(parts[0].keys()) == ["config", "fakes"]
    assert parts[3].config_records["config"]["round"] == 2
    # each client's bytes are its own records' bytes, what its message would have been alone
    assert wire.record_bytes(parts[0]) == wire.record_bytes(a) and wire.record_bytes(parts[3]) == wire.record_bytes(b)
    merged["c7/extra"] = ConfigRecord({"x": 1})            # a record for a slot the cohort does not list
    with pytest.raises(wire.BadReply, match="c7/extra"):
        split(merged)
    with pytest.raises(wire.BadReply, match="cohort"):
        split(a)


def test_run_cohort_keeps_each_clients_state_apart_and_one_failure_is_that_clients_own():
    state = RecordDict({"c1/keep": ConfigRecord({"v": 5})})

    def handle(slot, content, own):
        if slot == 2:
            own["mine"] = ConfigRecord({"v": -1})    # written before failing: must not be kept
            raise ValueError("bad fakes")
        before = int(own["mine"]["v"]) if "mine" in own else 0
        own["mine"] = ConfigRecord({"v": before + 10 + slot})
        return RecordDict({"metrics": MetricRecord({"seen": float(content.config_records["config"]["round"])})})

    msg = merge({s: RecordDict({"config": ConfigRecord({"round": s})}) for s in (0, 1, 2)}, size=3)
    reply = split(run_cohort(msg, state, handle))
    assert reply[0].metric_records["metrics"]["seen"] == 0 and reply[1].metric_records["metrics"]["seen"] == 1
    assert "bad fakes" in reply[2].config_records[cohort.ERROR]["reason"]
    assert state["c0/mine"]["v"] == 10 and state["c1/mine"]["v"] == 11 and state["c1/keep"]["v"] == 5
    assert "c2/mine" not in state.keys()
    run_cohort(merge({0: RecordDict({"config": ConfigRecord({"round": 9})})}, size=3), state, handle)
    assert state["c0/mine"]["v"] == 20 and state["c1/mine"]["v"] == 11        # only slot 0 moved


def test_a_privacygan_round_through_cohorts_equals_the_same_clients_on_nodes_of_their_own():
    """4 clients as 4 nodes, and as 2 nodes carrying cohorts of 2: identical students after three
    rounds (K = 2), identical bytes per client, and half the messages."""
    states = {p: RecordDict() for p in range(4)}
    alone = LoopGrid([0, 1, 2, 3], lambda nid, content: client(nid, content, states[nid]))
    strat_a, rec_a = rounds(alone)

    node_states = {100: RecordDict(), 200: RecordDict()}
    index = {100: 0, 200: 1}
    real = LoopGrid([200, 100], lambda nid, content: run_cohort(
        content, node_states[nid], lambda slot, c, s: client(2 * index[nid] + slot, c, s)))
    grid = CohortGrid(real, 2)
    strat_b, rec_b = rounds(grid)

    assert sorted(grid.get_node_ids()) == [0, 1, 2, 3]
    for vid in range(4):
        Ga, Gb = strat_a.student(vid)[0], strat_b.student(vid)[0]
        for (name, pa), (_, pb) in zip(Ga.state_dict().items(), Gb.state_dict().items()):
            assert torch.equal(pa, pb), (vid, name)
        assert strat_b.partition_of[vid] == vid
    for ra, rb in zip(rec_a, rec_b):
        assert ra["replies"] == rb["replies"] == 4 and ra["bytes_down"] == rb["bytes_down"]
        assert ra["bytes_up"] == rb["bytes_up"] and ra["g_loss"] == rb["g_loss"] and ra["d_loss"] == rb["d_loss"]
    assert strat_a.comm.rows == strat_b.comm.rows        # per round, per client: the same byte account
    assert len(alone.sent) == 12 and len(real.sent) == 6
    # each D_i lives in its own slice of its node's state
    assert sorted(node_states[100].keys()) == [f"c0/{CLIENT_STATE}", f"c1/{CLIENT_STATE}"]


def test_a_bad_client_in_a_cohort_is_dropped_alone_and_its_student_is_untouched():
    node_state = RecordDict()

    def handler(nid, content):
        def one(slot, c, s):
            reply = client(slot, c, s)
            if slot == 1:   # NaN feedback from client 1 only
                fb = reply.array_records[wire.REPLY]
                reply[wire.REPLY] = wire.tensor_record(**{
                    wire.LABELS: wire.get_tensor(fb, wire.LABELS),
                    wire.FEEDBACK: torch.full_like(wire.get_tensor(fb, wire.FEEDBACK), float("nan"))})
            if slot == 2:
                raise RuntimeError("disk on fire")
            return reply
        return run_cohort(content, node_state, one)

    grid = CohortGrid(LoopGrid([7], handler), 3)
    strat = strategy()
    before = copy.deepcopy(strat.student(1)[0].state_dict())
    record = strat.run_round(grid, 1, sorted(grid.get_node_ids()))
    assert record["replies"] == 1 and record["dropped"] == 2
    assert "bad reply" in record["dropped_reasons"]["1"]
    assert "disk on fire" in record["dropped_reasons"]["2"]
    after = strat.student(1)[0].state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.endswith(("running_mean", "running_var",
                                                                                      "num_batches_tracked")))
    assert f"c2/{CLIENT_STATE}" not in node_state.keys() and f"c0/{CLIENT_STATE}" in node_state.keys()


def test_exchange_on_a_cohort_grid_counts_one_message_per_node_in_its_window(monkeypatch):
    """max-in-flight counts real messages: a window of 1 still serves whole cohorts, one node at a time."""
    import strategies.base as base

    monkeypatch.setattr(base, "MAX_IN_FLIGHT", 1)
    seen = []
    real = LoopGrid([5, 6], lambda nid, content: seen.append(sorted(split(content))) or run_cohort(
        content, RecordDict(), lambda slot, c, s: RecordDict({"metrics": MetricRecord({"slot": float(slot)})})))
    grid = CohortGrid(real, 3)
    vids = sorted(grid.get_node_ids())
    msgs = {v: FakeMessage(RecordDict({"config": ConfigRecord({"v": v})}), v, wire.INFO) for v in vids}
    ex = exchange(grid, msgs, timeout=5, parse=lambda vid, r: wire.metrics_of(r.content), poll=0.001)
    assert seen == [[0, 1, 2], [0, 1, 2]] and real.sent == [5, 6]
    assert {v: int(m["slot"]) for v, m in ex.replies.items()} == {0: 0, 1: 1, 2: 2, 3: 0, 4: 1, 5: 2}
    assert all(ex.bytes_down[v] == wire.record_bytes(msgs[v].content) for v in vids)


def test_cohort_size_is_checked_at_start_naming_the_key():
    assert parse_config({"cohort-size": 10}).cohort_size == 10
    with pytest.raises(ConfigError, match="cohort-size"):
        parse_config({"cohort-size": 0})
    with pytest.raises(ConfigError, match="cohort-size"):
        parse_config({"strategy": "fedavg", "cohort-size": 2})


@pytest.mark.parametrize("batching, streamed", [("off", True), ("on", False)])
def test_students_are_updated_as_their_cohorts_reply_unless_batched(monkeypatch, batching, streamed):
    """One message in flight, three nodes of two clients: the exchange pushes the next node's message
    as soon as a reply is in, then hands the reply over, so by the time the third node is asked, the
    first node's students 0 and 1 have taken their steps -- from the second round on (the first tells
    the nodes apart on all replies at once), and unless the students are to be updated as one batched
    computation. Without cohorts (one client per reply) they are updated after the exchange."""
    import strategies.base as base

    monkeypatch.setattr(base, "MAX_IN_FLIGHT", 1)
    strat = strategy()
    strat.s = dataclasses.replace(strat.s, server_batching=batching)
    states = {n: RecordDict() for n in (10, 20, 30)}
    moved = []

    def handler(nid, content):
        if nid == 30:
            moved.append([not torch.equal(next(strat.student(v)[0].parameters()), start[v]) for v in (0, 1)])
        return run_cohort(content, states[nid], lambda slot, c, s: client(2 * (nid // 10 - 1) + slot, c, s))

    grid = CohortGrid(LoopGrid([10, 20, 30], handler), 2)
    records = []
    for rnd in (1, 2, 3):
        start = {v: next(strat.student(v)[0].parameters()).detach().clone() for v in (0, 1)}
        records.append(strat.run_round(grid, rnd, sorted(grid.get_node_ids())))
    assert moved == [[False, False], [streamed] * 2, [streamed] * 2]
    assert [r["streamed"] for r in records] == [False, streamed, streamed]
    one = strategy()
    one.s = dataclasses.replace(one.s, server_batching="off")
    plain = LoopGrid([0, 1], lambda nid, content: client(nid, content, RecordDict()))
    assert [one.run_round(plain, rnd, [0, 1])["streamed"] for rnd in (1, 2)] == [False, False]


def batched_client(pids: dict[int, int], contents, states, reuse=None):
    """A cohort's clients at once (the ClientApp's cohort-batching path), each client's D_i
    initialised as ``client`` initialises it and drawing from its own data."""
    order = iter([pids[s] for s in sorted(contents)])

    def build():
        torch.manual_seed(123 + next(order))
        return DCGANDiscriminator(C, SIDE, F)

    samplers = {s: (lambda d: lambda b, g: d[torch.randint(len(d), (b,), generator=g)])(DATA[pids[s]])
                for s in contents}
    return client_discriminate_cohort(contents, states, sample_real=samplers, partition_ids={s: pids[s] for s in contents},
                                      build_discriminator=build, disc_lr=1e-3, betas=(0.5, 0.999), device="cpu",
                                      seed=0, reuse=reuse)


@pytest.mark.parametrize("reuse", [None, {}])
def test_a_cohorts_batched_d_steps_equal_its_clients_on_nodes_of_their_own(reuse):
    """cohort-batching: 4 clients as 2 nodes whose cohort of 2 takes its D steps as one vmapped
    computation, against 4 nodes of their own: after three rounds (K = 2) the same students and D_i
    (to 1e-5), the same bytes per client, and each D_i in its own slice of its node's state. With
    ``reuse`` the modules of the previous message are loaded, not rebuilt."""
    states = {p: RecordDict() for p in range(4)}
    alone = LoopGrid([0, 1, 2, 3], lambda nid, content: client(nid, content, states[nid]))
    strat_a, rec_a = rounds(alone)

    node_states = {100: RecordDict(), 200: RecordDict()}
    index = {100: 0, 200: 1}
    calls = []

    def together(nid):
        def handle_all(contents, owns):
            calls.append(sorted(contents))
            return batched_client({s: 2 * index[nid] + s for s in contents}, contents, owns, reuse)
        return handle_all

    def refuse(slot, c, s):
        raise AssertionError("the batched path handles every message here")

    real = LoopGrid([200, 100], lambda nid, content: run_cohort(content, node_states[nid], refuse, together(nid)))
    strat_b, rec_b = rounds(CohortGrid(real, 2))
    assert calls == [[0, 1]] * 6
    for vid in range(4):
        Ga, Gb = strat_a.student(vid)[0], strat_b.student(vid)[0]
        for name, pa in Ga.state_dict().items():
            torch.testing.assert_close(Gb.state_dict()[name], pa, rtol=1e-5, atol=1e-5, msg=f"student {vid} {name}")
        Da = load_client_state(states[vid][CLIENT_STATE])["d"]
        Db = load_client_state(node_states[100 if vid < 2 else 200][f"c{vid % 2}/{CLIENT_STATE}"])["d"]
        for name, pa in Da.items():
            torch.testing.assert_close(torch.as_tensor(Db[name]), torch.as_tensor(pa), rtol=1e-5, atol=1e-5)
    for ra, rb in zip(rec_a, rec_b):
        assert ra["replies"] == rb["replies"] == 4 and ra["bytes_up"] == rb["bytes_up"]
        assert ra["d_loss"] == pytest.approx(rb["d_loss"], rel=1e-5)
    assert strat_a.comm.rows == strat_b.comm.rows


def test_a_failing_batched_cohort_is_retried_one_client_at_a_time_and_keeps_no_state():
    """handle_all raises after writing a state slice: nothing of it is kept, every client is
    handled on its own, and a client that fails there fails alone."""
    state = RecordDict({"c0/mine": ConfigRecord({"v": 1})})

    def handle_all(contents, owns):
        owns[0]["mine"] = ConfigRecord({"v": -99})
        raise RuntimeError("stack mismatch")

    def handle(slot, content, own):
        if slot == 1:
            raise ValueError("bad fakes")
        own["mine"] = ConfigRecord({"v": int(own["mine"]["v"]) + 1})
        return RecordDict({"metrics": MetricRecord({"ok": 1.0})})

    msg = merge({s: RecordDict({"config": ConfigRecord({"round": 1})}) for s in (0, 1)}, size=2)
    reply = split(run_cohort(msg, state, handle, handle_all))
    assert state["c0/mine"]["v"] == 2 and reply[0].metric_records["metrics"]["ok"] == 1.0
    assert "bad fakes" in reply[1].config_records[cohort.ERROR]["reason"]


def test_cohort_batching_is_declined_where_the_steps_cannot_be_batched():
    strat = strategy()
    content, _ = strat.build_content(0, 1)
    assert cohort_can_batch({0: content, 1: content}, dp=False, train="all") is None
    assert "dp" in cohort_can_batch({0: content}, dp=True, train="all")
    assert "client-d-train" in cohort_can_batch({0: content}, dp=False, train="head")
    for key, value, why in (("loss", "wgan-gp", "Wasserstein"), ("client-disc-steps", 2, "client-disc-steps")):
        other = copy.deepcopy(content)
        other.config_records[wire.CONFIG][key] = value
        assert why in cohort_can_batch({0: content, 1: other}, dp=False, train="all")
    assert parse_config({}).cohort_batching is True and parse_config({"cohort-batching": False}).cohort_batching is False
