"""``fedgan-supernode`` and ``fedgan-superlink``: Flower's SuperNode and SuperLink whose app
processes start warm.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process, and
every run on a SuperLink in a fresh ``flwr-serverapp`` process (each launched by name from ``PATH``
by the SuperExec the SuperNode / SuperLink starts; Flower's own warm executor pools exist only for
the Kubernetes executor and for AgentApp/model/connector tasks -- flwr/supercore/superexec/
executor/factory.py). Such a process spends ~3-5 s importing Python, Flower and torch (and
``torch._dynamo`` at the first optimizer) before it does any work: most of a loopback round.

These wrappers keep that start-up off the critical path without changing what runs:

* a **warm parent** imports the heavy third-party modules once (torch, numpy, Flower's app
  runtime and everything the app's ClientApp / ServerApp module pulls in), then forgets the
  project's own modules so that every run still loads its code from its own FAB;
* a tiny **shim** named like Flower's program (stdlib only, ``python -S``) is put first on the
  wrapped process's ``PATH``; each time the SuperExec starts it, it asks the warm parent to
  ``fork()`` a child that runs Flower's own entry point with the same arguments (token, Runtime
  API address, parent pid) and exits with the child's exit code. If the warm parent is not
  reachable the shim ``exec``s the real program: a cold start, never a failure;
* the SuperExec polls for new tasks every 0.05 s instead of its default 1 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, read by flwr/supercore/superexec/run_superexec.py).

Usage: exactly ``flower-supernode``'s / ``flower-superlink``'s arguments, e.g.
``fedgan-supernode --insecure --superlink 127.0.0.1:9092 --node-config "partition-id=0"``.
``FEDGAN_COLD_START=1`` runs the plain Flower program (for comparison).

This file is also the warm parent's program (``python warm.py serve <role> <socket>``): it must
not import the project's packages at module level (they would shadow the run's FAB).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

PROJECT_PACKAGES = ("app", "models", "strategies", "simulations")   # pyproject [tool.setuptools]
# torch._dynamo: torch.optim imports it lazily at the first optimizer (5.6 s here, profiled);
# the app module pulls in the rest (PIL, sklearn, torchmetrics, opacus, matplotlib...)
_COMMON = ("torch", "torch._dynamo", "numpy", "httpx", "httpcore", "h11")
# the ServerApp draws its plots at the end of every run (app/runs.py imports matplotlib lazily):
# importing it and loading its font list cost ~0.9 s per run, measured
_PLOTS = ("matplotlib.figure", "matplotlib.backends.backend_agg")
ROLES = {   # role: (the wrapped Flower program, the app program it launches, its entry point, preload)
    "supernode": ("flower-supernode", "flwr-clientapp", "flwr.supernode.cli.flwr_clientapp:flwr_clientapp",
                  (*_COMMON, "flwr.supernode.runtime.run_clientapp", "app.client_app")),
    "superlink": ("flower-superlink", "flwr-serverapp", "flwr.superlink.cli.flwr_serverapp:flwr_serverapp",
                  (*_COMMON, *_PLOTS, "flwr.superlink.cli.flwr_serverapp", "app.server_app")),
    # the Simulation Engine's SuperLink (app/simulation.py): one flwr-simulation process per run,
    # which runs the ServerApp and drives the Ray actors of the virtual clients
    "simulation": ("flower-superlink", "flwr-simulation", "flwr.simulation.app:flwr_simulation",
                   (*_COMMON, *_PLOTS, "ray", "flwr.simulation.app", "app.server_app")),
}
PRELOAD = ROLES["supernode"][3]
ENTRY = ROLES["supernode"][2]
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
POLL_SECONDS = "0.05"
SOCKET_ENV = "FEDGAN_WARM_SOCKET"
COLD_ENV = "FEDGAN_COLD_START"
FORKED_AT_ENV = "FEDGAN_FORKED_AT"
READY_TIMEOUT = 120.0

SHIM = """#!{python} -S
# fedgan-supernode / fedgan-superlink: runs Flower's {command} in a child forked from a warm
# parent (app/warm.py); waits while that parent is still starting (importing), and falls back to
# the real {command} when the parent is gone or was not ready within {wait:.0f} s.
import os, socket, sys, time
REAL = {real!r}
SOCK = {sock!r}
PARENT = {parent!r}
deadline = time.monotonic() + {wait!r}
while True:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(SOCK)
        break
    except OSError:
        s.close()
    starting = PARENT > 0 and not os.path.exists(SOCK) and time.monotonic() < deadline
    if starting:
        try:
            os.kill(PARENT, 0)
        except OSError:
            starting = False
    if not starting:
        os.execv(REAL, [REAL] + sys.argv[1:])
    time.sleep(0.05)
s.sendall(("\\0".join(sys.argv[1:]) + "\\n").encode())
data = b""
while True:
    chunk = s.recv(64)
    if not chunk:
        break
    data += chunk
try:
    sys.exit(int(data.decode().strip() or "1"))
except ValueError:
    sys.exit(1)
