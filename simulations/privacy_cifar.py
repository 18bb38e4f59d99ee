#!/usr/bin/env python
"""PrivacyGAN on CIFAR-10 with N virtual clients through Flower's simulation engine.

The thesis' setup (ch. 5): the server trains a teacher GAN on the full training set,
every client holds a private 1:10 subset; each client's student generator is trained
on the server from its discriminator's feedback (JRLF, thesis Eq. 5.9).

    # CPU smoke run (tiny models, a few rounds):
    python simulations/privacy_cifar.py --data ../shared/data/cifar10_jpeg.zip --clients 4
    # GPU scale (the full experiment file):
    python simulations/privacy_cifar.py --config simulations/configs/privacy_cifar.yaml --clients 10

Without --config the experiment file is privacy_cifar.yaml when CUDA is available and
privacy_cifar_tiny.yaml otherwise (it says which). Writes the usual run folder.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.launch import HelpFormatter  # noqa: E402
from simulations.common import (CONFIGS, SHARED_CIFAR, add_common_flags, read_experiment,  # noqa: E402
                                run_from_args)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1], formatter_class=HelpFormatter)
    add_common_flags(p, config_default="configs/privacy_cifar.yaml with CUDA, else configs/privacy_cifar_tiny.yaml",
                     clients_default="the experiment's min-nodes, at least 4")
    p.add_argument("--alpha", type=float, help="JRLF weight of the client's discriminator (beta = 1 - alpha; "
                                               "default: the experiment's)")
    p.add_argument("--data", help=f"CIFAR-10 location: the folder-per-class zip, an extracted tree or a "
                                  f"torchvision root (default: {SHARED_CIFAR} when present)")
    p.add_argument("--fraction", type=float, help="each client's share of the training set (0.1 = 1:10, 0.01 = 1:100; "
                                                  "default: the experiment's)")
    args = p.parse_args(argv)

    import torch

    config_path = Path(args.config) if args.config else CONFIGS / (
        "privacy_cifar.yaml" if torch.cuda.is_available() and args.device != "cpu" else "privacy_cifar_tiny.yaml")
    print(f"[fedgan] experiment file: {config_path}", flush=True)

    def load_base() -> dict:
        base = read_experiment(config_path)   # no --data and no data-dir: build_config finds ../shared/data
        if args.data is not None:
            args.data = str(Path(args.data).expanduser().resolve())
        return base

    return run_from_args(load_base, args, {"alpha": "alpha", "data": "data-dir", "fraction": "fraction"},
                         default_clients=4)

if __name__ == "__main__":
    sys.exit(main())
