#!/usr/bin/env python
"""Play the curious server: how well can it tell a client's training images from unseen ones?

For each strategy (and each DP budget and client size asked for), one Flower simulation trains
on digits split by class (the embedded demo's setup), then the server attacks using only what
that strategy's server receives or may send (docs/PRIVACY.md):

* **probe** (PrivacyGAN; the ServerApp sends it when run config ``audit-probe`` > 0, app/probe.py,
  and keeps the scores in ``audit_probe.pt``): after the last round the server sends each client
  one more ``train.discriminate`` message -- through the real ClientApp handler -- whose "fakes" are
  real candidates: the client's own training images (members) and as many images of the same
  two digits that the client never held (non-members: the server's own share and the test
  split). Scores: the labels D_i returns (higher = judged real) and, separately, minus the L2
  norm of the feedback on each candidate. The client handles it as any round: one D_i step per
  batch with the candidates as fakes (members and non-members shuffled together), then labels.
* **D weights** (FedAvg, BPGAN, data-parallel): their server holds the global discriminator
  (FedAvg receives it, BPGAN and data-parallel build it from the clients' gradients); a
  candidate's score is that D's output on it.
* **samples** (every strategy whose generator the server holds or gets samples of: PrivacyGAN's
  student of client i, ``local``'s client generator, the global generator of FedAvg and
  data-parallel, read from the run folder's ``generators/``): ``--samples`` images, then
  (a) distance to the closest record (minus the distance to the nearest sample) and (b) a learned,
  LOGAN-style black-box attack: an MLP trained to tell the samples from reference images of the
  client's classes (half of the non-member pool, never used as a non-member candidate) scores the
  members against the other half.

Per cell (strategy, client size, epsilon) and client: ROC AUC with a bootstrap 95 % interval, TPR
at 1 % and 0.1 % FPR, the epsilon each client spent (its own RDP ledger, probe included), and the
utility that privacy costs: each generator's own-class share and FID against the client's own
images (the dataset classifier's features). ``--epsilons inf 10 3 1`` trains with DP-SGD
(``dp=true``) at a noise multiplier derived so that the client with the fewest images spends
exactly that epsilon (delta = ``dp-delta``) over its training steps plus the probe's.
``--client-images 100 250`` sets the server share of the data so that each client holds about
that many images (digits by class offers at most ~288 per two-digit client). Writes
``audit.json``, ``grid.md`` and ``roc.png`` into ``--out`` and prints the tables.

    python simulations/privacy_audit.py --strategies privacygan local fedavg
    python simulations/privacy_audit.py --strategies privacygan local fedavg bpgan dataparallel \\
        --epsilons inf 10 3 1 --dp-strategies privacygan local fedavg --client-images 100 250 \\
        --rounds 100 --set local-steps=4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.audit import (attack_report, chance_tpr, chance_tpr_mean, dcr_scores, discriminator_scores,  # noqa: E402
                       learned_attack_scores, own_class_share, roc_points)
from app.config import Config, ConfigError  # noqa: E402
from app.data import DataError, client_dataset, partition_summary  # noqa: E402
from app.generators import load_generator  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from app.probe import candidates, load_probe  # noqa: E402
from simulations.common import add_common_flags, build_config, read_experiment, simulate  # noqa: E402
from strategies.base import RunFailed  # noqa: E402

STRATEGIES = ("privacygan", "local", "fedavg", "bpgan", "dataparallel")
GENERATOR_OF = {"privacygan": "student{pid}", "local": "client{pid}", "fedavg": "global", "dataparallel": "global"}
HOLDS_D = ("fedavg", "bpgan", "dataparallel")   # their server holds the global discriminator


def say(text: str) -> None:
    print(f"[privacy_audit] {text}", flush=True)


def nodes_for(strategy: str, clients: int) -> int:
    """Simulated nodes for ``clients`` data holders: BPGAN's data sits on its discriminator nodes
    only, so it gets a generator node per client too (the clients then hold the same partitions)."""
    return 2 * clients if strategy == "bpgan" else clients


def probe_steps(cfg: Config, clients: int, limit: int) -> int:
    """D steps the probe adds to the client with the most candidates (0 for other strategies)."""
    if cfg.strategy != "privacygan":
        return 0
    most = 0
    for pid in range(clients):
        mem, non, _, _ = candidates(cfg, pid, clients, limit, 0)
        most = max(most, math.ceil((len(mem) + len(non)) / cfg.batch_size))
    return most * cfg.client_disc_steps


def generator_samples(run: Path, name: str, num_samples: int, seed: int) -> tuple[torch.Tensor, dict]:
    G, meta = load_generator(run, name)
    G.train()   # batch statistics, as the run's own samples
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        x = torch.cat([G(torch.randn(min(500, num_samples - s), G.latent_dim, generator=gen))
                       for s in range(0, num_samples, 500)])
    return x, meta


def sample_attacks(run: Path, cfg: Config, clients: int, limit: int, seed: int, num_samples: int,
                   evaluator) -> tuple[dict, dict]:
    """({(attack, pid): (member scores, non-member scores)}, {pid: utility}) on the generator of
    each client that the server holds or gets samples of."""
    attacks, utility = {}, {}
    for pid in range(clients):
        say(f"{cfg.strategy}: sample attacks on client {pid}'s generator ({pid + 1} of {clients})")
        x, meta = generator_samples(run, GENERATOR_OF[cfg.strategy].format(pid=pid), num_samples, seed)
        mem, non, classes, pool = candidates(cfg, pid, clients, limit, seed)
        attacks[(f"samples (DCR, {meta['name']})", pid)] = (dcr_scores(mem, x), dcr_scores(non, x))
        ref, held = split_pool(pool, limit, seed * 7 + pid)
        k = min(len(held), len(mem))
        scores = learned_attack_scores(x, ref, torch.cat([mem[:k], held[:k]]), seed=seed)
        attacks[(f"samples (learned, {meta['name']})", pid)] = (scores[:k], scores[k:])
        if evaluator is not None:
            own = client_dataset(cfg.data_spec(), pid, clients)
            evaluator.set_real(own.x, own.y, evaluator.labeller.num_classes if evaluator.labeller else 0)
            sc = evaluator.score(x)
            utility[pid] = {"generator": meta["name"], "fid_own": sc["fid"], "extractor": sc["extractor"],
                            "num_samples": sc["num_samples"], "num_real": sc["num_real"],
                            **({"own_share": own_class_share(sc["label_histogram"], classes),
                                "tv_own": sc.get("tv_own")} if "label_histogram" in sc else {})}
    return attacks, utility


def split_pool(pool: torch.Tensor, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The learned attack's (reference, held-out) images from a client's pool of unseen images:
    a seeded half of the pool is the attacker's reference set, at most ``limit`` of it (a CIFAR-10
    pool holds thousands and the attack trains full-batch); the other half are its non-member
    candidates (members are then subsampled to as many)."""
    perm, half = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed)), len(pool) // 2
    return pool[perm[:min(half, limit)]], pool[perm[half:]]   # the cap indexes, not copies, the first half


