"""What every simulation script shares: experiment files, flag overrides, one simulated run.

An experiment is a YAML file of run-config keys (the same hyphenated keys as
``[tool.flwr.app.config]``); flags given on the command line override it, and the
result is parsed once into the validated :class:`app.config.Config`. The run goes
through ``flwr run`` and Flower's Simulation Engine (Ray backend) with N virtual clients
(app/simulation.py), the same ServerApp/ClientApp as ``flwr run .``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import yaml

from app.config import Config, ConfigError, check_tracking, parse_config, positive_int
from app.data import DataError
from app.runs import RunFolderError, describe_os_error, ensure_writable_dir, resolve_output_dir
from strategies.base import STOP, TRACE_ENV, RunFailed

INTERRUPTED_EXIT = 130   # the shell's code for a run stopped by SIGINT

PROJECT = Path(__file__).resolve().parent.parent
CONFIGS = PROJECT / "simulations" / "configs"
SHARED_CIFAR = (PROJECT.parent / "shared" / "data" / "cifar10_jpeg.zip")


def default_data_dir(dataset: str, data_dir: str = "") -> str:
    """Where a script reads ``dataset`` from: ``data_dir`` when given; for CIFAR-10 without one,
    the offline copy beside the project (:data:`SHARED_CIFAR`) when it is there; else "" (the
    dataset's own default: the embedded digits, or torchvision's root for CIFAR-10)."""
    if data_dir or dataset != "cifar10" or not SHARED_CIFAR.is_file():
        return data_dir
    return str(SHARED_CIFAR)


def read_experiment(path: str | Path) -> dict[str, Any]:
    """Run-config keys from a YAML experiment file (a flat mapping); ConfigError in one line
    naming the file when it is missing, a folder, not UTF-8 text or not YAML."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"experiment file {path}: not UTF-8 text (a binary file?)") from None
    except OSError as exc:
        raise ConfigError(f"experiment file {path}: {describe_os_error(exc)}") from None
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"experiment file {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path}: expected a mapping of run-config keys, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


