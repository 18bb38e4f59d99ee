"""BPGAN (thesis ch. 4): block handlers, parameter-server math and the server loop, driven
through a loopback transport that calls the client handlers directly (no Flower run).

Equivalences checked: the averaged DB gradient is the gradient of the mean loss over all
DBs' batches, each weighted by the fakes the server sent it; the unpipelined generator update
is the centralized one through the same D; the pipelined GB applies exactly the previous
round's feedback; with n_critic > 1 critic steps per G step, a GB steps only after every
n-th D step and both schedules make the exact generator update.
"""

import copy
import io
import math

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from models import DCGANDiscriminator, DCGANGenerator, discriminator_loss, generator_loss, gradient_penalty
from models.losses import GP_WEIGHT, WGAN_CLIP
from models.steps import apply_feedback, sample_latent
from strategies import wire
from strategies.base import Exchange, NullRecorder, RunFailed
from strategies import bpgan
from strategies.bpgan import (BPGAN, D_GRADS, D_WEIGHTS, DISCRIMINATOR_GRAD, GB_STATE, GENERATOR_STEP, HYBRIDS,
                              RELAY, SAMPLE, SAMPLES, WANT_FEEDBACK, BPGANSettings, Pair, aggregate_gradients,
                              apply_gradients, client_bpgan_sample, client_discriminator_grad, client_generator_step,
                              generator_step_due, generator_steps, gp_seed, latent_seed, load_generator_block,
                              pair_nodes, resolve_model, summarize_scores)

SIDE, C, NZ, F, B, SEED = 16, 1, 8, 8, 4, 0
SHAPE = (C, SIDE, SIDE)
DATA = {pid: torch.rand(12, *SHAPE, generator=torch.Generator().manual_seed(100 + pid)) * 2 - 1 for pid in range(8)}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convolutions are far faster on one thread (and do not fight a busy machine)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def build_g():
    with torch.random.fork_rng():
        torch.manual_seed(42)
        return DCGANGenerator(NZ, C, SIDE, F)


def build_d(loss="bce"):
    with torch.random.fork_rng():
        torch.manual_seed(7)
        return DCGANDiscriminator(C, SIDE, F, norm="layer" if loss == "wgan-gp" else "batch")


def sampler(pid):
    return lambda b, gen: DATA[pid][torch.randint(len(DATA[pid]), (b,), generator=gen)]


def info(pid, role=None, has_data=None):
    return {"partition_id": pid, "role": pid % 2 if role is None else role,
            "has_data": int(pid % 2 == 0) if has_data is None else has_data}


class Grid:
    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)


class Loopback(BPGAN):
    """BPGAN whose transport runs the client handlers in-process; bytes as Flower counts them."""

    def __init__(self, settings, infos, drop=None, tamper=None, **kw):
        super().__init__(settings, discriminator=build_d(settings.d_loss), recorder=NullRecorder(),
                         sample_shape=SHAPE, **kw)
        self.infos = infos                   # node -> query.info answer
        self.states = {nid: RecordDict() for nid in infos}
        self.drop = drop or set()            # {(round, node)} whose reply is lost
        self.tamper = tamper                 # (round, node, type, reply) -> None, may alter the reply
        self.log = []                        # (round, node, type, content, reply)
        self.d_at_send = {}                  # (round, DB node) -> the server's D state when it was sent

    def handle(self, nid, mtype, content):
        pid = self.infos[nid].get("partition_id")
        st = self.states[nid]
        if mtype == wire.INFO:
            return RecordDict({wire.METRICS: MetricRecord(self.infos[nid])})
        if mtype == GENERATOR_STEP:
            return client_generator_step(content, st, build_generator=build_g, device="cpu", seed=SEED,
                                         partition_id=pid)
        if mtype == DISCRIMINATOR_GRAD:
            return client_discriminator_grad(content, st, sample_real=sampler(pid),
                                             build_discriminator=lambda: build_d(self.s.d_loss), device="cpu",
                                             seed=SEED, partition_id=pid)
        if mtype == SAMPLE:
            return client_bpgan_sample(content, st, build_generator=build_g, device="cpu")
        raise AssertionError(mtype)

    def transport(self, grid, rnd, contents, **parse_kw):
        ex = Exchange()
        for nid, (mtype, content) in contents.items():
            ex.bytes_down[nid] = wire.record_bytes(content)
            if (rnd, nid) in self.drop:
                ex.dropped[nid] = "lost in test"
                self.log.append((rnd, nid, mtype, content, None))
                continue
            if mtype == DISCRIMINATOR_GRAD:
                self.d_at_send[(rnd, nid)] = copy.deepcopy(self.D.state_dict())
            reply = self.handle(nid, mtype, content)
            if self.tamper is not None:
                self.tamper(rnd, nid, mtype, reply)
            self.log.append((rnd, nid, mtype, content, reply))
            ex.bytes_up[nid] = wire.record_bytes(reply)
            try:
                ex.replies[nid] = self.parse_content(nid, mtype, reply, **parse_kw)
            except wire.BadReply as exc:
                ex.dropped[nid] = f"bad reply: {exc}"
        return ex

    def sent(self, mtype, nid=None):
        return [e for e in self.log if e[2] == mtype and (nid is None or e[1] == nid)]


