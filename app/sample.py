"""``fedgan-sample``: draw samples from a generator a run trained.

    fedgan-sample --run <run folder> --list
    fedgan-sample --run <run folder> --generator <name> --num 10000 --out <folder | file.npz> [--seed 0]

``--run`` is a run folder (``<output-dir>/runs/<run>/``) or a deployed node's own run folder
(``<node-dir>/node-runs/flower-run-<id>/``); its ``generators/`` hold one ``<name>.pt`` +
``<name>.json`` per generator (app/generators.py says which strategy leaves which). The named
generator is rebuilt from its sidecar, and ``--num`` latents z ~ N(0, I) are drawn in batches of
``--batch-size`` from one CPU generator seeded with ``--seed`` (the same samples on any device);
``--device auto`` uses CUDA when present. BatchNorm uses batch statistics, as every sample grid
and score of the run did (``--bn running`` uses the running statistics instead).

Output: a folder gets one PNG per sample (``000000.png`` ...) and ``samples.json`` (generator,
run, round, seed, ...); a path ending in ``.npz`` gets ``images`` (uint8, N x H x W x C; 2-D data:
``points``, float32 N x 2) plus the same metadata as keys (``generator``, ``run``, ``round``,
``strategy``, ``seed`` and ``meta``, the whole record as JSON).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from app.config import ConfigError, resolve_device
from app.generators import GeneratorError, generators_dir, list_generators, load_generator

PROG = "fedgan-sample"


def pick_device(name: str) -> str:
    """``--device``, resolved as the run config's ``device`` is (app.config.resolve_device)."""
    try:
        return resolve_device(name)
    except ConfigError:
        raise GeneratorError("--device cuda: no CUDA device is available here (use --device auto or cpu)") from None


def draw(G: torch.nn.Module, num: int, *, seed: int = 0, batch_size: int = 500, device: str = "cpu",
         bn: str = "batch") -> torch.Tensor:
    """``num`` samples G(z), z drawn batch by batch from ``torch.Generator().manual_seed(seed)``
    on the CPU; returned on the CPU as float32."""
    gen = torch.Generator().manual_seed(int(seed))
    G = G.to(device)
    G.train(bn == "batch")
    out = []
    with torch.no_grad():
        for start in range(0, num, batch_size):
            b = min(batch_size, num - start)
            z = torch.randn(b, G.latent_dim, generator=gen)
            out.append(G(z.to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


def record_of(meta: dict, run: Path, *, num: int, seed: int, bn: str, device: str) -> dict:
    return {"generator": meta.get("name"), "run": meta.get("run") or run.name, "run_folder": str(run),
            "round": meta.get("round"), "steps": meta.get("steps"), "strategy": meta.get("strategy"),
            "dataset": meta.get("dataset"), "owner": meta.get("owner"), "num": num, "seed": seed, "bn": bn,
            "device": device, "architecture": meta.get("architecture")}


def write_npz(path: Path, samples: torch.Tensor, record: dict) -> Path:
    import numpy as np

    arrays = {"images": to_uint8(samples).numpy()} if samples.dim() == 4 else {"points": samples.numpy()}
    meta = {k: np.array("" if record[k] is None else str(record[k])) for k in ("generator", "run", "strategy")}
    meta.update(round=np.array(-1 if record["round"] is None else int(record["round"])),
                seed=np.array(int(record["seed"])), meta=np.array(json.dumps(record, sort_keys=True)))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as fh:
        np.savez_compressed(fh, **arrays, **meta)
    return path


def write_pngs(folder: Path, samples: torch.Tensor, record: dict) -> Path:
    from PIL import Image

    if samples.dim() != 4:
        raise GeneratorError(f"generator {record['generator']!r} draws 2-D points, not images; write them to an "
                             ".npz file (--out samples.npz)")
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise GeneratorError(f"--out {folder}: exists and is not an empty folder; give a new folder or an .npz file")
    folder.mkdir(parents=True, exist_ok=True)
    images = to_uint8(samples).numpy()
    width = max(6, len(str(len(images) - 1)))
    for i, img in enumerate(images):
        Image.fromarray(img[:, :, 0] if img.shape[2] == 1 else img).save(folder / f"{i:0{width}d}.png")
    (folder / "samples.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return folder


def describe(meta: dict) -> str:
    arch = meta.get("architecture") or {}
    shape = ("2-D points" if arch.get("kind") == "mlp"
             else f"{arch.get('channels')}x{arch.get('image_size')}x{arch.get('image_size')} images")
    steps = f", {meta['steps']} steps" if meta.get("steps") is not None else ""
    return (f"{meta.get('name')}\t{meta.get('strategy')}, kept by the {meta.get('owner')}, round {meta.get('round')}"
            f"{steps}, {shape} ({arch.get('kind')}, latent {arch.get('latent_dim')}, features {arch.get('features')})")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="List the generators a fedgan run trained, or draw samples "
                                "from one of them (PNG files or an .npz).")
    p.add_argument("--run", required=True, help="run folder (or a deployed node's node-runs/flower-run-<id> folder)")
    p.add_argument("--list", action="store_true", help="list the generators of the run and exit")
    p.add_argument("--generator", help="name of the generator (see --list)")
    p.add_argument("--num", type=int, default=10000, help="number of samples (default 10000)")
    p.add_argument("--out", help="a folder for PNG files, or a file ending in .npz")
    p.add_argument("--seed", type=int, default=0, help="seed of the latents (default 0)")
    p.add_argument("--batch-size", type=int, default=500, help="samples per generator call (default 500)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--bn", choices=["batch", "running"], default="batch",
                   help="BatchNorm statistics: of each batch (as in training, default) or the running ones")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    run = Path(args.run).expanduser().absolute()
    try:
        if args.list:
            known = list_generators(run)
            print(f"{len(known)} generator(s) in {generators_dir(run)}:")
            for meta in known.values():
                print("  " + describe(meta))
            return 0
        if not args.generator or not args.out:
            raise GeneratorError("give --generator <name> and --out <folder or .npz> (or --list)")
        if args.num < 1 or args.batch_size < 1:
            raise GeneratorError(f"--num {args.num} and --batch-size {args.batch_size} must be at least 1")
        device = pick_device(args.device)
        G, meta = load_generator(run, args.generator, device)
        samples = draw(G, args.num, seed=args.seed, batch_size=args.batch_size, device=device, bn=args.bn)
        record = record_of(meta, run, num=args.num, seed=args.seed, bn=args.bn, device=device)
        out = Path(args.out).expanduser()
        where = write_npz(out, samples, record) if out.suffix == ".npz" else write_pngs(out, samples, record)
    except (GeneratorError, OSError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    print(f"{PROG}: {args.num} samples of {meta['name']!r} (run {record['run']}, round {record['round']}, "
          f"seed {args.seed}, {device}) -> {where}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
