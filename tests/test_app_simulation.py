"""app/simulation.py without a SuperLink: what a script hands ``flwr run`` (run-config file, the
staged app) and the stop request that crosses from the script to the ServerApp's process. The
runs themselves go through ``flwr run`` in every end-to-end test (tests/e2e_mods.py)."""

import sys
import threading
import time
import tomllib
import zipfile
from pathlib import Path

import pytest

from app.config import parse_config
from app.simulation import (PROJECT, absolute_paths, request_stop, stage_app, stop_request_path, summary_error,
                            summary_status, watch_stop_requests, write_run_config)


def test_the_run_config_file_holds_every_key_and_reads_back_equal(tmp_path):
    raw = parse_config({"alpha": 0.75, "run-name": 'a "quoted" name', "dp": True}).to_run_config()
    path = write_run_config(raw, tmp_path / "run.toml")
    assert tomllib.loads(path.read_text()) == raw
    assert parse_config(tomllib.loads(path.read_text())) == parse_config(raw)
    with pytest.raises(TypeError, match="'bad'"):
        write_run_config({"bad": [1, 2]}, tmp_path / "bad.toml")


def test_a_log_stream_is_asked_about_only_while_silent_and_ended_once_it_outlives_its_run(tmp_path, monkeypatch):
    """The watcher beside a run's ``flwr log --stream``: while the stream gives lines it asks no
    status (each ``flwr ls`` is a CLI start); once silent it asks every QUIET_S, and a stream still
    open OUTLIVE_S after its run finished is ended."""
    import subprocess

    import app.launch
    from app.simulation import LocalFederation

    asked: list[float] = []
    monkeypatch.setattr(app.launch, "run_status", lambda run_id, env, *a, **k: asked.append(time.monotonic())
                        or "finished:completed")
    fed = LocalFederation(flwr_home=tmp_path / "home")
    fed.QUIET_S, fed.OUTLIVE_S = 0.5, 1.0
    stream = subprocess.Popen(["sleep", "120"])   # a log stream that does not end by itself
    try:
        done = threading.Event()
        talking = threading.Thread(target=fed._watch, args=("7", {}, None, stream, done, time.monotonic))
        talking.start()
        time.sleep(2.5)                            # five quiet periods, but lines kept coming
        done.set()
        talking.join(timeout=5)
        assert asked == [] and stream.poll() is None
        silent_since = time.monotonic()
        quiet = threading.Thread(target=fed._watch, args=("7", {}, None, stream, threading.Event(),
                                                          lambda: silent_since))
        quiet.start()
        quiet.join(timeout=20)
        assert not quiet.is_alive() and stream.wait(timeout=5) == -9   # ended: its run had finished OUTLIVE_S before
        assert len(asked) >= 3 and all(b - a >= 0.5 for a, b in zip(asked, asked[1:]))
        assert asked[-1] - asked[0] >= 1.0
    finally:
        stream.kill()
        stream.wait()


def test_paths_are_made_absolute_against_the_callers_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_HOME", str(tmp_path / "home"))
    out = absolute_paths({"teacher-path": "t/teacher.pt", "resume": "", "dataset": "imagefolder:imgs",
                          "output-dir": "outs", "alpha": 0.5}, cwd=tmp_path)
    assert out == {"teacher-path": str(tmp_path / "t" / "teacher.pt"), "resume": "",
                   "dataset": f"imagefolder:{tmp_path / 'imgs'}",
                   "output-dir": str(tmp_path / "home" / "outs"),   # the ServerApp's own rule (app/runs.py)
                   "alpha": 0.5}


