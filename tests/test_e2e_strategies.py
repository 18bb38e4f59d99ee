"""BPGAN and the baselines end to end through Flower's simulation engine."""


import pytest
import torch

from app.builders import make_discriminator
from app.config import parse_config
from app.generators import list_generators
from app.sample import main as fedgan_sample
from strategies import wire

from e2e_mods import optimizer_summary, read_kept, simulate
from strategies.bpgan import RELAY, WANT_FEEDBACK

pytestmark = pytest.mark.e2e
TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "samples-per-client": 4, "sample-every": 0,
        "local-steps": 3, "num-rounds": 2, "round-timeout": 120.0, "node-wait-timeout": 60.0, "partition": "iid"}


def test_bpgan_generator_nodes_get_no_data_and_discriminator_nodes_no_generator(tmp_path):
    taps = tmp_path / "taps"
    taps.mkdir()
    cfg = parse_config({**TINY, "strategy": "bpgan", "min-nodes": 4, "output-dir": str(tmp_path / "out")})
    run = simulate(cfg, 4, "shapes_tap_app")
    seen = read_kept(taps)
    g_shapes = {tuple(v.shape) for v in __import__("app.builders", fromlist=["x"]).make_generator(cfg).state_dict().values()}
    for rec in seen:
        if rec["partition"] % 2:   # generator blocks: fakes go up, only feedback comes down - never real data or D
            assert rec["type"] in ("query.info", "train.generator_step", "query.bpgan_sample"), rec["type"]
            assert all(not k.startswith("d_weights") for k in rec["down"])
            assert all(not (len(s) == 4 and s[0] > 1 and k != "relay.feedback") for k, s in rec["down"].items())
        else:                      # discriminator blocks: D weights and fakes come down, never G's weights
            assert rec["type"] in ("query.info", "train.discriminator_grad"), rec["type"]
            d_keys = [k for k in rec["down"] if k.startswith("d_weights.")]
            assert rec["type"] == "query.info" or d_keys
            assert not any(k.startswith(("g.", "g_weights")) for k in rec["down"])
            assert all(s not in g_shapes or k.startswith("d_weights.") for k, s in rec["down"].items()
                       if k != "fakes.fakes")
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2] and all(m["dropped"] == 0 for m in metrics)
    assert "status: **success**" in (run.path / "summary.md").read_text()
    # each generator block wrote its own G (never sent) into the run folder; fedgan-sample draws from it
    known = list_generators(run.path)
    assert list(known) == ["gb1", "gb3"]
    assert all((m["owner"], m["round"], m["steps"]) == ("client", 2, 2) for m in known.values())
    out = tmp_path / "gb3-samples"
    assert fedgan_sample(["--run", str(run.path), "--generator", "gb3", "--num", "3", "--out", str(out)]) == 0
    assert len(list(out.glob("*.png"))) == 3 and (out / "samples.json").is_file()


def run_hybrid(tmp_path, model, **extra):
    taps = tmp_path / "taps"
    taps.mkdir()
    cfg = parse_config({**TINY, "strategy": "bpgan", "min-nodes": 4, "bpgan-model": model, "wgan-critic-steps": 2,
                        "wgan-lr": 7e-5, "output-dir": str(tmp_path / "out"), **extra})
    run = simulate(cfg, 4, "bpgan_state_app")
    seen = sorted(read_kept(taps), key=lambda r: r["t"])
    assert not any(r["error"] for r in seen)
    assert "status: **success**" in (run.path / "summary.md").read_text()
    # the comparison's analytic formula (model sizes, the n_critic schedule) equals the recorded bytes
    from app import comparison as cmp
    data = cmp.read_run(run.path)
    analytic, measured = cmp.analytic_bytes(data.config, 4, len(data.metrics)), cmp.measured_bytes(data)
    assert {k: analytic[k] for k in ("down_total", "up_total", "steps")} == \
        {k: measured[k] for k in ("down_total", "up_total", "steps")}
    return cfg, run, seen


def d_parameters(cfg, server):
    """The server's D parameters (not BatchNorm's running statistics) from checkpoints/server.pt."""
    names_ = [n for n, _ in make_discriminator(cfg.replace(loss=server["settings"]["d_loss"])).named_parameters()]
    return {n: server["d"][n] for n in names_}


def generator_blocks(seen):
    """Per GB partition: the rounds of the generator messages that relayed feedback, and its
    final state (G steps, optimizer) as its last message left it."""
    out = {}
    for rec in seen:
        if rec["type"] == "train.generator_step":
            gb = out.setdefault(rec["partition"], {"relayed": []})
            if any(k.startswith(f"{RELAY}.") for k in rec["down"]):
                gb["relayed"].append(int(rec["config"]["round"]))
            gb["final"] = rec["gb"]
    return out


def feedback_by_round(seen, partition):
    """DB partition's rounds -> (want-feedback in its config or 'absent', feedback in its reply)."""
    return {int(r["config"]["round"]): (r["config"].get(WANT_FEEDBACK, "absent"),
                                        f"{wire.REPLY}.{wire.FEEDBACK}" in r["up"])
            for r in seen if r["partition"] == partition and r["type"] == "train.discriminator_grad"}


