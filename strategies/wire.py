"""What travels between server and clients: record keys, codecs and byte accounting.

Every message of every strategy is built from the keys below, so a test (or a
curious user) can list exactly what crosses the network. Tensors are encoded with
the codecs here; the *decoded* values are what the receiver trains on, so lossy
settings (float16/uint8 fakes, float16 feedback) are honest in both bytes and
results.

Byte accounting uses Flower's own ``count_bytes()`` of each record, i.e. the
serialized array payload (``.npy`` bytes incl. their header) plus the key names,
and the 8 bytes per scalar Flower's protobuf uses for config/metric values.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

# --- message types (SPEC 4.1: train.<action>, evaluate.<action>, query.<action>) ---
DISCRIMINATE = "train.discriminate"  # PrivacyGAN: fakes down, labels + feedback up
INFO = "query.info"                  # which partition a node holds (only when a run resumes)

# --- record names inside a message's RecordDict -----------------------------------
FAKES = "fakes"          # ArrayRecord {FAKES: (K, B, *sample)} server -> client
NEGATIVES = "negatives"  # in the FAKES record with server-negatives > 0: (K, M, *sample) uint8, the server's images
CONFIG = "config"        # ConfigRecord of per-round settings, server -> client
D_INIT = "d_init"        # ArrayRecord of initial discriminator weights (client-d-init=teacher), once
REPLY = "reply"          # ArrayRecord {LABELS: (K, B), FEEDBACK: (K, B, *sample)} client -> server
LABELS = "labels"
FEEDBACK = "feedback"
METRICS = "metrics"      # MetricRecord of scalars, client -> server

FAKE_DTYPES = ("float32", "float16", "uint8")
FEEDBACK_DTYPES = ("float32", "float16")
_TORCH = {"float32": torch.float32, "float16": torch.float16, "uint8": torch.uint8}


# --- codecs ----------------------------------------------------------------------
def encode_fakes(x: torch.Tensor, dtype: str) -> torch.Tensor:
    """Fakes in [-1, 1] to their wire dtype; uint8 maps [-1, 1] onto 0..255."""
    x = x.detach().to("cpu", torch.float32)
    if dtype == "float32":
        return x.contiguous()
    if dtype == "float16":
        return x.half().contiguous()
    if dtype == "uint8":
        return ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8).contiguous()
    raise ValueError(f"fakes dtype {dtype!r}: choose one of {FAKE_DTYPES}")


def decode_fakes(t: torch.Tensor, dtype: str) -> torch.Tensor:
    """Inverse of :func:`encode_fakes` (float32 out)."""
    _expect_dtype(t, dtype, "fakes")
    if dtype == "uint8":
        return t.to(torch.float32) / 127.5 - 1.0
    return t.to(torch.float32)


def encode_feedback(f: torch.Tensor, dtype: str, batch_size: int) -> torch.Tensor:
    """Feedback ∂L/∂x̃ of a batch-mean loss, sent as the per-sample gradient (×B).

    Scaling by B keeps float16 feedback away from underflow (a mean over 64 samples
    makes each entry ~64x smaller); :func:`decode_feedback` divides it back.
    """
    if dtype not in FEEDBACK_DTYPES:
        raise ValueError(f"feedback dtype {dtype!r}: choose one of {FEEDBACK_DTYPES}")
    return (f.detach().to("cpu", torch.float32) * batch_size).to(_TORCH[dtype]).contiguous()


def decode_feedback(t: torch.Tensor, dtype: str, batch_size: int) -> torch.Tensor:
    """Inverse of :func:`encode_feedback`."""
    _expect_dtype(t, dtype, "feedback")
    return t.to(torch.float32) / batch_size


def _expect_dtype(t: torch.Tensor, dtype: str, what: str) -> None:
    if dtype not in _TORCH:
        raise ValueError(f"{what} dtype {dtype!r} unknown")
    if t.dtype != _TORCH[dtype]:
        raise ValueError(f"{what} arrived as {t.dtype}, expected {dtype}")


def tensor_record(**arrays: torch.Tensor) -> ArrayRecord:
    """ArrayRecord from named tensors (moved to CPU)."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in arrays.items()})


def get_tensor(record: ArrayRecord, key: str) -> torch.Tensor:
    """One array of a record as a writable torch tensor (exact round trip)."""
    return torch.from_numpy(np.array(record[key].numpy(), copy=True))


