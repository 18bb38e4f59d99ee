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
    check's float32 errors against the float64 reference about the same both ways (CPU: ~1e-5)."""
    import json

    from simulations import scale

    assert scale.main(["--clients", "3", "--modes", "sequential,batched-server,batched", "--rounds", "1",
                       "--check", "--output-dir", str(tmp_path)]) == 0
    out = json.loads((tmp_path / "scale.json").read_text())
    assert [r["mode"] for r in out["results"]] == ["sequential", "batched-server", "batched"]
    assert all(r["clients"] == 3 and r["round_s"] > 0 and r["peak_rss_gb"] > 0 for r in out["results"])
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
