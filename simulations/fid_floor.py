#!/usr/bin/env python
"""The FID floor: real training images scored against the test set, the best any generator
can hope for with the same extractor and sample count.

    python simulations/fid_floor.py --dataset cifar10 --samples 10000 5000 500
    python simulations/fid_floor.py --dataset digits --samples 1000

For each count N it draws N random training images (seeded) and prints FID, KID and IS
against the whole test split, with the extractor's name, so generator scores at the same
N can be read against it. Needs the extractor's weights (see simulations/train_evaluator.py).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.data import load_dataset  # noqa: E402
from app.metrics import ImageEvaluator, describe_scores, load_feature_net  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import SHARED_CIFAR, default_data_dir  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="cifar10", help="dataset whose train/test split is scored")
    p.add_argument("--data-dir", default="", help=f"where the data is (default: empty = {SHARED_CIFAR} for "
                                                  "cifar10 when present)")
    p.add_argument("--samples", type=int, nargs="+", default=[10000], help="training images per score")
    p.add_argument("--extractor", default="classifier", choices=("classifier", "inception"),
                   help="feature network for FID/KID")
    p.add_argument("--evaluator-dir", default="", help="classifier cache folder (default: empty = "
                                                       "$FEDGAN_EVALUATORS or ~/.cache/fedgan/evaluators)")
    p.add_argument("--inception-weights", default="", help="Inception-v3 weights file (default: empty = torch "
                                                           "hub's cache)")
    p.add_argument("--seed", type=int, default=0, help="seed of the drawn images")
    args = p.parse_args(argv)

    data_dir = default_data_dir(args.dataset, args.data_dir)
    train = load_dataset(args.dataset, data_dir=data_dir, split="train")
    test = load_dataset(args.dataset, data_dir=data_dir, split="test")
    net = load_feature_net(args.extractor, dataset=args.dataset, image_size=train.x.shape[-1],
                           channels=train.x.shape[1], evaluator_dir=args.evaluator_dir,
                           inception_weights=args.inception_weights)
    t0 = time.monotonic()
    ev = ImageEvaluator(net, tv_name="tv_test")
    ev.set_real(test.x, test.y, test.num_classes)
    print(f"[fid_floor] {args.dataset}: reference = the {len(test):,} test images ({net.name} features, "
          f"{time.monotonic() - t0:.1f} s)", flush=True)
    for n in args.samples:
        if n > len(train):
            p.error(f"--samples {n}: the training split has only {len(train)} images")
        idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(args.seed))[:n]
        scores = ev.score(train.x[idx])
        tv = f", TV to test labels {scores['tv_test']:.3f}" if "tv_test" in scores else ""
        print(f"[fid_floor] {n:,} random training images vs test: {describe_scores(scores)}{tv}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
