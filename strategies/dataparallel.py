"""Synchronous data-parallel GAN (thesis ch. 4, "DP" baseline, Fig. 4.7 and Eq. 4.1; SPEC 1 and 4.5).

The server owns G, D and both optimizers; clients own only their data. One round is one
exchange with the selected clients, as the thesis defines data parallelism (Fig. 4.7: per
iteration a worker downloads the weights once and uploads the gradients once):

``train.dp_step`` (``dataparallel-mode = "simultaneous"``, the default): G's and D's weights go
down with a latent seed and the batch size. Client i draws a real batch from its own data and
latents z_i (the seed offset by its partition id), makes x = G(z_i) and returns, both at the
weights it received, ∂L_D/∂θ_D of the discriminator loss on (real, x) — two forward passes, plus
the gradient penalty for ``wgan-gp`` — and ∂L_G/∂θ_G of the generator loss on D(x). The server
averages each network's gradients over the clients, weighted by the batch size it asked each
one for, and steps D and G from the same weights (simultaneous gradient descent; D's weights
clamped to ±WGAN_CLIP for ``wgan``). With ``disc_steps`` = n > 1 (``wgan-critic-steps`` for
the clipped WGAN, else ``client-disc-steps``) only every n-th round asks for G's gradient and
steps G: n critic steps per generator step, one exchange each.

``dataparallel-mode = "alternating"`` keeps the earlier two-exchange form: (a)
``train.dp_discriminator`` returns D's gradient, the server steps D, then (b)
``train.dp_generator`` sends the updated D and G again and returns G's gradient through it.
It costs the weights twice per step and two round trips, but each round is then exactly one
step of the alternating centralized GAN training that every other strategy here uses, which is
why it is kept as a named option.

Exactness: every loss is a mean over samples, so the batch-size-weighted mean of the clients'
gradients is the gradient of the same loss on the concatenation of their batches, and each
round is exactly one centralized step (simultaneous or alternating) on that concatenated batch
(same latents, same real samples, same optimizer state). This holds when the networks couple
no samples inside a batch — MLPs, or a DCGAN discriminator with ``norm="layer"``/``"none"``.
With BatchNorm (the DCGAN generator always has it, the DCGAN discriminator has it unless the
loss is ``wgan-gp``) each client normalises with the statistics of its own batch rather than
those of the concatenated one, so the step is a close approximation instead; the running
statistics of the server's networks are never updated (the clients' forward passes run on
throw-away copies), which is harmless here because every sample is drawn in train mode (batch
statistics). For ``wgan-gp`` each client draws its own interpolation weights, so the penalty
term matches a centralized step in distribution, not bit for bit.

Privacy: what leaves a client is one gradient per network per step (and a sample count, the
batch size the server asked for, which is checked, not trusted). Gradients of a single small
batch can leak information about it (gradient inversion); that is the price of this baseline.

The module also holds the small helpers the other baselines (``fedavg``, ``local``,
``centralized``) share: model records, seeded model construction, node labels.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.losses import (GP_WEIGHT, WGAN_CLIP, check_loss_kind, discriminator_loss, generator_loss,
                           gradient_penalty)
from models.dp import DPConfig
from models.steps import clip_weights, sample_latent
from strategies import wire
from strategies.base import (ClientDP, check_dp_reply, dp_columns, FederatedSettings, GlobalGANServer, NodeBook,
                             Recorder, apply_with_blame, exchange, log, param_dtype, require_replies,
                             sample_nodes)
from strategies.wire import (D_WEIGHTS, G_WEIGHTS, NUM_EXAMPLES, load_weights, make_message, require_count,
                             require_metrics, require_tensors, weights_record)

DP_STEP = "train.dp_step"                    # simultaneous: G and D down once, both gradients up once
DP_DISCRIMINATOR = "train.dp_discriminator"  # alternating (a): D's gradient
DP_GENERATOR = "train.dp_generator"          # alternating (b): G's gradient through the updated D
MODES = ("simultaneous", "alternating")

# record names inside a message's RecordDict
GRADS = "grad"         # ArrayRecord: one gradient per named parameter of the network stepped (alternating)
D_GRADS = "grad_d"     # ArrayRecord: D's gradient per named parameter (simultaneous)
G_GRADS = "grad_g"     # ArrayRecord: G's gradient per named parameter (simultaneous, when asked for)

_PID_LATENT = 7_919
_PID_DATA = 104_729


# =====================================================================================
# Helpers the baselines share
# =====================================================================================
def weighted_mean(values: list[float], weights: list[float]) -> float:
    total = float(sum(weights))
    return float(sum(v * w for v, w in zip(values, weights)) / total) if total > 0 else math.nan


# =====================================================================================
# Pure math
# =====================================================================================
def _grads_of(model: nn.Module, loss: torch.Tensor) -> dict[str, torch.Tensor]:
    names, params = zip(*[(n, p) for n, p in model.named_parameters() if p.requires_grad])
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return {n: (g if g is not None else torch.zeros_like(p)).detach() for n, p, g in zip(names, params, grads)}


def discriminator_gradients(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str, *,
                            gp_weight: float = GP_WEIGHT) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """∂L_D/∂θ_D on (real, fake) without stepping anything: the gradient half of
    :func:`models.steps.discriminator_step` (same loss, same two forward passes, same
    statistics), returned per named parameter."""
    check_loss_kind(kind)
    fake = fake.detach()
    real_out, fake_out = D(real), D(fake)
    loss = discriminator_loss(kind, real_out, fake_out)
    if kind == "wgan-gp":
        loss = loss + gp_weight * gradient_penalty(D, real, fake)
    grads = _grads_of(D, loss)
    with torch.no_grad():
        real_out, fake_out = real_out.detach(), fake_out.detach()
        if kind in ("wgan", "wgan-gp"):
            t = 0.5 * (real_out.mean() + fake_out.mean())
        else:
            t = torch.zeros((), dtype=real_out.dtype, device=real_out.device)
        stats = {"d_loss": float(loss.detach()), "d_real_acc": float((real_out > t).float().mean()),
                 "d_fake_acc": float((fake_out < t).float().mean()), "d_real_out": float(real_out.mean()),
                 "d_fake_out": float(fake_out.mean())}
    return grads, stats


def generator_gradients(G: nn.Module, D: nn.Module, z: torch.Tensor,
                        kind: str) -> tuple[dict[str, torch.Tensor], float]:
    """∂L_G/∂θ_G of the generator loss on D(G(z)), per named parameter of G (D untouched)."""
    check_loss_kind(kind)
    loss = generator_loss(kind, D(G(z)))
    return _grads_of(G, loss), float(loss.detach())


def average_gradients(grads: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
    """Σ_i w_i·g_i / Σ_i w_i, key by key."""
    total = float(sum(weights))
    if not grads or total <= 0:
        raise ValueError("nothing to average")
    return {k: sum(g[k] * (w / total) for g, w in zip(grads, weights)) for k in grads[0]}


def apply_gradients(model: nn.Module, opt: torch.optim.Optimizer, grads: dict[str, torch.Tensor], *,
                    clip: float | None = None) -> None:
    """Set every parameter's .grad to ``grads[name]``, step ``opt``, then clamp to ±clip if given."""
    opt.zero_grad(set_to_none=True)
    for name, p in model.named_parameters():
        if name in grads:
            p.grad = grads[name].to(device=p.device, dtype=p.dtype)
    opt.step()
    if clip is not None:
        clip_weights(model, clip)


