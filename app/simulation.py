"""Simulations from Python through ``flwr run`` and Flower's Simulation Engine.

Every ``simulations/*.py`` script (and the end-to-end tests) runs the project's ServerApp and
ClientApp the supported way: ``flwr run <app> local`` against a managed local SuperLink in
simulation mode, with the number of virtual SuperNodes and each one's CPUs/GPUs as federation
options and the validated run config written to a TOML file. (Flower's ``run_simulation``, which
ran both apps inside the calling process, is deprecated.) What this module adds:

* :class:`LocalFederation` -- a managed local SuperLink of its own: a private ``FLWR_HOME`` (a
  temporary folder), free ports, runtime dependency installation off (runs use this
  environment), started by the first ``flwr run`` and reused by later runs of the same process,
  stopped -- with every process under it, Ray included -- by :meth:`LocalFederation.close`;
* :meth:`LocalFederation.run` -- one run: submit it (``flwr run --format json`` gives its id),
  echo its log (``flwr log <id> --stream``) as it comes, and read its final status (``flwr ls``);
* a graceful stop across processes: the ServerApp runs in a process the SuperLink starts, so a
  Ctrl-C in the calling process cannot reach its stop flag. :func:`request_stop` writes
  ``<output-dir>/stop-requests/<flower run id>``; the ServerApp watches for that file
  (:func:`watch_stop_requests`) and stops at its next safe point, writing summary.md
  "interrupted" -- the same file a user may create by hand to stop a run on this machine.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import psutil

from app.launch import PROJECT, _env, final_status, log_command, stage_app, start_run, superlink_healthy
from app.warm import add_owner, owned_tempdir

STOP_REQUESTS = "stop-requests"
TMP_PREFIX = "fedgan-flwr-"
# run-config keys holding a path on this machine: made absolute before the run is submitted,
# since the ServerApp and the virtual clients do not run in the caller's working directory
PATH_KEYS = ("data-dir", "teacher-path", "evaluator-dir", "inception-weights", "output-dir", "resume")
_FLOWER_INFO = re.compile(r"^(\x1b\[[0-9;]*m)?INFO\b")
_NOISE = "Manually terminating ClientAppActor"   # Ray actors at the end of every run


class SimulationError(RuntimeError):
    """A run that could not be submitted or followed (not a run that failed: see the status)."""


def stop_request_path(output_dir: str | Path, flower_run_id: int | str) -> Path:
    """Where a request to stop Flower run ``flower_run_id`` is written (and watched for)."""
    from app.runs import resolve_output_dir

    return resolve_output_dir(str(output_dir)) / STOP_REQUESTS / str(flower_run_id)


def request_stop(output_dir: str | Path, flower_run_id: int | str) -> Path:
    """Ask the ServerApp of ``flower_run_id`` (on this machine) to stop at its next safe point."""
    path = stop_request_path(output_dir, flower_run_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"stop requested at {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    return path


@contextlib.contextmanager
def watch_stop_requests(output_dir: str | Path, flower_run_id: int | None, stop: threading.Event,
                        every: float = 0.25):
    """While inside: set ``stop`` when :func:`request_stop`'s file for this run appears (checked
    every ``every`` s by a daemon thread); the file is removed when the block ends."""
    if flower_run_id is None:
        yield None
        return
    path = stop_request_path(output_dir, flower_run_id)
    done = threading.Event()

    def watch() -> None:
        while not done.wait(every):
            if path.exists():
                stop.set()
                return

    thread = threading.Thread(target=watch, name="fedgan-stop-requests", daemon=True)
    thread.start()
    try:
        yield path
    finally:
        done.set()
        path.unlink(missing_ok=True)


def absolute_paths(run_config: Mapping[str, Any], cwd: Path | None = None) -> dict[str, Any]:
    """``run_config`` with its path keys (and ``dataset=imagefolder:<path>``) made absolute
    against ``cwd`` (default: the working directory), ``~`` expanded; ``output-dir`` as the
    ServerApp resolves it (:func:`app.runs.resolve_output_dir`)."""
    cwd = Path.cwd() if cwd is None else cwd
    out = dict(run_config)

    def fix(text: str) -> str:
        return str((cwd / Path(text).expanduser()).resolve()) if text else text

    for key in PATH_KEYS:
        if isinstance(out.get(key), str):
            out[key] = fix(out[key])
    if isinstance(run_config.get("output-dir"), str):   # its own rule: relative to $FEDGAN_HOME (app/runs.py)
        from app.runs import resolve_output_dir

        out["output-dir"] = str(resolve_output_dir(run_config["output-dir"]))
    dataset = out.get("dataset")
    if isinstance(dataset, str) and dataset.startswith("imagefolder:"):
        out["dataset"] = "imagefolder:" + fix(dataset.split(":", 1)[1])
    return out


def write_run_config(run_config: Mapping[str, Any], path: Path) -> Path:
    """The run config as a TOML file for ``flwr run --run-config <file>`` (values: str, int,
    float, bool -- what Flower accepts)."""
    import tomli_w

    for key, value in run_config.items():
        if not isinstance(value, (str, int, float, bool)):
            raise TypeError(f"run config {key!r} = {value!r}: only str, int, float and bool travel to Flower")
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class SimulationResult:
    """One run as the SuperLink recorded it."""
    run_id: str
    status: str                       # e.g. finished:completed, finished:failed, finished:stopped
    seconds: float
    log: list[str] = field(default_factory=list)   # the lines it logged (Flower's INFO lines left out)

    @property
    def ok(self) -> bool:
        return self.status == "finished:completed"


class LocalFederation:
    """A managed local SuperLink (simulation mode) owned by this process; see the module doc.

    ``env`` adds environment variables to the SuperLink and therefore to everything it starts
    (the ServerApp process, the simulation process, its Ray workers)."""

    def __init__(self, env: Mapping[str, str] | None = None, flwr_home: Path | None = None,
                 ray_cpus: int | None = None):
        # a temporary FLWR_HOME; one whose launcher was killed before close() (SIGKILL, a crash)
        # goes with that launcher's watchdog, or with the next federation's start on this machine
        self._tmp = None if flwr_home is not None else owned_tempdir(TMP_PREFIX)
        self.flwr_home = Path(flwr_home or self._tmp)
        self.ray_cpus = ray_cpus or os.cpu_count() or 1
        self.ray_dir = self.flwr_home / "ray"
        self.gcs_port: int | None = None   # the Ray cluster's port, once this federation started one
        self.env = _env(self.flwr_home)
        self.port, self.control_port = str(free_port()), str(free_port())
        self.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = self.port
        self.env["FLWR_LOCAL_CONTROL_API_PORT"] = self.control_port
        # the SuperExec's task polling: 0.1 s instead of 1 s (flwr/supercore/superexec/run_superexec.py)
        self.env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
        # Ray's C++ crash handler would turn a SIGTERM into an abort with a core dump
        self.env.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
        self.env.update(env or {})
        self.extra_env = dict(env or {})
        self._runs = 0
        self._staged: dict[tuple, Path] = {}
        self._superlink: subprocess.Popen | None = None
        self._watchdog: subprocess.Popen | None = None
        self.closed = False
        self._lock = threading.Lock()   # run() against close() from another thread (the idle reaper)
        self._busy = 0
        self.last_used = time.monotonic()

    def staged(self, clientapp: str | None = None, extra: Mapping[str, Path] | None = None) -> Path:
        """This project staged once per (clientapp, extra) in the federation's folder (:func:`stage_app`)."""
        key = (clientapp, tuple(sorted((k, str(v)) for k, v in (extra or {}).items())))
        if key not in self._staged:
            self._staged[key] = stage_app(self.flwr_home / f"app-{len(self._staged)}", clientapp=clientapp, extra=extra)
        return self._staged[key]

    def run(self, run_config: Mapping[str, Any], num_supernodes: int, *, cpus: int = 1, gpus: float = 0.0,
            app_dir: Path | None = None, stop: threading.Event | None = None,
            echo: Callable[[str], None] | None = None,
            settled: Callable[[list[str]], str | None] | None = None) -> SimulationResult:
        """One run of the app in ``app_dir`` (default: this project, :meth:`staged`) with
        ``num_supernodes`` virtual clients; returns when the run has ended. ``stop``: when it is
        set, the ServerApp is asked to stop at its next safe point (:func:`request_stop`).
        ``echo`` gets each log line (default: printed). ``settled``: given the run's log, the
        final status the app itself recorded (e.g. :func:`summary_status`), or None; when the
        log stream ended with the run (the SuperLink ends it once the run is finished) and this
        gives a status, ``flwr ls`` is not asked (a CLI start, ~1.7 s on 2 cores)."""
        with self._lock:
            if self.closed:
                raise SimulationError("this LocalFederation was closed")
            self._busy += 1
        try:
            return self._run(run_config, num_supernodes, cpus=cpus, gpus=gpus, app_dir=app_dir, stop=stop, echo=echo,
                             settled=settled)
        finally:
            with self._lock:
                self._busy -= 1
                self.last_used = time.monotonic()

    def close_if_idle(self, idle_s: float) -> bool:
        """Close this federation when no run has used it for ``idle_s`` seconds; True if it is closed.
        An idle SuperLink and Ray cluster still take ~10 % of a core (SuperLink loops, Ray's
        agents), which the processes of a test session or a notebook should not pay for."""
        with self._lock:
            if not self.closed and self._busy == 0 and time.monotonic() - self.last_used >= idle_s:
                self.close()
            return self.closed

    def _run(self, run_config: Mapping[str, Any], num_supernodes: int, *, cpus: int, gpus: float,
             app_dir: Path | None, stop: threading.Event | None, echo: Callable[[str], None] | None,
             settled: Callable[[list[str]], str | None] | None) -> SimulationResult:
        app_dir = app_dir or self.staged()
        self.start()
        echo = echo or (lambda line: print(line, flush=True))
        run_config = dict(run_config)
        self._runs += 1
        config_file = write_run_config(run_config, self.flwr_home / f"run-config-{self._runs}.toml")
        federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus} "
                      f"client-resources-num-gpus={gpus}")
        cmd = ["flwr", "run", str(app_dir), "local", "--format", "json", "--federation-config", federation,
               "--run-config", str(config_file)]
        started = time.monotonic()
        run_id, why, rc = start_run(cmd, self.env, cwd=app_dir, timeout=300)
        if run_id is None:
            raise SimulationError(f"flwr run exited with code {rc} before starting a run: {why} "
                                  f"(SuperLink log: {self.flwr_home / 'local-superlink' / 'superlink.log'})")
        lines: list[str] = []
        # its own session: a Ctrl-C meant for the caller must not end the log stream
        proc = subprocess.Popen(log_command(run_id, "local"), env=self.env, cwd=app_dir, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, bufsize=1, start_new_session=True)
        done = threading.Event()
        heard = [time.monotonic()]   # when the stream last gave a line
        watcher = threading.Thread(target=self._watch, args=(run_id, run_config, stop, proc, done, lambda: heard[0]),
                                   daemon=True)
        watcher.start()
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                heard[0] = time.monotonic()
                line = line.rstrip("\n")
                if _FLOWER_INFO.match(line) or line.startswith("Using SuperLink") or _NOISE in line:
                    continue
                lines.append(line)
                echo(line)
            proc.wait()
        except KeyboardInterrupt:   # a second Ctrl-C: stop the run now
            self._flwr(["flwr", "stop", run_id, "local"])
            raise
        finally:
            done.set()
            if proc.poll() is None:
                proc.kill()
        status = settled(lines) if settled is not None and proc.returncode == 0 else None
        if status is None:
            status = final_status(run_id, self.env, "local", settle=30.0)
        return SimulationResult(run_id=run_id, status=status, seconds=time.monotonic() - started, log=lines)

    #: a log stream silent this long gets its run's status asked (a ``flwr ls``: a CLI start, ~1.5 s
    #: of CPU), then again every as long; it is ended ``OUTLIVE_S`` after the status was first final
    QUIET_S = 10.0
    OUTLIVE_S = 20.0

    def _watch(self, run_id: str, run_config: Mapping[str, Any], stop: threading.Event | None,
               proc: subprocess.Popen, done: threading.Event, heard: Callable[[], float]) -> None:
        """Forward a stop request; end a log stream that outlives its run (bounded). The stream
        normally ends with the run; the status is only asked while it is silent (``heard()``: when
        it last gave a line), so a run that keeps logging costs no ``flwr ls`` calls (it cost one
        every 10 s of every run before)."""
        asked = False
        checked, finished_at = time.monotonic(), None
        while not done.wait(0.25):
            if stop is not None and stop.is_set() and not asked:
                request_stop(run_config.get("output-dir") or "fedgan-output", run_id)
                asked = True
            if proc.poll() is not None:
                return
            now = time.monotonic()
            if now - heard() > self.QUIET_S and now - checked > self.QUIET_S:
                from app.launch import run_status

                checked = now
                if run_status(run_id, self.env).startswith("finished"):
                    finished_at = finished_at or checked
                    if checked - finished_at >= self.OUTLIVE_S:
                        proc.kill()
                        return

    def healthy(self) -> bool:
        return superlink_healthy(f"127.0.0.1:{self.port}")

    def start(self, timeout: float = 120.0) -> None:
        """Start the SuperLink unless it is up: Flower's managed local SuperLink, started the way
        ``flwr run`` starts it (flwr/cli/local_superlink.py) but by this process, so that it is
        this federation's (its Ray cluster's address in its environment, a watchdog on it);
        ``flwr run`` then finds it on the local port and uses it."""
        if self.healthy():
            return
        ray = self._start_ray()
        home = self.flwr_home / "local-superlink"
        home.mkdir(parents=True, exist_ok=True)
        # through the warm launcher (app/warm.py, role "simulation"): each run's flwr-simulation process
        # (the ServerApp's) is forked from a parent that has torch, Ray and Flower imported
        cmd = [sys.executable, str(PROJECT / "app" / "warm.py"), "wrap", "simulation", "--insecure", "--simulation", "--isolation",
               "subprocess", "--control-api-address", f"127.0.0.1:{self.control_port}", "--host", "127.0.0.1", "--port", self.port,
               "--database", str(home / "state.db"), "--log-file", str(home / "superlink.log")]
        with open(home / "launcher.log", "ab") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)   # Ctrl-C in the caller's terminal must not reach it
        self._superlink = proc
        # a caller that dies without closing (SIGKILL, a crash) must not leave the SuperLink, its
        # ServerApp and Ray running: a watchdog outside both stops them when the caller is gone
        self._watchdog = subprocess.Popen([sys.executable, "-m", "app.simulation", "watchdog", str(os.getpid()),
                                           str(proc.pid), str(self.ray_dir), str(self.gcs_port or 0),
                                           self._tmp or ""],
                                          cwd=str(PROJECT), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                          stderr=subprocess.DEVNULL, start_new_session=True)
        if self._tmp is not None:   # the folder is in use while the caller, the SuperLink or the watchdog runs
            for pid in (proc.pid, self._watchdog.pid):
                add_owner(self._tmp, pid)
        deadline = time.monotonic() + timeout
        while not self.healthy():
            if proc.poll() is not None:
                raise SimulationError(f"the local SuperLink exited with code {proc.returncode} at start "
                                      f"(see {home / 'launcher.log'} and {home / 'superlink.log'})")
            if time.monotonic() > deadline:
                stop_process_tree([psutil.Process(proc.pid)])
                raise SimulationError(f"the local SuperLink did not answer within {timeout:.0f} s "
                                      f"(see {home / 'launcher.log'})")
            time.sleep(0.2)
        self._await_ray(ray)

    def _start_ray(self) -> subprocess.Popen | None:
        """One Ray cluster for all the federation's runs (``ray start --head``, ``ray_cpus`` CPUs,
        its files under the federation's folder): each run's simulation process connects to it
        (``RAY_ADDRESS``; Flower's backend calls ``ray.init`` without cluster arguments) instead of
        starting and stopping a cluster of its own, 3-4 s per run here. Its workers inherit this
        federation's environment (``OMP_NUM_THREADS``, ``FEDGAN_TRACE``)."""
        if "RAY_ADDRESS" in self.env:
            return None
        self.ray_dir.mkdir(parents=True, exist_ok=True)
        port = self.gcs_port = free_port()
        # every port from the OS, none of `ray start`'s fixed defaults (Ray Client server 10001,
        # dashboard 8265, dashboard agent 52365, workers from 10002 up): two clusters on one
        # machine (two scripts, a script beside a test run) would otherwise bind the same ones and
        # one run fails ("Failed to start the grpc server. The specified port is 10003")
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", "--port", str(port),
               "--num-cpus", str(self.ray_cpus), "--include-dashboard=false", "--disable-usage-stats",
               "--min-worker-port", "0", "--max-worker-port", "0",
               "--ray-client-server-port", str(free_port()), "--dashboard-port", str(free_port()),
               "--dashboard-agent-listen-port", str(free_port()), "--temp-dir", str(self.ray_dir)]
        with open(self.flwr_home / "ray-start.log", "wb") as log:
            proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    start_new_session=True)
        self.env["RAY_ADDRESS"] = f"127.0.0.1:{port}"   # the SuperLink starts meanwhile, with this in its environment
        return proc

    def _await_ray(self, proc: subprocess.Popen | None, timeout: float = 120.0) -> None:
        if proc is None:
            return
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            rc = "none (timed out)"
        if rc != 0:
            raise SimulationError(f"`ray start` exited with code {rc} (see {self.flwr_home / 'ray-start.log'})")

    def ray_processes(self) -> list[psutil.Process]:
        """The processes of this federation's Ray cluster: those whose command lines name its
        folder, and its Ray Client server, which names only the cluster's address (its GCS port)."""
        return ray_cluster_processes(str(self.ray_dir), self.gcs_port)

    def processes(self) -> list[psutil.Process]:
        """The SuperLink and every process under it (ServerApp, simulation, Ray): not descendants
        of the caller (the SuperLink runs detached), so memory measurements must add them."""
        out = {}
        for root in [*self._roots(), *self.ray_processes()]:
            out[root.pid] = root
            with contextlib.suppress(psutil.NoSuchProcess):
                out.update((p.pid, p) for p in root.children(recursive=True))
        return list(out.values())

    def _roots(self) -> list[psutil.Process]:
        """The SuperLink this federation started and any other on its port."""
        roots = superlinks_on(self.port)
        if self._superlink is not None and self._superlink.poll() is None:
            with contextlib.suppress(psutil.NoSuchProcess):
                roots.insert(0, psutil.Process(self._superlink.pid))
        return roots

    def _flwr(self, cmd: list[str]) -> None:
        with contextlib.suppress(Exception):
            subprocess.run(cmd, env=self.env, capture_output=True, timeout=30)

    def close(self) -> None:
        """Stop the SuperLink and every process under it (ServerApp, simulation, Ray)."""
        if self.closed:
            return
        self.closed = True
        self._stop_cli_calls()
        stop_process_tree(self._roots())
        stop_process_tree(self.ray_processes(), timeout=RAY_STOP_GRACE_S)
        for proc in (self._superlink, self._watchdog):
            if proc is not None:
                if proc is self._watchdog and proc.poll() is None:
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
        if self._tmp is not None:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def _stop_cli_calls(self) -> None:
        """Kill this process's ``flwr`` CLI calls for this federation still running (the stream
        watcher's ``flwr ls``): once the SuperLink is gone, a ``flwr`` command for the ``local``
        connection starts Flower's own managed SuperLink, which nobody would stop."""
        for child in psutil.Process().children(recursive=True):
            with contextlib.suppress(psutil.Error):
                if any(Path(arg).name == "flwr" for arg in child.cmdline()[:2]) and \
                        child.environ().get("FLWR_HOME") == str(self.flwr_home):
                    child.kill()

    def __enter__(self) -> "LocalFederation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def superlinks_on(port: str) -> list[psutil.Process]:
    from app.launch import superlink_pids

    out = []
    for pid in superlink_pids(port):
        with contextlib.suppress(psutil.NoSuchProcess):
            out.append(psutil.Process(pid))
    return out


