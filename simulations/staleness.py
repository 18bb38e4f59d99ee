#!/usr/bin/env python
"""How stale is the feedback of steps 2..K in a PrivacyGAN round of K generator steps?

A message carries K fake batches, all made by the student G_i before the round's first
update; the client returns K feedbacks computed on them. Step 1 is the exact centralized
JRLF update; step k > 1 back-propagates feedback on fakes made before updates 1..k-1.
This script plays such rounds in one process on the demo's setting (digits, client 0's two
classes, the server's held-out half for the teacher, the run config's models and rates),
and at every step compares the JRLF gradient the protocol applies with the one the exact
protocol would apply at that point (the same D_i's feedback on the fakes G_i makes now):
relative error ‖g_used − g_exact‖ / ‖g_exact‖ per step k (``stale_feedback_errors``).

    python simulations/staleness.py --ks 2 4 8 --rounds 60
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.builders import make_discriminator, make_generator, optimizer_for  # noqa: E402
from app.config import parse_config  # noqa: E402
from app.data import client_dataset, server_dataset  # noqa: E402
from models.steps import sample_latent  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import parse_sets  # noqa: E402
from strategies.privacygan import stale_feedback_errors, train_teacher  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    p.add_argument("--ks", type=int, nargs="+", default=[2, 4, 8], help="steps per round K to measure")
    p.add_argument("--rounds", type=int, default=60, help="rounds played per K (errors are averaged over them)")
    p.add_argument("--clients", type=int, default=5, help="how many clients the data is split into (client 0 is used)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key, e.g. --set alpha=0.8 (default: the embedded demo's settings)")
    p.add_argument("--out", default="", help="write the results as JSON to this file (default: empty = "
                                              "print them only)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cfg = parse_config(parse_sets(args.set))
    torch.manual_seed(cfg.seed)
    t0 = time.monotonic()
    teacher_data = server_dataset(cfg.data_spec()).x
    own = client_dataset(cfg.data_spec(), 0, args.clients).x
    G_T, D_T = make_generator(cfg), make_discriminator(cfg)
    train_teacher(G_T, D_T, lambda b, g: teacher_data[torch.randint(len(teacher_data), (b,), generator=g)],
                  steps=cfg.teacher_steps, loss=cfg.loss, gen_lr=cfg.lr_for(cfg.loss, cfg.teacher_gen_lr),
                  disc_lr=cfg.lr_for(cfg.loss, cfg.teacher_disc_lr), betas=(cfg.adam_beta1, cfg.adam_beta2),
                  batch_size=cfg.batch_size, seed=cfg.seed, d_steps=cfg.disc_steps_for(cfg.loss))
    for p in D_T.parameters():
        p.requires_grad_(False)
    print(f"teacher: {cfg.teacher_steps} steps in {time.monotonic() - t0:.1f} s; {cfg.loss} loss, batch "
          f"{cfg.batch_size}, alpha {cfg.alpha}, {cfg.gen_features}/{cfg.disc_features} feature maps", flush=True)

    def sample_real(b: int, g: torch.Generator) -> torch.Tensor:
        return own[torch.randint(len(own), (b,), generator=g)]

    results = {}
    print(f"{'K':>3} | " + " | ".join(f"step {k}" for k in range(1, max(args.ks) + 1)))
    for K in args.ks:
        G = make_generator(cfg)
        G.load_state_dict(G_T.state_dict())
        D = make_discriminator(cfg)
        opt_g = optimizer_for(cfg, G, cfg.lr_for(cfg.loss, cfg.server_gen_lr))
        opt_d = optimizer_for(cfg, D, cfg.lr_for(cfg.loss, cfg.client_disc_lr))
        gen, zgen = torch.Generator().manual_seed(cfg.seed + 1), torch.Generator().manual_seed(cfg.seed + 2)
        per_step: list[list[float]] = [[] for _ in range(K)]
        for _ in range(args.rounds):
            z = sample_latent(K * cfg.batch_size, cfg.latent_dim, generator=zgen).reshape(K, cfg.batch_size, -1)
            errs = stale_feedback_errors(G, opt_g, D, opt_d, D_T, z, sample_real, gen, alpha=cfg.alpha,
                                         loss=cfg.loss, disc_steps=cfg.disc_steps_for(cfg.loss))
            for k, e in enumerate(errs):
                per_step[k].append(e)
        results[K] = [{"k": k + 1, "mean": statistics.fmean(v), "median": statistics.median(v), "max": max(v)}
                      for k, v in enumerate(per_step)]
        print(f"{K:>3} | " + " | ".join(f"{r['mean'] * 100:5.1f} %" for r in results[K]), flush=True)
    print(f"(mean relative gradient error of step k over {args.rounds} rounds per K; step 1 is exact; "
          f"{time.monotonic() - t0:.0f} s in all)")
    if args.out:
        Path(args.out).write_text(json.dumps({"config": cfg.to_run_config(), "rounds": args.rounds,
                                              "errors": results}, indent=2))
        print(f"written: {Path(args.out).resolve()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
