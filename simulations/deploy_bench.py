#!/usr/bin/env python
"""Seconds per round of a real deployment on loopback, and where they go.

Starts a real ``flower-superlink`` and two SuperNodes on 127.0.0.1 (app/loopback.py), each
with its own folder of digit images, and runs PrivacyGAN, BPGAN (one discriminator node with
data, one generator node) and MGGAN with tiny networks for a few rounds at K generator steps per
round (PrivacyGAN ``steps-per-round``, MGGAN ``local-steps``; BPGAN makes one generator step per
round). Each SuperNode is started either cold (plain ``flower-supernode``: a fresh
``flwr-clientapp`` process per message, and plain ``flower-superlink``) or warm
(``fedgan-supernode`` and ``fedgan-superlink``, app/warm.py).

With ``FEDGAN_TRACE`` set for every process, the server logs when it pushed each message and
when the reply arrived, and the ClientApp logs when its process started, when the app's import
began and ended, and how long its handler spent loading data and working; the script splits
every message's round trip into those segments (rounds 2.. only: round 1 includes first
contact and the FAB install).

    python simulations/deploy_bench.py                                    # cold and warm, K = 1 and 8
    python simulations/deploy_bench.py --launchers warm --strategies privacygan --ks 1 --rounds 4
    python simulations/deploy_bench.py --launchers warm --strategies privacygan --ks 1 --run-config "poll-interval=0.3"

Writes ``<out>/deploy_bench.json`` and ``<out>/deploy_bench.md`` (the tables of
docs/DEPLOYMENT.md). Timings depend on the machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.comparison import read_run  # noqa: E402
from app.launch import HelpFormatter  # noqa: E402
from app.loopback import Loopback, export_digits_folders  # noqa: E402
from app.runs import run_folders  # noqa: E402
from strategies.base import TRACE_ENV  # noqa: E402

TINY = ("teacher-steps=5 gen-features=8 disc-features=8 batch-size=8 sample-every=0 samples-per-client=4 "
        "node-wait-timeout=90 client-eval=false checkpoint-every=0")
SEGMENTS = ("deliver", "start", "import", "data", "work", "reply")
SEGMENT_NOTES = {
    "deliver": "server push -> ClientApp process exists (SuperNode pull: sleeps 3 s when idle; SuperExec poll; spawn/fork)",
    "start": "process start -> app import begins (Python + Flower start-up, task and message pulled, FAB checked)",
    "import": "import of the app's ClientApp module (torch, numpy, ... when cold)",
    "data": "the node's images loaded (decoded, or read from its cache)",
    "work": "the handler without data loading (state in, the GAN steps, state and reply out)",
    "reply": "handler returns -> server holds the reply (ClientApp push, SuperNode reply poll 0.5 s, server poll 0.1 s)",
}


def strategy_config(strategy: str, k: int, rounds: int) -> str:
    if strategy == "privacygan":
        return f"strategy=\"privacygan\" steps-per-round={k} num-rounds={rounds}"
    if strategy == "mggan":
        return f"strategy=\"mggan\" local-steps={k} regroup-interval=0 num-rounds={rounds}"
    if strategy == "bpgan":
        return f"strategy=\"bpgan\" num-rounds={rounds}"
    raise SystemExit(f"unknown strategy {strategy!r}: choose privacygan, bpgan or mggan")


def generator_steps(strategy: str, k: int) -> int:
    """Generator updates per client per round."""
    return 1 if strategy == "bpgan" else k


def add_nodes(lb: Loopback, strategy: str, folders: list[Path]) -> None:
    """Two SuperNodes; for BPGAN partition 0 is the discriminator node (with data) and 1 its generator node."""
    if strategy == "bpgan":
        lb.add_supernode(folders[0], partition_id=0, num_partitions=2, extra_config="role='discriminator'")
        lb.add_supernode(None, partition_id=1, num_partitions=2, extra_config="role='generator'")
    else:
        for i in range(2):
            lb.add_supernode(folders[i], partition_id=i, num_partitions=2)


def read_jsonl(path: Path) -> list[dict]:
    """The timing trace's lines (run folders are read with app.comparison.read_run)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def breakdown(trace: list[dict], since: float, until: float, skip_round: str = "1") -> dict:
    """Median seconds per segment over the messages of one run (joined by message id)."""
    push = {x["msg"]: x for x in trace if x.get("side") == "server" and x.get("event") == "push"
            and since <= x["t"] <= until}
    reply = {x["msg"]: x for x in trace if x.get("side") == "server" and x.get("event") == "reply"}
    rows = []
    for c in trace:
        if c.get("side") != "client" or c["msg"] not in push or c["msg"] not in reply:
            continue
        if str(c.get("round")) == skip_round or c.get("proc_start") is None:
            continue
        p, r = push[c["msg"]]["t"], reply[c["msg"]]["t"]
        rows.append({"deliver": c["proc_start"] - p, "start": c["import_start"] - c["proc_start"],
                     "import": c["import_end"] - c["import_start"], "data": c["data_s"],
                     "work": c["handler_end"] - c["handler_start"] - c["data_s"],
                     "reply": r - c["handler_end"], "total": r - p})
    if not rows:
        return {"messages": 0}
    out = {key: statistics.median(row[key] for row in rows) for key in (*SEGMENTS, "total")}
    out["messages"] = len(rows)
    return out


