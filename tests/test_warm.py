"""The warm app launcher of fedgan-supernode / fedgan-superlink (app/warm.py), without Flower: the shim asks
the warm parent for a forked child that runs the entry point with the shim's arguments and
exits with its code; the child sees the heavy modules loaded and the project's own modules not
(so a run's FAB is imported afresh); with no parent the shim runs the real program instead."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import warm

PROBE = '''
import json, os, sys
import numpy as np

def main():
    out = os.environ["PROBE_OUT"]
    with open(out, "a") as fh:
        fh.write(json.dumps({
            "argv": sys.argv[1:], "argv0": sys.argv[0], "pid": os.getpid(), "ppid": os.getppid(),
            "torch_loaded": "torch" in sys.modules,
            "project_loaded": sorted(m for m in sys.modules if m.split(".")[0] in ("app", "models", "strategies")),
            "random": float(np.random.rand()),
            "forked_at": os.environ.get("FEDGAN_FORKED_AT"),
        }) + "\\n")
    sys.exit(int(sys.argv[-1]))
'''


@pytest.fixture
def warm_parent(tmp_path):
    """A warm parent whose entry point is the probe above; yields (shim path, parent, output file)."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_OUT": str(out)}
    sock = str(tmp_path / "warm.sock")
    parent = subprocess.Popen([sys.executable, warm.__file__, "serve", "supernode", sock, "probe_entry:main"], env=env)
    deadline = time.monotonic() + 120
    while not os.path.exists(sock):
        assert parent.poll() is None, "the warm parent exited"
        assert time.monotonic() < deadline, "the warm parent was not ready in 120 s"
        time.sleep(0.05)
    real = tmp_path / "real-clientapp"
    real.write_text(f"#!/bin/sh\necho \"real $*\" >> {tmp_path / 'real.txt'}\nexit 7\n")
    real.chmod(0o755)
    shim = warm.write_shim(str(tmp_path), sock, str(real))
    try:
        yield shim, parent, out, env
    finally:
        parent.terminate()
        parent.wait(10)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_shim_runs_the_entry_point_in_a_forked_warm_child_and_returns_its_exit_code(warm_parent):
    shim, parent, out, env = warm_parent
    first = subprocess.run([shim, "--token", "a b", "3"], env=env, timeout=60)
    second = subprocess.run([shim, "--runtime-api-address", "127.0.0.1:1", "0"], env=env, timeout=60)
    assert (first.returncode, second.returncode) == (3, 0)
    a, b = rows(out)
    assert a["argv"] == ["--token", "a b", "3"]                # arguments arrive intact, spaces included
    assert b["argv"] == ["--runtime-api-address", "127.0.0.1:1", "0"]
    assert a["ppid"] == parent.pid and b["ppid"] == parent.pid and a["pid"] != b["pid"]   # forked children
    assert a["torch_loaded"] and a["project_loaded"] == []     # warm third-party, no stale project code
    assert a["random"] != b["random"]                          # numpy's generator reseeded per child
    assert a["forked_at"] and abs(float(a["forked_at"]) - time.time()) < 120


def test_without_the_warm_parent_the_shim_runs_the_real_program(warm_parent, tmp_path):
    shim, parent, out, env = warm_parent
    parent.terminate()
    parent.wait(10)
    Path(str(tmp_path / "warm.sock")).unlink(missing_ok=True)
    done = subprocess.run([shim, "--token", "t", "0"], env=env, timeout=60)
    assert done.returncode == 7                                 # the real program's code
    assert (tmp_path / "real.txt").read_text().strip() == "real --token t 0"
    assert not out.exists()


