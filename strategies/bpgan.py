"""BPGAN: block parallelism for GAN training (thesis chapter 4, Algorithms 2–3, SPEC 4.3).

The GAN is cut into two blocks that run on two different nodes of a *pair*:

* a discriminator block (DB, thesis Algorithm 2) holds a share of the real data. It
  receives the current discriminator weights D_r from the server and the fakes x̃ its
  partner produced, computes the discriminator error on (its real batch, x̃) — real and
  fake in separate forward passes, plus the gradient penalty for ``wgan-gp`` — and
  returns D's *gradient* (not a step), together with the labels D_r(x̃) and the feedback
  ∂L_G(D_r(x̃))/∂x̃ for the fakes;
* a generator block (GB, thesis Algorithm 3) holds no data. It keeps its own generator G
  (never aggregated, never sent), applies the feedback relayed to it by back-propagating it
  through G (chain rule: ∂L_G/∂θ = Σ_x ∂L_G/∂x · ∂x/∂θ) and returns fresh fakes.

The server is the parameter server for D (thesis Fig. 4.6): it averages the DBs' gradients
weighted by the number of fakes it sent each DB (the batch size it asked for: a reply reporting
another ``batch_size`` is dropped, so no DB can raise its own weight), steps D's optimizer
(projecting onto [−c, c] for the clipped WGAN critic) and relays each DB's labels/feedback to
the GB of its pair. Only D's weights and gradients travel between the server and the DBs;
between the blocks of a pair only fakes, labels and feedback travel — the cost model of thesis
Eq. 4.2 (vs. Eq. 4.1 for data parallelism, difference Eq. 4.3).

Critic steps per generator step (n = ``critic_steps``; the app sets ``wgan-critic-steps`` when
the discriminator block is the clipped WGAN critic, else ``client-disc-steps``, default 1, as
for data parallelism). Every round is
one D step. Only the feedback of D steps number n, 2n, 3n, ... is relayed, so a GB makes one
G step after every n-th D step; in the other rounds it gets no feedback, makes no G step and
only returns fresh fakes for its DB. In those critic-only rounds the DB is told
(``want-feedback = false``) to return its labels but no feedback; the ``want-feedback`` key
is sent only when n > 1, so with n = 1 (a DCGAN discriminator by default) the messages are
exactly those of the plain schedule. A run of R rounds makes R D steps and ⌊R/n⌋ G steps per pair.

Schedules (G_j denotes a GB's generator after j updates, X_r the fakes judged in round r,
F_r the feedback the DB returned on X_r, computed with D_r, the weights before D step r):

* ``pipeline=False`` — two exchanges per round: (1) GBs apply F_{r−1} (when it was relayed)
  and return X_r, (2) DBs judge X_r with D_r and the server steps D. X_r is made by the G
  that F_r is later applied to: each generator update equals the centralized update through
  D_r (no staleness), for every n.
* ``pipeline=True`` (default) — one exchange per round in which DBs and GBs work at the
  same time (thesis: the DB sends labels "before it is maturely trained"): DBs get
  (D_r, X_r) while GBs get F_{r−1} and return X_{r+1}. Round 1 is preceded by a priming
  generator exchange that produces X_1. So in round r a GB applies exactly the previous
  round's feedback F_{r−1}, computed on X_{r−1}, which was made one round earlier still.
  With n = 1 a G step lies between making X_{r−1} and applying F_{r−1}: for r ≥ 3 the
  feedback is back-propagated through G_{r−2} recomputed at the same z while X_{r−1} came
  from G_{r−3} — one generator update stale (the price of running both blocks in
  parallel). With n ≥ 2 no G step can lie in between (F_r is relayed only for r a multiple
  of n, F_{r−1} then is not), so every generator update is exact as in the unpipelined
  schedule; what the pipeline still costs is that the fakes the critic judges in a round
  that applies a G step (rounds kn+1) were made before that step (unpipelined: after it).

In both schedules the feedback of the last round (when R is a multiple of n) is applied by a
final ``flush`` generator exchange (feedback down, no fakes up), so the counts above hold for
the whole run. A GB keeps the latent batch of every fake batch it has sent (by its generation
number, at most the last MAX_PENDING_LATENTS) in its ``context.state`` until the feedback for
it arrives.

Pairs: the server learns each node's role with one ``query.info`` at start; DB with
partition 2k pairs with GB with partition 2k+1. Hybrid models (thesis 4.4.1) combine a
generator block and a discriminator block of different base GANs, see :data:`HYBRIDS`.
"""

from __future__ import annotations

import io
import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.losses import (GP_WEIGHT, LOSS_KINDS, WGAN_CLIP, discriminator_loss, generator_loss,
                           gradient_penalty, make_optimizer)
from models.steps import apply_feedback, clip_weights, generator_feedback, sample_latent
from models.dp import DPConfig
from strategies import wire
from strategies.base import (ClientDP, check_dp_reply, dp_columns, Exchange, Recorder, RunFailed,
                             apply_with_blame, check_stop, exchange, log, should, wait_for_nodes)

# --- message types -----------------------------------------------------------------------
GENERATOR_STEP = "train.generator_step"          # server -> GB: relayed feedback; GB -> server: new fakes
DISCRIMINATOR_GRAD = "train.discriminator_grad"  # server -> DB: D weights + fakes; DB -> server: grads + feedback
SAMPLE = "query.bpgan_sample"                    # server -> GB: n samples of its G (evaluation)

# --- record names ------------------------------------------------------------------------
D_WEIGHTS = "d_weights"   # ArrayRecord: D.state_dict(), server -> DB
D_GRADS = "d_grads"       # ArrayRecord: {parameter name: gradient}, DB -> server
RELAY = "relay"           # ArrayRecord {labels: (B,), feedback: (B, *sample)}, server -> GB
SAMPLES = "samples"       # ArrayRecord {samples: (n, *sample)}, GB -> server
# fakes (wire.FAKES), labels/feedback from a DB (wire.REPLY), config (wire.CONFIG) and
# metrics (wire.METRICS) use the shared names.
WANT_FEEDBACK = "want-feedback"   # DB config key, sent only when critic_steps > 1 (absent: true)

GB_STATE = "bpgan.generator"       # context.state ConfigRecord: G, its optimizer, pending latents
DB_STATE = "bpgan.discriminator"   # context.state ConfigRecord: the DB's step counter only

