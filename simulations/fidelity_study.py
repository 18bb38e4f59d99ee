#!/usr/bin/env python
"""Does each PrivacyGAN student learn *its* client? A grid of levers on non-IID CIFAR-10.

PrivacyGAN's claim (thesis ch. 5) is that client i's student generator G_i learns client
i's distribution from D_i's feedback alone. This study runs one setting for a list of
levers, each a change to a baseline, with one or more seeds, and reports per client:

* **own-class share**: the share of G_i's samples that the CIFAR-10 evaluator classifier
  labels as one of the client's classes (2 of 10 held: an even spread scores 0.2);
* **TV to own labels**: total-variation distance between those labels and the client's;
* **FID against the client's own data** (the evaluator classifier's features).

All three are computed by each client on its own data at the last round (the run's
``client-eval`` report, SPEC 6); only the scores come back. The teacher row is scored here
by the study itself with the same code (``app.client_app.score_on_own_data``) on each
client's partition, because the teacher is not trained per client. The local-only lever
(``strategy=local``) trains one generator per client on its data alone with the same
generator steps, the comparison the claim has to beat.

    python simulations/train_evaluator.py --dataset cifar10      # once: the evaluator
    python simulations/fidelity_study.py                         # the CPU grid, classes setting
    python simulations/fidelity_study.py --levers baseline alpha=1 --seeds 0 1
    python simulations/fidelity_study.py --setting iid           # 1:100 IID clients
    python simulations/fidelity_study.py --scale gpu --device cuda    # 64-feature DCGANs, 5,000 steps

Every run is an ordinary run folder; the study folder holds study.json (every cell, as it
finishes: rerunning the same command with ``--out`` skips finished cells), study.md (the
tables), study.png (own-class share and FID per client and lever) and samples.png (a
grid: the teacher's row, then one row per student and one per local generator).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.builders import geometry  # noqa: E402
from app.config import ConfigError, parse_config  # noqa: E402
from app.data import DataError  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from app.metrics import classifier_path, ensure_classifier  # noqa: E402
from app.runs import RunFolderError  # noqa: E402
from simulations.common import (INTERRUPTED_EXIT, SHARED_CIFAR, add_common_flags, parse_sets,  # noqa: E402
                                simulate)
from strategies.base import STOP, RunFailed  # noqa: E402

# --- the settings ---------------------------------------------------------------------------
# The setting: 5 clients of 2 CIFAR-10 classes each; the server's teacher trained on
# held-out images (server-share 0.5 of the training set, disjoint from every client's).
COMMON = {
    "strategy": "privacygan", "dataset": "cifar10", "image-size": 32, "gen-features": 16, "disc-features": 16,
    "loss": "bce", "batch-size": 32, "alpha": 0.5, "teacher-steps": 2000, "num-rounds": 300,
    "steps-per-round": 2, "local-steps": 2, "server-data": "heldout", "client-eval": True, "eval-every": 0,
    "eval-samples": 2000, "server-gen-lr": 0.0002, "sample-every": 0, "checkpoint-every": 100, "samples-per-client": 8,
}
SETTINGS = {
    "classes": {"partition": "classes", "classes-per-client": 2},
    "iid": {"partition": "fraction", "fraction": 0.01},       # 1:100 of the training set each, all classes
}
SCALES = {
    "cpu": {},
    # the GPU-scale table the issue asks for: 64-feature DCGANs, 5,000 teacher and student steps
    "gpu": {"gen-features": 64, "disc-features": 64, "teacher-steps": 5000, "num-rounds": 2500, "batch-size": 64},
}
# lever name -> the run-config keys it changes from the baseline
LEVERS = {
    "baseline": {},
    "alpha=1": {"alpha": 1.0},                                  # no teacher term: D_i alone
    "alpha 0.5->1": {"alpha-final": 1.0},                       # start held by the teacher, end on D_i alone
    "D_i init teacher": {"client-d-init": "teacher"},           # D_i starts from the teacher's D
    "D_i steps 3": {"client-disc-steps": 3},                    # a stronger D_i per fake batch
    "teacher steps x3": {"teacher-steps": 3},                   # (a factor, see lever_config)
    "student steps x3": {"num-rounds": 3},                      # (a factor)
    "student steps x9": {"num-rounds": 9},                      # (a factor)
    "student lr x3": {"server-gen-lr": 3},                      # (a factor) the students move 3x faster
    # the server's own images (every class) go with each fake batch and D_i learns to reject them too,
    # so it must tell its client's classes from the others, not only real from fake (issue #17)
    "server negatives 16": {"server-negatives": 16},
    "server negatives 32": {"server-negatives": 32},
    # with negatives D_i has more to learn per fake batch (which classes, not only real vs fake): give it
    # 3 steps per batch -- client compute only, the bytes are those of "server negatives 16"
    "server negatives 16, D_i steps 3": {"server-negatives": 16, "client-disc-steps": 3},
    "local-only": {"strategy": "local"},
}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
FACTORS = {"teacher steps x3", "student steps x3", "student steps x9", "student lr x3"}   # value = a factor
DEFAULT_LEVERS = [lv for lv in LEVERS if lv != "student steps x9"]   # x9: ~25 min on 2 cores, ask for it


def lever_config(base: dict, lever: str) -> dict:
    """The run config of ``lever`` on ``base`` (factors multiply the base's value)."""
    if lever not in LEVERS:
        raise ConfigError(f"--levers: unknown lever {lever!r}; known: {', '.join(LEVERS)}")
    raw = dict(base)
    for key, value in LEVERS[lever].items():
        raw[key] = type(raw[key])(raw[key] * value) if lever in FACTORS else value
    return raw


def teacher_key(raw: dict) -> tuple:
    """Cells with equal keys share one teacher (trained by the first of them)."""
    keys = ("seed", "dataset", "partition", "classes-per-client", "fraction", "server-data", "server-share",
            "gen-features", "disc-features", "loss", "batch-size", "teacher-steps", "image-size", "latent-dim",
            "teacher-gen-lr", "teacher-disc-lr", "data-dir")
    return tuple(str(raw.get(k)) for k in keys)


# --- reading a finished run --------------------------------------------------------------------
def read_cell(run: Path) -> dict:
    """Per-client scores of the run's last-round client evaluation and its training bytes per client."""
    from app.comparison import read_run

    rounds = [r for r in read_run(run).metrics if "round" in r]
    if not rounds or not rounds[-1].get("client_eval"):
        raise RuntimeError(f"{run}: no client evaluation in metrics.jsonl (did the run finish?)")
    clients = {str(s["partition_id"]): {k: s[k] for k in ("own_share", "tv_own", "fid", "label_histogram") if k in s}
               for s in rounds[-1]["client_eval"].values()}
    total = sum(r.get("bytes_down", 0) + r.get("bytes_up", 0) for r in rounds)
    return {"run": str(run), "clients": clients, "rounds": len(rounds), "bytes_per_client": total / max(1, len(clients))}


def score_teacher(run: Path, num_clients: int) -> dict:
    """The teacher of ``run`` scored on each client's partition with the clients' own code."""
    import torch

    from app.client_app import score_on_own_data
    from app.data import client_dataset
    from app.generators import load_generator

    cfg = parse_config(json.loads((run / "config.json").read_text()))
    G, _ = load_generator(run, "teacher")
    G.eval()
    n = cfg.eval_samples
    out = {}
    with torch.no_grad():
        z = torch.randn(n, cfg.latent_dim, generator=torch.Generator().manual_seed(cfg.seed + 1000))
        fakes = torch.cat([G(z[i:i + 500]) for i in range(0, n, 500)])
    for pid in range(num_clients):
        data = client_dataset(cfg.data_spec(), pid, num_clients)
        m = dict(score_on_own_data(cfg, data, pid, fakes).metric_records["metrics"])
        out[str(pid)] = {"own_share": float(m["own_share"]), "tv_own": float(m["tv_own"]), "fid": float(m["fid"]),
                         "label_histogram": [int(v) for v in m["label_histogram"]]}
    return out


# --- the report --------------------------------------------------------------------------------
def mean_std(values: list[float]) -> str:
    import numpy as np

    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{np.mean(values):.2f}±{np.std(values):.2f}"


def tables(study: dict) -> str:
    """Markdown: one table per score, rows = teacher + levers, columns = clients (mean±std over seeds)."""
    cells = study["cells"]
    clients = sorted({c for cell in cells.values() for c in cell["clients"]}, key=int)
    rows = ["teacher"] + [lv for lv in study["levers"] if any(k.startswith(lv + " @") for k in cells)]
    out = []
    scores = [("own_share", "own-class share"), ("tv_own", "TV to own labels"),
              ("fid", "FID vs own data (evaluator classifier features)")]
    if study["setting"] == "iid":   # every client holds every class: the share is 1 by definition
        scores = scores[1:]
    # each row: its label, the per-client score dicts it averages, and its bytes/wall cells; a lever
    # that trained its own teacher gets that teacher's row just above its own
    table_rows = []
    for lv in rows:
        if lv == "teacher":
            table_rows.append((lv, list(study["teachers"].values()), "– | –"))
            continue
        src = [cell for k, cell in cells.items() if k.startswith(lv + " @")]
        own = [cell["teacher"] for cell in src if "teacher" in cell]
        if own:
            table_rows.append((f"teacher of '{lv}'", own, "– | –"))
        b = [cell["bytes_per_client"] for cell in src]
        w = [cell["wall_s"] for cell in src if cell["wall_s"]]
        table_rows.append((lv, [cell["clients"] for cell in src],
                           f"{sum(b) / len(b) / 1e6:,.1f} MB | {sum(w) / max(1, len(w)):,.0f}"))
    for score, name in scores:
        out.append(f"\n**{name}** ({study['setting']}, per client; mean±std over seeds {study['seeds']})\n")
        out.append("| lever | " + " | ".join(f"client {c} {study['client_classes'].get(c, '')}" for c in clients)
                   + " | mean | bytes/client | wall s |")
        out.append("|---" * (len(clients) + 4) + "|")
        for lv, src, extra in table_rows:
            per = {c: [s[c][score] for s in src if c in s] for c in clients}
            means = [sum(v) / len(v) for v in per.values() if v]
            out.append(f"| {lv} | " + " | ".join(mean_std(per[c]) for c in clients)
                       + f" | {sum(means) / max(1, len(means)):.2f} | {extra} |")
    return "\n".join(out)


def plot(study: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    cells = study["cells"]
    clients = sorted({c for cell in cells.values() for c in cell["clients"]}, key=int)
    rows = ["teacher"] + [lv for lv in study["levers"] if any(k.startswith(lv + " @") for k in cells)]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    width = 0.8 / len(rows)
    first = (("tv_own", "TV to own labels (lower is better)") if study["setting"] == "iid"
             else ("own_share", "own-class share (higher is better)"))
    for ax, score, title in ((axes[0], *first), (axes[1], "fid", "FID vs own data (lower is better)")):
        for i, lv in enumerate(rows):
            src = list(study["teachers"].values()) if lv == "teacher" else \
                [cell["clients"] for k, cell in cells.items() if k.startswith(lv + " @")]
            vals = [np.mean([s[c][score] for s in src if c in s]) if src else np.nan for c in clients]
            ax.bar(np.arange(len(clients)) + i * width - 0.4 + width / 2, vals, width, label=lv)
        ax.set_xticks(range(len(clients)), [f"client {c}\n{study['client_classes'].get(c, '')}" for c in clients],
                      fontsize=8)
        ax.set_title(title)
        if score == "own_share":
            ax.axhline(0.8, color="k", lw=0.8, ls="--")
            ax.set_ylim(0, 1)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle(f"PrivacyGAN fidelity study: {study['setting']}, seeds {study['seeds']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def sample_grid(study: dict, path: Path, lever: str, per_row: int = 12) -> None:
    """Rows: the teacher, then one per student of ``lever`` (seed of the first cell), then one per
    local-only generator when that lever ran."""
    import torch
    from torchvision.utils import save_image

    from app.generators import list_generators, load_generator

    cell = next((c for k, c in study["cells"].items() if k.startswith(lever + " @")), None)
    if cell is None:
        return
    run = Path(cell["run"])
    names = sorted(list_generators(run))
    rows = []
    z = torch.randn(per_row, 100, generator=torch.Generator().manual_seed(7))
    order = ["teacher"] + [n for n in names if n.startswith("student")]
    local = next((c for k, c in study["cells"].items() if k.startswith("local-only @")), None)
    sources = [(run, n) for n in order if n in names]
    if local is not None:
        sources += [(Path(local["run"]), n) for n in sorted(list_generators(Path(local["run"]))) if n.startswith("client")]
    for folder, name in sources:
        G, meta = load_generator(folder, name)
        G.eval()
        with torch.no_grad():
            rows.append(G(z[:, :meta["architecture"]["latent_dim"]]))
    if rows:
        save_image(torch.cat(rows) * 0.5 + 0.5, path, nrow=per_row, padding=1)


# --- the driver --------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    add_common_flags(p, config_default="none: the study's own settings (see COMMON in this file)",
                     clients_default="5")
    p.add_argument("--setting", choices=list(SETTINGS), default="classes",
                   help="classes: 2 CIFAR-10 classes per client; iid: 1:100 IID subsets")
    p.add_argument("--scale", choices=list(SCALES), default="cpu", help="cpu: 16-feature DCGANs, 600 student "
                   "steps; gpu: 64-feature DCGANs, 5,000 steps")
    p.add_argument("--levers", nargs="+", default=DEFAULT_LEVERS, metavar="LEVER",
                   help=f"levers to run (default: all): {', '.join(LEVERS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds, one run per lever and seed")
    p.add_argument("--data", help=f"CIFAR-10 location (default: {SHARED_CIFAR})")
    p.add_argument("--out", help="study folder (default: <output-dir>/fidelity-study/<setting>-<scale>); "
                                 "finished cells in its study.json are not run again")
    p.add_argument("--grid-lever", default="baseline", help="whose students fill samples.png's rows")
    args = p.parse_args(argv)
    clients = args.clients or 5
    try:
        base = {**COMMON, **SETTINGS[args.setting], **SCALES[args.scale], "min-nodes": clients,
                "min-replies": clients}
        if args.rounds:
            base["num-rounds"] = args.rounds
        if args.device:
            base["device"] = args.device
        base["output-dir"] = str(Path(args.output_dir or Path.cwd() / "fedgan-output").resolve())
        base.update(parse_sets(args.set))
        if base["dataset"] == "cifar10" and not base.get("data-dir"):
            data = Path(args.data or SHARED_CIFAR).expanduser().resolve()
            if not data.exists():
                raise DataError(f"{data}: no such file or folder (CIFAR-10; pass --data)")
            base["data-dir"] = str(data)
        for lever in args.levers:
            lever_config(base, lever)
        cfg0 = parse_config(base)   # a bad --set stops here, before anything runs
        geo = geometry(cfg0)
        if ensure_classifier(cfg0.dataset, geo.image_size, geo.channels, cfg0.evaluator_dir) is None:
            raise ConfigError(f"no '{cfg0.dataset}' evaluator classifier cached at "
                              f"{classifier_path(cfg0.dataset, geo.image_size, geo.channels, cfg0.evaluator_dir)}; "
                              f"train it first: python simulations/train_evaluator.py --dataset {cfg0.dataset}")
        out = Path(args.out) if args.out else Path(base["output-dir"]) / "fidelity-study" / f"{args.setting}-{args.scale}"
        out.mkdir(parents=True, exist_ok=True)
        study_file = out / "study.json"
        study = json.loads(study_file.read_text()) if study_file.is_file() else {}
        study.update({"setting": args.setting, "scale": args.scale, "clients": clients, "base": base,
                      "levers": list(dict.fromkeys([*study.get("levers", []), *args.levers])),
                      "seeds": sorted(set(study.get("seeds", [])) | set(args.seeds))})
        study.setdefault("cells", {})
        study.setdefault("teachers", {})
        study.setdefault("teacher_paths", {})
        from app.data import partition_summary
        plan = partition_summary(cfg0.data_spec(), clients)
        names = CIFAR10_CLASSES if base["dataset"] == "cifar10" else None
        study["client_classes"] = {str(i): "(" + ",".join(names[c] if names else str(c)
                                                          for c in pl.get("classes", [])[:4]) + ")"
                                   if args.setting == "classes" else "" for i, pl in enumerate(plan)}
        todo = [(lv, s) for s in args.seeds for lv in args.levers if f"{lv} @ seed {s}" not in study["cells"]]
        # privacygan cells first: the first one per teacher key trains the teacher the others load
        todo.sort(key=lambda t: LEVERS[t[0]].get("strategy") == "local")
        print(f"[fidelity] {args.setting} setting, {args.scale} scale, {clients} clients; {len(todo)} run(s) to go "
              f"({len(study['cells'])} done) -> {out}", flush=True)
        started = time.monotonic()
        for i, (lever, seed) in enumerate(todo, 1):
            raw = {**lever_config(base, lever), "seed": seed}
            key = "|".join(teacher_key(raw))
            if raw.get("strategy") == "privacygan" and key in study["teacher_paths"]:
                raw["teacher-path"] = study["teacher_paths"][key]
            print(f"[fidelity] run {i}/{len(todo)}: {lever} @ seed {seed} "
                  f"({'teacher loaded' if 'teacher-path' in raw else 'teacher trained' if raw['strategy'] == 'privacygan' else 'local-only'}); "
                  f"{time.monotonic() - started:.0f} s so far", flush=True)
            t0 = time.monotonic()
            run = simulate(parse_config(raw), clients, client_cpus=args.client_cpus, client_gpus=args.client_gpus)
            cell = read_cell(run)
            cell["wall_s"] = time.monotonic() - t0
            cell["lever"], cell["seed"], cell["config"] = lever, seed, LEVERS[lever]
            study["cells"][f"{lever} @ seed {seed}"] = cell
            if raw.get("strategy") == "privacygan" and key not in study["teacher_paths"]:
                study["teacher_paths"][key] = str(run / "checkpoints" / "teacher.pt")
                if raw["teacher-steps"] == base["teacher-steps"]:   # the teacher row: the baseline's teacher
                    study["teachers"][f"seed {seed}"] = score_teacher(run, clients)
                else:                                               # a lever's own teacher: its own row
                    cell["teacher"] = score_teacher(run, clients)
            study_file.write_text(json.dumps(study, indent=1))
            means = {k: sum(c[k] for c in cell["clients"].values()) / len(cell["clients"]) for k in ("own_share", "fid")}
            print(f"[fidelity] {lever} @ seed {seed}: own-class share "
                  + ", ".join(f"{c['own_share']:.2f}" for _, c in sorted(cell["clients"].items()))
                  + f" (mean {means['own_share']:.2f}); FID own mean {means['fid']:.1f}; {cell['wall_s']:.0f} s",
                  flush=True)
    except (ConfigError, DataError, RunFailed, RunFolderError) as exc:
        print(f"[fidelity] error: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        return INTERRUPTED_EXIT
    if STOP.is_set():
        return INTERRUPTED_EXIT
    text = (f"# PrivacyGAN fidelity study: {args.setting}, {args.scale} scale\n\n"
            f"{clients} clients; samples per generator {base['eval-samples']}, scored by each client on its own "
            f"data with the {base['dataset']} evaluator classifier (labels and FID features); "
            f"the teacher row is scored by the study with the same code.\n" + tables(study) + "\n")
    (out / "study.md").write_text(text)
    plot(study, out / "study.png")
    sample_grid(study, out / "samples.png", args.grid_lever)
    print(text)
    print(f"[fidelity] wrote {out / 'study.md'}, study.png, samples.png, study.json", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
