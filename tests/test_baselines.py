"""The baselines (dataparallel, fedavg, local, centralized): their math on the handlers and
the servers' pure pieces, and their server loops over an in-process stand-in for the Grid
(Flower's Message cannot be built outside a Flower run, so the tests swap in a tiny one)."""

import copy
import io
import itertools
import math
from types import SimpleNamespace

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict

from models import MLPDiscriminator, MLPGenerator
from models.losses import make_optimizer
from models.losses import discriminator_loss, generator_loss
from models.steps import discriminator_step, generator_step
from strategies import wire
from strategies.base import NullRecorder, RunFailed
from strategies.centralized import Centralized, CentralizedSettings
from strategies.dataparallel import (DP_DISCRIMINATOR, DP_GENERATOR, DP_STEP, DataParallel, DataParallelSettings,
                                     client_dp_discriminator, client_dp_generator, client_dp_step, client_latents,
                                     client_real_batch)
from strategies.fedavg import CLIENT_STATE as FEDAVG_STATE
from strategies.fedavg import FEDAVG, FedAvg, FedAvgSettings, client_fedavg, fedavg_aggregate
from strategies.local import (ALONE, ALONE_SAMPLE, Local, LocalSettings, client_alone, client_alone_sample,
                              load_alone)

NZ, H, DIM, SEED = 4, 16, 2, 5


def make_g():
    return MLPGenerator(NZ, DIM, H, layers=2)


def make_d():
    return MLPDiscriminator(DIM, H, layers=2)


def make_g64():
    return make_g().double()


def make_d64():
    return make_d().double()


DATA = [torch.randn(40, DIM, generator=torch.Generator().manual_seed(100 + p)) + 3 * p for p in range(3)]


def sampler(pid):
    data = DATA[pid]
    return lambda b, gen: data[torch.randint(len(data), (b,), generator=gen)]


def state_bytes(model):
    """Hand arithmetic for an ArrayRecord of a state_dict: .npy header + data + key, per entry."""
    return sum(128 + t.numel() * t.element_size() + len(k) for k, t in model.state_dict().items())


def grad_bytes(model):
    return sum(128 + p.numel() * p.element_size() + len(k) for k, p in model.named_parameters())


def config_bytes(cfg: dict):
    """ConfigRecord: 8 bytes per int/float, len for str, 1 per bool, plus every key's length."""
    def size(v):
        if isinstance(v, bool):
            return 1
        if isinstance(v, str):
            return len(v)
        return 8
    return sum(len(k) + size(v) for k, v in cfg.items())


def metric_bytes(keys):
    return sum(8 + len(k) for k in keys)


# --- an in-process stand-in for Flower's Grid -----------------------------------------------
class FakeMessage:
    _ids = itertools.count(1)

    def __init__(self, content, dst_node_id, message_type, group_id, src_node_id=0, reply_to=""):
        self.content = content
        self.metadata = SimpleNamespace(message_id=f"m{next(FakeMessage._ids)}", dst_node_id=dst_node_id,
                                        src_node_id=src_node_id, message_type=message_type, group_id=group_id,
                                        reply_to_message_id=reply_to)

    def has_error(self):
        return False


class FakeGrid:
    """Runs the client handlers in process; node k holds partition k and keeps its own state."""

    def __init__(self, handlers, nodes=(101, 102), tamper=None):
        self.handlers, self.nodes, self.tamper = handlers, list(nodes), tamper
        self.states = {n: RecordDict() for n in self.nodes}
        self.log = []   # (node, message type, content down, content up)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        """Run each message's handler at once; its reply waits for :meth:`pull_messages`."""
        self.ready = getattr(self, "ready", {})
        ids = []
        for m in messages:
            nid, mtype = m.metadata.dst_node_id, m.metadata.message_type
            reply = self.handlers[mtype](m.content, self.states[nid], self.nodes.index(nid))
            if self.tamper is not None:
                reply = self.tamper(nid, mtype, reply)
            self.log.append((nid, mtype, m.content, reply))
            self.ready[m.metadata.message_id] = FakeMessage(reply, 0, mtype, m.metadata.group_id, src_node_id=nid,
                                                            reply_to=m.metadata.message_id)
            ids.append(m.metadata.message_id)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(mid) for mid in list(message_ids) if mid in getattr(self, "ready", {})]