#: How long a federation's Ray daemons get to end after SIGTERM before SIGKILL: Ray 2.x's
#: gcs_server and autoscaler monitor outlive a SIGTERM by more than 10 s (measured), and a
#: throwaway cluster whose files are deleted next has nothing to save, so every script's exit
#: waited those 10 s for nothing.
RAY_STOP_GRACE_S = 2.0


def ray_cluster_processes(ray_dir: str, gcs_port: int | None) -> list[psutil.Process]:
    """The processes of the Ray cluster whose files are under ``ray_dir`` (their command lines
    name it) and, when ``gcs_port`` is known, its Ray Client server, which ``ray start`` leaves
    detached with only ``--address=<ip>:<gcs port>`` on its command line; this process excluded."""
    server_arg = re.compile(rf"--address=\S+:{gcs_port}$") if gcs_port is not None else None
    out = []
    for p in psutil.process_iter(["cmdline"]):
        args = p.info.get("cmdline") or []
        if p.pid == os.getpid():
            continue
        if ray_dir in " ".join(args) or (server_arg is not None and "ray.util.client.server" in args
                                         and any(server_arg.match(a) for a in args)):
            out.append(p)
    return out


def stop_process_tree(roots: list[psutil.Process], timeout: float = 10.0) -> None:
    """SIGTERM ``roots`` and all their descendants, wait up to ``timeout`` s, then SIGKILL."""
    procs = list(roots)
    for root in roots:
        with contextlib.suppress(psutil.NoSuchProcess):
            procs += root.children(recursive=True)

    def alive() -> list[psutil.Process]:
        out = []
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                if p.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    out.append(p)
        return out

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for p in alive():
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        deadline = time.monotonic() + wait
        while alive() and time.monotonic() < deadline:
            time.sleep(0.1)
        if not alive():
            return