def settings(**kw):
    base = dict(num_rounds=3, batch_size=B, latent_dim=NZ, gen_lr=1e-3, disc_lr=1e-3, min_nodes=2,
                samples_per_node=3, eval_samples=10, seed=SEED)
    return BPGANSettings(**{**base, **kw})


def nodes_for(n_pairs):
    return {1000 + pid: info(pid) for pid in range(2 * n_pairs)}


def run_loop(n_pairs=1, drop=None, evaluate=None, tamper=None, **kw):
    infos = nodes_for(n_pairs)
    strat = Loopback(settings(**kw), infos, drop=drop, evaluate=evaluate, tamper=tamper)
    result = strat.run(Grid(infos))
    return strat, result


def gb_block(strat, nid):
    blob = torch.load(io.BytesIO(strat.states[nid].config_records[GB_STATE]["blob"]), weights_only=False)
    G = build_g()
    G.load_state_dict(blob["g"])
    return G, blob


def latent(pid, generation):
    return sample_latent(B, NZ, generator=torch.Generator().manual_seed(latent_seed(SEED, pid, generation)))


# =====================================================================================
# Parameter server: averaged DB gradient = gradient of the mean loss in one process
# =====================================================================================
@pytest.mark.parametrize("kind", ["bce", "wgan-gp"])
def test_aggregated_d_gradient_equals_one_process_gradient(kind):
    strat = Loopback(settings(d_loss=kind), nodes_for(2))
    strat.pairs = [Pair(0, 1000, 1001, 0, 1), Pair(1, 1002, 1003, 2, 3)]
    fakes = {k: torch.rand(B, *SHAPE, generator=torch.Generator().manual_seed(k)) * 2 - 1 for k in (0, 1)}
    reals = {0: DATA[0][:B], 2: DATA[2][4:4 + B]}               # fixed batches
    for k in (0, 1):
        strat.fakes[k] = (5, wire.encode_fakes(fakes[k], "float32"))
    D_before = copy.deepcopy(strat.D)
    replies = {}
    for nid, (mtype, content) in strat.discriminator_contents(1).items():
        pid = nid - 1000
        reply = client_discriminator_grad(content, RecordDict(), sample_real=lambda b, g, pid=pid: reals[pid],
                                          build_discriminator=lambda: build_d(kind), device="cpu", seed=SEED,
                                          partition_id=pid)
        replies[nid] = strat.parse_content(nid, mtype, reply)
    agg = aggregate_gradients([r["grads"] for r in replies.values()],
                              [int(r["metrics"]["batch_size"]) for r in replies.values()])

    # reference: one process, the mean of the two per-client losses (separate forward passes each)
    D = copy.deepcopy(D_before)
    losses = []
    for k, pid in ((0, 0), (1, 2)):
        loss = discriminator_loss(kind, D(reals[pid]), D(fakes[k]))
        if kind == "wgan-gp":
            with torch.random.fork_rng():
                torch.manual_seed(gp_seed(SEED, pid, 0))
                loss = loss + GP_WEIGHT * gradient_penalty(D, reals[pid], fakes[k])
        losses.append(loss)
    names = [n for n, _ in D.named_parameters()]
    ref = dict(zip(names, torch.autograd.grad(sum(losses) / 2, list(D.parameters()))))
    assert set(agg) == set(ref)
    for n in names:
        torch.testing.assert_close(agg[n], ref[n], atol=1e-5, rtol=0)

    # the server's D step is the optimizer step on that gradient; labels/feedback go to the pairs
    strat.absorb_discriminators(replies)
    opt_ref = torch.optim.Adam(D_before.parameters(), lr=1e-3, betas=(0.5, 0.999))
    for n, p in D_before.named_parameters():
        p.grad = ref[n]
    opt_ref.step()
    for (n, p), q in zip(strat.D.named_parameters(), D_before.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    assert strat.feedback[0][0] == 5 and strat.feedback[1][0] == 5       # generation of the judged fakes


def test_aggregate_gradients_is_a_batch_size_weighted_mean():
    g1, g2 = {"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([4.0, -1.0])}
    torch.testing.assert_close(aggregate_gradients([g1, g2], [1, 3])["w"], torch.tensor([3.25, -0.25]))
    with pytest.raises(ValueError):
        aggregate_gradients([g1, {"v": torch.zeros(2)}], [1, 1])


def test_a_db_reporting_an_inflated_batch_size_is_dropped_and_does_not_move_the_aggregate():
    def inflate(rnd, nid, mtype, reply):
        if mtype == DISCRIMINATOR_GRAD and nid == 1002:
            reply.metric_records[wire.METRICS]["batch_size"] = 4 * B

    strat, _ = run_loop(n_pairs=2, pipeline=False, num_rounds=1, tamper=inflate)
    rec = strat.recorder.rounds[0]
    assert rec["dropped_reasons"] == {
        "1002": f"{DISCRIMINATOR_GRAD}: bad reply: reported batch_size {4 * B}, but the server sent it {B} fakes "
                "to judge"}
    assert (rec["replies"], rec["dropped"], rec["d_steps_total"]) == (1, 1, 1)
    assert math.isnan(rec["clients"]["GB 3 (pair of DB 2)"]["d_loss"])
    # D moved by DB 0's gradient alone, exactly: the inflated reply has no weight at all
    (_, _, _, content, reply), = strat.sent(DISCRIMINATOR_GRAD, 1000)
    D = build_d()
    D.load_state_dict(content.array_records[D_WEIGHTS].to_torch_state_dict())
    apply_gradients(D, torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                    {k: wire.get_tensor(reply.array_records[D_GRADS], k) for k in reply.array_records[D_GRADS].keys()},
                    "bce")
    for (name, p), q in zip(strat.D.named_parameters(), D.parameters()):
        assert torch.equal(p, q), name
    # its GB gets no feedback (no flush message), DB 0's GB does
    assert [e[0] for e in strat.sent(GENERATOR_STEP, 1003)] == [1]
    assert [RELAY in e[3] for e in strat.sent(GENERATOR_STEP, 1001)] == [False, True]


def test_d_gradients_are_weighted_by_the_fakes_the_server_sent_not_by_what_a_db_reports(monkeypatch):
    strat = Loopback(settings(), nodes_for(2))
    strat.pairs = [Pair(0, 1000, 1001, 0, 1), Pair(1, 1002, 1003, 2, 3)]
    sizes = {0: 2, 1: 6}                  # the server holds fake batches of different sizes
    for k, n in sizes.items():
        x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(k)) * 2 - 1
        strat.fakes[k] = (3, wire.encode_fakes(x, "float32"))
    replies = {}
    for nid, (mtype, content) in strat.discriminator_contents(1).items():
        reply = client_discriminator_grad(content, RecordDict(), sample_real=sampler(nid - 1000),
                                          build_discriminator=build_d, device="cpu", seed=SEED, partition_id=nid - 1000)
        replies[nid] = strat.parse_content(nid, mtype, reply)
    assert strat.asked == {1000: 2, 1002: 6}
    assert {nid: r["metrics"]["batch_size"] for nid, r in replies.items()} == {1000: 2, 1002: 6}
    assert tuple(replies[1002]["feedback"].shape) == (6, *SHAPE)
    replies[1000]["metrics"]["batch_size"] = 1000.0      # a reported number is never the weight
    applied = []
    monkeypatch.setattr(bpgan, "apply_gradients", lambda D, opt, grads, kind: applied.append(grads))
    out = strat.absorb_discriminators(replies)
    g0, g1 = replies[1000]["grads"], replies[1002]["grads"]
    assert set(applied[0]) == set(g0)
    for name in g0:
        mean = ((2 * g0[name].double() + 6 * g1[name].double()) / 8).float()
        torch.testing.assert_close(applied[0][name], mean, atol=1e-7, rtol=0)
        assert torch.equal(applied[0][name], aggregate_gradients([g0, g1], [2, 6])[name])
    assert {k: m["batch_size"] for k, m in out.items()} == {0: 2, 1: 6}
    # a DB reply from a node the server sent no fakes is refused
    with pytest.raises(wire.BadReply, match="no fakes"):
        strat.parse_content(1004, DISCRIMINATOR_GRAD, reply)


def test_wgan_critic_is_clipped_after_the_server_step():
    D = build_d("wgan")
    opt = torch.optim.RMSprop(D.parameters(), lr=0.5)
    apply_gradients(D, opt, {n: torch.ones_like(p) for n, p in D.named_parameters()}, "wgan")
    assert all(p.abs().max() <= WGAN_CLIP + 1e-12 for p in D.parameters())


def test_discriminator_block_leaves_no_model_behind_and_does_not_touch_d_grads():
    strat = Loopback(settings(), nodes_for(1))
    strat.pairs = [Pair(0, 1000, 1001, 0, 1)]
    strat.fakes[0] = (0, wire.encode_fakes(torch.zeros(B, *SHAPE), "float32"))
    state = RecordDict()
    content = strat.discriminator_contents(1)[1000][1]
    client_discriminator_grad(content, state, sample_real=sampler(0), build_discriminator=build_d, device="cpu",
                              seed=SEED, partition_id=0)
    assert list(state.keys()) == ["bpgan.discriminator"]
    assert dict(state.config_records["bpgan.discriminator"]) == {"steps": 1}
    assert all(p.grad is None for p in strat.D.parameters())


# =====================================================================================
# Generator updates: exact (pipeline=False) and one-step stale (pipeline=True)
# =====================================================================================
@pytest.mark.parametrize("model", ["dcgan", "wdcgan", "dcwgan"])
def test_unpipelined_generator_update_equals_centralized_update(model):
    g_block, d_loss = resolve_model(model)
    strat, _ = run_loop(pipeline=False, g_block=g_block, d_loss=d_loss)
    # reference: one process, autograd of generator_loss(D_r(G(z_r))) with the D the DB judged with
    G = build_g()
    opt = (torch.optim.RMSprop(G.parameters(), lr=1e-3) if g_block == "wgan"
           else torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999)))
    d_msgs = strat.sent(DISCRIMINATOR_GRAD)
    assert [e[0] for e in d_msgs] == [1, 2, 3]
    for r, (_, _, _, content, _) in enumerate(d_msgs):
        D = build_d(d_loss)
        D.load_state_dict(content.array_records[D_WEIGHTS].to_torch_state_dict())
        loss = generator_loss(d_loss, D(G(latent(1, r))))
        grads = torch.autograd.grad(loss, list(G.parameters()))
        opt.zero_grad()
        for p, g in zip(G.parameters(), grads):
            p.grad = g
        opt.step()
    G_fed, blob = gb_block(strat, 1001)
    assert blob["g_steps"] == 3
    for p, q in zip(G_fed.parameters(), G.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    # the optimizer moments are linear in the raw gradients, so a scaled feedback would show here
    moment = "square_avg" if g_block == "wgan" else "exp_avg"
    ref_state = opt.state_dict()["state"]
    for i, st in blob["opt"]["state"].items():
        torch.testing.assert_close(st[moment], ref_state[i][moment], atol=1e-6, rtol=1e-4)


def test_pipelined_generator_applies_exactly_the_previous_rounds_feedback():
    strat, result = run_loop(pipeline=True, num_rounds=3)
    gb, db = 1001, 1000
    d_log = {e[0]: e for e in strat.sent(DISCRIMINATOR_GRAD, db)}
    g_log = strat.sent(GENERATOR_STEP, gb)
    # round 1: priming (X_1, generation 0) then the pipelined exchange (X_2), neither carries feedback
    assert [(e[0], RELAY in e[3]) for e in g_log] == [(1, False), (1, False), (2, True), (3, True), (3, True)]
    applied = [e for e in g_log if RELAY in e[3]]
    for (rnd, _, _, content, reply), source_round in zip(applied, (1, 2, 3)):
        # the feedback relayed to the GB in round r is bit for bit the DB's reply of round r-1
        # (the last one comes with the flush after round 3)
        db_reply = d_log[source_round][4]
        for key in (wire.LABELS, wire.FEEDBACK):
            assert torch.equal(wire.get_tensor(content.array_records[RELAY], key),
                               wire.get_tensor(db_reply.array_records[wire.REPLY], key))
        assert int(content.config_records[wire.CONFIG]["feedback-for"]) == source_round - 1
    # the DB of round r judged generation r-1
    for rnd in (1, 2, 3):
        assert torch.equal(wire.get_tensor(d_log[rnd][3].array_records[wire.FAKES], wire.FAKES),
                           wire.get_tensor(g_log[rnd - 1][4].array_records[wire.FAKES], wire.FAKES))

    # hand-run reference: G_0 -> apply F_1 (on z_0) -> G_1 -> F_2 (on z_1) -> G_2 -> F_3 (on z_2) -> G_3
    G = build_g()
    opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    snapshots = [copy.deepcopy(G)]
    for r in (1, 2, 3):
        fb = wire.decode_feedback(wire.get_tensor(d_log[r][4].array_records[wire.REPLY], wire.FEEDBACK), "float32", B)
        apply_feedback(G, opt, latent(1, r - 1), fb)
        snapshots.append(copy.deepcopy(G))
    G_fed, blob = gb_block(strat, gb)
    assert blob["g_steps"] == 3
    for p, q in zip(G_fed.parameters(), G.parameters()):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=0)
    # staleness of one: X_3 (generation 2, judged in round 3) came from G_1, while its feedback
    # is applied to G_2; X_2 came from G_0, as did X_1
    with torch.no_grad():
        for generation, g_index in ((0, 0), (1, 0), (2, 1)):
            sent = wire.get_tensor(g_log[generation][4].array_records[wire.FAKES], wire.FAKES)
            torch.testing.assert_close(sent, snapshots[g_index](latent(1, generation)), atol=1e-6, rtol=0)
    assert result["last"]["g_steps"] == 2        # round 3 feedback F_2, plus the flush F_3
    assert [r["d_steps_total"] for r in strat.recorder.rounds] == [1, 2, 3]