ROLE_DISCRIMINATOR, ROLE_GENERATOR, ROLE_UNKNOWN = 0, 1, -1
G_BLOCKS = ("dcgan", "wgan")
#: ``bpgan-model`` name -> (generator block, discriminator loss kind). DCWGAN = DCGAN generator
#: with a (clipped) WGAN critic, WDCGAN = WGAN generator with a DCGAN discriminator (thesis 4.4.1).
#:
#: The two generator blocks differ in their optimizer only. ``dcgan``: Adam(beta1, beta2) at
#: ``client-gen-lr``; ``wgan``: RMSProp (no momentum) at ``wgan-lr`` — the WGAN paper's
#: optimizer and rate (Arjovsky et al. 2017). Everything else is the same for both: the
#: network (the app's ``make_generator``: the DCGAN generator — transposed convolutions,
#: BatchNorm, ReLU, tanh output — or the MLP for 2-D data), its initialisation, the latent
#: prior, the batch size and the way feedback is applied (back-propagated through G, one
#: optimizer step). Two things that set a generator's training apart belong to the
#: *discriminator* block, not to the generator block: the loss whose gradient the feedback is
#: (∂softplus(−D(x))/∂x, the non-saturating GAN loss, from a DCGAN discriminator; ∂(−D(x))/∂x
#: from the WGAN critic — so WDCGAN's WGAN generator learns from the DCGAN loss and DCWGAN's
#: DCGAN generator from the Wasserstein one) and how often the generator steps (n_critic =
#: ``wgan-critic-steps`` critic steps per G step with the WGAN critic; ``client-disc-steps``,
#: default 1, with a DCGAN discriminator). The discriminator blocks share one network too (the DCGAN discriminator
#: with BatchNorm and a linear output; the BCE loss applies the sigmoid): the WGAN critic
#: differs in its loss, RMSProp at ``wgan-lr``, weight clipping to ±``WGAN_CLIP`` after each
#: server step and the n_critic schedule.
HYBRIDS = {"dcgan": ("dcgan", "bce"), "wgan": ("wgan", "wgan"), "dcwgan": ("dcgan", "wgan"),
           "wdcgan": ("wgan", "bce")}
#: Score keys for which a lower value is better (the "best GB" picks the minimum).
LOWER_IS_BETTER = ("kl", "fid", "kid")
MAX_PENDING_LATENTS = 4


def resolve_model(name: str) -> tuple[str, str]:
    """(g_block, d_loss) of a ``bpgan-model`` name; ValueError naming the allowed ones."""
    if name not in HYBRIDS:
        raise ValueError(f"bpgan-model {name!r}: choose one of {sorted(HYBRIDS)}")
    return HYBRIDS[name]


# =====================================================================================
# Pure math
# =====================================================================================
def _seeded_penalty(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, seed: int | None) -> torch.Tensor:
    """WGAN-GP penalty with its interpolation noise drawn from ``seed`` (global RNG untouched)."""
    if seed is None:
        return gradient_penalty(D, real, fake)
    devices = [real.device.index or 0] if real.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return gradient_penalty(D, real, fake)


def _accuracies(kind: str, real_out: torch.Tensor, fake_out: torch.Tensor) -> dict[str, float]:
    """Real/fake accuracy as in ``models.steps.discriminator_step`` (threshold 0, or the midpoint
    of the mean outputs for the Wasserstein critics)."""
    with torch.no_grad():
        real_mean, fake_mean = real_out.mean(), fake_out.mean()
        t = 0.5 * (real_mean + fake_mean) if kind in ("wgan", "wgan-gp") else torch.zeros((), device=real_out.device)
        return {"d_real_acc": float((real_out > t).float().mean()), "d_fake_acc": float((fake_out < t).float().mean()),
                "d_real_out": float(real_mean), "d_fake_out": float(fake_mean)}


def discriminator_gradient(D: nn.Module, real: torch.Tensor, fake: torch.Tensor, kind: str, *,
                           gp_seed: int | None = None, gp_weight: float = GP_WEIGHT
                           ) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """Gradient of the discriminator error E_D = E_r + E_f (thesis Algorithm 2, lines 4–8)
    w.r.t. D's parameters, without stepping.

    Real and fake batches go through D in separate forward passes (as in
    ``discriminator_step``); for ``wgan-gp`` the gradient penalty (noise drawn from
    ``gp_seed`` when given) is added. ``D``'s ``.grad`` fields are not touched. Returns
    ``({parameter name: gradient}, stats)`` with stats ``d_loss``, ``d_real_acc``,
    ``d_fake_acc``, ``d_real_out``, ``d_fake_out``.
    """
    fake = fake.detach()
    named = [(n, p) for n, p in D.named_parameters() if p.requires_grad]
    with torch.enable_grad():
        real_out = D(real)
        fake_out = D(fake)
        loss = discriminator_loss(kind, real_out, fake_out)
        if kind == "wgan-gp":
            loss = loss + gp_weight * _seeded_penalty(D, real, fake, gp_seed)
        grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    out = {n: (g.detach() if g is not None else torch.zeros_like(p)) for (n, p), g in zip(named, grads)}
    return out, {"d_loss": float(loss.detach()), **_accuracies(kind, real_out.detach(), fake_out.detach())}


def aggregate_gradients(grads: list[dict[str, torch.Tensor]], weights: list[int | float]) -> dict[str, torch.Tensor]:
    """Weighted mean Σ_i w_i·g_i / Σ_i w_i of the DBs' gradients (w_i: batch sizes).

    With equal batch sizes this is the gradient of the mean of the DBs' losses, i.e. what
    one process computes on all their batches (thesis Fig. 4.6, parameter server).
    """
    if not grads or len(grads) != len(weights):
        raise ValueError(f"{len(grads)} gradient set(s) and {len(weights)} weight(s)")
    if any(w <= 0 for w in weights):
        raise ValueError(f"weights must be positive, got {weights}")
    keys = set(grads[0])
    for g in grads[1:]:
        if set(g) != keys:
            raise ValueError(f"gradient sets name different parameters: {sorted(keys ^ set(g))}")
    total = float(sum(weights))
    return {k: sum(g[k].double() * (w / total) for g, w in zip(grads, weights)).to(grads[0][k].dtype)
            for k in grads[0]}


def apply_gradients(D: nn.Module, opt: torch.optim.Optimizer, grads: dict[str, torch.Tensor], kind: str, *,
                    clip: float = WGAN_CLIP) -> None:
    """One optimizer step of the server's D from an aggregated gradient (thesis Algorithm 2,
    line 9, done by the parameter server); for ``wgan`` the weights are then clipped to ±clip."""
    opt.zero_grad(set_to_none=True)
    for name, p in D.named_parameters():
        if name in grads:
            p.grad = grads[name].to(device=p.device, dtype=p.dtype).clone()
        elif p.requires_grad:
            raise KeyError(f"no gradient for D parameter '{name}'")
    opt.step()
    if kind == "wgan":
        clip_weights(D, clip)


