#!/usr/bin/env python
"""Play the curious server: how well can it tell a client's training images from unseen ones?

For each strategy, one Flower simulation trains on digits split by class (the embedded demo's
setup; each client holds about 144 images of two digits), then the server attacks using only
what that strategy's server receives or may send:

* **probe** (PrivacyGAN): after the last round the server sends each client one more
  ``train.discriminate`` message -- through the real ClientApp handler -- whose "fakes" are
  real candidates: the client's own training images (members) and as many images of the same
  two digits that the client never held (non-members: the server's own share and the test
  split). Scores: the labels D_i returns (higher = judged real) and, separately, minus the L2
  norm of the feedback on each candidate. The client handles it as any round: one D_i step per
  batch with the candidates as fakes (members and non-members shuffled together), then labels.
* **samples** (every strategy): distance to the closest record. The generator the server (or
  the public) gets samples of -- PrivacyGAN's student of client i, ``local``'s client generator,
  FedAvg's global generator, read from the run folder's ``generators/`` -- draws ``--samples``
  images; a candidate's score is minus its distance to the closest sample.

Per strategy and client: ROC AUC with a bootstrap 95 % interval, TPR at 1 % and 0.1 % FPR.
Writes ``audit.json`` and ``roc.png`` into ``--out`` and prints a table. No differential privacy
is applied (issue #11: not implemented yet), so these are the leaks as they are.

    python simulations/privacy_audit.py --strategies privacygan local fedavg
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from app.audit import attack_report, dcr_scores, probe_batches, roc_points  # noqa: E402
from app.config import Config  # noqa: E402
from app.data import client_dataset, server_dataset, test_dataset  # noqa: E402
from app.generators import load_generator  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import add_common_flags, build_config, simulate  # noqa: E402

STRATEGIES = ("privacygan", "local", "fedavg")
GENERATOR_OF = {"privacygan": "student{pid}", "local": "client{pid}", "fedavg": "global"}


def say(text: str) -> None:
    print(f"[privacy_audit] {text}", flush=True)


def candidates(cfg: Config, pid: int, num_clients: int, limit: int, seed: int):
    """(members, non-members, classes): client ``pid``'s training images and as many images of
    its classes that no client holds (the server's share and the test split), each at most
    ``limit``, drawn with a seeded generator."""
    spec = cfg.data_spec()
    own = client_dataset(spec, pid, num_clients)
    classes = sorted({int(c) for c in own.y.tolist()})
    server, test = server_dataset(spec), test_dataset(spec)
    pool_x = torch.cat([server.x, test.x]) if len(server) else test.x
    pool_y = torch.cat([server.y, test.y]) if len(server) else test.y
    others = pool_x[torch.isin(pool_y, torch.tensor(classes))]
    n = min(len(own), len(others), limit)
    gen = torch.Generator().manual_seed(seed * 1009 + pid)
    members = own.x[torch.randperm(len(own), generator=gen)[:n]]
    nonmembers = others[torch.randperm(len(others), generator=gen)[:n]]
    return members, nonmembers, classes


def probe(grid, cfg: Config, num_clients: int, limit: int, seed: int) -> dict:
    """The PrivacyGAN probe through the grid, after training: candidates sent as fakes."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from strategies import wire

    nodes = list(grid.get_node_ids())
    asks = [Message(content=RecordDict({wire.CONFIG: ConfigRecord({"round": cfg.num_rounds + 1})}),
                    dst_node_id=nid, message_type=wire.INFO, group_id="audit") for nid in nodes]
    pid_of = {}
    for reply in grid.send_and_receive(asks, timeout=cfg.round_timeout):
        if not reply.has_error():
            pid_of[reply.metadata.src_node_id] = int(wire.metrics_of(reply.content)["partition_id"])
    out, msgs, layout = {}, [], {}
    for nid, pid in sorted(pid_of.items(), key=lambda kv: kv[1]):
        mem, non, classes = candidates(cfg, pid, num_clients, limit, seed)
        both = torch.cat([mem, non])
        order = torch.randperm(len(both), generator=torch.Generator().manual_seed(seed + pid))
        fakes, n = probe_batches(both[order], cfg.batch_size)
        layout[nid] = (pid, order, len(mem), n, classes, fakes.shape[0])
        content = RecordDict({
            wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(fakes, "float32")}),
            wire.CONFIG: ConfigRecord({"round": cfg.num_rounds + 1, "loss": cfg.loss, "fakes-dtype": "float32",
                                       "feedback-dtype": "float32", "client-disc-steps": cfg.client_disc_steps}),
        })
        msgs.append(Message(content=content, dst_node_id=nid, message_type=wire.DISCRIMINATE, group_id="audit"))
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error() or nid not in layout:
            continue
        pid, order, m, n, classes, k = layout[nid]
        labels = wire.get_tensor(reply.content.array_records[wire.REPLY], wire.LABELS).reshape(-1)[:n]
        feedback = wire.get_tensor(reply.content.array_records[wire.REPLY], wire.FEEDBACK)
        fb_norm = feedback.reshape(k * cfg.batch_size, -1).norm(dim=1)[:n]
        back = torch.empty(n, dtype=torch.long)
        back[order] = torch.arange(n)          # position of candidate j in the probe
        label_scores, fb_scores = labels[back].double(), -fb_norm[back].double()
        out[pid] = {"classes": classes, "members": m, "batches": k,
                    # D_i's step count as the client reports it: its training steps + one per probe batch
                    "d_steps_total": int(wire.metrics_of(reply.content)["d_steps_total"]),
                    "label": (label_scores[:m].numpy(), label_scores[m:].numpy()),
                    "feedback": (fb_scores[:m].numpy(), fb_scores[m:].numpy())}
    return out