# =====================================================================================
# n_critic: D steps per G step (the clipped WGAN's schedule)
# =====================================================================================
def test_generator_step_due_every_nth_d_step():
    assert [generator_step_due(s, 3) for s in range(1, 8)] == [False, False, True, False, False, True, False]
    assert all(generator_step_due(s, 1) for s in range(1, 5))
    assert [generator_steps(r, 3) for r in (1, 2, 3, 5, 6, 7)] == [0, 0, 1, 1, 2, 2]
    with pytest.raises(ValueError):
        generator_step_due(0, 3)


@pytest.mark.parametrize("pipeline", [True, False])
@pytest.mark.parametrize("d_loss,n,rounds,g_steps", [
    ("wgan", 3, 6, [0, 0, 0, 1, 0, 1]),        # F_3 applied in round 4, F_6 by the flush after round 6
    ("wgan", 3, 7, [0, 0, 0, 1, 0, 0, 1]),     # F_6 applied in round 7; F_7 is not relayed: no flush
    ("bce", 1, 4, [0, 1, 1, 2]),               # a DCGAN D: one G step per D step (round 4: F_3 + flush F_4)
])
def test_n_critic_d_steps_per_generator_step(pipeline, d_loss, n, rounds, g_steps):
    strat, result = run_loop(pipeline=pipeline, num_rounds=rounds, d_loss=d_loss, critic_steps=n)
    recs = strat.recorder.rounds
    assert [r["d_steps_total"] for r in recs] == list(range(1, rounds + 1))
    assert int(strat.opt_d.state_dict()["state"][0]["step"]) == rounds            # R steps of D's optimizer
    assert type(strat.opt_d) is (torch.optim.RMSprop if d_loss == "wgan" else torch.optim.Adam)
    assert [r["g_steps"] for r in recs] == g_steps
    assert sum(g_steps) == generator_steps(rounds, n) == rounds // n
    _, blob = gb_block(strat, 1001)
    assert blob["g_steps"] == rounds // n
    assert recs[-1]["clients"]["GB 1 (pair of DB 0)"]["g_steps_total"] == rounds // n
    due = [r for r in range(1, rounds + 1) if r % n == 0]
    # the DB is asked for feedback, and returns it, only when its D step precedes a G step; with
    # n = 1 the key is not even sent (the messages of the plain schedule)
    d_log = strat.sent(DISCRIMINATOR_GRAD, 1000)
    assert [e[0] for e in d_log] == list(range(1, rounds + 1))
    for rnd, _, _, content, reply in d_log:
        cfg = content.config_records[wire.CONFIG]
        assert dict(cfg).get(WANT_FEEDBACK, "absent") == ((rnd in due) if n > 1 else "absent")
        assert set(reply.array_records[wire.REPLY].keys()) == (
            {wire.LABELS, wire.FEEDBACK} if rnd in due else {wire.LABELS})
    # the GB gets exactly those feedbacks, bit for bit, right after their D step (or in the flush)
    g_log = strat.sent(GENERATOR_STEP, 1001)
    relayed = [e for e in g_log if RELAY in e[3]]
    assert [e[0] for e in relayed] == [min(r + 1, rounds) for r in due]
    for (_, _, _, content, reply), source in zip(relayed, due):
        for key in (wire.LABELS, wire.FEEDBACK):
            assert torch.equal(wire.get_tensor(content.array_records[RELAY], key),
                               wire.get_tensor(d_log[source - 1][4].array_records[wire.REPLY], key))
        assert int(content.config_records[wire.CONFIG]["feedback-for"]) == source - 1   # X_r is generation r-1
        assert reply.metric_records[wire.METRICS]["applied"] == 1
    # every other GB message only made fresh fakes; the flush comes only after a due last step
    plain = [e for e in g_log if RELAY not in e[3]]
    assert all(e[4].metric_records[wire.METRICS]["applied"] == 0 and wire.FAKES in e[4] for e in plain)
    flushes = [e for e in g_log if not e[3].config_records[wire.CONFIG]["make-fakes"]]
    assert len(flushes) == int(rounds % n == 0)
    assert len(plain) == rounds - len(due) + int(rounds % n == 0) + (1 if pipeline else 0)