def generator_optimizer(g_block: str, params, lr: float, betas: tuple[float, float]) -> torch.optim.Optimizer:
    """G's optimizer follows its block: DCGAN -> Adam(lr, betas), WGAN -> RMSprop(lr)."""
    if g_block not in G_BLOCKS:
        raise ValueError(f"g_block {g_block!r}: choose one of {G_BLOCKS}")
    return make_optimizer("wgan" if g_block == "wgan" else "bce", params, lr, betas)


def generator_step_due(d_step: int, critic_steps: int) -> bool:
    """Whether D step number ``d_step`` (1-based) is followed by a G step: every
    ``critic_steps``-th one (n_critic critic steps per generator step, WGAN paper's
    Algorithm 1; n = 1: a G step after every D step, thesis Algorithms 2–3)."""
    if d_step < 1 or critic_steps < 1:
        raise ValueError(f"d_step = {d_step} and critic_steps = {critic_steps} must be at least 1")
    return d_step % critic_steps == 0


def generator_steps(num_rounds: int, critic_steps: int) -> int:
    """G steps each GB makes in a run of ``num_rounds`` rounds (= D steps): ⌊R/n⌋, in both
    schedules (the last due feedback is applied by the flush)."""
    return sum(generator_step_due(r, critic_steps) for r in range(1, num_rounds + 1))


def summarize_scores(per_gb: dict[str, dict]) -> dict:
    """Per-GB scores plus, for every numeric key, the mean over GBs and the best GB
    (minimum for keys naming a divergence/distance such as ``reverse_kl`` or ``fid``,
    maximum otherwise, e.g. ``modes_covered``, ``high_quality_pct``)."""
    keys: list[str] = []
    for scores in per_gb.values():
        for k, v in scores.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in keys:
                keys.append(k)
    mean, best = {}, {}
    for k in keys:
        vals = {name: float(s[k]) for name, s in per_gb.items()
                if isinstance(s.get(k), (int, float)) and not isinstance(s.get(k), bool)}
        mean[k] = sum(vals.values()) / len(vals)
        lower = any(tag in k.lower() for tag in LOWER_IS_BETTER)
        name = (min if lower else max)(vals, key=lambda n: vals[n])
        best[k] = {"gb": name, "value": vals[name], "better": "lower" if lower else "higher"}
    return {"per_gb": per_gb, "mean": mean, "best": best}


# --- deterministic seeds of the blocks (reruns reproduce; tests recompute them) ----------
def latent_seed(seed: int, partition_id: int | None, generation: int) -> int:
    """Seed of the latent batch z of a GB's fake batch number ``generation``."""
    return seed * 1_000_003 + (partition_id or 0) * 7919 + generation * 104_729 + 11


def real_batch_rng(seed: int, partition_id: int | None, step: int) -> torch.Generator:
    """Generator from which a DB draws its real batch at its step number ``step``."""
    return torch.Generator().manual_seed(seed * 1_000_003 + (partition_id or 0) * 7919 + step)


def gp_seed(seed: int, partition_id: int | None, step: int) -> int:
    """Seed of the gradient-penalty noise of a DB at its step number ``step``."""
    return seed * 1_000_033 + (partition_id or 0) * 6_151 + step * 31 + 500_009


# =====================================================================================
# Client side: the two blocks
# =====================================================================================
@dataclass
class GeneratorBlock:
    """A GB's persistent state: G, its optimizer, and the latents of fakes awaiting feedback."""

    G: nn.Module
    opt: torch.optim.Optimizer
    generation: int = 0                          # number of the next fake batch
    g_steps: int = 0
    pending: dict[int, torch.Tensor] | None = None   # generation -> latent batch z


def load_generator_block(state: RecordDict, cfg: ConfigRecord, build_generator: Callable[[], nn.Module],
                         device: str) -> GeneratorBlock:
    """The GB's G and optimizer from ``context.state`` (created on first contact)."""
    G = build_generator().to(device)
    G.train()
    opt = generator_optimizer(str(cfg["g-block"]), G.parameters(), float(cfg["gen-lr"]),
                              (float(cfg["beta1"]), float(cfg["beta2"])))
    block = GeneratorBlock(G, opt, pending={})
    if GB_STATE in state.config_records:
        blob = torch.load(io.BytesIO(state.config_records[GB_STATE]["blob"]), map_location=device,
                          weights_only=False)
        G.load_state_dict(blob["g"])
        opt.load_state_dict(blob["opt"])
        block.generation, block.g_steps = int(blob["generation"]), int(blob["g_steps"])
        block.pending = {int(k): v.cpu() for k, v in blob["pending"].items()}
    return block


def _save_generator_block(b: GeneratorBlock) -> ConfigRecord:
    buf = io.BytesIO()
    torch.save({"g": b.G.state_dict(), "opt": b.opt.state_dict(), "generation": b.generation,
                "g_steps": b.g_steps, "pending": b.pending}, buf)
    return ConfigRecord({"blob": buf.getvalue(), "g-steps-total": b.g_steps})


def client_generator_step(content: RecordDict, state: RecordDict, *, build_generator: Callable[[], nn.Module],
                          device: str, seed: int, partition_id: int | None = None) -> RecordDict:
    """Handle ``train.generator_step`` on a GB (thesis Algorithm 3).

    If the message relays a DB's feedback (record ``relay``, config ``feedback-for`` = the
    generation number of the fakes it was computed on), G is updated with it: x = G(z) is
    recomputed with the kept latent z of that generation and ``x.backward(feedback)`` is
    followed by an optimizer step (``models.steps.apply_feedback``). Feedback for a
    generation this GB no longer holds (state lost) is skipped and reported
    (``applied = 0``). Then, unless ``make-fakes`` is false, a new latent batch is drawn,
    its fakes G(z) are returned (encoded with ``fakes-dtype``) and z is kept until its
    feedback arrives. Only fakes and scalar metrics leave the node.
    """
    cfg = content.config_records[wire.CONFIG]
    B = int(cfg["batch-size"])
    b = load_generator_block(state, cfg, build_generator, device)
    metrics: dict[str, float | int] = {"applied": 0}
    fb_for = int(cfg["feedback-for"])
    if fb_for >= 0 and RELAY in content.array_records:
        relay = content.array_records[RELAY]
        z = b.pending.pop(fb_for, None)
        if z is not None:
            feedback = wire.decode_feedback(wire.get_tensor(relay, wire.FEEDBACK), str(cfg["feedback-dtype"]), B)
            apply_feedback(b.G, b.opt, z.to(device), feedback.to(device))
            b.g_steps += 1
            metrics["applied"] = 1
        labels = wire.get_tensor(relay, wire.LABELS)
        metrics["g_loss"] = float(generator_loss(str(cfg["d-loss"]), labels))   # E_G (Algorithm 3, line 4)
        b.pending = {k: v for k, v in b.pending.items() if k > fb_for}
    reply = RecordDict()
    if bool(cfg["make-fakes"]):
        generation = b.generation
        b.generation += 1
        gen = torch.Generator(device=device).manual_seed(latent_seed(seed, partition_id, generation))
        z = sample_latent(B, b.G.latent_dim, generator=gen, device=device)
        with torch.no_grad():
            fakes = b.G(z)
        b.pending[generation] = z.detach().cpu()
        reply[wire.FAKES] = wire.tensor_record(**{wire.FAKES: wire.encode_fakes(fakes, str(cfg["fakes-dtype"]))})
        metrics["generation"] = generation
    for k in sorted(b.pending)[:-MAX_PENDING_LATENTS]:
        del b.pending[k]
    metrics["g_steps_total"] = b.g_steps
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    state.config_records[GB_STATE] = _save_generator_block(b)
    reply[wire.METRICS] = MetricRecord(metrics)
    return reply