@pytest.fixture
def fake_messages(monkeypatch):
    monkeypatch.setattr(wire, "Message", FakeMessage)


def dp_handlers(make_gen=make_g, make_disc=make_d, partition=lambda p: p):
    """Client handlers of the data-parallel messages; node k holds data set k and reports
    ``partition(k)`` as its partition id."""
    build = {"build_generator": make_gen, "build_discriminator": make_disc, "device": "cpu"}
    return {
        DP_STEP: lambda c, s, p: client_dp_step(c, s, sample_real=sampler(p), seed=SEED, partition_id=partition(p),
                                                **build),
        DP_DISCRIMINATOR: lambda c, s, p: client_dp_discriminator(c, s, sample_real=sampler(p), seed=SEED,
                                                                  partition_id=p, **build),
        DP_GENERATOR: lambda c, s, p: client_dp_generator(c, s, partition_id=p, **build),
    }


# =====================================================================================
# dataparallel
# =====================================================================================
def simultaneous_reference_step(G, D, opt_g, opt_d, real, z, loss, step_g=True):
    """One centralized simultaneous GAN step on one batch: both gradients at the same weights,
    then both optimizers step (D's weights clamped for the clipped WGAN)."""
    x = G(z)
    d_loss = discriminator_loss(loss, D(real), D(x.detach()))
    d_grads = torch.autograd.grad(d_loss, list(D.parameters()))
    g_grads = torch.autograd.grad(generator_loss(loss, D(x)), list(G.parameters())) if step_g else None
    for p, g in zip(D.parameters(), d_grads):
        p.grad = g
    opt_d.step()
    if loss == "wgan":
        with torch.no_grad():
            for p in D.parameters():
                p.clamp_(-0.01, 0.01)
    if step_g:
        for p, g in zip(G.parameters(), g_grads):
            p.grad = g
        opt_g.step()


@pytest.mark.parametrize("disc_steps", [1, 2])
@pytest.mark.parametrize("loss", ["bce", "wgan", "hinge"])
def test_dataparallel_round_equals_a_centralized_simultaneous_step_on_the_concatenated_batch(loss, disc_steps):
    """Thesis Fig. 4.7: one exchange per step; the server's update from the clients' gradients
    equals one process stepping G and D from the same weights on all clients' samples."""
    B = 8
    s = DataParallelSettings(latent_dim=NZ, batch_size=B, loss=loss, gen_lr=1e-2, disc_lr=1e-2, seed=3,
                             disc_steps=disc_steps)
    strat = DataParallel(s, make_generator=make_g64, make_discriminator=make_d64, recorder=NullRecorder())
    G, D = copy.deepcopy(strat.G), copy.deepcopy(strat.D)
    opt_g = make_optimizer(loss, G.parameters(), s.gen_lr, (s.beta1, s.beta2))
    opt_d = make_optimizer(loss, D.parameters(), s.disc_lr, (s.beta1, s.beta2))
    build = {"build_generator": make_g64, "build_discriminator": make_d64, "device": "cpu"}
    for rnd, seed in ((1, 11), (2, 21), (3, 31), (4, 41)):   # optimizer moments carry over
        want_g = strat.wants_g(rnd)
        assert want_g == (rnd % disc_steps == 0)
        content = strat.step_content(rnd, seed, want_g)
        replies = [strat.parse_step(client_dp_step(content, RecordDict(), sample_real=sampler(p), seed=SEED,
                                                   partition_id=p, **build), want_g) for p in (0, 1)]
        assert [n for _, _, n, _ in replies] == [B, B] and all((g is not None) == want_g for _, g, _, _ in replies)
        strat.step_discriminator([(d, n, m) for d, _, n, m in replies])
        if want_g:
            strat.step_generator([(g, n, m) for _, g, n, m in replies])
        real = torch.cat([client_real_batch(sampler(p), SEED, p, rnd, B) for p in (0, 1)]).double()
        z = torch.cat([client_latents(seed, p, B, NZ) for p in (0, 1)]).double()
        simultaneous_reference_step(G, D, opt_g, opt_d, real, z, loss, step_g=want_g)
        for (name, p), q in zip(strat.D.named_parameters(), D.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0), f"D.{name} differs in round {rnd}"
        for (name, p), q in zip(strat.G.named_parameters(), G.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0), f"G.{name} differs in round {rnd}"
    assert not torch.allclose(strat.G.net[0].weight, make_g64().net[0].weight)  # it did move


