"""Flower client mods for the end-to-end tests, the ClientApps that carry them, and the helper
that runs one of those apps through ``flwr run``.

A test runs the project through the Simulation Engine exactly as a user does
(``simulations.common.simulate``, app/simulation.py); to look at or tamper with what crosses the
wire it stages a copy of the app whose ``clientapp`` is one of the ClientApps below (a Flower mod
wraps every message the virtual client handles). A mod runs in the virtual client's process, so
whatever it needs comes from the run config: it writes under the folder that holds the run's
``output-dir`` (the test's ``tmp_path``), in a subfolder named after the mod.
"""

from __future__ import annotations

import atexit
import io
import json
import os
import pickle
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import torch

from app.client_app import make_client_app
from strategies import wire
from strategies.bpgan import GB_STATE

HERE = Path(__file__).resolve()


# --------------------------------------------------------------------------- #
# running a staged app
# --------------------------------------------------------------------------- #
_STAGED: dict[str | None, Path] = {}


def simulate(cfg, num_clients: int, app: str | None = None, *, spread: bool = False):
    """Run ``cfg`` with ``num_clients`` virtual clients whose ClientApp is ``app`` (a name in this
    module, e.g. ``"tap_app"``; None: the project's own) and return its RunFolder. Ray offers
    ``$FEDGAN_RAY_CPUS`` CPUs (1 in tests: tests/conftest.py), so the clients take turns on one
    worker. ``spread``: one CPU per client instead, so every client has its own worker and a
    sleeping one blocks no one."""
    from app.runs import RunFolder
    from app.simulation import stage_app
    from simulations.common import simulate as run_simulated

    if app not in _STAGED:
        root = Path(tempfile.mkdtemp(prefix="fedgan-e2e-app-"))
        atexit.register(shutil.rmtree, root, True)
        _STAGED[app] = stage_app(root / "app", clientapp=f"e2e_mods:{app}" if app else None,
                                 extra={"e2e_mods.py": HERE} if app else None)
    folder = run_simulated(cfg, num_clients, app_dir=_STAGED[app], ray_cpus=num_clients if spread else None)
    return RunFolder.open(folder)


RUN_TAG = "FEDGAN_TEST_RUN"   # set in a test script's environment; everything the script starts inherits it


def tagged_env(tag: str) -> dict[str, str]:
    """This environment plus ``RUN_TAG=tag``, for a script whose processes a test will look for."""
    return {**os.environ, RUN_TAG: tag}


def simulation_processes(since: float, tag: str | None = None) -> set[int]:
    """Processes of a simulation started after ``since`` (epoch s): its SuperLink runs detached,
    so they are not descendants of the script -- the SuperLink and its warm launcher, the
    ServerApp, the simulation process, Ray, the watchdog (app/simulation.py). ``tag``: only those
    whose environment has ``RUN_TAG=tag`` (the script was started with :func:`tagged_env`), so
    that another simulation on the machine (a second test run, an experiment) is neither counted
    nor killed."""
    import psutil

    names = ("flower-superlink", "fedgan-superlink", "warm.py serve", "flwr-serverapp", "flwr-simulation",
             "raylet", "gcs_server", "ray::", "app.simulation watchdog", "ray.util.client.server",
             "ray/dashboard/", "log_monitor.py", "autoscaler/_private/monitor.py")
    out = set()
    for p in psutil.process_iter(["cmdline", "create_time"]):
        line = " ".join(p.info.get("cmdline") or [])
        if (p.info.get("create_time") or 0) >= since and any(n in line for n in names):
            if tag is not None:
                try:
                    if p.environ().get(RUN_TAG) != tag:
                        continue
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
            out.add(p.pid)
    return out


# --------------------------------------------------------------------------- #
# what a mod writes, and where
# --------------------------------------------------------------------------- #
def root_of(context) -> Path:
    """The test's folder: the parent of the run's ``output-dir``."""
    return Path(str(context.run_config["output-dir"])).parent


def keep(context, subfolder: str, record) -> None:
    folder = root_of(context) / subfolder
    folder.mkdir(exist_ok=True)
    (folder / f"{uuid.uuid4().hex}.pkl").write_bytes(pickle.dumps(record))


def read_kept(folder: Path) -> list:
    return [pickle.loads(p.read_bytes()) for p in Path(folder).iterdir()] if Path(folder).is_dir() else []