def test_the_staged_app_is_the_apps_code_only_with_the_chosen_clientapp(tmp_path):
    extra = tmp_path / "mods.py"
    extra.write_text("app = None\n")
    dest = stage_app(tmp_path / "stage", clientapp="mods:app", extra={"mods.py": extra})
    top = {p.name for p in dest.iterdir()}
    assert top == {"app", "models", "strategies", "pyproject.toml", "README.md", ".gitignore", "mods.py"}
    assert (dest / "app" / "server_app.py").read_bytes() == (PROJECT / "app" / "server_app.py").read_bytes()
    assert not list(dest.rglob("__pycache__"))
    components = tomllib.loads((dest / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "app.server_app:app", "clientapp": "mods:app"}
    plain = stage_app(tmp_path / "plain")
    assert tomllib.loads((plain / "pyproject.toml").read_text()) == tomllib.loads((PROJECT / "pyproject.toml").read_text())


def test_the_staged_app_bundles_into_a_fab_with_the_apps_files(tmp_path):
    """``flwr build`` on the staged copy: the FAB holds the packages and pyproject.toml."""
    import subprocess
    import sys

    dest = stage_app(tmp_path / "stage")
    flwr = Path(sys.executable).parent / "flwr"
    out = subprocess.run([str(flwr), "build", "--app", str(dest)], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "pyproject.toml" in names and "app/server_app.py" in names and "models/__init__.py" in names
    assert not any(n.startswith(("simulations/", "tests/", ".venv/")) for n in names)


def test_a_stop_request_reaches_the_watcher_and_is_removed_after(tmp_path):
    stop = threading.Event()
    with watch_stop_requests(tmp_path, 1234, stop, every=0.02) as path:
        assert path == stop_request_path(tmp_path, 1234) == tmp_path / "stop-requests" / "1234"
        request_stop(tmp_path, 999)          # another run's request changes nothing
        time.sleep(0.1)
        assert not stop.is_set()
        request_stop(tmp_path, 1234)
        assert stop.wait(2.0)
    assert not path.exists()
    with watch_stop_requests(tmp_path, None, stop) as nothing:   # no Flower run id (a test double): no watcher
        assert nothing is None


def test_summary_error_reads_the_runs_own_reason(tmp_path):
    (tmp_path / "summary.md").write_text("# fedgan run\n\n- status: **failed**\n- error: `RunFailed: round 1: too few`\n")
    assert summary_error(tmp_path) == "RunFailed: round 1: too few"
    assert summary_error(tmp_path / "missing") is None and summary_error(None) is None


def test_summary_status_is_the_flwr_ls_status_of_a_finished_run_and_none_otherwise(tmp_path):
    """What lets a run's end skip ``flwr ls``: success and failed map to Flower's final statuses;
    an interrupted run, one without a summary, or no folder leave it to ``flwr ls``."""
    for word, status in (("success", "finished:completed"), ("failed", "finished:failed"), ("interrupted", None),
                         ("running", None)):
        (tmp_path / "summary.md").write_text(f"# fedgan run\n\n- status: **{word}**\n")
        assert summary_status(tmp_path) == status, word
    assert summary_status(tmp_path / "missing") is None and summary_status(None) is None


def test_fedgan_ray_cpus_is_a_whole_number_or_unset(monkeypatch):
    from app.config import ConfigError
    from simulations.common import ray_cpus_from_env

    monkeypatch.setenv("FEDGAN_RAY_CPUS", "3")
    assert ray_cpus_from_env() == 3
    monkeypatch.setenv("FEDGAN_RAY_CPUS", "")
    assert ray_cpus_from_env() is None
    for bad in ("0", "-1", "two", "1.5"):
        monkeypatch.setenv("FEDGAN_RAY_CPUS", bad)
        with pytest.raises(ConfigError, match="FEDGAN_RAY_CPUS"):
            ray_cpus_from_env()


@pytest.mark.e2e
def test_a_shared_federation_idle_for_long_enough_is_closed_and_the_next_one_starts_fresh():
    """An idle SuperLink + Ray cluster costs ~10 % of a core: the reaper closes a shared one that
    no run has used for IDLE_CLOSE_S, its processes stop, and shared_federation hands out a new one."""
    from app.loopback import process_alive
    from app.simulation import shared_federation

    fed = shared_federation({"FEDGAN_TEST_IDLE": "1"}, 1)
    fed.start()
    procs = fed.processes()
    assert any("flower-superlink" in " ".join(p.cmdline()) for p in procs)
    assert not fed.close_if_idle(3600.0) and not fed.closed       # just used: kept
    fed.last_used -= 3600.0
    assert fed.close_if_idle(3600.0) and fed.closed
    deadline = time.monotonic() + 20
    while [p for p in procs if process_alive(p.pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p.pid for p in procs if process_alive(p.pid)]
    again = shared_federation({"FEDGAN_TEST_IDLE": "1"}, 1)
    assert again is not fed and not again.closed
    again.close()


@pytest.mark.e2e
def test_a_flwr_call_still_running_at_close_cannot_leave_a_superlink_behind():
    """``flwr ls`` for the ``local`` connection starts Flower's own managed SuperLink when none
    answers: one still starting when the federation closes must be stopped with it, or that
    SuperLink (with the federation's FLWR_HOME) would run on unowned."""
    import subprocess

    import psutil

    from app.simulation import LocalFederation

    fed = LocalFederation(ray_cpus=1)
    fed.start()
    home = str(fed.flwr_home)
    late = subprocess.Popen(["flwr", "ls", "local", "--format", "json"], env=fed.env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)   # still importing when the SuperLink goes
    fed.close()
    late.wait(timeout=30)
    time.sleep(3.0)

    def strays():
        out = []
        for p in psutil.process_iter(["cmdline"]):
            line = " ".join(p.info.get("cmdline") or [])
            if "flower-superlink" in line and home in line:
                out.append(p)
        return out
    left = strays()
    for p in left:
        p.kill()
    assert not left, [" ".join(p.cmdline())[:120] for p in left]


def test_the_watchdog_stops_the_superlink_tree_when_its_caller_dies_uncleanly(tmp_path):
    """A script SIGKILLed mid-run cannot close its federation: the watchdog process
    (``python -m app.simulation watchdog <caller> <root> <ray dir> <gcs port> <scratch>``) stops
    the root and its children, and removes the federation's temporary FLWR_HOME."""
    import subprocess
    import sys

    import psutil

    caller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    root = subprocess.Popen([sys.executable, "-c", "import subprocess, sys, time; "
                             "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); time.sleep(60)"],
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while not psutil.Process(root.pid).children() and time.monotonic() < deadline:
            time.sleep(0.05)
        (child,) = psutil.Process(root.pid).children()
        home = tmp_path / "fedgan-flwr-x"
        (home / "local-superlink").mkdir(parents=True)
        (home / "local-superlink" / "state.db").write_bytes(b"x")
        dog = subprocess.Popen([sys.executable, "-m", "app.simulation", "watchdog", str(caller.pid), str(root.pid),
                                "", "0", str(home)], cwd=PROJECT)
        time.sleep(1.0)
        assert root.poll() is None and dog.poll() is None          # the caller lives: nothing happens
        assert (home / "local-superlink" / "state.db").is_file()
        caller.kill()
        caller.wait()
        assert dog.wait(timeout=30) == 0
        assert root.wait(timeout=5) is not None
        assert not child.is_running() or child.status() == psutil.STATUS_ZOMBIE
        assert not home.exists()
    finally:
        for p in (caller, root):
            if p.poll() is None:
                p.kill()


def test_the_watchdog_also_stops_its_clusters_ray_client_server_and_no_other():
    """``ray start`` leaves its Ray Client server detached, with only the cluster's address
    (``--address=<ip>:<GCS port>``) on its command line, not the cluster's folder: the watchdog's
    5th argument (the GCS port) finds it; another cluster's (another port) is left alone."""
    import subprocess
    import sys

    from app.simulation import free_port

    port, other = free_port(), free_port()

    def fake_server(p):   # a process whose command line reads like Ray's Client server
        return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "-m", "ray.util.client.server",
                                 f"--address=192.0.2.2:{p}", "--port=10001"], start_new_session=True)

    caller = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    root = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"], start_new_session=True)
    mine, theirs = fake_server(port), fake_server(other)
    try:
        dog = subprocess.Popen([sys.executable, "-m", "app.simulation", "watchdog", str(caller.pid), str(root.pid),
                                "/nonexistent/fedgan-ray-dir", str(port)], cwd=PROJECT)
        time.sleep(1.0)
        assert mine.poll() is None and dog.poll() is None
        caller.kill()
        caller.wait()
        assert dog.wait(timeout=30) == 0
        assert mine.wait(timeout=15) is not None and root.wait(timeout=5) is not None
        time.sleep(0.5)
        assert theirs.poll() is None
    finally:
        for p in (caller, root, mine, theirs):
            if p.poll() is None:
                p.kill()


@pytest.mark.e2e
def test_a_federations_ray_cluster_binds_no_fixed_port_and_close_stops_all_of_it(tmp_path):
    """Two federations on one machine (two scripts; a script beside a test run) each start a Ray
    cluster. `ray start`'s defaults bind fixed ports -- Ray Client server 10001, dashboard 8265,
    dashboard agent 52365, workers from 10002 up -- so the second cluster's driver or workers
    could find theirs taken and its run failed ("Failed to start the grpc server. The specified
    port is 10003"; 2 of 3 runs started together failed so). After a run, every port the
    federation's processes listen on must be one the OS handed out (the ephemeral range), and
    close() must stop all of it, the detached Ray Client server included."""
    import threading

    import psutil
    from e2e_mods import simulate

    from app.config import parse_config
    from app.loopback import process_alive
    from app.server_app import last_status
    from app.simulation import close_shared, shared_processes

    cfg = parse_config({"gen-features": 8, "disc-features": 8, "batch-size": 8, "teacher-steps": 5,
                        "samples-per-client": 4, "steps-per-round": 1, "num-rounds": 3, "client-eval": False,
                        "output-dir": str(tmp_path / "out")})
    outcome = []
    run = threading.Thread(target=lambda: outcome.append(last_status(simulate(cfg, 2).path)), daemon=True)
    run.start()
    listening, seen, workers, lines = {}, {}, False, {}
    while run.is_alive():   # the driver and the actors live only while the run does: look meanwhile
        for p in shared_processes():
            try:
                line = " ".join(p.cmdline())
                seen[p.pid] = p
                lines[p.pid] = line
                workers |= "ClientAppActor" in line
                for c in p.net_connections(kind="tcp"):
                    if c.status == psutil.CONN_LISTEN:
                        listening[c.laddr.port] = line[:80]
            except psutil.Error:
                continue
        time.sleep(0.2)
    run.join()
    assert outcome == ["success"]
    assert workers, "no ClientApp actor seen while the run went on"
    # the run's flwr-simulation process (its ServerApp) was forked from the warm parent (app/warm.py):
    # the SuperExec started the shim, and the real program, a cold start, never ran
    assert sum("warm.py serve simulation" in line for line in lines.values()) >= 2, lines   # parent and child
    assert any(line.startswith(f"{sys.executable} -S ") and line.split()[2].endswith("/flwr-simulation")
               for line in lines.values()), lines
    assert not any(line.split()[1:2] == [str(Path(sys.executable).parent / "flwr-simulation")]
                   for line in lines.values()), lines
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    fixed = {10001, 8265, 52365} | set(range(10002, 20000))
    assert listening
    taken = {port: who for port, who in listening.items() if port in fixed and not low <= port <= high}
    assert not taken, taken
    procs = shared_processes() + list(seen.values())
    assert any("ray.util.client.server" in " ".join(p.cmdline()) for p in procs if process_alive(p.pid))
    close_shared()
    deadline = time.monotonic() + 20
    while [p for p in procs if process_alive(p.pid)] and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p.pid for p in procs if process_alive(p.pid)]
    assert not left, left