@contextlib.contextmanager
def stop_on_signals():
    """While inside: the first SIGINT/SIGTERM asks the run to stop at its next safe point
    (:data:`strategies.base.STOP`; the ServerApp writes summary.md "interrupted"), a second
    one stops at once. Outside the main thread this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if STOP.is_set():
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt
        STOP.set()
        print(f"\n[fedgan] {signal.Signals(signum).name}: stopping at the next safe point (a few seconds); "
              "press Ctrl-C again to stop at once", file=sys.stderr, flush=True)

    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def preflight(cfg: Config) -> None:
    """Errors a user can fix, found before Ray starts: an output folder that cannot be
    written, a run to resume that is not there."""
    if cfg.resume:
        from app.server_app import inspect_resume

        folder, _, _, _ = inspect_resume(cfg)
        ensure_writable_dir(folder.path, "run folder to resume")
    else:
        ensure_writable_dir(resolve_output_dir(cfg.output_dir) / "runs", "output folder")


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are YAML scalars (``0.5`` -> float, ``true`` -> bool)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_common_flags(p: argparse.ArgumentParser, *, config_default: str = "none, the embedded defaults",
                     clients_default: str = "the experiment's min-nodes") -> None:
    """The flags every simulation script shares; ``config_default`` / ``clients_default`` say in
    words what the script does without ``--config`` / ``--clients``."""
    p.add_argument("--config", help=f"YAML experiment file of run-config keys (default: {config_default})")
    p.add_argument("--clients", type=positive_int,
                   help=f"number of virtual clients (SuperNodes; with run config cohort-size M, N / M SuperNodes "
                        f"of M clients each) (default: {clients_default})")
    p.add_argument("--rounds", type=positive_int, help="num-rounds (default: the experiment's)")
    p.add_argument("--output-dir", help="where runs/ goes (default: ./fedgan-output)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"],
                   help="server and client device (default: the experiment's, else auto)")
    p.add_argument("--client-cpus", type=positive_int, default=1, help="CPUs per virtual client (Ray resources)")
    p.add_argument("--client-gpus", type=float, default=None,
                   help="GPUs per SuperNode (fractional; default 0 on CPU machines, 1/SuperNodes with CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key, e.g. --set fakes-dtype=uint8 (repeatable; default: none)")


def build_config(base: dict[str, Any], args: argparse.Namespace, flag_keys: dict[str, str]) -> Config:
    """Experiment file < flags < --set; ``flag_keys`` maps argparse names to run-config keys.
    CIFAR-10 without a ``data-dir`` reads the offline copy beside the project when it is there
    (:func:`default_data_dir`)."""
    raw = dict(base)
    for attr, key in {**flag_keys, "rounds": "num-rounds", "device": "device", "output_dir": "output-dir"}.items():
        value = getattr(args, attr, None)
        if value is not None:
            raw[key] = value
    raw.setdefault("output-dir", str(Path.cwd() / "fedgan-output"))
    raw.update(parse_sets(args.set))
    if found := default_data_dir(str(raw.get("dataset", "")), str(raw.get("data-dir") or "")):
        raw["data-dir"] = found
    cfg = parse_config(raw)
    check_tracking(cfg)   # the simulation's ServerApp runs in this process
    return cfg


RAY_CPUS_ENV = "FEDGAN_RAY_CPUS"


def ray_cpus_from_env() -> int | None:
    """``$FEDGAN_RAY_CPUS``: the CPUs Ray offers a script's virtual clients (None: all of this
    machine's). With client-cpus = 1 that is how many actors run at once; the test suite sets 1
    (one actor start per tiny run instead of two, ~2 s on 2 cores) except where it tests
    concurrency."""
    raw = os.environ.get(RAY_CPUS_ENV, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise ConfigError(f"environment variable {RAY_CPUS_ENV} = {raw!r} must be a whole number >= 1")
    return int(raw)


def said_folder(log: list[str]) -> Path | None:
    """The run folder the ServerApp named in its log (its last "[fedgan] run folder:" line)."""
    said = [m.group(1) for ln in log if (m := re.search(r"\[fedgan\] run folder: (/\S+)", ln))]
    return Path(said[-1]) if said else None


SIMULATION_POLL_INTERVAL = 0.02   # seconds between the ServerApp's pulls in a simulation (run config poll-interval)


def simulate(cfg: Config, num_clients: int, *, client_cpus: int = 1, client_gpus: float | None = None,
             app_dir: Path | None = None, ray_cpus: int | None = None) -> Path:
    """Run ``cfg`` with ``num_clients`` virtual clients through ``flwr run`` and the Simulation
    Engine (app/simulation.py); returns the run folder. The process's managed local SuperLink
    is started by the first call and reused by the next ones (stopped at exit). ``app_dir``: the
    Flower app to run (default: a slim copy of this project; tests stage one whose ClientApp has
    Flower mods: :func:`app.simulation.stage_app`). ``ray_cpus``: the CPUs Ray offers the
    virtual clients (default: ``$FEDGAN_RAY_CPUS``, else this machine's). With run config
    ``cohort-size`` M the federation has ``num_clients / M`` SuperNodes of M clients each.

    Raises RunFailed (the run's own error, from summary.md) when the run fails; a first Ctrl-C /
    SIGTERM asks the ServerApp to stop at its next safe point (SystemExit 130 once it has)."""
    import torch

    from app.client_app import check_dp_partitions
    from app.simulation import SimulationError, absolute_paths, shared_federation, summary_error, summary_status

    if cfg.min_nodes > num_clients:
        raise ConfigError(f"run config 'min-nodes' = {cfg.min_nodes} exceeds --clients {num_clients}")
    if num_clients % cfg.cohort_size:
        raise ConfigError(f"run config 'cohort-size' = {cfg.cohort_size} does not divide --clients {num_clients} "
                          "(each SuperNode carries one cohort of that many virtual clients)")
    num_nodes = num_clients // cfg.cohort_size
    check_dp_partitions(cfg, num_clients)   # dp-delta < 1/n and a reachable target, per client, before Ray
    if client_gpus is None:
        client_gpus = (1.0 / num_nodes) if torch.cuda.is_available() and cfg.device != "cpu" else 0.0
    if client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError("--client-gpus > 0 but no CUDA device is visible")
    if cfg.max_in_flight == 0:   # keep every actor busy without queueing every message in the engine at once
        cfg = cfg.replace(max_in_flight=in_flight_for(num_nodes, client_cpus, client_gpus))
    if cfg.poll_interval == 0:   # pulls are local calls here: refill the in-flight window sooner
        cfg = cfg.replace(poll_interval=SIMULATION_POLL_INTERVAL)
    preflight(cfg)
    run_config = absolute_paths(cfg.to_run_config())
    before = _runs(cfg)
    # one BLAS/OpenMP thread per CPU a virtual client is given (the SuperLink's children inherit it)
    env = {"OMP_NUM_THREADS": str(client_cpus), "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0"}
    if os.environ.get(TRACE_ENV):   # the timing trace (simulations/scale.py): every process of the run writes it
        env[TRACE_ENV] = os.environ[TRACE_ENV]
    # the caller's Ray settings (e.g. RAY_memory_usage_threshold) reach the federation's cluster, and
    # other settings get a federation of their own rather than one started without them
    env.update({k: v for k, v in os.environ.items() if k.startswith("RAY_") and k not in env})
    fed = shared_federation(env, ray_cpus or ray_cpus_from_env())
    with stop_on_signals():
        try:
            result = fed.run(run_config, num_nodes, cpus=client_cpus, gpus=client_gpus,
                             app_dir=app_dir, stop=STOP, settled=lambda log: summary_status(said_folder(log)))
        except SimulationError as exc:
            raise RunFailed(str(exc)) from None
    new = sorted(_runs(cfg) - before)
    said = said_folder(result.log)
    if said:
        folder = said
    elif cfg.resume:
        folder = Path(cfg.resume).expanduser().resolve()   # a resumed run continues in its own folder
    else:
        folder = new[-1] if new else None
    print(f"[fedgan] simulation wall time {result.seconds:.1f} s ({result.status}); run folder: {folder}",
          flush=True)
    if STOP.is_set() or result.status == "finished:stopped":   # a script running several simulations stops too
        STOP.set()
        print("[fedgan] interrupted; see summary.md in the run folder for how to resume", file=sys.stderr, flush=True)
        raise SystemExit(INTERRUPTED_EXIT)
    if not result.ok:
        # no summary error: the ServerApp did not fail itself (e.g. the simulation process or Ray did)
        why = summary_error(folder) or ("the ServerApp recorded no error; its last log line: "
                                        + next((ln for ln in reversed(result.log) if ln.strip()), "none"))
        raise RunFailed(f"the run ended {result.status}: {why}" + (f" (run folder: {folder})" if folder else ""))
    if folder is None:
        raise RuntimeError("the simulation finished without creating a run folder")
    return folder


def in_flight_for(num_clients: int, client_cpus: int, client_gpus: float) -> int:
    """Messages a simulated exchange keeps unanswered at once: 16 per actor that can run at the same
    time (CPUs / client-cpus, and GPUs / client-gpus when those are asked for), at most all of them.
    Flower 1.42's simulation engine scans every stored message for each node on every sweep, so
    queueing 1,000 messages at once costs it O(nodes x messages) per sweep (README "Many virtual clients")."""
    import torch

    actors = max(1, (os.cpu_count() or 1) // max(1, client_cpus))
    if client_gpus > 0:
        actors = min(actors, max(1, int(torch.cuda.device_count() / client_gpus)))
    return max(1, min(num_clients, 16 * actors))


def _runs(cfg: Config) -> set[Path]:
    from app.runs import run_folders

    return set(run_folders(cfg.output_dir))


def run_from_args(load_base: Callable[[], dict[str, Any]], args: argparse.Namespace, flag_keys: dict[str, str],
                  default_clients: int) -> int:
    """Experiment file + flags -> one simulated run; a user error prints one line and gives exit code 1."""
    try:
        cfg = build_config(load_base(), args, flag_keys)
        simulate(cfg, args.clients or max(cfg.min_nodes, default_clients), client_cpus=args.client_cpus,
                 client_gpus=args.client_gpus)
    except (ConfigError, DataError, RunFailed, RunFolderError) as exc:
        print(f"[fedgan] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print("[fedgan] stopped at once (second Ctrl-C)", file=sys.stderr, flush=True)
        return INTERRUPTED_EXIT
    if STOP.is_set():
        return INTERRUPTED_EXIT
    return 0