def d_weights_attack(run: Path, cfg: Config, clients: int, limit: int, seed: int) -> dict:
    """The server's global D (its last checkpoint) scores each client's candidates."""
    from app.builders import make_discriminator
    from app.runs import RunFolder
    from strategies import bpgan

    d_cfg = cfg.replace(loss=bpgan.resolve_model(cfg.bpgan_model)[1]) if cfg.strategy == "bpgan" else cfg
    D = make_discriminator(d_cfg)
    D.load_state_dict(RunFolder.open(run).load_checkpoint("server.pt")["d"])
    out = {}
    for pid in range(clients):
        mem, non, _, _ = candidates(cfg, pid, clients, limit, seed)
        out[("D weights", pid)] = (discriminator_scores(D, mem, cfg.batch_size),
                                   discriminator_scores(D, non, cfg.batch_size))
    return out


def epsilons_spent(run: Path) -> dict[int, float]:
    """Each client's last reported dp_epsilon in metrics.jsonl (its own ledger)."""
    out: dict[int, float] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        for name, c in (row.get("clients") or {}).items():
            m = re.match(r"client (\d+)", str(name))
            if m and isinstance(c, dict) and "dp_epsilon" in c:
                out[int(m.group(1))] = float(c["dp_epsilon"])
    return out


