#!/usr/bin/env python
"""How much of each client's own data does its student generator learn, as α varies?

Runs the embedded demo (PrivacyGAN on digits, clients split by class, the server's
teacher trained on disjoint data) once per α, then classifies samples of every
client's student generator with a digits classifier and reports the share of samples
that fall in the client's own classes ("own-class share"; 2 of 10 classes per client,
so a generator that ignores its client scores about 0.2).

The classifier is scikit-learn's logistic regression on the 16x16 digits training
split (its test accuracy is printed); it is an evaluation tool only and never sees
anything a client sends.

    python simulations/digits_alpha.py --alphas 0.2 0.5 0.8 1.0
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from app.builders import make_generator  # noqa: E402
from app.config import parse_config  # noqa: E402
from app.data import load_dataset, partition_summary  # noqa: E402
from app.runs import RunFolder  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from simulations.common import add_common_flags, build_config, simulate  # noqa: E402


def digits_classifier(image_size: int):
    from sklearn.linear_model import LogisticRegression

    train = load_dataset("digits", image_size=image_size, split="train")
    test = load_dataset("digits", image_size=image_size, split="test")
    clf = LogisticRegression(max_iter=2000, C=0.5)
    clf.fit(train.x.reshape(len(train), -1).numpy(), train.y.numpy())
    acc = float((clf.predict(test.x.reshape(len(test), -1).numpy()) == test.y.numpy()).mean())
    return clf, acc


def own_class_shares(run: Path, clf, n: int = 1000) -> dict:
    folder = RunFolder.open(run)
    cfg = parse_config(json.loads((run / "config.json").read_text()))
    ckpt = folder.load_checkpoint("server.pt")
    plan = partition_summary(cfg.data_spec(), len(ckpt["students"]))
    z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    out = {}
    G = make_generator(cfg)
    G.load_state_dict(ckpt["teacher_g"])
    with torch.no_grad():
        pred = clf.predict(G(z).reshape(n, -1).numpy())
    out["teacher"] = {"histogram": np.bincount(pred, minlength=10).tolist()}
    for nid, part in ckpt["students"].items():
        pid = ckpt["partition_of"][nid]
        G.load_state_dict(part["g"])
        with torch.no_grad():
            pred = clf.predict(G(z).reshape(n, -1).numpy())
        own = plan[pid]["classes"]
        out[f"client {pid}"] = {"classes": own, "own_share": float(np.isin(pred, own).mean()),
                                "histogram": np.bincount(pred, minlength=10).tolist()}
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    add_common_flags(p, config_default="none, the embedded defaults (this sweep does not read a file)",
                     clients_default="5")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.2, 0.5, 0.8, 1.0],
                   help="JRLF weights alpha to run, one simulation each")
    args = p.parse_args(argv)
    clients = args.clients or 5
    clf, acc = digits_classifier(16)
    print(f"[digits_alpha] classifier: logistic regression, digits test accuracy {acc:.3f}")
    rows = []
    for alpha in args.alphas:
        args.set = [*args.set, f"alpha={alpha}", f"min-nodes={clients}"]
        cfg = build_config({}, args, {})
        run = simulate(cfg, clients, client_cpus=args.client_cpus, client_gpus=args.client_gpus)
        shares = own_class_shares(run, clf)
        mean = float(np.mean([v["own_share"] for k, v in shares.items() if k != "teacher"]))
        rows.append((alpha, mean, shares, run))
        (run / "own_class_share.json").write_text(json.dumps(shares, indent=2))
    print("\n| alpha | mean own-class share | per client | run folder |\n|---|---|---|---|")
    for alpha, mean, shares, run in rows:
        per = ", ".join(f"{k.split()[1]}:{v['own_share']:.2f}" for k, v in sorted(shares.items()) if k != "teacher")
        print(f"| {alpha} | {mean:.3f} | {per} | {run} |")
    print(f"(1,000 samples per client; classifier test accuracy {acc:.3f}; chance level 0.2)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