def bench_one(lb: Loopback, strategy: str, k: int, rounds: int, out: Path, trace_path: Path,
              extra: str = "") -> dict:
    run_out = out / f"runs-{strategy}-k{k}"
    cfg = f"{TINY} {strategy_config(strategy, k, rounds)} min-nodes=2 {extra} output-dir={json.dumps(str(run_out))}"
    since = time.time()
    t0 = time.monotonic()
    rc, output, run_id, status = lb.run(cfg, timeout=900)
    elapsed = time.monotonic() - t0
    until = time.time()
    if status != "finished:completed":
        tail = output[-3000:]
        raise SystemExit(f"[deploy-bench] {strategy} K={k}: run {run_id} ended {status}:\n{tail}")
    metrics = read_run(run_folders(run_out)[-1]).metrics
    walls = [float(m["wall_time"]) for m in metrics if int(m["round"]) >= 2]
    median = statistics.median(walls)
    steps = generator_steps(strategy, k)
    trace = read_jsonl(trace_path)
    pushes = [x["t"] for x in trace if x.get("side") == "server" and x.get("event") == "push" and since <= x["t"] <= until]
    return {"strategy": strategy, "k": k, "rounds": rounds, "run_id": run_id, "run_seconds": elapsed,
            # `flwr run` -> the server's first message: CLI, SuperLink, ServerApp start, teacher, waiting for nodes
            "start_to_first_message_s": (min(pushes) - since) if pushes else None,
            "round_s": walls, "median_round_s": median, "g_steps_per_round": steps,
            "g_steps_per_min_per_client": 60.0 * steps / median,
            "breakdown": breakdown(trace, since, until)}


def table(results: list[dict]) -> str:
    lines = ["| strategy | K | launchers | median s / round (rounds 2..) | G steps / min / client | "
             "s from `flwr run` to the first message |", "|---|---|---|---|---|---|"]
    for r in results:
        first = r.get("start_to_first_message_s")
        lines.append(f"| {r['strategy']} | {r['k']} | {r['launcher']} | {r['median_round_s']:.2f} | "
                     f"{r['g_steps_per_min_per_client']:.1f} | {'-' if first is None else f'{first:.1f}'} |")
    lines += ["", "Median seconds per message, server push to reply (rounds 2..):", "",
              "| strategy | K | SuperNodes | " + " | ".join(SEGMENTS) + " | total |",
              "|---|---|---|" + "---|" * (len(SEGMENTS) + 1)]
    for r in results:
        b = r["breakdown"]
        if not b.get("messages"):
            continue
        lines.append(f"| {r['strategy']} | {r['k']} | {r['launcher']} | "
                     + " | ".join(f"{b[s]:.2f}" for s in (*SEGMENTS, "total")) + " |")
    lines += [""] + [f"- **{s}**: {SEGMENT_NOTES[s]}" for s in SEGMENTS]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--strategies", nargs="+", default=["privacygan", "bpgan", "mggan"],
                   help="privacygan, bpgan and/or mggan (each on its own loopback deployment)")
    p.add_argument("--ks", nargs="+", type=int, default=[1, 8],
                   help="generator steps per round (PrivacyGAN steps-per-round, MGGAN local-steps; BPGAN runs 1)")
    p.add_argument("--rounds", type=int, default=6, help="rounds per run (round 1 is left out of the medians)")
    p.add_argument("--launchers", nargs="+", choices=("cold", "warm"), default=["cold", "warm"],
                   help="cold: plain flower-superlink/-supernode; warm: fedgan-superlink/-supernode (app/warm.py)")
    p.add_argument("--run-config", default="",
                   help="extra run config for every run, e.g. \"poll-interval=0.3\" (default: none)")
    p.add_argument("--out", default="fedgan-output/deploy-bench", help="folder for the deployments, runs and results")
    args = p.parse_args(argv)
    if args.rounds < 2:
        p.error("--rounds must be at least 2 (round 1 is left out of the medians)")
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    folders = export_digits_folders(out / "data", 2)
    results: list[dict] = []
    for launcher in args.launchers:
        for strategy in args.strategies:
            directory = out / f"{launcher}-{strategy}"
            trace_path = directory / "trace.jsonl"
            directory.mkdir(parents=True, exist_ok=True)
            trace_path.unlink(missing_ok=True)
            os.environ[TRACE_ENV] = str(trace_path)   # every process the loopback starts inherits it
            with Loopback(directory, [], warm=launcher == "warm") as lb:   # entering starts the SuperLink
                add_nodes(lb, strategy, folders)
                for k in (args.ks if strategy != "bpgan" else [1]):
                    print(f"[deploy-bench] {launcher} SuperLink and SuperNodes, {strategy}, K={k}, {args.rounds} rounds ...",
                          flush=True)
                    res = bench_one(lb, strategy, k, args.rounds, directory, trace_path, args.run_config)
                    res["launcher"] = launcher
                    results.append(res)
                    print(f"[deploy-bench]   median {res['median_round_s']:.2f} s/round, "
                          f"{res['g_steps_per_min_per_client']:.1f} G steps/min/client "
                          f"(rounds: {', '.join(f'{w:.1f}' for w in res['round_s'])})", flush=True)
                    (out / "deploy_bench.json").write_text(json.dumps(results, indent=1))
    md = table(results)
    (out / "deploy_bench.md").write_text(md)
    print(md)
    print(f"[deploy-bench] wrote {out / 'deploy_bench.json'} and {out / 'deploy_bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