def share_for(cfg: Config, clients: int, images: int) -> float:
    """The server share that leaves each of ``clients`` clients about ``images`` images."""
    everything = dataclasses.replace(cfg.data_spec(), server_data="none")
    biggest = sum(p["size"] for p in partition_summary(everything, clients)) / clients
    share = 1.0 - images / biggest
    if not 0.02 <= share < 1.0:
        raise ConfigError(f"--client-images {images}: {cfg.dataset} split this way gives each of {clients} clients "
                          f"at most about {biggest:.0f} images, and the server needs a share for its teacher and "
                          f"the non-member candidates; ask for at most {int(0.98 * biggest)}")
    return round(share, 4)


def dp_sets(cfg: Config, clients: int, limit: int, eps: float) -> tuple[list[str], float]:
    """The run-config overrides for a DP budget ``eps`` (inf: none) and the noise multiplier:
    derived for the client with the fewest images (the largest spend) over its training steps
    plus the probe's, so that no client spends more than ``eps``."""
    from models.dp import DPAccount, sample_rate

    if math.isinf(eps):
        return ["dp=false"], 0.0
    n_min = min(p["size"] for p in partition_summary(cfg.data_spec(), clients))
    steps = cfg.dp_planned_steps() + probe_steps(cfg, clients, limit)
    sigma = DPAccount.noise_for_target(eps, cfg.dp_delta, sample_rate(cfg.batch_size, n_min), steps)
    return ["dp=true", f"dp-noise-multiplier={sigma!r}", "dp-target-epsilon=0"], sigma


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_flags(p, config_default="none, the embedded defaults (digits by class)", clients_default="5")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=["privacygan", "local", "fedavg"],
                   help="strategies to train and attack, one simulation each (BPGAN runs 2 nodes per client: "
                        "a discriminator node holding the client's data and a generator node)")
    p.add_argument("--epsilons", nargs="+", type=float, default=[math.inf],
                   help="DP budgets at dp-delta, one run each: inf = no DP; finite = dp=true with the noise "
                        "multiplier that spends exactly this much over the run (and the probe)")
    p.add_argument("--dp-strategies", nargs="+", choices=STRATEGIES,
                   help="the strategies the finite --epsilons apply to (default: all of --strategies; the others "
                        "run without DP only)")
    p.add_argument("--client-images", nargs="+", type=int, default=[],
                   help="client sizes to audit, one run each, by the server share of the data (default: the "
                        "experiment's split)")
    p.add_argument("--candidates", type=int, default=1000,
                   help="at most this many members (and as many non-members) per client")
    p.add_argument("--nonmembers", type=int, default=0,
                   help="this many non-member candidates per client instead of as many as members (at most the "
                        "unseen images of its classes): more make the TPR at 1 %% FPR finer, e.g. ~260 instead of "
                        "~100 for clients of ~100 digits (run config audit-nonmembers; 0 = as many as members)")
    p.add_argument("--samples", type=int, default=2000, help="generated samples per generator for the sample attacks")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed-attack", type=int, default=0, help="seed of the candidate draw, probes and bootstrap")
    p.add_argument("--out", help="folder for audit.json, grid.md and roc.png (default: <output-dir>/audit/<UTC time>)")
    args = p.parse_args(argv)
    try:
        args.experiment = read_experiment(args.config) if args.config else {}
        return audit(args)
    except (ConfigError, DataError) as exc:   # a bad --config, --set, --client-images or data set: one line
        print(f"[fedgan] error: {exc}", file=sys.stderr, flush=True)
        return 1


