"""MGGAN handlers and regrouping, checked on the client functions directly and end to end."""

import contextlib
import copy
import io
import math
import re

import pytest
import torch
from flwr.app import RecordDict

from models import MLPDiscriminator, MLPGenerator
from models.steps import sample_latent
from strategies import wire
from strategies.base import NullRecorder
from strategies.mggan import (CLIENT_STATE, D_META, D_MOMENTS, D_WEIGHTS, MGGAN, MGGANSettings,
                              client_get_discriminator, client_local, client_sample, mixture)
from strategies.mggan_rules import group_lr_max, period_a_end, schedule

BUILD = {"build_generator": lambda: MLPGenerator(4, 2, 16, 2), "build_discriminator": lambda: MLPDiscriminator(2, 16, 2),
         "device": "cpu"}
G_PARAMS = sum(p.numel() for p in BUILD["build_generator"]().parameters())
D_PARAMS = sum(p.numel() for p in BUILD["build_discriminator"]().parameters())
assert G_PARAMS != D_PARAMS   # optimizer steps are told apart by the size of what they update


def server(**kw):
    return MGGAN(MGGANSettings(batch_size=16, **kw), recorder=NullRecorder())


def local_msg(srv, nid, start, steps, return_d=False, next_at=-1, last_at=-1):
    return RecordDict({wire.CONFIG: srv.config_for(nid, **{"start-iter": start, "steps": steps, "next-regroup": next_at,
                                                          "last-regroup": last_at, "return-d": return_d})})


