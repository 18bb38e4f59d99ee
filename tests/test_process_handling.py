"""Process handling of app/launch.py and app/loopback.py without a real SuperLink: processes are
found, judged and stopped through psutil (no /proc, so macOS works too), and the run id comes
from ``flwr run --format json`` while the log is followed with ``flwr log <id> <conn> --stream``."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from app import launch
from app.launch import log_command, parse_flwr_json, start_run, stop_superlink, superlink_pids
from app.loopback import _descendants, _group_members, helpers_of, process_alive, terminate

ROOT = Path(__file__).resolve().parent.parent


def test_no_proc_filesystem_is_read():
    for name in ("app/launch.py", "app/loopback.py"):
        assert '"/proc' not in (ROOT / name).read_text(), name


def _sleeper() -> subprocess.Popen:
    """A Python process in its own session that starts a child, which starts a grandchild; all sleep."""
    code = ("import subprocess, sys, time\n"
            "depth = int(sys.argv[1])\n"
            "if depth:\n"
            "    subprocess.Popen([sys.executable, '-c', sys.argv[2], str(depth - 1), sys.argv[2]])\n"
            "time.sleep(120)\n")
    return subprocess.Popen([sys.executable, "-c", code, "2", code], start_new_session=True)


def _wait_for(predicate, timeout: float = 20.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_process_alive_zombie_and_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    assert _wait_for(lambda: not process_alive(proc.pid))   # exited, not reaped yet: a zombie is not alive
    proc.wait()
    assert not process_alive(proc.pid)
    assert process_alive(os.getpid())
    assert not process_alive(2 ** 22 + 12345)                # beyond pid_max: never a process


def test_descendants_group_members_and_terminate_a_tree():
    root = _sleeper()
    try:
        assert _wait_for(lambda: len(_descendants([root.pid])) == 2), _descendants([root.pid])
        family = {root.pid} | _descendants([root.pid])
        assert _group_members([root.pid]) == family           # its own session: pgid == its pid
        terminate([root.pid], [root.pid], grace=5.0)
        root.wait(timeout=10)
        assert _wait_for(lambda: not any(process_alive(p) for p in family)), family
    finally:
        if root.poll() is None:
            os.killpg(root.pid, signal.SIGKILL)
            root.wait()


def test_helpers_and_superlink_are_found_by_their_command_line(tmp_path):
    fake_bin = tmp_path / "flower-superlink"   # argv[0] of the process is what is matched
    fake_bin.write_text(f"#!{sys.executable}\nimport time\ntime.sleep(120)\n")
    fake_bin.chmod(0o755)
    link = subprocess.Popen([str(fake_bin), "--port", "45123"], start_new_session=True)
    helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "flwr-clientapp",
                               "--runtime-api-address", "127.0.0.1:45999"], start_new_session=True)
    try:
        assert _wait_for(lambda: superlink_pids("45123") == [link.pid]), superlink_pids("45123")
        assert superlink_pids("45124") == []
        assert _wait_for(lambda: helpers_of([45999]) == {helper.pid}), helpers_of([45999])
        assert helpers_of([45998]) == set()
        stop_superlink("45123", timeout=5.0)
        assert link.wait(timeout=10) == -signal.SIGTERM
        assert superlink_pids("45123") == []
    finally:
        for p in (link, helper):
            if p.poll() is None:
                p.kill()
            p.wait()


# --- the run id from `flwr run --format json` ------------------------------------------------------
RICH_SUCCESS = """{
  "success": true,
  "run-id": "8137209173204968211",
  "federation-id": "",
  "fab-id": "fedgan/fedgan",
  "fab-name": "fedgan",
  "fab-version": "0.1.0",
  "fab-hash": "0a1b2c3d",
  "fab-filename": "fedgan.fedgan.0-1-0.0a1b2c3d.fab"
}
"""
RICH_FAILURE = """{
  "success": false,
  "error-message": "\\nSuperLink connection 'nosuch' not found in the Flower configuration file."
}
"""


def test_parse_flwr_json_reads_the_pretty_printed_object():
    assert parse_flwr_json(RICH_SUCCESS)["run-id"] == "8137209173204968211"
    assert parse_flwr_json("\x1b[1m" + RICH_SUCCESS.replace("true", "\x1b[3;92mtrue\x1b[0m"))["success"] is True
    assert parse_flwr_json("warning: something {odd}\n" + RICH_FAILURE)["success"] is False
    assert parse_flwr_json("no json here") == {}


def _echo(stdout: str, rc: int = 0) -> list[str]:
    return [sys.executable, "-c", f"import sys; sys.stdout.write({stdout!r}); sys.exit({rc})"]


def test_start_run_returns_the_run_id_or_the_cli_error_on_one_line():
    assert start_run(_echo(RICH_SUCCESS), dict(os.environ)) == ("8137209173204968211", "", 0)
    run_id, why, rc = start_run(_echo(RICH_FAILURE), dict(os.environ))   # flwr exits 0 here too
    assert run_id is None and rc == 0 and why == "SuperLink connection 'nosuch' not found in the Flower " \
                                                "configuration file."
    run_id, why, rc = start_run(_echo("Traceback: boom\n", rc=1), dict(os.environ))
    assert (run_id, why, rc) == (None, "Traceback: boom", 1)
    assert log_command("42", "local") == ["flwr", "log", "42", "local", "--stream"]


def test_flwr_run_json_and_stream_do_not_mix_in_the_installed_cli():
    """Why the log is followed with `flwr log`: with --format json, flwr redirects stdout into a
    buffer it discards, and --stream prints the log there."""
    import importlib
    import inspect

    from flwr.cli.utils import cli_output_handler

    run_module = importlib.import_module("flwr.cli.run.run")

    assert "redirect_output(captured_output)" in inspect.getsource(cli_output_handler)
    source = inspect.getsource(run_module._run_with_control_api)
    assert '"run-id"' in source and "start_stream(res.run_id" in source


@pytest.fixture
def fake_flwr(tmp_path, monkeypatch):
    """A stand-in `flwr` on PATH that records its arguments: `run` prints the JSON, `log` a few
    log lines, `ls` the status in FAKE_STATUS."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls = tmp_path / "calls.jsonl"
    script = bin_dir / "flwr"
    script.write_text(textwrap.dedent(f"""\
        #!{sys.executable}
        import json, os, sys
        with open({str(calls)!r}, "a") as fh:
            fh.write(json.dumps(sys.argv[1:]) + "\\n")
        cmd = sys.argv[1]
        if cmd == "run":   # what the app folder it was given holds, as it bundles it
            with open({str(calls)!r} + ".app", "w") as fh:
                json.dump(sorted(os.listdir(sys.argv[2])), fh)
            print(json.dumps({{"success": True, "run-id": "42", "federation-id": ""}}, indent=2))
        elif cmd == "log":
            print("INFO: round 1/1")
            print("[fedgan] run folder: /tmp/fedgan-fake/runs/r1")
        elif cmd == "ls":
            print(json.dumps({{"success": True, "runs": [{{"run-id": "42", "status": os.environ["FAKE_STATUS"]}}]}}))
        """))
    script.chmod(0o755)
    real_env = launch._env

    def env(flwr_home):
        out = real_env(flwr_home)
        out["PATH"] = f"{bin_dir}{os.pathsep}{out['PATH']}"
        return out

    monkeypatch.setattr(launch, "_env", env)
    return lambda: [json.loads(line) for line in calls.read_text().splitlines()]


