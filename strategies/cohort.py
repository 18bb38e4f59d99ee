"""Cohorts: one SuperNode carrying M virtual clients (run config ``cohort-size``; issue #13).

Flower 1.42's Simulation Engine costs 6-9 ms per message on this kind of machine whatever the
message carries (``simulations/engine_floor.py``), which at 100-1,000 PrivacyGAN clients is most
of a round. With cohorts of M, SuperNode p carries the clients p·M .. p·M + M − 1, each with its
own partition, its own state and its own byte account, and a round sends the node one message
holding every selected client's content and gets back one reply holding each client's reply:
M times fewer messages for the same work.

Server side, :class:`CohortGrid` wraps the run's Grid and shows each real node as M virtual node
ids; :func:`strategies.base.exchange` hands it the round's messages and it sends one merged message
per real node and splits the reply. The strategy above sees M times more nodes and nothing else.
Client side, :func:`run_cohort` splits a merged content and runs the ordinary handler once per
client on that client's content and its own slice of the node's state (the ClientApp's
``cohort_mod`` gives each call the client's partition id).

On the wire, client j's records travel as ``c<j>/<name>`` beside a ``cohort`` ConfigRecord
(the cohort's size and the slots this message serves). Each client is charged exactly the bytes
of its own records, what the same content costs as a message of its own (``wire.record_bytes``);
the ``cohort`` record is the cohort's overhead (a few bytes per client), not charged to anyone.
A slot whose handler fails comes back as ``c<j>/error`` and only that client is dropped; its state
stays as it was before the message.
"""

from __future__ import annotations

from typing import Callable

from flwr.app import ConfigRecord, RecordDict

from strategies import wire
from strategies.base import Exchange, exchange, log

COHORT = "cohort"   # ConfigRecord {"size": M, "slots": [j, ...]} in a merged message and its reply
ERROR = "error"     # a slot's ConfigRecord {"reason": ...} when its handler failed


def slot_prefix(slot: int) -> str:
    return f"c{slot}/"


def merge(contents: dict[int, RecordDict], size: int) -> RecordDict:
    """One content for a cohort: slot -> that client's content, records renamed ``c<j>/<name>``."""
    out = RecordDict({COHORT: ConfigRecord({"size": int(size), "slots": sorted(int(s) for s in contents)})})
    for slot, content in contents.items():
        for name, rec in content.items():
            out[slot_prefix(slot) + name] = rec
    return out


def is_cohort(content: RecordDict) -> bool:
    return COHORT in content.config_records


def split(content: RecordDict) -> dict[int, RecordDict]:
    """slot -> its records with their own names back; every slot the ``cohort`` record lists is
    present (empty when nothing came for it). BadReply when the content is not a cohort's."""
    if not is_cohort(content):
        raise wire.BadReply(f"a cohort's reply needs its '{COHORT}' record")
    try:
        slots = [int(s) for s in content.config_records[COHORT]["slots"]]
    except (KeyError, TypeError, ValueError):
        raise wire.BadReply(f"the '{COHORT}' record lists no slots") from None
    parts: dict[int, RecordDict] = {s: RecordDict() for s in slots}
    for name, rec in content.items():
        if name == COHORT:
            continue
        head, sep, rest = name.partition("/")
        if not sep or not head.startswith("c") or not head[1:].isdigit() or int(head[1:]) not in parts:
            raise wire.BadReply(f"record '{name}' belongs to no client of this cohort")
        parts[int(head[1:])][rest] = rec
    return parts


# -------------------------------------------------------------------------------------------
# Client side
# -------------------------------------------------------------------------------------------
def slot_state(state: RecordDict, slot: int) -> RecordDict:
    """Client ``slot``'s own records of the node's state (their names without the prefix)."""
    prefix = slot_prefix(slot)
    return RecordDict({name[len(prefix):]: rec for name, rec in state.items() if name.startswith(prefix)})