"""


# --- scratch folders that outlive a killed owner ---------------------------------------------------
OWNERS_FILE = ".owners"   # one "<pid> <create time>" line per process the folder serves


def _start_time(pid: int) -> float | None:
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def add_owner(directory: str | os.PathLike, pid: int) -> None:
    """Record process ``pid`` as one the scratch folder ``directory`` serves (see :func:`owned_tempdir`)."""
    with open(os.path.join(directory, OWNERS_FILE), "a") as f:
        f.write(f"{pid} {_start_time(pid)!r}\n")


def _owners_alive(directory: str) -> bool:
    """Whether any process recorded in ``directory``'s owners file still runs; True when the file
    cannot be read (a folder made some other way, or being made right now: not ours to judge)."""
    try:
        with open(os.path.join(directory, OWNERS_FILE)) as f:
            lines = f.read().split("\n")
    except OSError:
        return True
    try:
        owners = [(int(pid), started) for pid, started in (line.split() for line in lines if line.strip())]
    except ValueError:   # a line torn by a crash while it was written: leave the folder alone
        return True
    if not owners:
        return True
    for pid, started in owners:
        now = _start_time(pid)
        if now is not None and repr(now) == started:   # the same process, not a reused pid
            return True
    return False


def sweep_stale(prefix: str, root: str | None = None) -> list[str]:
    """Remove the folders ``<root>/<prefix>*`` (root: the temporary folder) whose owners have all
    ended: what a SIGKILLed SuperNode wrapper or simulation launcher could not remove itself (its
    socket and shims; a federation's FLWR_HOME with its Ray session, ~5 MB). Returns those removed."""
    root = root or tempfile.gettempdir()
    removed = []
    try:
        names = [n for n in os.listdir(root) if n.startswith(prefix)]
    except OSError:
        return removed
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path) and not os.path.islink(path) and not _owners_alive(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                removed.append(path)
    return removed


def sweep_launchers() -> list[str]:
    """:func:`sweep_stale` for the folders of every warm launcher role (``fedgan-<role>-*``)."""
    return [path for role in ROLES for path in sweep_stale(f"fedgan-{role}-")]


def owned_tempdir(prefix: str) -> str:
    """``tempfile.mkdtemp(prefix=prefix)`` owned by this process (:func:`add_owner`), after removing
    the folders of the same prefix left by owners that were killed (:func:`sweep_stale`)."""
    sweep_stale(prefix)
    directory = tempfile.mkdtemp(prefix=prefix)
    add_owner(directory, os.getpid())
    return directory


# --- the warm parent ----------------------------------------------------------------------------
def preload(modules=PRELOAD, purge=PROJECT_PACKAGES) -> list[str]:
    """Import ``modules``, then drop the project's own modules from ``sys.modules`` (third-party
    modules stay loaded), so a child loads the project from the run's FAB as a cold process would.
    Returns the names it dropped."""
    import importlib

    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as exc:   # a missing optional module only costs warmth
            print(f"[fedgan warm launcher] could not preload {name}: {exc}", file=sys.stderr, flush=True)
    dropped = [m for m in list(sys.modules) if m.split(".")[0] in purge]
    for m in dropped:
        del sys.modules[m]
    return dropped


def _run_child(conn: socket.socket, entry: str, program: str) -> None:
    """In the forked child: run ``entry`` with the shim's arguments (``sys.argv[0]`` the name of
    Flower's ``program``, which Flower reads, e.g. for its exit events); report its exit code."""
    code = 1
    os.environ[FORKED_AT_ENV] = repr(time.time())   # the timing trace's "process start" (app/client_app.py)
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = conn.recv(65536)
            if not chunk:
                os._exit(1)
            buf += chunk
        text = buf[:-1].decode()
        args = text.split("\0") if text else []
        try:   # numpy's global generator is not reseeded by fork (Python's `random` is)
            import numpy as np
            np.random.seed(int.from_bytes(os.urandom(4), "little"))
        except ImportError:
            pass
        module, _, func = entry.partition(":")
        import importlib
        fn = getattr(importlib.import_module(module), func)
        sys.argv = [program, *args]
        try:
            fn()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:   # noqa: BLE001 -- report anything as a failed task, never hang the shim
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
            conn.sendall(f"{code}\n".encode())
            conn.close()
        finally:
            os._exit(code)


def serve(sock_path: str, entry: str = ENTRY, modules=PRELOAD, program: str = ROLES["supernode"][1]) -> None:
    """The warm parent: preload (the entry point's module too), then fork one child per shim
    connection, forever; each child runs ``entry`` as Flower's ``program``."""
    preload((*modules, entry.partition(":")[0]))
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    srv.bind(sock_path + ".tmp")
    os.replace(sock_path + ".tmp", sock_path)   # the socket appears only once it accepts
    srv.listen(64)
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)   # children are reaped by the kernel
    stop = {"now": False}

    def on_term(*_):
        stop["now"] = True
        srv.close()
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(f"[fedgan warm launcher] {entry.rpartition(':')[2]} parent ready on {sock_path} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    while not stop["now"]:
        try:
            conn, _ = srv.accept()
        except OSError:
            break
        pid = os.fork()
        if pid == 0:
            srv.close()
            _run_child(conn, entry, program)
        conn.close()


# --- the wrapper -----------------------------------------------------------------------------
def write_shim(directory: str, sock_path: str, real: str, python: str = sys.executable,
               command: str = "flwr-clientapp", parent: int = 0, wait: float = READY_TIMEOUT) -> str:
    """Write the shim named ``command`` into ``directory``. ``parent``: the warm parent's pid, for
    which the shim waits (up to ``wait`` s) while its socket does not exist yet (0: never wait)."""
    path = os.path.join(directory, command)
    with open(path, "w") as fh:
        fh.write(SHIM.format(python=python, real=real, sock=sock_path, command=command, parent=int(parent),
                             wait=float(wait)))
    os.chmod(path, 0o755)
    return path


def _real(command: str) -> str:
    here = os.path.dirname(os.path.abspath(sys.executable))
    path = os.path.join(here, command)
    return path if os.path.exists(path) else (shutil.which(command) or command)


def start_warm(directory: str, env: dict | None = None, role: str = "supernode",
               timeout: float = READY_TIMEOUT) -> tuple[subprocess.Popen, str]:
    """Start the warm parent and write the shim into ``directory``; returns (process, socket) at
    once: the parent imports for a few seconds while Flower's program starts, and an app process
    launched before it is ready waits for it in the shim (up to ``timeout`` s)."""
    command = ROLES[role][1]
    sock = os.path.join(directory, f"{command}.sock")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", role, sock],
                            stdin=subprocess.DEVNULL, env=env)
    write_shim(directory, sock, _real(command), command=command, parent=proc.pid, wait=timeout)
    return proc, sock