@pytest.mark.parametrize("loss", ["bce", "wgan", "hinge"])
def test_alternating_dataparallel_step_equals_centralized_step_on_the_concatenated_batch(loss):
    B = 8
    s = DataParallelSettings(latent_dim=NZ, batch_size=B, loss=loss, gen_lr=1e-2, disc_lr=1e-2, seed=3,
                             mode="alternating")
    strat = DataParallel(s, make_generator=make_g64, make_discriminator=make_d64, recorder=NullRecorder())
    G, D = copy.deepcopy(strat.G), copy.deepcopy(strat.D)
    opt_g = make_optimizer(loss, G.parameters(), s.gen_lr, (s.beta1, s.beta2))
    opt_d = make_optimizer(loss, D.parameters(), s.disc_lr, (s.beta1, s.beta2))
    build = {"build_generator": make_g64, "build_discriminator": make_d64, "device": "cpu"}
    for rnd, seed_d, seed_g in ((1, 11, 12), (2, 21, 22), (3, 31, 32)):   # optimizer moments carry over
        # (a) discriminator: both clients' gradients, averaged by the server
        content = strat.discriminator_content(rnd, seed_d)
        replies = [strat.parse_content(client_dp_discriminator(content, RecordDict(), sample_real=sampler(p),
                                                               seed=SEED, partition_id=p, **build), strat.D)
                   for p in (0, 1)]
        assert [n for _, n, _ in replies] == [B, B]
        strat.step_discriminator(replies)
        real = torch.cat([client_real_batch(sampler(p), SEED, p, rnd, B) for p in (0, 1)]).double()
        z = torch.cat([client_latents(seed_d, p, B, NZ) for p in (0, 1)]).double()
        with torch.no_grad():
            fake = G(z)
        discriminator_step(D, opt_d, real, fake, loss)
        for (name, p), q in zip(strat.D.named_parameters(), D.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0), f"D.{name} differs in round {rnd}"
        # (b) generator, through the updated D
        content = strat.generator_content(rnd, seed_g)
        replies = [strat.parse_content(client_dp_generator(content, RecordDict(), partition_id=p, **build), strat.G)
                   for p in (0, 1)]
        strat.step_generator(replies)
        zg = torch.cat([client_latents(seed_g, p, B, NZ) for p in (0, 1)]).double()
        generator_step(G, opt_g, D, zg, loss)
        for (name, p), q in zip(strat.G.named_parameters(), G.parameters()):
            assert torch.allclose(p, q, atol=1e-10, rtol=0), f"G.{name} differs in round {rnd}"
    assert not torch.allclose(strat.G.net[0].weight, make_g64().net[0].weight)  # it did move


def test_dataparallel_clients_use_different_latents_and_data():
    assert not torch.equal(client_latents(7, 0, 4, NZ), client_latents(7, 1, 4, NZ))
    assert not torch.equal(client_real_batch(sampler(0), SEED, 0, 1, 4), client_real_batch(sampler(0), SEED, 1, 1, 4))


STEP_METRICS = ["num-examples", "d_loss", "d_real_acc", "d_fake_acc", "d_real_out", "d_fake_out", "partition_id"]