# --- byte accounting ---------------------------------------------------------------
def record_bytes(content: RecordDict) -> int:
    """Payload bytes of a message's content, as Flower counts them per record."""
    total = 0
    for _, rec in content.items():
        total += rec.count_bytes()
    return total


def message_bytes(msg: Message) -> int:
    """Payload bytes of a message (0 for an error reply, which carries no content)."""
    if msg.has_error():
        return 0
    return record_bytes(msg.content)


NPY_HEADER_BYTES = 128  # numpy's .npy v1 header for the shapes used here (padded to 64-byte blocks)


def array_bytes(key: str, shape: tuple[int, ...], dtype: str) -> int:
    """Hand arithmetic for one array entry: .npy header + raw data + the key's name."""
    itemsize = {"float32": 4, "float16": 2, "uint8": 1}[dtype]
    return NPY_HEADER_BYTES + math.prod(shape) * itemsize + len(key)


@dataclass
class CommLog:
    """Bytes per round, per node, per action and direction; totals for the summary."""

    rows: list[dict] = field(default_factory=list)
    down_total: int = 0
    up_total: int = 0

    def add(self, rnd: int, node_id: int, action: str, down: int, up: int, **extra) -> dict:
        row = {"round": rnd, "node": node_id, "action": action, "down": int(down), "up": int(up), **extra}
        self.rows.append(row)
        self.down_total += int(down)
        self.up_total += int(up)
        return row

    def round_rows(self, rnd: int) -> list[dict]:
        return [r for r in self.rows if r["round"] == rnd]

    def state(self) -> dict:
        return {"down_total": self.down_total, "up_total": self.up_total}


# --- reply checks (SPEC 4.1: bad replies are dropped with a reason) ---------------------
class BadReply(ValueError):
    """A client reply the server will not use; the message says why."""


