#!/usr/bin/env python
"""Flower's own cost per message in a simulation: rounds of no-op messages through ``flwr run``.

A throwaway Flower app (written into a temporary folder) whose ServerApp sends every virtual
SuperNode one message per round and whose ClientApp answers at once: no model, no data, no
fedgan code in either. The payloads and the client state match a PrivacyGAN client of
``simulations/scale.py`` (``--payload-kb`` each way, ``--state-kb`` read and written in
``context.state``), and the server keeps ``--window`` messages unanswered and pulls every
``--poll`` seconds, as fedgan's exchange does (run config ``max-in-flight``, ``poll-interval``).
What a round costs here is the floor under any strategy's simulated round on this machine; the
median of rounds 2.. is printed per client count and written to ``engine_floor.json``.

    python simulations/engine_floor.py --clients 100 1000
    python simulations/engine_floor.py --clients 1000 --poll 0.1 0.02 --window 32 0
"""

from __future__ import annotations

import argparse
import itertools
import json
import re
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PYPROJECT = """\
[build-system]
requires = ["setuptools>=77"]
build-backend = "setuptools.build_meta"

[project]
name = "enginefloor"
version = "0.1.0"
description = "no-op messages: Flower's per-message floor"
license = "Apache-2.0"
dependencies = ["flwr[simulation]>=1.42,<1.43"]

[tool.setuptools]
packages = ["floor"]

[tool.flwr.app]
publisher = "fedgan"

[tool.flwr.app.components]
serverapp = "floor.apps:server"
clientapp = "floor.apps:client"

[tool.flwr.app.config]
rounds = 6
nodes = 2
payload-kb = 32.0
state-kb = 110.0
poll = 0.02
window = 0
"""

APPS = '''\
import time

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

server = ServerApp()
client = ClientApp()


def payload(kb):
    return RecordDict({"p": ArrayRecord({"x": Array(np.zeros(int(float(kb) * 256), dtype=np.float32))})})


@server.main()
def main(grid: Grid, context: Context) -> None:
    cfg = context.run_config
    while len(grid.get_node_ids()) < int(cfg["nodes"]):
        time.sleep(0.1)
    nodes = sorted(grid.get_node_ids())
    for rnd in range(1, int(cfg["rounds"]) + 1):
        t0 = time.monotonic()
        queue = [Message(content=payload(cfg["payload-kb"]), dst_node_id=n, message_type="query.noop",
                         group_id=str(rnd)) for n in nodes]
        window = int(cfg["window"]) or len(queue)
        waiting = set()
        while queue or waiting:
            if queue and len(waiting) < window:
                batch, queue = queue[: window - len(waiting)], queue[window - len(waiting):]
                waiting |= set(grid.push_messages(batch))
            for reply in grid.pull_messages(list(waiting)):
                waiting.discard(reply.metadata.reply_to_message_id)
            if queue or waiting:
                time.sleep(float(cfg["poll"]))
        print(f"[floor] round {rnd} nodes {len(nodes)} seconds {time.monotonic() - t0:.4f}", flush=True)


@client.query("noop")
def noop(msg: Message, context: Context) -> Message:
    kb = float(context.run_config["state-kb"])
    if kb > 0:   # a D_i-sized state read and written back, as a PrivacyGAN client does
        old = context.state.config_records.get("s")
        blob = bytes(int(kb * 1024)) if old is None else bytes(old["blob"])
        context.state.config_records["s"] = ConfigRecord({"blob": blob})
    return Message(content=payload(context.run_config["payload-kb"]), reply_to=msg)
'''

ROUND = re.compile(r"\[floor\] round (\d+) nodes (\d+) seconds ([0-9.]+)")


def write_app(folder: Path) -> Path:
    (folder / "floor").mkdir(parents=True, exist_ok=True)
    (folder / "pyproject.toml").write_text(PYPROJECT)
    (folder / "floor" / "__init__.py").write_text("")
    (folder / "floor" / "apps.py").write_text(APPS)
    return folder


def main(argv: list[str] | None = None) -> int:
    from app.launch import HelpFormatter
    from app.simulation import close_shared, shared_federation

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[100, 1000], help="virtual SuperNodes per run")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per run (the median leaves out round 1)")
    ap.add_argument("--payload-kb", type=float, default=32.0, help="KB each way per message (scale.py's fakes and "
                    "feedback: 32 x 1 x 16 x 16 float32)")
    ap.add_argument("--state-kb", type=float, default=110.0, help="KB of client state read and written per message")
    ap.add_argument("--poll", type=float, nargs="+", default=[0.02], help="seconds between the server's pulls")
    ap.add_argument("--window", type=int, nargs="+", default=[32], help="messages unanswered at once (0: all)")
    ap.add_argument("--output-dir", default="runs/engine_floor", help="where engine_floor.json is written")
    args = ap.parse_args(argv)
    if min(args.clients) < 2 or args.rounds < 2:
        ap.error("--clients must be >= 2 and --rounds >= 2 (round 1 includes start-up and is left out)")
    out_dir = Path(args.output_dir)
    rows = []
    with tempfile.TemporaryDirectory(prefix="engine-floor-") as tmp:
        app_dir = write_app(Path(tmp) / "app")
        fed = shared_federation()
        try:
            for n, poll, window in itertools.product(args.clients, args.poll, args.window):
                lines: list[str] = []
                res = fed.run({"rounds": args.rounds, "nodes": n, "payload-kb": args.payload_kb,
                               "state-kb": args.state_kb, "poll": poll, "window": window}, n, app_dir=app_dir,
                              echo=lines.append)
                rounds = [float(m.group(3)) for m in map(ROUND.search, lines) if m]
                if res.status != "finished:completed" or len(rounds) != args.rounds:
                    print(f"[engine_floor] {n} clients: the run ended {res.status}; its last lines:\n"
                          + "\n".join(lines[-20:]), file=sys.stderr)
                    return 1
                med = statistics.median(rounds[1:])
                rows.append({"clients": n, "poll_s": poll, "window": window, "round_s": rounds,
                             "median_round_s": med, "ms_per_message": 1e3 * med / n,
                             "payload_kb": args.payload_kb, "state_kb": args.state_kb})
                print(f"[engine_floor] {n} clients, window {window or 'all'}, poll {poll:g} s: "
                      f"{med:.3f} s / round, {1e3 * med / n:.2f} ms / message", flush=True)
        finally:
            close_shared()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "engine_floor.json").write_text(json.dumps(rows, indent=1))
    print(f"[engine_floor] {out_dir / 'engine_floor.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