@pytest.mark.parametrize("pipeline", [True, False])
def test_with_n_critic_two_both_schedules_make_the_exact_generator_update(pipeline):
    """DCWGAN, n = 2: the fakes a due D step judged come from the very G its feedback is applied to
    (pipelined as well: no G step falls between making X_r and applying F_r)."""
    strat, _ = run_loop(pipeline=pipeline, num_rounds=4, g_block="dcgan", d_loss="wgan", critic_steps=2)
    d_msgs = {e[0]: e for e in strat.sent(DISCRIMINATOR_GRAD, 1000)}
    G = build_g()
    opt = torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999))
    snapshots = [copy.deepcopy(G)]
    for r in (2, 4):
        D = build_d("wgan")
        D.load_state_dict(d_msgs[r][3].array_records[D_WEIGHTS].to_torch_state_dict())
        grads = torch.autograd.grad(generator_loss("wgan", D(G(latent(1, r - 1)))), list(G.parameters()))
        opt.zero_grad()
        for p, g in zip(G.parameters(), grads):
            p.grad = g
        opt.step()
        snapshots.append(copy.deepcopy(G))
    G_fed, blob = gb_block(strat, 1001)
    assert blob["g_steps"] == 2
    for p, q in zip(G_fed.parameters(), G.parameters()):
        torch.testing.assert_close(p, q, atol=1e-5, rtol=0)
    for i, st in blob["opt"]["state"].items():
        torch.testing.assert_close(st["exp_avg"], opt.state_dict()["state"][i]["exp_avg"], atol=1e-6, rtol=1e-4)
    # what the pipeline does cost: X_3, judged in the round that applies F_2, was made before that step
    with torch.no_grad():
        x3 = wire.get_tensor(d_msgs[3][3].array_records[wire.FAKES], wire.FAKES)
        torch.testing.assert_close(x3, snapshots[0 if pipeline else 1](latent(1, 2)), atol=1e-6, rtol=0)