def require_array(content: RecordDict, record: str, key: str, shape: tuple[int, ...],
                  dtype: str) -> torch.Tensor:
    """Fetch ``content[record][key]`` and check presence, shape, dtype and finiteness."""
    if record not in content.array_records:
        raise BadReply(f"missing array record '{record}'")
    rec = content.array_records[record]
    if key not in rec:
        raise BadReply(f"missing array '{record}.{key}'")
    t = get_tensor(rec, key)
    if tuple(t.shape) != tuple(shape):
        raise BadReply(f"'{record}.{key}' has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.dtype != _TORCH[dtype]:
        raise BadReply(f"'{record}.{key}' has dtype {t.dtype}, expected {dtype}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadReply(f"'{record}.{key}' holds NaN or Inf")
    return t


LABEL_LIMIT = 1e6  # |label| bound: D outputs are probabilities or logits/critic values far below this


def require_labels(t: torch.Tensor, what: str = "labels", limit: float = LABEL_LIMIT) -> torch.Tensor:
    """BadReply when any label's magnitude exceeds ``limit`` (finite but absurd)."""
    if t.numel() and float(t.detach().abs().max()) > limit:
        raise BadReply(f"'{what}' holds a value of magnitude {float(t.abs().max()):.3g} > {limit:g}")
    return t


def require_norm(t: torch.Tensor, what: str, limit: float, sample_dims: int | None = None,
                 key: str = "max-feedback-norm") -> torch.Tensor:
    """BadReply when the L2 norm of ``t`` (of each sample's last ``sample_dims`` dimensions
    when given) exceeds ``limit``, the run config key ``key``."""
    x = t.detach().to(torch.float64)
    if sample_dims is None:
        norm = float(x.norm())
    else:
        norm = float(x.reshape(*x.shape[: x.dim() - sample_dims], -1).norm(dim=-1).max()) if x.numel() else 0.0
    if not math.isfinite(norm) or norm > limit:
        per = " per sample" if sample_dims is not None else ""
        raise BadReply(f"'{what}' has L2 norm{per} {norm:.3g}, above run config '{key}' = {limit:g}")
    return t


def require_total_norm(tensors, what: str, limit: float, key: str = "max-update-norm") -> None:
    """BadReply when the L2 norm over all of ``tensors`` (e.g. a gradient per parameter)
    exceeds ``limit``, the run config key ``key``; computed in float64 so it cannot overflow."""
    norm = math.sqrt(sum(float(t.detach().to(torch.float64).pow(2).sum()) for t in tensors))
    if not math.isfinite(norm) or norm > limit:
        raise BadReply(f"'{what}' has L2 norm {norm:.3g}, above run config '{key}' = {limit:g}")


def require_only(content: RecordDict, allowed: dict[str, set[str] | None]) -> None:
    """BadReply when a reply carries a record, or an array in a record, the protocol does not name
    (``allowed``: record name -> allowed keys, None = any key)."""
    for name, rec in content.items():
        if name not in allowed:
            raise BadReply(f"unexpected record '{name}'")
        keys = allowed[name]
        if keys is not None:
            extra = sorted(set(rec.keys()) - keys)
            if extra:
                raise BadReply(f"unexpected entr(ies) {', '.join(map(repr, extra))} in record '{name}'")


def metrics_of(content: RecordDict) -> dict[str, float]:
    """The reply's metrics as plain floats (empty when absent); non-finite values rejected."""
    if METRICS not in content.metric_records:
        return {}
    out = {}
    for k, v in content.metric_records[METRICS].items():
        if isinstance(v, list):
            continue
        if not math.isfinite(float(v)):
            raise BadReply(f"metric '{k}' is not finite")
        out[k] = float(v)
    return out


# =====================================================================================
# Whole-network records (the baselines that move weights: data-parallel, FedAvg)
# =====================================================================================
G_WEIGHTS = "g"        # ArrayRecord: G's state_dict (parameters and buffers)
D_WEIGHTS = "d"        # ArrayRecord: D's state_dict
NUM_EXAMPLES = "num-examples"   # metric: weight of a reply in the average (Flower's usual name)


def make_message(content: RecordDict, nid: int, message_type: str, rnd: int) -> Message:
    """The one place where the baselines build Flower messages (tests swap it out)."""
    return Message(content=content, dst_node_id=nid, message_type=message_type, group_id=str(rnd))


def weights_record(model: nn.Module) -> ArrayRecord:
    """A network's full state_dict (parameters and buffers) as an ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def load_weights(model: nn.Module, record: ArrayRecord) -> None:
    """Load an ArrayRecord made by :func:`weights_record` (or an aggregate of them)."""
    model.load_state_dict({k: get_tensor(record, k) for k in record.keys()})


def _check_tensor(t: torch.Tensor, ref: torch.Tensor, where: str) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise BadReply(f"'{where}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise BadReply(f"'{where}' has dtype {t.dtype}, expected {ref.dtype}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise BadReply(f"'{where}' holds NaN or Inf")


def require_tensors(content: RecordDict, record: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``content[record]`` as tensors, with exactly the keys, shapes and dtypes of ``reference``
    and finite values; :class:`~strategies.BadReply` otherwise."""
    if record not in content.array_records:
        raise BadReply(f"missing array record '{record}'")
    rec = content.array_records[record]
    keys, expected = set(rec.keys()), set(reference)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise BadReply(f"'{record}' keys differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})")
    out = {}
    for k, ref in reference.items():
        t = get_tensor(rec, k)
        _check_tensor(t, ref.detach().cpu(), f"{record}.{k}")
        out[k] = t
    return out


def require_count(metrics: dict[str, float], expected: int | None = None) -> int:
    """The positive integer sample count of a reply; with ``expected`` (what the server asked
    for) any other value is a bad reply — a client does not get to choose its own weight."""
    if NUM_EXAMPLES not in metrics:
        raise BadReply(f"missing metric '{NUM_EXAMPLES}'")
    n = metrics[NUM_EXAMPLES]
    if n < 1 or n != int(n):
        raise BadReply(f"metric '{NUM_EXAMPLES}' = {n} is not a positive integer")
    if expected is not None and int(n) != expected:
        raise BadReply(f"metric '{NUM_EXAMPLES}' = {int(n)}, but the server asked for a batch of {expected}")
    return int(n)


def require_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in metrics:
            raise BadReply(f"missing metric '{key}'")


__all__ = [
    "DISCRIMINATE", "INFO", "FAKES", "CONFIG", "D_INIT", "REPLY", "LABELS", "FEEDBACK", "METRICS",
    "FAKE_DTYPES", "FEEDBACK_DTYPES", "encode_fakes", "decode_fakes", "encode_feedback",
    "decode_feedback", "tensor_record", "get_tensor", "record_bytes", "message_bytes",
    "array_bytes", "NPY_HEADER_BYTES", "CommLog", "BadReply", "require_array", "metrics_of", "require_labels",
    "require_norm", "require_total_norm", "require_only", "LABEL_LIMIT",
    "ConfigRecord", "MetricRecord", "RecordDict", "ArrayRecord", "G_WEIGHTS", "D_WEIGHTS", "NUM_EXAMPLES",
    "make_message", "weights_record", "load_weights", "require_tensors", "require_count", "require_metrics",
]