def store_slot_state(state: RecordDict, slot: int, own: RecordDict) -> None:
    prefix = slot_prefix(slot)
    for name in [n for n in state.keys() if n.startswith(prefix)]:
        del state[name]
    for name, rec in own.items():
        state[prefix + name] = rec


def run_cohort(content: RecordDict, state: RecordDict,
               handle: Callable[[int, RecordDict, RecordDict], RecordDict],
               handle_all: Callable[[dict[int, RecordDict], dict[int, RecordDict]],
                                    dict[int, RecordDict] | None] | None = None) -> RecordDict:
    """Handle a merged message on the node: ``handle(slot, its content, its state)`` once per
    client, in slot order, each on its own slice of the node's ``state``. Returns the merged reply.
    A client whose handler raises gets an ``error`` record (the others go on) and keeps the state
    it had before the message.

    ``handle_all(contents, states)``, when given, may handle every client at once (slot -> content,
    slot -> its state slice; returns slot -> reply, or None to decline): the ClientApp's batched
    D steps (run config ``cohort-batching``). If it raises, nothing it did to the states is kept
    and the clients are handled one by one as above, so a failure stays the failing client's own."""
    cfg = content.config_records[COHORT]
    size = int(cfg["size"])
    parts = split(content)
    bad = [s for s in parts if not 0 <= s < size]
    if bad:
        raise ValueError(f"cohort slots {bad} outside 0..{size - 1}")
    if handle_all is not None and len(parts) > 1:
        owns = {slot: slot_state(state, slot) for slot in parts}
        try:
            together = handle_all(parts, owns)
        except Exception as exc:   # noqa: BLE001 -- retried one by one: the failure is found and kept to its client
            log.warning("cohort: handling %d clients at once failed (%s: %s); each is handled on its own",
                        len(parts), type(exc).__name__, str(exc)[:300])
            together = None
        if together is not None:
            for slot in parts:
                store_slot_state(state, slot, owns[slot])
            return merge(together, size)
    replies: dict[int, RecordDict] = {}
    for slot in sorted(parts):
        own = slot_state(state, slot)
        try:
            replies[slot] = handle(slot, parts[slot], own)
        except Exception as exc:   # noqa: BLE001 -- one client's failure is its own, as on a node of its own
            replies[slot] = RecordDict({ERROR: ConfigRecord({"reason": f"{type(exc).__name__}: {exc}"[:2000]})})
            continue
        store_slot_state(state, slot, own)
    return merge(replies, size)


# -------------------------------------------------------------------------------------------
# Server side
# -------------------------------------------------------------------------------------------
class SlotReply:
    """One client's share of a cohort's reply, as a strategy's ``parse(nid, reply)`` reads it."""

    def __init__(self, content: RecordDict) -> None:
        self.content = content

    def has_error(self) -> bool:
        return False