def test_dataparallel_run_bytes_and_records_equal_hand_arithmetic(fake_messages):
    """Simultaneous (thesis Eq. 4.1): per client and step, G and D down once, both gradients up once."""
    B = 8
    rec = NullRecorder()
    evaluated = {}
    s = DataParallelSettings(num_rounds=2, latent_dim=NZ, batch_size=B, sample_every=1, samples_per_client=4,
                             eval_samples=50)
    strat = DataParallel(s, make_generator=make_g, make_discriminator=make_d, recorder=rec,
                         evaluate=lambda sets: evaluated.update({k: v.shape for k, v in sets.items()}) or {"ok": 1})
    grid = FakeGrid(dp_handlers())
    out = strat.run(grid)
    G, D = make_g(), make_d()
    cfg = {"round": 1, "loss": "bce", "batch-size": B, "latent-seed": 1, "want-g": True}
    down_one = state_bytes(G) + state_bytes(D) + config_bytes(cfg)
    up_one = grad_bytes(D) + grad_bytes(G) + metric_bytes(STEP_METRICS + ["g_loss"])
    assert len(rec.rounds) == 2
    for r in rec.rounds:
        assert r["bytes_down"] == 2 * down_one and r["bytes_up"] == 2 * up_one
        assert r["replies"] == 2 and r["dropped"] == 0 and set(r["clients"]) == {"client 0", "client 1"}
        assert math.isfinite(r["g_loss"]) and math.isfinite(r["d_loss"]) and r["wall_time"] >= 0
    rows = [c for c in rec.comm if c["round"] == 1]
    assert sorted((c["node"], c["action"]) for c in rows) == [(101, DP_STEP), (102, DP_STEP)]
    assert all(c["down"] == down_one and c["up"] == up_one for c in rows)
    assert out["bytes_down"] == 2 * 2 * down_one and out["bytes_up"] == 2 * 2 * up_one
    assert set(out) >= {"rounds", "last", "bytes_down", "bytes_up", "dropped_replies", "clients", "eval"}
    assert out["eval"] == {"ok": 1} and evaluated == {"global": (50, DIM)}
    assert set(rec.samples) == {"round00001", "round00002"} and rec.samples["round00002"]["global"].shape == (4, DIM)
    assert "server.pt" in rec.checkpoints and rec.checkpoints["server.pt"]["round"] == 2
    # only the two gradients and metrics went up, each message once per client and step
    assert all(set(dict(up.items())) == {"grad_d", "grad_g", "metrics"} for _, _, _, up in grid.log)
    assert len(grid.log) == 2 * 2


def test_dataparallel_critic_rounds_skip_the_generator_gradient(fake_messages):
    """With 3 critic steps per generator step, only every third round asks for (and carries) G's gradient."""
    B = 8
    rec = NullRecorder()
    s = DataParallelSettings(num_rounds=6, latent_dim=NZ, batch_size=B, sample_every=0, disc_steps=3)
    grid = FakeGrid(dp_handlers())
    out = DataParallel(s, make_generator=make_g, make_discriminator=make_d, recorder=rec).run(grid)
    G, D = make_g(), make_d()
    up_d_only = grad_bytes(D) + metric_bytes(STEP_METRICS)
    up_both = up_d_only + grad_bytes(G) + metric_bytes(["g_loss"])
    assert [r["g_step"] for r in rec.rounds] == [0, 0, 1, 0, 0, 1]
    assert [r["bytes_up"] for r in rec.rounds] == [2 * (up_both if r["g_step"] else up_d_only) for r in rec.rounds]
    assert rec.rounds[-1]["g_steps_total"] == 2 and out["last"]["g_steps_total"] == 2
    assert [math.isnan(r["g_loss"]) for r in rec.rounds] == [True, True, False, True, True, False]


def test_alternating_dataparallel_run_bytes_equal_hand_arithmetic(fake_messages):
    B = 8
    rec = NullRecorder()
    s = DataParallelSettings(num_rounds=2, latent_dim=NZ, batch_size=B, sample_every=0, mode="alternating")
    grid = FakeGrid(dp_handlers())
    out = DataParallel(s, make_generator=make_g, make_discriminator=make_d, recorder=rec).run(grid)
    G, D = make_g(), make_d()
    cfg = {"round": 1, "loss": "bce", "batch-size": B, "latent-seed": 1}
    down_one = state_bytes(G) + state_bytes(D) + config_bytes(cfg)          # same for (a) and (b)
    up_d = grad_bytes(D) + metric_bytes(STEP_METRICS)
    up_g = grad_bytes(G) + metric_bytes(["num-examples", "g_loss", "partition_id"])
    for r in rec.rounds:
        assert r["bytes_down"] == 2 * 2 * down_one
        assert r["bytes_up"] == 2 * (up_d + up_g)
    assert out["bytes_down"] == 2 * 2 * 2 * down_one and out["bytes_up"] == 2 * 2 * (up_d + up_g)
    assert all(set(dict(up.items())) == {"grad", "metrics"} for _, _, _, up in grid.log)


