"""FedAvg for GANs (FedGAN baseline; SPEC 1 and 4.5).

Each round the server sends the global G and D (``train.fedavg``); every selected client
loads them, runs ``local-steps`` base-GAN steps (``models.steps.train_gan_step``) on its
own data with its own two optimizers — whose state (Adam moments, step counts) it keeps
in ``context.state`` from round to round, as FedGAN's local agents do — and returns both
networks' weights together with its number of training examples. The server replaces
G and D by the example-weighted average of what came back (Flower's own
``aggregate_arrayrecords``, the helper behind its built-in FedAvg).

What a client reveals: its networks after E local steps (once per round) and one
integer, the size of its local dataset — the count FedAvg weights by. Nothing else about
its data leaves it. Integer buffers (BatchNorm's ``num_batches_tracked``) are averaged
too and rounded back to integers; BatchNorm running means and variances are averaged
like weights.
"""

from __future__ import annotations

import io
import math
import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy.strategy_utils import aggregate_arrayrecords
from torch import nn

from strategies import wire
from strategies.base import (FederatedSettings, NodeBook, Recorder, apply_with_blame, exchange, log, require_replies,
                             sample_nodes)
from strategies.dataparallel import (D_WEIGHTS, G_WEIGHTS, NUM_EXAMPLES, GlobalGANServer,
                                     load_weights, make_message, require_count, require_metrics,
                                     require_tensors, weights_record)
from strategies.local import gan_optimizers, gan_config, local_gan_steps

FEDAVG = "train.fedavg"
CLIENT_STATE = "fedavg.client"   # context.state ConfigRecord: both optimizers' state and the step count
TRAIN_METRICS = ("g_loss", "d_loss", "d_real_acc", "d_fake_acc", "steps_total")