def test_critic_only_rounds_carry_no_feedback_and_one_flag_more_than_the_plain_schedule():
    plain, _ = run_loop(pipeline=True, num_rounds=2, d_loss="wgan", critic_steps=1)
    critic, _ = run_loop(pipeline=True, num_rounds=2, d_loss="wgan", critic_steps=2)
    n = B * C * SIDE * SIDE
    feedback = 128 + n * 4 + len(wire.FEEDBACK)
    relay = feedback + 128 + B * 4 + len(wire.LABELS)
    flag = len(WANT_FEEDBACK) + 1          # a bool in a ConfigRecord
    rows = {name: {(r["round"], r["node"], r["phase"]): (r["down"], r["up"]) for r in strat.comm.rows}
            for name, strat in (("plain", plain), ("critic", critic))}
    assert set(rows["plain"]) == set(rows["critic"])
    (pd1, pu1), (cd1, cu1) = rows["plain"][(1, 1000, "train")], rows["critic"][(1, 1000, "train")]
    (pd2, pu2), (cd2, cu2) = rows["plain"][(2, 1000, "train")], rows["critic"][(2, 1000, "train")]
    assert (cd1, cu1) == (pd1 + flag, pu1 - feedback)            # critic-only round: labels, no feedback
    assert (cd2, cu2) == (pd2 + flag, pu2)                       # the D step before a G step
    # round 2's GB gets no feedback (F_1 is not relayed); the flush relays F_2 in both
    (pg_d, pg_u), (cg_d, cg_u) = rows["plain"][(2, 1001, "train")], rows["critic"][(2, 1001, "train")]
    assert (cg_d, cg_u) == (pg_d - relay, pg_u - (len("g_loss") + 8))
    assert rows["plain"][(2, 1001, "flush")] == rows["critic"][(2, 1001, "flush")]