def client_discriminator_grad(content: RecordDict, state: RecordDict, *,
                              sample_real: Callable[[int, torch.Generator], torch.Tensor],
                              build_discriminator: Callable[[], nn.Module], device: str, seed: int,
                              partition_id: int | None = None, dp: DPConfig | None = None,
                              real_data: torch.Tensor | None = None) -> RecordDict:
    """Handle ``train.discriminator_grad`` on a DB (thesis Algorithm 2).

    Builds D from the weights in the message (the DB keeps no model, only its step
    counter, which fixes where its random draws continue), draws a real batch of the fakes'
    size from its own data, and returns: D's gradient on (real, fakes) (record
    ``d_grads``, by parameter name), the labels D(x̃) and feedback ∂L_G(D(x̃))/∂x̃ for the
    fakes, both with the D it received (record ``reply``), and metrics ``d_loss``,
    ``d_real_acc``, ``d_fake_acc``, ``batch_size``. When the config says
    ``want-feedback = false`` (a critic-only round of an n_critic > 1 schedule: no G step
    will use it) the feedback is left out; the labels still go. No sample leaves the node.

    With ``dp`` (and the node's records ``real_data``) the gradient is a DP-SGD gradient
    (models/dp.py: a Poisson batch, per-example clipping, Gaussian noise), counted in the node's
    accountant (``context.state``); the reply adds ``dp_epsilon``. The labels and feedback are
    computed by the received D on server-chosen fakes (no real data). A node whose next step
    would exceed ``dp-target-epsilon`` sends metrics only (``dp_exhausted`` = 1).
    """
    cfg = content.config_records[wire.CONFIG]
    kind = str(cfg["d-loss"])
    fakes = wire.decode_fakes(wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES),
                              str(cfg["fakes-dtype"])).to(device)
    B = fakes.shape[0]
    D = build_discriminator().to(device)
    D.load_state_dict(content.array_records[D_WEIGHTS].to_torch_state_dict())
    D.train()
    steps = int(state.config_records[DB_STATE]["steps"]) if DB_STATE in state.config_records else 0
    private, stop = ClientDP.begin(dp, state, real_data, D, kind, batch_size=B, steps_more=1, seed=seed,
                                   partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    if private is not None:
        grads, stats = private.discriminator_gradient(D, fakes, kind)
        private.save()
    else:
        real = sample_real(B, real_batch_rng(seed, partition_id, steps)).to(device)
        grads, stats = discriminator_gradient(D, real, fakes, kind, gp_seed=gp_seed(seed, partition_id, steps))
    labels, feedback = generator_feedback(D, fakes, kind)
    state.config_records[DB_STATE] = ConfigRecord({"steps": steps + 1})
    metrics = {"d_loss": stats["d_loss"], "d_real_acc": stats["d_real_acc"], "d_fake_acc": stats["d_fake_acc"],
               "batch_size": int(B), "d_steps_total": steps + 1,
               **(private.metrics() if private is not None else {})}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    reply = {wire.LABELS: labels.float()}
    if bool(cfg.get(WANT_FEEDBACK, True)):
        reply[wire.FEEDBACK] = wire.encode_feedback(feedback, str(cfg["feedback-dtype"]), B)
    return RecordDict({
        D_GRADS: wire.tensor_record(**{n: g.float() for n, g in grads.items()}),
        wire.REPLY: wire.tensor_record(**reply),
        wire.METRICS: MetricRecord(metrics),
    })


def client_bpgan_sample(content: RecordDict, state: RecordDict, *, build_generator: Callable[[], nn.Module],
                        device: str) -> RecordDict:
    """Handle ``query.bpgan_sample`` on a GB: ``n`` samples of its G from latents seeded by
    ``seed`` (generated data only; the GB's state is not changed)."""
    cfg = content.config_records[wire.CONFIG]
    b = load_generator_block(state, cfg, build_generator, device)
    gen = torch.Generator(device=device).manual_seed(int(cfg["seed"]))
    z = sample_latent(int(cfg["n"]), b.G.latent_dim, generator=gen, device=device)
    with torch.no_grad():
        x = b.G(z)
    return RecordDict({SAMPLES: wire.tensor_record(**{SAMPLES: x.float()})})


# =====================================================================================
# Server side
# =====================================================================================
@dataclass(frozen=True)
class Pair:
    """DB with partition 2k and GB with partition 2k+1."""

    index: int
    db_node: int
    gb_node: int
    db_partition: int
    gb_partition: int

    @property
    def label(self) -> str:
        return f"GB {self.gb_partition} (pair of DB {self.db_partition})"


def pair_nodes(infos: dict[int, dict]) -> list[Pair]:
    """Pairs from the ``query.info`` answers (node -> partition_id, role, has_data);
    RunFailed naming the problem for any role mistake."""
    if not infos:
        raise RunFailed("BPGAN: no node answered 'query.info'; roles are unknown")
    if len(infos) % 2:
        raise RunFailed(f"BPGAN: odd number of nodes ({len(infos)}); every discriminator block (DB) needs "
                        "one generator block (GB), so the node count must be even")
    by_partition: dict[int, tuple[int, int]] = {}
    for nid, info in sorted(infos.items()):
        if "partition_id" not in info:
            raise RunFailed(f"BPGAN: node {nid} reports no partition id; pairs are DB 2k <-> GB 2k+1")
        pid, role = int(info["partition_id"]), int(info.get("role", ROLE_UNKNOWN))
        if role not in (ROLE_DISCRIMINATOR, ROLE_GENERATOR):
            raise RunFailed(f"BPGAN: node {nid} (partition {pid}) has an unknown role ({role}); set its node "
                            "config role='discriminator' or role='generator'")
        if role == ROLE_GENERATOR and int(info.get("has_data", 0)):
            raise RunFailed(f"BPGAN: node {nid} (partition {pid}) has role generator but holds data; generator "
                            "blocks hold no data — make it a discriminator or remove its data-path")
        if pid in by_partition:
            raise RunFailed(f"BPGAN: nodes {by_partition[pid][0]} and {nid} both report partition {pid}")
        expected = ROLE_DISCRIMINATOR if pid % 2 == 0 else ROLE_GENERATOR
        if role != expected:
            name = "discriminator" if role == ROLE_DISCRIMINATOR else "generator"
            raise RunFailed(f"BPGAN: node {nid} has role {name} on partition {pid}, but discriminator blocks take "
                            "even and generator blocks odd partition ids (pairs DB 2k <-> GB 2k+1)")
        by_partition[pid] = (nid, role)
    pairs = []
    for pid in sorted(by_partition):
        partner = pid + 1 if pid % 2 == 0 else pid - 1
        if partner not in by_partition:
            what = "discriminator block" if pid % 2 == 0 else "generator block"
            raise RunFailed(f"BPGAN: {what} on partition {pid} (node {by_partition[pid][0]}) is unpaired: no node "
                            f"holds partition {partner}")
        if pid % 2 == 0:
            pairs.append(Pair(pid // 2, by_partition[pid][0], by_partition[partner][0], pid, partner))
    return pairs


@dataclass(frozen=True)
class BPGANSettings:
    """What the BPGAN server loop needs (the app builds it from the run config:
    ``app.server_app.run_bpgan``).

    ``gen_lr`` and ``disc_lr`` are the rates the optimizers actually use: the GBs' G optimizer
    (Adam for a ``dcgan`` block, RMSProp for a ``wgan`` one, see :data:`HYBRIDS`) and the
    server's D optimizer (RMSProp for the clipped ``wgan`` critic, else Adam); the app fills in
    ``wgan-lr`` for the WGAN parts. ``critic_steps`` is n: D steps per G step (the app fills in
    ``wgan-critic-steps`` for the WGAN critic).
    """

    num_rounds: int = 10
    batch_size: int = 64
    latent_dim: int = 100
    pipeline: bool = True
    g_block: str = "dcgan"
    d_loss: str = "bce"
    gen_lr: float = 2e-4
    disc_lr: float = 2e-4
    critic_steps: int = 1
    beta1: float = 0.5
    beta2: float = 0.999
    fakes_dtype: str = "float32"
    feedback_dtype: str = "float32"
    min_replies: int = 1
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    max_reply_mb: float = 256.0
    max_feedback_norm: float = 1000.0   # per-sample L2 bound on a DB's feedback as sent
    max_update_norm: float = 1e5        # L2 bound on a DB's D gradient
    min_nodes: int = 2
    sample_every: int = 0
    samples_per_node: int = 16
    eval_samples: int = 2500
    eval_every: int = 0
    seed: int = 0

    def __post_init__(self) -> None:
        if self.g_block not in G_BLOCKS:
            raise ValueError(f"g_block {self.g_block!r}: choose one of {G_BLOCKS}")
        if self.d_loss not in LOSS_KINDS:
            raise ValueError(f"d_loss {self.d_loss!r}: choose one of {LOSS_KINDS}")
        if self.fakes_dtype not in wire.FAKE_DTYPES:
            raise ValueError(f"fakes_dtype {self.fakes_dtype!r}: choose one of {wire.FAKE_DTYPES}")
        if self.feedback_dtype not in wire.FEEDBACK_DTYPES:
            raise ValueError(f"feedback_dtype {self.feedback_dtype!r}: choose one of {wire.FEEDBACK_DTYPES}")
        if self.min_replies < 1:
            raise ValueError(f"min_replies = {self.min_replies} must be at least 1")
        if self.critic_steps < 1:
            raise ValueError(f"critic_steps = {self.critic_steps} must be at least 1")
        if self.gen_lr <= 0 or self.disc_lr <= 0:
            raise ValueError(f"gen_lr = {self.gen_lr} and disc_lr = {self.disc_lr} must be positive")


Contents = dict[int, tuple[str, RecordDict]]   # node -> (message type, content)


class BPGAN:
    """The BPGAN server loop over a Flower Grid: parameter server for D, relay within pairs.

    The app passes the discriminator (built for ``settings.d_loss``: no BatchNorm for
    wgan-gp), a recorder, an optional ``evaluate(samples_by_name) -> {name: {score: v}}``
    and the shape of one sample. The server never holds a generator.
    """

    def __init__(self, settings: BPGANSettings, *, discriminator: nn.Module, recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None, device: str = "cpu",
                 sample_shape: tuple[int, ...]) -> None:
        self.s = settings
        self.device = device
        self.D = discriminator.to(device)
        self.D.train()
        self.opt_d = make_optimizer(settings.d_loss, self.D.parameters(), settings.disc_lr,
                                    (settings.beta1, settings.beta2))
        self.recorder = recorder
        self.evaluate = evaluate
        self.sample_shape = tuple(sample_shape)
        self.pairs: list[Pair] = []
        self.fakes: dict[int, tuple[int, torch.Tensor]] = {}        # pair -> (generation, encoded fakes)
        self.feedback: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}  # pair -> (generation, labels, enc. fb)
        self.judging: dict[int, int] = {}   # pair -> generation of the fakes its DB is judging
        self.asked: dict[int, int] = {}     # DB node -> number of fakes sent to it this round (its weight)
        self.wants: dict[int, bool] = {}    # DB node -> whether its feedback was asked for this round
        self.comm = wire.CommLog()
        self.eval_comm = wire.CommLog()  # sample queries for grids and scoring (phase "eval")
        self.control_bytes = 0
        self.dropped_total = 0
        self.d_steps = 0

    # --- roles ------------------------------------------------------------------------------
    def info_contents(self, nodes: list[int]) -> Contents:
        return {nid: (wire.INFO, RecordDict({wire.CONFIG: ConfigRecord({})})) for nid in nodes}

    def discover_pairs(self, grid: Grid, nodes: list[int]) -> list[Pair]:
        """One ``query.info`` to every node; pairs or RunFailed on any role mistake."""
        ex = self.transport(grid, 0, self.info_contents(nodes))
        self.control_bytes += sum(ex.bytes_down.values()) + sum(ex.bytes_up.values())
        if ex.dropped:
            log.warning("BPGAN: %d node(s) did not answer 'query.info' and take no part: %s", len(ex.dropped),
                        "; ".join(f"node {n}: {why}" for n, why in ex.dropped.items()))
        self.pairs = pair_nodes(ex.replies)
        return self.pairs

    # --- contents (what each message holds) -------------------------------------------------
    def generator_config(self, rnd: int, feedback_for: int, make_fakes: bool) -> ConfigRecord:
        s = self.s
        return ConfigRecord({
            "round": rnd, "g-block": s.g_block, "d-loss": s.d_loss, "gen-lr": s.gen_lr, "beta1": s.beta1,
            "beta2": s.beta2, "batch-size": s.batch_size, "fakes-dtype": s.fakes_dtype,
            "feedback-dtype": s.feedback_dtype, "feedback-for": feedback_for, "make-fakes": make_fakes})

    def generator_content(self, pair: Pair, rnd: int, make_fakes: bool = True) -> RecordDict:
        """GB message: the relayed labels/feedback of its DB (when the server holds them; they
        are consumed here) and the settings of its G. Never data, never D's weights."""
        pending = self.feedback.pop(pair.index, None)
        content = RecordDict({wire.CONFIG: self.generator_config(rnd, pending[0] if pending else -1, make_fakes)})
        if pending is not None:
            content[RELAY] = wire.tensor_record(**{wire.LABELS: pending[1], wire.FEEDBACK: pending[2]})
        return content

    def discriminator_content(self, pair: Pair, rnd: int) -> RecordDict | None:
        """DB message: the current D weights and the fakes its GB produced (consumed here);
        None when the server holds no fakes for this pair (its GB dropped out).

        The server notes how many fakes it sent (the DB's weight in the average) and, with
        ``critic_steps`` > 1, asks for feedback (``want-feedback``) only when the coming D step
        is followed by a G step."""
        pending = self.fakes.pop(pair.index, None)
        if pending is None:
            return None
        self.judging[pair.index] = pending[0]
        self.asked[pair.db_node] = int(pending[1].shape[0])
        self.wants[pair.db_node] = generator_step_due(self.d_steps + 1, self.s.critic_steps)
        cfg = {"round": rnd, "d-loss": self.s.d_loss, "fakes-dtype": self.s.fakes_dtype,
               "feedback-dtype": self.s.feedback_dtype}
        if self.s.critic_steps > 1:
            cfg[WANT_FEEDBACK] = self.wants[pair.db_node]
        return RecordDict({
            wire.CONFIG: ConfigRecord(cfg),
            D_WEIGHTS: ArrayRecord(self.D.state_dict()),
            wire.FAKES: wire.tensor_record(**{wire.FAKES: pending[1]}),
        })

    def generator_contents(self, rnd: int, make_fakes: bool = True) -> Contents:
        return {p.gb_node: (GENERATOR_STEP, self.generator_content(p, rnd, make_fakes)) for p in self.pairs}

    def discriminator_contents(self, rnd: int) -> Contents:
        self.asked, self.wants = {}, {}
        out = {}
        for p in self.pairs:
            content = self.discriminator_content(p, rnd)
            if content is not None:
                out[p.db_node] = (DISCRIMINATOR_GRAD, content)
            else:
                log.warning("BPGAN round %d: no fakes from %s, its DB skips this round", rnd, p.label)
        return out

    def sample_contents(self, rnd: int, n: int) -> Contents:
        cfg = self.generator_config(rnd, -1, False)
        return {p.gb_node: (SAMPLE, RecordDict({wire.CONFIG: ConfigRecord(
            {**dict(cfg), "n": n, "seed": self.s.seed * 7 + rnd})})) for p in self.pairs}

    # --- replies ----------------------------------------------------------------------------
    def parse_content(self, nid: int, mtype: str, content: RecordDict, *, make_fakes: bool = True,
                      n_samples: int = 0) -> dict:
        """Check and unpack one reply's content; BadReply (dropped with its reason) if unusable."""
        B = self.s.batch_size
        if mtype == wire.INFO:
            return wire.metrics_of(content)
        if mtype == SAMPLE:
            return {"samples": wire.require_array(content, SAMPLES, SAMPLES, (n_samples, *self.sample_shape),
                                                  "float32")}
        metrics = wire.metrics_of(content)
        if mtype == GENERATOR_STEP:
            out = {"metrics": metrics}
            if make_fakes:
                out["fakes"] = wire.require_array(content, wire.FAKES, wire.FAKES, (B, *self.sample_shape),
                                                  self.s.fakes_dtype)
                if "generation" not in metrics:
                    raise wire.BadReply("missing metric 'generation'")
            return out
        if mtype == DISCRIMINATOR_GRAD:
            check_dp_reply(metrics)   # a DB at its dp-target-epsilon sends no gradient
            # the shapes and the weight are what the server sent this DB, never what it reports
            n = self.asked.get(nid)
            if n is None:
                raise wire.BadReply("the server sent this node no fakes to judge")
            for key in ("d_loss", "d_real_acc", "d_fake_acc", "batch_size"):
                if key not in metrics:
                    raise wire.BadReply(f"missing metric '{key}'")
            if metrics["batch_size"] != n:
                raise wire.BadReply(f"reported batch_size {metrics['batch_size']:g}, but the server sent it {n} "
                                    f"fakes to judge")
            grads = {name: wire.require_array(content, D_GRADS, name, tuple(p.shape), "float32")
                     for name, p in self.D.named_parameters() if p.requires_grad}
            wire.require_total_norm(grads.values(), D_GRADS, self.s.max_update_norm)
            labels = wire.require_labels(wire.require_array(content, wire.REPLY, wire.LABELS, (n,), "float32"))
            fb = (wire.require_array(content, wire.REPLY, wire.FEEDBACK, (n, *self.sample_shape),
                                     self.s.feedback_dtype) if self.wants.get(nid, True) else None)
            if fb is not None:
                wire.require_norm(fb, "reply.feedback", self.s.max_feedback_norm, sample_dims=len(self.sample_shape))
            return {"grads": grads, "labels": labels, "feedback": fb, "metrics": metrics}
        raise wire.BadReply(f"unexpected message type {mtype!r}")

    def transport(self, grid: Grid, rnd: int, contents: Contents, **parse_kw) -> Exchange:
        """One bounded ``send_and_receive`` of the given contents (tests replace this with a
        loopback that calls the client handlers directly)."""
        types = {nid: mtype for nid, (mtype, _) in contents.items()}
        messages = {nid: Message(content=c, dst_node_id=nid, message_type=mtype, group_id=str(rnd))
                    for nid, (mtype, c) in contents.items()}
        return exchange(grid, messages, timeout=self.s.round_timeout, max_reply_mb=self.s.max_reply_mb,
                        parse=lambda nid, reply: self.parse_content(nid, types[nid], reply.content, **parse_kw))

    # --- absorbing replies ---------------------------------------------------------------------
    def absorb_generators(self, replies: dict[int, dict], relayed: dict[int, bool]) -> dict[int, dict]:
        """Keep each GB's new fakes for its DB; per-pair GB metrics."""
        out = {}
        for p in self.pairs:
            rep = replies.get(p.gb_node)
            if rep is None:
                continue
            m = rep["metrics"]
            if relayed.get(p.gb_node) and not m.get("applied"):
                log.warning("BPGAN: %s no longer held the latents of the relayed feedback; no G step", p.label)
            if "fakes" in rep:
                self.fakes[p.index] = (int(m["generation"]), rep["fakes"])
            out[p.index] = m
        return out

    def absorb_discriminators(self, replies: dict[int, dict], totals: dict | None = None) -> dict[int, dict]:
        """The parameter server's step (thesis Fig. 4.6, Algorithm 2 line 9): average the DBs'
        gradients weighted by the number of fakes the server sent each (``self.asked``, not the
        reported ``batch_size``), step D; when this D step is followed by a G step
        (:func:`generator_step_due`) keep each DB's labels/feedback for its GB. Per-pair DB
        metrics, with the pair's g_loss and the server's count as ``batch_size``.

        A D step that would leave D or its optimizer non-finite is rolled back; the DB(s) whose
        gradients did it are dropped (removed from ``replies``, reason in ``totals``)."""
        by_node = {p.db_node: p for p in self.pairs}
        good = {nid: rep for nid, rep in replies.items() if nid in by_node}
        if not good:
            return {}

        def apply(nids: list[int]) -> None:
            grads = aggregate_gradients([good[n]["grads"] for n in nids], [self.asked[n] for n in nids])
            apply_gradients(self.D, self.opt_d, grads, self.s.d_loss)

        for nid in apply_with_blame(apply, list(good), [self.D], [self.opt_d]):
            del good[nid]
            replies.pop(nid, None)
            why = "its D gradient made D or its optimizer non-finite; update rolled back"
            log.warning("dropping node %s this round: %s", nid, why)
            self.dropped_total += 1
            if totals is not None:
                totals["dropped"][str(nid)] = f"{DISCRIMINATOR_GRAD}: {why}"
        if not good:
            return {}
        self.d_steps += 1
        relay = generator_step_due(self.d_steps, self.s.critic_steps)
        out = {}
        for nid, rep in good.items():
            p = by_node[nid]
            if relay:
                if rep["feedback"] is None:
                    raise RuntimeError(f"D step {self.d_steps} needs the feedback of node {nid}, which was not "
                                       "asked for")
                self.feedback[p.index] = (self.judging[p.index], rep["labels"], rep["feedback"])
            out[p.index] = {**rep["metrics"], "batch_size": self.asked[nid],
                            "g_loss": float(generator_loss(self.s.d_loss, rep["labels"]))}
        return out

    # --- one round ----------------------------------------------------------------------------
    def _book(self, rnd: int, contents: Contents, ex: Exchange, totals: dict, phase: str) -> None:
        role = {}
        for p in self.pairs:
            role[p.db_node] = ("discriminator", p)
            role[p.gb_node] = ("generator", p)
        for nid, (mtype, _) in contents.items():
            r, p = role[nid]
            self.comm.add(rnd, nid, mtype, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0), role=r, pair=p.index,
                          partition=p.db_partition if r == "discriminator" else p.gb_partition,
                          phase=phase, dropped=nid in ex.dropped)
        totals["down"] += sum(ex.bytes_down.get(n, 0) for n in contents)
        totals["up"] += sum(ex.bytes_up.get(n, 0) for n in contents)
        totals["dropped"].update({str(n): f"{contents[n][0]}: {why}" for n, why in ex.dropped.items()})
        self.dropped_total += len(ex.dropped)

    def _exchange(self, grid: Grid, rnd: int, contents: Contents, totals: dict, phase: str,
                  make_fakes: bool = True) -> Exchange:
        if not contents:
            return Exchange()
        ex = self.transport(grid, rnd, contents, make_fakes=make_fakes)
        self._book(rnd, contents, ex, totals, phase)
        return ex

    def run_round(self, grid: Grid, rnd: int) -> dict:
        """One BPGAN round (schedules in the module docstring); the round's record."""
        t0 = time.monotonic()
        totals: dict = {"down": 0, "up": 0, "dropped": {}}
        gb_metrics: dict[int, dict] = {}
        if self.s.pipeline and not self.fakes:
            # priming: X_1 for the DBs of round 1 (later rounds' fakes come with the previous round)
            contents = self.generator_contents(rnd)
            ex = self._exchange(grid, rnd, contents, totals, "prime")
            self.absorb_generators(ex.replies, {})
        if self.s.pipeline:
            d_contents = self.discriminator_contents(rnd)
            g_contents = self.generator_contents(rnd)
            ex = self._exchange(grid, rnd, {**d_contents, **g_contents}, totals, "train")
            d_replies = {n: r for n, r in ex.replies.items() if n in d_contents}
            db_metrics = self.absorb_discriminators(d_replies, totals)
            gb_metrics = self.absorb_generators({n: r for n, r in ex.replies.items() if n in g_contents},
                                                {n: RELAY in c for n, (_, c) in g_contents.items()})
        else:
            g_contents = self.generator_contents(rnd)
            ex_g = self._exchange(grid, rnd, g_contents, totals, "generate")
            gb_metrics = self.absorb_generators(ex_g.replies, {n: RELAY in c for n, (_, c) in g_contents.items()})
            d_contents = self.discriminator_contents(rnd)
            ex = self._exchange(grid, rnd, d_contents, totals, "discriminate")
            d_replies = dict(ex.replies)
            db_metrics = self.absorb_discriminators(d_replies, totals)
        if len(d_replies) < self.s.min_replies:
            reasons = "; ".join(f"node {n}: {why}" for n, why in totals["dropped"].items()) or "no fakes to judge"
            raise RunFailed(f"round {rnd}: {len(d_replies)} good discriminator repl(ies), run config 'min-replies' "
                            f"asks for {self.s.min_replies} ({reasons})")
        return self._record(rnd, t0, totals, db_metrics, gb_metrics, len(d_replies))

    def _record(self, rnd: int, t0: float, totals: dict, db: dict[int, dict], gb: dict[int, dict],
                replies: int) -> dict:
        clients = {}
        for p in self.pairs:
            if p.index not in db and p.index not in gb:
                continue
            d, g = db.get(p.index, {}), gb.get(p.index, {})
            clients[p.label] = {
                "db_node": p.db_node, "gb_node": p.gb_node, "g_loss": d.get("g_loss", math.nan),
                "d_loss": d.get("d_loss", math.nan), "d_real_acc": d.get("d_real_acc", math.nan),
                "d_fake_acc": d.get("d_fake_acc", math.nan), "batch_size": int(d.get("batch_size", 0)),
                "g_applied": int(g.get("applied", 0)), "g_steps_total": int(g.get("g_steps_total", 0)),
                **dp_columns(d)}
        weights = {p.index: db[p.index]["batch_size"] for p in self.pairs if p.index in db}
        total_w = sum(weights.values())

        def wmean(key: str) -> float:
            return sum(db[k][key] * w for k, w in weights.items()) / total_w if total_w else math.nan

        return {
            "round": rnd, "g_loss": (sum(db[k]["g_loss"] for k in weights) / len(weights)) if weights else math.nan,
            "d_loss": wmean("d_loss"), "d_real_acc": wmean("d_real_acc"), "d_fake_acc": wmean("d_fake_acc"),
            "replies": replies, "dropped": len(totals["dropped"]), "dropped_reasons": totals["dropped"],
            "bytes_down": totals["down"], "bytes_up": totals["up"], "clients": clients,
            "g_steps": sum(int(g.get("applied", 0)) for g in gb.values()), "d_steps_total": self.d_steps,
            "pipeline": self.s.pipeline, "round_time": time.monotonic() - t0,
        }

    def flush(self, grid: Grid, rnd: int, record: dict) -> None:
        """After the last round: the GBs apply the last feedback (no new fakes) — only when
        the last D step was followed by a G step (the server holds feedback); else nothing
        is sent."""
        totals: dict = {"down": 0, "up": 0, "dropped": {}}
        contents = {p.gb_node: (GENERATOR_STEP, self.generator_content(p, rnd, make_fakes=False))
                    for p in self.pairs if p.index in self.feedback}
        ex = self._exchange(grid, rnd, contents, totals, "flush", make_fakes=False)
        gb = self.absorb_generators(ex.replies, {n: True for n in contents})
        record["bytes_down"] += totals["down"]
        record["bytes_up"] += totals["up"]
        record["dropped"] += len(totals["dropped"])
        record["dropped_reasons"].update(totals["dropped"])
        record["g_steps"] += sum(int(g.get("applied", 0)) for g in gb.values())
        by_index = {p.index: p for p in self.pairs}
        for k, g in gb.items():
            c = record["clients"].setdefault(by_index[k].label, {})
            c["g_applied"] = int(c.get("g_applied", 0)) + int(g.get("applied", 0))
            c["g_steps_total"] = int(g.get("g_steps_total", 0))

    # --- evaluation ------------------------------------------------------------------------------
    def collect_samples(self, grid: Grid, rnd: int, n: int) -> dict[str, torch.Tensor]:
        contents = self.sample_contents(rnd, n)
        ex = self.transport(grid, rnd, contents, n_samples=n)
        labels = {p.gb_node: p for p in self.pairs}
        for nid in contents:
            p = labels[nid]
            self.eval_comm.add(rnd, nid, SAMPLE, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0), role="generator",
                               pair=p.index, partition=p.gb_partition, phase="eval", dropped=nid in ex.dropped)
        return {labels[nid].label: rep["samples"] for nid, rep in
                sorted(ex.replies.items(), key=lambda kv: labels[kv[0]].index)}

    def evaluate_round(self, grid: Grid, rnd: int) -> dict:
        n = self.s.eval_samples if self.evaluate is not None else self.s.samples_per_node
        per_gb = self.collect_samples(grid, rnd, n)
        if not per_gb:
            return {}
        self.recorder.save_samples(f"round{rnd:05d}", {k: (v[:self.s.samples_per_node] if v.dim() > 2 else v)
                                                       for k, v in per_gb.items()})
        if self.evaluate is None:
            return {}
        return summarize_scores(self.evaluate(per_gb))

    def checkpoint(self, rnd: int) -> dict:
        return {"round": rnd, "settings": asdict(self.s), "d": self.D.state_dict(), "opt_d": self.opt_d.state_dict(),
                "d_steps": self.d_steps, "comm": self.comm.state(), "dropped_total": self.dropped_total,
                "pairs": [asdict(p) for p in self.pairs]}

    # --- the loop -------------------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        nodes = wait_for_nodes(grid, self.s.min_nodes, self.s.node_wait_timeout)
        self.discover_pairs(grid, nodes)
        log.info("BPGAN: %d pair(s), %d rounds, pipeline=%s, G block %s, D loss %s, %d D step(s) per G step",
                 len(self.pairs), self.s.num_rounds, self.s.pipeline, self.s.g_block, self.s.d_loss,
                 self.s.critic_steps)
        last: dict = {}
        evaluation: dict = {}
        for rnd in range(1, self.s.num_rounds + 1):
            check_stop()
            t0 = time.monotonic()
            record = self.run_round(grid, rnd)
            if rnd == self.s.num_rounds:
                self.flush(grid, rnd, record)
            record["wall_time"] = time.monotonic() - t0  # training only
            if should(self.s.sample_every, rnd, self.s.num_rounds) or (
                    self.evaluate is not None and should(self.s.eval_every, rnd, self.s.num_rounds)):
                t_eval = time.monotonic()
                evaluation = self.evaluate_round(grid, rnd)
                record["eval"] = evaluation
                record["eval_time"] = time.monotonic() - t_eval
            self.recorder.log_round(record)
            self.recorder.log_comm(self.comm.round_rows(rnd) + self.eval_comm.round_rows(rnd))
            self.recorder.progress(rnd, {k: record[k] for k in ("g_loss", "d_loss", "d_real_acc", "d_fake_acc")})
            last = record
        self.recorder.save_checkpoint("server.pt", self.checkpoint(self.s.num_rounds))
        return {"rounds": self.s.num_rounds, "last": last, "bytes_down": self.comm.down_total,
                "bytes_up": self.comm.up_total, "dropped_replies": self.dropped_total,
                "clients": {p.label: {"db_node": p.db_node, "gb_node": p.gb_node} for p in self.pairs},
                "eval": evaluation, "control_bytes": self.control_bytes}


__all__ = ["BPGAN", "BPGANSettings", "Pair", "pair_nodes", "HYBRIDS", "resolve_model", "aggregate_gradients",
           "generator_step_due", "generator_steps", "WANT_FEEDBACK",
           "discriminator_gradient", "apply_gradients", "generator_optimizer", "summarize_scores",
           "client_generator_step", "client_discriminator_grad", "client_bpgan_sample", "GENERATOR_STEP",
           "DISCRIMINATOR_GRAD", "SAMPLE", "D_WEIGHTS", "D_GRADS", "RELAY", "SAMPLES", "GB_STATE", "DB_STATE",
           "latent_seed", "real_batch_rng", "gp_seed", "load_generator_block"]
