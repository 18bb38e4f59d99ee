#!/usr/bin/env python
"""The strategies side by side on one setup: bytes, time and quality (SPEC §7, issue #6).

Runs each chosen strategy (default: all seven) through Flower's simulation engine on the
same data, models and clients, every one for the same number of generator steps per
client, plus PrivacyGAN variants (compressed wire formats, K > 1), then writes into ONE
results folder ``<output-dir>/compare-<UTC time>/``:

  results.md           the table (also printed) and the modeled-time table
  comparison.json      every number of the table, per-round curves, the analytic byte check
  bytes.png            cumulative training bytes vs rounds and vs generator steps
  quality_vs_bytes.png, quality_vs_time.png   (when the runs were scored)
  runs/                the run folders, logs/ their console output

    python simulations/compare_strategies.py                      # compare_digits.yaml, all strategies + variants
    python simulations/compare_strategies.py --strategies privacygan,bpgan,dataparallel --steps 100 --variants none
    python simulations/compare_strategies.py --dataset ring --quality-key high_quality_pct --target 50

In the experiment file (``--config``, run-config keys) ``num-rounds`` and ``eval-every``
count GENERATOR STEPS for the comparison: every strategy runs for that many steps per
client (rounds = steps ÷ its steps per round) and is scored every ``eval-every`` steps.
Flags override the file, ``--set key=value`` overrides everything.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.config import STRATEGIES, ConfigError, parse_config  # noqa: E402
from app import comparison as cmp  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from app.runs import run_folders  # noqa: E402
from simulations.common import CONFIGS, default_data_dir, parse_sets, read_experiment  # noqa: E402

DEFAULT_CONFIG = CONFIGS / "compare_digits.yaml"
#: Named variants (issue #6 item 2): (strategy, run-config changes, label).
VARIANTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "fakes-float16": ("privacygan", {"fakes-dtype": "float16"}, "privacygan fakes float16"),
    "fakes-uint8": ("privacygan", {"fakes-dtype": "uint8"}, "privacygan fakes uint8"),
    "feedback-float16": ("privacygan", {"feedback-dtype": "float16"}, "privacygan feedback float16"),
    "K2": ("privacygan", {"steps-per-round": 2}, "privacygan K=2"),
    "K4": ("privacygan", {"steps-per-round": 4}, "privacygan K=4"),
    "dp-alternating": ("dataparallel", {"dataparallel-mode": "alternating"}, "dataparallel alternating"),
    # FedAvg's Flower variants (issue #14): the same bytes as fedavg, another aggregation
    "fedprox": ("fedavg", {"fedavg-variant": "fedprox"}, "fedavg fedprox"),
    "fedadam": ("fedavg", {"fedavg-variant": "fedadam"}, "fedavg fedadam"),
    "fedyogi": ("fedavg", {"fedavg-variant": "fedyogi"}, "fedavg fedyogi"),
    "krum": ("fedavg", {"fedavg-variant": "krum"}, "fedavg krum"),
    "trimmed-mean": ("fedavg", {"fedavg-variant": "trimmed-mean"}, "fedavg trimmed-mean"),
}
TWO_D = ("ring", "grid")


class UsageError(ValueError):
    """A bad flag: the message names the flag, the value and what is allowed."""


# ======================================================================================
# Planning: which runs, with which config
# ======================================================================================
def parse_strategies(text: str | None) -> list[str]:
    if not text:
        return list(STRATEGIES)
    names = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in names if s not in STRATEGIES]
    if bad or not names:
        raise UsageError(f"--strategies {text!r}: unknown {', '.join(map(repr, bad)) or '(empty)'}; allowed: "
                         f"{', '.join(STRATEGIES)} (comma-separated)")
    return list(dict.fromkeys(names))


def parse_variants(text: str | None, dataset: str) -> tuple[list[tuple[str, str, dict]], list[str]]:
    """(label, strategy, changes) per variant, and notes on variants skipped for this dataset.

    ``text``: ``none``, or a comma-separated list of names from :data:`VARIANTS` and custom
    variants ``strategy:key=value[;key=value...]``. None = every named variant that fits the
    dataset (uint8 fakes only for images).
    """
    notes: list[str] = []
    if text is None:
        names = list(VARIANTS)
        if dataset.split(":", 1)[0] in TWO_D:
            names.remove("fakes-uint8")
            notes.append("variant fakes-uint8 skipped: uint8 fakes are for images, not 2-D points")
    elif text.strip().lower() == "none":
        return [], notes
    else:
        names = [s.strip() for s in text.split(",") if s.strip()]
    out = []
    for name in names:
        if name in VARIANTS:
            strategy, changes, label = VARIANTS[name]
            out.append((label, strategy, dict(changes)))
            continue
        if ":" not in name:
            raise UsageError(f"--variants {name!r}: not a named variant ({', '.join(VARIANTS)}) nor "
                             f"'strategy:key=value[;key=value...]'; or 'none'")
        strategy, _, rest = name.partition(":")
        strategy = strategy.strip()
        if strategy not in STRATEGIES:
            raise UsageError(f"--variants {name!r}: unknown strategy {strategy!r}; allowed: {', '.join(STRATEGIES)}")
        try:
            changes = parse_sets([p for p in rest.split(";") if p.strip()])
        except ConfigError as exc:
            raise UsageError(f"--variants {name!r}: {exc}") from exc
        if not changes:
            raise UsageError(f"--variants {name!r}: no key=value after '{strategy}:'")
        out.append((f"{strategy} " + " ".join(f"{k}={v}" for k, v in changes.items()), strategy, changes))
    unique = {label: (label, strategy, changes) for label, strategy, changes in out}   # a variant named twice runs once
    return list(unique.values()), notes


def plan_runs(base: dict[str, Any], strategies: list[str], variants: list[tuple[str, str, dict]], *,
              clients: int, steps: int, eval_steps: int, results: Path) -> list[dict]:
    """One entry per run: label, strategy, rounds, validated run config (raw mapping and Config).

    Every run gets ``min-nodes`` = clients, the rounds that give it ``steps`` generator
    steps per client, ``eval-every`` (and ``sample-every``) = ``eval_steps`` ÷ its steps
    per round, and its folder under ``results/runs``. Any invalid config raises before a
    single run starts.
    """
    entries = [(s, s, {}) for s in strategies] + [(label, s, ch) for label, s, ch in variants]
    runs = []
    for label, strategy, changes in entries:
        raw = {**base, **changes, "strategy": strategy, "min-nodes": clients, "output-dir": str(results),
               "run-name": label.replace(" ", "_"), "num-rounds": 1, "eval-every": 0, "sample-every": 0}
        try:
            full = parse_config(raw).to_run_config()   # every key resolved, defaults included
            raw["num-rounds"] = cmp.rounds_for_steps(full, steps)
            per_round = cmp.mean_generator_steps_per_round(full)
            every = max(1, round(eval_steps / per_round)) if eval_steps > 0 else 0
            raw["eval-every"], raw["sample-every"] = every, every
            cfg = parse_config(raw)
        except (ConfigError, ValueError) as exc:
            raise ConfigError(f"{label}: {exc}") from exc
        runs.append({"label": label, "strategy": strategy, "changes": changes, "raw": raw, "cfg": cfg,
                     "rounds": raw["num-rounds"], "steps_per_round": per_round})
    return runs


def baselines(runs: list[dict]) -> dict[str, str]:
    """Variant label -> label of the plain run of its strategy (the float32 / K=base row)."""
    plain = {r["strategy"]: r["label"] for r in runs if not r["changes"]}
    return {r["label"]: plain[r["strategy"]] for r in runs if r["changes"] and r["strategy"] in plain}


# ======================================================================================
# Running
# ======================================================================================
def run_one(entry: dict, clients: int, args, log_dir: Path) -> tuple[Path | None, float, str | None]:
    """Simulate one run; (run folder, seconds, error). Its console output goes to logs/<label>.log
    (shown with --verbose); a failure is reported, not raised, so the other runs still happen."""
    from simulations.common import simulate

    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"{entry['raw']['run-name']}.log"
    started = time.monotonic()
    before = set(run_folders(entry["raw"]["output-dir"]))
    with open(log, "w", encoding="utf-8") as fh:
        redirect = contextlib.nullcontext() if args.verbose else contextlib.redirect_stdout(fh)
        try:
            with redirect:
                folder = simulate(entry["cfg"], clients, client_cpus=args.client_cpus, client_gpus=args.client_gpus)
            return folder, time.monotonic() - started, None
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # noqa: BLE001 - a failed run is a row of the table, not the end
            fh.write(traceback.format_exc())
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:300]
            new = sorted(set(run_folders(entry["raw"]["output-dir"])) - before)
            return (new[-1] if new else None), time.monotonic() - started, f"{type(exc).__name__}: {reason}"


def analytic_check(run: cmp.RunData, clients_expected: int) -> dict:
    """The measured bytes next to the analytic formula (thesis Eq. 4.1/4.2 volumes from model
    sizes; ``comparison.analytic_bytes``) for the same rounds; ``match`` when all agree."""
    try:
        plan = cmp.recorded_mggan_plan(run) if run.strategy == "mggan" else None
        clients = 0 if run.strategy == "centralized" else clients_expected
        a = cmp.analytic_bytes(run.config, clients, len(run.metrics), plan=plan)
    except Exception as exc:  # noqa: BLE001 - the check is informative, never fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    m = cmp.measured_bytes(run)
    keys = ("down_total", "up_total", "steps")
    return {"match": all(a[k] == m[k] for k in keys), "analytic": {k: a[k] for k in (*keys, "down_per_step",
                                                                                      "up_per_step")},
            "g_params": a["g_params"], "d_params": a["d_params"], "messages": a["messages"]}


def write_outputs(results: Path, rows: list[dict], runs: list[dict], profiles: dict, args, *,
                  target: float | None, quality_key: str, notes: list[str], started: float, final: bool) -> str:
    """results.md, comparison.json and (at the end) the plots; returns the Markdown text."""
    base = baselines(runs)
    table = cmp.render_table(rows, baseline=base, target=target, quality_key=quality_key)
    times = cmp.render_time_table(rows, profiles)
    first = runs[0]["cfg"] if runs else None
    setup = (f"{first.dataset} (partition {first.partition}), {args.clients_used} clients, "
             f"G features {first.gen_features} / D features {first.disc_features}, batch {first.batch_size}, "
             f"{args.steps_used} generator steps per client" if first else "")
    checks = [r for r in rows if "analytic" in r]
    matched = sum(1 for r in checks if r["analytic"].get("match"))
    lines = [f"# Strategy comparison{' (partial)' if not final else ''}", "", f"Setup: {setup}.", "",
             table, "",
             "Bytes are training traffic only (evaluation and sample queries excluded), counted as Flower's "
             "`count_bytes` per message (strategies/wire.py). Per client per generator step = total ÷ clients ÷ "
             "generator steps per client; BPGAN shows its discriminator (DB) and generator (GB) blocks in "
             "parentheses. Wall time = sum of the rounds' measured `wall_time` on this machine (round 1, in "
             "parentheses, includes the simulation engine's start). Quality: the last evaluation "
             f"(`{quality_key}`), mean over a strategy's generators where it has several.",
             f"Analytic check (bytes from the models' sizes): {matched}/{len(checks)} runs match their recorded "
             "bytes exactly.", ""]
    lines += [f"## Modeled time per bandwidth profile (link: {args.link})", "", times, "",
              "Thesis Eq. 4.1/4.2 generalized (app/comparison.py `modeled_time`): per round the measured "
              "compute time + for each sequential message exchange the slowest client's bytes down ÷ downlink + "
              "bytes up ÷ uplink (`per-client`: every client on its own link, in parallel; `shared`: all traffic "
              "through one link, as the thesis' M·ω/v) + one round-trip latency. "
              + ("Round 1's compute is replaced by the median of the later rounds (engine start excluded)."
                 if args.warmup == "median" else "Round 1's compute includes the engine start."), ""]
    thesis = thesis_model(rows, profiles, args) if final else []
    if thesis:
        lines += ["## The thesis' closed-form model next to the measured bytes (data-parallel vs BPGAN)", "",
                  cmp.render_thesis_table(thesis), "",
                  f"Thesis §4.3 for {thesis[0]['iterations']:,} iterations of M = {thesis[0]['system']['M']} nodes: "
                  "ω and g the mean of G's and D's weight / gradient records, F a fake batch, L its labels and "
                  "feedback, v the harmonic mean of the profile's uplink and downlink, t_D, t_G, t_S measured on "
                  "this machine (one D gradient, one G gradient, one server optimizer step per byte); T_d = D/v is "
                  "left out (the data never moves). Measured bytes: the same runs' recorded bytes over one shared "
                  "link of the profile plus their measured compute and one round trip per exchange.", ""]
    if notes:
        lines += ["Notes:", ""] + [f"- {n}" for n in notes] + [""]
    lines += [f"Wall time of the whole comparison: {(time.monotonic() - started) / 60:.1f} min."]
    text = "\n".join(lines) + "\n"
    (results / "results.md").write_text(text)
    payload = {"setup": {"clients": args.clients_used, "steps": args.steps_used, "quality_key": quality_key,
                         "target": target, "link": args.link, "warmup": args.warmup,
                         "profiles": {n: vars(p) for n, p in profiles.items()}, "baselines": base},
               "rows": rows, "notes": notes, "final": final, "thesis_model": thesis}
    (results / "comparison.json").write_text(json.dumps(_jsonable(payload), indent=2, allow_nan=False))
    if final:
        cmp.plot_bytes(rows, results / "bytes.png")
        cmp.plot_quality(rows, results / "quality_vs_bytes.png", x="bytes", quality_key=quality_key, target=target)
        cmp.plot_quality(rows, results / "quality_vs_time.png", x="wall", quality_key=quality_key, target=target)
    return text


def thesis_model(rows: list[dict], profiles: dict, args) -> list[dict]:
    """Thesis Eq. 4.1–4.3 next to the measured-bytes model, when the comparison has both a
    plain data-parallel and a plain BPGAN run (empty otherwise)."""
    by_label = {r["label"]: r for r in rows if not r.get("error")}
    if "dataparallel" not in by_label or "bpgan" not in by_label:
        return []
    dp, bp = cmp.read_run(by_label["dataparallel"]["run"]), cmp.read_run(by_label["bpgan"]["run"])
    times = cmp.measure_step_times(dp.config)
    return cmp.thesis_rows(dp, bp, args.clients_used, profiles, times, warmup=args.warmup)


def _rounds_done(folder: Path) -> int:
    """Rounds recorded in a run folder's metrics.jsonl (0 when unreadable)."""
    try:
        return len(cmp.read_run(folder).metrics)
    except (OSError, ValueError):
        return 0


