"""The strategy comparison (issue #6): bytes per generator step against the models' sizes,
modeled time against hand arithmetic, bytes to a quality target, the CLI's results folder."""

import json
import math
from pathlib import Path

import pytest

from simulations import compare_strategies as cli
from app import comparison as cmp
from simulations.common import CONFIGS

TINY = CONFIGS / "compare_tiny.yaml"


# ======================================================================================
# End to end: every strategy through Flower's simulation engine, once for the module
# ======================================================================================
@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    """All seven strategies on compare_tiny.yaml (2 clients, 4 generator steps each) through the
    CLI. Compressed wire formats and K = 2 for every strategy that has them, so the analytic
    formula is checked on uint8 fakes, float16 feedback and K > 1 (PrivacyGAN) too."""
    out = tmp_path_factory.mktemp("compare")
    code = cli.main(["--config", str(TINY), "--clients", "2", "--output-dir", str(out), "--variants", "none",
                     "--set", "fakes-dtype=uint8", "--set", "feedback-dtype=float16", "--set", "steps-per-round=2"])
    folder = next(out.glob("compare-*"))
    return {"code": code, "folder": folder, "json": json.loads((folder / "comparison.json").read_text()),
            "md": (folder / "results.md").read_text()}


@pytest.mark.e2e
def test_every_strategy_runs_for_the_same_generator_steps_into_one_results_folder(compared):
    assert compared["code"] == 0, compared["md"]
    rows = compared["json"]["rows"]
    assert [r["label"] for r in rows] == list(cli.STRATEGIES)
    assert all(not r.get("error") for r in rows), [r.get("error") for r in rows]
    # 4 generator steps per client for everyone: K = 2 -> 2 rounds; local-steps = 2 -> 2 rounds; 1 per round -> 4
    assert {r["label"]: (r["bytes"]["steps"], r["rounds"]) for r in rows} == {
        "privacygan": (4, 2), "bpgan": (4, 4), "mggan": (4, 2), "dataparallel": (4, 4), "fedavg": (4, 2),
        "local": (4, 2), "centralized": (4, 2)}
    folder = compared["folder"]
    assert all(Path(r["run"]).parent == folder / "runs" for r in rows)
    assert (folder / "bytes.png").stat().st_size > 0
    assert "## Modeled time per bandwidth profile" in compared["md"]
    assert "7/7 runs match their recorded bytes exactly" in compared["md"]
    # the thesis' closed form (Eq. 4.1-4.3) next to the measured-bytes model of the same two runs
    thesis = compared["json"]["thesis_model"]
    assert [t["profile"] for t in thesis] == list(cmp.PROFILES) and all(t["iterations"] == 4 for t in thesis)
    assert all(t["thesis_diff_s"] == pytest.approx(t["thesis_dp_s"] - t["thesis_bp_s"], rel=1e-6) for t in thesis)
    assert all(t["measured_diff_s"] == pytest.approx(t["measured_dp_s"] - t["measured_bp_s"]) for t in thesis)
    assert "T_DP − T_BP thesis Eq. 4.3" in compared["md"]


@pytest.mark.e2e
def test_table_bytes_per_generator_step_equal_the_analytic_formula_from_model_sizes(compared):
    rows = {r["label"]: r for r in compared["json"]["rows"]}
    for label, row in rows.items():
        run = cmp.read_run(row["run"])
        plan = cmp.recorded_mggan_plan(run) if label == "mggan" else None
        expected = cmp.analytic_bytes(run.config, 0 if label == "centralized" else 2, len(run.metrics), plan=plan)
        got = row["bytes"]
        for key in ("down_total", "up_total", "steps", "clients", "down_per_step", "up_per_step"):
            assert got[key] == expected[key], (label, key, got[key], expected[key])
        assert got["by_role"] == expected["by_role"], label
        # the strategies' own per-round totals (metrics.jsonl) agree with the comm.jsonl rows
        assert sum(r["bytes_down"] for r in run.metrics) == got["down_total"], label
        assert sum(r["bytes_up"] for r in run.metrics) == got["up_total"], label
        # and the printed table shows these numbers on the strategy's line
        line = next(ln for ln in compared["md"].splitlines() if ln.startswith(f"| {label} |"))
        assert f"| {round(got['down_per_step']):,}" in line and f"| {round(got['up_per_step']):,}" in line, line
    assert rows["centralized"]["bytes"]["total"] == 0
    assert rows["mggan"]["analytic"]["match"] and rows["mggan"]["bytes"]["up_total"] > 2 * 2 * 200, \
        "the tiny MGGAN run regroups once: a whole D goes up and down"


