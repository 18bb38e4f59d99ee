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
* the run id comes from ``flwr run --format json``; the log is then followed with
  ``flwr log <run-id> <connection> --stream`` until the run ends;
* the exit code is the run's real status read back with ``flwr ls`` (``flwr run
  --stream`` itself exits 0 even when the run failed): 0 only for
  ``finished:completed``;
* ``flwr run`` is handed a slim copy of the app (:func:`stage_app`), not the project
  folder, whose ``.venv`` the CLI would walk file by file before building the FAB.

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
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping

import psutil

PROJECT = Path(__file__).resolve().parent.parent
DEFAULT_HTTP_PORT = "39191"
DEFAULT_CONTROL_PORT = "39193"
APP_PACKAGES = ("app", "models", "strategies")   # what the ServerApp and ClientApp import
APP_FILES = ("pyproject.toml", "README.md", ".gitignore")


def stage_app(dest: Path, *, source: Path = PROJECT, clientapp: str | None = None,
              extra: Mapping[str, Path] | None = None) -> Path:
    """A slim copy of the Flower app in ``dest`` for ``flwr run`` to bundle: pyproject.toml and
    the packages the two apps import. ``flwr run <project>`` builds its FAB by first walking
    every file under the project (flwr/cli/utils.py ``collect_files``: ``.venv`` included, 45,000
    files here) and only then filtering them: 5-10 s per ``flwr run`` on 2 cores, against
    ~0.1 s for this copy. ``clientapp`` replaces ``[tool.flwr.app.components] clientapp`` (e.g.
    ``"e2e_mods:tap_app"``, a ClientApp with Flower mods); ``extra`` maps names inside the copy
    to files copied there."""
    if dest.exists():
        shutil.rmtree(dest)
    dest.mkdir(parents=True)
    for name in APP_PACKAGES:
        shutil.copytree(source / name, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in APP_FILES:
        if (source / name).is_file():
            shutil.copy2(source / name, dest / name)
    if clientapp is not None:
        text = (dest / "pyproject.toml").read_text()
        new, n = re.subn(r'(?m)^clientapp = ".*"$', f'clientapp = "{clientapp}"', text)
        if n != 1:
            raise ValueError(f"{source / 'pyproject.toml'}: no single [tool.flwr.app.components] clientapp line "
                             "to replace")
        (dest / "pyproject.toml").write_text(new)
    for name, path in (extra or {}).items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / name)
    return dest


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` for every fedgan command: the description and epilog keep their layout, and
    each option's help ends with its default (``(default: X)``, argparse's rule), unless the help
    already names it (the word "default") or the default is None / empty, when the help must say
    in words what happens without the flag."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env.setdefault("FLWR_LOCAL_SUPERLINK_HTTP_API_PORT", DEFAULT_HTTP_PORT)
    env.setdefault("FLWR_LOCAL_CONTROL_API_PORT", DEFAULT_CONTROL_PORT)
    env.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
    # Ray's FutureWarning about overriding CUDA_VISIBLE_DEVICES for num_gpus=0 actors: opt into
    # the future behaviour (as simulations/common.py does), which changes nothing on CPU
    env.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # the CLI starts `flower-superlink` by name: make it the one of this environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


def superlink_healthy(address: str, ca: str | Path | None = None) -> bool:
    """The SuperLink at ``address`` (host:port) answers ``GET /health`` on its HTTP port; over
    TLS when ``ca`` (the CA certificate to verify it against) is given."""
    import httpx

    url = f"{'https' if ca else 'http'}://{address}/health"
    try:
        return httpx.get(url, timeout=1.0, verify=str(ca) if ca else True).is_success
    except httpx.HTTPError:
        return False


def superlink_pids(port: str) -> list[int]:
    """Pids of managed SuperLinks listening on ``port`` (found by their command line through
    psutil, so on macOS as on Linux)."""
    pids = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        if proc.info.get("status") in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            continue
        words = proc.info.get("cmdline") or []
        if any(w.endswith("flower-superlink") for w in words) and "--port" in words[:-1]:
            if words[words.index("--port") + 1] == str(port):
                pids.append(proc.pid)
    return pids


def stop_superlink(port: str, timeout: float = 10.0) -> None:
    """Stop the managed SuperLink on ``port`` (SIGTERM, then SIGKILL)."""
    procs = []
    for pid in superlink_pids(port):
        try:
            procs.append(psutil.Process(pid))
        except psutil.NoSuchProcess:
            pass

    def running() -> list[psutil.Process]:   # polled, not wait()ed: a child of ours stays for its Popen to reap
        out = []
        for proc in procs:
            try:
                if proc.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
                    out.append(proc)
            except psutil.NoSuchProcess:
                pass
        return out

    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        for proc in running():
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        deadline = time.monotonic() + wait
        while running() and time.monotonic() < deadline:
            time.sleep(0.2)
        if not running():
            return


def run_status(run_id: str, env: dict[str, str], connection: str = "local") -> str:
    """The run's status as the SuperLink records it, e.g. ``finished:completed``."""
    out = subprocess.run(["flwr", "ls", connection, "--run-id", run_id, "--format", "json"], env=env,
                         capture_output=True, text=True, cwd=PROJECT)
    try:
        return json.loads(out.stdout)["runs"][0]["status"]
    except (ValueError, KeyError, IndexError):
        return f"unknown ({out.stdout.strip() or out.stderr.strip()})"


def final_status(run_id: str, env: dict[str, str], connection: str = "local", settle: float = 20.0) -> str:
    """:func:`run_status`, waiting up to ``settle`` s for it to be final (``finished:*``)."""
    deadline = time.monotonic() + settle
    while True:
        status = run_status(str(run_id), env, connection)
        if status.startswith("finished") or time.monotonic() > deadline:
            return status
        time.sleep(1.0)


def parse_flwr_json(stdout: str) -> dict:
    """The JSON object a ``flwr ... --format json`` command printed ({} when there is none).

    The CLI pretty-prints it over several lines (Rich); colour codes, should a terminal be
    faked, are dropped first."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", stdout)
    decoder = json.JSONDecoder()
    for m in re.finditer(r"^[ \t]*\{", text, re.M):
        try:
            obj, _ = decoder.raw_decode(text, m.end() - 1)
        except ValueError:
            continue
        if isinstance(obj, dict):
            return obj
    return {}


def start_run(cmd: list[str], env: dict[str, str], cwd: Path = PROJECT,
              timeout: float | None = None) -> tuple[str | None, str, int]:
    """Run ``flwr run ... --format json`` (which returns once the SuperLink accepted the run).

    Returns ``(run_id, message, returncode)``: the run id from the JSON's ``run-id``, or None
    with the CLI's ``error-message`` (else its output) as ``message``. ``--format json`` and
    ``--stream`` do not mix in flwr 1.42 (the streamed log goes to the captured, discarded
    output), so the log is followed separately with :func:`log_command`."""
    try:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"flwr run did not answer within {timeout:.0f} s", 124
    data = parse_flwr_json(out.stdout)
    run_id = data.get("run-id")
    if data.get("success") and run_id not in (None, ""):
        return str(run_id), "", out.returncode
    why = str(data.get("error-message") or "") or out.stdout + out.stderr
    return None, " ".join(why.split()) or "no output", out.returncode


def log_command(run_id: str, connection: str) -> list[str]:
    """``flwr log <run-id> <connection> --stream``: the run's log until the run finishes."""
    return ["flwr", "log", str(run_id), connection, "--stream"]


def build_command(run_config: str, num_supernodes: int, cpus_per_client: int, gpus_per_client: float,
                  app_dir: Path) -> list[str]:
    """The ``flwr run`` command line for the app in ``app_dir`` (JSON output: the run id is read from it)."""
    federation = (f"num-supernodes={num_supernodes} client-resources-num-cpus={cpus_per_client} "
                  f"client-resources-num-gpus={gpus_per_client}")
    cmd = ["flwr", "run", str(app_dir), "local", "--format", "json", "--federation-config", federation]
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


def check_run_config(run_config: str, check_paths: bool = True, num_supernodes: int | None = None) -> str | None:
    """None when the overrides parse into a valid Config, else the one-line reason (naming the key).
    ``check_paths=False`` for a remote SuperLink: its paths are on the server's machine.
    ``num_supernodes`` (a local simulation): also each virtual client's DP checks on its partition."""
    from app.config import ConfigError, check_tracking, parse_config

    try:
        cfg = parse_config(run_config_overrides(run_config), check_paths=check_paths)
        if check_paths:   # the local SuperLink's ServerApp runs here: its tracking package must be here too
            check_tracking(cfg)
        if num_supernodes is not None and cfg.dp:
            from app.client_app import check_dp_partitions

            check_dp_partitions(cfg, num_supernodes * cfg.cohort_size)   # each node: a cohort of clients
    except (ConfigError, ValueError) as exc:
        return str(exc)
    return None


def main(argv: list[str] | None = None) -> int:
    from app.config import positive_int   # torch-heavy: imported only when the CLI runs

    p = argparse.ArgumentParser(prog="fedgan-run", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--run-config", default="", help='overrides, e.g. "alpha=0.8 num-rounds=50" (strings quoted; '
                                                    "default: none, the defaults of pyproject.toml)")
    p.add_argument("--num-supernodes", type=positive_int, default=5, help="simulated clients")
    p.add_argument("--cpus-per-client", type=positive_int, default=1, help="CPUs per simulated client (Ray resources)")
    p.add_argument("--gpus-per-client", type=float, default=0.0, help="GPUs per simulated client (fractional)")
    p.add_argument("--flwr-home", default=str(PROJECT / ".flwr"), help="FLWR_HOME for the managed SuperLink")
    p.add_argument("--keep-superlink", action="store_true", help="leave the managed SuperLink running")
    p.add_argument("--connection", default="local",
                   help="a SuperLink connection of $FLWR_HOME/config.toml for a real deployment (default: local, "
                        "the managed local simulation); with it, --flwr-home defaults to $FLWR_HOME or ~/.flwr")
    args = p.parse_args(argv)

    deployed = args.connection != "local"
    if deployed and args.flwr_home == str(PROJECT / ".flwr"):
        args.flwr_home = os.environ.get("FLWR_HOME", str(Path.home() / ".flwr"))
    env = _env(Path(args.flwr_home).resolve())
    port = env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    run_config = with_output_dir(args.run_config, Path.cwd())
    problem = check_run_config(run_config, check_paths=not deployed,
                               num_supernodes=None if deployed else args.num_supernodes)
    if problem is not None:   # Flower would only say "[code: 15] Invalid run configuration."
        print(f"[fedgan-run] error: {problem}", file=sys.stderr, flush=True)
        return 2
    # flwr run bundles a slim copy of the app, not the project folder itself (stage_app: ~0.1 s
    # against 5-10 s walking .venv); the copy is only needed until the SuperLink has the FAB
    try:
        staging = Path(tempfile.mkdtemp(prefix="fedgan-run-app-"))
        app_dir = stage_app(staging / PROJECT.name)
    except OSError as exc:   # e.g. the temporary folder is full or missing: one line naming the path
        from app.runs import describe_os_error

        where = exc.filename or tempfile.gettempdir()
        print(f"[fedgan-run] error: could not copy the app for flwr run into {where}: {describe_os_error(exc)} "
              "(set TMPDIR to a writable folder)", file=sys.stderr, flush=True)
        return 1
    cmd = build_command(run_config, args.num_supernodes, args.cpus_per_client, args.gpus_per_client, app_dir)
    if deployed:  # a SuperLink someone else runs: no federation (simulation) settings, nothing to stop
        cmd = ["flwr", "run", str(app_dir), args.connection, "--format", "json"] + (
            ["--run-config", run_config] if run_config else [])
        args.keep_superlink = True
    print("[fedgan-run] " + " ".join(shlex.quote(c) for c in cmd)
          + f"  (the app staged from {PROJECT}: {', '.join(APP_FILES[:1] + APP_PACKAGES)})", flush=True)

    run_id, folder = None, None
    try:
        try:
            run_id, why, rc = start_run(cmd, env)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        if run_id is None:
            print(f"[fedgan-run] FAILED: flwr run exited with code {rc} before starting a run: {why}", flush=True)
            return rc or 1
        follow = log_command(run_id, args.connection)
        print(f"[fedgan-run] started run {run_id}; its log: " + " ".join(shlex.quote(c) for c in follow),
              flush=True)
        proc = subprocess.Popen(follow, env=env, cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, bufsize=1)
        assert proc.stdout is not None
        for line in proc.stdout:
            sys.stdout.write(line)
            sys.stdout.flush()
            if m := re.search(r"(?:results(?: \(partial\))? in|run folder:) (/\S+)", line):
                folder = m.group(1)
        proc.wait()
        status = final_status(run_id, env, args.connection)
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