def audit(args: argparse.Namespace) -> int:
    """The grid: every (client size, strategy, epsilon) cell trained, attacked and reported."""
    clients = args.clients or 5
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    report: dict = {"setup": {}, "cells": [], "results": [], "utility": []}
    curves: dict = {}
    started = time.monotonic()
    base = config_with(args, [*args.set, f"min-nodes={clients}"])   # CIFAR-10: ../shared/data when no data-dir
    out_dir = Path(args.out) if args.out else Path(base.output_dir).expanduser() / "audit" / stamp
    out_dir.mkdir(parents=True, exist_ok=True)
    report["setup"] = {"dataset": base.dataset, "partition": base.partition, "clients": clients,
                       "dp_delta": base.dp_delta, "candidates_per_client": args.candidates,
                       "nonmembers_per_client": args.nonmembers or "as many as members", "samples": args.samples,
                       "bootstrap": args.bootstrap}
    shares = [(n, share_for(base, clients, n)) for n in args.client_images] or [(None, None)]
    evaluator: list = []   # built once, at the first strategy with a generator
    for images, share in shares:
        for strategy in args.strategies:
            for eps in args.epsilons:
                if not math.isinf(eps) and args.dp_strategies is not None and strategy not in args.dp_strategies:
                    continue
                t0 = time.monotonic()
                cell = {"cell": len(report["cells"]), "strategy": strategy, "epsilon_target": eps}
                try:
                    run_cell(args, clients, cell, share, images, evaluator, report, curves)
                except (ConfigError, RunFailed, RuntimeError, ValueError, OSError) as exc:
                    cell["error"] = f"{type(exc).__name__}: {exc}"
                    say(f"{strategy}, epsilon {eps:g}: FAILED ({cell['error']}); the grid goes on")
                cell["seconds"] = round(time.monotonic() - t0, 1)
                report["cells"].append(cell)
                report["setup"]["seconds"] = round(time.monotonic() - started, 1)
                write_report(out_dir, report)   # after every cell: a crash later loses nothing
                say(f"{strategy}: {cell['seconds']:.0f} s")
    plotted = plot(curves, out_dir / "roc.png")
    print("\n| strategy | epsilon | attack | client (images) | AUC [95 % CI] | TPR@1%FPR | TPR@0.1%FPR |\n"
          "|---|---|---|---|---|---|---|")
    for r in report["results"]:
        lo, hi = r["auc_ci95"]
        print(f"| {r['strategy']} | {_eps(r['epsilon_target'], r['epsilon'])} | {r['attack']} | {r['client']} "
              f"({r['client_images']}) | {r['auc']:.3f} [{lo:.3f}, {hi:.3f}] | {r['tpr_at_1pct_fpr']:.3f} | "
              f"{r['tpr_at_0.1pct_fpr']:.3f} |")
    print("\n" + grid_table(report["cells"], report["results"], report["utility"]))
    failed = [c for c in report["cells"] if "error" in c]
    say(f"{len(report['results'])} attack results in {out_dir / 'audit.json'}; the grid in {out_dir / 'grid.md'}"
        + (f"; ROC curves in {out_dir / 'roc.png'}" if plotted else "; no ROC curves (no cell was attacked)")
        + f" ({report['setup']['seconds']:.0f} s)"
        + (f"; {len(failed)} cell(s) FAILED" if failed else ""))
    return 1 if failed else 0


def write_report(out_dir: Path, report: dict) -> None:
    (out_dir / "audit.json").write_text(json.dumps(_plain(report), indent=2) + "\n")
    (out_dir / "grid.md").write_text(grid_table(report["cells"], report["results"], report["utility"]) + "\n")


def config_with(args: argparse.Namespace, sets: list[str]) -> Config:
    """The run config of the experiment file (``--config``) and flags, with ``sets`` as its --set."""
    return build_config(args.experiment, argparse.Namespace(**{**vars(args), "set": sets}), {})