def test_dataparallel_drops_a_bad_reply_and_fails_below_min_replies(fake_messages):
    def poison(nid, mtype, reply):
        if nid == 102:
            rec = reply.array_records["grad_d"]
            key = next(iter(rec.keys()))
            t = wire.get_tensor(rec, key)
            t.view(-1)[0] = float("nan")
            rec[key] = ArrayRecord({key: t})[key]
        return reply

    s = DataParallelSettings(num_rounds=1, latent_dim=NZ, batch_size=4, sample_every=0)
    rec = NullRecorder()
    out = DataParallel(s, make_generator=make_g, make_discriminator=make_d, recorder=rec).run(
        FakeGrid(dp_handlers(), tamper=poison))
    r = rec.rounds[0]
    assert r["dropped"] == 1 and "NaN" in r["dropped_reasons"]["102"] and out["dropped_replies"] == 1
    assert set(r["clients"]) == {"client 0"}                            # neither of its gradients was used
    with pytest.raises(RunFailed, match="min-replies"):
        DataParallel(DataParallelSettings(num_rounds=1, latent_dim=NZ, batch_size=4, min_replies=2),
                     make_generator=make_g, make_discriminator=make_d,
                     recorder=NullRecorder()).run(FakeGrid(dp_handlers(), tamper=poison))


def test_dataparallel_weights_replies_by_the_batch_size_it_asked_for(fake_messages):
    """A client that claims a larger batch does not get a larger weight: its reply is dropped."""
    def inflate(nid, mtype, reply):
        if nid == 102:
            metrics = reply.metric_records["metrics"]
            metrics["num-examples"] = 1000
        return reply

    rec = NullRecorder()
    strat = DataParallel(DataParallelSettings(num_rounds=1, latent_dim=NZ, batch_size=4, sample_every=0),
                         make_generator=make_g, make_discriminator=make_d, recorder=rec)
    strat.run(FakeGrid(dp_handlers(), tamper=inflate))
    reason = rec.rounds[0]["dropped_reasons"]["102"]
    assert "'num-examples' = 1000, but the server asked for a batch of 4" in reason
    assert set(rec.rounds[0]["clients"]) == {"client 0"}


@pytest.mark.parametrize("partition,match", [
    (lambda p: 0, "nodes 101, 102 all report partition id 0"),
    (lambda p: None, "node\\(s\\) 101, 102 report no partition id"),
    (lambda p: p - 1, "node\\(s\\) 101 report partition id -1"),
])
def test_nodes_that_cannot_be_told_apart_are_refused_before_any_step(fake_messages, partition, match):
    """Two nodes with one partition id (or none) would draw identical latents into one global batch."""
    if partition(0) == partition(1) == 0:   # the defect this guards against: the same latents on both nodes
        assert torch.equal(client_latents(7, 0, 4, NZ), client_latents(7, None, 4, NZ))
    strat = DataParallel(DataParallelSettings(num_rounds=2, latent_dim=NZ, batch_size=4, sample_every=0),
                         make_generator=make_g, make_discriminator=make_d, recorder=NullRecorder())
    before = copy.deepcopy(strat.D.state_dict())
    with pytest.raises(RunFailed, match=match):
        strat.run(FakeGrid(dp_handlers(partition=partition)))
    assert all(torch.equal(v, strat.D.state_dict()[k]) for k, v in before.items())   # nothing was applied


# =====================================================================================
# fedavg
# =====================================================================================
def test_fedavg_aggregate_equals_the_hand_computed_example_weighted_average():
    gen = torch.Generator().manual_seed(0)
    counts = [10, 30, 60]
    states = [{"w": torch.randn(3, 4, generator=gen), "b": torch.randn(4, generator=gen),
               "num_batches_tracked": torch.tensor(k * 7, dtype=torch.int64)} for k in range(3)]
    reference = {k: torch.zeros_like(v) for k, v in states[0].items()}
    out = fedavg_aggregate([(ArrayRecord(st), n) for st, n in zip(states, counts)], reference)
    for key in ("w", "b"):
        hand = (10 * states[0][key] + 30 * states[1][key] + 60 * states[2][key]) / 100
        assert torch.allclose(out[key], hand, atol=1e-6) and out[key].dtype == torch.float32
    assert out["num_batches_tracked"].dtype == torch.int64
    assert int(out["num_batches_tracked"]) == round((10 * 0 + 30 * 7 + 60 * 14) / 100)


