#!/usr/bin/env python
"""What a client's data costs in memory: P processes (as P Ray actors or deployed ClientApp
processes would) each load their partition and sample training batches, all alive at once.

Every process loads ``client_dataset(spec, i, P)`` the way a ClientApp does, draws ``--batches``
batches of ``--batch-size`` through the dataset's training view (``ArrayDataset.view``), then
waits until all have loaded and reports its memory (psutil ``memory_full_info``): RSS, USS (what
only this process holds) and PSS (its fair share of pages shared with others, e.g. a memory map
of the machine's decoded-image cache, app/data.py), and how much USS and PSS grew from just
before loading (after the imports): what the data costs. The sum of that PSS growth over the
processes is what the data costs the machine; the script also prints each process's load time.

    python simulations/data_memory.py --dataset cifar10 --data-dir ../shared/data/cifar10_jpeg.zip \\
        --processes 4

The first process to load decodes the images into the cache (``FEDGAN_IMAGE_CACHE``, default
``~/.cache/fedgan/decoded``) under a lock; the others map it. ``--cache off`` makes every
process decode in memory, for comparison. Writes ``data_memory.json`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import queue
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

MB = 1024 * 1024


def _worker(i: int, args: argparse.Namespace, ready, release, out) -> None:
    import psutil
    import torch

    from app.data import DataSpec, client_dataset

    base = psutil.Process().memory_full_info()   # after the imports, before any data
    t0 = time.perf_counter()
    spec = DataSpec(dataset=args.dataset, data_dir=args.data_dir, partition="iid",
                    server_data="heldout", seed=0)
    data = client_dataset(spec, i, args.processes)
    load_s = time.perf_counter() - t0
    x = data.view if hasattr(type(data), "view") else data.x
    gen = torch.Generator().manual_seed(i)
    total = 0.0
    for _ in range(args.batches):
        total += float(x[torch.randint(len(x), (args.batch_size,), generator=gen)].sum())
    ready.wait()   # every process has loaded and sampled: now pages are shared as they will be
    info = psutil.Process().memory_full_info()
    out.put({"process": i, "rows": len(data), "load_s": load_s, "rss_mb": info.rss / MB,
             "uss_mb": info.uss / MB, "pss_mb": getattr(info, "pss", float("nan")) / MB,
             "data_uss_mb": (info.uss - base.uss) / MB,
             "data_pss_mb": (getattr(info, "pss", 0) - getattr(base, "pss", 0)) / MB,
             "storage": "uint8" if getattr(data, "pixels", None) is not None else "float32"})
    release.wait()


def main(argv: list[str] | None = None) -> int:
    from app.launch import HelpFormatter

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--dataset", default="cifar10", help="dataset name as in the run config 'dataset'")
    ap.add_argument("--data-dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "data"
                                               / "cifar10_jpeg.zip"), help="the dataset's location ('data-dir')")
    ap.add_argument("--processes", type=int, default=4, help="processes loading at once, one partition each")
    ap.add_argument("--batches", type=int, default=50, help="training batches each process samples")
    ap.add_argument("--batch-size", type=int, default=32, help="samples per batch")
    ap.add_argument("--cache", default="", help="a folder for the decoded-image cache, or 'off' "
                                                "(default: FEDGAN_IMAGE_CACHE, else ~/.cache/fedgan/decoded)")
    ap.add_argument("--output-dir", default="runs/data_memory", help="where data_memory.json is written")
    args = ap.parse_args(argv)
    if args.processes < 1:
        ap.error("--processes must be >= 1")
    if args.cache:
        os.environ["FEDGAN_IMAGE_CACHE"] = args.cache
    ctx = mp.get_context("spawn")
    ready, release, out = ctx.Barrier(args.processes), ctx.Event(), ctx.Queue()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_worker, args=(i, args, ready, release, out)) for i in range(args.processes)]
    for p in procs:
        p.start()
    rows: list[dict] = []
    try:
        while len(rows) < len(procs):
            try:
                rows.append(out.get(timeout=1.0))
            except queue.Empty:
                dead = [(i, p.exitcode) for i, p in enumerate(procs) if p.exitcode is not None]
                if dead:
                    print(f"data_memory: process(es) {dead} (index, exit code) ended before reporting; a "
                          f"negative code is the signal that killed it (-9: likely the kernel's out-of-memory "
                          f"killer: try fewer --processes)", file=sys.stderr)
                    return 1
    finally:
        release.set()
        for p in procs:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
    rows.sort(key=lambda r: r["process"])
    wall = time.perf_counter() - t0
    print(f"{args.processes} processes, {args.dataset}, cache "
          f"{os.environ.get('FEDGAN_IMAGE_CACHE', 'default')}, {wall:.1f} s in all")
    print("process  rows  storage  load s   RSS MB   USS MB   PSS MB   data: +USS MB  +PSS MB")
    for r in rows:
        print(f"{r['process']:>7} {r['rows']:>5}  {r['storage']:>7} {r['load_s']:>7.1f} {r['rss_mb']:>8.0f} "
              f"{r['uss_mb']:>8.0f} {r['pss_mb']:>8.0f} {r['data_uss_mb']:>14.0f} {r['data_pss_mb']:>8.0f}")
    pss = sum(r["pss_mb"] for r in rows)
    data_pss = sum(r["data_pss_mb"] for r in rows)
    print(f"sum of PSS: {pss:.0f} MB ({pss / len(rows):.0f} MB per process); of it loading the data: "
          f"{data_pss:.0f} MB ({data_pss / len(rows):.0f} MB per process)")
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "data_memory.json"), "w") as fh:
        json.dump({"args": vars(args), "wall_s": wall, "processes": rows, "sum_pss_mb": pss,
                   "sum_data_pss_mb": data_pss}, fh, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