def test_bpgan_dcwgan_runs_a_clipped_rmsprop_critic_with_n_critic_and_adam_generators(tmp_path):
    """DCWGAN (thesis 4.4.1): DCGAN generator blocks (Adam at client-gen-lr) with the clipped WGAN
    critic on the server (RMSProp at wgan-lr, weights within ±0.01), n_critic = 2, pipelined."""
    cfg, run, seen = run_hybrid(tmp_path, "dcwgan", **{"num-rounds": 4})
    server = run.load_checkpoint("server.pt")
    assert (server["settings"]["g_block"], server["settings"]["d_loss"], server["settings"]["critic_steps"]) == (
        "dcgan", "wgan", 2)
    params = d_parameters(cfg, server)
    assert max(float(p.abs().max()) for p in params.values()) == pytest.approx(0.01, abs=1e-9)   # clipped, and hit
    assert optimizer_summary(server["opt_d"]) == {"kind": "RMSprop", "lr": 7e-5, "state": ["square_avg", "step"],
                                                  "steps": [4]}
    assert server["d_steps"] == 4
    # every GB: Adam at client-gen-lr, G stepped after D steps 2 and 4 only (F_2 in round 3, F_4 in the flush)
    gbs = generator_blocks(seen)
    assert sorted(gbs) == [1, 3]
    for gb in gbs.values():
        assert gb["relayed"] == [3, 4]
        assert gb["final"] == {"g_steps": 2, "opt": {"kind": "Adam", "lr": cfg.client_gen_lr,
                                                     "state": ["exp_avg", "exp_avg_sq", "step"], "steps": [2]}}
    for db in (0, 2):   # feedback asked for, and sent, only before a G step
        assert feedback_by_round(seen, db) == {1: (False, False), 2: (True, True), 3: (False, False), 4: (True, True)}
    metrics = run.read_jsonl("metrics.jsonl")
    assert [(m["d_steps_total"], m["g_steps"]) for m in metrics] == [(1, 0), (2, 0), (3, 2), (4, 2)]
    assert all(c["g_steps_total"] == 2 for c in metrics[-1]["clients"].values())


def test_bpgan_wdcgan_runs_an_adam_dcgan_discriminator_and_rmsprop_generators(tmp_path):
    """WDCGAN (thesis 4.4.1): WGAN generator blocks (RMSProp at wgan-lr) with a DCGAN discriminator
    (BatchNorm, Adam at server-disc-lr, unclipped): one D step per G step although
    wgan-critic-steps = 2; unpipelined."""
    cfg, run, seen = run_hybrid(tmp_path, "wdcgan", **{"num-rounds": 3, "bpgan-pipeline": False})
    server = run.load_checkpoint("server.pt")
    assert (server["settings"]["g_block"], server["settings"]["d_loss"], server["settings"]["critic_steps"]) == (
        "wgan", "bce", 1)
    assert any(k.endswith("running_mean") for k in server["d"])                  # BatchNorm DCGAN discriminator
    assert max(float(p.abs().max()) for p in d_parameters(cfg, server).values()) > 0.5   # never clipped
    assert optimizer_summary(server["opt_d"]) == {"kind": "Adam", "lr": cfg.server_disc_lr,
                                                  "state": ["exp_avg", "exp_avg_sq", "step"], "steps": [3]}
    gbs = generator_blocks(seen)
    assert sorted(gbs) == [1, 3]
    for gb in gbs.values():
        assert gb["relayed"] == [2, 3, 3]          # F_1 in round 2, F_2 in round 3, F_3 in the flush
        assert gb["final"] == {"g_steps": 3, "opt": {"kind": "RMSprop", "lr": 7e-5, "state": ["square_avg", "step"],
                                                     "steps": [3]}}
    for db in (0, 2):   # no want-feedback key with one D step per G step: the plain messages
        assert feedback_by_round(seen, db) == {r: ("absent", True) for r in (1, 2, 3)}
    metrics = run.read_jsonl("metrics.jsonl")
    assert [(m["d_steps_total"], m["g_steps"]) for m in metrics] == [(1, 0), (2, 2), (3, 4)]


@pytest.mark.parametrize("variant", ["fedprox", "fedadam"])
def test_fedavg_variant_runs_end_to_end_with_flowers_strategy(tmp_path, variant):
    """Flower's aggregations as ``fedavg-variant``, the two that leave a trace beyond the
    aggregate: the run completes, and what it leaves says which strategy aggregated (FedOpt's
    moments in the checkpoint; FedProx's mu in the config every client received, none
    otherwise). FedYogi shares FedAdam's path; Krum and trimmed mean keep no state and send
    nothing extra. Each aggregation's arithmetic is checked on Flower's own strategy objects,
    without the engine, in tests/test_fedavg.py."""
    seen = tmp_path / "seen"
    seen.mkdir()
    cfg = parse_config({**TINY, "strategy": "fedavg", "fedavg-variant": variant, "fedprox-mu": 0.5, "min-nodes": 2,
                        "checkpoint-every": 1, "output-dir": str(tmp_path / "out")})
    run = simulate(cfg, 2, "mu_tap_app")
    assert [m["round"] for m in run.read_jsonl("metrics.jsonl")] == [1, 2]
    assert "status: **success**" in (run.path / "summary.md").read_text()
    ckpt = torch.load(run.path / "checkpoints" / "server.pt", weights_only=False)
    assert ckpt["settings"]["variant"] == variant and ckpt["round"] == 2
    if variant in ("fedadam", "fedyogi"):
        moments = ckpt["flower_state"]
        assert set(moments) == {"m_t", "v_t"} and set(moments["m_t"]) == {k for k in moments["v_t"]}
        assert any(abs(m).sum() > 0 for m in moments["m_t"].values())     # the server optimizer has moved
    else:
        assert ckpt["flower_state"] == {}
    mus = {repr(mu) for mu in read_kept(seen)}
    assert mus == ({"0.5"} if variant == "fedprox" else {"None"})
