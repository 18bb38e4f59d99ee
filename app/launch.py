"""``fedgan-run``: ``flwr run .`` with the settings a local simulation needs, and an honest exit code.

What it adds to a bare ``flwr run .``:

* the managed local SuperLink is started with runtime dependency installation off
  (``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1``), so runs use the environment
  fedgan is installed in instead of downloading torch into a fresh one per run; it
  lives in a project-local ``FLWR_HOME`` (``.flwr/``) on its own ports, so it never
  reuses a SuperLink that was started with other settings, and it is stopped after
  the run (``--keep-superlink`` keeps it for faster reruns);
* the run folder goes under the directory you launched from (``./fedgan-output``)
  unless ``output-dir`` is given;
* the exit code is the run's real status read back with ``flwr ls`` (``flwr run
  --stream`` itself exits 0 even when the run failed): 0 only for
  ``finished:completed``.

Usage::

    fedgan-run                                  # the embedded default (PrivacyGAN on digits, 5 clients)
    fedgan-run --run-config "alpha=0.8 num-rounds=50" --num-supernodes 4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_HTTP_PORT = "39191"
DEFAULT_CONTROL_PORT = "39193"


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_HTTP_PORT)
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", DEFAULT_CONTROL_PORT)
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # the CLI starts `flower-superlink` by name: make it the one of this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def superlink_pids(port: str) -> list[int]:
    """Pids of managed SuperLinks listening on ``port`` (read from /proc; Linux)."""
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        if any(w.endswith("flower-superlink") for w in words) and "--port" in words:
            if words[words.index("--port") + 1] == port:
                pids.append(int(entry.name))
    return pids


def stop_superlink(port: str, timeout: float = 10.0) -> None:
    """Stop the managed SuperLink on ``port`` (SIGTERM, then SIGKILL)."""
    pids = superlink_pids(port)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in pids):
        time.sleep(0.2)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_status(run_id: str, env: dict[str, str], connection: str = "local") -> str:
    """The run's status as the SuperLink records it, e.g. ``finished:completed``."""
    out = subprocess.run(["flwr", "ls", connection, "--run-id", run_id, "--format", "json"], env=env,
                         capture_output=True, text=True, cwd=PROJECT)
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"


def build_command(run_config: str, num_supernodes: int, cpus_per_client: int, gpus_per_client: float) -> list[str]:
    """The ``flwr run`` command line."""
    federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
                  f"client-resources-num-gpus={gpus_per_client}")
    cmd = ["flwr", "run", str(PROJECT), "local", "--stream", "--federation-config", federation]
    if run_config:
        cmd += ["--run-config", run_config]
    return cmd


def with_output_dir(run_config: str, cwd: Path) -> str:
    """Add ``output-dir='<cwd>/fedgan-output'`` unless the user chose one."""
    if "output-dir" in run_config:
        return run_config
    return f"{run_config} output-dir={json.dumps(str(cwd / 'fedgan-output'))}".strip()


def run_config_overrides(run_config: str) -> dict[str, object]:
    """``"alpha=0.8 dataset='digits'"`` as a dict, values read as TOML (as ``flwr run`` does);
    ValueError naming the piece that is not ``key=value``."""
    import tomllib

    out: dict[str, object] = {}
    for piece in shlex.split(run_config, posix=False):
        if "=" not in piece:
            raise ValueError(f"--run-config piece {piece!r}: expected key=value")
        key, value = piece.split("=", 1)
        try:
            out[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            out[key.strip()] = value.strip("'\"")
    return out


def check_run_config(run_config: str) -> str | None:
    """None when the overrides parse into a valid Config, else the one-line reason (naming the key)."""
    from app.config import ConfigError, parse_config

    try:
        parse_config(run_config_overrides(run_config))
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    from app.config import positive_int   # torch-heavy: imported only when the CLI runs

    p = argparse.ArgumentParser(prog="fedgan-run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-config", default="", help='overrides, e.g. "alpha=0.8 num-rounds=50" (strings quoted)')
    p.add_argument("--num-supernodes", type=positive_int, default=5, help="simulated clients (default 5)")
    p.add_argument("--cpus-per-client", type=positive_int, default=1)
    p.add_argument("--gpus-per-client", type=float, default=0.0)
    p.add_argument("--flwr-home", default=str(PROJECT / ".flwr"), help="FLWR_HOME for the managed SuperLink")
    p.add_argument("--keep-superlink", action="store_true", help="leave the managed SuperLink running")
    p.add_argument("--connection", default="local",
                   help="a SuperLink connection of $FLWR_HOME/config.toml for a real deployment (default: the "
                        "managed local simulation); with it, --flwr-home defaults to $FLWR_HOME or ~/.flwr")
    args = p.parse_args(argv)

    deployed = args.connection != "local"
    if deployed and args.flwr_home == str(PROJECT / ".flwr"):
        args.flwr_home = os.environ.get("FLWR_HOME", str(Path.home() / ".flwr"))
    env = _env(Path(args.flwr_home).resolve())
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    run_config = with_output_dir(args.run_config, Path.cwd())
    problem = check_run_config(run_config)
    if problem is not None:   # Flower would only say "[code: 15] Invalid run configuration."
        print(f"[fedgan-run] error: {problem}", file=sys.stderr, flush=True)
        return 2
    cmd = build_command(run_config, args.num_supernodes, args.cpus_per_client, args.gpus_per_client)
    if deployed:  # a SuperLink someone else runs: no federation (simulation) settings, nothing to stop
        cmd = ["flwr", "run", str(PROJECT), args.connection, "--stream"] + (
            ["--run-config", run_config] if run_config else [])
        args.keep_superlink = True
    print("[fedgan-run] " + " ".join(shlex.quote(c) for c in cmd), flush=True)

    run_id, folder = None, None
    try:
        proc = subprocess.Popen(cmd, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if run_id is None and (m := re.search(r"started run (\d+)", line)):
                run_id = m.group(1)
            if m := re.search(r"(?:results(?: \(partial\))? in|run folder:) (/\S+)", line):
                folder = m.group(1)
        rc = proc.wait()
        if run_id is None:
            print(f"[fedgan-run] FAILED: flwr run exited with code {rc} before starting a run", flush=True)
            return rc or 1
        status = run_status(run_id, env, args.connection)
    except KeyboardInterrupt:
        print("[fedgan-run] interrupted", flush=True)
        return 130
    finally:
        if not args.keep_superlink:
            stop_superlink(port)
    ok = status == "finished:completed"
    where = f"; results in {folder}" if folder else ""
    print(f"[fedgan-run] run {run_id}: {status}{where}", flush=True)
    if not ok:
        print(f"[fedgan-run] FAILED (see the log above and {folder or 'the run folder'}/summary.md)", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