@pytest.mark.e2e
def test_privacygan_bytes_per_step_by_hand(compared):
    """K = 2 batches of B = 8 digits (1x16x16) per message; uint8 fakes down, float16 feedback up.
    Down: .npy header 128 + 2*8*256*1 + len("fakes") + config (round 5+8, loss 4+3, fakes-dtype
    11+5, feedback-dtype 14+7, client-disc-steps 17+8 = 82). Up: labels 128 + 2*8*4 + 6,
    feedback 128 + 2*8*256*2 + 8, 6 metrics (d_loss 6, d_real_acc 10, d_fake_acc 10,
    d_steps_total 13, d_fresh 7, partition_id 12 characters, + 8 each = 106). Per step: / K."""
    row = next(r for r in compared["json"]["rows"] if r["label"] == "privacygan")
    down = 128 + 2 * 8 * 256 * 1 + 5 + 82
    up = (128 + 2 * 8 * 4 + 6) + (128 + 2 * 8 * 256 * 2 + 8) + 106
    assert (row["bytes"]["down_per_step"], row["bytes"]["up_per_step"]) == (down / 2, up / 2) == (2155.5, 4316.0)


@pytest.mark.e2e
def test_bpgan_table_splits_discriminator_and_generator_blocks(compared):
    row = next(r for r in compared["json"]["rows"] if r["label"] == "bpgan")
    roles = row["bytes"]["by_role"]
    assert set(roles) == {"discriminator", "generator"}
    # a DB receives D's weights every step, a GB never does
    assert roles["discriminator"]["down_per_step"] > roles["generator"]["down_per_step"]
    line = next(ln for ln in compared["md"].splitlines() if ln.startswith("| bpgan |"))
    assert "DB " in line and "GB " in line


@pytest.mark.e2e
@pytest.mark.parametrize("strategy", ["dataparallel", "fedavg", "local", "centralized"])
def test_each_baseline_run_writes_the_same_run_folder(compared, strategy, tmp_path):
    """The baselines' own run folders, from the comparison's runs (one Flower run each): every
    round in metrics.jsonl with a finite G loss, the files every run writes, samples, and every
    generator the run trained -- the server's global G, or (local) the one each client trained
    and wrote itself -- which fedgan-sample draws from."""
    import numpy as np
    import torch

    from app.generators import list_generators
    from app.runs import RunFolder
    from app.sample import main as fedgan_sample

    row = next(r for r in compared["json"]["rows"] if r["label"] == strategy)
    run = RunFolder.open(Path(row["run"]))
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(1, row["rounds"] + 1))
    assert all(torch.isfinite(torch.tensor(m["g_loss"])) for m in metrics)
    for name in ("config.json", "comm.jsonl", "summary.md", "checkpoints/server.pt"):
        assert (run.path / name).exists(), name
    assert list((run.path / "samples").glob("*.png"))
    assert "status: **success**" in (run.path / "summary.md").read_text()
    known = list_generators(run.path)
    assert list(known) == (["client0", "client1"] if strategy == "local" else ["global"])
    assert {m["round"] for m in known.values()} == {row["rounds"]}
    if strategy == "local":     # local-steps = 2 per round, 2 rounds
        assert all((m["owner"], m["steps"]) == ("client", 4) for m in known.values())
        out = tmp_path / "client1.npz"
        assert fedgan_sample(["--run", str(run.path), "--generator", "client1", "--num", "20", "--out", str(out)]) == 0
        z = np.load(out)
        assert z["images"].shape == (20, 16, 16, 1) and (str(z["generator"]), int(z["round"])) == ("client1", 2)


