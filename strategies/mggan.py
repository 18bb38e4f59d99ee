"""MGGAN across clients (thesis chapter 3, SPEC 4.4): generative groups regrouped by moving
discriminators between clients on a growing interval, with the loss-driven learning-rate rule.

Group k = (G_k, D_k) lives on client k (in its ``context.state``) and trains its base GAN
on the client's own data. Every round the server asks each client for a number of local
iterations (``train.local``) and receives the per-iteration generator-loss trace. The
iteration counter is global: the server sizes each round so that a regrouping falls
exactly on its iteration i_T.

* Period A (before the first regrouping) ends when the mean loss trace of the groups
  stops decreasing (``strategies.mggan_rules.period_a_end``); its length is T0, and the
  first regrouping happens at the end of the round in which that is detected.
  Then T ← min(T·ξ, T̄) (``RegroupSchedule``). ``regroup-interval = N`` fixes T = N
  instead (0 = never), as in the thesis' ring experiments.
* Regrouping: the server collects every participating D (``query.get_discriminator``),
  draws a uniform random derangement π and sends client k the weights of D_π(k)
  (``train.set_discriminator``), so generator k now trains against D_π(k) and no D
  stays with its own G. D's optimizer moments move with it or are reset
  (``move-d-moments``). Each move is one D up to the server and one D down.
* Learning rate (Algorithm 1, VRL Eq. 3.1) runs on the client from its own loss trace and
  the regrouping iterations the server sends; the rate of iteration i is decided before i
  runs, and D's rate follows G's by a fixed ratio (``client_local``).
* Groups may use different base losses (e.g. ``bce`` and ``wgan``) with one D
  architecture, so discriminators can move between them. Each group trains with its base
  GAN's own schedule (``MGGANSettings.group_config``): a ``wgan`` group uses RMSProp at
  ``wgan-lr`` (its L0) and ``wgan-critic-steps`` critic updates per G update, the others
  ``client-gen-lr`` / ``client-disc-lr`` and ``client-disc-steps``.
* Samples come from the uniform mixture of the K generators (``query.sample``).
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.losses import make_optimizer
from models.steps import sample_latent, train_gan_step
from models.dp import DPConfig
from strategies import wire
from strategies.base import (ClientDP, Recorder, RunFailed, check_dp_reply, check_identities, check_stop, dp_columns,
                             exchange, log, wait_for_nodes)
from strategies.mggan_rules import (LearningRateController, RegroupSchedule, group_lr_max, period_a_end,
                                    random_derangement, regroup_anchor)

LOCAL = "train.local"
GET_D = "query.get_discriminator"
SAMPLE = "query.sample"
CLIENT_STATE = "mggan.client"
D_WEIGHTS, D_MOMENTS, D_META, TRACE, SAMPLES = "d", "d_moments", "d_meta", "g_loss_trace", "samples"


# =====================================================================================
# Client side: group k's (G_k, D_k) never leave client k, except D at a regroup
# =====================================================================================
@dataclass
class GroupState:
    """Everything group k keeps on its client between messages."""

    G: nn.Module
    D: nn.Module
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    lr: LearningRateController
    loss: str
    iteration: int = 0
    d_steps_total: int = 0


def optimizer_kind(loss: str) -> str:
    """Which optimizer the base loss uses (moments can only move between equal kinds)."""
    return "rmsprop" if loss == "wgan" else "adam"


def _new_group(content_cfg: ConfigRecord, build_g, build_d) -> GroupState:
    loss = str(content_cfg["loss"])
    G, D = build_g(), build_d()
    betas = (float(content_cfg["beta1"]), float(content_cfg["beta2"]))
    lr_g, lr_d = float(content_cfg["gen-lr"]), float(content_cfg["disc-lr"])
    lr = LearningRateController(lr0=lr_g, lr_max=float(content_cfg["lr-max"]), delta=float(content_cfg["lr-delta"]),
                                a=int(content_cfg["lr-window"]), gamma_max=float(content_cfg["vrl-max"]))
    return GroupState(G, D, make_optimizer(loss, G.parameters(), lr_g, betas),
                      make_optimizer(loss, D.parameters(), lr_d, betas), lr, loss)


def _save_group(g: GroupState) -> ConfigRecord:
    buf = io.BytesIO()
    torch.save({"G": g.G.state_dict(), "D": g.D.state_dict(), "opt_g": g.opt_g.state_dict(),
                "opt_d": g.opt_d.state_dict(), "lr": g.lr.state_dict(), "loss": g.loss, "iteration": g.iteration,
                "d_steps_total": g.d_steps_total}, buf)
    return ConfigRecord({"blob": buf.getvalue(), "iteration": g.iteration})


def load_group(state: RecordDict, content_cfg: ConfigRecord, build_g, build_d, device: str) -> GroupState:
    """Group state from ``context.state`` (created on first contact)."""
    if CLIENT_STATE not in state.config_records:
        g = _new_group(content_cfg, build_g, build_d)
        g.G.to(device)
        g.D.to(device)
        return g
    blob = torch.load(io.BytesIO(state.config_records[CLIENT_STATE]["blob"]), map_location=device,
                      weights_only=False)
    g = _new_group(ConfigRecord({**dict(content_cfg), "loss": blob["loss"]}), build_g, build_d)
    g.G.to(device)
    g.D.to(device)
    g.G.load_state_dict(blob["G"])
    g.D.load_state_dict(blob["D"])
    g.opt_g.load_state_dict(blob["opt_g"])
    g.opt_d.load_state_dict(blob["opt_d"])
    g.lr.load_state_dict(blob["lr"])
    g.iteration, g.d_steps_total = int(blob["iteration"]), int(blob["d_steps_total"])
    return g


def _iteration_or_none(v) -> int | None:
    """``next-regroup`` / ``last-regroup`` on the wire: an iteration, or -1 for none."""
    v = int(v)
    return None if v < 0 else v


def _set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr


def client_local(content: RecordDict, state: RecordDict, *, sample_real, build_generator, build_discriminator,
                 device: str, seed: int, partition_id: int | None = None, dp: DPConfig | None = None,
                 real_data: torch.Tensor | None = None) -> RecordDict:
    """``train.local``: ``steps`` iterations ``i = start-iter, …`` of the group's base GAN on
    this client's data.

    Each iteration ``i``:

    1. when ``lr-rule`` is on, the rate Algorithm 1 (thesis §3.2.2) gives for index ``i`` is
       set on G's optimizer *before* the update, so the raise inside [i_T − a, i_T + a]
       and the reset to L0 at i_T + a + 1 apply at exactly those iterations. i_T is
       :func:`~strategies.mggan_rules.regroup_anchor` of ``i`` and the server's
       ``next-regroup`` / ``last-regroup``. The VRL γ it tests (Eq. 3.1) is the latest one
       known before iteration ``i`` runs: ``|L_{i-2} − L_{i-1}| / |L_{i-1}|``, where ``L_j``
       is the generator loss of iteration ``j`` (G's loss on its update batch, before G's
       step) — across message boundaries and regroupings alike; γ = ∞ (no raise) while
       fewer than two losses exist. D's optimizer gets ``disc-lr`` scaled by the same
       factor L / L0 (so D keeps the ratio of the group's configured rates, and exactly
       ``disc-lr`` whenever G is at L0);
    2. one base-GAN step: ``client-disc-steps`` D updates, then one G update;
    3. the G loss L_i is recorded for Algorithm 1 and appended to the trace that goes
       back to the server with scalar metrics (``lr``: the rate G used at the message's
       last iteration).

    With ``dp`` every D update is a DP-SGD step (models/dp.py) on a Poisson batch of this
    client's data, counted in its accountant (reply metric ``dp_epsilon``); a D that arrives
    from another group at a regrouping is post-processing of that group's DP steps. A client
    whose steps this round would exceed ``dp-target-epsilon`` trains nothing and replies with
    metrics only (``dp_exhausted`` = 1).
    """
    cfg = content.config_records[wire.CONFIG]
    start, steps = int(cfg["start-iter"]), int(cfg["steps"])
    lr_rule, disc_steps = bool(cfg["lr-rule"]), int(cfg["client-disc-steps"])
    g = load_group(state, cfg, build_generator, build_discriminator, device)
    moments_loaded = receive_discriminator(g, content) if D_WEIGHTS in content.array_records else -1
    # (an exhausted client returns before saving: the loaded group and any D received stay unsaved)
    private, stop = ClientDP.begin(dp, state, real_data, g.D, g.loss, batch_size=int(cfg["batch-size"]),
                                   steps_more=steps * disc_steps, seed=seed, partition_id=partition_id,
                                   device=device)
    if stop is not None:
        return stop
    next_at, last_at = _iteration_or_none(cfg["next-regroup"]), _iteration_or_none(cfg["last-regroup"])
    disc_lr0 = float(cfg["disc-lr"])
    gen = torch.Generator().manual_seed(seed * 1_000_003 + (partition_id or 0) * 7919 + start)
    latent = torch.Generator(device=device).manual_seed(seed * 31 + (partition_id or 0) * 131 + start)
    trace, stats = [], []
    batch = int(cfg["batch-size"])
    for n in range(steps):
        i = start + n
        if lr_rule:  # Algorithm 1 at index i, before iteration i runs
            lr = g.lr.rate(i, regroup_anchor(i, next_at, last_at, g.lr.a))
            _set_lr(g.opt_g, lr)
            _set_lr(g.opt_d, disc_lr0 * (lr / g.lr.lr0))
        if private is not None:
            out = private.train_gan_step(g.G, g.D, g.opt_g, g.opt_d, kind=g.loss, d_steps=disc_steps,
                                         generator=latent)
        else:
            real = sample_real(batch, gen).to(device)
            out = train_gan_step(g.G, g.D, g.opt_g, g.opt_d, real, kind=g.loss, d_steps=disc_steps, generator=latent)
        g.d_steps_total += disc_steps
        g.lr.observe(out["g_loss"])
        trace.append(out["g_loss"])
        stats.append(out)
    g.iteration = start + steps
    state.config_records[CLIENT_STATE] = _save_group(g)
    if private is not None:
        private.save()
    mean = lambda k: sum(s[k] for s in stats) / max(1, len(stats))  # noqa: E731
    metrics = {TRACE: [float(x) for x in trace], "d_loss": mean("d_loss"), "d_real_acc": mean("d_real_acc"),
               "d_fake_acc": mean("d_fake_acc"), "lr": float(g.opt_g.param_groups[0]["lr"]),
               "d_steps_total": g.d_steps_total, "moments_loaded": moments_loaded,
               **(private.metrics() if private is not None else {})}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    reply = RecordDict({wire.METRICS: MetricRecord(metrics)})
    if bool(cfg["return-d"]):  # this round ends at a regrouping: D_k goes to the server
        reply.update(discriminator_records(g, bool(cfg["move-d-moments"])))
    return reply


def _flatten_moments(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, t in st.items():
            out[f"{idx}.{name}"] = torch.as_tensor(t).detach().cpu()
    return out


def _unflatten_moments(rec: ArrayRecord, opt: torch.optim.Optimizer) -> dict:
    state: dict[int, dict] = {}
    for key in rec.keys():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = wire.get_tensor(rec, key)
    return {"state": state, "param_groups": opt.state_dict()["param_groups"]}


def discriminator_records(g: GroupState, with_moments: bool) -> dict:
    """D_k's weights (and optimizer moments) as records, for a regrouping."""
    out = {D_WEIGHTS: ArrayRecord(g.D.state_dict()), D_META: ConfigRecord({"optimizer": optimizer_kind(g.loss)})}
    if with_moments:
        out[D_MOMENTS] = wire.tensor_record(**_flatten_moments(g.opt_d))
    return out