# =====================================================================================
# Client side: stateless — the networks arrive with every message
# =====================================================================================
def client_latents(latent_seed: int, partition_id: int | None, batch: int, latent_dim: int,
                   device: str = "cpu") -> torch.Tensor:
    """The latents client ``partition_id`` uses for a given exchange seed."""
    gen = torch.Generator(device=device).manual_seed(int(latent_seed) + _PID_LATENT * (partition_id or 0))
    return sample_latent(batch, latent_dim, generator=gen, device=device)


def client_real_batch(sample_real: Callable[[int, torch.Generator], torch.Tensor], seed: int,
                      partition_id: int | None, rnd: int, batch: int) -> torch.Tensor:
    """The real batch client ``partition_id`` draws in round ``rnd`` (reproducible from its seed)."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + _PID_DATA * (partition_id or 0) + rnd)
    return sample_real(batch, gen)


def _networks(content: RecordDict, build_generator, build_discriminator, device: str) -> tuple[nn.Module, nn.Module]:
    G, D = build_generator().to(device), build_discriminator().to(device)
    load_weights(G, content.array_records[G_WEIGHTS])
    load_weights(D, content.array_records[D_WEIGHTS])
    G.train()
    D.train()
    return G, D


def _reply(grads: dict[str, torch.Tensor], metrics: dict, partition_id: int | None) -> RecordDict:
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({GRADS: wire.tensor_record(**grads), wire.METRICS: MetricRecord(metrics)})


def _d_gradient(private: ClientDP | None, D: nn.Module, real: torch.Tensor, fake: torch.Tensor,
                loss: str) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """D's gradient on (real, fake): plain, or with ``private`` a DP-SGD gradient on a fresh
    Poisson batch (``real`` unused), counted and saved in the client's accountant, with
    ``dp_epsilon`` added to the stats."""
    if private is None:
        return discriminator_gradients(D, real, fake, loss)
    grads, stats = private.discriminator_gradient(D, fake, loss)
    private.save()
    return grads, {**stats, **private.metrics()}


def client_dp_discriminator(content: RecordDict, state: RecordDict | None = None, *,
                            sample_real: Callable[[int, torch.Generator], torch.Tensor],
                            build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                            device: str, seed: int, partition_id: int | None = None,
                            dp: DPConfig | None = None, real_data: torch.Tensor | None = None) -> RecordDict:
    """``train.dp_discriminator``: D's gradient on (own real batch, G(z_i)) and the batch size.

    ``state`` is not used (the client keeps nothing between rounds) except, with ``dp``, for
    the client's privacy accountant: the gradient is then a DP-SGD one (:func:`_d_gradient`).
    """
    cfg = content.config_records[wire.CONFIG]
    loss, batch, rnd = str(cfg["loss"]), int(cfg["batch-size"]), int(cfg["round"])
    G, D = _networks(content, build_generator, build_discriminator, device)
    real = (client_real_batch(sample_real, seed, partition_id, rnd, batch).to(device=device, dtype=param_dtype(D))
            if dp is None else None)   # with dp: a Poisson batch is drawn in _d_gradient
    z = client_latents(int(cfg["latent-seed"]), partition_id, batch, G.latent_dim, device).to(param_dtype(G))
    with torch.no_grad():
        fake = G(z)
    private, stop = ClientDP.begin(dp, state, real_data, D, loss, batch_size=batch, steps_more=1, seed=seed,
                                   partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    grads, stats = _d_gradient(private, D, real, fake.to(param_dtype(D)), loss)
    return _reply(grads, {NUM_EXAMPLES: batch, **stats}, partition_id)


def client_dp_step(content: RecordDict, state: RecordDict | None = None, *,
                   sample_real: Callable[[int, torch.Generator], torch.Tensor],
                   build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                   device: str, seed: int, partition_id: int | None = None,
                   dp: DPConfig | None = None, real_data: torch.Tensor | None = None) -> RecordDict:
    """``train.dp_step`` (thesis Fig. 4.7): both gradients at the weights received, one reply.
    With ``dp`` D's gradient is a DP-SGD one (G's never touches real data); a client at its
    ``dp-target-epsilon`` replies with metrics only (``dp_exhausted`` = 1).

    D's gradient on (own real batch, x) and, when the server asks for it (``want-g``), G's
    gradient of the generator loss on D(x), with x = G(z_i) the same fakes. ``state`` is not
    used (the client keeps nothing between rounds).
    """
    cfg = content.config_records[wire.CONFIG]
    loss, batch, rnd = str(cfg["loss"]), int(cfg["batch-size"]), int(cfg["round"])
    G, D = _networks(content, build_generator, build_discriminator, device)
    real = (client_real_batch(sample_real, seed, partition_id, rnd, batch).to(device=device, dtype=param_dtype(D))
            if dp is None else None)   # with dp: a Poisson batch is drawn in _d_gradient
    z = client_latents(int(cfg["latent-seed"]), partition_id, batch, G.latent_dim, device).to(param_dtype(G))
    want_g = bool(cfg["want-g"])
    private, stop = ClientDP.begin(dp, state, real_data, D, loss, batch_size=batch, steps_more=1, seed=seed,
                                   partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    with torch.set_grad_enabled(want_g):
        fake = G(z)
    d_grads, stats = _d_gradient(private, D, real, fake.detach().to(param_dtype(D)), loss)
    metrics = {NUM_EXAMPLES: batch, **stats}
    reply = RecordDict({D_GRADS: wire.tensor_record(**d_grads)})
    if want_g:
        g_loss = generator_loss(loss, D(fake.to(param_dtype(D))))
        reply[G_GRADS] = wire.tensor_record(**_grads_of(G, g_loss))
        metrics["g_loss"] = float(g_loss.detach())
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    reply[wire.METRICS] = MetricRecord(metrics)
    return reply


def client_dp_generator(content: RecordDict, state: RecordDict | None = None, *,
                        build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                        device: str, partition_id: int | None = None) -> RecordDict:
    """``train.dp_generator``: G's gradient of the generator loss on D(G(z_i)), and the batch size.

    Needs no data: the client's part is its share of the batch's latents and compute.
    """
    cfg = content.config_records[wire.CONFIG]
    loss, batch = str(cfg["loss"]), int(cfg["batch-size"])
    G, D = _networks(content, build_generator, build_discriminator, device)
    z = client_latents(int(cfg["latent-seed"]), partition_id, batch, G.latent_dim, device).to(param_dtype(G))
    grads, g_loss = generator_gradients(G, D, z, loss)
    return _reply(grads, {NUM_EXAMPLES: batch, "g_loss": g_loss}, partition_id)


# =====================================================================================
# Server side
# =====================================================================================
@dataclass(frozen=True)
class DataParallelSettings(FederatedSettings):
    """What the data-parallel server loop needs. ``batch_size`` is per client: with N
    replies a step sees N·batch_size samples. ``mode``: one exchange per step with a
    simultaneous G/D update (the thesis' form) or two with alternating updates.
    ``disc_steps``: D steps per G step (a G step every ``disc_steps``-th round)."""

    num_rounds: int = 100
    mode: str = "simultaneous"
    disc_steps: int = 1

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode {self.mode!r}: choose one of {MODES}")
        if self.disc_steps < 1:
            raise ValueError(f"disc_steps = {self.disc_steps} must be at least 1")


class DataParallel(GlobalGANServer):
    """The data-parallel GAN server: G, D and both optimizers live here."""

    name = "DataParallel"

    def __init__(self, settings: DataParallelSettings, *, make_generator: Callable[[], nn.Module],
                 make_discriminator: Callable[[], nn.Module], recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None, device: str = "cpu",
                 sample_shape: tuple[int, ...] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None) -> None:
        super().__init__(settings, make_generator=make_generator, make_discriminator=make_discriminator,
                         recorder=recorder, evaluate=evaluate, device=device, sample_shape=sample_shape)
        self.nodes = NodeBook(describe_partition)
        self.comm = wire.CommLog()
        self.rng = random.Random(settings.seed)
        self.dropped_total = 0
        self.g_steps = 0

    def wants_g(self, rnd: int) -> bool:
        """Whether round ``rnd`` also steps G (every ``disc_steps``-th round)."""
        return rnd % self.s.disc_steps == 0

    # --- message contents (pure: testable without a Flower run) -----------------------
    def config(self, rnd: int, latent_seed: int, **extra) -> ConfigRecord:
        return ConfigRecord({"round": rnd, "loss": self.s.loss, "batch-size": self.s.batch_size,
                             "latent-seed": latent_seed, **extra})

    def weights_content(self, config: ConfigRecord) -> RecordDict:
        return RecordDict({G_WEIGHTS: weights_record(self.G), D_WEIGHTS: weights_record(self.D), wire.CONFIG: config})

    def step_content(self, rnd: int, latent_seed: int, want_g: bool = True) -> RecordDict:
        """Simultaneous: G and D down once, with the latent seed, the batch size and whether
        this round steps G."""
        return self.weights_content(self.config(rnd, latent_seed, **{"want-g": want_g}))

    def discriminator_content(self, rnd: int, latent_seed: int) -> RecordDict:
        """Alternating (a): G and D down, with the latent seed and the per-client batch size."""
        return self.weights_content(self.config(rnd, latent_seed))

    def generator_content(self, rnd: int, latent_seed: int) -> RecordDict:
        """Alternating (b): the updated D and G down, with a fresh latent seed."""
        return self.weights_content(self.config(rnd, latent_seed))

    def parse_grads(self, content: RecordDict, record: str, model: nn.Module) -> dict[str, torch.Tensor]:
        """A reply's gradients for ``model``: one per named trainable parameter, checked."""
        grads = require_tensors(content, record, {n: p for n, p in model.named_parameters() if p.requires_grad})
        wire.require_total_norm(grads.values(), record, self.s.max_update_norm)
        return grads

    def parse_content(self, content: RecordDict, model: nn.Module) -> tuple[dict[str, torch.Tensor], int, dict]:
        """An alternating reply's gradients (one per named parameter of ``model``), count and metrics."""
        check_dp_reply(wire.metrics_of(content))   # a client at its dp-target-epsilon sends no gradient
        grads = self.parse_grads(content, GRADS, model)
        metrics = wire.metrics_of(content)
        return grads, require_count(metrics, self.s.batch_size), metrics

    def parse_step(self, content: RecordDict, want_g: bool) -> tuple[dict, dict | None, int, dict]:
        """A simultaneous reply: D's gradients, G's (when asked for), the count and the metrics."""
        check_dp_reply(wire.metrics_of(content))   # a client at its dp-target-epsilon sends no gradient
        d_grads = self.parse_grads(content, D_GRADS, self.D)
        g_grads = self.parse_grads(content, G_GRADS, self.G) if want_g else None
        if not want_g and G_GRADS in content.array_records:
            raise wire.BadReply(f"unexpected array record '{G_GRADS}': no generator step this round")
        metrics = wire.metrics_of(content)
        require_metrics(metrics, ("d_loss", "d_real_acc", "d_fake_acc") + (("g_loss",) if want_g else ()))
        return d_grads, g_grads, require_count(metrics, self.s.batch_size), metrics

    def step_discriminator(self, replies: list[tuple[dict, int, dict]]) -> dict[str, float]:
        """Average the clients' D gradients (weighted by the batch sizes asked for) and step D."""
        weights = [n for _, n, _ in replies]
        apply_gradients(self.D, self.opt_d, average_gradients([g for g, _, _ in replies], weights),
                        clip=WGAN_CLIP if self.s.loss == "wgan" else None)
        return {k: weighted_mean([m[k] for _, _, m in replies], weights)
                for k in ("d_loss", "d_real_acc", "d_fake_acc")}

    def step_generator(self, replies: list[tuple[dict, int, dict]]) -> dict[str, float]:
        """Average the clients' G gradients (weighted by the batch sizes asked for) and step G."""
        weights = [n for _, n, _ in replies]
        apply_gradients(self.G, self.opt_g, average_gradients([g for g, _, _ in replies], weights))
        return {"g_loss": weighted_mean([m["g_loss"] for _, _, m in replies], weights)}

    def blame(self, rnd: int, ex, pick: Callable[[tuple], tuple], step: Callable[[list], dict],
              model: nn.Module, opt: torch.optim.Optimizer, action: str) -> dict:
        """Apply ``step`` to the replies of ``ex``; an update that would leave ``model`` or ``opt``
        non-finite is rolled back and the node(s) whose gradients did it are dropped (their
        replies alone break it), the rest applied. Returns the step's statistics."""
        entries = {nid: pick(rep) for nid, rep in ex.replies.items()}
        stats: dict = {}

        def apply(nids: list[int]) -> None:
            stats.clear()
            stats.update(step([entries[n] for n in nids]))

        blamed = apply_with_blame(apply, list(entries), [model], [opt])
        for nid in blamed:
            ex.replies.pop(nid, None)
            ex.dropped[nid] = f"{action}: its gradients made the model or optimizer non-finite; update rolled back"
            log.warning("dropping node %s this round: %s", nid, ex.dropped[nid])
            self.dropped_total += 1
        require_replies(rnd, ex, self.s.min_replies)
        return stats

    # --- one round ----------------------------------------------------------------------
    def _exchange(self, grid: Grid, rnd: int, selected: list[int], mtype: str,
                  content: Callable[[], RecordDict], parse: Callable[[RecordDict], tuple]):
        msgs = {nid: make_message(content(), nid, mtype, rnd) for nid in selected}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=lambda nid, reply: parse(reply.content),
                      max_reply_mb=self.s.max_reply_mb)
        self.dropped_total += len(ex.dropped)
        self.nodes.identify({nid: rep[-1] for nid, rep in ex.replies.items()}, live=selected)
        for nid in selected:
            self.comm.add(rnd, nid, mtype, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        return ex

    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        if self.s.mode == "alternating":
            return self.run_alternating_round(grid, rnd, selected)
        want_g = self.wants_g(rnd)
        seed = self.rng.randrange(1 << 31)
        ex = self._exchange(grid, rnd, selected, DP_STEP, lambda: self.step_content(rnd, seed, want_g),
                            lambda content: self.parse_step(content, want_g))
        # both updates from the weights the clients received (simultaneous gradient descent)
        d_stats = self.blame(rnd, ex, lambda r: (r[0], r[2], r[3]), self.step_discriminator, self.D, self.opt_d, DP_STEP)
        g_stats = {}
        if want_g:
            g_stats = self.blame(rnd, ex, lambda r: (r[1], r[2], r[3]), self.step_generator, self.G, self.opt_g,
                                 DP_STEP)
            self.g_steps += 1
        clients: dict[str, dict] = {}
        for nid in self.nodes.order(ex.replies):
            _, _, n, m = ex.replies[nid]
            clients[self.nodes.label(nid)] = {"node": nid, "num_examples": n,
                                              **{k: m[k] for k in ("d_loss", "d_real_acc", "d_fake_acc", "g_loss")
                                                 if k in m}, **dp_columns(m)}
        return {"round": rnd, "g_loss": g_stats.get("g_loss", math.nan), **d_stats, "g_step": int(want_g),
                "g_steps_total": self.g_steps, "replies": len(ex.replies), "dropped": len(ex.dropped),
                "dropped_reasons": {str(n): f"{DP_STEP}: {why}" for n, why in ex.dropped.items()},
                "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
                "clients": clients}

    def run_alternating_round(self, grid: Grid, rnd: int, selected: list[int]) -> dict:
        """The two-exchange form: D's gradients, a D step, then G's gradients through the new D."""
        want_g = self.wants_g(rnd)
        seed_d, seed_g = self.rng.randrange(1 << 31), self.rng.randrange(1 << 31)

        def parse(model: nn.Module, keys: tuple[str, ...]):
            def parse_content(content: RecordDict):
                out = self.parse_content(content, model)
                require_metrics(out[2], keys)
                return out
            return parse_content

        ex_d = self._exchange(grid, rnd, selected, DP_DISCRIMINATOR, lambda: self.discriminator_content(rnd, seed_d),
                              parse(self.D, ("d_loss", "d_real_acc", "d_fake_acc")))
        d_stats = self.blame(rnd, ex_d, lambda r: r, self.step_discriminator, self.D, self.opt_d, DP_DISCRIMINATOR)
        exchanges = [(DP_DISCRIMINATOR, ex_d)]
        g_stats: dict = {}
        ex_g = None
        if want_g:
            ex_g = self._exchange(grid, rnd, selected, DP_GENERATOR, lambda: self.generator_content(rnd, seed_g),
                                  parse(self.G, ("g_loss",)))
            g_stats = self.blame(rnd, ex_g, lambda r: r, self.step_generator, self.G, self.opt_g, DP_GENERATOR)
            self.g_steps += 1
            exchanges.append((DP_GENERATOR, ex_g))

        clients: dict[str, dict] = {}
        for nid in self.nodes.order(selected):
            row: dict = {"node": nid}
            if nid in ex_d.replies:
                _, n, m = ex_d.replies[nid]
                row.update(num_examples=n, d_loss=m["d_loss"], d_real_acc=m["d_real_acc"], d_fake_acc=m["d_fake_acc"],
                           **dp_columns(m))
            if ex_g is not None and nid in ex_g.replies:
                row["g_loss"] = ex_g.replies[nid][2]["g_loss"]
            if len(row) > 1:
                clients[self.nodes.label(nid)] = row
        reasons: dict[str, str] = {}
        for action, ex in exchanges:
            for nid, why in ex.dropped.items():
                reasons[str(nid)] = (reasons[str(nid)] + "; " if str(nid) in reasons else "") + f"{action}: {why}"
        return {"round": rnd, "g_loss": g_stats.get("g_loss", math.nan), **d_stats, "g_step": int(want_g),
                "g_steps_total": self.g_steps,
                "replies": min(len(ex.replies) for _, ex in exchanges),
                "dropped": sum(len(ex.dropped) for _, ex in exchanges), "dropped_reasons": reasons,
                "bytes_down": sum(sum(ex.bytes_down.values()) for _, ex in exchanges),
                "bytes_up": sum(sum(ex.bytes_up.values()) for _, ex in exchanges),
                "clients": clients}

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "g": self.G.state_dict(), "d": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(), "g_steps": self.g_steps,
                "partition_of": dict(self.nodes.partition_of), "comm": self.comm.state(),
                "dropped_total": self.dropped_total, "rng": self.rng.getstate()}


__all__ = ["DataParallel", "DataParallelSettings", "client_dp_step", "client_dp_discriminator", "client_dp_generator",
           "client_latents", "client_real_batch", "discriminator_gradients", "generator_gradients",
           "average_gradients", "apply_gradients", "DP_STEP", "DP_DISCRIMINATOR", "DP_GENERATOR", "MODES",
           "GRADS", "D_GRADS", "G_GRADS", "weighted_mean"]
