"""MGGAN handlers and regrouping, checked on the client functions directly and end to end."""

import copy
import io

import pytest
import torch
from flwr.app import RecordDict

from models import MLPDiscriminator, MLPGenerator
from strategies import wire
from strategies.mggan import (CLIENT_STATE, D_META, D_MOMENTS, D_WEIGHTS, MGGAN, MGGANSettings,
                              client_get_discriminator, client_local, client_sample, mixture, nearest_regroup)
from strategies.base import NullRecorder

BUILD = {"build_generator": lambda: MLPGenerator(4, 2, 16, 2), "build_discriminator": lambda: MLPDiscriminator(2, 16, 2),
         "device": "cpu"}


def server(**kw):
    return MGGAN(MGGANSettings(batch_size=16, **kw), recorder=NullRecorder())


def local_msg(srv, nid, start, steps, return_d=False):
    return RecordDict({wire.CONFIG: srv.config_for(nid, **{"start-iter": start, "steps": steps, "next-regroup": -1,
                                                          "last-regroup": -1, "return-d": return_d})})


DATA = torch.randn(100, 2)


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


def test_sample_returns_generated_points_only():
    srv = server()
    states = train_clients(srv, 1)
    rep = client_sample(RecordDict({wire.CONFIG: srv.config_for(0, n=50, seed=1)}), states[0], **BUILD)
    assert set(rep.keys()) == {"samples"} and tuple(rep.array_records["samples"]["samples"].shape) == (50, 2)


def test_mixture_draws_uniformly_from_the_groups():
    sets = {"a": torch.zeros(3000, 2), "b": torch.ones(3000, 2), "c": 2 * torch.ones(3000, 2)}
    mix = mixture(sets, 3000, torch.Generator().manual_seed(0))
    counts = torch.bincount(mix[:, 0].long(), minlength=3)
    assert counts.sum() == 3000 and ((counts - 1000).abs() < 100).all()


def test_algorithm_1_window_anchor():
    # coming regroup at 100 with a = 10: from 90 on the window is anchored there; before, on the last one
    assert nearest_regroup(89, 100, 50, 10) == 50
    assert nearest_regroup(90, 100, 50, 10) == 100
    assert nearest_regroup(105, 200, 100, 10) == 100   # after a regroup: still its window, then its reset
    assert nearest_regroup(5, -1, -1, 10) is None


@pytest.mark.e2e
def test_simulation_regroups_and_counts_the_moved_discriminators(tmp_path):
    from flwr.simulation import run_simulation

    from app.builders import make_discriminator
    from app.client_app import make_client_app
    from app.config import parse_config
    from app.runs import RunFolder
    from app.server_app import make_server_app

    cfg = parse_config({"strategy": "mggan", "dataset": "ring", "partition": "full", "gen-features": 16,
                        "disc-features": 16, "latent-dim": 4, "batch-size": 32, "num-rounds": 5, "local-steps": 20,
                        "regroup-interval": -1, "period-a-window": 5, "period-a-min": 10, "period-a-cap": 30,
                        "regroup-xi": 1.5, "min-nodes": 3, "eval-samples": 500, "mggan-losses": "bce,wgan",
                        "output-dir": str(tmp_path)})
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg), num_supernodes=3,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    run = RunFolder.open(next((tmp_path / "runs").iterdir()))
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["iteration"] for m in metrics][-1] == sum(m["steps"] for m in metrics)
    regrouped = [m for m in metrics if m["regrouped"]]
    assert len(regrouped) >= 2          # the first (fetched after period A) and a later, announced one
    for m in regrouped:
        assert sorted(m["regroup_pairs"]) == ["0", "1", "2"]
        assert all(int(g) != d for g, d in m["regroup_pairs"].items())      # no D stays with its own G
    server = run.load_checkpoint("server.pt")
    assert server["period_a"] is not None and server["period_a"] <= 30
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
