"""A real Flower deployment on one machine: a SuperLink and N SuperNodes on 127.0.0.1.

Every process is a real ``flower-superlink`` / ``flower-supernode`` (no simulation
engine), each with its own private data folder passed as
``--node-config "data-path='...'"``, optionally over TLS with certificates made here.
It is what ``docs/DEPLOYMENT.md`` describes, shrunk to loopback so it can be tried
(and tested) on a laptop.

Library use (the end-to-end tests do this)::

    folders = export_digits_folders(tmp / "data", 2)
    with Loopback(tmp / "lb", folders, tls=True) as lb:
        rc, output, run_id, status = lb.run("num-rounds=2 output-dir='/abs/out'")

Command line::

    python -m app.loopback start --nodes 2 [--tls] --dir /tmp/fedgan-loopback
    python -m app.loopback status --dir /tmp/fedgan-loopback
    python -m app.loopback stop --dir /tmp/fedgan-loopback

``start`` leaves the processes running (each in its own session / process group),
records them in ``DIR/pids.json`` and prints the ``flwr run`` command to use;
``stop`` ends exactly those process groups.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import ipaddress
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Sequence

import psutil

from app.launch import HelpFormatter, log_command, run_status, stage_app, start_run, superlink_healthy
from app.warm import sweep_launchers

PROJECT = Path(__file__).resolve().parent.parent

__all__ = ["Loopback", "LoopbackError", "export_digits_folders", "free_port", "make_tls", "bin_dir",
           "process_alive", "main"]


class LoopbackError(RuntimeError):
    """A loopback process did not start or did not become ready in time."""


# ---------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------

def bin_dir() -> Path:
    """The folder holding ``flwr``, ``flower-superlink`` and ``flower-supernode``.

    The interpreter's own ``bin/`` when it has them (the project's ``.venv``),
    else ``<project>/.venv/bin``.
    """
    here = Path(sys.executable).parent
    if (here / "flower-superlink").exists():
        return here
    return PROJECT / ".venv" / "bin"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def process_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (psutil: Linux, macOS, ...)."""
    try:
        return psutil.Process(int(pid)).status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:   # someone else's process: it exists
        return True


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _proc_table() -> dict[int, tuple[int, int]]:
    """pid -> (ppid, pgid) for every live (non-zombie) process, read through psutil."""
    table = {}
    for proc in psutil.process_iter(["ppid", "status"]):
        info = proc.info
        if info.get("status") in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD) or info.get("ppid") is None:
            continue
        pgid = _pgid(proc.pid)
        if pgid is not None:
            table[proc.pid] = (int(info["ppid"]), pgid)
    return table


def _descendants(roots: Iterable[int]) -> set[int]:
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), list(roots)
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _group_members(pgids: Iterable[int]) -> set[int]:
    wanted = set(pgids)
    return {pid for pid, (_, pgid) in _proc_table().items() if pgid in wanted}


def _cmdline(pid: int) -> str:
    """The process's arguments joined by spaces (``""`` when it is gone or not ours to read)."""
    try:
        return " ".join(psutil.Process(pid).cmdline())
    except (psutil.Error, OSError):
        return ""


def helpers_of(ports: Iterable[int]) -> set[int]:
    """Flower helper processes (SuperExec, ``flwr-serverapp``, ``flwr-clientapp``) that talk to a
    Runtime API on one of ``ports``. Flower starts some of them in their own session, so
    neither the process group nor (once a parent died) the parent links find them all."""
    marks = [f"--runtime-api-address 127.0.0.1:{int(p)} " for p in ports]
    found = set()
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info.get("status") in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        cmd = " ".join(proc.info.get("cmdline") or []) + " "
        if ("flower-" in cmd or "flwr" in cmd) and any(m in cmd for m in marks):
            found.add(proc.pid)
    return found


def send_signal(pids: Iterable[int], sig: int) -> None:
    """``sig`` to every process of ``pids`` that still exists (gone ones are skipped)."""
    for pid in pids:
        try:
            psutil.Process(pid).send_signal(sig)
        except (psutil.Error, ProcessLookupError, PermissionError):
            pass