def run_cell(args, clients: int, cell: dict, share, images, evaluator: list, report: dict, curves: dict) -> None:
    """Train one (client size, strategy, epsilon) cell, attack it, and add its rows to ``report``."""
    strategy, eps, index = cell["strategy"], cell["epsilon_target"], cell["cell"]
    sets = [*args.set, f"strategy={strategy}", "client-eval=false", f"min-nodes={nodes_for(strategy, clients)}",
            f"audit-nonmembers={args.nonmembers}",
            *([f"server-share={share}"] if share is not None else [])]
    cfg = config_with(args, sets)
    dp, sigma = dp_sets(cfg, clients, args.candidates, eps)
    cfg = config_with(args, sets + dp)
    if not evaluator and strategy in GENERATOR_OF:
        evaluator.append(utility_evaluator(cfg))
    sizes = [p["size"] for p in partition_summary(cfg.data_spec(), clients)]
    cell.update(client_images=sizes, server_share=cfg.server_share, noise_multiplier=sigma, rounds=cfg.num_rounds)
    say(f"{strategy}, clients of {min(sizes)}-{max(sizes)} images, epsilon {eps:g}"
        + (f" (noise multiplier {sigma:.3f})" if sigma else "") + f": training {cfg.num_rounds} rounds")
    if strategy == "privacygan":   # the ServerApp probes each D_i after the last round (app/probe.py)
        cfg = cfg.replace(audit_probe=args.candidates, audit_seed=args.seed_attack)
    run = simulate(cfg, nodes_for(strategy, clients), client_cpus=args.client_cpus, client_gpus=args.client_gpus)
    probed = load_probe(run) if strategy == "privacygan" else {}
    cell["run"] = str(run)
    attacks, extra = {}, {}
    spent = epsilons_spent(run) if cfg.dp else {}
    if strategy == "privacygan":
        if len(probed) < clients:
            say(f"{strategy}: only {len(probed)} of {clients} clients answered the probe")
        for pid, r in probed.items():
            attacks[("probe (labels)", pid)] = r["label"]
            attacks[("probe (feedback norm)", pid)] = r["feedback"]
            extra[pid] = {"probe_batches": r["batches"], "client_d_steps_after_probe": r["d_steps_total"]}
            if "dp_epsilon" in r:
                spent[pid] = r["dp_epsilon"]
    if strategy in HOLDS_D:
        attacks.update(d_weights_attack(run, cfg, clients, args.candidates, args.seed_attack))
    if strategy in GENERATOR_OF:
        found, utility = sample_attacks(run, cfg, clients, args.candidates, args.seed_attack, args.samples,
                                        evaluator[0] if evaluator else None)
        attacks.update(found)
        for pid, u in utility.items():
            report["utility"].append({"cell": index, "strategy": strategy, "epsilon_target": eps, "client": pid,
                                      "client_images": sizes[pid], "epsilon": spent.get(pid), **u})
    for (attack, pid), (mem, non) in attacks.items():
        rep = attack_report(mem, non, resamples=args.bootstrap, seed=args.seed_attack)
        rep["tpr_at_1pct_fpr_chance"] = chance_tpr_mean(rep["members"], rep["nonmembers"], 0.01)
        report["results"].append({"cell": index, "strategy": strategy, "attack": attack, "client": pid,
                                  "epsilon_target": eps, "epsilon": spent.get(pid), "client_images": sizes[pid],
                                  "probed_after_round": cfg.num_rounds, "run": str(run),
                                  **(extra.get(pid, {}) if attack.startswith("probe") else {}), **rep})
        curves[(strategy, eps, images, attack, pid)] = roc_points(mem, non)
    cell["epsilon_spent_max"] = max(spent.values()) if spent else None


def utility_evaluator(cfg: Config):
    """The dataset classifier's features and labels (trained first when missing, digits only);
    None (utility columns left out) for a dataset without one."""
    from app.builders import geometry, image_evaluator
    from app.metrics import ensure_classifier

    g = geometry(cfg)
    if ensure_classifier(cfg.dataset, g.image_size, g.channels, cfg.evaluator_dir, say=say) is None:
        say(f"no '{cfg.dataset}' classifier: own-class share and FID on own data are left out")
        return None
    return image_evaluator(cfg.replace(eval_extractor="classifier"), tv_name="tv_own")


