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

from app.launch import HelpFormatter  # noqa: E402
from simulations.common import add_common_flags, read_experiment, run_from_args  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_common_flags(p, clients_default="the experiment's min-nodes, at least 2")
    args = p.parse_args(argv)
    return run_from_args(lambda: read_experiment(args.config) if args.config else {}, args, {}, default_clients=2)

if __name__ == "__main__":
    sys.exit(main())