def _jsonable(obj: Any) -> Any:
    """Plain JSON: non-finite floats become null, paths and other objects strings."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def preflight(runs: list[dict]) -> None:
    """Stop before any run when image scores are asked for and the feature network is missing
    (the app's own check, ``app.server_app.feature_net``, gives the message saying how to get it)."""
    from app import server_app

    check = getattr(server_app, "feature_net", None)
    scored = [r for r in runs if r["cfg"].eval_every > 0]
    if check is None or not scored or getattr(server_app, "image_evaluation", lambda c: False)(scored[0]["cfg"]) is False:
        return
    check(scored[0]["cfg"])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML experiment file (default: %(default)s)")
    p.add_argument("--strategies", help=f"comma-separated, default all: {','.join(STRATEGIES)}")
    p.add_argument("--dataset", help="run-config 'dataset' for every run (e.g. digits, ring, cifar10; default: "
                                     "the file's)")
    p.add_argument("--clients", type=int, help="virtual clients (default: the file's min-nodes, else 4)")
    p.add_argument("--steps", type=int, help="generator steps per client for every strategy (default: the file's "
                                             "num-rounds, read as generator steps)")
    p.add_argument("--eval-every-steps", type=int,
                   help="score every N generator steps (default: the file's eval-every, read as steps; 0 = no "
                        "periodic scoring: images are then not scored, 2-D data only at the end)")
    p.add_argument("--variants", help="'none', or comma-separated: " + ", ".join(VARIANTS)
                   + ", or 'strategy:key=value[;key=value]' (default: all named ones that fit the data)")
    p.add_argument("--quality-key", help="score for the final-quality and bytes-to-target columns (default: fid; "
                                         "high_quality_pct on ring/grid)")
    p.add_argument("--target-fid", "--target", dest="target", type=float,
                   help="quality target for 'bytes to target' (FID: reached when <= it; default: none, no "
                        "bytes-to-target column values)")
    p.add_argument("--profiles", help="YAML/JSON file overriding or adding bandwidth profiles "
                                      "({name: {uplink_bps, downlink_bps, latency_s}}; default: the built-in ones)")
    p.add_argument("--link", choices=cmp.LINKS, default="per-client",
                   help="modeled time: each client on its own link (default) or all through one shared link")
    p.add_argument("--warmup", choices=("median", "keep"), default="median",
                   help="round 1's compute in the modeled time: median of later rounds (default) or as measured")
    p.add_argument("--output-dir", default=str(Path.cwd() / "fedgan-output"),
                   help="where compare-<time>/ goes (default: ./fedgan-output)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="run-config 'device' (default: the file's)")
    p.add_argument("--client-cpus", type=int, default=1, help="CPUs per virtual client (Ray resources)")
    p.add_argument("--client-gpus", type=float, default=None,
                   help="GPUs per virtual client (fractional; default 0 on CPU machines, 1/clients with CUDA)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any run-config key for every run (repeatable; default: none)")
    p.add_argument("--verbose", action="store_true", help="show every run's own progress lines")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    started = time.monotonic()
    try:
        base = read_experiment(args.config)
        if args.dataset:
            base["dataset"] = args.dataset
        if args.device:
            base["device"] = args.device
        base.update(parse_sets(args.set))
        strategies = parse_strategies(args.strategies)
        dataset = str(base.get("dataset", "digits"))
        if found := default_data_dir(dataset, str(base.get("data-dir") or "")):
            base["data-dir"] = found   # CIFAR-10: the offline copy beside the project when none is given
        clients = args.clients if args.clients is not None else int(base.get("min-nodes", 4))
        if clients < 1:
            raise UsageError(f"--clients {clients}: must be >= 1")
        if clients % 2 and ("bpgan" in strategies):
            raise UsageError(f"--clients {clients}: bpgan needs an even number of clients (DB/GB pairs); "
                             f"use an even number or leave bpgan out of --strategies")
        steps = args.steps if args.steps is not None else int(base.get("num-rounds", 200))
        if steps < 1:
            raise UsageError(f"--steps {steps}: must be >= 1 generator step")
        eval_steps = args.eval_every_steps if args.eval_every_steps is not None else int(base.get("eval-every", 0))
        if eval_steps < 0:
            raise UsageError(f"--eval-every-steps {eval_steps}: must be >= 0 (0 = score at the end only)")
        quality_key = args.quality_key or ("high_quality_pct" if dataset.split(":", 1)[0] in TWO_D else "fid")
        variants, notes = parse_variants(args.variants, dataset)
        try:
            profiles = cmp.load_profiles(args.profiles)
        except (OSError, ValueError) as exc:
            raise UsageError(f"--profiles {args.profiles}: {exc}") from exc
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        results = (Path(args.output_dir).expanduser().absolute() / f"compare-{stamp}")
        runs = plan_runs(base, strategies, variants, clients=clients, steps=steps, eval_steps=eval_steps,
                         results=results)
        preflight(runs)
    except (UsageError, ConfigError, FileNotFoundError) as exc:
        print(f"[compare] error: {exc}", file=sys.stderr, flush=True)
        return 1
    results.mkdir(parents=True)
    args.clients_used, args.steps_used = clients, steps
    print(f"[compare] {len(runs)} runs ({', '.join(r['label'] for r in runs)}), {clients} clients, {steps} generator "
          f"steps each; results in {results}", flush=True)
    rows: list[dict] = []
    for i, entry in enumerate(runs, 1):
        print(f"[compare] {i}/{len(runs)} {entry['label']}: {entry['rounds']} rounds x {entry['steps_per_round']:g} "
              f"generator step(s), eval every {entry['raw']['eval-every']} round(s) ...", flush=True)
        folder, seconds, error = run_one(entry, clients, args, results / "logs")
        row: dict[str, Any]
        complete = folder is not None and error is not None and _rounds_done(folder) == entry["rounds"]
        if error is None or complete:
            run = cmp.read_run(folder)
            row = cmp.summarize_run(run, label=entry["label"], quality_key=quality_key, target=args.target,
                                    profiles=profiles, link=args.link, warmup=args.warmup, run_seconds=seconds)
            row["analytic"] = analytic_check(run, clients)
            if error is not None:   # e.g. the final summary failed: every round is recorded, so it is reported
                row["warning"] = f"the run failed after its last round ({error}); numbers from its complete logs"
                notes.append(f"{entry['label']}: {row['warning']}")
            b = row["bytes"]
            print(f"[compare] {i}/{len(runs)} {entry['label']} done in {seconds:.1f} s: {b['total']:,} training bytes, "
                  f"{b['down_per_step']:,.0f} down / {b['up_per_step']:,.0f} up per client per G step, "
                  f"{cmp.format_quality(row['final'], quality_key)}", flush=True)
        else:
            row = {"label": entry["label"], "strategy": entry["strategy"], "error": error,
                   "run": str(folder) if folder else None, "run_seconds": seconds}
            print(f"[compare] {i}/{len(runs)} {entry['label']} FAILED after {seconds:.1f} s: {error} "
                  f"(log: {results / 'logs' / (entry['raw']['run-name'] + '.log')})", flush=True)
        rows.append(row)
        el = time.monotonic() - started
        print(f"[compare] elapsed {el / 60:.1f} min, ETA {el / i * (len(runs) - i) / 60:.1f} min", flush=True)
        write_outputs(results, rows, runs, profiles, args, target=args.target, quality_key=quality_key, notes=notes,
                      started=started, final=False)
    text = write_outputs(results, rows, runs, profiles, args, target=args.target, quality_key=quality_key,
                         notes=notes, started=started, final=True)
    print("\n" + text, flush=True)
    print(f"[compare] results in {results}", flush=True)
    return 0 if all(not r.get("error") and not r.get("warning") for r in rows) else 2


if __name__ == "__main__":
    sys.exit(main())
