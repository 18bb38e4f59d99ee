"""Simulation scripts: experiment files are valid configs; privacy_cifar.py runs end to end."""

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from app.config import ConfigError, parse_config
from simulations.common import CONFIGS, SHARED_CIFAR, add_common_flags, build_config, read_experiment

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_every_experiment_file_is_a_valid_config(name):
    parse_config(read_experiment(CONFIGS / name))


def test_flags_override_the_file_and_set_overrides_flags(tmp_path):
    p = argparse.ArgumentParser()
    add_common_flags(p)
    p.add_argument("--alpha", type=float)
    args = p.parse_args(["--rounds", "7", "--alpha", "0.9", "--set", "alpha=0.25", "--set", "fakes-dtype=uint8"])
    cfg = build_config({"num-rounds": 3, "alpha": 0.5}, args, {"alpha": "alpha"})
    assert (cfg.num_rounds, cfg.alpha, cfg.fakes_dtype) == (7, 0.25, "uint8")
    with pytest.raises(ConfigError, match="'alpha' = 3"):
        build_config({}, p.parse_args(["--set", "alpha=3"]), {})


def test_cifar10_without_a_data_dir_reads_the_shared_copy_when_it_is_there(tmp_path, monkeypatch):
    """One rule for every script (build_config, and default_data_dir for those that load data
    themselves): CIFAR-10 with no data-dir -> the copy beside the project if present; a given
    data-dir, another dataset or a missing copy -> unchanged."""
    from simulations import common

    copy = tmp_path / "cifar10_jpeg.zip"
    copy.write_bytes(b"zip")
    mine = tmp_path / "mine"
    mine.mkdir()
    p = argparse.ArgumentParser()
    add_common_flags(p)
    monkeypatch.setattr(common, "SHARED_CIFAR", copy)
    assert common.default_data_dir("cifar10") == str(copy)
    assert common.default_data_dir("cifar10", str(mine)) == str(mine)
    assert common.default_data_dir("digits") == ""
    assert build_config({"dataset": "cifar10"}, p.parse_args([]), {}).data_dir == str(copy)
    assert build_config({"dataset": "cifar10", "data-dir": str(mine)}, p.parse_args([]), {}).data_dir == str(mine)
    assert build_config({}, p.parse_args([]), {}).data_dir == ""
    monkeypatch.setattr(common, "SHARED_CIFAR", tmp_path / "absent.zip")
    assert common.default_data_dir("cifar10") == ""
    assert build_config({"dataset": "cifar10"}, p.parse_args([]), {}).data_dir == ""


