"""FedAvg for GANs (FedGAN baseline; SPEC 1 and 4.5) and its Flower variants.

Each round the server sends the global G and D (``train.fedavg``) as ONE ArrayRecord
(``arrays``, keys ``g.<name>`` and ``d.<name>``) with a ConfigRecord (``config``), the
record layout of Flower's own ``FedAvg``. Every selected client loads them, runs
``local-steps`` base-GAN steps (``models.steps.train_gan_step``) on its own data with its
own two optimizers — whose state (Adam moments, step counts) it keeps in ``context.state``
from round to round, as FedGAN's local agents do — and returns both networks in the same
layout with a MetricRecord holding ``num-examples``.

The aggregation is Flower's: the server hands the reply messages to an instance of one of
``flwr.serverapp.strategy``'s strategies (``fedavg-variant``):

- ``fedavg``: ``FedAvg``, the example-weighted average Σ n_i·w_i / Σ n_i;
- ``fedprox``: ``FedProx`` (the same average; ``proximal-mu`` goes to the clients, whose
  local objective gains μ/2·‖w − w_t‖², Li et al. 2020);
- ``fedadam`` / ``fedyogi``: ``FedAdam`` / ``FedYogi`` (FedOpt, Reddi et al. 2021): the
  average's move Δ_t = avg − w_t is a pseudo-gradient for a server-side Adam / Yogi step of
  rate ``fedopt-server-lr``; BatchNorm's running statistics and counters, which are not
  parameters, take the plain average;
- ``krum``: ``Krum`` (Blanchard et al. 2017), the one reply closest to its n − f − 2
  nearest others (f = ``krum-malicious``);
- ``trimmed-mean``: ``FedTrimmedAvg``, per coordinate the mean after dropping the
  ``trimmed-beta`` share of the highest and of the lowest values.

What stays ours: node sampling (seeded, straggler-aware), reply bounds, byte accounting,
the roll-back of an update that would leave G or D non-finite, checkpoints and resume.
Integer buffers (BatchNorm's ``num_batches_tracked``) are rounded back to integers.

What a client reveals: its networks after E local steps (once per round) and one integer,
the size of its local dataset — the count FedAvg weights by. Nothing else about its data
leaves it.
"""

from __future__ import annotations

import copy
import io
import math
import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp import strategy as flower
from torch import nn

from models.dp import DPConfig
from strategies import wire
from strategies.base import (ClientDP, check_dp_reply, dp_columns, FederatedSettings, GlobalGANServer, NodeBook,
                             Recorder, apply_with_blame, exchange, gan_config, gan_optimizers, local_gan_steps,
                             log, require_replies, sample_nodes)
from strategies.wire import NUM_EXAMPLES, make_message, require_count, require_metrics, require_tensors

FEDAVG = "train.fedavg"
ARRAYS = "arrays"                # the one ArrayRecord both ways: "g.<name>" and "d.<name>" (Flower's default key)
CLIENT_STATE = "fedavg.client"   # context.state ConfigRecord: both optimizers' state and the step count
PROXIMAL_MU = "proximal-mu"      # config key Flower's FedProx sends (0 for the other variants)
TRAIN_METRICS = ("g_loss", "d_loss", "d_real_acc", "d_fake_acc", "steps_total")
VARIANTS = ("fedavg", "fedprox", "fedadam", "fedyogi", "krum", "trimmed-mean")


# =====================================================================================
# G and D as one record
# =====================================================================================
def pack(G: nn.Module, D: nn.Module) -> ArrayRecord:
    """Both networks' state_dicts (parameters and buffers) in one ArrayRecord, keys prefixed."""
    return ArrayRecord({**{f"g.{k}": v.detach().cpu().contiguous() for k, v in G.state_dict().items()},
                        **{f"d.{k}": v.detach().cpu().contiguous() for k, v in D.state_dict().items()}})


def packed_reference(G: nn.Module, D: nn.Module) -> dict[str, torch.Tensor]:
    return {**{f"g.{k}": v for k, v in G.state_dict().items()}, **{f"d.{k}": v for k, v in D.state_dict().items()}}


