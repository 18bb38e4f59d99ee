"""A crashed run resumes from its last checkpoint: the server process is SIGKILLed after a
checkpoint, the run is continued with `resume=<run folder>`, and the finished run has
every round exactly once and the byte totals of an uninterrupted run (their analytic count)."""

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from app.comparison import analytic_bytes, read_run
from app.config import ConfigError, parse_config
from app.loopback import _cmdline
from app.runs import RunFolder, run_folders
from app.server_app import open_for_resume

from e2e_mods import simulation_processes, tagged_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "gen-features=8", "--set", "disc-features=8", "--set", "batch-size=8", "--set", "teacher-steps=5",
        "--set", "samples-per-client=4", "--set", "sample-every=0", "--set", "steps-per-round=1",
        "--set", "checkpoint-every=2", "--set", "min-nodes=3", "--set", "client-eval=false", "--device", "cpu"]


def start(out: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "simulations" / "run.py"), "--clients", "3", "--output-dir", str(out), *TINY,
           *extra]
    return subprocess.Popen(cmd, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=tagged_env(str(out)))


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-3000:]
    return out


def totals(run: Path) -> tuple[int, int]:
    """Training bytes (the end-of-run report's evaluation rows are logged apart, phase "eval")."""
    rows = [r for r in RunFolder.open(run).read_jsonl("comm.jsonl") if r.get("phase") != "eval"]
    return sum(r["down"] for r in rows), sum(r["up"] for r in rows)


def summary_totals(run: Path) -> tuple[int, int]:
    text = (run / "summary.md").read_text()
    grab = lambda label: int(text.split(label)[1].split("\n")[0].strip().replace(",", ""))  # noqa: E731
    return grab("bytes down (server->clients):"), grab("bytes up (clients->server):")


@pytest.mark.e2e
def test_killed_server_resumes_without_losing_or_repeating_rounds(tmp_path):
    # the run, SIGKILLed (the script, the server, Ray and its actors) after a checkpoint. It asks
    # for far more rounds than it gets to: a tiny round takes ~0.1 s, so a 6-round run could end
    # between the poll that sees round 3 and the kill (our reading of the one CI failure, in which
    # no process of the run was left to find)
    out = tmp_path / "crash"
    out.mkdir()
    proc = start(out, "--rounds", "400")
    deadline = time.monotonic() + 300
    run = None
    while time.monotonic() < deadline:
        runs = run_folders(out)
        if runs:
            run = runs[0]
            rounds = RunFolder.open(run).read_jsonl("metrics.jsonl")
            if len(rounds) >= 3:   # checkpoint of round 2 is written, round 3 done, later rounds under way
                break
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        time.sleep(0.2)
    # the script and, at the same moment, its simulation: the SuperLink runs detached (in its own
    # session), with the ServerApp, Ray and its actors under it
    victims = simulation_processes(psutil.Process(proc.pid).create_time(), tag=str(out))
    assert any("flower-superlink" in _cmdline(p) for p in victims), victims   # the tag reached the SuperLink
    # the federation's temporary FLWR_HOME (Flower's state, Ray's session), which nobody is left to remove
    (home,) = {psutil.Process(p).environ()["FLWR_HOME"] for p in victims if "flower-superlink" in _cmdline(p)}
    home = Path(home)
    assert home.name.startswith("fedgan-flwr-") and home.is_dir()
    os.killpg(proc.pid, signal.SIGKILL)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()
    assert run is not None
    ckpt = RunFolder.open(run).load_checkpoint("server.pt")
    done = ckpt["round"]
    assert done >= 2 and done % 2 == 0                     # checkpoint-every=2
    killed_at = len(RunFolder.open(run).read_jsonl("metrics.jsonl"))
    assert done <= killed_at < 400                          # killed mid-run

    total = done + 2
    out_text = finish(start(out, "--set", f"resume={run}", "--rounds", str(total)))
    assert f"resuming from the checkpoint of round {done}" in out_text
    assert not home.exists()   # removed by the killed run's watchdog or swept by this run's start
    metrics = RunFolder.open(run).read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == list(range(1, total + 1))   # each round once, none lost
    assert len(list((out / "runs").iterdir())) == 1                      # continued in the same folder
    # the bytes of an uninterrupted run: the analytic count from the models' sizes and message
    # layouts (app/comparison.py, checked against real runs byte for byte in tests/test_compare.py)
    uninterrupted = analytic_bytes(read_run(run).config, 3, total)
    assert totals(run) == summary_totals(run) == (uninterrupted["down_total"], uninterrupted["up_total"])
    assert "status: **success**" in (run / "summary.md").read_text()
    assert f"resumed at round {done + 1}" in (run / "summary.md").read_text()


def test_a_truncated_checkpoint_is_never_loaded(tmp_path):
    folder = RunFolder.create(tmp_path, "privacygan", "digits", parse_config({}).to_run_config())
    folder.save_checkpoint("server.pt", {"round": 3, "students": {}, "payload": torch.zeros(10_000)})
    data = (folder.path / "checkpoints" / "server.pt").read_bytes()
    (folder.path / "checkpoints" / "server.pt").write_bytes(data[: len(data) // 2])   # torn by a crash
    with pytest.raises(ConfigError, match="unreadable.*not resuming"):
        open_for_resume(parse_config({"resume": str(folder.path)}))


def test_resume_needs_a_run_folder_with_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="'resume'.*not a run folder"):
        open_for_resume(parse_config({"resume": str(tmp_path)}))
    folder = RunFolder.create(tmp_path, "privacygan", "digits", parse_config({}).to_run_config())
    with pytest.raises(ConfigError, match="no checkpoints/server.pt"):
        open_for_resume(parse_config({"resume": str(folder.path)}))
    assert json.loads((folder.path / "config.json").read_text())["strategy"] == "privacygan"