@pytest.mark.e2e
@pytest.mark.skipif(not SHARED_CIFAR.is_file(), reason="the shared CIFAR-10 copy is not on this machine")
def test_privacy_cifar_runs_on_the_shared_zip_with_4_clients(tmp_path):
    cmd = [sys.executable, str(ROOT / "simulations" / "privacy_cifar.py"), "--clients", "4", "--device", "cpu",
           "--rounds", "2", "--output-dir", str(tmp_path), "--set", "teacher-steps=20"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    run = next((tmp_path / "runs").iterdir())
    assert f"run folder: {run}" in out
    assert "status: **success**" in (run / "summary.md").read_text()
    assert (run / "samples" / "round00002.png").exists()


def test_scale_in_process_modes_run_and_the_batched_round_matches_the_sequential_one(tmp_path):
    """simulations/scale.py, the in-process modes with 3 clients: one JSON row per mode, the
    check's float32 errors against the float64 reference about the same both ways (CPU: ~1e-5;
    in stacks of 2 + 1 networks); --profile: each mode's profiled round, its convolutions a part of
    its CPU time."""
    import json

    from simulations import scale

    assert scale.main(["--clients", "3", "--modes", "sequential,batched-server,batched", "--rounds", "1",
                       "--check", "--profile", "--stack-chunk", "2", "--output-dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scale.json").read_text())
    assert [r["mode"] for r in out["results"]] == ["sequential", "batched-server", "batched"]
    assert all(r["clients"] == 3 and r["round_s"] > 0 and r["peak_rss_gb"] > 0 for r in out["results"])
    for r in out["results"]:
        pr = r["profile"]
        assert 0 < pr["conv_ms"] < pr["cpu_ms"] and len(pr["top"]) == 6, pr
        assert any("convolution" in name for name, _ in pr["top"]), pr["top"]
    (check,) = out["checks"]
    for key in ("fakes", "d_grads", "feedback", "g_grads"):
        assert check["batched"][key] < 1e-4 and check["sequential"][key] < 1e-4, key
    assert (tmp_path / "scale.png").stat().st_size > 0 and "| 3 | batched |" in (tmp_path / "scale.md").read_text()


def test_a_simulation_keeps_16_messages_per_parallel_actor_in_flight():
    import os

    from simulations.common import in_flight_for

    cpus = os.cpu_count() or 1
    assert in_flight_for(1000, 1, 0.0) == min(1000, 16 * cpus)
    assert in_flight_for(1000, cpus, 0.0) == 16                 # one actor at a time
    assert in_flight_for(3, 1, 0.0) == 3                        # never more than there are clients


def test_fidelity_study_levers_change_only_their_keys():
    from simulations import fidelity_study as fs

    base = {**fs.COMMON, **fs.SETTINGS["classes"]}
    assert fs.lever_config(base, "baseline") == base
    assert fs.lever_config(base, "alpha 0.5->1") == {**base, "alpha-final": 1.0}
    assert fs.lever_config(base, "teacher steps x3")["teacher-steps"] == 3 * base["teacher-steps"]
    assert fs.lever_config(base, "student steps x3")["num-rounds"] == 3 * base["num-rounds"]
    assert fs.lever_config(base, "server negatives 16") == {**base, "server-negatives": 16}
    assert fs.lever_config(base, "server negatives 16, D_i steps 3") == {**base, "server-negatives": 16,
                                                                         "client-disc-steps": 3}
    with pytest.raises(ConfigError, match="unknown lever 'alpha=2'"):
        fs.lever_config(base, "alpha=2")
    # cells that differ only in what the students do share one teacher; teacher steps do not
    assert fs.teacher_key(fs.lever_config(base, "alpha=1")) == fs.teacher_key(base)
    assert fs.teacher_key(fs.lever_config(base, "server negatives 16")) == fs.teacher_key(base)
    assert fs.teacher_key(fs.lever_config(base, "teacher steps x3")) != fs.teacher_key(base)


@pytest.mark.e2e
def test_fidelity_study_end_to_end_on_digits_shares_the_teacher_and_skips_finished_cells(tmp_path, capsys):
    """Two cells through the Simulation Engine (2 clients, 2 rounds): a PrivacyGAN lever (server
    negatives: the server's images go down with the fakes and every D_i step rejects them) trains
    the teacher and is scored with it, local-only runs alone; study.json/md/png and the sample grid
    are written, and the same command again runs nothing."""
    import json

    from simulations import fidelity_study as fs

    argv = ["--set", "dataset=digits", "--set", "image-size=16", "--rounds", "2", "--set", "teacher-steps=10",
            "--set", "eval-samples=100", "--levers", "server negatives 16", "local-only", "--clients", "2",
            "--grid-lever", "server negatives 16",
            "--output-dir", str(tmp_path), "--out", str(tmp_path / "study")]
    assert fs.main(argv) == 0
    study = json.loads((tmp_path / "study" / "study.json").read_text())
    assert sorted(study["cells"]) == ["local-only @ seed 0", "server negatives 16 @ seed 0"]
    for cell in study["cells"].values():
        assert sorted(cell["clients"]) == ["0", "1"] and cell["bytes_per_client"] > 0
        assert all(0 <= c["own_share"] <= 1 and c["fid"] >= 0 for c in cell["clients"].values())
    assert sorted(study["teachers"]["seed 0"]) == ["0", "1"]
    # the negatives crossed the wire as the analytic formula counts them (uint8 (K, 16, *S) per message)
    from app import comparison as cmp
    run = cmp.read_run(study["cells"]["server negatives 16 @ seed 0"]["run"])
    got, expected = cmp.measured_bytes(run), cmp.analytic_bytes(run.config, 2, len(run.metrics))
    assert (got["down_total"], got["up_total"]) == (expected["down_total"], expected["up_total"])
    assert run.config["server-negatives"] == 16
    assert Path(study["cells"]["local-only @ seed 0"]["run"]).name.endswith("local-digits")
    md = (tmp_path / "study" / "study.md").read_text()
    assert "| teacher |" in md and "| server negatives 16 |" in md and "| local-only |" in md
    assert (tmp_path / "study" / "study.png").stat().st_size > 0
    assert (tmp_path / "study" / "samples.png").stat().st_size > 0   # teacher + 2 students + 2 local rows
    capsys.readouterr()
    assert fs.main(argv) == 0
    assert "0 run(s) to go (2 done)" in capsys.readouterr().out
    assert len(list((tmp_path / "runs").iterdir())) == 2


def test_fidelity_study_tables_average_seeds_and_give_a_levers_own_teacher_its_row():
    from simulations import fidelity_study as fs

    def scores(share, fid):
        return {"0": {"own_share": share, "tv_own": 1 - share, "fid": fid}}

    study = {"setting": "classes", "seeds": [0, 1], "levers": ["baseline", "teacher steps x3"],
             "client_classes": {"0": "(airplane,automobile)"},
             "teachers": {"seed 0": scores(0.1, 30.0), "seed 1": scores(0.3, 40.0)},
             "cells": {"baseline @ seed 0": {"clients": scores(0.4, 20.0), "bytes_per_client": 2e6, "wall_s": 10},
                       "baseline @ seed 1": {"clients": scores(0.6, 10.0), "bytes_per_client": 2e6, "wall_s": 30},
                       "teacher steps x3 @ seed 0": {"clients": scores(0.7, 12.0), "bytes_per_client": 2e6,
                                                     "wall_s": 50, "teacher": scores(0.25, 25.0)}}}
    md = fs.tables(study)
    assert "| teacher | 0.20±0.10 | 0.20 | – | – |" in md
    assert "| baseline | 0.50±0.10 | 0.50 | 2.0 MB | 20 |" in md
    assert "| teacher of 'teacher steps x3' | 0.25 | 0.25 | – | – |" in md
    assert "| teacher steps x3 | 12.00 | 12.00 | 2.0 MB | 50 |" in md   # the FID table
    assert md.index("teacher of 'teacher steps x3'") < md.index("| teacher steps x3 |")


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists() and not Path("/proc/self/smaps").exists(),
                    reason="PSS needs Linux")