def receive_discriminator(g: GroupState, content: RecordDict) -> int:
    """Replace D_k by the discriminator of another group (a regrouping); returns 1 if its
    optimizer moments came along and were loaded, 0 if D's optimizer starts fresh (moments
    not sent, or made by another optimizer kind). G_k and everything else stay as they are."""
    g.D.load_state_dict(content.array_records[D_WEIGHTS].to_torch_state_dict())
    lr_d = g.opt_d.param_groups[0]["lr"]
    betas = g.opt_d.param_groups[0].get("betas", (0.5, 0.999))
    g.opt_d = make_optimizer(g.loss, g.D.parameters(), lr_d, betas)
    if D_MOMENTS in content.array_records and \
            str(content.config_records[D_META]["optimizer"]) == optimizer_kind(g.loss):
        g.opt_d.load_state_dict(_unflatten_moments(content.array_records[D_MOMENTS], g.opt_d))
        return 1
    return 0


def client_get_discriminator(content: RecordDict, state: RecordDict, *, build_generator, build_discriminator,
                             device: str) -> RecordDict:
    """``query.get_discriminator``: D_k's weights (and moments), when a regrouping was not
    announced in advance (the first one, right after period A is detected)."""
    cfg = content.config_records[wire.CONFIG]
    g = load_group(state, cfg, build_generator, build_discriminator, device)
    return RecordDict(discriminator_records(g, bool(cfg["move-d-moments"])))


