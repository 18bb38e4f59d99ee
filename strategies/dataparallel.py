"""Synchronous data-parallel GAN (thesis ch. 4, "DP" baseline; SPEC 1 and 4.5).

The server owns G, D and both optimizers; clients own only their data. One round is
one optimizer step of each network, made of two exchanges with the selected clients:

(a) ``train.dp_discriminator``: G's and D's weights go down with a latent seed and the
    batch size. Client i draws a real batch from its own data and fakes G(z_i), where
    z_i comes from that seed offset by its partition id, and returns ∂L_D/∂θ_D of the
    discriminator loss on (real, fakes) — two forward passes, plus the gradient
    penalty for ``wgan-gp`` — with the number of samples it used. The server averages
    the gradients weighted by those counts and steps D (weights clamped to ±WGAN_CLIP
    for ``wgan``).
(b) ``train.dp_generator``: the updated D and G go down with a fresh latent seed;
    client i returns ∂L_G/∂θ_G of the generator loss on D(G(z_i)) and its count; the
    server averages and steps G.

Exactness: every loss is a mean over samples, so the count-weighted mean of the
clients' gradients is the gradient of the same loss on the concatenation of their
batches, and each round is exactly one centralized step on that concatenated batch
(same latents, same real samples, same optimizer state). This holds when the networks
couple no samples inside a batch — MLPs, or a DCGAN discriminator with
``norm="layer"``/``"none"``. With BatchNorm (the DCGAN generator always has it, the DCGAN
discriminator has it unless the loss is ``wgan-gp``) each client normalises with the
statistics of its own batch rather than those of the concatenated one, so the step is
a close approximation instead; the running statistics of the server's networks are
never updated (the clients' forward passes run on throw-away copies), which is
harmless here because every sample is drawn in train mode (batch statistics). For
``wgan-gp`` each client draws its own interpolation weights, so the penalty term
matches a centralized step in distribution, not bit for bit.

Privacy: what leaves a client is one gradient per network per round (and a sample
count, the batch size the server asked for). Gradients of a single small batch can
leak information about it (gradient inversion); that is the price of this baseline.

The module also holds the small helpers the other baselines (``fedavg``, ``local``,
``centralized``) share: model records, seeded model construction, node labels.
"""

from __future__ import annotations

import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.losses import (GP_WEIGHT, WGAN_CLIP, check_loss_kind, discriminator_loss, generator_loss,
                           gradient_penalty, make_optimizer)
from models.steps import sample_latent
from strategies import wire
from strategies.base import (FederatedSettings, NodeBook, Recorder, RunFailed, exchange, log, sample_nodes, should,
                             wait_for_nodes)

DP_DISCRIMINATOR = "train.dp_discriminator"
DP_GENERATOR = "train.dp_generator"

# record names inside a message's RecordDict
G_WEIGHTS = "g"        # ArrayRecord: G's state_dict (parameters and buffers)
D_WEIGHTS = "d"        # ArrayRecord: D's state_dict
GRADS = "grad"         # ArrayRecord: one gradient per named parameter of the network stepped
NUM_EXAMPLES = "num-examples"   # metric: weight of a reply in the average (Flower's usual name)

# Offsets that keep the seeds of different clients / purposes apart.
_PID_LATENT = 7_919
_PID_DATA = 104_729


# =====================================================================================
# Helpers the baselines share
# =====================================================================================
def make_message(content: RecordDict, nid: int, message_type: str, rnd: int) -> Message:
    """The one place where the baselines build Flower messages (tests swap it out)."""
    return Message(content=content, dst_node_id=nid, message_type=message_type, group_id=str(rnd))


def weights_record(model: nn.Module) -> ArrayRecord:
    """A network's full state_dict (parameters and buffers) as an ArrayRecord."""
    return ArrayRecord({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()})


def load_weights(model: nn.Module, record: ArrayRecord) -> None:
    """Load an ArrayRecord made by :func:`weights_record` (or an aggregate of them)."""
    model.load_state_dict({k: wire.get_tensor(record, k) for k in record.keys()})


def _check_tensor(t: torch.Tensor, ref: torch.Tensor, where: str) -> None:
    if tuple(t.shape) != tuple(ref.shape):
        raise wire.BadReply(f"'{where}' has shape {tuple(t.shape)}, expected {tuple(ref.shape)}")
    if t.dtype != ref.dtype:
        raise wire.BadReply(f"'{where}' has dtype {t.dtype}, expected {ref.dtype}")
    if t.is_floating_point() and not torch.isfinite(t).all():
        raise wire.BadReply(f"'{where}' holds NaN or Inf")