def describe(record_dict) -> dict:
    """Every record of a message as tensors (arrays) or plain values (bytes left out)."""
    out = {}
    for name, rec in record_dict.items():
        if name in record_dict.array_records:
            out[name] = {k: wire.get_tensor(rec, k) for k in rec.keys()}
        else:
            out[name] = {k: (v if not isinstance(v, bytes) else b"") for k, v in rec.items()}
    return out


def names(content) -> dict:
    """``record.key`` -> shape of every array of a message."""
    return {f"{rec}.{key}": tuple(content[rec][key].shape) for rec in content.array_records
            for key in content[rec].keys()}


# --------------------------------------------------------------------------- #
# the mods
# --------------------------------------------------------------------------- #
def tap(msg, context, call_next):
    """Every message a client receives and sends, in full (``taps/``)."""
    reply = call_next(msg, context)
    keep(context, "taps", {"partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type,
                           "node": int(context.node_id),
                           "down": describe(msg.content), "up": None if reply.has_error() else describe(reply.content),
                           "error": reply.error.reason if reply.has_error() else None})
    return reply


def shapes_tap(msg, context, call_next):
    """The array names and shapes of every message (``taps/``)."""
    reply = call_next(msg, context)
    keep(context, "taps", {"partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type,
                           "down": names(msg.content), "up": {} if reply.has_error() else names(reply.content)})
    return reply


def eval_tap(msg, context, call_next):
    """Arrays that came down (in full), names of the arrays and the metrics that went up (``taps/``)."""
    reply = call_next(msg, context)
    keep(context, "taps", {
        "partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type,
        "down_arrays": {f"{r}.{k}": wire.get_tensor(msg.content[r], k) for r in msg.content.array_records
                        for k in msg.content[r].keys()},
        "up_arrays": {} if reply.has_error() else {f"{r}.{k}" for r in reply.content.array_records
                                                    for k in reply.content[r].keys()},
        "up_metrics": {} if reply.has_error() else {k: v for r in reply.content.metric_records
                                                      for k, v in reply.content[r].items()},
        "error": reply.error.reason if reply.has_error() else None})
    return reply


def optimizer_summary(opt_state: dict) -> dict:
    """Kind, rate and step counts of an optimizer's ``state_dict()``: Adam keeps ``betas`` and the
    moments exp_avg/exp_avg_sq, RMSProp keeps ``alpha`` and square_avg."""
    group = opt_state["param_groups"][0]
    kind = "Adam" if "betas" in group else "RMSprop" if "alpha" in group else "?"
    return {"kind": kind, "lr": group["lr"], "state": sorted({k for st in opt_state["state"].values() for k in st}),
            "steps": sorted({int(st["step"]) for st in opt_state["state"].values()})}


def bpgan_state_tap(msg, context, call_next):
    """After each message, what came down and went up and -- on a BPGAN generator block -- its
    own G step count and G optimizer, read from ``context.state`` (not from a metric) (``taps/``)."""
    reply = call_next(msg, context)
    content = msg.content
    rec = {"partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type,
           "t": time.time_ns(), "error": reply.has_error(),
           "config": dict(content.config_records[wire.CONFIG]) if wire.CONFIG in content.config_records else {},
           "down": names(content), "up": {} if reply.has_error() else names(reply.content)}
    if GB_STATE in context.state.config_records:
        blob = torch.load(io.BytesIO(context.state.config_records[GB_STATE]["blob"]), weights_only=False)
        rec["gb"] = {"g_steps": int(blob["g_steps"]), "opt": optimizer_summary(blob["opt"])}
    keep(context, "taps", rec)
    return reply


def mu_tap(msg, context, call_next):
    """The ``proximal-mu`` each client was sent (None when absent) (``seen/``)."""
    cfg = msg.content.config_records.get("config")
    keep(context, "seen", None if cfg is None else cfg.get("proximal-mu"))
    return call_next(msg, context)


