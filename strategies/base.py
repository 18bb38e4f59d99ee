"""Mechanics every strategy shares (SPEC 4.1): finding nodes, sampling them, one
bounded ``send_and_receive`` exchange whose bad replies are dropped with a reason,
and the recorder interface through which a strategy reports (the app implements it).
"""

from __future__ import annotations

import logging
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol

from flwr.app import Message
from flwr.serverapp import Grid

from models.losses import check_loss_kind
from strategies.wire import BadReply, message_bytes

log = logging.getLogger("fedgan")

# Error codes Flower puts on error replies (notes/flower-1.42.md).
ERROR_CODES = {2: "ClientApp raised", 3: "message unavailable", 4: "reply unavailable",
               5: "node unavailable", 8: "ClientApp crashed"}


class RunFailed(RuntimeError):
    """The run cannot go on (too few nodes or good replies); the message says why."""


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

    def identify(self, metrics_by_node: dict[int, dict[str, float]]) -> None:
        """Note the partitions of a round's replies; at the run's first exchange also check
        that the nodes can be told apart (:func:`check_identities`) before any reply is used."""
        if not self.identified and metrics_by_node:
            check_identities(metrics_by_node)
            self.identified = True
        for nid, metrics in metrics_by_node.items():
            self.note(nid, metrics)

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


def _last_line(text: str, limit: int = 300) -> str:
    """The informative tail of an error reason (Ray wraps client tracebacks in pages of text)."""
    lines = [ln.strip() for ln in str(text).splitlines() if ln.strip()]
    return (lines[-1] if lines else "")[:limit]


def exchange(grid: Grid, messages: dict[int, Message], *, timeout: float,
             parse: Callable[[int, Message], object]) -> Exchange:
    """Send one message per node, wait at most ``timeout`` s, parse what comes back.

    Replies are matched to nodes by ``reply_to_message_id``. A reply that is an error,
    or that ``parse`` rejects with :class:`BadReply` (wrong shape, NaN, missing key...),
    or that never arrives, is dropped with a logged reason; the server never crashes
    on a client's reply.
    """
    out = Exchange()
    for nid, msg in messages.items():
        out.bytes_down[nid] = message_bytes(msg)
    sent = list(messages.items())
    replies: Iterable[Message] = grid.send_and_receive([m for _, m in sent], timeout=timeout)
    by_id = {m.metadata.message_id: nid for nid, m in sent}
    for reply in replies:
        nid = by_id.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)
        out.bytes_up[nid] = message_bytes(reply)
        if reply.has_error():
            code = reply.error.code
            out.dropped[nid] = f"error reply (code {code}: {ERROR_CODES.get(code, 'unknown')}): {_last_line(reply.error.reason)}"
            continue
        try:
            out.replies[nid] = parse(nid, reply)
        except BadReply as exc:
            out.dropped[nid] = f"bad reply: {exc}"
    for nid in messages:
        if nid not in out.replies and nid not in out.dropped:
            out.dropped[nid] = f"no reply within {timeout:.0f} s"
    for nid, why in out.dropped.items():
        log.warning("dropping node %s this round: %s", nid, why)
    return out


__all__ = ["should", "NodeBook", "check_identities", "GANSettings", "FederatedSettings", "RunFailed", "Recorder", "NullRecorder", "wait_for_nodes", "sample_nodes", "Exchange",
           "exchange", "ERROR_CODES", "log"]