_SHARED: dict[str, LocalFederation] = {}


#: A shared federation no run has used for this long is closed (the next run starts a new one, ~3 s).
IDLE_CLOSE_S = 30.0
_SHARED_LOCK = threading.Lock()
_REAPER: threading.Thread | None = None


def shared_federation(env: Mapping[str, str] | None = None, ray_cpus: int | None = None) -> LocalFederation:
    """One :class:`LocalFederation` per distinct ``env`` and ``ray_cpus`` for this process, closed
    at exit or after :data:`IDLE_CLOSE_S` s without a run: the runs of a script (or a test
    session) share its SuperLink and Ray cluster instead of starting them each."""
    import atexit

    global _REAPER
    key = json.dumps([sorted((env or {}).items()), ray_cpus])
    with _SHARED_LOCK:
        fed = _SHARED.get(key)
        if fed is None or fed.closed:
            fed = _SHARED[key] = LocalFederation(env, ray_cpus=ray_cpus)
            if _REAPER is None:
                atexit.register(close_shared)
                _REAPER = threading.Thread(target=_reap_idle, name="fedgan-federation-reaper", daemon=True)
                _REAPER.start()
        fed.last_used = time.monotonic()   # handed out: not idle
    return fed


def _reap_idle(every: float = 5.0) -> None:
    while True:
        time.sleep(every)
        with _SHARED_LOCK:
            for key, fed in list(_SHARED.items()):
                if fed.close_if_idle(IDLE_CLOSE_S):
                    del _SHARED[key]