def corrupt(msg, context, call_next):
    """Partition p answers in a different broken way (0..3), 4+ answer well."""
    p = int(context.node_config["partition-id"])
    if p == 3:
        raise RuntimeError("simulated client crash")
    reply = call_next(msg, context)
    arrays = reply.content.array_records[wire.REPLY]
    if p == 0:   # wrong shape
        fb = wire.get_tensor(arrays, wire.FEEDBACK)
        arrays[wire.FEEDBACK] = type(arrays[wire.LABELS]).from_torch_tensor(fb[:, :-1].contiguous())
    elif p == 1:  # NaN in the feedback
        fb = wire.get_tensor(arrays, wire.FEEDBACK)
        fb[0, 0, 0, 0, 0] = float("nan")
        arrays[wire.FEEDBACK] = type(arrays[wire.LABELS]).from_torch_tensor(fb)
    elif p == 2:  # missing key
        del arrays[wire.LABELS]
    return reply


def scaled_feedback(reply, factor: float):
    rec = reply.array_records[wire.REPLY]
    labels, fb = wire.get_tensor(rec, wire.LABELS), wire.get_tensor(rec, wire.FEEDBACK)
    reply[wire.REPLY] = wire.tensor_record(**{wire.LABELS: labels, wire.FEEDBACK: fb * factor})
    return reply


def hostile(msg, context, call_next):
    """Node 1 sends feedback beyond any norm bound, node 2 a 2.4 MB extra record."""
    reply = call_next(msg, context)
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type == wire.DISCRIMINATE and not reply.has_error():
        if pid == 1:
            scaled_feedback(reply.content, 3e38 / 8)
        if pid == 2:
            reply.content["extra"] = wire.tensor_record(extra=torch.zeros(600_000))   # 2.4 MB
    return reply


def full_round_logged(out_dir: Path, partitions: int) -> bool:
    """Whether the run under ``out_dir`` has logged a round in which all ``partitions`` clients
    answered (metrics.jsonl; a line still being written is skipped)."""
    for path in out_dir.glob("runs/*/metrics.jsonl"):
        for line in path.read_text().splitlines():
            try:
                clients = json.loads(line).get("clients") or {}
            except json.JSONDecodeError:
                continue
            if all(any(k.startswith(f"client {p}") for k in clients) for p in range(partitions)):
                return True
    return False


def slow(msg, context, call_next):
    """Once the run has logged a round in which all three nodes answered, node 1 stops answering in
    time (it sleeps until the run has ended) and node 2 is late once, by ``round-timeout`` + 4 s;
    every other discriminate message takes 1 s. That full round is round 1 unless the workers'
    start-up outlasts ``round-timeout``; in the rounds after round 1 until then, node 0 waits (until
    half the round's timeout has passed since the server made the message, so that its own reply
    is never the one held up) for nodes 1 and 2 to have answered once: those rounds last as long as
    the start-up, not 1 s each."""
    pid = int(context.node_config["partition-id"])
    if msg.metadata.message_type != wire.DISCRIMINATE:
        return call_next(msg, context)
    out_dir = Path(str(context.run_config["output-dir"]))
    timeout = float(context.run_config["round-timeout"])
    root = root_of(context)
    once, answered = root / "slow-once-done", [root / f"slow-answered-{p}" for p in (1, 2)]
    warm = full_round_logged(out_dir, 3)
    if not warm and pid == 0 and int(msg.content.config_records[wire.CONFIG]["round"]) > 1:
        deadline = msg.metadata.created_at + timeout / 2     # created_at: epoch s, when the server made it
        while not all(f.exists() for f in answered) and time.time() < deadline:
            time.sleep(0.2)
    if warm and pid == 1:
        deadline = time.monotonic() + 300
        while not list(out_dir.glob("runs/*/summary.md")) and time.monotonic() < deadline:
            time.sleep(0.2)
    elif warm and pid == 2 and not once.exists():
        once.write_text("1")
        time.sleep(timeout + 4)
    else:
        time.sleep(1.0)
    reply = call_next(msg, context)
    (root / f"slow-answered-{pid}").write_text("1")
    return reply


tap_app = make_client_app(mods=[tap])
shapes_tap_app = make_client_app(mods=[shapes_tap])
eval_tap_app = make_client_app(mods=[eval_tap])
bpgan_state_app = make_client_app(mods=[bpgan_state_tap])
mu_tap_app = make_client_app(mods=[mu_tap])
corrupt_app = make_client_app(mods=[corrupt])
hostile_app = make_client_app(mods=[hostile])
slow_app = make_client_app(mods=[slow])
