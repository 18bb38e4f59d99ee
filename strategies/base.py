"""Mechanics every strategy shares (SPEC 4.1): finding nodes, sampling them, one
bounded ``send_and_receive`` exchange whose bad replies are dropped with a reason,
and the recorder interface through which a strategy reports (the app implements it).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import pickle
import random
import secrets
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

import numpy as np
import torch
from torch import nn

from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from models.dp import DPAccount, DPConfig, dp_discriminator_gradient, dp_discriminator_step, dp_train_gan_step
from models.dp import check_dp_loss, check_dp_module, poisson_sample, sample_rate
from models.losses import check_loss_kind, make_optimizer
from models.steps import sample_latent, train_gan_step
from strategies.wire import METRICS, BadReply, message_bytes

log = logging.getLogger("fedgan")

# Error codes Flower puts on error replies (notes/flower-1.42.md).
ERROR_CODES = {2: "ClientApp raised", 3: "message unavailable", 4: "reply unavailable",
               5: "node unavailable", 8: "ClientApp crashed"}


class RunFailed(RuntimeError):
    """The run cannot go on (too few nodes or good replies); the message says why."""


class RunInterrupted(RuntimeError):
    """The user asked the run to stop (Ctrl-C / SIGTERM); raised at the next safe point."""


# Set by a signal handler (simulations.common.stop_on_signals) in the main thread; the
# ServerApp thread sees it while it waits for replies and between rounds.
STOP = threading.Event()


def check_stop() -> None:
    """RunInterrupted when a stop was requested (a safe point: no update half-applied)."""
    if STOP.is_set():
        raise RunInterrupted("stopped by the user (SIGINT/SIGTERM)")


class Recorder(Protocol):
    """Where a strategy sends what it measures; the app writes it to the run folder."""

    def log_round(self, record: dict) -> None: ...
    def log_comm(self, rows: list[dict]) -> None: ...
    def save_samples(self, tag: str, rows: dict) -> None: ...
    def save_checkpoint(self, name: str, obj: object) -> None: ...
    def progress(self, rnd: int, metrics: dict) -> None: ...


class NullRecorder:
    """A recorder that keeps everything in memory (tests, scripted use)."""

    def __init__(self) -> None:
        self.rounds: list[dict] = []
        self.comm: list[dict] = []
        self.samples: dict[str, dict] = {}
        self.checkpoints: dict[str, object] = {}

    def log_round(self, record: dict) -> None:
        self.rounds.append(record)

    def log_comm(self, rows: list[dict]) -> None:
        self.comm.extend(rows)

    def save_samples(self, tag: str, rows: dict) -> None:
        self.samples[tag] = rows

    def save_checkpoint(self, name: str, obj: object) -> None:
        self.checkpoints[name] = obj

    def progress(self, rnd: int, metrics: dict) -> None:
        pass


@dataclass(frozen=True)
class GANSettings:
    """Knobs every GAN training loop here shares (the app fills them from the run config)."""

    num_rounds: int = 10
    batch_size: int = 64
    latent_dim: int = 100
    loss: str = "bce"
    gen_lr: float = 2e-4
    disc_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    sample_every: int = 25
    samples_per_client: int = 16
    eval_samples: int = 2500
    eval_every: int = 0        # 0 = evaluate only at the last round (when the app gives an evaluator)
    client_eval: bool = False  # per-client scores on the clients' own data (PrivacyGAN, local)
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        check_loss_kind(self.loss)


@dataclass(frozen=True)
class FederatedSettings(GANSettings):
    """... plus the mechanics of talking to clients (SPEC 4.1)."""

    fraction_train: float = 1.0
    min_nodes: int = 2
    min_replies: int = 1
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    max_reply_mb: float = 256.0       # a larger reply is dropped unread
    max_update_norm: float = 1e5      # L2 bound on a client's gradient / weight update


def should(every: int, rnd: int, last: int) -> bool:
    """True on multiples of ``every`` (0 = never) and on the last round."""
    return (every > 0 and rnd % every == 0) or rnd == last


class NodeBook:
    """Which partition each node reported, and the row label the run's outputs use."""

    def __init__(self, describe_partition: Callable[[int, int], str] | None = None) -> None:
        self.describe_partition = describe_partition
        self.partition_of: dict[int, int] = {}
        self.seen: set[int] = set()
        self.num_nodes = 0
        self.identified = False

    def note(self, nid: int, metrics: dict[str, float]) -> None:
        self.seen.add(nid)
        if "partition_id" in metrics:
            self.partition_of[nid] = int(metrics["partition_id"])

    def identify(self, metrics_by_node: dict[int, dict[str, float]], live: Iterable[int] | None = None) -> None:
        """Note the partitions of a round's replies. At the run's first exchange the nodes must
        be told apart (:func:`check_identities`, RunFailed otherwise). Later, a node reporting no
        valid partition id, or one a live node already holds, is reported and kept apart (its
        rows say "node <id>"); a node taking over the partition of a node that left is a rejoin."""
        if not self.identified and metrics_by_node:
            check_identities(metrics_by_node)
            self.identified = True
            for nid, metrics in metrics_by_node.items():
                self.note(nid, metrics)
            return
        alive = set(live) if live is not None else None
        for nid, metrics in metrics_by_node.items():
            self.seen.add(nid)
            if "partition_id" not in metrics or int(metrics["partition_id"]) < 0:
                if nid not in self.partition_of:
                    log.warning("node %s reports %s; kept apart as 'node %s'", nid,
                                f"partition id {int(metrics['partition_id'])}" if "partition_id" in metrics
                                else "no partition id", nid)
                continue
            pid = int(metrics["partition_id"])
            if self.partition_of.get(nid) == pid:
                continue
            holders = [o for o, p in self.partition_of.items() if p == pid and o != nid
                       and (alive is None or o in alive)]
            if holders:
                if nid not in self.partition_of:
                    log.warning("node %s claims partition %d, which node %s holds; kept apart as 'node %s'",
                                nid, pid, holders[0], nid)
                continue
            if nid in self.partition_of:
                log.warning("node %s now reports partition %d (was %d); keeping %d", nid, pid,
                            self.partition_of[nid], self.partition_of[nid])
                continue
            self.partition_of[nid] = pid

    def label(self, nid: int) -> str:
        pid = self.partition_of.get(nid)
        if pid is None:
            return f"node {nid}"
        if self.describe_partition is not None:
            return self.describe_partition(pid, self.num_nodes)
        return f"client {pid}"

    def order(self, nids) -> list[int]:
        return sorted(nids, key=lambda n: (self.partition_of.get(n, 1 << 62), n))