def shared_processes() -> list[psutil.Process]:
    """:meth:`LocalFederation.processes` of every shared federation of this process."""
    return [p for fed in _SHARED.values() if not fed.closed for p in fed.processes()]


def close_shared() -> None:
    with _SHARED_LOCK:
        for fed in list(_SHARED.values()):
            fed.close()
        _SHARED.clear()


def summary_status(folder: Path | None) -> str | None:
    """The final status, in ``flwr ls`` terms, that a run folder's summary.md records
    (:func:`app.server_app.last_status`): ``finished:completed`` for success, ``finished:failed``
    for failed; None otherwise (no summary, an interrupted run, one still running)."""
    from app.server_app import last_status   # here: the watchdog (python -m app.simulation) needs no torch

    status = last_status(folder) if folder is not None else None
    return {"success": "finished:completed", "failed": "finished:failed"}.get(status or "")


def summary_error(folder: Path | None) -> str | None:
    """The error line of a run folder's summary.md (None when there is none)."""
    if folder is None:
        return None
    try:
        text = (Path(folder) / "summary.md").read_text()
    except OSError:
        return None
    m = re.search(r"^- (?:error|stopped): `(.*)`$", text, re.M)
    return m.group(1) if m else None


__all__ = ["LocalFederation", "stage_app", "SimulationResult", "SimulationError", "shared_federation", "close_shared",
           "shared_processes",
           "request_stop", "stop_request_path", "watch_stop_requests", "absolute_paths", "write_run_config",
           "summary_error", "summary_status", "stop_process_tree", "watchdog", "PATH_KEYS", "STOP_REQUESTS"]

