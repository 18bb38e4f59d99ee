"""The README's main command path: `fedgan-run` drives the real `flwr run .` CLI with a
managed local SuperLink, and its exit code tells the truth about the run."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from app.launch import superlink_pids

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parent.parent
TINY = ("num-rounds=2 teacher-steps=5 gen-features=8 disc-features=8 batch-size=8 steps-per-round=1 "
        "sample-every=1 samples-per-client=4 client-eval=false")   # the end-of-run report: test_client_eval.py


def launch(tmp_path, run_config, port="39291"):
    env = dict(os.environ, FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=port,
               FLWR_LOCAL_CONTROL_API_PORT=str(int(port) + 2))
    cmd = [sys.executable, "-m", "app.launch", "--num-supernodes", "2", "--flwr-home", str(tmp_path / "flwr"),
           "--run-config", f"{run_config} output-dir='{tmp_path / 'out'}'"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    return proc, port


def test_flwr_run_completes_writes_the_run_folder_and_exits_zero(tmp_path):
    proc, port = launch(tmp_path, TINY)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "finished:completed" in out
    runs = list((tmp_path / "out" / "runs").iterdir())
    assert len(runs) == 1
    run = runs[0]
    assert str(run) in out                      # the run ends by printing its folder
    for name in ("config.json", "metrics.jsonl", "comm.jsonl", "summary.md", "checkpoints/server.pt",
                 "checkpoints/teacher.pt", "samples/round00002.png"):
        assert (run / name).exists(), name
    assert "status: **success**" in (run / "summary.md").read_text()
    assert superlink_pids(port) == []           # the managed SuperLink was stopped
    # flwr run bundled a slim copy of the app (not the project folder with its .venv), removed once submitted
    staged = re.search(r"\[fedgan-run\] flwr run (\S+) local", out).group(1)
    assert staged != str(ROOT) and not Path(staged).exists()
    (installed,) = (tmp_path / "flwr" / "apps").iterdir()
    top = {p.name for p in installed.iterdir()}
    assert {"app", "models", "strategies", "pyproject.toml"} <= top and not top & {"tests", "simulations", ".venv"}


def test_a_run_that_fails_on_the_server_exits_nonzero_and_says_why(tmp_path):
    missing = tmp_path / "no-teacher.pt"
    proc, port = launch(tmp_path, f"{TINY} teacher-path='{missing}'", port="39295")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert "finished:failed" in out
    assert f"run config 'teacher-path' = '{missing}': no such file" in out
    assert superlink_pids(port) == []


def test_a_bad_key_or_value_is_named_before_flower_starts(tmp_path):
    proc, port = launch(tmp_path, f"{TINY} alpha=1.5", port="39297")
    assert proc.returncode == 2 and "started run" not in proc.stdout
    assert "run config 'alpha' = 1.5 is not allowed" in proc.stderr
    assert superlink_pids(port) == [] and not (tmp_path / "flwr").exists()
