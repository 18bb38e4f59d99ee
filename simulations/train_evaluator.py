#!/usr/bin/env python
"""Train the classifier that scores generated images of one dataset, and cache it.

Its penultimate features are the embedding for FID/KID (``eval-extractor=classifier``),
its softmax the class probabilities for IS, its argmax the labels of generated samples
(label histograms, client fidelity). The weights go to the evaluator cache (see
``evaluator-dir``; never committed) with the test accuracy, the time and the device.

    python simulations/train_evaluator.py --dataset digits            # seconds
    python simulations/train_evaluator.py --dataset cifar10           # ../shared/data copy; ~15-20 min on 2 CPU cores
    python simulations/train_evaluator.py --dataset mnist --data-dir ~/data/mnist

Targets: >= 97% test accuracy on digits, >= 85% on CIFAR-10. The script prints the
accuracy after every epoch and exits with status 1 when ``--min-accuracy`` is not met.
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.data import load_dataset  # noqa: E402
from app.metrics import classifier_path, save_classifier  # noqa: E402
from models.classifier import Classifier, accuracy, predict, train_epoch  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import SHARED_CIFAR, default_data_dir  # noqa: E402

# Per dataset: epochs, batch size, peak learning rate, flips, shift (pixels), accuracy target.
RECIPES = {
    "digits": dict(epochs=15, batch_size=64, lr=0.05, flip=False, shift=1, target=0.97, width=16),
    "mnist": dict(epochs=4, batch_size=256, lr=0.1, flip=False, shift=2, target=0.99),
    "cifar10": dict(epochs=12, batch_size=256, lr=0.2, flip=True, shift=2, target=0.85),
    "imagefolder": dict(epochs=20, batch_size=128, lr=0.1, flip=True, shift=2, target=0.0),
}


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def use_bf16(choice: str, device: str) -> bool:
    """bfloat16 autocast: on for CUDA and for CPUs with AVX-512 (about 2x faster there)."""
    if choice != "auto":
        return choice == "on"
    return device.startswith("cuda") or torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--dataset", default="digits", help="digits, mnist, cifar10 or imagefolder:<path>")
    p.add_argument("--data-dir", default="", help=f"where the data is (default: empty = {SHARED_CIFAR} for "
                                                  "cifar10 when present)")
    p.add_argument("--image-size", type=int, default=0, help="side in pixels (0 = the dataset's default)")
    p.add_argument("--channels", type=int, default=0, help="1 or 3 (0 = the dataset's default)")
    p.add_argument("--epochs", type=int, help="passes over the training split (default: per dataset)")
    p.add_argument("--batch-size", type=int, help="training batch size (default: per dataset)")
    p.add_argument("--lr", type=float, help="peak learning rate of the one-cycle SGD schedule (default: per dataset)")
    p.add_argument("--width", type=int, help="channels of the first layer, doubling per group (default: 16 for "
                                             "digits, 32 otherwise)")
    p.add_argument("--label-smoothing", type=float, default=0.2, help="label smoothing of the cross-entropy")
    p.add_argument("--weight-decay", type=float, default=5e-4, help="SGD weight decay")
    p.add_argument("--limit-per-class", type=int, default=0, help="use only this many training images per class "
                                                                  "(0 = all)")
    p.add_argument("--min-accuracy", type=float, help="exit 1 below this test accuracy (default: the dataset's target)")
    p.add_argument("--evaluator-dir", default="", help="cache folder (default: $FEDGAN_EVALUATORS or "
                                                       "~/.cache/fedgan/evaluators)")
    p.add_argument("--output", default="", help="write the weights here instead of the cache (default: empty = "
                                                 "the cache)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                   help="bfloat16 autocast (auto = on for CUDA and for CPUs with AVX-512)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initialization and the batch order")
    args = p.parse_args(argv)

    kind = args.dataset.split(":", 1)[0].lower()
    if kind not in RECIPES:
        p.error(f"--dataset {args.dataset!r}: no classifier for this dataset (choose digits, mnist, cifar10 or "
                f"imagefolder:<path>)")
    recipe = dict(RECIPES[kind])
    recipe.setdefault("width", 32)
    for key in ("epochs", "batch_size", "lr", "width"):
        if getattr(args, key) is not None:
            recipe[key] = getattr(args, key)
    target = args.min_accuracy if args.min_accuracy is not None else recipe["target"]
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = default_data_dir(kind, args.data_dir)
    device = resolve_device(args.device)
    bf16 = use_bf16(args.bf16, device)

    t_load = time.monotonic()
    train = load_dataset(args.dataset, data_dir=data_dir, image_size=args.image_size, channels=args.channels,
                         split="train", limit_per_class=args.limit_per_class)
    test = load_dataset(args.dataset, data_dir=data_dir, image_size=args.image_size, channels=args.channels,
                        split="test")
    channels, side = train.x.shape[1], train.x.shape[-1]
    print(f"[train_evaluator] {args.dataset}: {len(train)} train / {len(test)} test images of {channels}x{side}x{side}, "
          f"{train.num_classes} classes (loaded in {time.monotonic() - t_load:.1f} s); device {device}"
          f"{', bf16 autocast' if bf16 else ''}, {torch.get_num_threads()} threads", flush=True)

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    net = Classifier(channels, side, train.num_classes, width=recipe["width"]).to(device, memory_format=torch.channels_last)
    opt = torch.optim.SGD(net.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True,
                          weight_decay=args.weight_decay)
    steps_per_epoch = len(train) // recipe["batch_size"]
    if steps_per_epoch < 1:
        p.error(f"--batch-size {recipe['batch_size']} is larger than the training split ({len(train)} images)")
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=recipe["epochs"] * steps_per_epoch,
                                                pct_start=0.2, anneal_strategy="linear", div_factor=10,
                                                final_div_factor=100)
    start = time.monotonic()
    acc = float("nan")
    for epoch in range(1, recipe["epochs"] + 1):
        loss = train_epoch(net, opt, sched, train.x, train.y, batch_size=recipe["batch_size"], gen=gen,
                           flip=recipe["flip"], shift=recipe["shift"], label_smoothing=args.label_smoothing,
                           autocast_bf16=bf16, device=device)
        acc = accuracy(predict(net, test.x, device=device), test.y)
        elapsed = time.monotonic() - start
        eta = elapsed / epoch * (recipe["epochs"] - epoch)
        print(f"[train_evaluator] epoch {epoch}/{recipe['epochs']}: train loss {loss:.4f}, test accuracy {acc:.4f}, "
              f"elapsed {elapsed:.0f} s, ETA {eta:.0f} s", flush=True)
    seconds = time.monotonic() - start
    net = net.to("cpu", memory_format=torch.contiguous_format).float()
    meta = {"dataset": args.dataset, "test_accuracy": acc, "num_train": len(train), "num_test": len(test),
            "epochs": recipe["epochs"], "train_seconds": round(seconds, 1), "device": device,
            "device_name": torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor()
            or platform.machine(), "threads": torch.get_num_threads(), "bf16": bf16, "torch": str(torch.__version__),
            "seed": args.seed, "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out = Path(args.output) if args.output else classifier_path(args.dataset, side, channels, args.evaluator_dir)
    save_classifier(out, net, meta)
    print(f"[train_evaluator] test accuracy {acc:.4f} after {recipe['epochs']} epochs in {seconds:.0f} s on {device} "
          f"({torch.get_num_threads()} threads); weights: {out}", flush=True)
    if acc < target:
        print(f"[train_evaluator] below the target accuracy {target:.2f}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