def watchdog(caller: int, root: int, marker: str = "", gcs_port: int = 0, scratch: str = "",
             every: float = 0.5) -> None:
    """Wait until process ``caller`` is gone, then stop process ``root`` and everything under it,
    and the Ray cluster whose command lines name ``marker`` (its folder) or, for its Ray Client
    server, its GCS port ``gcs_port`` (0: none) (:func:`ray_cluster_processes`;
    :meth:`LocalFederation.start` runs this in a process of its own), and remove the folder
    ``scratch`` (the federation's temporary FLWR_HOME; "": none); returns early when ``root``
    ends first."""
    try:
        top = psutil.Process(root)
    except psutil.NoSuchProcess:
        return
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    while alive(caller):
        if not top.is_running():
            return
        time.sleep(every)
    if top.is_running():
        stop_process_tree([top])
    if marker:
        stop_process_tree([p for p in ray_cluster_processes(marker, gcs_port or None) if p.pid != os.getpid()],
                          timeout=RAY_STOP_GRACE_S)
    if scratch:
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    if len(sys.argv) in (4, 5, 6, 7) and sys.argv[1] == "watchdog":
        watchdog(int(sys.argv[2]), int(sys.argv[3]), *sys.argv[4:5], *map(int, sys.argv[5:6]), *sys.argv[6:7])
    else:
        sys.exit("app/simulation.py is a library; run simulations/run.py")