def client_sample(content: RecordDict, state: RecordDict, *, build_generator, build_discriminator,
                  device: str) -> RecordDict:
    """``query.sample``: n samples of G_k (generated data only)."""
    cfg = content.config_records[wire.CONFIG]
    g = load_group(state, cfg, build_generator, build_discriminator, device)
    z = sample_latent(int(cfg["n"]), g.G.latent_dim, generator=torch.Generator(device=device).manual_seed(
        int(cfg["seed"])), device=device)
    with torch.no_grad():
        x = g.G(z)
    return RecordDict({SAMPLES: wire.tensor_record(**{SAMPLES: x.float()})})


# =====================================================================================
# Pure server-side helpers
# =====================================================================================
def mixture(samples_by_group: dict[str, torch.Tensor], n: int, rng: torch.Generator) -> torch.Tensor:
    """n samples from the uniform mixture of the groups' generators (SPEC 4.4)."""
    names = sorted(samples_by_group)
    pick = torch.randint(len(names), (n,), generator=rng)
    rows, used = [], {k: 0 for k in names}
    for j in pick.tolist():
        name = names[j]
        rows.append(samples_by_group[name][used[name]])
        used[name] += 1
    return torch.stack(rows)


def mean_trace(traces: list[list[float]]) -> list[float]:
    """Iteration-wise mean of equally long loss traces."""
    return [sum(vals) / len(vals) for vals in zip(*traces)]