def test_a_lost_db_reply_makes_its_pair_skip_and_min_replies_is_enforced():
    strat, _ = run_loop(n_pairs=2, pipeline=True, num_rounds=3, drop={(2, 1000)})
    rec = strat.recorder.rounds[1]
    assert rec["replies"] == 1 and rec["dropped"] == 1 and "lost in test" in rec["dropped_reasons"]["1000"]
    assert list(rec["clients"]) == ["GB 1 (pair of DB 0)", "GB 3 (pair of DB 2)"]
    assert math.isnan(rec["clients"]["GB 1 (pair of DB 0)"]["d_loss"])
    round3_gb1 = [e for e in strat.sent(GENERATOR_STEP, 1001) if e[0] == 3][0]
    assert RELAY not in round3_gb1[3]                           # no feedback: pair 0 skipped a G step
    round3_gb3 = [e for e in strat.sent(GENERATOR_STEP, 1003) if e[0] == 3][0]
    assert RELAY in round3_gb3[3]
    with pytest.raises(RunFailed, match="min-replies"):
        run_loop(n_pairs=2, pipeline=False, num_rounds=2, min_replies=2, drop={(2, 1002)})


# =====================================================================================
# What travels
# =====================================================================================
@pytest.mark.parametrize("pipeline", [True, False])
def test_contents_never_carry_data_or_the_other_blocks_weights(pipeline):
    strat, _ = run_loop(n_pairs=2, pipeline=pipeline, num_rounds=3, sample_every=2,
                        evaluate=lambda sets: {k: {"fid": float(v.std())} for k, v in sets.items()})
    d_state = build_d().state_dict()
    d_params = {n for n, _ in build_d().named_parameters()}
    real_rows = torch.cat(list(DATA.values()))
    db_replies = {nid: [e[4].array_records[wire.REPLY] for e in strat.sent(DISCRIMINATOR_GRAD, nid)]
                  for nid in (1000, 1002)}
    gb_fakes = {nid: [wire.get_tensor(e[4].array_records[wire.FAKES], wire.FAKES)
                      for e in strat.sent(GENERATOR_STEP, nid) if wire.FAKES in e[4]] for nid in (1001, 1003)}
    assert {e[2] for e in strat.log} == {wire.INFO, GENERATOR_STEP, DISCRIMINATOR_GRAD, SAMPLE}
    for rnd, nid, mtype, content, reply in strat.log:
        arrays = {(name, k): tuple(v.shape) for name, rec in content.array_records.items() for k, v in rec.items()}
        if mtype in (GENERATOR_STEP, SAMPLE):
            assert nid % 2 == 1                                       # generator blocks only
            assert set(content.keys()) <= {wire.CONFIG, RELAY}
            assert arrays in ({}, {(RELAY, wire.LABELS): (B,), (RELAY, wire.FEEDBACK): (B, *SHAPE)})
            if RELAY in content:   # what comes down is, value for value, a reply of its own pair's DB
                relay = content.array_records[RELAY]
                assert sum(all(torch.equal(wire.get_tensor(relay, k), wire.get_tensor(db, k))
                               for k in (wire.LABELS, wire.FEEDBACK)) for db in db_replies[nid - 1]) == 1
            up = set(reply.keys())
            assert up <= {wire.FAKES, wire.METRICS, SAMPLES}
        elif mtype == DISCRIMINATOR_GRAD:
            assert nid % 2 == 0
            assert set(content.keys()) == {wire.CONFIG, D_WEIGHTS, wire.FAKES}
            # D's weights (each of D's names with D's shape) and the fakes, nothing else: no G weight
            assert arrays == {**{(D_WEIGHTS, k): tuple(v.shape) for k, v in d_state.items()},
                              (wire.FAKES, wire.FAKES): (B, *SHAPE)}
            # ... and by value: the server's current D, and fakes its own pair's GB made
            sent_d = content.array_records[D_WEIGHTS].to_torch_state_dict()
            assert all(torch.equal(sent_d[k], v) for k, v in strat.d_at_send[(rnd, nid)].items())
            fakes = wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES)
            assert sum(torch.equal(fakes, f) for f in gb_fakes[nid + 1]) == 1
            assert set(reply.keys()) == {D_GRADS, wire.REPLY, wire.METRICS}
            assert set(reply.array_records[D_GRADS].keys()) == d_params
            assert set(reply.array_records[wire.REPLY].keys()) == {wire.LABELS, wire.FEEDBACK}
        else:
            assert mtype == wire.INFO and not content.array_records
        # no real sample ever travels, in either direction
        for rd in (content, reply):
            for rec in rd.array_records.values():
                for k in rec.keys():
                    t = wire.get_tensor(rec, k)
                    if tuple(t.shape[1:]) == SHAPE and t.is_floating_point():
                        assert not (t.unsqueeze(1) == real_rows.unsqueeze(0)).flatten(2).all(2).any()


