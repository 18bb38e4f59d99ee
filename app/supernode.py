"""``fedgan-supernode``: a Flower SuperNode whose ClientApps start warm.

Flower 1.42 runs every message a SuperNode receives in a fresh ``flwr-clientapp`` process
(the SuperNode's SuperExec launches it by name from ``PATH``; Flower's own warm executor
pools exist only for the Kubernetes executor and for AgentApp/model/connector tasks, not
for ClientApps -- flwr/supercore/superexec/executor/factory.py). That process spends ~3 s
importing Python, Flower and torch before it touches the message: most of a loopback round.

This wrapper keeps that start-up off the critical path without changing what runs:

* a **warm parent** imports the heavy third-party modules once (torch, numpy, Flower's
  ClientApp runtime and everything the app's ClientApp module pulls in), then forgets the
  project's own modules so that every run still loads its code from its own FAB;
* a tiny **``flwr-clientapp`` shim** (stdlib only, ``python -S``) is put first on the
  SuperNode's ``PATH``; for each message it asks the warm parent to ``fork()`` a child that
  runs Flower's own ``flwr-clientapp`` entry point with the same arguments (token, Runtime
  API address, parent pid), and exits with the child's exit code. If the warm parent is not
  reachable the shim ``exec``s the real ``flwr-clientapp``: a cold start, never a failure;
* the SuperExec polls the SuperNode for new tasks every 0.05 s instead of its default 1 s
  (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, read by flwr/supercore/superexec/run_superexec.py).

Usage: exactly ``flower-supernode``'s arguments, e.g.
``fedgan-supernode --insecure --superlink 127.0.0.1:9092 --node-config "partition-id=0"``.
``FEDGAN_COLD_START=1`` runs the plain ``flower-supernode`` (for comparison).

This file is also the warm parent's program (``python supernode.py serve ...``): it must not
import the project's packages at module level (they would shadow the run's FAB).
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
PRELOAD = ("torch", "torch._dynamo", "numpy", "httpx", "httpcore", "h11", "flwr.supernode.cli.flwr_clientapp",
           "flwr.supernode.runtime.run_clientapp", "app.client_app")   # the app module pulls in the rest (PIL, sklearn, torchmetrics, opacus...);
# torch._dynamo: torch.optim imports it lazily at the first optimizer, 5.6 s here (profiled)
ENTRY = "flwr.supernode.cli.flwr_clientapp:flwr_clientapp"           # what `flwr-clientapp` runs
POLL_ENV = "FLWR_SUPEREXEC_TASK_POLL_INTERVAL"
POLL_SECONDS = "0.05"
SOCKET_ENV = "FEDGAN_WARM_SOCKET"
COLD_ENV = "FEDGAN_COLD_START"
FORKED_AT_ENV = "FEDGAN_FORKED_AT"
READY_TIMEOUT = 120.0

SHIM = """#!{python} -S
# fedgan-supernode: runs Flower's flwr-clientapp in a child forked from a warm parent
# (app/supernode.py); falls back to the real flwr-clientapp when the parent is gone.
import os, socket, sys
REAL = {real!r}
try:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect({sock!r})
except OSError:
    os.execv(REAL, [REAL] + sys.argv[1:])
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
            print(f"[fedgan-supernode] could not preload {name}: {exc}", file=sys.stderr, flush=True)
    dropped = [m for m in list(sys.modules) if m.split(".")[0] in purge]
    for m in dropped:
        del sys.modules[m]
    return dropped


def _run_child(conn: socket.socket, entry: str) -> None:
    """In the forked child: run ``entry`` with the shim's arguments; report its exit code."""
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
        sys.argv = ["flwr-clientapp", *args]
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


def serve(sock_path: str, entry: str = ENTRY, modules=PRELOAD) -> None:
    """The warm parent: preload, then fork one child per shim connection, forever."""
    preload(modules)
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
    print(f"[fedgan-supernode] warm ClientApp parent ready on {sock_path} (pid {os.getpid()})",
          file=sys.stderr, flush=True)
    while not stop["now"]:
        try:
            conn, _ = srv.accept()
        except OSError:
            break
        pid = os.fork()
        if pid == 0:
            srv.close()
            _run_child(conn, entry)
        conn.close()


# --- the wrapper -----------------------------------------------------------------------------
def write_shim(directory: str, sock_path: str, real: str, python: str = sys.executable) -> str:
    path = os.path.join(directory, "flwr-clientapp")
    with open(path, "w") as fh:
        fh.write(SHIM.format(python=python, real=real, sock=sock_path))
    os.chmod(path, 0o755)
    return path


def _real(command: str) -> str:
    here = os.path.dirname(os.path.abspath(sys.executable))
    path = os.path.join(here, command)
    return path if os.path.exists(path) else (shutil.which(command) or command)


def start_warm(directory: str, env: dict | None = None,
               timeout: float = READY_TIMEOUT) -> tuple[subprocess.Popen, str]:
    """Start the warm parent and write the shim into ``directory``; returns (process, socket)."""
    sock = os.path.join(directory, "clientapp.sock")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "serve", sock],
                            stdin=subprocess.DEVNULL, env=env)
    deadline = time.monotonic() + timeout
    while not os.path.exists(sock):
        if proc.poll() is not None:
            raise RuntimeError(f"the warm ClientApp parent exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the warm ClientApp parent was not ready within {timeout:.0f} s")
        time.sleep(0.05)
    write_shim(directory, sock, _real("flwr-clientapp"))
    return proc, sock


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    supernode = _real("flower-supernode")
    if os.environ.get(COLD_ENV, "") not in ("", "0"):
        os.execv(supernode, [supernode, *args])
    if any(a in ("-h", "--help", "-V", "--version") for a in args):
        os.execv(supernode, [supernode, *args])
    directory = tempfile.mkdtemp(prefix="fedgan-supernode-")
    warm = node = None
    try:
        env = dict(os.environ)
        env["PATH"] = directory + os.pathsep + env.get("PATH", "")
        env.setdefault(POLL_ENV, POLL_SECONDS)
        env[SOCKET_ENV] = os.path.join(directory, "clientapp.sock")
        warm, _ = start_warm(directory, env)   # ClientApps see the environment the SuperNode sees
        node = subprocess.Popen([supernode, *args], env=env)

        def forward(sig, _frame):
            if node.poll() is None:
                node.send_signal(sig)
        signal.signal(signal.SIGTERM, forward)
        signal.signal(signal.SIGINT, forward)
        return node.wait()
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


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "serve":
        # run as a script: never import this folder's modules as top-level names
        here = os.path.dirname(os.path.abspath(__file__))
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != here]
        serve(sys.argv[2], *(sys.argv[3:4]))
    else:
        sys.exit(main())