def unpack(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(G's state_dict, D's state_dict) from a packed dict."""
    return ({k[2:]: v for k, v in state.items() if k.startswith("g.")},
            {k[2:]: v for k, v in state.items() if k.startswith("d.")})


def as_reference(record: ArrayRecord, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An aggregated record as tensors of ``reference``'s dtypes (integer entries rounded)."""
    out = {}
    for k, ref in reference.items():
        t = wire.get_tensor(record, k)
        out[k] = t.to(ref.dtype) if ref.is_floating_point() else t.round().to(ref.dtype)
    return out


# =====================================================================================
# Client side
# =====================================================================================
class Proximal:
    """FedProx's local objective f_i(w) + μ/2·‖w − w_t‖² (Li et al. 2020, Eq. 2) around an
    optimizer: before every step the proximal term's gradient μ·(w − w_t) is added to each
    parameter's gradient, w_t being the global weights the round started from."""

    def __init__(self, opt: torch.optim.Optimizer, model: nn.Module, mu: float) -> None:
        self.opt, self.mu = opt, float(mu)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.anchor = [p.detach().clone() for p in self.params]

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.opt.zero_grad(set_to_none=set_to_none)

    def step(self):
        with torch.no_grad():
            for p, a in zip(self.params, self.anchor):
                if p.grad is not None:
                    p.grad.add_(p - a, alpha=self.mu)
        return self.opt.step()


def client_fedavg(content: RecordDict, state: RecordDict, *,
                  sample_real: Callable[[int, torch.Generator], torch.Tensor], num_examples: int,
                  build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                  device: str, seed: int, partition_id: int | None = None,
                  dp: DPConfig | None = None, real_data: torch.Tensor | None = None) -> RecordDict:
    """``train.fedavg``: E local GAN steps from the global (G, D) — with FedProx's proximal
    term when the config carries ``proximal-mu`` > 0; both networks (one record) and
    ``num-examples`` (the size of this client's dataset) go back.

    With ``dp`` every local D step is a DP-SGD step (models/dp.py) counted in the client's
    accountant; the weights sent back are post-processing. A client whose steps this round
    would exceed ``dp-target-epsilon`` trains nothing and replies with metrics only
    (``dp_exhausted`` = 1)."""
    cfg = content.config_records[wire.CONFIG]
    G, D = build_generator().to(device), build_discriminator().to(device)
    g_state, d_state = unpack({k: wire.get_tensor(content.array_records[ARRAYS], k)
                               for k in content.array_records[ARRAYS].keys()})
    G.load_state_dict(g_state)
    D.load_state_dict(d_state)
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
    mu = float(cfg.get(PROXIMAL_MU, 0.0))
    step_g, step_d = (Proximal(opt_g, G, mu), Proximal(opt_d, D, mu)) if mu > 0 else (opt_g, opt_d)
    private, stop = ClientDP.begin(dp, state, real_data, D, str(cfg["loss"]), batch_size=int(cfg["batch-size"]),
                                   steps_more=int(cfg["steps"]) * int(cfg["client-disc-steps"]), seed=seed,
                                   partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    stats = local_gan_steps(G, D, step_g, step_d, sample_real=sample_real, cfg=cfg, seed=seed,
                            partition_id=partition_id, steps_done=done, device=device, dp=private)
    if private is not None:
        private.save()
    done += int(cfg["steps"])
    buf = io.BytesIO()
    torch.save({"opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(), "steps": done}, buf)
    state.config_records[CLIENT_STATE] = ConfigRecord({"blob": buf.getvalue(), "steps": done})
    metrics = {NUM_EXAMPLES: int(num_examples), "g_loss": stats.get("g_loss", math.nan),
               "d_loss": stats.get("d_loss", math.nan), "d_real_acc": stats.get("d_real_acc", math.nan),
               "d_fake_acc": stats.get("d_fake_acc", math.nan), "steps_total": done,
               **(private.metrics() if private is not None else {})}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({ARRAYS: pack(G, D), wire.METRICS: MetricRecord(metrics)})


# =====================================================================================
# Server-side math: Flower's strategies
# =====================================================================================
@dataclass(frozen=True)
class FedAvgSettings(FederatedSettings):
    """FedGAN: ``local_steps`` GAN steps on every client between two aggregations, and
    which of Flower's aggregations to use (``variant``) with its knobs."""

    local_steps: int = 25
    client_disc_steps: int = 1
    variant: str = "fedavg"
    proximal_mu: float = 0.01        # fedprox
    server_lr: float = 0.01          # fedadam, fedyogi: eta of the server optimizer
    server_tau: float = 0.001        # fedadam, fedyogi: its adaptivity (epsilon-like)
    krum_malicious: int = 0          # krum: f, the number of Byzantine clients tolerated
    trimmed_beta: float = 0.2        # trimmed-mean: share cut at each end per coordinate


def flower_strategy(s: FedAvgSettings) -> flower.Strategy:
    """The Flower strategy instance that aggregates for ``s.variant``. Sampling stays ours,
    so Flower's own sampling knobs are set to take whatever it is given."""
    common = dict(fraction_train=1.0, min_train_nodes=1, min_evaluate_nodes=1,
                  min_available_nodes=1, weighted_by_key=NUM_EXAMPLES, arrayrecord_key=ARRAYS,
                  configrecord_key=wire.CONFIG)
    if s.variant == "fedavg":
        return flower.FedAvg(**common)
    if s.variant == "fedprox":
        return flower.FedProx(proximal_mu=s.proximal_mu, **common)
    if s.variant == "fedadam":
        return flower.FedAdam(eta=s.server_lr, eta_l=s.gen_lr, tau=s.server_tau, **common)
    if s.variant == "fedyogi":
        return flower.FedYogi(eta=s.server_lr, eta_l=s.gen_lr, tau=s.server_tau, **common)
    if s.variant == "krum":
        return flower.Krum(num_malicious_nodes=s.krum_malicious, **common)
    if s.variant == "trimmed-mean":
        return flower.FedTrimmedAvg(beta=s.trimmed_beta, **common)
    raise ValueError(f"unknown fedavg variant {s.variant!r}; one of {', '.join(VARIANTS)}")


def is_fedopt(strategy: flower.Strategy) -> bool:
    """FedAdam / FedYogi (and FedAdagrad): a server optimizer that keeps state between rounds."""
    return isinstance(strategy, (flower.FedAdam, flower.FedYogi, flower.FedAdagrad))


def flower_aggregate(strategy: flower.Strategy, rnd: int, replies: list, current: dict[str, torch.Tensor],
                     parameters: set[str]) -> dict[str, torch.Tensor]:
    """What ``strategy`` makes of the reply messages ``replies``, as tensors shaped and typed
    like ``current`` (the global packed state). For FedOpt the server optimizer steps the
    parameters only: entries not in ``parameters`` (BatchNorm statistics) take the average."""
    if is_fedopt(strategy):
        strategy.current_arrays = {k: v.detach().cpu().numpy().copy() for k, v in current.items()}
    record, _ = strategy.aggregate_train(rnd, [_Reply(r) for r in replies])
    if record is None:
        raise ValueError("the Flower strategy returned no aggregate")
    out = as_reference(record, current)
    if is_fedopt(strategy):
        plain = flower.FedAvg(weighted_by_key=strategy.weighted_by_key)
        mean = as_reference(plain.aggregate_train(rnd, [_Reply(r) for r in replies])[0], current)
        out.update({k: mean[k] for k in out if k not in parameters})
    return out


def fedavg_aggregate(replies: list[tuple[ArrayRecord, int]],
                     reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Example-weighted average Σ n_i·w_i / Σ n_i of the clients' state dicts by Flower's
    ``FedAvg.aggregate_train``; integer entries of ``reference`` are rounded back."""
    if not replies:
        raise ValueError("nothing to aggregate")
    contents = [RecordDict({ARRAYS: rec, wire.METRICS: MetricRecord({NUM_EXAMPLES: int(n)})}) for rec, n in replies]
    record, _ = flower.FedAvg(weighted_by_key=NUM_EXAMPLES).aggregate_train(0, [_Reply(c) for c in contents])
    return as_reference(record, reference)


class _Reply:
    """One reply as Flower's ``aggregate_train`` reads it (``content``, ``has_error``), holding its
    own shallow copy of the records: ``FedTrimmedAvg`` pops the arrays it reads, and an
    aggregation may be tried more than once (the roll-back's blame search)."""

    def __init__(self, reply) -> None:   # a Message, a _Reply, or a bare RecordDict
        content = reply if isinstance(reply, RecordDict) else reply.content
        self.content = RecordDict({name: type(rec)(dict(rec.items())) for name, rec in content.items()})

    def has_error(self) -> bool:
        return False


# =====================================================================================
# Server side
# =====================================================================================
class FedAvg(GlobalGANServer):
    """The FedAvg-GAN server: holds the global G and D, no optimizers of its own (those are the
    clients'); a Flower strategy (``settings.variant``) aggregates."""

    name = "FedAvg"

    def __init__(self, settings: FedAvgSettings, *, make_generator: Callable[[], nn.Module],
                 make_discriminator: Callable[[], nn.Module], recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None, device: str = "cpu",
                 sample_shape: tuple[int, ...] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None) -> None:
        super().__init__(settings, make_generator=make_generator, make_discriminator=make_discriminator,
                         recorder=recorder, evaluate=evaluate, device=device, sample_shape=sample_shape,
                         with_optimizers=False)
        self.name = f"FedAvg ({settings.variant})" if settings.variant != "fedavg" else "FedAvg"
        self.flower = flower_strategy(settings)
        self.nodes = NodeBook(describe_partition)
        self.comm = wire.CommLog()
        self.rng = random.Random(settings.seed)
        self.dropped_total = 0
        self._trial: flower.Strategy | None = None

    # --- message contents (pure) ----------------------------------------------------------
    def build_content(self, rnd: int) -> RecordDict:
        s = self.s
        cfg = gan_config(loss=s.loss, gen_lr=s.gen_lr, disc_lr=s.disc_lr, beta1=s.beta1, beta2=s.beta2,
                         batch_size=s.batch_size, steps=s.local_steps, disc_steps=s.client_disc_steps, rnd=rnd,
                         seed=s.seed)
        if isinstance(self.flower, flower.FedProx):   # what FedProx.configure_train adds to the config
            cfg[PROXIMAL_MU] = float(self.flower.proximal_mu)
        return RecordDict({ARRAYS: pack(self.G, self.D), wire.CONFIG: cfg})

    def parse_content(self, content: RecordDict) -> tuple[RecordDict, int, dict]:
        """The reply content (both networks checked against the global ones: keys, shapes, dtypes,
        finite values, a bounded move), its example count and metrics."""
        check_dp_reply(wire.metrics_of(content))   # a client at its dp-target-epsilon sends no weights
        wire.require_only(content, {ARRAYS: None, wire.METRICS: None})
        current = packed_reference(self.G, self.D)
        got = require_tensors(content, ARRAYS, current)
        wire.require_total_norm((got[k] - current[k].detach().cpu() for k in got if current[k].is_floating_point()),
                                f"{ARRAYS} (weight move)", self.s.max_update_norm)
        metrics = wire.metrics_of(content)
        require_metrics(metrics, TRAIN_METRICS)
        return content, require_count(metrics), metrics

    def aggregate(self, rnd: int, replies: list[tuple[Message | RecordDict, int, dict]]) -> None:
        """Set the global G and D to what the Flower strategy makes of the replies (the reply
        messages, or their contents when they did not come as messages). A stateful
        strategy (FedOpt's moments) steps on a copy, kept by :meth:`run_round` only when the
        update stands."""
        trial = copy.deepcopy(self.flower)
        current = packed_reference(self.G, self.D)
        parameters = {f"g.{k}" for k, _ in self.G.named_parameters()} | {f"d.{k}" for k, _ in self.D.named_parameters()}
        g_state, d_state = unpack(flower_aggregate(trial, rnd, [m for m, _, _ in replies], current, parameters))
        self.G.load_state_dict(g_state)
        self.D.load_state_dict(d_state)
        self._trial = trial

    # --- one round --------------------------------------------------------------------------
    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        msgs = {nid: make_message(self.build_content(rnd), nid, FEDAVG, rnd) for nid in selected}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout,
                      parse=lambda nid, r: (r, *self.parse_content(r.content)[1:]), max_reply_mb=self.s.max_reply_mb)
        self.nodes.identify({nid: m for nid, (_, _, m) in ex.replies.items()}, live=selected)
        require_replies(rnd, ex, self.s.min_replies)
        # an aggregate that would leave G or D non-finite is undone; the node(s) whose weights did it are dropped
        self._trial = None
        blamed = apply_with_blame(lambda nids: self.aggregate(rnd, [ex.replies[n] for n in nids]), list(ex.replies),
                                  [self.G, self.D])
        if len(blamed) < len(ex.replies) and self._trial is not None:
            self.flower = self._trial          # the server optimizer's state moves on with the update that stood
        for nid in blamed:
            del ex.replies[nid]
            ex.dropped[nid] = "its weights made the aggregated model non-finite; update rolled back"
            log.warning("dropping node %s this round: %s", nid, ex.dropped[nid])
        self.dropped_total += len(ex.dropped)
        for nid in selected:
            self.comm.add(rnd, nid, FEDAVG, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        clients = {}
        for nid in self.nodes.order(ex.replies):
            _, n, m = ex.replies[nid]
            clients[self.nodes.label(nid)] = {"node": nid, "num_examples": n, **{k: m[k] for k in TRAIN_METRICS}}
            clients[self.nodes.label(nid)]["steps_total"] = int(m["steps_total"])
            clients[self.nodes.label(nid)].update(dp_columns(m))
        mean = lambda k: sum(c[k] for c in clients.values()) / len(clients)  # noqa: E731
        return {"round": rnd, "g_loss": mean("g_loss"), "d_loss": mean("d_loss"), "d_real_acc": mean("d_real_acc"),
                "d_fake_acc": mean("d_fake_acc"), "replies": len(ex.replies), "dropped": len(ex.dropped),
                "dropped_reasons": {str(n): why for n, why in ex.dropped.items()},
                "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
                "clients": clients}

    # --- checkpoints ------------------------------------------------------------------------
    def flower_state(self) -> dict:
        """The Flower strategy's own state between rounds (FedOpt: its moments m_t, v_t)."""
        return {k: copy.deepcopy(v) for k, v in vars(self.flower).items() if k in ("m_t", "v_t")}

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "g": self.G.state_dict(), "d": self.D.state_dict(),
                "flower_state": self.flower_state(), "partition_of": dict(self.nodes.partition_of),
                "comm": self.comm.state(), "dropped_total": self.dropped_total, "rng": self.rng.getstate()}

    def restore(self, ckpt: dict) -> None:
        """Continue from :meth:`checkpoint`'s output: the global networks, the Flower strategy's
        state, node labels, byte totals and the sampler; the next round is ``ckpt['round'] + 1``."""
        self.G.load_state_dict(ckpt["g"])
        self.D.load_state_dict(ckpt["d"])
        for k, v in ckpt.get("flower_state", {}).items():
            setattr(self.flower, k, copy.deepcopy(v))
        self.nodes.partition_of.update(ckpt.get("partition_of", {}))
        self.comm.down_total = int(ckpt["comm"]["down_total"])
        self.comm.up_total = int(ckpt["comm"]["up_total"])
        self.dropped_total = int(ckpt.get("dropped_total", 0))
        self.rng.setstate(ckpt["rng"])
        self.first_round = int(ckpt["round"]) + 1


__all__ = ["FedAvg", "FedAvgSettings", "client_fedavg", "fedavg_aggregate", "flower_aggregate", "flower_strategy",
           "pack", "unpack", "Proximal", "FEDAVG", "ARRAYS", "CLIENT_STATE", "PROXIMAL_MU", "TRAIN_METRICS", "VARIANTS"]