@pytest.mark.parametrize("fakes_dtype,fake_item", [("float32", 4), ("float16", 2), ("uint8", 1)])
@pytest.mark.parametrize("feedback_dtype,fb_item", [("float32", 4), ("float16", 2)])
def test_bytes_of_one_round_equal_hand_arithmetic(fakes_dtype, fake_item, feedback_dtype, fb_item):
    strat, _ = run_loop(pipeline=True, num_rounds=3, fakes_dtype=fakes_dtype, feedback_dtype=feedback_dtype)
    n = B * C * SIDE * SIDE
    cfg = lambda entries: sum(len(k) + v for k, v in entries.items())  # noqa: E731
    metric = lambda keys: sum(8 + len(k) for k in keys)  # noqa: E731
    arr = lambda key, numel, item: 128 + numel * item + len(key)  # noqa: E731
    relay = arr("labels", B, 4) + arr("feedback", n, fb_item)
    gb_down = cfg({"round": 8, "g-block": 5, "d-loss": 3, "gen-lr": 8, "beta1": 8, "beta2": 8, "batch-size": 8,
                   "fakes-dtype": len(fakes_dtype), "feedback-dtype": len(feedback_dtype), "feedback-for": 8,
                   "make-fakes": 1}) + relay
    gb_up = arr("fakes", n, fake_item) + metric(["applied", "g_loss", "generation", "g_steps_total", "partition_id"])
    d_weights = sum(arr(k, v.numel(), v.element_size()) for k, v in build_d().state_dict().items())
    d_grads = sum(arr(k, p.numel(), 4) for k, p in build_d().named_parameters())
    db_down = cfg({"round": 8, "d-loss": 3, "fakes-dtype": len(fakes_dtype),
                   "feedback-dtype": len(feedback_dtype)}) + d_weights + arr("fakes", n, fake_item)
    db_up = d_grads + relay + metric(["d_loss", "d_real_acc", "d_fake_acc", "batch_size", "d_steps_total",
                                      "partition_id"])
    rows = [r for r in strat.comm.rows if r["round"] == 2]
    assert [(r["node"], r["action"], r["down"], r["up"]) for r in rows] == [
        (1000, DISCRIMINATOR_GRAD, db_down, db_up), (1001, GENERATOR_STEP, gb_down, gb_up)]
    rec = strat.recorder.rounds[1]
    assert (rec["bytes_down"], rec["bytes_up"]) == (db_down + gb_down, db_up + gb_up)
    # comm.jsonl: the training rows, then the sample queries of the last round's grid (phase "eval",
    # kept out of the training totals)
    assert strat.recorder.comm == strat.comm.rows + strat.eval_comm.rows
    assert strat.eval_comm.rows and all(r["phase"] == "eval" for r in strat.eval_comm.rows)
    assert strat.comm.down_total == sum(r["down"] for r in strat.comm.rows)


# =====================================================================================
# Roles
# =====================================================================================
@pytest.mark.parametrize("infos,match", [
    ({1: info(0), 2: info(1), 3: info(2)}, "odd number of nodes"),
    ({1: info(0), 2: info(1, role=-1)}, "unknown role"),
    ({1: info(0), 2: info(1, has_data=1)}, "generator but holds data"),
    ({1: info(0), 2: info(1), 3: info(2), 4: info(5)}, "unpaired"),
    ({1: info(0), 2: info(1, role=0)}, "even and generator blocks odd"),
    ({1: info(0), 2: {"role": 1, "has_data": 0}}, "no partition id"),
    ({1: info(0), 2: info(0)}, "both report partition 0"),
])
def test_role_mistakes_stop_the_run_at_start(infos, match):
    with pytest.raises(RunFailed, match=match):
        pair_nodes(infos)


def test_role_mistake_stops_run_before_any_training_message():
    infos = {1000: info(0), 1001: info(1, has_data=1)}
    strat = Loopback(settings(), infos)
    with pytest.raises(RunFailed, match="holds data"):
        strat.run(Grid(infos))
    assert {e[2] for e in strat.log} == {wire.INFO}


def test_pairs_follow_partitions():
    pairs = pair_nodes({11: info(3), 12: info(0), 13: info(1), 14: info(2)})
    assert [(p.index, p.db_node, p.gb_node) for p in pairs] == [(0, 12, 13), (1, 14, 11)]
    assert pairs[1].label == "GB 3 (pair of DB 2)"


# =====================================================================================
# Evaluation, outputs, settings
# =====================================================================================
def test_scores_summary_mean_and_best_per_key():
    s = summarize_scores({"a": {"modes_covered": 8, "reverse_kl": 0.5, "fid": 10.0, "hist": [1, 2]},
                          "b": {"modes_covered": 6, "reverse_kl": 0.1, "fid": 12.0, "hist": [3]}})
    assert s["mean"] == {"modes_covered": 7.0, "reverse_kl": pytest.approx(0.3), "fid": 11.0}
    assert (s["best"]["modes_covered"]["gb"], s["best"]["reverse_kl"]["gb"], s["best"]["fid"]["gb"]) == ("a", "b", "a")