def test_fedavg_server_sets_both_networks_to_the_weighted_average():
    strat = FedAvg(FedAvgSettings(latent_dim=NZ, batch_size=4, local_steps=1), make_generator=make_g,
                   make_discriminator=make_d, recorder=NullRecorder())
    content = strat.build_content(1)
    replies, states = [], [RecordDict() for _ in range(3)]
    for p, n in zip(range(3), (10, 30, 60)):
        reply = client_fedavg(content, states[p], sample_real=sampler(p), num_examples=n, build_generator=make_g,
                              build_discriminator=make_d, device="cpu", seed=SEED, partition_id=p)
        replies.append(strat.parse_content(reply))
    strat.aggregate(1, replies)
    for name, net in (("g", strat.G), ("d", strat.D)):
        for key, value in net.state_dict().items():
            hand = sum(n * wire.get_tensor(r[0]["arrays"], f"{name}.{key}") for r, n in zip(replies, (10, 30, 60))) / 100
            assert torch.allclose(value, hand, atol=1e-6), f"{name}.{key}"


def test_fedavg_client_keeps_its_optimizers_and_reveals_only_weights_and_its_count():
    strat = FedAvg(FedAvgSettings(latent_dim=NZ, batch_size=4, local_steps=3), make_generator=make_g,
                   make_discriminator=make_d, recorder=NullRecorder())
    state = RecordDict()
    kw = dict(sample_real=sampler(0), num_examples=40, build_generator=make_g, build_discriminator=make_d,
              device="cpu", seed=SEED, partition_id=0)
    first = client_fedavg(strat.build_content(1), state, **kw)
    assert set(dict(first.items())) == {"arrays", "metrics"}
    assert {k[:2] for k in first["arrays"].keys()} == {"g.", "d."}
    assert first.metric_records["metrics"]["num-examples"] == 40 and first.metric_records["metrics"]["steps_total"] == 3
    second = client_fedavg(strat.build_content(2), state, **kw)
    assert second.metric_records["metrics"]["steps_total"] == 6
    assert state.config_records[FEDAVG_STATE]["steps"] == 6
    blob = torch.load(io.BytesIO(state.config_records[FEDAVG_STATE]["blob"]), weights_only=False)
    assert blob["opt_g"]["state"][0]["step"] == 6       # Adam's step count carried across rounds


def test_fedavg_run_bytes_equal_hand_arithmetic(fake_messages):
    s = FedAvgSettings(num_rounds=2, latent_dim=NZ, batch_size=4, local_steps=2, sample_every=0, eval_samples=20)
    rec = NullRecorder()
    build = {"build_generator": make_g, "build_discriminator": make_d, "device": "cpu"}
    grid = FakeGrid({FEDAVG: lambda c, st, p: client_fedavg(c, st, sample_real=sampler(p), num_examples=len(DATA[p]),
                                                            seed=SEED, partition_id=p, **build)})
    out = FedAvg(s, make_generator=make_g, make_discriminator=make_d, recorder=rec,
                 evaluate=lambda sets: {"n": len(sets["global"])}).run(grid)
    G, D = make_g(), make_d()
    cfg = {"round": 1, "loss": "bce", "gen-lr": 0.1, "disc-lr": 0.1, "beta1": 0.1, "beta2": 0.1, "batch-size": 4,
           "steps": 2, "client-disc-steps": 1, "seed": 0}
    packed = state_bytes(G) + state_bytes(D) + 2 * (len(G.state_dict()) + len(D.state_dict()))   # "g."/"d." keys
    down = packed + config_bytes(cfg)
    up = packed + metric_bytes(["num-examples", "g_loss", "d_loss", "d_real_acc",
                                                         "d_fake_acc", "steps_total", "partition_id"])
    assert [r["bytes_down"] for r in rec.rounds] == [2 * down] * 2
    assert [r["bytes_up"] for r in rec.rounds] == [2 * up] * 2
    assert out["bytes_down"] == 4 * down and out["bytes_up"] == 4 * up and out["eval"] == {"n": 20}
    assert rec.rounds[-1]["clients"]["client 1"]["steps_total"] == 4
    assert rec.rounds[-1]["clients"]["client 0"]["num_examples"] == 40
    assert set(rec.samples) == {"round00002"} and rec.checkpoints["server.pt"]["round"] == 2


