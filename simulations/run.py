#!/usr/bin/env python
"""Any strategy, any setup, N virtual clients through Flower's simulation engine.

    python simulations/run.py --clients 5                                  # the embedded default
    python simulations/run.py --config my_study.yaml --clients 8 --set alpha=0.8
    python simulations/run.py --set resume=/path/to/fedgan-output/runs/<run>   # continue a run

The run config comes from the YAML experiment file (keys as in pyproject.toml), then
flags, then --set; it is validated once and stops at start on a bad key or value.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import ConfigError  # noqa: E402
from app.data import DataError  # noqa: E402
from simulations.common import add_common_flags, build_config, read_experiment, simulate  # noqa: E402
from strategies.base import RunFailed  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_flags(p)
    args = p.parse_args(argv)
    try:
        base = read_experiment(args.config) if args.config else {}
        cfg = build_config(base, args, {})
        simulate(cfg, args.clients or max(cfg.min_nodes, 2), client_cpus=args.client_cpus,
                 client_gpus=args.client_gpus)
    except (ConfigError, DataError, RunFailed) as exc:
        print(f"[fedgan] error: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