# =====================================================================================
# Server side: the strategy
# =====================================================================================
@dataclass(frozen=True)
class MGGANSettings:
    num_rounds: int = 10
    local_steps: int = 25
    batch_size: int = 64
    group_losses: tuple[str, ...] = ("bce",)
    gen_lr: float = 2e-4
    disc_lr: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    client_disc_steps: int = 1
    regroup_interval: int = -1          # -1 dynamic (period A, xi, t_max), 0 never, N fixed
    regroup_xi: float = 1.5
    regroup_t_max: int = 2000
    period_a_window: int = 50
    period_a_threshold: float = 0.01
    period_a_min: int = 100
    period_a_cap: int = 2000
    lr_rule: bool = True
    lr_window: int = 10
    lr_delta: float = 0.1
    lr_max: float = 1e-3
    vrl_max: float = 0.05
    move_d_moments: bool = False
    min_nodes: int = 2
    min_replies: int = 1
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    max_reply_mb: float = 256.0
    eval_every: int = 0
    eval_samples: int = 2500
    seed: int = 0
    wgan_lr: float = 5e-5               # a "wgan" group's L0 for G and D (RMSProp), run config wgan-lr
    wgan_critic_steps: int = 5          # a "wgan" group's critic updates per G update, wgan-critic-steps

    def __post_init__(self) -> None:
        if self.lr_max < self.gen_lr:   # Algorithm 1's limit L̄ must not lie below L0 (every group, scaled)
            raise ValueError(f"lr-max ({self.lr_max}) must be >= client-gen-lr ({self.gen_lr}): it is the upper "
                             "limit of the learning rate Algorithm 1 raises from L0")
        if not self.wgan_lr > 0 or self.wgan_critic_steps < 1:
            raise ValueError(f"wgan_lr must be > 0 and wgan_critic_steps >= 1, got {self.wgan_lr}, "
                             f"{self.wgan_critic_steps}")

    def group_config(self, loss: str) -> dict:
        """The schedule of a group whose base loss is ``loss``, as ``train.local`` config keys.

        A ``wgan`` group (weight clipping) follows the WGAN paper: G and D at ``wgan_lr``
        (RMSProp, ``models.losses.make_optimizer``) and ``wgan_critic_steps`` critic updates
        per G update; ``wgan_lr`` is its L0 for Algorithm 1 and its upper limit L̄ is
        ``lr_max`` scaled by ``wgan_lr / gen_lr`` (:func:`~strategies.mggan_rules.group_lr_max`).
        Every other group uses ``gen_lr`` (its L0), ``disc_lr``, ``client_disc_steps`` and
        ``lr_max``.
        """
        if loss == "wgan":
            return {"gen-lr": self.wgan_lr, "disc-lr": self.wgan_lr, "client-disc-steps": self.wgan_critic_steps,
                    "lr-max": group_lr_max(self.lr_max, self.gen_lr, self.wgan_lr)}
        return {"gen-lr": self.gen_lr, "disc-lr": self.disc_lr, "client-disc-steps": self.client_disc_steps,
                "lr-max": self.lr_max}