# =====================================================================================
# local
# =====================================================================================
def local_handlers():
    build = {"build_generator": make_g, "build_discriminator": make_d, "device": "cpu"}
    return {ALONE: lambda c, st, p: client_alone(c, st, sample_real=sampler(p), seed=SEED, partition_id=p, **build),
            ALONE_SAMPLE: lambda c, st, p: client_alone_sample(c, st, partition_id=p, **build)}


def test_local_client_state_persists_and_only_metrics_go_up():
    srv = Local(LocalSettings(latent_dim=NZ, batch_size=4, local_steps=3), recorder=NullRecorder())
    state = RecordDict()
    handler = local_handlers()[ALONE]
    for rnd in (1, 2, 3):
        reply = handler(srv.train_content(rnd), state, 0)
        assert set(dict(reply.items())) == {"metrics"}          # no weights, no data
        assert srv.parse_train(reply)["steps_total"] == 3 * rnd
    sample = local_handlers()[ALONE_SAMPLE](srv.sample_content(3, 5, 9), state, 0)
    x = srv.parse_samples(sample, 5)
    # exactly the trained G_i's outputs for the latents of the seed the server sent
    G_i, _, _, _, _ = load_alone(state, srv.train_content(3).config_records[wire.CONFIG], make_g, make_d, "cpu")
    with torch.no_grad():
        expected = G_i(torch.randn(5, NZ, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(x, expected)
    fresh = local_handlers()[ALONE_SAMPLE](srv.sample_content(3, 5, 9), RecordDict(), 0)
    assert not torch.allclose(x, srv.parse_samples(fresh, 5))     # the trained G_i, not a new one
    bad = RecordDict({"metrics": MetricRecord({"g_loss": 1.0}), "leak": ArrayRecord({"x": torch.zeros(2)})})
    with pytest.raises(wire.BadReply, match="only metrics"):
        srv.parse_train(bad)


def test_local_run_gives_one_generator_per_client(fake_messages):
    rec = NullRecorder()
    seen = {}
    s = LocalSettings(num_rounds=2, latent_dim=NZ, batch_size=4, local_steps=2, sample_every=1, samples_per_client=3,
                      eval_samples=7)
    grid = FakeGrid(local_handlers())
    out = Local(s, recorder=rec, evaluate=lambda sets: seen.update({k: v.shape for k, v in sets.items()}) or {"e": 1}
                ).run(grid)
    assert seen == {"client 0": (7, DIM), "client 1": (7, DIM)} and out["eval"] == {"e": 1}
    assert set(rec.samples["round00001"]) == {"client 0", "client 1"}
    assert rec.samples["round00002"]["client 1"].shape == (3, DIM)
    assert [r["clients"]["client 0"]["steps_total"] for r in rec.rounds] == [2, 4]
    train_up = [up for _, mtype, _, up in grid.log if mtype == ALONE]
    assert all(set(dict(up.items())) == {"metrics"} for up in train_up)
    metrics = metric_bytes(["g_loss", "d_loss", "d_real_acc", "d_fake_acc", "steps_total", "partition_id"])
    cfg = {"round": 1, "loss": "bce", "gen-lr": 0.1, "disc-lr": 0.1, "beta1": 0.1, "beta2": 0.1, "batch-size": 4,
           "steps": 2, "client-disc-steps": 1, "seed": 0}
    assert all(c["up"] == metrics and c["down"] == config_bytes(cfg) for c in rec.comm if c["action"] == ALONE)
    assert [(r["bytes_down"], r["bytes_up"]) for r in rec.rounds] == [(2 * config_bytes(cfg), 2 * metrics)] * 2
    assert out["bytes_up"] == 4 * metrics                                   # training traffic: metrics only
    # sample queries are booked apart: 3 rows per client each round, plus 7 for the evaluation at the end
    def sample_up(n):
        return 128 + n * DIM * 4 + len("samples") + metric_bytes(["steps_total", "partition_id"])
    assert [r["sample_bytes_up"] for r in rec.rounds] == [2 * sample_up(3), 2 * (sample_up(3) + sample_up(7))]
    assert out["sample_bytes_up"] == 2 * (2 * sample_up(3) + sample_up(7))
    assert {c["action"] for c in rec.comm} == {ALONE, ALONE_SAMPLE}
    assert out["clients"] == {"client 0": 101, "client 1": 102} and "server.pt" in rec.checkpoints


# =====================================================================================
# centralized
# =====================================================================================
def test_centralized_runs_and_reports_one_record_per_round():
    rec = NullRecorder()
    union = torch.cat(DATA)
    s = CentralizedSettings(num_rounds=3, local_steps=2, latent_dim=NZ, batch_size=8, sample_every=2,
                            samples_per_client=4, eval_samples=30)
    strat = Centralized(s, sample_real=lambda b, g: union[torch.randint(len(union), (b,), generator=g)],
                        make_generator=make_g, make_discriminator=make_d, recorder=rec,
                        evaluate=lambda sets: {"n": len(sets["global"])})
    before = copy.deepcopy(strat.G)
    out = strat.run(object())                       # a ServerApp's grid is accepted and ignored
    assert [r["round"] for r in rec.rounds] == [1, 2, 3] and [r["steps"] for r in rec.rounds] == [2, 4, 6]
    assert all(math.isfinite(r["g_loss"]) and r["bytes_down"] == r["bytes_up"] == 0 for r in rec.rounds)
    assert set(rec.samples) == {"round00002", "round00003"} and rec.samples["round00003"]["global"].shape == (4, DIM)
    assert rec.checkpoints["server.pt"]["steps"] == 6 and out["eval"] == {"n": 30} and out["rounds"] == 3
    assert not torch.allclose(before.net[0].weight, strat.G.net[0].weight)
    # same starting networks as the federated baselines for the same seed
    dp = DataParallel(DataParallelSettings(latent_dim=NZ), make_generator=make_g, make_discriminator=make_d,
                      recorder=NullRecorder())
    assert all(torch.equal(a, b) for a, b in zip(before.state_dict().values(), dp.G.state_dict().values()))


def test_fedavg_resumed_from_its_checkpoint_equals_the_uninterrupted_run(fake_messages):
    """FedAdam keeps server state (its moments): a run stopped after round 2 and resumed from its
    checkpoint ends with the very networks and byte totals of a run that never stopped."""
    from dataclasses import replace

    s = FedAvgSettings(num_rounds=3, latent_dim=NZ, batch_size=4, local_steps=2, sample_every=0, checkpoint_every=1,
                       variant="fedadam", server_lr=0.05)
    build = {"build_generator": make_g, "build_discriminator": make_d, "device": "cpu"}

    def grid():
        return FakeGrid({FEDAVG: lambda c, st, p: client_fedavg(c, st, sample_real=sampler(p),
                                                                num_examples=len(DATA[p]), seed=SEED, partition_id=p,
                                                                **build)})

    def server(settings, rec):
        return FedAvg(settings, make_generator=make_g, make_discriminator=make_d, recorder=rec)

    full = server(s, NullRecorder())
    full_out = full.run(grid())
    g, rec = grid(), NullRecorder()
    server(replace(s, num_rounds=2), rec).run(g)
    ckpt = copy.deepcopy(rec.checkpoints["server.pt"])
    assert ckpt["round"] == 2 and set(ckpt["flower_state"]) == {"m_t", "v_t"}
    resumed = server(s, NullRecorder())
    resumed.restore(ckpt)
    out = resumed.run(g)       # the same clients, who kept their optimizers
    for a, b in ((full.G, resumed.G), (full.D, resumed.D)):
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert (out["bytes_down"], out["bytes_up"]) == (full_out["bytes_down"], full_out["bytes_up"])
    assert [r["round"] for r in resumed.recorder.rounds] == [3]


def test_fedprox_sends_its_mu_and_the_other_variants_do_not():
    for variant, mu in (("fedprox", 0.25), ("fedavg", None), ("fedadam", None)):
        strat = FedAvg(FedAvgSettings(latent_dim=NZ, variant=variant, proximal_mu=0.25), make_generator=make_g,
                       make_discriminator=make_d, recorder=NullRecorder())
        cfg = strat.build_content(1)["config"]
        assert cfg.get("proximal-mu") == mu, variant