# ======================================================================================
# Modeled time: thesis Eq. 4.1/4.2 generalized, against hand arithmetic
# ======================================================================================
def write_run(folder: Path, config: dict, metrics: list[dict], comm: list[dict]) -> Path:
    """A run folder as app/runs.py writes it (hand-made numbers)."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    (folder / "comm.jsonl").write_text("".join(json.dumps(c) + "\n" for c in comm))
    return folder


def dp_like_run(tmp_path) -> cmp.RunData:
    """Two rounds of two exchanges (train.dp_discriminator, then train.dp_generator) with two
    clients, plus evaluation traffic that must not count."""
    comm = []
    for rnd in (1, 2):
        comm += [
            {"round": rnd, "node": 1, "action": "train.dp_discriminator", "down": 4000, "up": 1000},
            {"round": rnd, "node": 2, "action": "train.dp_discriminator", "down": 2000, "up": 3000},
            {"round": rnd, "node": 1, "action": "train.dp_generator", "down": 2000, "up": 2000},
            {"round": rnd, "node": 2, "action": "train.dp_generator", "down": 2000, "up": 500},
            {"round": rnd, "node": 1, "action": "evaluate.client", "down": 10 ** 9, "up": 10 ** 9, "phase": "eval"},
            {"round": rnd, "node": 2, "action": "query.alone_sample", "down": 10 ** 9, "up": 10 ** 9},
        ]
    metrics = [{"round": 1, "wall_time": 10.0, "bytes_down": 10000, "bytes_up": 6500},
               {"round": 2, "wall_time": 2.0, "bytes_down": 10000, "bytes_up": 6500, "eval_time": 99.0}]
    return cmp.read_run(write_run(tmp_path / "run", {"strategy": "dataparallel"}, metrics, comm))


# 1,000 bytes/s up, 2,000 bytes/s down, 0.5 s round trip
SLOW = cmp.Profile("slow", uplink_bps=8_000, downlink_bps=16_000, latency_s=0.5)


def test_modeled_time_per_client_links_equals_hand_arithmetic(tmp_path):
    costs = cmp.round_costs(dp_like_run(tmp_path), warmup="keep")
    # exchange 1: client 1 4000/2000 + 1000/1000 = 3 s, client 2 2000/2000 + 3000/1000 = 4 s -> 4 s
    # exchange 2: client 1 2000/2000 + 2000/1000 = 3 s, client 2 1 + 0.5 = 1.5 s        -> 3 s
    # latency: 2 exchanges x 0.5 s = 1 s; compute: 10 s (round 1), 2 s (round 2)
    assert cmp.modeled_time(costs, SLOW) == pytest.approx((10 + 4 + 3 + 1) + (2 + 4 + 3 + 1))   # 28 s
    # round 1's engine start replaced by the median of the later rounds (2 s)
    warm = cmp.round_costs(dp_like_run(tmp_path / "again"), warmup="median")
    assert cmp.modeled_time(warm, SLOW) == pytest.approx(2 * (2 + 4 + 3 + 1))                   # 20 s


def test_modeled_time_shared_link_equals_hand_arithmetic(tmp_path):
    costs = cmp.round_costs(dp_like_run(tmp_path), warmup="keep")
    # all traffic over one link (the thesis' M*omega/v):
    # exchange 1: (4000 + 2000)/2000 + (1000 + 3000)/1000 = 7 s; exchange 2: 4000/2000 + 2500/1000 = 4.5 s
    assert cmp.modeled_time(costs, SLOW, link="shared") == pytest.approx((10 + 7 + 4.5 + 1) + (2 + 7 + 4.5 + 1))
    with pytest.raises(ValueError, match="per-client, shared"):
        cmp.modeled_time(costs, SLOW, link="mesh")


def test_modeled_time_of_hand_written_rounds_and_a_silent_round():
    rounds = [cmp.RoundCost(1, 0.25, [cmp.ExchangeBytes({"a": 200, "b": 100}, {"a": 50, "b": 300})]),
              cmp.RoundCost(2, 1.0, [])]   # a round without messages (centralized) costs its compute only
    # 200 B down at 2,000 B/s = 0.1 s + 50 B up = 0.05 s (a); 0.05 + 0.3 = 0.35 s (b) -> 0.35 s + 0.5 s latency
    assert cmp.modeled_time(rounds, SLOW) == pytest.approx(0.25 + 0.35 + 0.5 + 1.0)


def test_round_costs_group_bpgan_phases_and_mggan_regroups_into_their_exchanges(tmp_path):
    comm = [
        {"round": 1, "node": 2, "action": "train.generator_step", "down": 100, "up": 900, "phase": "prime"},
        {"round": 1, "node": 1, "action": "train.discriminator_grad", "down": 5000, "up": 5000, "phase": "train"},
        {"round": 1, "node": 2, "action": "train.generator_step", "down": 100, "up": 900, "phase": "train"},
        {"round": 1, "node": 2, "action": "query.bpgan_sample", "down": 50, "up": 99999, "phase": "eval"},
        {"round": 2, "node": 3, "action": "train.local", "down": 270, "up": 160},
        {"round": 2, "node": 3, "action": "regroup", "down": 0, "up": 11459},
    ]
    run = cmp.read_run(write_run(tmp_path / "r", {"strategy": "bpgan"},
                                 [{"round": 1, "wall_time": 1.0}, {"round": 2, "wall_time": 1.0}], comm))
    r1, r2 = cmp.round_costs(run, warmup="keep")
    assert [(e.down, e.up) for e in r1.exchanges] == [({2: 100}, {2: 900}), ({1: 5000, 2: 100}, {1: 5000, 2: 900})]
    assert [(e.down, e.up) for e in r2.exchanges] == [({3: 270}, {3: 160 + 11459})]   # D rides with train.local


# ======================================================================================
# Bytes to a quality target
# ======================================================================================
def test_bytes_to_target_interpolates_between_the_bracketing_points():
    curve = [(100, 50.0), (300, 30.0), (600, 10.0)]
    # FID 20 is crossed between (300, 30) and (600, 10): 300 + (20 - 30) * (600 - 300) / (10 - 30) = 450
    assert cmp.bytes_to_target(curve, 20.0) == pytest.approx(450.0)
    assert cmp.bytes_to_target(curve, 30.0) == pytest.approx(300.0)   # met exactly at a recorded point
    assert cmp.bytes_to_target(curve, 60.0) == pytest.approx(100.0)   # already met at the first point


def test_bytes_to_target_not_reached_is_none():
    assert cmp.bytes_to_target([(100, 50.0), (300, 30.0), (600, 10.0)], 5.0) is None
    assert cmp.bytes_to_target([], 5.0) is None


def test_bytes_to_target_for_a_higher_is_better_score():
    # % of high-quality samples 40 -> 80 between 1,000 and 2,000 bytes: 60 % at 1,500 bytes
    curve = [(0, 10.0), (1000, 40.0), (2000, 80.0)]
    assert cmp.bytes_to_target(curve, 60.0, lower_is_better=False) == pytest.approx(1500.0)
    assert cmp.bytes_to_target(curve, 90.0, lower_is_better=False) is None


def test_quality_curve_and_table_use_cumulative_training_bytes(tmp_path):
    """A 2-D run (mixture scores) and an image run (global FID) through summarize_run and the table."""
    comm = [{"round": r, "node": n, "action": "train.local", "down": 100, "up": 150} for r in (1, 2, 3) for n in (1, 2)]
    comm += [{"round": 3, "node": 1, "action": "query.sample", "down": 10, "up": 10 ** 6}]
    metrics = [{"round": 1, "steps": 5, "wall_time": 1.0, "eval": {"mixture": {"high_quality_pct": 20.0,
                                                                               "num_samples": 2500}}},
               {"round": 2, "steps": 5, "wall_time": 1.0},
               {"round": 3, "steps": 5, "wall_time": 1.0, "eval": {"mixture": {"high_quality_pct": 60.0,
                                                                               "num_samples": 2500}}}]
    run = cmp.read_run(write_run(tmp_path / "mg", {"strategy": "mggan", "local-steps": 5}, metrics, comm))
    row = cmp.summarize_run(run, label="mggan", quality_key="high_quality_pct", target=40.0)
    assert [(p["round"], p["bytes"], p["value"]) for p in row["curve"]] == [(1, 500, 20.0), (3, 1500, 60.0)]
    assert row["bytes_to_target"] == pytest.approx(1000.0)   # 40 % halfway between 500 and 1,500 bytes
    assert row["bytes"]["steps"] == 15 and row["bytes"]["total"] == 1500
    table = cmp.render_table([row], target=40.0, quality_key="high_quality_pct")
    assert "HQ samples 60.0% (2,500)" in table and "| 1.00 kB |" in table

    fid_metrics = [{"round": 1, "wall_time": 1.0, "eval": {"global": {"fid": 80.0, "extractor": "classifier",
                                                                      "num_samples": 500}}},
                   {"round": 2, "wall_time": 1.0, "eval": {"global": {"fid": 70.0, "extractor": "classifier",
                                                                      "num_samples": 500}}}]
    run = cmp.read_run(write_run(tmp_path / "fa", {"strategy": "fedavg", "local-steps": 5}, fid_metrics,
                                 [c for c in comm if c["round"] < 3]))
    row = cmp.summarize_run(run, label="fedavg", target=10.0)
    assert row["bytes_to_target"] is None
    line = cmp.render_table([row], target=10.0).splitlines()[-1]
    assert "FID 70.0 (classifier, 500)" in line and "not reached" in line


def test_headline_quality_of_each_eval_shape():
    bp = {"per_gb": {"GB 1": {"fid": 10.0, "extractor": "classifier", "num_samples": 500},
                     "GB 3": {"fid": 20.0, "extractor": "classifier", "num_samples": 500}},
          "mean": {"fid": 15.0}, "best": {}}
    assert cmp.headline_quality(bp)["value"] == 15.0
    students = {"teacher": {"fid": 1.0}, "client 0": {"fid": 10.0, "num_samples": 500},
                "client 1": {"fid": 30.0, "num_samples": 500}}
    assert cmp.headline_quality(students) == {"value": 20.0, "extractor": None, "num_samples": 500,
                                              "source": "mean of 2 sets"}
    assert cmp.headline_quality({"global": {"modes_covered": 8}}) is None   # no FID: "n/a" in the table
    assert cmp.client_fidelity({"client 0": {"fid": 10.0, "tv_own": 0.1}, "client 1": {"fid": 20.0, "tv_own": 0.3}}) \
        == {"clients": 2, "fid": 15.0, "tv_own": pytest.approx(0.2)}


def test_variant_rows_show_bytes_saved_and_quality_change_against_their_base():
    def row(label, total, fid):
        return {"label": label, "rounds": 10, "wall_time_s": 1.0, "first_round_s": 0.5, "curve": [],
                "bytes": {"steps": 10, "down_per_step": 1.0, "up_per_step": 1.0, "total": total, "by_role": {}},
                "final": {"value": fid, "extractor": "classifier", "num_samples": 500}}
    table = cmp.render_table([row("privacygan", 1000, 50.0), row("privacygan fakes uint8", 400, 52.5)],
                             baseline={"privacygan fakes uint8": "privacygan"})
    assert "+60.0% bytes saved, FID +2.50 (vs privacygan)" in table


# ======================================================================================
# Counting rules, profiles, flags
# ======================================================================================
def test_evaluation_and_control_traffic_is_not_training_traffic():
    assert cmp.traffic_class({"action": "train.discriminate"}) == "train"
    assert cmp.traffic_class({"action": "regroup"}) == "train"
    assert cmp.traffic_class({"action": "train.generator_step", "phase": "eval"}) == "eval"
    assert cmp.traffic_class({"action": "evaluate.client"}) == "eval"
    for action in ("query.sample", "query.alone_sample", "query.bpgan_sample"):
        assert cmp.traffic_class({"action": action}) == "eval"
    assert cmp.traffic_class({"action": "query.info"}) == "control"


def test_generator_steps_per_round_of_each_strategy():
    steps = {"steps-per-round": 3, "local-steps": 7}
    assert {s: cmp.generator_steps_per_round({"strategy": s, **steps}) for s in cli.STRATEGIES} == {
        "privacygan": 3, "bpgan": 1, "mggan": 7, "dataparallel": 1, "fedavg": 7, "local": 7, "centralized": 7}
    assert cmp.generator_steps_per_round({"strategy": "mggan", **steps}, {"steps": 2}) == 2   # a cut round
    # MGGAN every 5 iterations with 3 per round: rounds of 3, 2 (regroup), 3, 2 (regroup), 3 ...
    assert cmp.mggan_plan({"strategy": "mggan", "local-steps": 3, "regroup-interval": 5}, 5) == [
        (3, False), (2, True), (3, False), (2, True), (3, False)]
    assert cmp.rounds_for_steps({"strategy": "mggan", "local-steps": 3, "regroup-interval": 5}, 10) == 4
    assert cmp.rounds_for_steps({"strategy": "privacygan", "steps-per-round": 4}, 10) == 3


def test_profiles_file_overrides_and_adds_profiles(tmp_path):
    path = tmp_path / "profiles.yaml"
    path.write_text("3G: {latency_s: 0.1}\nsatellite: {uplink_bps: 1.0e6, downlink_bps: 2.0e7, latency_s: 0.6}\n")
    profiles = cmp.load_profiles(path)
    assert profiles["3G"] == cmp.Profile("3G", uplink_bps=768e3, downlink_bps=1.6e6, latency_s=0.1)
    assert profiles["satellite"].downlink_bps == 2e7 and "datacenter" in profiles
    (tmp_path / "bad.json").write_text(json.dumps({"mesh": {"uplink_bps": 1}}))
    with pytest.raises(ValueError, match="'mesh' lacks downlink_bps, latency_s"):
        cmp.load_profiles(tmp_path / "bad.json")
    (tmp_path / "typo.json").write_text(json.dumps({"4G": {"uplink": 1}}))
    with pytest.raises(ValueError, match="unknown key"):
        cmp.load_profiles(tmp_path / "typo.json")


@pytest.mark.parametrize("argv, needle", [
    (["--strategies", "privacygan,gossip"], "--strategies 'privacygan,gossip': unknown 'gossip'; allowed: privacygan"),
    (["--clients", "3"], "--clients 3: bpgan needs an even number"),
    (["--variants", "fp8"], "--variants 'fp8': not a named variant (fakes-float16"),
    (["--variants", "teleport:alpha=0.3"], "unknown strategy 'teleport'"),
    (["--steps", "0"], "--steps 0"),
    (["--set", "alpha=3", "--variants", "none"], "'alpha' = 3"),
])
def test_bad_flags_stop_before_any_run_with_a_message_naming_the_flag(argv, needle, tmp_path, capsys):
    assert cli.main([*argv, "--output-dir", str(tmp_path)]) == 1
    assert needle in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_analytic_bytes_of_data_parallel_count_every_weight_and_gradient():
    """Data-parallel per round and client (thesis Fig. 4.7): G+D weights down once, D's and G's
    gradients up once; alternating: the weights down twice, the gradients in two replies."""
    from app.builders import make_discriminator, make_generator
    from app.config import parse_config

    cfg = parse_config({"strategy": "dataparallel", "gen-features": 8, "disc-features": 8, "latent-dim": 16})
    G, D = make_generator(cfg), make_discriminator(cfg)
    weights = sum(128 + v.numel() * v.element_size() + len(k) for m in (G, D) for k, v in m.state_dict().items())
    config = len("round") + len("loss") + len("batch-size") + len("latent-seed") + 3 * 8 + len("bce")
    g_grads = sum(128 + p.numel() * 4 + len(n) for n, p in G.named_parameters())
    d_grads = sum(128 + p.numel() * 4 + len(n) for n, p in D.named_parameters())
    metrics_d = sum(len(k) + 8 for k in ("num-examples", "d_loss", "d_real_acc", "d_fake_acc", "d_real_out",
                                         "d_fake_out", "partition_id"))
    a = cmp.analytic_bytes(cfg.to_run_config(), 3, 5)
    down = weights + config + len("want-g") + 1
    assert a["down_total"] == 3 * 5 * down
    assert a["up_total"] == 3 * 5 * (d_grads + g_grads + metrics_d + len("g_loss") + 8)
    assert a["down_per_step"] == down and a["steps"] == 5
    assert a["g_params"] == sum(p.numel() for p in G.parameters()) and not math.isnan(a["up_per_step"])

    alt = cmp.analytic_bytes({**cfg.to_run_config(), "dataparallel-mode": "alternating"}, 3, 5)
    metrics_g = sum(len(k) + 8 for k in ("num-examples", "g_loss", "partition_id"))
    assert alt["down_total"] == 3 * 5 * 2 * (weights + config)
    assert alt["up_total"] == 3 * 5 * (d_grads + metrics_d + g_grads + metrics_g)

    # the clipped WGAN: 5 critic steps per generator step, so 10 rounds make 2 generator steps
    wgan = cmp.analytic_bytes({**cfg.to_run_config(), "loss": "wgan"}, 3, 10)
    assert wgan["steps"] == 2
    assert wgan["up_total"] == 3 * (10 * (d_grads + metrics_d) + 2 * (g_grads + len("g_loss") + 8))
    assert cmp.rounds_for_steps({"strategy": "dataparallel", "loss": "wgan", "wgan-critic-steps": 5}, 10) == 50
    assert cmp.rounds_for_steps({"strategy": "dataparallel", "client-disc-steps": 2}, 10) == 20
    assert [cmp.generator_steps_per_round({"strategy": "dataparallel", "loss": "wgan", "wgan-critic-steps": 5},
                                          {"round": r}) for r in range(1, 11)] == [0, 0, 0, 0, 1, 0, 0, 0, 0, 1]


# ======================================================================================
# The thesis' closed-form model (§4.3, Eq. 4.1-4.3) against hand arithmetic
# ======================================================================================
def test_thesis_closed_form_model_on_hand_numbers():
    """v = 1 MB/s, D = 100 MB, M = 4, t_D = t_G = 1 µs/B, t_S = 1 ns/B, ω = g = 1 MB, F = 100 kB, L = 1 kB.
    T_DP = 100 + 4·2·1 + 4·2·1 + 100·2/4 + 1e-9·2e6·4 = 100 + 8 + 8 + 50 + 0.008 = 166.008 s;
    T_BP = 100 + 4 + 4 + 2·0.1 + 2·0.001 + 100·1/2 + 1e-9·2e6·2 = 158.206 s;
    Eq. 4.3: (4/1e6)(1e6 + 1e6 − 50,500) + 0.004 = 7.798 + 0.004 = 7.802 s = T_DP − T_BP."""
    s = cmp.ThesisSystem(v=1e6, D=1e8, M=4, t_D=1e-6, t_G=1e-6, t_S=1e-9, omega=1e6, g=1e6, F=1e5, L=1e3)
    dp, bp = cmp.thesis_t_dp(s), cmp.thesis_t_bp(s)
    assert dp == pytest.approx({"T_d": 100, "T_b": 8, "T_f": 8, "T_r": 50, "T_u": 0.008, "total": 166.008})
    assert bp == pytest.approx({"T_d": 100, "T_b": 4, "T_f": 4, "T_m": 0.2, "T_n": 0.002, "T_r": 50, "T_u": 0.004,
                                "total": 158.206})
    assert cmp.thesis_difference(s) == pytest.approx(7.802) == pytest.approx(dp["total"] - bp["total"])
    assert cmp.thesis_t_dp(s, load_data=False)["total"] == pytest.approx(66.008)
    # with t_G != t_D the closed form keeps the compute term D(t_G - t_D)/M
    s2 = cmp.ThesisSystem(v=1e6, D=1e8, M=4, t_D=1e-6, t_G=3e-6, t_S=1e-9, omega=1e6, g=1e6, F=1e5, L=1e3)
    assert cmp.thesis_difference(s2) == pytest.approx(cmp.thesis_t_dp(s2)["total"] - cmp.thesis_t_bp(s2)["total"])
    assert cmp.thesis_difference(s2) == pytest.approx(7.802 + 1e8 * 2e-6 / 4)


def test_thesis_system_takes_its_volumes_from_the_run_and_v_from_the_profile():
    from app.builders import make_discriminator, make_generator
    from app.config import parse_config

    cfg = parse_config({"strategy": "dataparallel", "gen-features": 8, "disc-features": 8, "latent-dim": 16,
                        "batch-size": 4})
    G, D = make_generator(cfg), make_discriminator(cfg)
    times = {"t_D": 1e-9, "t_G": 2e-9, "t_S": 3e-9, "batch_bytes": 4 * 256 * 4}
    s = cmp.thesis_system(cfg.to_run_config(), 4, cmp.Profile("x", uplink_bps=8e6, downlink_bps=24e6, latency_s=0),
                          times)
    assert s.v == pytest.approx(1.5e6)                 # harmonic mean of 1 MB/s up and 3 MB/s down
    state = sum(128 + v.numel() * v.element_size() + len(k) for m in (G, D) for k, v in m.state_dict().items())
    assert s.omega == state / 2 and s.M == 4 and s.D == 4 * 4096
    assert s.F == 128 + 4 * 256 * 4 + len("fakes")
    assert s.L == (128 + 4 * 4 + len("labels")) + (128 + 4 * 256 * 4 + len("feedback"))