def test_run_evaluates_every_generator_block_and_checkpoints_d():
    seen = []

    def evaluate(sets):
        seen.append(dict(sets))
        return {k: {"high_quality_pct": float(i), "fid": float(10 - i)} for i, k in enumerate(sets)}

    strat, result = run_loop(n_pairs=2, pipeline=True, num_rounds=2, sample_every=1, evaluate=evaluate)
    labels = ["GB 1 (pair of DB 0)", "GB 3 (pair of DB 2)"]
    assert [{k: tuple(v.shape) for k, v in sets.items()} for sets in seen] == [{k: (10, *SHAPE) for k in labels}] * 2
    # the last round's samples are, value for value, each GB's trained G on the seed the server sent
    for label, nid in zip(labels, (1001, 1003)):
        G, blob = gb_block(strat, nid)
        assert blob["g_steps"] == 2
        z = sample_latent(10, NZ, generator=torch.Generator().manual_seed(SEED * 7 + 2))
        with torch.no_grad():
            assert torch.equal(seen[-1][label], G(z))
        assert torch.equal(strat.recorder.samples["round00002"][label], seen[-1][label][:3])
    assert result["eval"]["best"]["high_quality_pct"]["gb"] == labels[1]
    assert result["eval"]["mean"]["fid"] == 9.5 and strat.recorder.rounds[-1]["eval"] == result["eval"]
    assert list(strat.recorder.samples["round00002"]) == labels
    assert all(v.shape == (3, *SHAPE) for v in strat.recorder.samples["round00002"].values())
    ckpt = strat.recorder.checkpoints["server.pt"]
    assert ckpt["round"] == 2 and ckpt["d_steps"] == 2
    assert all(torch.equal(v, strat.D.state_dict()[k]) for k, v in ckpt["d"].items())
    assert ckpt["comm"] == {"down_total": result["bytes_down"], "up_total": result["bytes_up"]}
    assert result["bytes_down"] == sum(r["down"] for r in strat.comm.rows)
    assert set(result) >= {"rounds", "last", "bytes_down", "bytes_up", "dropped_replies", "clients", "eval"}


@pytest.mark.parametrize("model,g_opt,gen_lr,d_opt,disc_lr,n", [
    ("dcgan", torch.optim.Adam, 3e-4, torch.optim.Adam, 4e-4, 1),
    ("wgan", torch.optim.RMSprop, 7e-5, torch.optim.RMSprop, 7e-5, 3),
    ("dcwgan", torch.optim.Adam, 3e-4, torch.optim.RMSprop, 7e-5, 3),    # DCGAN G + clipped WGAN critic
    ("wdcgan", torch.optim.RMSprop, 7e-5, torch.optim.Adam, 4e-4, 1),    # WGAN G + DCGAN D: one D step per G step
])
def test_run_bpgan_takes_the_wgan_schedule_from_the_config(monkeypatch, model, g_opt, gen_lr, d_opt, disc_lr, n):
    """From the run config to the server's D optimizer and, through the config the server sends,
    to the GB's optimizer (wgan-lr, wgan-critic-steps for the WGAN parts; others untouched)."""
    from app import server_app
    from app.config import parse_config

    class Built(BPGAN):
        def run(self, grid):
            return {"strategy": self}

    monkeypatch.setattr(server_app, "BPGAN", Built)
    cfg = parse_config({"strategy": "bpgan", "bpgan-model": model, "wgan-critic-steps": 3, "wgan-lr": 7e-5,
                        "client-gen-lr": 3e-4, "server-disc-lr": 4e-4, "gen-features": 8, "disc-features": 8,
                        "latent-dim": NZ})
    strat = server_app.run_bpgan(None, cfg, None, "cpu", NullRecorder())["strategy"]
    s = strat.s
    assert (s.g_block, s.d_loss) == resolve_model(model)
    assert (s.gen_lr, s.disc_lr, s.critic_steps) == (gen_lr, disc_lr, n)
    assert type(strat.opt_d) is d_opt and strat.opt_d.param_groups[0]["lr"] == disc_lr
    block = load_generator_block(RecordDict(), strat.generator_config(1, -1, True), build_g, "cpu")
    assert type(block.opt) is g_opt and block.opt.param_groups[0]["lr"] == gen_lr
    # BatchNorm in both discriminator kinds (the clipped critic too; only wgan-gp drops it)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in strat.D.modules())


def test_hybrids_and_settings_are_validated():
    assert HYBRIDS["dcwgan"] == ("dcgan", "wgan") and HYBRIDS["wdcgan"] == ("wgan", "bce")
    with pytest.raises(ValueError, match="bpgan-model"):
        resolve_model("bigan")
    with pytest.raises(ValueError, match="g_block"):
        BPGANSettings(g_block="wgan-gp")
    with pytest.raises(ValueError, match="fakes_dtype"):
        BPGANSettings(fakes_dtype="int8")
    with pytest.raises(ValueError, match="critic_steps"):
        BPGANSettings(critic_steps=0)
    for name in (GENERATOR_STEP, DISCRIMINATOR_GRAD, SAMPLE):
        assert "-" not in name and name.split(".")[0] in ("train", "query")