@contextlib.contextmanager
def optimizer_steps():
    """Every optimizer step torch takes inside the block: (optimizer class, lr, parameters updated)."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(
        (type(opt).__name__, opt.param_groups[0]["lr"], sum(p.numel() for g in opt.param_groups for p in g["params"]))))
    try:
        yield seen
    finally:
        handle.remove()


DATA = torch.randn(100, 2, generator=torch.Generator().manual_seed(0))   # the same data on every run


def sampler(b, g):
    return DATA[torch.randint(100, (b,), generator=g)]


def train_clients(srv, n, steps=5):
    states = [RecordDict() for _ in range(n)]
    srv.group_of = {nid: nid for nid in range(n)}
    for nid, st in enumerate(states):
        torch.manual_seed(nid)
        client_local(local_msg(srv, nid, 0, steps), st, sample_real=sampler, seed=0, partition_id=nid, **BUILD)
    return states


def blob(state):
    return torch.load(io.BytesIO(state.config_records[CLIENT_STATE]["blob"]), weights_only=False)


@pytest.mark.parametrize("move_moments", [False, True])
def test_after_a_regroup_client_k_holds_exactly_d_pi_k_and_nothing_else_moved(move_moments):
    srv = server(move_d_moments=move_moments)
    states = train_clients(srv, 4)
    # the D of every group comes back with the reply of a round that ends at a regroup ...
    replies = [client_local(local_msg(srv, k, 5, 0, return_d=True), s, sample_real=sampler, seed=0, **BUILD)
               for k, s in enumerate(states)]
    before = [copy.deepcopy(blob(s)) for s in states]
    assert all(set(r.keys()) >= {D_WEIGHTS, D_META} and (D_MOMENTS in r) == move_moments for r in replies)
    # ... the server pairs them along a derangement (its own regroup()) and the D rides with the next message
    srv.regroup(1, dict(enumerate(replies)))
    perm = {int(k): v for k, v in srv.regroups[-1]["pairs"].items()}
    assert all(perm[k] != k for k in perm)
    for k, s in enumerate(states):
        content = local_msg(srv, k, 5, 0)
        content.update(srv.pending_d.pop(k))
        out = client_local(content, s, sample_real=sampler, seed=0, **BUILD)
        assert out.metric_records[wire.METRICS]["moments_loaded"] == int(move_moments)
    for k, s in enumerate(states):
        after = blob(s)
        src = before[perm[k]]
        assert all(torch.equal(after["D"][n], src["D"][n]) for n in src["D"])            # D_pi(k)'s weights
        assert all(torch.equal(after["G"][n], before[k]["G"][n]) for n in before[k]["G"])  # G_k untouched
        assert after["opt_g"]["state"].keys() == before[k]["opt_g"]["state"].keys()
        for i, st in before[k]["opt_g"]["state"].items():
            assert all(torch.equal(st[n], after["opt_g"]["state"][i][n]) for n in st)      # G's moments untouched
        if move_moments:
            for i, st in src["opt_d"]["state"].items():
                assert all(torch.equal(torch.as_tensor(st[n]), torch.as_tensor(after["opt_d"]["state"][i][n])) for n in st)
        else:
            assert after["opt_d"]["state"] == {}                                           # reset
        assert after["iteration"] == before[k]["iteration"] and after["lr"] == before[k]["lr"]


def test_moments_are_reset_between_different_optimizer_kinds():
    srv = server(group_losses=("bce", "wgan"), move_d_moments=True)
    states = train_clients(srv, 2)
    rep = client_get_discriminator(RecordDict({wire.CONFIG: srv.config_for(1)}), states[1], **BUILD)  # an RMSprop D
    assert rep.config_records[D_META]["optimizer"] == "rmsprop"
    content = local_msg(srv, 0, 5, 0)
    content.update({name: rep[name] for name in (D_WEIGHTS, D_MOMENTS, D_META)})
    out = client_local(content, states[0], sample_real=sampler, seed=0, **BUILD)                  # into an Adam group
    assert out.metric_records[wire.METRICS]["moments_loaded"] == 0
    assert blob(states[0])["opt_d"]["state"] == {}
    assert all(torch.equal(blob(states[0])["D"][n], v) for n, v in rep[D_WEIGHTS].to_torch_state_dict().items())


def test_local_training_reports_a_loss_trace_and_keeps_counting():
    srv = server()
    states = train_clients(srv, 1, steps=7)
    assert blob(states[0])["iteration"] == 7 and blob(states[0])["d_steps_total"] == 7
    rep = client_local(local_msg(srv, 0, 7, 3), states[0], sample_real=sampler, seed=0, partition_id=0, **BUILD)
    assert len(rep.metric_records[wire.METRICS]["g_loss_trace"]) == 3
    assert blob(states[0])["iteration"] == 10


def test_sample_returns_exactly_g_k_outputs_for_the_sent_seed():
    srv = server()
    states = train_clients(srv, 2)

    def sample(k, seed):
        rep = client_sample(RecordDict({wire.CONFIG: srv.config_for(k, n=50, seed=seed)}), states[k], **BUILD)
        assert set(rep.keys()) == {"samples"} and list(rep.array_records["samples"].keys()) == ["samples"]
        return wire.get_tensor(rep.array_records["samples"], "samples")

    for k, st in enumerate(states):
        stored = bytes(st.config_records[CLIENT_STATE]["blob"])
        G = BUILD["build_generator"]()                       # G_k rebuilt from the client's own state
        G.load_state_dict(blob(st)["G"])
        z = sample_latent(50, G.latent_dim, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = G(z)
        got = sample(k, 1)
        assert got.dtype == torch.float32 and torch.equal(got, expected)
        assert bytes(st.config_records[CLIENT_STATE]["blob"]) == stored   # sampling leaves the group as it was
    # the comparison can fail: another seed, another group's G give other points
    assert not torch.equal(sample(0, 1), sample(0, 2)) and not torch.equal(sample(0, 1), sample(1, 1))


def test_mixture_draws_uniformly_from_the_groups():
    sets = {"a": torch.zeros(3000, 2), "b": torch.ones(3000, 2), "c": 2 * torch.ones(3000, 2)}
    mix = mixture(sets, 3000, torch.Generator().manual_seed(0))
    counts = torch.bincount(mix[:, 0].long(), minlength=3)
    assert counts.sum() == 3000 and ((counts - 1000).abs() < 100).all()


# ------------------------------------------------------------- Algorithm 1 as the client applies it
L0 = 2.0 ** -10          # powers of two: every rate below is exact in binary
A = 2                    # lr-window
# (start-iter, steps, next-regroup, last-regroup) of the train.local messages a server with
# local-steps 5 and regroupings at 8 and 16 sends: the windows [6, 10] and [14, 18] are split
# over two messages each; the resets fall on 11 and 19
PLAN = [(0, 5, 8, -1), (5, 3, 8, -1), (8, 5, 16, 8), (13, 3, 16, 8), (16, 5, 24, 16)]
REGROUPS = (8, 16)


def run_plan(srv, nid, seed=0):
    """The PLAN's messages to one client; returns its optimizer steps and its reported loss trace.
    The client's networks are drawn from torch's global generator: seeded here, so the trace (and
    which branches of Algorithm 1 it exercises) is the same on every run."""
    torch.manual_seed(seed)
    srv.group_of = {0: 0, 1: 1}
    state, trace = RecordDict(), []
    with optimizer_steps() as seen:
        for start, steps, next_at, last_at in PLAN:
            rep = client_local(local_msg(srv, nid, start, steps, next_at=next_at, last_at=last_at), state,
                               sample_real=sampler, seed=0, partition_id=nid, **BUILD)
            trace += list(rep.metric_records[wire.METRICS]["g_loss_trace"])
    return seen, trace


@pytest.mark.parametrize("nid, loss", [(0, "bce"), (1, "wgan")])
def test_client_steps_with_the_rate_algorithm_1_gives_each_iteration(nid, loss):
    # vrl-max so large that every finite VRL passes: inside a window the rate rises each
    # iteration (x1.5) until the cap lr-max (3 L0 for the configured rate, scaled for wgan)
    srv = server(group_losses=("bce", "wgan"), gen_lr=L0, disc_lr=2 * L0, lr_max=3 * L0, lr_delta=0.5,
                 lr_window=A, vrl_max=1e9, client_disc_steps=1, wgan_lr=L0 / 4, wgan_critic_steps=3)
    seen, trace = run_plan(srv, nid)
    assert len(trace) == 21
    #        i = 0..5 hold | 6 raise, 7 raise, 8-10 cap | 11 reset, 12-13 hold | 14-18 the same | 19 reset, 20
    factor = [1] * 6 + [1.5, 2.25, 3, 3, 3] + [1, 1, 1] + [1.5, 2.25, 3, 3, 3] + [1, 1]
    base, d_base, d_steps, kind = (L0, 2 * L0, 1, "Adam") if loss == "bce" else (L0 / 4, L0 / 4, 3, "RMSprop")
    assert [lr for _, lr, n in seen if n == G_PARAMS] == [f * base for f in factor]
    # D's rate moves by the same factor, at every one of its updates of the iteration
    assert [lr for _, lr, n in seen if n == D_PARAMS] == [f * d_base for f in factor for _ in range(d_steps)]
    assert {name for name, _, _ in seen} == {kind} and len(seen) == 21 * (d_steps + 1)


def test_client_rates_follow_algorithm_1_on_the_loss_trace_it_reports():
    # a VRL threshold amid this trace's VRLs (about 2e-4 to 3e-3), so the windows see both outcomes
    vrl_max, lr_max, delta = 1.4e-3, 2 * L0, 0.5
    srv = server(gen_lr=L0, disc_lr=L0, lr_max=lr_max, lr_delta=delta, lr_window=A, vrl_max=vrl_max)
    seen, trace = run_plan(srv, 0, seed=4)   # a seed whose trace reaches all five branches (so do 5-10; 0-3 do not)
    # Algorithm 1 and Eq. 3.1 by hand: the rate of iteration i uses VRL(L_{i-2}, L_{i-1})
    lr, expected, branches = L0, [], []
    for i in range(len(trace)):
        gamma = abs(trace[i - 2] - trace[i - 1]) / abs(trace[i - 1]) if i >= 2 else math.inf
        if any(r - A <= i <= r + A for r in REGROUPS):
            if gamma <= vrl_max:
                branch = "cap" if lr + lr * delta >= lr_max else "raise"
                lr = min(lr + lr * delta, lr_max)
            else:
                branch = "hold-window"
        elif any(i == r + A + 1 for r in REGROUPS):
            lr, branch = L0, "reset"
        else:
            branch = "hold"
        expected.append(lr)
        branches.append(branch)
    assert set(branches) == {"hold", "raise", "cap", "hold-window", "reset"}, branches
    assert [lr for _, lr, n in seen if n == G_PARAMS] == expected
    assert [lr for _, lr, n in seen if n == D_PARAMS] == expected


def test_a_wgan_group_trains_with_the_wgan_schedule_and_a_bce_group_does_not():
    srv = server(group_losses=("bce", "wgan"), gen_lr=2e-4, disc_lr=3e-4, client_disc_steps=2, lr_max=1e-3,
                 wgan_lr=7e-5, wgan_critic_steps=3)
    srv.group_of = {0: 0, 1: 1}
    for nid, (kind, g_lr, d_lr, d_steps, cap) in {0: ("Adam", 2e-4, 3e-4, 2, 1e-3),
                                                   1: ("RMSprop", 7e-5, 7e-5, 3, 1e-3 * 7e-5 / 2e-4)}.items():
        state = RecordDict()
        with optimizer_steps() as seen:
            client_local(local_msg(srv, nid, 0, 4), state, sample_real=sampler, seed=0, partition_id=nid, **BUILD)
            rep = client_local(local_msg(srv, nid, 4, 3), state, sample_real=sampler, seed=0, partition_id=nid, **BUILD)
        assert seen == ([(kind, d_lr, D_PARAMS)] * d_steps + [(kind, g_lr, G_PARAMS)]) * 7
        assert rep.metric_records[wire.METRICS]["d_steps_total"] == blob(state)["d_steps_total"] == 7 * d_steps
        assert rep.metric_records[wire.METRICS]["lr"] == g_lr
        controller = blob(state)["lr"]                 # Algorithm 1 starts from the group's own L0
        assert controller["lr0"] == g_lr and controller["lr_max"] == pytest.approx(cap, rel=1e-15)


def test_mggan_settings_carry_each_groups_schedule_into_its_messages():
    from app.config import parse_config
    from app.server_app import mggan_settings

    cfg = parse_config({"strategy": "mggan", "mggan-losses": "bce, wgan", "client-gen-lr": 3e-4,
                        "client-disc-lr": 4e-4, "client-disc-steps": 2, "wgan-lr": 7e-5, "wgan-critic-steps": 3,
                        "lr-max": 1.5e-3})
    s = mggan_settings(cfg)
    assert (s.group_losses, s.gen_lr, s.disc_lr, s.client_disc_steps, s.wgan_lr, s.wgan_critic_steps, s.lr_max) == (
        ("bce", "wgan"), 3e-4, 4e-4, 2, 7e-5, 3, 1.5e-3)
    srv = MGGAN(s, recorder=NullRecorder())
    srv.group_of = {10: 0, 11: 1, 12: 2}
    keys = ("loss", "gen-lr", "disc-lr", "client-disc-steps", "lr-max")
    got = {nid: tuple(srv.config_for(nid)[k] for k in keys) for nid in srv.group_of}
    assert got == {10: ("bce", 3e-4, 4e-4, 2, 1.5e-3), 11: ("wgan", 7e-5, 7e-5, 3, group_lr_max(1.5e-3, 3e-4, 7e-5)),
                   12: ("bce", 3e-4, 4e-4, 2, 1.5e-3)}
    assert got[11][4] == pytest.approx(3.5e-4, rel=1e-15)          # the same headroom L̄/L0 = 5
    # the same keys for every group: the messages' byte counts do not depend on the base loss
    assert list(srv.config_for(10).keys()) == list(srv.config_for(11).keys())
    default = mggan_settings(parse_config({"strategy": "mggan", "mggan-losses": "wgan"}))
    assert default.group_config("wgan") == {"gen-lr": 5e-5, "disc-lr": 5e-5, "client-disc-steps": 5,
                                            "lr-max": pytest.approx(2.5e-4, rel=1e-15)}
    with pytest.raises(ValueError, match="lr-max"):
        mggan_settings(parse_config({"strategy": "mggan", "lr-max": 1e-4}))


@pytest.mark.e2e
def test_simulation_regroups_and_counts_the_moved_discriminators(tmp_path):
    from app.builders import make_discriminator
    from app.config import parse_config
    from e2e_mods import simulate

    cfg = parse_config({"strategy": "mggan", "dataset": "ring", "partition": "full", "gen-features": 16,
                        "disc-features": 16, "latent-dim": 4, "batch-size": 32, "num-rounds": 5, "local-steps": 20,
                        "regroup-interval": -1, "period-a-window": 5, "period-a-min": 10, "period-a-cap": 30,
                        "regroup-xi": 1.5, "min-nodes": 3, "eval-samples": 500, "mggan-losses": "bce,wgan",
                        "client-disc-steps": 1, "wgan-critic-steps": 2, "output-dir": str(tmp_path)})
    run = simulate(cfg, 3)
    metrics = run.read_jsonl("metrics.jsonl")
    server = run.load_checkpoint("server.pt")
    # each group's G was written by its own client into the run folder (the server never holds one)
    from app.generators import list_generators
    from app.sample import main as fedgan_sample

    known = list_generators(run.path)
    assert list(known) == ["client0", "client1", "client2"]
    assert all(m["owner"] == "client" and m["round"] == 5 and m["architecture"]["kind"] == "mlp" for m in known.values())
    assert fedgan_sample(["--run", str(run.path), "--generator", "client1", "--num", "50",
                          "--out", str(tmp_path / "g1.npz")]) == 0
    assert __import__("numpy").load(tmp_path / "g1.npz")["points"].shape == (50, 2)
    # every group's D updates, counted on its client, match the server's iteration count times
    # the group's own critic steps (groups 0, 2: bce, 1 each; group 1: wgan, wgan-critic-steps = 2)
    for m in metrics:
        per_group = {int(re.match(r"group (\d+)", label).group(1)): c["d_steps_total"]
                     for label, c in m["clients"].items()}
        assert per_group == {0: m["iteration"], 1: 2 * m["iteration"], 2: m["iteration"]}, m["round"]
    # period A, recomputed from the mean loss trace the server kept (one value per iteration)
    assert len(server["trace"]) == metrics[-1]["iteration"]
    t0 = period_a_end(server["trace"], window=5, threshold=cfg.period_a_threshold, min_iters=10, cap=30)
    assert t0 is not None and server["period_a"] == t0
    # the rounds and regroupings §3.2.4 asks for: full rounds until period A is detected at a
    # round's end (first regrouping there), then T = min(ceil(T xi), T-bar) from each regrouping,
    # rounds cut to land on it, none after the last round
    nominal = schedule(t0, cfg.regroup_xi, cfg.regroup_t_max, 10)
    gaps = iter([b - a for a, b in zip(nominal, nominal[1:])])
    it, next_at, plan, regroup_at, L, R = 0, None, [], [], cfg.local_steps, cfg.num_rounds
    for rnd in range(1, R + 1):
        steps = L if next_at is None else min(L, next_at - it)
        it += steps
        plan.append((steps, it))
        if rnd < R and (it >= t0 if next_at is None else it == next_at):
            regroup_at.append(it)
            next_at = it + next(gaps)
    assert [(m["steps"], m["iteration"]) for m in metrics] == plan
    assert [m["iteration"] for m in metrics if m["regrouped"]] == regroup_at
    assert len(regroup_at) >= 2         # the first (fetched after period A) and a later, announced one
    regrouped = [m for m in metrics if m["regrouped"]]
    for m in regrouped:
        assert sorted(m["regroup_pairs"]) == ["0", "1", "2"]
        assert all(int(g) != d for g, d in m["regroup_pairs"].items())      # no D stays with its own G
    assert server["period_a"] <= 30
    # bytes at regroups: D's size times the number of moves, once up (to the server) and once down
    D = make_discriminator(cfg)
    d_bytes = sum(128 + v.numel() * 4 + len(k) for k, v in D.state_dict().items()) + len("optimizer") + len("adam")
    d_bytes_wgan = d_bytes - len("adam") + len("rmsprop")
    rows = [r for r in run.read_jsonl("comm.jsonl") if r["action"] == "regroup"]
    moves = 3 * len(regrouped)
    ups = sorted(r["up"] for r in rows if r["up"])
    assert len(ups) == moves and set(ups) <= {d_bytes, d_bytes_wgan}
    downs = [r["down"] for r in rows if r["down"]]
    assert len(downs) == moves and set(downs) <= {d_bytes, d_bytes_wgan}  # the last round never regroups
    summary = (run.path / "summary.md").read_text()
    assert "status: **success**" in summary and "mixture:" in summary
    assert (run.path / "samples" / "round00005_density.png").exists()