class CohortGrid:
    """The run's Grid with every real node shown as ``size`` virtual node ids (``idx·size + j``,
    idx: the order in which the real nodes were first seen). Anything else is the wrapped grid's."""

    def __init__(self, grid, size: int) -> None:
        if size < 1:
            raise ValueError(f"cohort size {size} must be >= 1")
        self.grid = grid
        self.size = int(size)
        self._index: dict[int, int] = {}    # real node id -> idx
        self._real: list[int] = []          # idx -> real node id

    def __getattr__(self, name):   # run, create_message... of the wrapped grid
        return getattr(self.grid, name)

    @property
    def clients_per_message(self) -> int:
        return self.size

    def get_node_ids(self) -> list[int]:
        real = sorted(self.grid.get_node_ids())
        for nid in real:
            if nid not in self._index:
                self._index[nid] = len(self._real)
                self._real.append(nid)
        return [self._index[nid] * self.size + j for nid in real for j in range(self.size)]

    def real_of(self, vid: int) -> tuple[int, int]:
        """(real node id, slot) of virtual node ``vid``."""
        idx, slot = divmod(int(vid), self.size)
        if not 0 <= idx < len(self._real):
            raise KeyError(f"virtual node {vid} is not on any node this grid has seen")
        return self._real[idx], slot

    def virtual_ids(self, nid: int) -> list[int]:
        idx = self._index[nid]
        return [idx * self.size + j for j in range(self.size)]

    def cohort_exchange(self, messages: dict, *, timeout: float, parse, max_reply_mb: float,
                        poll: float | None, on_reply=None) -> Exchange:
        """:func:`strategies.base.exchange` for virtual nodes: one merged message per real node
        (the window ``max-in-flight`` counts these), each client's reply parsed on its own as its
        cohort's reply comes in (``on_reply`` then gets the cohort's good ones together)."""
        groups: dict[int, dict[int, tuple[int, object]]] = {}
        for vid, msg in messages.items():
            nid, slot = self.real_of(vid)
            groups.setdefault(nid, {})[slot] = (vid, msg)
        merged = {}
        for nid, slots in groups.items():
            first = next(iter(slots.values()))[1]
            meta = first.metadata
            # built as the strategy built its own messages (a Flower Message in a run)
            merged[nid] = type(first)(content=merge({s: m.content for s, (_, m) in slots.items()}, self.size),
                                      dst_node_id=nid, message_type=meta.message_type, group_id=meta.group_id)
        limit = int(max_reply_mb * 1e6)

        def parse_node(nid: int, reply) -> dict[int, tuple[str, object, int]]:
            """vid -> ("ok", parsed, bytes) or ("dropped", reason, bytes) for each client of the cohort."""
            parts = split(reply.content)
            out: dict[int, tuple[str, object, int]] = {}
            for slot, (vid, _) in sorted(groups[nid].items()):
                part = parts.get(slot)
                if part is None:
                    out[vid] = ("dropped", "bad reply: the cohort's reply has nothing for this client", 0)
                    continue
                if ERROR in part.config_records:
                    out[vid] = ("dropped", "error reply (its handler in the cohort): "
                                f"{part.config_records[ERROR]['reason']}", 0)
                    continue
                size = wire.record_bytes(part)
                if size > limit:
                    out[vid] = ("dropped", f"reply of {size / 1e6:.1f} MB exceeds run config 'max-reply-mb' = "
                                f"{max_reply_mb:g}; not read", size)
                    continue
                try:
                    out[vid] = ("ok", parse(vid, SlotReply(part)), size)
                except wire.BadReply as exc:
                    out[vid] = ("dropped", f"bad reply: {exc}", size)
            return out

        def arrived(batch: dict) -> None:
            good = {vid: value for per_slot in batch.values() for vid, (kind, value, _) in per_slot.items()
                    if kind == "ok"}
            if good:
                on_reply(good)

        ex = exchange(self.grid, merged, timeout=timeout, parse=parse_node, max_reply_mb=max_reply_mb * self.size,
                      poll=poll, on_reply=arrived if on_reply is not None else None)
        out = Exchange()
        for nid, age in ex.late.items():
            for vid in self.virtual_ids(nid):
                out.late[vid] = age
        for nid, slots in groups.items():
            for slot, (vid, msg) in sorted(slots.items()):
                if nid in ex.bytes_down:
                    out.bytes_down[vid] = wire.record_bytes(msg.content)
                if nid not in ex.replies:
                    out.dropped[vid] = ex.dropped.get(nid, "no reply")
                    if nid in ex.bytes_up:   # an error reply (0 bytes) or one too large to read, shared evenly
                        out.bytes_up[vid] = ex.bytes_up[nid] // len(slots)
                    continue
                kind, value, size = ex.replies[nid][vid]
                out.bytes_up[vid] = size
                if kind == "ok":
                    out.replies[vid] = value
                else:
                    out.dropped[vid] = value
                    log.warning("dropping client %s (node %s, slot %d) this round: %s", vid, nid, slot, value)
        return out


__all__ = ["CohortGrid", "COHORT", "merge", "split", "run_cohort", "is_cohort"]