# =====================================================================================
# Client side
# =====================================================================================
def client_fedavg(content: RecordDict, state: RecordDict, *,
                  sample_real: Callable[[int, torch.Generator], torch.Tensor], num_examples: int,
                  build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                  device: str, seed: int, partition_id: int | None = None) -> RecordDict:
    """``train.fedavg``: E local GAN steps from the global (G, D); both networks and
    ``num-examples`` (the size of this client's dataset) go back."""
    cfg = content.config_records[wire.CONFIG]
    G, D = build_generator().to(device), build_discriminator().to(device)
    load_weights(G, content.array_records[G_WEIGHTS])
    load_weights(D, content.array_records[D_WEIGHTS])
    G.train()
    D.train()
    opt_g, opt_d = gan_optimizers(cfg, G, D)
    done = 0
    if CLIENT_STATE in state.config_records:
        blob = torch.load(io.BytesIO(state.config_records[CLIENT_STATE]["blob"]), map_location=device,
                          weights_only=False)
        opt_g.load_state_dict(blob["opt_g"])
        opt_d.load_state_dict(blob["opt_d"])
        done = int(blob["steps"])
    stats = local_gan_steps(G, D, opt_g, opt_d, sample_real=sample_real, cfg=cfg, seed=seed,
                            partition_id=partition_id, steps_done=done, device=device)
    done += int(cfg["steps"])
    buf = io.BytesIO()
    torch.save({"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "steps": done}, buf)
    state.config_records[CLIENT_STATE] = ConfigRecord({"blob": buf.getvalue(), "steps": done})
    metrics = {NUM_EXAMPLES: int(num_examples), "g_loss": stats.get("g_loss", math.nan),
               "d_loss": stats.get("d_loss", math.nan), "d_real_acc": stats.get("d_real_acc", math.nan),
               "d_fake_acc": stats.get("d_fake_acc", math.nan), "steps_total": done}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({G_WEIGHTS: weights_record(G), D_WEIGHTS: weights_record(D),
                       wire.METRICS: MetricRecord(metrics)})


# =====================================================================================
# Pure server-side math
# =====================================================================================
def fedavg_aggregate(replies: list[tuple[ArrayRecord, int]],
                     reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example-weighted average Σ n_i·w_i / Σ n_i of the clients' state dicts.

    Uses Flower's ``aggregate_arrayrecords``; entries that are integers in ``reference``
    (BatchNorm's ``num_batches_tracked``) are rounded back to their integer dtype.
    """
    if not replies:
        raise ValueError("nothing to aggregate")
    records = [RecordDict({"w": rec, "m": MetricRecord({NUM_EXAMPLES: int(n)})}) for rec, n in replies]
    agg = aggregate_arrayrecords(records, NUM_EXAMPLES)
    out = {}
    for k, ref in reference.items():
        t = wire.get_tensor(agg, k)
        out[k] = t.to(ref.dtype) if ref.is_floating_point() else t.round().to(ref.dtype)
    return out


# =====================================================================================
# Server side
# =====================================================================================
@dataclass(frozen=True)
class FedAvgSettings(FederatedSettings):
    """FedGAN: ``local_steps`` GAN steps on every client between two averagings."""

    local_steps: int = 25
    client_disc_steps: int = 1


class FedAvg(GlobalGANServer):
    """The FedAvg-GAN server: holds the global G and D, no optimizers (those are the clients')."""

    name = "FedAvg"

    def __init__(self, settings: FedAvgSettings, *, make_generator: Callable[[], nn.Module],
                 make_discriminator: Callable[[], nn.Module], recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None, device: str = "cpu",
                 sample_shape: tuple[int, ...] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None) -> None:
        super().__init__(settings, make_generator=make_generator, make_discriminator=make_discriminator,
                         recorder=recorder, evaluate=evaluate, device=device, sample_shape=sample_shape,
                         with_optimizers=False)
        self.nodes = NodeBook(describe_partition)
        self.comm = wire.CommLog()
        self.rng = random.Random(settings.seed)
        self.dropped_total = 0

    # --- message contents (pure) ----------------------------------------------------------
    def build_content(self, rnd: int) -> RecordDict:
        s = self.s
        return RecordDict({G_WEIGHTS: weights_record(self.G), D_WEIGHTS: weights_record(self.D),
                           wire.CONFIG: gan_config(loss=s.loss, gen_lr=s.gen_lr, disc_lr=s.disc_lr, beta1=s.beta1,
                                                   beta2=s.beta2, batch_size=s.batch_size, steps=s.local_steps,
                                                   disc_steps=s.client_disc_steps, rnd=rnd, seed=s.seed)})

    def parse_content(self, content: RecordDict) -> tuple[ArrayRecord, ArrayRecord, int, dict]:
        """Both networks' weights (checked against the global ones), the example count, metrics."""
        for record, model in ((G_WEIGHTS, self.G), (D_WEIGHTS, self.D)):
            state = model.state_dict()
            got = require_tensors(content, record, state)
            wire.require_total_norm((got[k] - state[k].detach().cpu() for k in got if state[k].is_floating_point()),
                                    f"{record} (weight move)", self.s.max_update_norm)
        metrics = wire.metrics_of(content)
        require_metrics(metrics, TRAIN_METRICS)
        return content.array_records[G_WEIGHTS], content.array_records[D_WEIGHTS], require_count(metrics), metrics

    def aggregate(self, replies: list[tuple[ArrayRecord, ArrayRecord, int, dict]]) -> None:
        """Set the global G and D to the example-weighted average of the replies."""
        self.G.load_state_dict(fedavg_aggregate([(g, n) for g, _, n, _ in replies], self.G.state_dict()))
        self.D.load_state_dict(fedavg_aggregate([(d, n) for _, d, n, _ in replies], self.D.state_dict()))

    # --- one round --------------------------------------------------------------------------
    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        msgs = {nid: make_message(self.build_content(rnd), nid, FEDAVG, rnd) for nid in selected}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=lambda nid, r: self.parse_content(r.content),
                      max_reply_mb=self.s.max_reply_mb)
        self.nodes.identify({nid: m for nid, (_, _, _, m) in ex.replies.items()}, live=selected)
        require_replies(rnd, ex, self.s.min_replies)
        # an average that would leave G or D non-finite is undone; the node(s) whose weights did it are dropped
        blamed = apply_with_blame(lambda nids: self.aggregate([ex.replies[n] for n in nids]), list(ex.replies),
                                  [self.G, self.D])
        for nid in blamed:
            del ex.replies[nid]
            ex.dropped[nid] = "its weights made the averaged model non-finite; update rolled back"
            log.warning("dropping node %s this round: %s", nid, ex.dropped[nid])
        self.dropped_total += len(ex.dropped)
        for nid in selected:
            self.comm.add(rnd, nid, FEDAVG, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        clients = {}
        for nid in self.nodes.order(ex.replies):
            _, _, n, m = ex.replies[nid]
            clients[self.nodes.label(nid)] = {"node": nid, "num_examples": n, **{k: m[k] for k in TRAIN_METRICS}}
            clients[self.nodes.label(nid)]["steps_total"] = int(m["steps_total"])
        mean = lambda k: sum(c[k] for c in clients.values()) / len(clients)  # noqa: E731
        return {"round": rnd, "g_loss": mean("g_loss"), "d_loss": mean("d_loss"), "d_real_acc": mean("d_real_acc"),
                "d_fake_acc": mean("d_fake_acc"), "replies": len(ex.replies), "dropped": len(ex.dropped),
                "dropped_reasons": {str(n): why for n, why in ex.dropped.items()},
                "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
                "clients": clients}

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "g": self.G.state_dict(), "d": self.D.state_dict(),
                "partition_of": dict(self.nodes.partition_of), "comm": self.comm.state(),
                "dropped_total": self.dropped_total, "rng": self.rng.getstate()}


__all__ = ["FedAvg", "FedAvgSettings", "client_fedavg", "fedavg_aggregate", "FEDAVG", "CLIENT_STATE", "TRAIN_METRICS"]