def check_identities(metrics_by_node: dict[int, dict[str, float]]) -> None:
    """RunFailed, naming the nodes, unless every node reports its own non-negative partition id.

    A node's partition id keys its random streams (real batches, latents), its row in the
    outputs and its state on resume; two nodes with the same one, or one without, would
    share streams (in data-parallel: identical latents in one global batch) and merge rows.
    """
    missing = sorted(nid for nid, m in metrics_by_node.items() if "partition_id" not in m)
    if missing:
        raise RunFailed(f"node(s) {', '.join(map(str, missing))} report no partition id; give every SuperNode its "
                        "own --node-config \"partition-id=<n>\" (it keys the node's random streams and its rows)")
    by_pid: dict[int, list[int]] = {}
    for nid, m in sorted(metrics_by_node.items()):
        by_pid.setdefault(int(m["partition_id"]), []).append(nid)
    negative = {pid: nids for pid, nids in by_pid.items() if pid < 0}
    if negative:
        pid, nids = next(iter(negative.items()))
        raise RunFailed(f"node(s) {', '.join(map(str, nids))} report partition id {pid}; partition ids are "
                        "integers >= 0")
    shared = {pid: nids for pid, nids in by_pid.items() if len(nids) > 1}
    if shared:
        pid, nids = next(iter(shared.items()))
        raise RunFailed(f"nodes {', '.join(map(str, nids))} all report partition id {pid}; every SuperNode needs "
                        "its own partition-id (it keys the node's random streams and its rows)")