def _plain(value):
    """JSON-safe: an infinite epsilon (no DP) is written as the string "inf"."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return value


def _eps(target: float, spent: float | None) -> str:
    if math.isinf(target):
        return "∞"
    return f"{target:g} (spent {spent:.2f})" if spent is not None else f"{target:g}"


def grid_table(cells: list[dict], results: list[dict], utility: list[dict]) -> str:
    """One row per (client size, strategy, epsilon): means over clients (the worst client's TPR and
    own-class share in brackets). "D attack": PrivacyGAN's probe (D_i's labels) or, for the
    servers that hold the global D, that D's scores; DCR and learned: the sample attacks. "95 % at
    chance": the 95th percentiles of the mean over the clients and of the largest of the TPRs at
    1 % FPR that a scorer knowing nothing reads with the same candidate counts, the yardstick for
    the two numbers before it (app/audit.py, chance_tpr)."""
    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    def fmt(x, spec=".3f"):
        return "–" if x is None else format(x, spec)

    lines = ["| client images | strategy | ε target (max spent) | D attack AUC | D attack TPR@1%FPR mean (max) | "
             "95 % at chance: mean (max) | DCR AUC | learned AUC | own-class share (min) | FID own |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        if "error" in c:
            lines.append(f"| – | {c['strategy']} | {_eps(c['epsilon_target'], None)} | FAILED: {c['error'][:80]} "
                         "| | | | | | |")
            continue
        rows = [r for r in results if r["cell"] == c["cell"]]
        probe = [r for r in rows if r["attack"] in ("probe (labels)", "D weights")]
        chance = chance_tpr([(r["members"], r["nonmembers"]) for r in probe], 0.01) if probe else None
        dcr = [r for r in rows if r["attack"].startswith("samples (DCR")]
        learned = [r for r in rows if r["attack"].startswith("samples (learned")]
        util = [u for u in utility if u["cell"] == c["cell"]]
        shares = [u.get("own_share") for u in util if u.get("own_share") is not None]
        eps = ("∞" if math.isinf(c["epsilon_target"]) else
               f"{c['epsilon_target']:g} ({fmt(c['epsilon_spent_max'], '.2f')})")
        lines.append(f"| {min(c['client_images'])}–{max(c['client_images'])} | {c['strategy']} | {eps} | "
                     f"{fmt(mean([r['auc'] for r in probe]))} | "
                     f"{fmt(mean([r['tpr_at_1pct_fpr'] for r in probe]))} "
                     f"({fmt(max([r['tpr_at_1pct_fpr'] for r in probe], default=None))}) | "
                     f"{fmt(chance and chance['mean_quantile'])} ({fmt(chance and chance['max_quantile'])}) | "
                     f"{fmt(mean([r['auc'] for r in dcr]))} | {fmt(mean([r['auc'] for r in learned]))} | "
                     f"{fmt(mean(shares), '.2f')} ({fmt(min(shares, default=None), '.2f')}) | "
                     f"{fmt(mean([u.get('fid_own') for u in util]), '.1f')} |")
    return "\n".join(lines)


def plot(curves: dict, path: Path) -> bool:
    """One ROC panel per (strategy, epsilon, client size, attack) into ``path``; False (and no
    file) when there is nothing to draw, e.g. every cell failed."""
    if not curves:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({k[:4] for k in curves}, key=str)
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (strategy, eps, images, attack) in zip(axes.flat, panels):
        for key, (f, t) in sorted(curves.items(), key=str):
            if key[:4] == (strategy, eps, images, attack):
                ax.plot(f, t, linewidth=1, label=f"client {key[4]}")
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        size = f", ~{images} images" if images else ""
        ax.set_title(f"{strategy}, ε {'∞' if math.isinf(eps) else f'{eps:g}'}{size}\n{attack}", fontsize=8)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


if __name__ == "__main__":
    sys.exit(main())