def audit_server_app(cfg: Config, num_clients: int, limit: int, seed: int, holder: dict):
    """The project's ServerApp run, then (PrivacyGAN) the probe, in one ServerApp."""
    from flwr.serverapp import ServerApp

    from app.server_app import run

    app = ServerApp()

    @app.main()
    def main(grid, context) -> None:
        holder["folder"] = run(grid, cfg)
        if cfg.strategy == "privacygan":
            holder["probe"] = probe(grid, cfg, num_clients, limit, seed)

    return app


def sample_attack(run: Path, cfg: Config, num_clients: int, limit: int, seed: int, num_samples: int) -> dict:
    out = {}
    for pid in range(num_clients):
        G, meta = load_generator(run, GENERATOR_OF[cfg.strategy].format(pid=pid))
        G.train()   # batch statistics, as the run's own samples
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            x = torch.cat([G(torch.randn(min(500, num_samples - s), G.latent_dim, generator=gen))
                           for s in range(0, num_samples, 500)])
        mem, non, classes = candidates(cfg, pid, num_clients, limit, seed)
        out[pid] = {"classes": classes, "generator": meta["name"], "round": meta["round"],
                    "dcr": (dcr_scores(mem, x), dcr_scores(non, x))}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_flags(p, config_default="none, the embedded defaults (digits by class)", clients_default="5")
    p.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES),
                   help="strategies to train and attack, one simulation each")
    p.add_argument("--candidates", type=int, default=1000,
                   help="at most this many members (and as many non-members) per client")
    p.add_argument("--samples", type=int, default=2000, help="generated samples per generator for the DCR attack")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the AUC interval")
    p.add_argument("--seed-attack", type=int, default=0, help="seed of the candidate draw, probes and bootstrap")
    p.add_argument("--out", help="folder for audit.json and roc.png (default: <output-dir>/audit/<UTC time>)")
    args = p.parse_args(argv)
    clients = args.clients or 5
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    results, curves = [], {}
    started = time.monotonic()
    out_dir = None
    for strategy in args.strategies:
        args_set = [*args.set, f"strategy={strategy}", f"min-nodes={clients}", "client-eval=false"]
        cfg = build_config({}, argparse.Namespace(**{**vars(args), "set": args_set}), {})
        out_dir = Path(args.out) if args.out else Path(cfg.output_dir).expanduser() / "audit" / stamp
        say(f"{strategy}: training {cfg.num_rounds} rounds with {clients} clients")
        holder: dict = {}
        t0 = time.monotonic()
        run = simulate(cfg, clients, client_cpus=args.client_cpus, client_gpus=args.client_gpus,
                       server_app=audit_server_app(cfg, clients, args.candidates, args.seed_attack, holder))
        attacks, probe_steps = {}, {}
        if "probe" in holder:
            if len(holder["probe"]) < clients:
                say(f"{strategy}: only {len(holder['probe'])} of {clients} clients answered the probe")
            for pid, r in holder["probe"].items():
                attacks[("probe (labels)", pid)] = r["label"]
                attacks[("probe (feedback norm)", pid)] = r["feedback"]
                probe_steps[pid] = {"probe_batches": r["batches"], "client_d_steps_after_probe": r["d_steps_total"]}
        elif strategy == "privacygan":
            say("privacygan: the probe got no replies")
        for pid, r in sample_attack(run, cfg, clients, args.candidates, args.seed_attack, args.samples).items():
            attacks[(f"samples (DCR, {r['generator']})", pid)] = r["dcr"]
        for (attack, pid), (mem, non) in attacks.items():
            rep = attack_report(mem, non, resamples=args.bootstrap, seed=args.seed_attack)
            results.append({"strategy": strategy, "attack": attack, "client": pid,
                            "client_images": len(client_dataset(cfg.data_spec(), pid, clients)),
                            "probed_after_round": cfg.num_rounds, "run": str(run),
                            **(probe_steps.get(pid, {}) if attack.startswith("probe") else {}), **rep})
            curves[(strategy, attack, pid)] = roc_points(mem, non)
        say(f"{strategy}: {time.monotonic() - t0:.0f} s")
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = {"dataset": "digits", "partition": "classes", "clients": clients, "dp": False,
             "candidates_per_client": args.candidates, "samples": args.samples, "bootstrap": args.bootstrap,
             "seconds": round(time.monotonic() - started, 1)}
    (out_dir / "audit.json").write_text(json.dumps({"setup": setup, "results": results}, indent=2) + "\n")
    plot(curves, out_dir / "roc.png")
    print("\n| strategy | attack | client (images) | AUC [95 % CI] | TPR@1%FPR | TPR@0.1%FPR |\n|---|---|---|---|---|---|")
    for r in results:
        lo, hi = r["auc_ci95"]
        print(f"| {r['strategy']} | {r['attack']} | {r['client']} ({r['client_images']}) | {r['auc']:.3f} "
              f"[{lo:.3f}, {hi:.3f}] | {r['tpr_at_1pct_fpr']:.3f} | {r['tpr_at_0.1pct_fpr']:.3f} |")
    say(f"{len(results)} attack results in {out_dir / 'audit.json'}; ROC curves in {out_dir / 'roc.png'} "
        f"({setup['seconds']:.0f} s)")
    return 0


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    attacks = sorted({(s, a) for s, a, _ in curves})
    fig, axes = plt.subplots(1, len(attacks), figsize=(4 * len(attacks), 4), squeeze=False)
    for ax, (strategy, attack) in zip(axes[0], attacks):
        for (s, a, pid), (f, t) in sorted(curves.items()):
            if (s, a) == (strategy, attack):
                ax.plot(f, t, linewidth=1, label=f"client {pid}")
        ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
        ax.set_title(f"{strategy}\n{attack}", fontsize=9)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
