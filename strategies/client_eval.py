"""Per-client quality, computed where the data is (SPEC §6).

For strategies whose generators are per client (PrivacyGAN, local-only) the server asks
every client to score generated samples against the client's *own* data:

* ``evaluate.fakes`` (PrivacyGAN): the server sends ``n`` fakes of the client's student
  generator G_i (the generator lives on the server);
* ``evaluate.alone`` (local-only): the generator lives on the client, so only its training
  config, ``n`` and a latent seed go down and the client draws the fakes itself.

The client returns scalars only: FID and KID of the fakes against its data (features of
the named extractor), ``tv_own`` (total-variation distance between the classifier's
label histogram of the fakes and the client's label histogram), ``own_share`` (the share
of fakes the classifier puts in a class the client holds) and the label histogram
of the *fakes*. Its data, its features and its own label histogram never leave it. The
server adds ``tv_global``: the same histogram against the global label distribution
(what the run config's test set holds), which shows whether G_i learned its client's
distribution or the population's.

Evaluation traffic is logged with ``phase="eval"`` and kept out of the training totals.
This module is Flower-side plumbing only; the scoring itself runs in the ClientApp
(app/metrics.py).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, RecordDict
from flwr.serverapp import Grid

from strategies import wire
from strategies.base import exchange

EVAL_FAKES = "evaluate.fakes"   # server -> client: fakes of G_i; client -> server: scores
EVAL_ALONE = "evaluate.alone"   # server -> client: n + seed (G_i is on the client); client -> server: scores

# What a client's evaluate reply may carry in its MetricRecord; anything else is refused.
SCALARS = ("fid", "kid", "kid_std", "tv_own", "num_fake", "num_real")
HISTOGRAM = "label_histogram"
OWN_SHARE = "own_share"   # optional scalar: share of the fakes labelled as one of the client's own classes
ALLOWED = set(SCALARS) | {HISTOGRAM, OWN_SHARE, "partition_id", "steps_total"}


def fakes_content(fakes: torch.Tensor, rnd: int, dtype: str = "float32") -> RecordDict:
    """``evaluate.fakes`` content: the fakes (n, *sample) in the wire dtype and the round."""
    return RecordDict({
        wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(fakes, dtype)}),
        wire.CONFIG: ConfigRecord({"round": rnd, "fakes-dtype": dtype}),
    })


def parse_scores(content: RecordDict, num_classes: int | None = None) -> dict:
    """A client's scores; :class:`wire.BadReply` when a score is missing, not finite, or the
    reply carries anything beyond the allowed scalars and the fakes' histogram."""
    if content.array_records:
        raise wire.BadReply(f"evaluate reply carries arrays {sorted(content.array_records)}; only scalars are allowed")
    if wire.METRICS not in content.metric_records:
        raise wire.BadReply("missing metric record")
    raw = dict(content.metric_records[wire.METRICS])
    extra = set(raw) - ALLOWED
    if extra:
        raise wire.BadReply(f"evaluate reply carries unexpected metrics {sorted(extra)}")
    out: dict = {}
    for key in SCALARS:
        if key not in raw:
            raise wire.BadReply(f"missing metric '{key}'")
        value = float(raw[key])
        if not math.isfinite(value):
            raise wire.BadReply(f"metric '{key}' is not finite ({value})")
        out[key] = value
    hist = raw.get(HISTOGRAM)
    if not isinstance(hist, list) or not hist or any((not math.isfinite(float(v))) or v < 0 for v in hist):
        raise wire.BadReply(f"'{HISTOGRAM}' must be a non-empty list of counts")
    if num_classes is not None and len(hist) != num_classes:
        raise wire.BadReply(f"'{HISTOGRAM}' has {len(hist)} classes, expected {num_classes}")
    out[HISTOGRAM] = [int(v) for v in hist]
    out["num_fake"], out["num_real"] = int(out["num_fake"]), int(out["num_real"])
    if OWN_SHARE in raw:
        share = float(raw[OWN_SHARE])
        if not 0.0 <= share <= 1.0:   # also refuses NaN
            raise wire.BadReply(f"metric '{OWN_SHARE}' must be in [0, 1], got {share}")
        out[OWN_SHARE] = share
    if "partition_id" in raw:
        out["partition_id"] = int(raw["partition_id"])
    return out


def tv_distance(p, q) -> float:
    """Total-variation distance 1/2 sum |p - q| of two histograms (normalized here)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    if p.shape != q.shape or p.sum() <= 0 or q.sum() <= 0:
        raise ValueError(f"histograms must have the same length and some mass: {p.tolist()} vs {q.tolist()}")
    return float(0.5 * np.abs(p / p.sum() - q / q.sum()).sum())


def own_class_share(fake_histogram, own_histogram) -> float:
    """Share of the fakes labelled as a class the client holds (a class with any own sample);
    what a client reports as ``own_share``. 2 of 10 classes held and fakes spread evenly: 0.2."""
    fake, own = np.asarray(fake_histogram, dtype=np.float64), np.asarray(own_histogram, dtype=np.float64)
    if fake.shape != own.shape or fake.sum() <= 0:
        raise ValueError(f"histograms must have the same length and fakes: {fake.tolist()} vs {own.tolist()}")
    return float(fake[own > 0].sum() / fake.sum())


def summarize(per_client: dict[str, dict]) -> dict:
    """Means over clients of every score (what the progress line and plots show)."""
    if not per_client:
        return {}
    keys = [k for k in ("fid", "kid", "tv_own", "tv_global", OWN_SHARE) if all(k in s for s in per_client.values())]
    return {f"{k}_mean": float(np.mean([s[k] for s in per_client.values()])) for k in keys}


def evaluate_clients(grid: Grid, contents: dict[int, RecordDict], message_type: str, *, rnd: int, timeout: float,
                     comm: wire.CommLog, label: Callable[[int], str], partition_of: dict[int, int],
                     global_histogram=None) -> dict:
    """Send each node its evaluate message, collect the scores.

    Returns ``{"client_eval": {label: scores}, **means, "dropped": {node: why}}``.
    """
    msgs = {nid: Message(content=c, dst_node_id=nid, message_type=message_type, group_id=f"eval-{rnd}")
            for nid, c in contents.items()}
    num_classes = len(global_histogram) if global_histogram is not None else None
    ex = exchange(grid, msgs, timeout=timeout, parse=lambda nid, r: parse_scores(r.content, num_classes))
    per_client: dict[str, dict] = {}
    for nid in contents:
        comm.add(rnd, nid, message_type, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0), phase="eval",
                 partition=partition_of.get(nid), dropped=nid in ex.dropped)
    for nid, scores in sorted(ex.replies.items(), key=lambda kv: label(kv[0])):
        if "partition_id" in scores:
            partition_of[nid] = scores["partition_id"]
        if global_histogram is not None:
            scores["tv_global"] = tv_distance(scores[HISTOGRAM], global_histogram)
        per_client[label(nid)] = {"node": nid, **scores}
    return {"client_eval": per_client, **summarize(per_client),
            "client_eval_dropped": {str(n): why for n, why in ex.dropped.items()}}


__all__ = ["EVAL_FAKES", "EVAL_ALONE", "fakes_content", "parse_scores", "tv_distance", "own_class_share", "summarize",
           "evaluate_clients", "SCALARS", "HISTOGRAM", "OWN_SHARE"]