def test_preload_drops_the_project_modules_and_keeps_the_rest():
    code = ("import sys; from app import warm; d = warm.preload(('json', 'app.data')); "
            "print(int('app.data' in d), int('json' in sys.modules), int(any(m.startswith('app') for m in sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.stdout.split() == ["1", "1", "0"], done.stdout + done.stderr


def test_both_roles_name_flowers_programs_and_entry_points():
    import importlib

    for role, (wrapped, command, entry, modules) in warm.ROLES.items():
        module, _, func = entry.partition(":")
        assert callable(getattr(importlib.import_module(module), func)), entry   # Flower's own entry point
        assert os.path.exists(warm._real(wrapped)) and os.path.exists(warm._real(command)), role
        assert "torch._dynamo" in modules and any(m.startswith("app.") for m in modules)


def test_a_forked_serverapp_draws_its_plots_without_importing_matplotlib_again(tmp_path):
    """The ServerApp's roles preload what its end-of-run plots import (~0.9 s per run otherwise):
    after that preload, plotting metrics.png imports no matplotlib module."""
    for role in ("superlink", "simulation"):
        assert set(warm._PLOTS) <= set(warm.ROLES[role][3]), role
    code = ("import sys; from app import warm; warm.preload(warm._PLOTS); "
            "before = {m for m in sys.modules if m.startswith('matplotlib')}; "
            "from app.runs import RunFolder; run = RunFolder.create(sys.argv[1], 'privacygan', 'digits', {}); "
            "[run.log_metrics({'round': r, 'g_loss': 1.0 / r, 'd_loss': 0.5}) for r in (1, 2)]; "
            "assert run.plot_metrics(['g_loss', 'd_loss']).stat().st_size > 0; "
            "print(sorted(m for m in sys.modules if m.startswith('matplotlib') and m not in before))")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=180,
                          cwd=Path(warm.__file__).parent.parent)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_a_shim_started_while_the_parent_still_imports_waits_for_it_and_one_whose_parent_died_starts_cold(tmp_path):
    """Flower's program starts at once, beside the warm parent's imports (fedgan-supernode /
    fedgan-superlink no longer wait for them): an app process launched meanwhile waits in the
    shim and still runs forked; if the parent dies before it is ready, the shim runs the real program."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    out = tmp_path / "probe.jsonl"
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROBE_OUT": str(out)}
    real = tmp_path / "real-clientapp"
    real.write_text(f"#!/bin/sh\necho \"real $*\" >> {tmp_path / 'real.txt'}\nexit 7\n")
    real.chmod(0o755)
    sock = str(tmp_path / "warm.sock")
    parent = subprocess.Popen([sys.executable, warm.__file__, "serve", "supernode", sock, "probe_entry:main"], env=env)
    try:
        shim = warm.write_shim(str(tmp_path), sock, str(real), parent=parent.pid)
        assert not os.path.exists(sock)                          # still importing torch
        done = subprocess.run([shim, "--token", "t", "4"], env=env, timeout=120)
        assert done.returncode == 4 and not (tmp_path / "real.txt").exists()
        assert [r["ppid"] for r in rows(out)] == [parent.pid]   # forked by the parent it waited for
    finally:
        parent.terminate()
        parent.wait(10)
    # a parent that died while importing: no socket, no process -> a cold start at once
    (tmp_path / "gone").mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(10)
    shim = warm.write_shim(str(tmp_path / "gone"), str(tmp_path / "gone" / "warm.sock"), str(real), parent=dead.pid)
    started = time.monotonic()
    done = subprocess.run([shim, "--token", "u", "0"], env=env, timeout=60)
    assert done.returncode == 7 and (tmp_path / "real.txt").read_text().strip() == "real --token u 0"
    assert time.monotonic() - started < 10                     # not the 120 s it would wait for a live parent


def test_a_forked_child_runs_under_the_name_of_flowers_program(tmp_path):
    """Flower reads sys.argv[0] (e.g. which exit event a process sends): a role's child is named
    after the program it stands in for -- flwr-simulation, whose entry module is flwr.simulation.app."""
    (tmp_path / "probe_entry.py").write_text(PROBE)
    out = tmp_path / "probe.jsonl"
    code = ("import os, socket, sys\n"
            "from app import warm\n"
            "a, b = socket.socketpair()\n"
            "a.sendall(b'--token\\0t\\x000\\n')\n"
            "pid = os.fork()\n"
            "if pid == 0:\n"
            "    warm._run_child(b, 'probe_entry:main', warm.ROLES['simulation'][1])\n"
            "os.waitpid(pid, 0)\n"
            "print(a.recv(64).decode().strip())\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(Path(warm.__file__).parent.parent)]),
           "PROBE_OUT": str(out)}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "0", done.stdout + done.stderr    # the child's exit code, reported back
    (row,) = rows(out)
    assert row["argv0"] == "flwr-simulation" and row["argv"] == ["--token", "t", "0"]


def test_scratch_folders_of_killed_owners_are_swept_and_live_ones_kept(tmp_path):
    """A SIGKILLed fedgan-supernode (or simulation launcher) cannot remove its temporary folder:
    the next one's start removes every folder of its prefix whose recorded owners have all ended,
    and only those (a live owner, a pid reused by another process, a folder without an owners file)."""
    from app.warm import OWNERS_FILE, add_owner, sweep_stale

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        def folder(name: str, *pids: int) -> Path:
            d = tmp_path / name
            d.mkdir()
            (d / "flwr-clientapp.sock").write_text("")
            for pid in pids:
                add_owner(d, pid)
            return d

        gone = folder("fedgan-supernode-a", dead.pid)
        kept = folder("fedgan-supernode-b", dead.pid, live.pid)   # the wrapper died, its SuperNode runs
        reused = folder("fedgan-supernode-c")
        (reused / OWNERS_FILE).write_text(f"{live.pid} 12345.0\n")   # that pid now names another process
        unowned = folder("fedgan-supernode-d")
        torn = folder("fedgan-supernode-f")
        (torn / OWNERS_FILE).write_text(f"{dead.pid} 1.5\n{dead.pid}")   # cut short while written
        other = folder("fedgan-superlink-e", dead.pid)
        removed = sweep_stale("fedgan-supernode-", root=str(tmp_path))
        assert sorted(removed) == sorted([str(gone), str(reused)])
        assert not gone.exists() and not reused.exists()
        assert kept.is_dir() and unowned.is_dir() and other.is_dir() and torn.is_dir()
        live.kill()
        live.wait()
        assert sweep_stale("fedgan-supernode-", root=str(tmp_path)) == [str(kept)]
        assert unowned.is_dir() and other.is_dir()
    finally:
        if live.poll() is None:
            live.kill()