def test_fedgan_run_names_the_folder_it_could_not_stage_the_app_in(fake_flwr, monkeypatch, capsys, tmp_path):
    """The slim copy of the app goes to a temporary folder; when that cannot be written, one line
    names it and nothing is submitted."""
    import tempfile

    missing = tmp_path / "no-such-tmp"
    monkeypatch.setattr(tempfile, "tempdir", str(missing))
    assert launch.main(["--connection", "fake", "--flwr-home", str(tmp_path / "home"),
                        "--run-config", "num-rounds=1"]) == 1
    err = capsys.readouterr().err
    assert f"could not copy the app for flwr run into {missing}" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "calls.jsonl").exists()   # flwr was never called


@pytest.mark.parametrize("status, code", [("finished:completed", 0), ("finished:failed", 1)])
def test_fedgan_run_gets_the_id_from_json_streams_the_log_and_exits_by_status(
        fake_flwr, monkeypatch, capsys, tmp_path, status, code):
    monkeypatch.setenv("FAKE_STATUS", status)
    assert launch.main(["--connection", "fake", "--flwr-home", str(tmp_path / "home"),
                        "--run-config", "num-rounds=1"]) == code
    out = capsys.readouterr().out
    assert "INFO: round 1/1" in out                                           # the log, streamed
    assert f"[fedgan-run] run 42: {status}; results in /tmp/fedgan-fake/runs/r1" in out
    calls = fake_flwr()
    run = calls[0]
    assert run[2] == "fake" and run[3:5] == ["--format", "json"]
    # the app was a slim copy of the project (not the project folder, whose .venv flwr run would walk),
    # removed once the run was submitted
    assert run[1] != str(launch.PROJECT) and not Path(run[1]).exists()
    staged = json.loads((tmp_path / "calls.jsonl.app").read_text())
    assert staged == sorted([*launch.APP_PACKAGES, *launch.APP_FILES])
    assert "--stream" not in run
    assert calls[1] == ["log", "42", "fake", "--stream"]
    assert calls[2][:4] == ["ls", "fake", "--run-id", "42"]
