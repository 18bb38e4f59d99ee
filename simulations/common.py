"""What every simulation script shares: experiment files, flag overrides, one simulated run.

An experiment is a YAML file of run-config keys (the same hyphenated keys as
``[tool.flwr.app.config]``); flags given on the command line override it, and the
result is parsed once into the validated :class:`app.config.Config`. The run goes
through Flower's simulation engine (Ray backend) with N virtual clients, using the
same ServerApp/ClientApp code as ``flwr run .``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from typing import Callable

from app.config import Config, ConfigError, parse_config
from app.data import DataError
from strategies.base import RunFailed

PROJECT = Path(__file__).resolve().parent.parent
CONFIGS = PROJECT / "simulations" / "configs"
SHARED_CIFAR = (PROJECT.parent / "shared" / "data" / "cifar10_jpeg.zip")


def read_experiment(path: str | Path) -> dict[str, Any]:
    """Run-config keys from a YAML experiment file (a flat mapping)."""
    data = yaml.safe_load(Path(path).read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"experiment file {path}: expected a mapping of run-config keys, got {type(data).__name__}")
    return {str(k): v for k, v in data.items()}


def parse_sets(pairs: list[str]) -> dict[str, Any]:
    """``--set key=value`` pairs; values are YAML scalars (``0.5`` -> float, ``true`` -> bool)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(value)
    return out


def add_common_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML experiment file of run-config keys")
    p.add_argument("--clients", type=int, help="number of virtual clients (SuperNodes)")
    p.add_argument("--rounds", type=int, help="num-rounds")
    p.add_argument("--output-dir", help="where runs/ goes (default: ./fedgan-output)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="server and client device")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs per virtual client (Ray resources)")
    p.add_argument("--client-gpus", type=float, default=None,
                   help="GPUs per virtual client (fractional; default 0 on CPU machines, 1/clients with CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key, e.g. --set fakes-dtype=uint8 (repeatable)")


def build_config(base: dict[str, Any], args: argparse.Namespace, flag_keys: dict[str, str]) -> Config:
    """Experiment file < flags < --set; ``flag_keys`` maps argparse names to run-config keys."""
    raw = dict(base)
    for attr, key in {**flag_keys, "rounds": "num-rounds", "device": "device", "output_dir": "output-dir"}.items():
        value = getattr(args, attr, None)
        if value is not None:
            raw[key] = value
    raw.setdefault("output-dir", str(Path.cwd() / "fedgan-output"))
    raw.update(parse_sets(args.set))
    return parse_config(raw)


def simulate(cfg: Config, num_clients: int, *, client_cpus: int = 1, client_gpus: float | None = None) -> Path:
    """Run ``cfg`` with ``num_clients`` virtual clients; returns the run folder."""
    import torch
    from flwr.simulation import run_simulation

    from app.client_app import make_client_app
    from app.server_app import make_server_app

    if cfg.min_nodes > num_clients:
        raise ConfigError(f"run config 'min-nodes' = {cfg.min_nodes} exceeds --clients {num_clients}")
    if client_gpus is None:
        client_gpus = (1.0 / num_clients) if torch.cuda.is_available() and cfg.device != "cpu" else 0.0
    if client_gpus > 0 and not torch.cuda.is_available():
        raise ConfigError("--client-gpus > 0 but no CUDA device is visible")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # one BLAS/OpenMP thread per CPU a virtual client is given (the actors inherit this)
    os.environ.setdefault("OMP_NUM_THREADS", str(client_cpus))
    logging.getLogger("flwr").setLevel(logging.WARNING)
    before = _runs(cfg)
    started = time.monotonic()
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg), num_supernodes=num_clients,
                   backend_config={"client_resources": {"num_cpus": client_cpus, "num_gpus": client_gpus}})
    new = sorted(_runs(cfg) - before)
    if cfg.resume:
        folder = Path(cfg.resume).expanduser().resolve()   # a resumed run continues in its own folder
    elif new:
        folder = new[-1]
    else:
        raise RuntimeError("the simulation finished without creating a run folder")
    print(f"[fedgan] simulation wall time {time.monotonic() - started:.1f} s; run folder: {folder}", flush=True)
    return folder


def _runs(cfg: Config) -> set[Path]:
    from app.runs import resolve_output_dir

    root = resolve_output_dir(cfg.output_dir) / "runs"
    return set(root.iterdir()) if root.is_dir() else set()


def run_from_args(load_base: Callable[[], dict[str, Any]], args: argparse.Namespace, flag_keys: dict[str, str],
                  default_clients: int) -> int:
    """Experiment file + flags -> one simulated run; a user error prints one line and gives exit code 1."""
    try:
        cfg = build_config(load_base(), args, flag_keys)
        simulate(cfg, args.clients or max(cfg.min_nodes, default_clients), client_cpus=args.client_cpus,
                 client_gpus=args.client_gpus)
    except (ConfigError, DataError, RunFailed) as exc:
        print(f"[fedgan] error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0
