#!/usr/bin/env python
"""MGGAN on the ring of 8 Gaussians (thesis ch. 3, Figs. 3.4–3.7), through the federated strategy.

Plain GAN (one group) vs MGGAN with K ∈ {2, 3, 4, 6} groups and a fixed regrouping
interval T ∈ {0 (never), 25, 300} iterations, over several seeds. As in the thesis'
ring experiment the learning-rate rule and the dynamic interval are off (fixed T).
Every run goes through Flower's simulation engine with one client per group; the
``full`` partition gives every client all the data (the thesis' single-machine
setting), ``--partition classes`` gives each client only some of the modes (non-IID).

Writes into ``<output-dir>/mggan_ring-<time>/``: ``table.md`` (modes covered and % of
high-quality samples of the mixture, mean ± std over seeds, next to published
anchors), ``results.json`` and ``density_T*.png`` (density per step, one row per T).

    python simulations/mggan_ring.py                       # the full study (~1 h on 2 CPU cores)
    python simulations/mggan_ring.py --seeds 1 --groups 3  # a quick look
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.config import parse_config  # noqa: E402
from app.data import mode_means  # noqa: E402
from app.metrics import density_plot  # noqa: E402
from app.runs import RunFolder  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import simulate  # noqa: E402

# Published ring results (modes covered of 8, % high-quality samples); their settings differ from ours.
ANCHORS = [("GAN (VEEGAN paper)", 1.0, 99.3), ("ALI (VEEGAN paper)", 2.8, 0.13),
           ("Unrolled GAN (VEEGAN paper)", 7.6, 35.6), ("VEEGAN (VEEGAN paper)", 8.0, 52.9),
           ("PacGAN2 (PacGAN paper)", 7.9, 95.6)]

BASE = {"strategy": "mggan", "dataset": "ring", "model": "mlp", "latent-dim": 16, "gen-features": 128,
        "disc-features": 128, "batch-size": 256, "loss": "bce", "client-gen-lr": 0.001, "client-disc-lr": 0.001,
        "lr-rule": False, "eval-samples": 2500, "node-wait-timeout": 120.0}


def run_config(groups: int, interval: int, seed: int, args, snapshots: bool) -> dict:
    local = min(args.local_steps, interval) if interval > 0 else args.local_steps
    rounds = -(-args.iterations // local)
    return {**BASE, "partition": args.partition, "classes-per-client": -(-8 // groups),
            "regroup-interval": interval, "local-steps": local, "num-rounds": rounds, "min-nodes": groups,
            "seed": seed, "mggan-losses": args.losses, "output-dir": str(args.out),
            "run-name": f"K{groups}-T{interval}-s{seed}",
            "eval-every": max(1, rounds // args.snapshots) if snapshots else 0}


def final_eval(run: Path) -> dict:
    last = RunFolder.open(run).read_jsonl("metrics.jsonl")[-1]
    return last["eval"]["mixture"]


def density_figures(out: Path, runs: dict[str, list[str]], K: int, intervals: list[int]) -> None:
    """Density of the mixture per evaluation step, one figure per T (seed 0, K groups),
    like thesis Figs. 3.4-3.5; from the sample dumps of the runs."""
    means, _ = mode_means("ring")
    for T in intervals:
        run = Path(runs[f"MGGAN K={K} T={T}"][0])
        history = RunFolder.open(run).read_jsonl("metrics.jsonl")
        panels = {}
        for pt in sorted((run / "samples").glob("round*.pt")):
            rnd = int(pt.stem.replace("round", ""))
            panels[f"T={T}, iteration {history[rnd - 1]['iteration']}"] = torch.load(pt)["mixture"]
        if panels:
            density_plot(out / f"density_K{K}_T{T}.png", panels, means)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--seeds", type=int, default=5, help="seeds per (groups, interval) setting")
    p.add_argument("--groups", type=int, nargs="+", default=[2, 3, 4, 6], help="numbers of MGGAN groups K to run")
    p.add_argument("--intervals", type=int, nargs="+", default=[0, 25, 300],
                   help="regroup intervals T to run (0 = never regroup)")
    p.add_argument("--iterations", type=int, default=3000, help="base-GAN iterations per group")
    p.add_argument("--local-steps", type=int, default=100, help="iterations per round when T allows")
    p.add_argument("--partition", default="full", choices=["full", "classes"],
                   help="how the ring's points are shared among the clients")
    p.add_argument("--losses", default="bce", help='per-group losses, cycled (e.g. "bce,wgan")')
    p.add_argument("--snapshots", type=int, default=5, help="density snapshots for the figure (seed 0)")
    p.add_argument("--output-dir", default="fedgan-output", help="where mggan_ring-<time>/ goes")
    args = p.parse_args(argv)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    args.out = Path(args.output_dir).resolve() / f"mggan_ring-{stamp}"
    args.out.mkdir(parents=True)
    for K, T in [(g, t) for g in args.groups for t in args.intervals]:  # validate every setting up front
        parse_config(run_config(K, T, 0, args, False))

    settings = [("GAN", 1, 0)] + [(f"MGGAN K={g} T={t}", g, t) for g in args.groups for t in args.intervals]
    results: dict[str, list[dict]] = {}
    runs: dict[str, list[str]] = {}
    started = time.monotonic()
    total = len(settings) * args.seeds
    done = 0
    for name, K, T in settings:
        for seed in range(args.seeds):
            cfg = parse_config(run_config(K, T, seed, args, snapshots=(seed == 0)))
            run = simulate(cfg, K)
            results.setdefault(name, []).append(final_eval(run))
            runs.setdefault(name, []).append(str(run))
            done += 1
            el = time.monotonic() - started
            print(f"[mggan_ring] {done}/{total} {name} seed {seed}: {results[name][-1]['modes_covered']}/8 modes, "
                  f"{results[name][-1]['high_quality_pct']:.1f}% HQ | elapsed {el / 60:.1f} min, "
                  f"ETA {el / done * (total - done) / 60:.1f} min", flush=True)
            (args.out / "results.json").write_text(json.dumps({"results": results, "runs": runs}, indent=2))

    def ms(vals):
        return (statistics.mean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0)

    lines = [f"Ring of 8 Gaussians (radius 2, std 0.02), {args.iterations} iterations per group, partition "
             f"`{args.partition}`, losses `{args.losses}`, {args.seeds} seeds, mixture of the groups, 2,500 samples; "
             f"fixed T, learning-rate rule off.", "",
             "| setting | modes covered (of 8) | high-quality samples % | reverse KL |", "|---|---|---|---|"]
    for name, evals in results.items():
        m, s = ms([e["modes_covered"] for e in evals])
        h, hs = ms([e["high_quality_pct"] for e in evals])
        kls = [e["reverse_kl"] for e in evals if e["reverse_kl"] is not None and e["reverse_kl"] != float("inf")]
        kl = f"{statistics.mean(kls):.3f}" if len(kls) == len(evals) else "inf (a run had no HQ sample)"
        lines.append(f"| {name} | {m:.1f} ± {s:.1f} | {h:.1f} ± {hs:.1f} | {kl} |")
    lines += ["", "Published anchors (other settings, for orientation only):", "",
              "| method | modes | HQ % |", "|---|---|---|"]
    lines += [f"| {n} | {m} | {h} |" for n, m, h in ANCHORS]
    lines += ["", f"Wall time: {(time.monotonic() - started) / 60:.1f} min."]
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    print(table)

    density_figures(args.out, runs, max(args.groups), args.intervals)
    print(f"[mggan_ring] results in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