def main(argv: list[str] | None = None, role: str = "supernode") -> int:
    """Run Flower's SuperNode (``role="supernode"``) or SuperLink (``"superlink"``; ``"simulation"``
    for one started with ``--simulation``) with warm app processes."""
    args = list(sys.argv[1:] if argv is None else argv)
    wrapped, command = ROLES[role][0], ROLES[role][1]
    program = _real(wrapped)
    if not os.path.exists(program):
        print(f"fedgan-{role}: {wrapped} not found next to {sys.executable} or on PATH", file=sys.stderr)
        return 1
    if os.environ.get(COLD_ENV, "") not in ("", "0"):
        os.execv(program, [program, *args])
    if any(a in ("-h", "--help", "-V", "--version") for a in args):
        os.execv(program, [program, *args])
    directory = owned_tempdir(f"fedgan-{role}-")
    warm = node = None
    try:
        env = dict(os.environ)
        env["PATH"] = directory + os.pathsep + env.get("PATH", "")
        env.setdefault(POLL_ENV, POLL_SECONDS)
        env[SOCKET_ENV] = os.path.join(directory, f"{command}.sock")
        warm, _ = start_warm(directory, env, role)   # app processes see the environment Flower's program sees
        node = subprocess.Popen([program, *args], env=env)
        for proc in (warm, node):   # the folder is in use while any of the three runs
            if proc is not None:
                add_owner(directory, proc.pid)

        def forward(sig, _frame):
            if node.poll() is None:
                node.send_signal(sig)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        while node.poll() is None:
            # reap a warm parent that died (a zombie would look alive to the shims, which would
            # wait for it): from then on app processes start cold
            if warm is not None and warm.poll() is not None:
                print(f"fedgan-{role}: the warm {command} parent exited with code {warm.returncode}; "
                      f"{command} processes start cold", file=sys.stderr, flush=True)
                warm = None
            time.sleep(0.2)
        return node.returncode
    finally:
        for proc in (node, warm):   # the SuperNode first: it stops launching ClientApps
            _stop(proc)
        shutil.rmtree(directory, ignore_errors=True)


def _stop(proc: subprocess.Popen | None, grace: float = 10.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()


def supernode_main() -> int:
    """``fedgan-supernode``: ``flower-supernode`` with warm ClientApp processes."""
    return main(role="supernode")


def superlink_main() -> int:
    """``fedgan-superlink``: ``flower-superlink`` with warm ServerApp processes."""
    return main(role="superlink")


if __name__ == "__main__":
    # run as a script: never import this folder's modules as top-level names
    here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
    if len(sys.argv) >= 3 and sys.argv[1] == "wrap" and sys.argv[2] in ROLES:
        # ``python warm.py wrap <role> <Flower program's arguments>`` (app/simulation.py: role simulation)
        sys.exit(main(sys.argv[3:], role=sys.argv[2]))
    elif len(sys.argv) >= 4 and sys.argv[1] == "serve":
        _, _, role_, sock_, *entry_ = sys.argv
        serve(sock_, entry_[0] if entry_ else ROLES[role_][2], ROLES[role_][3], ROLES[role_][1])
    else:
        sys.exit(main())