class MGGAN:
    """The MGGAN server loop over a Flower Grid.

    ``evaluate(samples_by_name) -> dict`` (from the app) scores sample sets, e.g. ring
    mode coverage; it receives every group's samples and the mixture's under "mixture".
    """

    def __init__(self, settings: MGGANSettings, *, recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None) -> None:
        self.s = settings
        self.recorder = recorder
        self.evaluate = evaluate
        self.describe_partition = describe_partition
        self.schedule = RegroupSchedule(xi=settings.regroup_xi, t_max=settings.regroup_t_max,
                                        fixed_interval=settings.regroup_interval)
        self.iteration = 0
        self.last_regroup = -1
        self.trace: list[float] = []
        self.regroups: list[dict] = []
        self.partition_of: dict[int, int] = {}
        self.group_of: dict[int, int] = {}
        self.comm = wire.CommLog()
        self.eval_comm = wire.CommLog()  # sample queries for scoring (phase "eval")
        self.rng = random.Random(settings.seed)
        self.dropped_total = 0
        self.period_a = None
        self.identified = False
        self.pending_d: dict[int, dict] = {}   # node -> the records of the D it receives with its next message

    def label(self, nid: int) -> str:
        k = self.group_of.get(nid, -1)
        pid = self.partition_of.get(nid)
        base = f"group {k}"
        return base if pid is None else f"{base} (client {pid})"

    def group_loss(self, nid: int) -> str:
        return self.s.group_losses[self.group_of[nid] % len(self.s.group_losses)]

    def config_for(self, nid: int, **extra) -> ConfigRecord:
        """The config record of a message to node ``nid``: its group's schedule (per base loss,
        :meth:`MGGANSettings.group_config`) and the run-wide settings, plus ``extra``."""
        s = self.s
        loss = self.group_loss(nid)
        group = s.group_config(loss)
        return ConfigRecord({
            "loss": loss, "gen-lr": group["gen-lr"], "disc-lr": group["disc-lr"], "beta1": s.beta1,
            "beta2": s.beta2, "lr-max": group["lr-max"], "lr-delta": s.lr_delta, "lr-window": s.lr_window,
            "vrl-max": s.vrl_max, "lr-rule": s.lr_rule, "client-disc-steps": group["client-disc-steps"],
            "batch-size": s.batch_size, "move-d-moments": s.move_d_moments, **extra})

    def _message(self, nid: int, mtype: str, rnd: int, content: RecordDict) -> Message:
        return Message(content=content, dst_node_id=nid, message_type=mtype, group_id=str(rnd))

    # --- local training --------------------------------------------------------------------
    def steps_this_round(self) -> int:
        steps = self.s.local_steps
        if self.schedule.next_at is not None and self.schedule.next_at > self.iteration:
            steps = min(steps, self.schedule.next_at - self.iteration)
        return steps

    @staticmethod
    def _d_bytes(content: RecordDict) -> int:
        """Bytes of the regrouping records (D's weights, moments, optimizer kind) in a message."""
        return sum(rec.count_bytes() for name, rec in content.items() if name in (D_WEIGHTS, D_MOMENTS, D_META))

    @staticmethod
    def _check_d(content: RecordDict) -> None:
        if D_WEIGHTS not in content.array_records or D_META not in content.config_records:
            raise wire.BadReply(f"missing array record '{D_WEIGHTS}' at a regrouping")
        rec = content.array_records[D_WEIGHTS]
        for key in rec.keys():
            if not torch.isfinite(wire.get_tensor(rec, key).float()).all():
                raise wire.BadReply(f"D weight '{key}' holds NaN or Inf")

    def _parse_local(self, steps: int, wants_d: bool):
        def parse(nid: int, reply: Message) -> dict:
            metrics = reply.content.metric_records.get(wire.METRICS)
            if metrics is not None:   # a client at its dp-target-epsilon did not train
                check_dp_reply({k: v for k, v in metrics.items() if k != TRACE})
            if metrics is None or TRACE not in metrics:
                raise wire.BadReply(f"missing metric '{TRACE}'")
            trace = [float(v) for v in metrics[TRACE]]
            if len(trace) != steps:
                raise wire.BadReply(f"loss trace has {len(trace)} values, expected {steps}")
            if not all(math.isfinite(v) for v in trace):
                raise wire.BadReply("loss trace holds NaN or Inf")
            rest = {k: float(v) for k, v in metrics.items() if k != TRACE}
            if not all(math.isfinite(v) for v in rest.values()):
                raise wire.BadReply("a metric is not finite")
            if wants_d:
                self._check_d(reply.content)
            return {"trace": trace, **rest, "content": reply.content}
        return parse

    def _log_exchange(self, rnd: int, nodes: list[int], action: str, ex, d_down: dict, d_up: dict) -> None:
        """comm.jsonl rows; bytes of moved discriminators are booked as action 'regroup'."""
        for nid in nodes:
            down, up = ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0)
            dd, du = d_down.get(nid, 0), d_up.get(nid, 0)
            self.comm.add(rnd, nid, action, down - dd, up - du, group=self.group_of[nid], dropped=nid in ex.dropped)
            if dd or du:
                self.comm.add(rnd, nid, "regroup", dd, du, group=self.group_of[nid], dropped=nid in ex.dropped)

    def train_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        """``train.local`` to every group. A discriminator moved at the last regrouping rides
        along with this message; when this round ends at a scheduled regrouping, the reply
        brings D_k back — so a regrouping costs no extra round trip."""
        steps = self.steps_this_round()
        next_at = self.schedule.next_at if self.schedule.next_at is not None else -1
        wants_d = self.schedule.due(self.iteration + steps) and rnd < self.s.num_rounds
        messages, d_down = {}, {}
        for nid in nodes:
            content = RecordDict({wire.CONFIG: self.config_for(nid, **{
                "start-iter": self.iteration, "steps": steps, "next-regroup": next_at,
                "last-regroup": self.last_regroup, "return-d": wants_d})})
            if nid in self.pending_d:
                content.update(self.pending_d.pop(nid))
                d_down[nid] = self._d_bytes(content)
            messages[nid] = self._message(nid, LOCAL, rnd, content)
        ex = exchange(grid, messages, timeout=self.s.round_timeout, parse=self._parse_local(steps, wants_d),
                      max_reply_mb=self.s.max_reply_mb)
        self.dropped_total += len(ex.dropped)
        if not self.identified and ex.replies:   # the first exchange: nodes must be told apart
            check_identities(dict(ex.replies))
            self.identified = True
        for nid, rep in ex.replies.items():
            if "partition_id" in rep:
                self.partition_of[nid] = int(rep["partition_id"])
        d_up = {nid: self._d_bytes(rep["content"]) for nid, rep in ex.replies.items()}
        self._log_exchange(rnd, nodes, LOCAL, ex, d_down, d_up)
        if len(ex.replies) < self.s.min_replies:
            reasons = "; ".join(f"node {n}: {why}" for n, why in ex.dropped.items())
            raise RunFailed(f"round {rnd}: {len(ex.replies)} good repl(ies), run config 'min-replies' asks for "
                            f"{self.s.min_replies} ({reasons})")
        self.iteration += steps
        self.trace.extend(mean_trace([r["trace"] for r in ex.replies.values()]))
        groups = {self.label(nid): {"g_loss": sum(r["trace"]) / max(1, steps), "d_loss": r["d_loss"],
                                    "d_real_acc": r["d_real_acc"], "d_fake_acc": r["d_fake_acc"], "lr": r["lr"],
                                    "d_steps_total": int(r["d_steps_total"]), **dp_columns(r)}
                  for nid, r in ex.replies.items()}
        mean = lambda key: sum(g[key] for g in groups.values()) / len(groups)  # noqa: E731
        record = {"round": rnd, "iteration": self.iteration, "steps": steps, "g_loss": mean("g_loss"),
                  "d_loss": mean("d_loss"), "d_real_acc": mean("d_real_acc"), "d_fake_acc": mean("d_fake_acc"),
                  "replies": len(ex.replies), "dropped": len(ex.dropped),
                  "dropped_reasons": {str(n): why for n, why in ex.dropped.items()},
                  "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
                  "clients": groups}
        returned = {nid: rep["content"] for nid, rep in ex.replies.items()} if wants_d else None
        return record, returned

    # --- regrouping -------------------------------------------------------------------------
    def maybe_start_schedule(self) -> None:
        """Dynamic mode: end period A once the mean loss trace stops decreasing (T0 = its length)."""
        if self.s.regroup_interval != -1 or self.schedule.t is not None:
            return
        t0 = period_a_end(self.trace, window=self.s.period_a_window, threshold=self.s.period_a_threshold,
                          min_iters=self.s.period_a_min, cap=self.s.period_a_cap)
        if t0 is not None:
            self.period_a = t0
            self.schedule.start(t0)
            log.info("MGGAN: period A ended at iteration %d (detected at %d); T0 = %d", t0, self.iteration, t0)

    def fetch_discriminators(self, grid: Grid, rnd: int, nodes: list[int]) -> dict[int, RecordDict]:
        """``query.get_discriminator`` for a regrouping that was not announced (the first, dynamic one)."""
        get = {nid: self._message(nid, GET_D, rnd, RecordDict({wire.CONFIG: self.config_for(nid)})) for nid in nodes}

        def parse(nid: int, reply: Message) -> RecordDict:
            self._check_d(reply.content)
            return reply.content

        ex = exchange(grid, get, timeout=self.s.round_timeout, parse=parse, max_reply_mb=self.s.max_reply_mb)
        d_up = {nid: self._d_bytes(c) for nid, c in ex.replies.items()}
        self._log_exchange(rnd, nodes, GET_D, ex, {}, d_up)
        return dict(ex.replies)

    def regroup(self, rnd: int, discriminators: dict[int, RecordDict]) -> dict | None:
        """Pair every generator with another group's D: a uniform random derangement π of the
        groups whose D arrived; D_π(k) goes to client k with its next message."""
        movers = sorted(discriminators)
        if len(movers) < 2:
            log.warning("MGGAN: regroup skipped at iteration %d: fewer than 2 discriminators", self.iteration)
            return None
        perm = random_derangement(len(movers), self.rng)
        for k, nid in enumerate(movers):
            src = discriminators[movers[perm[k]]]
            self.pending_d[nid] = {name: src[name] for name in (D_WEIGHTS, D_MOMENTS, D_META) if name in src}
        event = {"iteration": self.iteration, "round": rnd, "moves": len(movers),
                 "pairs": {str(self.group_of[nid]): self.group_of[movers[perm[k]]] for k, nid in enumerate(movers)}}
        self.regroups.append(event)
        return event

    # --- sampling and evaluation ---------------------------------------------------------------
    def collect_samples(self, grid: Grid, rnd: int, nodes: list[int], n: int) -> dict[str, torch.Tensor]:
        msgs = {nid: self._message(nid, SAMPLE, rnd, RecordDict({wire.CONFIG: self.config_for(
            nid, n=n, seed=self.s.seed * 7 + rnd)})) for nid in nodes}

        def parse(nid: int, reply: Message) -> torch.Tensor:
            if SAMPLES not in reply.content.array_records:
                raise wire.BadReply(f"missing array record '{SAMPLES}'")
            x = wire.get_tensor(reply.content.array_records[SAMPLES], SAMPLES)
            if x.shape[0] != n or not torch.isfinite(x).all():
                raise wire.BadReply("samples have the wrong count or hold NaN/Inf")
            return x

        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=parse, max_reply_mb=self.s.max_reply_mb)
        for nid in nodes:  # scoring traffic: logged apart from the training totals
            self.eval_comm.add(rnd, nid, SAMPLE, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                               group=self.group_of[nid], dropped=nid in ex.dropped, phase="eval")
        return {self.label(nid): x for nid, x in sorted(ex.replies.items(), key=lambda kv: self.group_of[kv[0]])}

    def evaluate_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        per_group = self.collect_samples(grid, rnd, nodes, self.s.eval_samples)
        if not per_group:
            return {}
        sets = dict(per_group)
        sets["mixture"] = mixture(per_group, self.s.eval_samples, torch.Generator().manual_seed(self.s.seed + rnd))
        self.recorder.save_samples(f"round{rnd:05d}", {k: v[:256] if v.dim() > 2 else v for k, v in sets.items()})
        return self.evaluate(sets) if self.evaluate is not None else {}

    # --- the loop ---------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        nodes = wait_for_nodes(grid, self.s.min_nodes, self.s.node_wait_timeout)
        self.group_of = {nid: k for k, nid in enumerate(nodes)}
        log.info("MGGAN: %d groups, losses %s, regroup-interval %d", len(nodes),
                 [self.group_loss(n) for n in nodes], self.s.regroup_interval)
        last: dict = {}
        evaluation: dict = {}
        for rnd in range(1, self.s.num_rounds + 1):
            check_stop()
            t0 = time.monotonic()
            record, returned = self.train_round(grid, rnd, nodes)
            self.maybe_start_schedule()
            record["regrouped"] = False
            if self.schedule.due(self.iteration) and rnd < self.s.num_rounds:
                if returned is None:
                    returned = self.fetch_discriminators(grid, rnd, nodes)
                event = self.regroup(rnd, returned)
                if event is not None:
                    self.last_regroup = self.iteration
                    record["regrouped"] = True
                    record["regroup_pairs"] = event["pairs"]
                # the next interval counts from where this regrouping happened: the first one
                # can come after T0 (period A is detected at a round's end)
                self.schedule.advance(self.iteration)
            record["next_regroup"] = self.schedule.next_at
            record["regroup_interval"] = self.schedule.t
            record["wall_time"] = time.monotonic() - t0  # training only
            if (self.s.eval_every and rnd % self.s.eval_every == 0) or rnd == self.s.num_rounds:
                t_eval = time.monotonic()
                evaluation = self.evaluate_round(grid, rnd, nodes)
                record["eval"] = evaluation
                record["eval_time"] = time.monotonic() - t_eval
            self.recorder.log_round(record)
            self.recorder.log_comm(self.comm.round_rows(rnd) + self.eval_comm.round_rows(rnd))
            self.recorder.progress(rnd, {k: record[k] for k in ("g_loss", "d_loss", "iteration")})
            last = record
        self.recorder.save_checkpoint("server.pt", {"settings": asdict(self.s), "iteration": self.iteration,
                                                    "trace": self.trace, "regroups": self.regroups,
                                                    "schedule": self.schedule.state_dict(), "comm": self.comm.state(),
                                                    "period_a": self.period_a, "rng": self.rng.getstate()})
        return {"rounds": self.s.num_rounds, "last": last, "bytes_down": self.comm.down_total,
                "bytes_up": self.comm.up_total, "dropped_replies": self.dropped_total,
                "clients": {self.label(n): n for n in nodes}, "regroups": len(self.regroups),
                "period_a": self.period_a, "iterations": self.iteration, "eval": evaluation}


__all__ = ["MGGAN", "MGGANSettings", "client_local", "client_get_discriminator", "receive_discriminator",
           "client_sample", "mixture", "mean_trace", "optimizer_kind", "LOCAL", "GET_D",
           "SAMPLE"]