def test_scale_memory_sampler_splits_pss_by_kind_of_process(tmp_path):
    """simulations/scale.py's TreeRSS: RSS of the whole tree, and PSS by kind of process at its
    peak (this script vs. a child it started, here a plain sleeping Python: 'other')."""
    import time

    import psutil

    from simulations import scale

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        time.sleep(0.5)
        with scale.TreeRSS(every=0.05, pss_every=0.0) as mem:
            time.sleep(0.4)
        me = psutil.Process()
        assert scale.process_kind(me) == "this script" and scale.process_kind(psutil.Process(child.pid)) == "other"
        # (a shared federation an earlier test left running adds its own kinds: SuperLink, Ray daemons...)
        assert {"this script", "other"} <= set(mem.pss_breakdown)
        assert mem.peak_pss == sum(mem.pss_breakdown.values())
        child_pss = psutil.Process(child.pid).memory_full_info().pss
        assert mem.pss_breakdown["other"] >= 0.5 * child_pss > 0                  # the child is counted
        assert mem.pss_breakdown["this script"] >= 0.5 * me.memory_full_info().pss
        assert mem.peak >= me.memory_info().rss * 0.5 and mem.peak >= mem.peak_pss * 0.5
    finally:
        child.kill()
        child.wait()


@pytest.mark.e2e
def test_engine_floor_runs_no_op_rounds_through_flwr_run_and_reports_each_setting(tmp_path, capsys):
    """3 virtual SuperNodes, 3 rounds, two in-flight windows: one row per setting with every round's
    seconds, the median of rounds 2.. and the milliseconds per message derived from it."""
    import json

    from simulations import engine_floor

    assert engine_floor.main(["--clients", "3", "--rounds", "3", "--window", "2", "0", "--payload-kb", "1",
                              "--state-kb", "4", "--output-dir", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "engine_floor.json").read_text())
    assert [(r["clients"], r["window"]) for r in rows] == [(3, 2), (3, 0)]
    for r in rows:
        assert len(r["round_s"]) == 3 and all(s > 0 for s in r["round_s"])
        assert r["median_round_s"] == pytest.approx((r["round_s"][1] + r["round_s"][2]) / 2, rel=1e-12)
        assert r["ms_per_message"] == pytest.approx(1e3 * r["median_round_s"] / 3, rel=1e-12)
    assert "ms / message" in capsys.readouterr().out