def require_tensors(content: RecordDict, record: str, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``content[record]`` as tensors, with exactly the keys, shapes and dtypes of ``reference``
    and finite values; :class:`~strategies.wire.BadReply` otherwise."""
    if record not in content.array_records:
        raise wire.BadReply(f"missing array record '{record}'")
    rec = content.array_records[record]
    keys, expected = set(rec.keys()), set(reference)
    if keys != expected:
        missing, extra = sorted(expected - keys), sorted(keys - expected)
        raise wire.BadReply(f"'{record}' keys differ from the model's (missing {missing[:3]}, unexpected {extra[:3]})")
    out = {}
    for k, ref in reference.items():
        t = wire.get_tensor(rec, k)
        _check_tensor(t, ref.detach().cpu(), f"{record}.{k}")
        out[k] = t
    return out


def require_count(metrics: dict[str, float]) -> int:
    """The positive integer sample count a reply is weighted by."""
    if NUM_EXAMPLES not in metrics:
        raise wire.BadReply(f"missing metric '{NUM_EXAMPLES}'")
    n = metrics[NUM_EXAMPLES]
    if n < 1 or n != int(n):
        raise wire.BadReply(f"metric '{NUM_EXAMPLES}' = {n} is not a positive integer")
    return int(n)


def require_metrics(metrics: dict[str, float], keys: tuple[str, ...]) -> None:
    for key in keys:
        if key not in metrics:
            raise wire.BadReply(f"missing metric '{key}'")


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


def require_replies(rnd: int, ex, min_replies: int) -> None:
    """RunFailed when fewer than ``min_replies`` good replies came back from an exchange."""
    if len(ex.replies) < min_replies:
        reasons = "; ".join(f"node {n}: {why}" for n, why in ex.dropped.items())
        raise RunFailed(f"round {rnd}: {len(ex.replies)} good repl(ies), run config 'min-replies' asks for "
                        f"{min_replies} ({reasons})")


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
        with torch.no_grad():
            for p in model.parameters():
                p.clamp_(-clip, clip)


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


def client_dp_discriminator(content: RecordDict, state: RecordDict | None = None, *,
                            sample_real: Callable[[int, torch.Generator], torch.Tensor],
                            build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                            device: str, seed: int, partition_id: int | None = None) -> RecordDict:
    """``train.dp_discriminator``: D's gradient on (own real batch, G(z_i)) and the batch size.

    ``state`` is not used (the client keeps nothing between rounds); it is accepted for a
    uniform handler signature.
    """
    cfg = content.config_records[wire.CONFIG]
    loss, batch, rnd = str(cfg["loss"]), int(cfg["batch-size"]), int(cfg["round"])
    G, D = _networks(content, build_generator, build_discriminator, device)
    real = client_real_batch(sample_real, seed, partition_id, rnd, batch).to(device=device, dtype=param_dtype(D))
    z = client_latents(int(cfg["latent-seed"]), partition_id, batch, G.latent_dim, device).to(param_dtype(G))
    with torch.no_grad():
        fake = G(z)
    grads, stats = discriminator_gradients(D, real, fake.to(param_dtype(D)), loss)
    return _reply(grads, {NUM_EXAMPLES: batch, **stats}, partition_id)


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
        for rnd in range(1, s.num_rounds + 1):
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


@dataclass(frozen=True)
class DataParallelSettings(FederatedSettings):
    """What the data-parallel server loop needs. ``batch_size`` is per client: with N
    replies a step sees N·batch_size samples."""

    num_rounds: int = 100


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

    # --- message contents (pure: testable without a Flower run) -----------------------
    def config(self, rnd: int, latent_seed: int) -> ConfigRecord:
        return ConfigRecord({"round": rnd, "loss": self.s.loss, "batch-size": self.s.batch_size,
                             "latent-seed": latent_seed})

    def discriminator_content(self, rnd: int, latent_seed: int) -> RecordDict:
        """(a): G and D down, with the latent seed and the per-client batch size."""
        return RecordDict({G_WEIGHTS: weights_record(self.G), D_WEIGHTS: weights_record(self.D),
                           wire.CONFIG: self.config(rnd, latent_seed)})

    def generator_content(self, rnd: int, latent_seed: int) -> RecordDict:
        """(b): the updated D and G down, with a fresh latent seed."""
        return self.discriminator_content(rnd, latent_seed)

    def parse_content(self, content: RecordDict, model: nn.Module) -> tuple[dict[str, torch.Tensor], int, dict]:
        """A reply's gradients (one per named parameter of ``model``), count and metrics."""
        reference = {n: p for n, p in model.named_parameters() if p.requires_grad}
        grads = require_tensors(content, GRADS, reference)
        metrics = wire.metrics_of(content)
        return grads, require_count(metrics), metrics

    def step_discriminator(self, replies: list[tuple[dict, int, dict]]) -> dict[str, float]:
        """Average the clients' D gradients (weighted by count) and step D."""
        weights = [n for _, n, _ in replies]
        apply_gradients(self.D, self.opt_d, average_gradients([g for g, _, _ in replies], weights),
                        clip=WGAN_CLIP if self.s.loss == "wgan" else None)
        return {k: weighted_mean([m[k] for _, _, m in replies], weights)
                for k in ("d_loss", "d_real_acc", "d_fake_acc")}

    def step_generator(self, replies: list[tuple[dict, int, dict]]) -> dict[str, float]:
        """Average the clients' G gradients (weighted by count) and step G."""
        weights = [n for _, n, _ in replies]
        apply_gradients(self.G, self.opt_g, average_gradients([g for g, _, _ in replies], weights))
        return {"g_loss": weighted_mean([m["g_loss"] for _, _, m in replies], weights)}

    # --- one round ----------------------------------------------------------------------
    def _exchange(self, grid: Grid, rnd: int, selected: list[int], mtype: str,
                  content: Callable[[], RecordDict], model: nn.Module, metric_keys: tuple[str, ...]):
        def parse(nid: int, reply: Message):
            out = self.parse_content(reply.content, model)
            require_metrics(out[2], metric_keys)
            return out

        msgs = {nid: make_message(content(), nid, mtype, rnd) for nid in selected}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=parse)
        self.dropped_total += len(ex.dropped)
        for nid, (_, _, metrics) in ex.replies.items():
            self.nodes.note(nid, metrics)
        for nid in selected:
            self.comm.add(rnd, nid, mtype, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        return ex

    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        seed_d, seed_g = self.rng.randrange(1 << 31), self.rng.randrange(1 << 31)
        ex_d = self._exchange(grid, rnd, selected, DP_DISCRIMINATOR, lambda: self.discriminator_content(rnd, seed_d),
                              self.D, ("d_loss", "d_real_acc", "d_fake_acc"))
        d_stats = self.step_discriminator(list(ex_d.replies.values()))
        ex_g = self._exchange(grid, rnd, selected, DP_GENERATOR, lambda: self.generator_content(rnd, seed_g),
                              self.G, ("g_loss",))
        g_stats = self.step_generator(list(ex_g.replies.values()))

        clients: dict[str, dict] = {}
        for nid in self.nodes.order(selected):
            row: dict = {"node": nid}
            if nid in ex_d.replies:
                _, n, m = ex_d.replies[nid]
                row.update(num_examples=n, d_loss=m["d_loss"], d_real_acc=m["d_real_acc"], d_fake_acc=m["d_fake_acc"])
            if nid in ex_g.replies:
                row["g_loss"] = ex_g.replies[nid][2]["g_loss"]
            if len(row) > 1:
                clients[self.nodes.label(nid)] = row
        reasons: dict[str, str] = {}
        for action, ex in ((DP_DISCRIMINATOR, ex_d), (DP_GENERATOR, ex_g)):
            for nid, why in ex.dropped.items():
                reasons[str(nid)] = (reasons[str(nid)] + "; " if str(nid) in reasons else "") + f"{action}: {why}"
        return {"round": rnd, **g_stats, **d_stats,
                "replies": min(len(ex_d.replies), len(ex_g.replies)),
                "dropped": len(ex_d.dropped) + len(ex_g.dropped), "dropped_reasons": reasons,
                "bytes_down": sum(ex_d.bytes_down.values()) + sum(ex_g.bytes_down.values()),
                "bytes_up": sum(ex_d.bytes_up.values()) + sum(ex_g.bytes_up.values()),
                "clients": clients}

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "g": self.G.state_dict(), "d": self.D.state_dict(),
                "opt_g": self.opt_g.state_dict(), "opt_d": self.opt_d.state_dict(),
                "partition_of": dict(self.nodes.partition_of), "comm": self.comm.state(),
                "dropped_total": self.dropped_total, "rng": self.rng.getstate()}


__all__ = ["DataParallel", "DataParallelSettings", "client_dp_discriminator", "client_dp_generator",
           "client_latents", "client_real_batch", "discriminator_gradients", "generator_gradients",
           "average_gradients", "apply_gradients", "DP_DISCRIMINATOR", "DP_GENERATOR", "G_WEIGHTS", "D_WEIGHTS",
           "GRADS", "NUM_EXAMPLES", "make_message", "weights_record", "load_weights", "require_tensors",
           "require_count", "seeded_models", "fixed_latents", "should"]