def terminate(pgids: Sequence[int], pids: Iterable[int] = (), grace: float = 10.0) -> None:
    """SIGTERM the process groups, ``pids`` and their descendants, wait, then SIGKILL what is left."""
    targets = set(pids) | _group_members(pgids)
    targets |= _descendants(targets)

    def signal_all(sig: int) -> None:
        for pgid in pgids:
            try:
                os.killpg(pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        send_signal(targets, sig)

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(process_alive(p) for p in targets):
        time.sleep(0.2)
    targets |= _descendants(targets) | _group_members(pgids)   # anything spawned meanwhile
    if any(process_alive(p) for p in targets):
        signal_all(signal.SIGKILL)
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline and any(process_alive(p) for p in targets):
            time.sleep(0.1)


# ---------------------------------------------------------------------------
# data and certificates
# ---------------------------------------------------------------------------

def export_digits_folders(root: str | Path, num_nodes: int, classes_per_node: int = 2) -> list[Path]:
    """Write one folder-per-class PNG tree per node; node i gets classes {2i, 2i+1} mod 10.

    Images are scikit-learn's digits at 16x16, 1 channel (the default run's geometry),
    mapped from [-1, 1] to 0..255. Returns the node folders ``root/node<i>``.
    """
    import numpy as np
    import torch
    from PIL import Image

    from app.data import load_dataset

    data = load_dataset("digits", image_size=16)
    pixels = ((data.x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    labels = data.y.numpy()
    folders = []
    for i in range(num_nodes):
        node = Path(root) / f"node{i}"
        classes = sorted({(classes_per_node * i + k) % 10 for k in range(classes_per_node)})
        for c in classes:
            target = node / str(c)
            target.mkdir(parents=True, exist_ok=True)
            for j in np.flatnonzero(labels == c):
                Image.fromarray(pixels[j, 0], mode="L").save(target / f"{int(j):05d}.png")
        folders.append(node.resolve())
    return folders


def make_tls(directory: str | Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
             days: int = 30) -> dict[str, Path]:
    """A throwaway CA and a server certificate (SANs ``hosts``) signed by it.

    Returns ``{"ca": ca.crt, "cert": server.pem, "key": server.key}`` (absolute paths).
    For loopback and tests only: the CA key is written next to them.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc) - _dt.timedelta(minutes=5)
    until = now + _dt.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedgan loopback CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now).not_valid_after(until)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                            content_commitment=False, key_encipherment=False,
                                            data_encipherment=False, key_agreement=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .sign(ca_key, hashes.SHA256()))

    key = ec.generate_private_key(ec.SECP384R1())
    sans: list[x509.GeneralName] = []
    for h in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            sans.append(x509.DNSName(h))
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(until)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(ca_key, hashes.SHA256()))

    pem = serialization.Encoding.PEM
    paths = {"ca": out / "ca.crt", "cert": out / "server.pem", "key": out / "server.key",
             "ca_key": out / "ca.key"}
    paths["ca"].write_bytes(ca_cert.public_bytes(pem))
    paths["cert"].write_bytes(cert.public_bytes(pem))
    for name, k in (("key", key), ("ca_key", ca_key)):
        paths[name].write_bytes(k.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption()))
        paths[name].chmod(0o600)
    return paths


def make_node_key(directory: str | Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's authentication key pair, as ``ssh-keygen -t ecdsa -b 384 -N "" -f <name>``
    makes it (OpenSSH format): returns ``(private key, public key)``; register the public one with
    ``flwr supernode register <public> <connection>`` and start the node with
    ``--auth-supernode-private-key <private>``."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    out = Path(directory).resolve()
    out.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = out / name, out / f"{name}.pub"
    private.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                          serialization.NoEncryption()))
    private.chmod(0o600)
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH) + b"\n")
    return private, public


# ---------------------------------------------------------------------------
# the deployment
# ---------------------------------------------------------------------------

class Loopback:
    """A SuperLink and SuperNodes on 127.0.0.1, all started and stopped by this object.

    ``data_paths``: one entry per SuperNode, its ``data-path`` (a folder that may not
    exist, to test a broken node). Use as a context manager; :meth:`stop` always runs.
    """

    def __init__(self, directory: str | Path, data_paths: Sequence[str | Path], *, tls: bool = False,
                 name: str = "loopback", port: int | None = None, project: str | Path = PROJECT,
                 ready_timeout: float = 90.0, certs: dict[str, str | Path] | None = None,
                 warm: bool = True, auth: bool = False):
        self.dir = Path(directory).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data_paths = [str(Path(p).resolve()) for p in data_paths]
        self.tls = tls
        self.name = name
        self.port = int(port or free_port())
        self.project = Path(project).resolve()
        self.ready_timeout = ready_timeout
        # warm: `fedgan-superlink` / `fedgan-supernode` (app/warm.py: ServerApps and ClientApps forked
        # from a warm parent, SuperExec polling every 0.05 s); False: plain Flower programs (cold starts)
        self.warm = warm
        # auth: the SuperLink admits only SuperNodes whose public key was registered (needs TLS)
        if auth and not tls:
            raise LoopbackError("SuperNode authentication needs TLS: Loopback(..., tls=True, auth=True)")
        self.auth = auth
        self.flwr_home = self.dir / "flwr_home"
        # TLS material: {"ca", "cert", "key"} paths; made by make_tls() at start unless given
        self.certs: dict[str, Path] = {k: Path(v).resolve() for k, v in (certs or {}).items()}
        self.superlink: subprocess.Popen | None = None
        self.supernodes: list[subprocess.Popen] = []
        self.node_logs: list[Path] = []
        self.node_ports: list[int] = []
        self._pgids: list[int] = []     # every process group this object created
        # the slim copy of the project that every run() stages again and submits (app.launch.stage_app):
        # `flwr run <project>` would first walk every file under it, .venv included (5-10 s per run here)
        self.app_dir = self.dir / "app"

    # --- environment -----------------------------------------------------------------
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["FLWR_HOME"] = str(self.flwr_home)
        env["PATH"] = f"{bin_dir()}{os.pathsep}{env.get('PATH', '')}"
        env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
        env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
        env.setdefault("FLWR_TELEMETRY_ENABLED", "0")   # loopback is offline: no usage reports to send
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def write_connection(self) -> Path:
        """``$FLWR_HOME/config.toml`` with the ``[superlink.<name>]`` connection."""
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        lines = ["[superlink]", f'default = "{self.name}"', "", f"[superlink.{self.name}]",
                 f'address = "{self.address}"']
        lines.append(f'root-certificates = "{self.certs["ca"]}"' if self.tls else "insecure = true")
        path = self.flwr_home / "config.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    def _spawn(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
        with open(log, "ab") as fh:
            proc = subprocess.Popen(cmd, env=env or self.env(), cwd=self.dir, stdin=subprocess.DEVNULL,
                                    stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
        self._pgids.append(proc.pid)   # a new session: pgid == pid
        return proc

    # --- start -------------------------------------------------------------------------
    def start(self) -> "Loopback":
        try:
            if self.tls and not self.certs:
                self.certs = make_tls(self.dir / "certs")
            self.write_connection()
            self.start_superlink()
            for path in self.data_paths:
                self.add_supernode(path)
        except BaseException:
            self.stop()
            raise
        return self

    def start_superlink(self) -> None:
        launcher = "fedgan-superlink" if self.warm else "flower-superlink"   # warm: ServerApps forked too
        cmd = [str(bin_dir() / launcher), "--host", "127.0.0.1", "--port", str(self.port),
               "--disable-runtime-dependency-installation", "--database", str(self.dir / "superlink.db")]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs["ca"]), "--ssl-certfile", str(self.certs["cert"]),
                    "--ssl-keyfile", str(self.certs["key"])]
        else:
            cmd += ["--insecure"]
        if self.auth:
            cmd += ["--enable-supernode-auth"]
        self.superlink = self._spawn(cmd, self.dir / "superlink.log")
        self.wait_ready()

    def healthy(self) -> bool:
        """The SuperLink answers ``GET /health`` (over TLS, verified against the deployment's CA)."""
        return superlink_healthy(self.address, self.certs["ca"] if self.tls else None)

    def wait_ready(self) -> None:
        """Bounded wait until the SuperLink answers its health check (:meth:`healthy`; a ``flwr
        ls`` poll would start the CLI each time, ~1.5 s)."""
        deadline = time.monotonic() + self.ready_timeout
        while not self.healthy():
            self._check_alive(self.superlink, "SuperLink", self.dir / "superlink.log")
            if time.monotonic() > deadline:
                raise LoopbackError(f"SuperLink on {self.address} did not answer its health check within "
                                    f"{self.ready_timeout:.0f} s (see {self.dir / 'superlink.log'})")
            time.sleep(0.2)

    @staticmethod
    def _check_alive(proc: subprocess.Popen | None, what: str, log: Path) -> None:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise LoopbackError(f"{what} exited with code {proc.returncode}:\n{tail}")

    def add_supernode(self, data_path: str | Path | None, *, trust_ca: bool = True,
                      partition_id: int | None = None, num_partitions: int | None = None,
                      extra_args: Sequence[str] = (), extra_config: str = "",
                      auth_key: str | Path | None = None) -> int:
        """Start one more SuperNode; returns its index. ``trust_ca=False`` (TLS only) starts it
        without ``--root-certificates`` and without ``--insecure``, i.e. it cannot verify the
        SuperLink's certificate. ``extra_config``: more ``--node-config`` entries, e.g.
        ``"role='generator'"`` (BPGAN). ``auth_key``: the node's private key (:func:`make_node_key`)."""
        i = len(self.supernodes)
        node_dir = self.dir / f"supernode{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        pid = i if partition_id is None else partition_id
        n = max(len(self.data_paths), i + 1) if num_partitions is None else num_partitions
        node_config = f"partition-id={pid} num-partitions={n}"
        if data_path is not None:
            node_config += f" data-path={json.dumps(str(data_path))}"
        # what the node trains itself (local's, MGGAN's, BPGAN's client generators) stays in
        # the device's own folder, as on a real device (app/generators.py)
        node_config += f" node-dir={json.dumps(str(node_dir / 'fedgan'))}"
        if extra_config:
            node_config += f" {extra_config}"
        port = free_port()
        self.node_ports.append(port)
        launcher = "fedgan-supernode" if self.warm else "flower-supernode"
        cmd = [str(bin_dir() / launcher), "--superlink", self.address, "--port", str(port),
               "--node-config", node_config]
        if not self.tls:
            cmd += ["--insecure"]
        elif trust_ca:
            cmd += ["--root-certificates", str(self.certs["ca"])]
        if auth_key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(auth_key).resolve())]
        cmd += list(extra_args)
        env = self.env()
        env["FLWR_HOME"] = str(node_dir / "flwr_home")   # each device has its own Flower home
        log = node_dir / "supernode.log"
        self.supernodes.append(self._spawn(cmd, log, env))
        self.node_logs.append(log)
        return i

    # --- use -----------------------------------------------------------------------------
    def flwr(self, args: Sequence[str], timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``flwr <args>`` with this deployment's FLWR_HOME."""
        try:
            return subprocess.run([str(bin_dir() / "flwr"), *args], env=self.env(), cwd=self.project,
                                  capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            return subprocess.CompletedProcess(exc.cmd, 124, str(exc.stdout or ""), f"timed out after {timeout} s")

    def run_command(self, run_config: str, output_format: str = "stream", app: Path | None = None) -> list[str]:
        """``flwr run <app> <name> ...`` (``app``: default the project): ``--stream`` (a person's
        command, logs shown) or, with ``output_format="json"``, ``--format json`` (the run id
        read from its JSON)."""
        cmd = [str(bin_dir() / "flwr"), "run", str(app or self.project), self.name]
        cmd += ["--format", "json"] if output_format == "json" else ["--stream"]
        if run_config:
            cmd += ["--run-config", run_config]
        return cmd

    def run(self, run_config: str, timeout: float = 600,
            on_line: Callable[[str], None] | None = None) -> tuple[int, str, str | None, str]:
        """``flwr run <app> <name> --format json --run-config ...`` (``app_dir``) for the run id, then
        ``flwr log <run-id> <name> --stream`` until the run ends; returns
        ``(returncode, output, run_id, status)`` with the status read back by ``flwr ls``
        (e.g. ``finished:completed``). ``on_line`` sees every log line as it arrives."""
        deadline = time.monotonic() + timeout
        cmd = self.run_command(run_config, "json", stage_app(self.app_dir, source=self.project))
        run_id, why, rc = start_run(cmd, self.env(), cwd=self.project, timeout=max(1.0, min(120.0, timeout)))
        if run_id is None:
            return rc or 1, f"[loopback] flwr run started no run (exit code {rc}): {why}\n", None, "no run"
        follow = [str(bin_dir() / "flwr"), *log_command(run_id, self.name)[1:]]
        proc = subprocess.Popen(follow, env=self.env(), cwd=self.project,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                                start_new_session=True)
        lines: list[str] = [f"[loopback] started run {run_id}\n"]

        def pump() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                lines.append(line)
                if on_line is not None:
                    try:
                        on_line(line)
                    except Exception as exc:  # a callback's bug must not hang the run
                        lines.append(f"[loopback] on_line raised {exc!r}\n")

        reader = threading.Thread(target=pump, daemon=True)
        reader.start()
        while proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.2)
        if proc.poll() is None:
            terminate([proc.pid], [proc.pid], grace=3)
            lines.append(f"[loopback] flwr log killed after {timeout:.0f} s\n")
        rc = proc.wait()
        reader.join(timeout=5)
        return rc, "".join(lines), run_id, self.status_of(run_id)

    def status_of(self, run_id: str, settle: float = 20.0) -> str:
        """The run's status by ``flwr ls``; waits up to ``settle`` s for it to be final."""
        deadline = time.monotonic() + settle
        while True:
            status = run_status(str(run_id), self.env(), self.name)
            if status.startswith("finished") or time.monotonic() > deadline:
                return status
            time.sleep(1.0)

    def register_node_key(self, public_key: str | Path) -> subprocess.CompletedProcess:
        """``flwr supernode register <public key> <name>``: admit the SuperNode holding its private key."""
        return self.flwr(["supernode", "register", str(Path(public_key).resolve()), self.name], timeout=60)

    def supernode_list(self) -> list[dict]:
        """What ``flwr supernode list <name> --format json`` reports (empty when it fails)."""
        out = self.flwr(["supernode", "list", self.name, "--format", "json"], timeout=60)
        try:
            data = json.loads(out.stdout)
        except ValueError:
            return []
        for key in ("nodes", "supernodes"):
            if isinstance(data.get(key), list):
                return data[key]
        return []

    def wait_nodes(self, n: int, timeout: float = 90.0) -> list[dict]:
        """Bounded wait until ``flwr supernode list`` shows ``n`` online nodes; returns them."""
        deadline = time.monotonic() + timeout
        while True:
            online = [x for x in self.supernode_list() if x.get("status") == "online"]
            if len(online) >= n or time.monotonic() > deadline:
                return online
            time.sleep(1.0)

    def node_id(self, i: int, timeout: float = 60.0) -> str | None:
        """SuperNode ``i``'s node id as it logs it (``SuperNode ID: <digits>``), or None."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.node_logs[i].read_text(errors="replace") if self.node_logs[i].exists() else ""
            if m := re.search(r"SuperNode ID: (\d+)", text):
                return m.group(1)
            if time.monotonic() > deadline or self.supernodes[i].poll() is not None:
                return None
            time.sleep(0.5)

    def node_processes(self, i: int) -> set[int]:
        """SuperNode ``i``, its process group, descendants and helpers, alive now."""
        lead = self.supernodes[i].pid
        found = ({lead} if process_alive(lead) else set()) | _group_members([lead]) | helpers_of([self.node_ports[i]])
        return found | _descendants(found)

    def kill_supernode(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to SuperNode ``i`` and everything it runs (as when a device dies)."""
        targets = self.node_processes(i)
        try:
            os.killpg(self.supernodes[i].pid, sig)
        except ProcessLookupError:
            pass
        send_signal(targets, sig)
        try:
            self.supernodes[i].wait(timeout=15 if sig == signal.SIGKILL else 60)
        except subprocess.TimeoutExpired:
            pass

    def stop_supernode(self, i: int, timeout: float = 60.0) -> None:
        """Stop SuperNode ``i`` as its operator would: one SIGTERM to the SuperNode (its wrapper
        passes it on), so it deregisters from the SuperLink; whatever is left after ``timeout``
        seconds is killed."""
        proc = self.supernodes[i]
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
        left = self.node_processes(i)
        if left or proc.poll() is None:
            self.kill_supernode(i, signal.SIGKILL)

    def pids(self) -> list[int]:
        """Every process this object started (group leaders)."""
        return list(self._pgids)

    def ports(self) -> list[int]:
        return [self.port, *self.node_ports]

    def all_pids(self) -> set[int]:
        """Every live process of this deployment: group leaders, their groups, descendants and
        Flower helpers (SuperExec, ServerApp, ClientApps) attached to its ports."""
        found = set(p for p in self._pgids if process_alive(p)) | _group_members(self._pgids)
        found |= helpers_of(self.ports())
        return found | _descendants(found)

    def record(self) -> dict:
        return {
            "dir": str(self.dir), "connection": self.name, "address": self.address, "tls": self.tls,
            "flwr_home": str(self.flwr_home), "project": str(self.project),
            "superlink": {"pid": self.superlink.pid if self.superlink else None, "log": str(self.dir / "superlink.log")},
            "supernodes": [{"pid": p.pid, "data_path": self.data_paths[i] if i < len(self.data_paths) else None,
                            "log": str(self.node_logs[i])} for i, p in enumerate(self.supernodes)],
            "pgids": list(self._pgids), "ports": self.ports(),
            "ca": str(self.certs["ca"]) if self.certs else None,
        }

    # --- stop ------------------------------------------------------------------------------
    def stop(self, grace: float = 10.0) -> None:
        """End every process group this object started: SuperNodes first, then the SuperLink."""
        leaders = [p.pid for p in self.supernodes]
        if leaders:
            terminate(leaders, set(leaders) | helpers_of(self.node_ports), grace=grace)
        if self.superlink is not None:
            terminate([self.superlink.pid], {self.superlink.pid} | helpers_of([self.port]), grace=grace)
        rest = self.all_pids()   # whatever is left (e.g. a flwr run killed on timeout, orphans)
        if rest:
            terminate([g for g in self._pgids if _group_members([g])], rest, grace=2.0)
        for proc in [*self.supernodes, *([self.superlink] if self.superlink else [])]:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        sweep_launchers()   # the temporary folders (socket, shims) of warm launchers that were killed

    def __enter__(self) -> "Loopback":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------

def _load_record(directory: Path) -> dict:
    path = directory / "pids.json"
    if not path.exists():
        raise SystemExit(f"no {path}: nothing was started there (or it was already stopped)")
    return json.loads(path.read_text())


def _ours(pgid: int) -> bool:
    """The process group still holds a Flower process (guards against recycled pids)."""
    return any("flower-" in _cmdline(p) or "flwr" in _cmdline(p) for p in _group_members([pgid]))


def _cmd_start(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    if (directory / "pids.json").exists():
        rec = json.loads((directory / "pids.json").read_text())
        if any(_ours(g) for g in rec.get("pgids", [])):
            print(f"a loopback deployment is already running from {directory}; stop it first:\n"
                  f"  python -m app.loopback stop --dir {directory}")
            return 1
    data = Path(args.data).resolve() if args.data else directory / "data"
    folders = [data / f"node{i}" for i in range(args.nodes)]
    if not all(f.is_dir() for f in folders):
        folders = export_digits_folders(data, args.nodes)
    lb = Loopback(directory, folders, tls=args.tls, name=args.name, port=args.port, warm=not args.plain)
    lb.start()
    rec = lb.record()
    (directory / "pids.json").write_text(json.dumps(rec, indent=2) + "\n")
    out = directory / "out"
    run_config = (f"num-rounds=3 teacher-steps=200 steps-per-round=8 min-nodes={args.nodes} "
                  f"output-dir={json.dumps(str(out))}")
    cmd = " ".join(shlex.quote(c) for c in lb.run_command(run_config)).replace(str(bin_dir()) + "/", "")
    print(f"SuperLink on {lb.address} ({'TLS' if args.tls else 'insecure'}), {args.nodes} SuperNodes "
          f"({'flower-supernode' if args.plain else 'fedgan-supernode: warm ClientApps'}), "
          f"each with its own data folder under {data}")
    print(f"connection: {lb.name} (in {lb.flwr_home / 'config.toml'})")
    print(f"logs and pids: {directory}/pids.json, superlink.log, supernode<i>/supernode.log\n")
    print("try a run (SuperNodes may need a few seconds to register):")
    print(f"  export FLWR_HOME={shlex.quote(str(lb.flwr_home))} PATH={shlex.quote(str(bin_dir()))}:$PATH")
    print(f"  {cmd}")
    print(f"  flwr ls {lb.name}")
    print("or the same run, submitted 5-10 s sooner (a slim copy of the app instead of the project folder, "
          "whose .venv flwr run would walk), with an exit code that is the run's status:")
    print(f"  fedgan-run --connection {lb.name} --run-config {shlex.quote(run_config)}")
    print(f"\nstop everything:\n  {shlex.quote(sys.executable)} -m app.loopback stop --dir {shlex.quote(str(directory))}")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    rec = _load_record(directory)
    print(f"connection {rec['connection']} -> {rec['address']} ({'TLS' if rec['tls'] else 'insecure'}); "
          f"FLWR_HOME={rec['flwr_home']}")
    up = 0
    entries = [("superlink", rec["superlink"]["pid"])] + [(f"supernode{i}", n["pid"])
                                                           for i, n in enumerate(rec["supernodes"])]
    for what, pid in entries:
        alive = pid is not None and process_alive(pid) and _ours(pid)
        up += alive
        print(f"  {what:<12} pid {pid}: {'running' if alive else 'gone'}")
    return 0 if up == len(entries) else 1


def _cmd_stop(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    rec = _load_record(directory)
    pgids = [g for g in rec.get("pgids", []) if _ours(g)]
    ports = rec.get("ports", [])
    # SuperNodes before the SuperLink, so they deregister instead of retrying
    link = rec["superlink"]["pid"]
    nodes = [g for g in pgids if g != link]
    if nodes:
        terminate(nodes, set(nodes) | helpers_of(ports[1:]))
    terminate([link] if link in pgids else [], ({link} if link in pgids else set()) | helpers_of(ports[:1]))
    left = [g for g in rec.get("pgids", []) if _group_members([g])] + sorted(helpers_of(ports))
    sweep_launchers()   # folders of warm launchers that were killed
    (directory / "pids.json").rename(directory / "pids.stopped.json")
    print(f"stopped {len(pgids)} process group(s)" + (f"; still present: {left}" if left else ""))
    return 0 if not left else 1


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m app.loopback", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("start", help="start a SuperLink and SuperNodes in the background",
                       formatter_class=HelpFormatter)
    s.add_argument("--nodes", type=int, default=2, help="SuperNodes to start, each with its own data folder")
    s.add_argument("--tls", action="store_true", help="TLS with a throwaway CA made in DIR/certs")
    s.add_argument("--dir", required=True, help="where logs, state, certificates and pids.json go")
    s.add_argument("--data", default="", help="folder with node<i>/ data trees (default DIR/data, made from digits)")
    s.add_argument("--name", default="loopback", help="connection name in FLWR_HOME/config.toml")
    s.add_argument("--port", type=int, default=0, help="SuperLink port (default: a free one)")
    s.add_argument("--plain", action="store_true",
                   help="start plain flower-supernode processes (a cold ClientApp process per message) "
                        "instead of fedgan-supernode")
    for name, helptext in (("status", "show whether the recorded processes run"),
                           ("stop", "stop the recorded process groups")):
        q = sub.add_parser(name, help=helptext, formatter_class=HelpFormatter)
        q.add_argument("--dir", required=True, help="the folder given to start (holds pids.json)")
    args = p.parse_args(argv)
    return {"start": _cmd_start, "status": _cmd_status, "stop": _cmd_stop}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