def wait_for_nodes(grid: Grid, min_nodes: int, timeout: float, poll: float = 1.0) -> list[int]:
    """Node ids once at least ``min_nodes`` are connected; RunFailed after ``timeout`` s.

    ``grid.get_node_ids()`` can be empty at the very start of a run (SuperNodes still
    registering), so poll with a bound rather than failing at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= min_nodes:
            return nodes
        if time.monotonic() >= deadline:
            raise RunFailed(
                f"only {len(nodes)} node(s) connected after {timeout:.0f} s; run config 'min-nodes' "
                f"asks for {min_nodes}")
        time.sleep(poll)


def sample_nodes(nodes: list[int], fraction: float, minimum: int, rng: random.Random) -> list[int]:
    """A uniform sample of ``max(minimum, round(fraction * n))`` nodes (all when fewer)."""
    k = min(len(nodes), max(minimum, int(round(fraction * len(nodes)))))
    return sorted(rng.sample(nodes, k))


@dataclass
class Exchange:
    """Outcome of one exchange: good replies by node, dropped nodes with reasons, bytes."""

    replies: dict[int, object] = field(default_factory=dict)   # node -> parsed reply
    dropped: dict[int, str] = field(default_factory=dict)      # node -> reason
    bytes_down: dict[int, int] = field(default_factory=dict)
    bytes_up: dict[int, int] = field(default_factory=dict)
    late: dict[int, float] = field(default_factory=dict)       # node -> age (s) of a late reply discarded now


def _last_line(text: str, limit: int = 300) -> str:
    """The informative tail of an error reason (Ray wraps client tracebacks in pages of text,
    and its repr leaves quotes, brackets and escaped newlines at the end)."""
    text = str(text).replace("\\n", "\n")
    lines = [_unwrap(ln) for ln in text.splitlines()]
    lines = [ln for ln in lines if ln]
    return (lines[-1] if lines else "")[:limit]


def _unwrap(line: str) -> str:
    """A line without the quotes and unmatched closing brackets a repr() leaves at its end."""
    line = line.strip()
    while line:
        last = line[-1]
        if last in "'\",":
            line = line[:-1].rstrip()
        elif last in ")]}" and line.count(last) > line.count({")": "(", "]": "[", "}": "{"}[last]):
            line = line[:-1].rstrip()
        else:
            break
    return line


# --- timing trace (docs/DEPLOYMENT.md, "Where the seconds go") ---------------------------------
TRACE_ENV = "FEDGAN_TRACE"   # a file path: when set, both sides append one JSON line per event


def trace(**fields) -> None:
    """Append ``fields`` (plus wall-clock ``t`` and ``pid``) as one JSON line to ``$FEDGAN_TRACE``.
    Off (no cost beyond an environment lookup) unless that variable is set; never raises."""
    path = os.environ.get(TRACE_ENV)
    if not path:
        return
    fields.setdefault("t", time.time())
    fields.setdefault("pid", os.getpid())
    try:
        with open(path, "a") as fh:
            fh.write(json.dumps(fields) + "\n")
    except OSError as exc:
        log.warning("cannot write the timing trace %s: %s", path, exc)


# Messages sent and not yet answered, per grid: node -> (message id, time sent). A node with
# an unanswered message gets no new one (its queue would fill with stale work); its late
# reply is discarded when it comes.
DEFAULT_POLL_INTERVAL = 0.1   # seconds between pulls while waiting for replies (run config poll-interval = 0)
POLL_INTERVAL = DEFAULT_POLL_INTERVAL
# Unanswered messages at a time in one exchange (0: all at once). A simulation sets it (run config
# 'max-in-flight'): Flower 1.42's simulation engine scans every stored message for every node on
# each of its sweeps, so 1,000 messages queued at once cost it O(nodes x messages) per sweep.
MAX_IN_FLIGHT = 0


def set_max_in_flight(n: int) -> None:
    global MAX_IN_FLIGHT
    MAX_IN_FLIGHT = max(0, int(n))


def set_poll_interval(seconds: float) -> None:
    """Seconds between the server's pulls while it waits for replies (run config 'poll-interval';
    0 keeps 0.1 s). In a simulation each pull is a local call and a shorter interval refills the
    in-flight window sooner: with 1,000 no-op messages through Flower 1.42's engine, 32 in flight,
    a round took 10.5 s polling every 0.1 s and 8.9 s every 0.02 s (simulations/engine_floor.py,
    README "Many virtual clients")."""
    global POLL_INTERVAL
    POLL_INTERVAL = float(seconds) if seconds > 0 else DEFAULT_POLL_INTERVAL


_PENDING: "weakref.WeakKeyDictionary[Grid, dict[int, tuple[str, float]]]" = weakref.WeakKeyDictionary()


def _pending(grid: Grid) -> dict[int, tuple[str, float]]:
    return _PENDING.setdefault(grid, {})


def pending_nodes(grid: Grid) -> dict[int, float]:
    """Nodes still working on an earlier message, with how long ago it was sent (s)."""
    now = time.monotonic()
    return {nid: now - sent for nid, (_, sent) in _pending(grid).items()}


def collect_late(grid: Grid) -> dict[int, float]:
    """Pull late replies to earlier messages, discard them (logged); returns node -> age."""
    pending = _pending(grid)
    if not pending:
        return {}
    ids = {mid: nid for nid, (mid, _) in pending.items()}
    late: dict[int, float] = {}
    for reply in grid.pull_messages(list(ids)):
        nid = ids.get(reply.metadata.reply_to_message_id)
        if nid is None or nid not in pending:
            continue
        age = time.monotonic() - pending.pop(nid)[1]
        late[nid] = age
        log.warning("discarding a late reply from node %s (its message was sent %.0f s ago); the node gets "
                    "messages again from now on", nid, age)
    return late


def exchange(grid: Grid, messages: dict[int, Message], *, timeout: float,
             parse: Callable[[int, Message], object], max_reply_mb: float = 256.0,
             poll: float | None = None, on_reply: Callable[[dict[int, object]], None] | None = None) -> Exchange:
    """Send one message per node, wait at most ``timeout`` s, parse what comes back.

    Replies are matched to nodes by ``reply_to_message_id``. A reply that is an error,
    larger than ``max_reply_mb``, or that ``parse`` rejects with :class:`BadReply` (wrong
    shape, NaN, out of bounds...), or that never arrives, is dropped with a logged reason;
    the server never crashes on a client's reply. A node still busy with an unanswered
    earlier message is not sent a new one (dropped as "still busy"); late replies are
    discarded. A stop request (:data:`STOP`) ends the wait with :class:`RunInterrupted`.
    On a :class:`strategies.cohort.CohortGrid` the messages are to virtual nodes: the grid sends
    one merged message per real node and returns each virtual node's outcome as above.

    ``on_reply(parsed)``, when given, is called with {node: parsed reply} as good replies come in
    (those of one pull, after the window is refilled; a cohort's good ones at once), while the
    others are still out: the caller's work on them overlaps the clients' (PrivacyGAN updates those
    students). A stop request still
    ends the exchange with RunInterrupted; what was done with the replies before it stays in memory
    only (an interrupted run resumes from its last checkpoint).
    """
    check_stop()
    if hasattr(grid, "cohort_exchange"):   # strategies/cohort.py: one merged message per real node
        return grid.cohort_exchange(messages, timeout=timeout, parse=parse, max_reply_mb=max_reply_mb, poll=poll,
                                    on_reply=on_reply)
    out = Exchange(late=collect_late(grid))
    pending = _pending(grid)
    busy = pending_nodes(grid)
    to_send: dict[int, Message] = {}
    for nid, msg in messages.items():
        if nid in busy:
            out.dropped[nid] = (f"still busy: its reply to a message sent {busy[nid]:.0f} s ago has not come; "
                                "not sent a new one")
            continue
        to_send[nid] = msg
    queue = list(to_send.items())
    window = MAX_IN_FLIGHT if MAX_IN_FLIGHT > 0 else max(1, len(queue))
    waiting: dict[str, int] = {}
    pushed_at: dict[str, float] = {}

    def push_more() -> None:
        """Push queued messages until ``window`` are unanswered (all at once when unlimited)."""
        batch = queue[: window - len(waiting)]
        if not batch:
            return
        del queue[: len(batch)]
        now, now_wall = time.monotonic(), time.time()
        for mid, (nid, msg) in zip(grid.push_messages([m for _, m in batch]), batch):
            waiting[mid], pushed_at[mid] = nid, now
            out.bytes_down[nid] = message_bytes(msg)
            trace(side="server", event="push", msg=mid, node=nid, type=msg.metadata.message_type,
                  round=msg.metadata.group_id, t=now_wall)

    limit = int(max_reply_mb * 1e6)
    deadline = time.monotonic() + timeout
    push_more()
    while waiting or queue:
        fresh: dict[int, object] = {}
        for reply in grid.pull_messages(list(waiting)) if waiting else []:
            nid = waiting.pop(reply.metadata.reply_to_message_id, None)
            if nid is not None:
                trace(side="server", event="reply", msg=reply.metadata.reply_to_message_id, node=nid)
                _take(out, nid, reply, parse, limit, max_reply_mb)
                if nid in out.replies:
                    fresh[nid] = out.replies[nid]
        push_more()   # the window refilled first: the clients work while the caller handles what came
        if on_reply is not None and fresh:
            on_reply(fresh)
        if (not waiting and not queue) or time.monotonic() >= deadline or STOP.is_set():
            break
        time.sleep(POLL_INTERVAL if poll is None else poll)
    for mid, nid in waiting.items():   # their replies are discarded if they still come
        pending[nid] = (mid, pushed_at[mid])
    check_stop()   # a stop during the wait: the round is not completed with the replies that came
    for mid, nid in waiting.items():
        out.dropped[nid] = f"no reply within {timeout:.0f} s (it gets no new message until it answers)"
    for nid, _ in queue:
        out.dropped[nid] = (f"not sent: round-timeout ({timeout:.0f} s) ended before its turn (run config "
                            f"'max-in-flight' = {MAX_IN_FLIGHT} messages at a time)")
    for nid, why in out.dropped.items():
        log.warning("dropping node %s this round: %s", nid, why)
    return out


def _take(out: Exchange, nid: int, reply: Message, parse, limit: int, max_reply_mb: float) -> None:
    size = message_bytes(reply)
    out.bytes_up[nid] = size
    if reply.has_error():
        code = reply.error.code
        out.dropped[nid] = f"error reply (code {code}: {ERROR_CODES.get(code, 'unknown')}): {_last_line(reply.error.reason)}"
        return
    if size > limit:
        out.dropped[nid] = (f"reply of {size / 1e6:.1f} MB exceeds run config 'max-reply-mb' = {max_reply_mb:g}; "
                            "not read")
        return
    try:
        out.replies[nid] = parse(nid, reply)
    except BadReply as exc:
        out.dropped[nid] = f"bad reply: {exc}"


# --- guarded server-side updates (a bounded reply can still break a model) ---------------
def _tensors(obj) -> Iterable[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)


def all_finite(modules: Iterable[torch.nn.Module] = (), optimizers: Iterable[torch.optim.Optimizer] = ()) -> bool:
    """True when every parameter, buffer and optimizer-state tensor is finite."""
    for m in modules:
        for t in _tensors(m.state_dict()):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return False
    for opt in optimizers:
        for t in _tensors(opt.state_dict()["state"]):
            if t.is_floating_point() and not torch.isfinite(t).all():
                return False
    return True


def pack_state(obj: object) -> bytes:
    """A client's state (nested dicts / lists of tensors and Python scalars, e.g. a module's and an
    optimizer's ``state_dict()``) as bytes for ``context.state``: tensors become numpy arrays and
    the whole is pickled (protocol 5). About 4x cheaper to write and 2.5x to read than
    ``torch.save`` of the same dict for a small DCGAN D with Adam (0.22 / 0.46 ms against 0.87 /
    1.19 ms, measured in README "Many virtual clients"); the bytes never leave the client."""
    return pickle.dumps(_to_numpy(obj), protocol=5)


def unpack_state(blob: bytes) -> object:
    """:func:`pack_state` undone: numpy arrays come back as CPU tensors (``load_state_dict`` moves
    them to the module's device)."""
    return _to_torch(pickle.loads(blob))


def _map_tree(obj, leaf: type, fn, other=lambda x: x):
    """``obj`` with every ``leaf`` instance replaced by ``fn(it)`` through dicts, lists and tuples;
    anything else goes through ``other``."""
    if isinstance(obj, leaf):
        return fn(obj)
    if isinstance(obj, dict):
        return {k: _map_tree(v, leaf, fn, other) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tree(v, leaf, fn, other) for v in obj)
    return other(obj)


def _to_numpy(obj):
    return _map_tree(obj, torch.Tensor, lambda t: t.detach().cpu().numpy())


def _to_torch(obj):
    return _map_tree(obj, np.ndarray, torch.from_numpy)


class Snapshot:
    """The state of some modules and optimizers, to roll an update back.

    Tensors are cloned directly (``state_dict()`` values, the optimizer's per-parameter state);
    only the optimizer's small ``param_groups`` go through ``copy.deepcopy``. A deepcopy of the
    whole state dicts cost ~2 ms per tiny student and round, a quarter of its update."""

    def __init__(self, modules=(), optimizers=()) -> None:
        self.modules, self.optimizers = list(modules), list(optimizers)
        self.m_state = [{k: v.detach().clone() for k, v in m.state_dict().items()} for m in self.modules]
        self.o_state = [_clone_tree(o.state_dict()) for o in self.optimizers]

    def restore(self) -> None:
        for m, st in zip(self.modules, self.m_state):
            m.load_state_dict(st)
        for o, st in zip(self.optimizers, self.o_state):
            o.load_state_dict(_clone_tree(st))   # load_state_dict keeps what it is given: restore may repeat


def _clone_tree(obj):
    """Tensors cloned, containers rebuilt, anything else deep-copied (an optimizer's state_dict)."""
    return _map_tree(obj, torch.Tensor, lambda t: t.detach().clone(), copy.deepcopy)


def guarded_update(update: Callable[[], object], modules=(), optimizers=()) -> bool:
    """Run ``update``; if it leaves any parameter or optimizer state non-finite, roll it
    back and return False (the caller drops the reply that fed it)."""
    snap = Snapshot(modules, optimizers)
    update()
    if all_finite(snap.modules, snap.optimizers):
        return True
    snap.restore()
    return False


def apply_with_blame(apply: Callable[[list[int]], object], nodes: list[int], modules=(), optimizers=()) -> list[int]:
    """Apply an aggregate of the replies of ``nodes``; when it leaves the model or optimizer
    non-finite, find which node(s) did it (each reply applied alone) and apply the rest.
    Returns the blamed nodes (empty when the update went through at once)."""
    snap = Snapshot(modules, optimizers)
    apply(list(nodes))
    if all_finite(snap.modules, snap.optimizers):
        return []
    snap.restore()
    blamed = []
    for nid in nodes:
        apply([nid])
        if not all_finite(snap.modules, snap.optimizers):
            blamed.append(nid)
        snap.restore()
    good = [n for n in nodes if n not in blamed]
    if good:
        apply(good)
        if not all_finite(snap.modules, snap.optimizers):   # only together: drop the round's update
            snap.restore()
            blamed = list(nodes)
    return blamed


def require_replies(rnd: int, ex: Exchange, min_replies: int) -> None:
    """RunFailed when fewer than ``min_replies`` good replies came back from an exchange."""
    if len(ex.replies) < min_replies:
        items = list(ex.dropped.items())
        reasons = "; ".join(f"node {n}: {why}" for n, why in items[:3])
        if len(items) > 3:
            reasons += f"; and {len(items) - 3} more"
        timed_out = sum(why.startswith(("no reply within", "still busy")) for _, why in items)
        out_of_memory = sum("OutOfMemoryError" in why for _, why in items)
        hint = ""
        if timed_out:
            hint = (f". {timed_out} node(s) did not answer in time: raise run config 'round-timeout' (a round's "
                    "replies come one actor at a time: many virtual clients on few CPUs need minutes), or lower "
                    "'min-replies' / 'fraction-train'")
        if out_of_memory:
            hint += (f". {out_of_memory} node(s) lost their worker to Ray's memory monitor (the machine's memory "
                     "use passed RAY_memory_usage_threshold, 0.95 unless set): run fewer actors at once (more "
                     "CPUs per virtual client, or fewer CPUs for Ray: FEDGAN_RAY_CPUS), smaller networks or "
                     "'batch-size', fewer virtual clients per machine; or lower 'min-replies'")
        raise RunFailed(f"round {rnd}: {len(ex.replies)} good repl(ies), run config 'min-replies' asks for "
                        f"{min_replies} ({reasons}){hint}")



# =====================================================================================
# What the GAN baselines share: seeded networks, local GAN steps, one global (G, D) server
# =====================================================================================
def seeded_models(make_generator: Callable[[], nn.Module], make_discriminator: Callable[[], nn.Module],
                  seed: int, device: str) -> tuple[nn.Module, nn.Module]:
    """G and D initialised from ``seed`` without touching the global RNG, so every baseline
    (and every ``local`` client) starts from the very same networks for a given seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        G, D = make_generator(), make_discriminator()
    G.to(device).train()
    D.to(device).train()
    return G, D


def fixed_latents(n: int, latent_dim: int, seed: int, device: str) -> torch.Tensor:
    """Latents of the sample grids and of the final evaluation (the same every round)."""
    return sample_latent(n, latent_dim, generator=torch.Generator(device=device).manual_seed(seed), device=device)


def param_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def gan_config(*, loss: str, gen_lr: float, disc_lr: float, beta1: float, beta2: float, batch_size: int,
               steps: int, disc_steps: int, rnd: int, seed: int) -> ConfigRecord:
    """The settings a client needs for local GAN steps (sent with every training message)."""
    return ConfigRecord({"round": rnd, "loss": loss, "gen-lr": gen_lr, "disc-lr": disc_lr, "beta1": beta1,
                         "beta2": beta2, "batch-size": batch_size, "steps": steps, "client-disc-steps": disc_steps,
                         "seed": seed})


def gan_optimizers(cfg: ConfigRecord, G: nn.Module, D: nn.Module):
    loss, betas = str(cfg["loss"]), (float(cfg["beta1"]), float(cfg["beta2"]))
    return (make_optimizer(loss, G.parameters(), float(cfg["gen-lr"]), betas),
            make_optimizer(loss, D.parameters(), float(cfg["disc-lr"]), betas))


def local_gan_steps(G, D, opt_g, opt_d, *, sample_real, cfg: ConfigRecord, seed: int, partition_id: int | None,
                    steps_done: int, device: str, dp: "ClientDP | None" = None) -> dict[str, float]:
    """``cfg['steps']`` base-GAN steps on this client's data; mean statistics of the steps.

    Real batches and latents are drawn from generators seeded by the client's seed,
    its partition id and its step count, so reruns are reproducible. With ``dp`` every D step
    is a DP-SGD step on its own Poisson batch (:meth:`ClientDP.train_gan_step`).
    """
    pid = partition_id or 0
    data_gen = torch.Generator().manual_seed(seed * 1_000_003 + pid * 7919 + steps_done)
    latent_gen = torch.Generator(device=device).manual_seed(seed * 31 + pid * 131 + steps_done)
    loss, batch = str(cfg["loss"]), int(cfg["batch-size"])
    n, d_steps = int(cfg["steps"]), int(cfg["client-disc-steps"])
    totals: dict[str, float] = {}
    for _ in range(n):
        if dp is not None:
            out = dp.train_gan_step(G, D, opt_g, opt_d, kind=loss, d_steps=d_steps, generator=latent_gen)
        else:
            real = sample_real(batch, data_gen).to(device=device, dtype=param_dtype(D))
            out = train_gan_step(G, D, opt_g, opt_d, real, kind=loss, d_steps=d_steps, generator=latent_gen)
        for k, v in out.items():
            totals[k] = totals.get(k, 0.0) + v
    return {k: v / max(1, n) for k, v in totals.items()}


# =====================================================================================
# Differential privacy on the client (models/dp.py): one ledger per client in context.state
# =====================================================================================
DP_STATE = "dp"            # ConfigRecord in a client's context.state: its DPAccount as plain lists
DP_EPSILON = "dp_epsilon"  # reply metric: epsilon so far at dp-delta
DP_EXHAUSTED = "dp_exhausted"  # reply metric: 1 when the client stopped at dp-target-epsilon


class ClientDP:
    """A client's DP-SGD state for one message: its settings (``dp``: the noise multiplier
    already resolved for this client by the app), its private records ``data`` (n of them,
    Poisson-sampled at q = batch_size / n), its accountant (from ``state``) and seeded
    generators for the sampling and the noise.

    Their seed is a per-client *secret* drawn from the OS (``secrets``) at the client's first DP
    step and kept in its ``context.state`` next to the accountant, never sent: the run's
    ``seed`` is known to the server, and noise (or a batch draw) the server could recompute
    would give no privacy at all. So DP runs are not bit-reproducible across reruns; within a
    client the generators continue from the number of steps taken. (``seed`` and
    ``partition_id`` are accepted for a uniform signature and not used for the draws.)"""

    def __init__(self, dp: DPConfig, state, data: torch.Tensor, *, batch_size: int, seed: int,
                 partition_id: int | None, device: str) -> None:
        if data is None:
            raise ValueError("a DP client needs its records (real_data) to Poisson-sample from")
        self.cfg, self.state, self.data, self.device = dp, state, data, device
        self.n = int(data.shape[0])
        self.batch_size = int(batch_size)
        self.q = sample_rate(self.batch_size, self.n)
        self.sigma = float(dp.noise_multiplier)
        rec = state.config_records[DP_STATE] if DP_STATE in state.config_records else None
        self.account = DPAccount.from_plain(rec) if rec is not None else DPAccount()
        self.secret = int(rec["secret"]) if rec is not None and "secret" in rec else secrets.randbits(62)
        base = (self.secret + 2 * self.account.steps) % (1 << 63)
        self.sample_gen = torch.Generator().manual_seed(base)
        self.noise_gen = torch.Generator(device=device).manual_seed((base + 1) % (1 << 63))

    # --- budget -----------------------------------------------------------------------------
    def exhausted(self, steps_more: int) -> bool:
        """Whether ``steps_more`` DP steps would take epsilon above ``dp-target-epsilon``."""
        return self.account.would_exceed(self.cfg.target_epsilon, self.cfg.delta, steps_more,
                                         noise_multiplier=self.sigma, sample_rate=self.q)

    def epsilon(self) -> float:
        return self.account.epsilon(self.cfg.delta)

    def save(self) -> None:
        """Keep the accountant and the secret seed in ``context.state`` (client-local)."""
        self.state.config_records[DP_STATE] = ConfigRecord({**self.account.to_plain(), "secret": self.secret})

    def metrics(self) -> dict[str, float]:
        """What a reply says about privacy: ``dp_epsilon`` (at dp-delta, all steps so far)."""
        return {DP_EPSILON: self.epsilon()}

    def exhausted_metrics(self, partition_id: int | None) -> dict:
        """The whole reply of a client that stopped at its target: no gradient, no step."""
        out = {DP_EXHAUSTED: 1, DP_EPSILON: self.epsilon()}
        if partition_id is not None:
            out["partition_id"] = int(partition_id)
        return out

    # --- the DP steps -------------------------------------------------------------------------
    def real_batch(self, dtype: torch.dtype) -> torch.Tensor:
        idx = poisson_sample(self.n, self.q, self.sample_gen)
        return self.data[idx].to(device=self.device, dtype=dtype)

    def _kw(self) -> dict:
        return {"expected_batch": self.q * self.n, "noise_multiplier": self.sigma,
                "max_grad_norm": self.cfg.max_grad_norm, "noise_generator": self.noise_gen,
                "clip_public": self.cfg.clip_public}

    def _count(self) -> None:
        self.account.step(self.sigma, self.q)

    def discriminator_step(self, D: nn.Module, opt: torch.optim.Optimizer, fake: torch.Tensor,
                           kind: str, negatives: torch.Tensor | None = None) -> dict[str, float]:
        """One DP-SGD step of ``D`` on a fresh Poisson batch and ``fake`` (counted); ``negatives``:
        public images D learns to reject, an unclipped term like the fakes' (models.dp)."""
        stats = dp_discriminator_step(D, opt, self.real_batch(param_dtype(D)), fake, kind, negatives=negatives,
                                      **self._kw())
        self._count()
        return stats

    def discriminator_gradient(self, D: nn.Module, fake: torch.Tensor,
                               kind: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """The DP gradient of D's objective on a fresh Poisson batch and ``fake`` (counted), not stepped."""
        grads, stats = dp_discriminator_gradient(D, self.real_batch(param_dtype(D)), fake, kind, **self._kw())
        self._count()
        return grads, stats

    def train_gan_step(self, G, D, opt_g, opt_d, *, kind: str, d_steps: int,
                       generator: torch.Generator | None) -> dict[str, float]:
        """``d_steps`` DP D steps (each counted) and one generator step."""
        return dp_train_gan_step(G, D, opt_g, opt_d, lambda: self.real_batch(param_dtype(D)), kind=kind,
                                 batch_size=self.batch_size, d_steps=d_steps, generator=generator,
                                 on_d_step=self._count, **self._kw())

    @classmethod
    def begin(cls, dp: DPConfig | None, state, real_data: torch.Tensor | None, D: nn.Module, kind: str, *,
              batch_size: int, steps_more: int, seed: int, partition_id: int | None,
              device: str) -> tuple["ClientDP | None", RecordDict | None]:
        """How every DP client function opens: ``(None, None)`` when ``dp`` is off; otherwise
        checks ``D`` and the loss (:meth:`check`), loads the client's ledger and returns
        ``(private, None)``, or ``(private, reply)`` when ``steps_more`` DP steps would exceed
        ``dp-target-epsilon`` — ``reply`` is then the whole metrics-only reply content
        (``dp_exhausted`` = 1) and the caller must return it without training."""
        if dp is None:
            return None, None
        if state is None:
            raise ValueError("a DP client needs its context.state (its privacy accountant lives there)")
        cls.check(D, kind)
        private = cls(dp, state, real_data, batch_size=batch_size, seed=seed, partition_id=partition_id,
                      device=device)
        if private.exhausted(steps_more):
            return private, RecordDict({METRICS: MetricRecord(private.exhausted_metrics(partition_id))})
        return private, None

    @staticmethod
    def check(D: nn.Module, kind: str) -> None:
        """ValueError for a D / loss DP-SGD cannot handle (BatchNorm, a gradient penalty)."""
        check_dp_loss(kind)
        check_dp_module(D)


def check_dp_reply(metrics: dict) -> None:
    """BadReply for the reply of a client that stopped at ``dp-target-epsilon``: it carries no
    update, is dropped with this reason (logged, naming the node) and does not count as a
    training reply; the run fails when fewer than ``min-replies`` clients can still train."""
    if metrics.get(DP_EXHAUSTED, 0):
        part = f"client of partition {int(metrics['partition_id'])}: " if "partition_id" in metrics else ""
        raise BadReply(f"{part}its differential-privacy budget is spent (dp_epsilon = "
                       f"{metrics.get(DP_EPSILON, float('nan')):.3f}; its next steps would exceed run config "
                       "'dp-target-epsilon'): it no longer trains and does not count as a training reply")


def dp_columns(metrics: dict) -> dict:
    """The DP values of a reply's metrics that go into a round record's per-client row."""
    return {k: metrics[k] for k in (DP_EPSILON,) if k in metrics}


class GlobalGANServer:
    """What the servers holding one global (G, D) share — data-parallel and FedAvg: the
    sample grid, the final evaluation and the round loop. A subclass provides
    ``run_round(grid, rnd, nodes) -> record`` and ``checkpoint(rnd) -> dict``."""

    name = "GlobalGAN"

    def __init__(self, settings, *, make_generator: Callable[[], nn.Module],
                 make_discriminator: Callable[[], nn.Module], recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None, device: str = "cpu",
                 sample_shape: tuple[int, ...] | None = None, with_optimizers: bool = True) -> None:
        s = self.s = settings
        self.device = device
        self.recorder = recorder
        self.evaluate = evaluate
        self.G, self.D = seeded_models(make_generator, make_discriminator, s.seed, device)
        if with_optimizers:
            betas = (s.beta1, s.beta2)
            self.opt_g = make_optimizer(s.loss, self.G.parameters(), s.gen_lr, betas)
            self.opt_d = make_optimizer(s.loss, self.D.parameters(), s.disc_lr, betas)
        self.fixed_z = fixed_latents(s.samples_per_client, s.latent_dim, s.seed + 29, device)
        self.last_eval: dict = {}
        self.sample_shape = tuple(sample_shape) if sample_shape else None
        self.first_round = 1          # a subclass's restore() moves it past a checkpoint's round

    # --- outputs --------------------------------------------------------------------------
    def samples(self) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            return {"global": self.G(self.fixed_z.to(param_dtype(self.G))).cpu()}

    def finish_round(self, record: dict, rnd: int) -> None:
        """After a round: score the global generator (every ``eval_every`` rounds and at the
        last), log the record and progress, save the sample grid and checkpoint when due."""
        s = self.s
        if self.evaluate is not None and should(s.eval_every, rnd, s.num_rounds):
            t_eval = time.monotonic()
            self.last_eval = record["eval"] = self.final_eval()
            record["eval_time"] = time.monotonic() - t_eval
        self.recorder.log_round(record)
        self.recorder.progress(rnd, {k: record[k] for k in ("g_loss", "d_loss", "d_real_acc", "d_fake_acc")})
        if should(s.sample_every, rnd, s.num_rounds):
            self.recorder.save_samples(f"round{rnd:05d}", self.samples())
        if should(s.checkpoint_every, rnd, s.num_rounds):
            self.recorder.save_checkpoint("server.pt", self.checkpoint(rnd))

    def final_eval(self) -> dict:
        if self.evaluate is None:
            return {}
        z = fixed_latents(self.s.eval_samples, self.s.latent_dim, self.s.seed + 31, self.device)
        with torch.no_grad():
            return self.evaluate({"global": self.G(z.to(param_dtype(self.G))).cpu()})

    # --- the loop -------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        s = self.s
        nodes = wait_for_nodes(grid, s.min_nodes, s.node_wait_timeout)
        self.nodes.num_nodes = len(nodes)
        log.info("%s: %d nodes, %d rounds", self.name, len(nodes), s.num_rounds)
        last: dict = {}
        for rnd in range(self.first_round, s.num_rounds + 1):
            check_stop()
            nodes = sorted(grid.get_node_ids()) or nodes
            t0 = time.monotonic()
            record = self.run_round(grid, rnd, nodes)
            record["wall_time"] = time.monotonic() - t0
            self.recorder.log_comm(self.comm.round_rows(rnd))
            self.finish_round(record, rnd)
            last = record
        return {"rounds": s.num_rounds, "last": last, "bytes_down": self.comm.down_total,
                "bytes_up": self.comm.up_total, "dropped_replies": self.dropped_total,
                "clients": {self.nodes.label(n): n for n in self.nodes.order(self.nodes.seen)},
                "eval": self.last_eval}


__all__ = ["ClientDP", "check_dp_reply", "dp_columns", "DP_STATE", "DP_EPSILON", "DP_EXHAUSTED",
           "seeded_models", "fixed_latents", "param_dtype", "gan_config", "gan_optimizers",
           "local_gan_steps", "GlobalGANServer", "STOP", "check_stop", "RunInterrupted", "collect_late",
           "pending_nodes", "all_finite", "Snapshot", "guarded_update", "apply_with_blame",
           "require_replies", "should", "NodeBook", "check_identities", "GANSettings", "FederatedSettings",
           "RunFailed", "Recorder", "NullRecorder", "wait_for_nodes", "sample_nodes", "Exchange",
           "exchange", "ERROR_CODES", "log"]
