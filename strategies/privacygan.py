"""PrivacyGAN (thesis chapter 5, SPEC 4.2): a frozen teacher on the server, one student
generator per client on the server, each student discriminator on its own client.

Per round and selected client i:

1. server: z ~ N(0, I); x̃ = G_i(z); send x̃ (``train.discriminate``);
2. client: ``client-disc-steps`` updates of D_i on (its real batch, x̃); reply with the
   labels D_i(x̃) and the feedback f_i = ∂L_G(D_i(x̃))/∂x̃ — never weights, never data;
3. server: update G_i with the Joint Restraint Learning Function (thesis Eq. 5.9)

       L = α·L_G(D_i(G_i(z))) + β·L_G(D_T(G_i(z))),   β = 1 − α,  α ∈ (0, 1]

   as one backward pass through G_i with the gradient α·f_i + β·∂L_G(D_T(x̃))/∂x̃.
   α = 1 is a plain federated GAN (the teacher term vanishes).

With ``steps-per-round`` K > 1 the message carries K fake batches and the reply K
feedbacks. The K batches are generated one batch of B at a time, exactly as each update
recomputes G_i(z_k) (with BatchNorm a single call on all K·B latents would normalise with
other statistics and the client would judge other fakes than those back-propagated), so
step 1 of every round is the exact centralized JRLF update. Feedback k was computed on
fakes that G_i produced before its updates 1..k−1 of this round, so steps 2..K use
feedback that is up to K−1 generator steps stale; :func:`stale_feedback_errors`
measures by how much.

Everything that is math lives in pure functions below (and in ``models/steps.py``); the
:class:`PrivacyGAN` class only packs, sends, receives, unpacks and calls them.
"""

from __future__ import annotations

import copy
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.losses import generator_loss, make_optimizer
from models.steps import (discriminator_step, forward_keeping_buffers, generator_feedback, jrlf_feedback,
                          sample_latent, student_update, train_gan_step, train_only_head)
from strategies import client_eval, wire
from models.dp import DPConfig
from models.batched import Stack, can_batch, chunk_slices, discriminators_step, students_update
from strategies.base import (ClientDP, Snapshot, all_finite, check_dp_reply, dp_columns, NodeBook, Recorder,
                             check_identities, check_stop, exchange, guarded_update, log, pack_state,
                             require_replies, sample_nodes, should, unpack_state, wait_for_nodes)


# =====================================================================================
# Pure math
# =====================================================================================
def alpha_at(rnd: int, num_rounds: int, alpha: float, alpha_final: float = 0.0) -> float:
    """JRLF weight α of round ``rnd`` (1-based) of ``num_rounds``. ``alpha_final`` = 0: α
    throughout; else a linear schedule from ``alpha`` at round 1 to ``alpha_final`` at the last
    round, e.g. 0.5 -> 1: the student starts held by the teacher (β = 0.5) and ends following
    its client's discriminator alone. Every value stays in (0, 1] as thesis Eq. 5.9 requires."""
    if alpha_final <= 0.0 or num_rounds <= 1:
        return alpha
    t = min(max(rnd - 1, 0), num_rounds - 1) / (num_rounds - 1)
    return alpha + (alpha_final - alpha) * t


def generate_batches(G: nn.Module, z: torch.Tensor) -> torch.Tensor:
    """Fakes for latents ``z`` of shape (K, B, latent): G is called once per batch of B, as
    :func:`student_update` will recompute it, so the fakes a client judges are exactly the
    ones the server back-propagates through at step 1 (BatchNorm's batch statistics)."""
    with torch.no_grad():
        return torch.stack([G(z_k) for z_k in z])


def stale_feedback_errors(G: nn.Module, opt: torch.optim.Optimizer, D: nn.Module, d_opt: torch.optim.Optimizer,
                          teacher_d: nn.Module | None, z: torch.Tensor,
                          sample_real: Callable[[int, torch.Generator], torch.Tensor], gen: torch.Generator, *,
                          alpha: float, loss: str, disc_steps: int = 1) -> list[float]:
    """Play one K-step PrivacyGAN round in one process and measure the staleness of each step.

    ``z`` has shape (K, B, latent). The round runs as the protocol does: all K fake batches
    come from G_i before any update; for batch k the client's D_i makes ``disc_steps``
    updates on (a real batch, x̃_k) and returns its feedback on x̃_k; the server applies
    step k with that feedback. Before applying it, the gradient the exact (K = 1)
    protocol would use at that point is computed too: the same D_i's feedback on the
    fakes G_i makes *now*, G_i(z_k) with the updates 1..k−1 applied. Returns, per step k,
    ‖g_used − g_exact‖ / ‖g_exact‖ over G_i's parameters (JRLF gradients, thesis Eq. 5.9;
    the teacher term is the same in both). Step 1 gives 0 up to rounding.
    """
    params = [p for p in G.parameters() if p.requires_grad]
    fakes = generate_batches(G, z)
    errors = []
    for k in range(z.shape[0]):
        for _ in range(disc_steps):
            discriminator_step(D, d_opt, sample_real(z.shape[1], gen).to(fakes.device), fakes[k], loss)
        _, stale = generator_feedback(D, fakes[k], loss)
        x = G(z[k])
        _, fresh = generator_feedback(D, x.detach(), loss, keep_buffers=True)
        teacher = None
        if alpha < 1.0:
            _, teacher = generator_feedback(teacher_d, x.detach(), loss, keep_buffers=True)
        used = torch.autograd.grad(x, params, jrlf_feedback(stale, teacher, alpha), retain_graph=True)
        exact = torch.autograd.grad(x, params, jrlf_feedback(fresh, teacher, alpha))
        diff = torch.sqrt(sum(((u - e) ** 2).sum() for u, e in zip(used, exact)))
        norm = torch.sqrt(sum((e ** 2).sum() for e in exact))
        errors.append(float(diff / norm))
        # the protocol's update: step k with the stale feedback
        opt.zero_grad(set_to_none=True)
        for p, g in zip(params, used):
            p.grad = g
        opt.step()
    return errors


def train_teacher(G: nn.Module, D: nn.Module, sample_real: Callable[[int, torch.Generator], torch.Tensor], *,
                  steps: int, loss: str, gen_lr: float, disc_lr: float, betas: tuple[float, float],
                  batch_size: int, seed: int, on_step: Callable[[int, dict], None] | None = None,
                  d_steps: int = 1) -> dict:
    """Teacher phase: train (G_T, D_T) on the server's own data for ``steps`` G steps.

    Plain centralized GAN training (the base loss of the run, ``d_steps`` D updates per G
    update). Returns the last stats.
    """
    opt_g = make_optimizer(loss, G.parameters(), gen_lr, betas)
    opt_d = make_optimizer(loss, D.parameters(), disc_lr, betas)
    gen = torch.Generator().manual_seed(seed)
    device = next(G.parameters()).device
    latent_gen = torch.Generator(device=device).manual_seed(seed + 1)
    stats: dict = {}
    for step in range(1, steps + 1):
        real = sample_real(batch_size, gen).to(device)
        stats = train_gan_step(G, D, opt_g, opt_d, real, kind=loss, d_steps=d_steps, generator=latent_gen)
        if on_step is not None:
            on_step(step, stats)
    return stats


def freeze(*modules: nn.Module) -> None:
    """Teacher is frozen after its phase: no parameter ever requires grad again."""
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(False)


# =====================================================================================
# Client side: runs inside the ClientApp, D_i never leaves it
# =====================================================================================
CLIENT_STATE = "privacygan.client"   # context.state ConfigRecord holding D_i, its optimizer, its step count


def _save_state(D: nn.Module, opt: torch.optim.Optimizer, steps: int) -> ConfigRecord:
    return ConfigRecord({"blob": pack_state({"d": D.state_dict(), "opt": opt.state_dict(), "steps": steps}),
                         "d-steps-total": steps})


def load_client_state(rec: ConfigRecord) -> dict:
    """What a client keeps of D_i between messages: {"d": state_dict, "opt": optimizer state, "steps"}."""
    return unpack_state(rec["blob"])


def _load_state(rec: ConfigRecord, D: nn.Module, opt: torch.optim.Optimizer) -> int:
    blob = load_client_state(rec)
    D.load_state_dict(blob["d"])
    opt.load_state_dict(blob["opt"])
    return int(blob["steps"])


@dataclass
class _ClientD:
    """One client's D_i while it handles a ``train.discriminate`` message."""

    D: nn.Module
    opt: torch.optim.Optimizer
    gen: torch.Generator       # this client's real-batch draws
    fakes: torch.Tensor        # (K, B, *sample) as decoded
    negatives: torch.Tensor | None   # (K, M, *sample): the server's own images for D_i to reject (server-negatives)
    loss: str
    feedback_dtype: str
    disc_steps: int
    steps_total: int
    fresh: bool
    acc: list                  # each D step's statistics
    labels: list               # per fake batch, on the CPU
    feedback: list             # per fake batch, encoded for the wire


def _open_client(content: RecordDict, state: RecordDict, *, build_discriminator: Callable[[], nn.Module],
                 disc_lr: float, betas: tuple[float, float], device: str, seed: int, partition_id: int | None,
                 reused: nn.Module | None, train: str) -> _ClientD:
    """D_i and its optimizer from ``state`` (or new: random, or the ``d_init`` weights the server
    sends once with ``client-d-init=teacher``); ``reused``: a module to load a returning client into."""
    cfg = content.config_records[wire.CONFIG]
    loss = str(cfg["loss"])
    sent = content.array_records[wire.FAKES]
    fakes = wire.decode_fakes(wire.get_tensor(sent, wire.FAKES), str(cfg["fakes-dtype"]))
    negatives = None
    if wire.NEGATIVES in sent:
        negatives = wire.decode_fakes(wire.get_tensor(sent, wire.NEGATIVES), "uint8")
        if negatives.shape[0] != fakes.shape[0] or negatives.shape[2:] != fakes.shape[2:]:
            raise ValueError(f"negatives of shape {tuple(negatives.shape)} do not go with fakes of shape "
                             f"{tuple(fakes.shape)}: (K, M, *sample) expected")
    fresh = CLIENT_STATE not in state.config_records
    D = reused if not fresh and reused is not None else build_discriminator().to(device)
    D.train()
    opt = make_optimizer(loss, D.parameters(), disc_lr, betas)
    if not fresh:
        steps_total = _load_state(state.config_records[CLIENT_STATE], D, opt)
    else:
        steps_total = 0
        if wire.D_INIT in content.array_records:
            D.load_state_dict(content.array_records[wire.D_INIT].to_torch_state_dict())
    if train == "head":   # (a reused module comes from the same run config: same flags)
        train_only_head(D)
    # Real batches are drawn from this client's data only; the draw depends on the
    # client's own step count so reruns are reproducible.
    gen = torch.Generator().manual_seed(seed * 1_000_003 + (partition_id or 0) * 7919 + steps_total)
    return _ClientD(D=D, opt=opt, gen=gen, fakes=fakes, negatives=negatives, loss=loss,
                    feedback_dtype=str(cfg["feedback-dtype"]), disc_steps=int(cfg["client-disc-steps"]),
                    steps_total=steps_total, fresh=fresh, acc=[], labels=[], feedback=[])


def _close_client(c: _ClientD, state: RecordDict, partition_id: int | None, private=None) -> RecordDict:
    """Save D_i back into ``state``; the reply: labels, feedback and scalar metrics."""
    state.config_records[CLIENT_STATE] = _save_state(c.D, c.opt, c.steps_total)
    if private is not None:
        private.save()
    n = len(c.acc)
    metrics = {
        "d_loss": sum(s["d_loss"] for s in c.acc) / n,
        "d_real_acc": sum(s["d_real_acc"] for s in c.acc) / n,
        "d_fake_acc": sum(s["d_fake_acc"] for s in c.acc) / n,
        "d_steps_total": c.steps_total,
        "d_fresh": int(c.fresh),
        **({"d_neg_acc": sum(s["d_neg_acc"] for s in c.acc) / n} if c.negatives is not None else {}),
        **(private.metrics() if private is not None else {}),
    }
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({
        wire.REPLY: wire.tensor_record(**{wire.LABELS: torch.stack(c.labels).float(),
                                          wire.FEEDBACK: torch.stack(c.feedback)}),
        wire.METRICS: MetricRecord(metrics),
    })


def client_discriminate(content: RecordDict, state: RecordDict, *,
                        sample_real: Callable[[int, torch.Generator], torch.Tensor],
                        build_discriminator: Callable[[], nn.Module], disc_lr: float,
                        betas: tuple[float, float], device: str, seed: int,
                        partition_id: int | None = None, dp: DPConfig | None = None,
                        real_data: torch.Tensor | None = None, reuse: dict | None = None,
                        train: str = "all") -> RecordDict:
    """Handle one ``train.discriminate`` message on client i (SPEC 4.2 step 3).

    Loads D_i from ``state`` (or creates it: random, or from the ``d_init`` weights the
    server sends once with ``client-d-init=teacher``); for each of the K fake batches
    runs ``client-disc-steps`` updates of D_i on (a fresh real batch, the fakes), then
    computes labels and feedback on those fakes with the updated D_i. Saves D_i back
    into ``state`` and returns the reply content: labels, feedback and scalar metrics.

    With ``dp`` (and the client's records ``real_data``) every D_i update is a DP-SGD step
    (models/dp.py) on its own Poisson batch, counted in the client's accountant; the reply
    adds ``dp_epsilon``. When the message's steps would take it past ``dp-target-epsilon``
    it changes nothing and replies with metrics only (``dp_exhausted`` = 1).

    ``reuse``, a dict the caller keeps for this process (the ClientApp: one per run config), lets a
    returning client's D_i be loaded into the module the previous message used instead of a newly
    built one (every parameter and buffer is overwritten from ``state``; a new client still gets
    a freshly initialised D_i). Not with ``dp`` (the DP engine wraps the module).

    ``train`` (run config ``client-d-train``): "all" updates every layer of D_i; "head" only its
    last layer (models.steps.train_only_head), the others staying D_T's as the server sent them
    (``client-d-init=teacher``). With ``dp`` the noise then falls on the head's few parameters only
    (docs/PRIVACY.md: what that buys).
    """
    reusable = reuse is not None and dp is None
    c = _open_client(content, state, build_discriminator=build_discriminator, disc_lr=disc_lr, betas=betas,
                     device=device, seed=seed, partition_id=partition_id,
                     reused=reuse.get("d") if reusable else None, train=train)
    if reusable:
        reuse["d"] = c.D
    K, B = c.fakes.shape[0], c.fakes.shape[1]
    private, stop = ClientDP.begin(dp, state, real_data, c.D, c.loss, batch_size=B, steps_more=K * c.disc_steps,
                                   seed=seed, partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    for k in range(K):
        fake_k = c.fakes[k].to(device)
        neg_k = c.negatives[k].to(device) if c.negatives is not None else None
        for _ in range(c.disc_steps):
            if private is not None:
                stats = private.discriminator_step(c.D, c.opt, fake_k, c.loss, negatives=neg_k)
            else:
                real = sample_real(B, c.gen).to(device)
                stats = discriminator_step(c.D, c.opt, real, fake_k, c.loss, negatives=neg_k)
            c.steps_total += 1
            c.acc.append(stats)
        # --- feedback on the fakes the server sent: labels D_i(x̃), f_i = ∂L_G/∂x̃ ---
        lab, fb = generator_feedback(c.D, fake_k, c.loss)
        c.labels.append(lab.cpu())
        c.feedback.append(wire.encode_feedback(fb, c.feedback_dtype, B))
    return _close_client(c, state, partition_id, private)


def cohort_can_batch(contents: dict[int, RecordDict], *, dp: bool, train: str) -> str | None:
    """Why a cohort's ``train.discriminate`` messages cannot be handled as one computation
    (:func:`client_discriminate_cohort`), or None when they can."""
    if dp:
        return "dp (per-example clipping runs one client at a time)"
    if train != "all":
        return f"client-d-train = {train!r}"
    if any(wire.NEGATIVES in c.array_records[wire.FAKES] for c in contents.values()):
        return "server-negatives (a third forward pass per D step)"
    cfgs = [c.config_records[wire.CONFIG] for c in contents.values()]
    if {str(c["loss"]) for c in cfgs} - {"bce", "hinge"}:
        return "a Wasserstein loss (clipping / gradient penalty)"
    if any(int(c["client-disc-steps"]) != 1 for c in cfgs):
        return "client-disc-steps > 1"
    if len({(str(c["loss"]), str(c["fakes-dtype"]), str(c["feedback-dtype"])) for c in cfgs}) > 1:
        return "clients with different settings"
    shapes = {tuple(c.array_records[wire.FAKES][wire.FAKES].shape) for c in contents.values()}
    if len(shapes) > 1:
        return "fakes of different shapes"
    return None


def client_discriminate_cohort(contents: dict[int, RecordDict], states: dict[int, RecordDict], *,
                               sample_real: dict[int, Callable[[int, torch.Generator], torch.Tensor]],
                               partition_ids: dict[int, int | None],
                               build_discriminator: Callable[[], nn.Module], disc_lr: float,
                               betas: tuple[float, float], device: str, seed: int,
                               reuse: dict | None = None) -> dict[int, RecordDict]:
    """:func:`client_discriminate` for the clients of a cohort (run config ``cohort-size``) at once:
    for each fake batch k, every client's D_i step and feedback as one computation
    (models.batched.discriminators_step: D_i's stacked, one vmapped pass), each client with its own
    state, data, real-batch draws and reply. Equal to handling them one by one up to float
    rounding (tests/test_cohort.py). Only where :func:`cohort_can_batch` says so."""
    slots = sorted(contents)
    pool = reuse.setdefault("cohort-d", []) if reuse is not None else []
    opened: dict[int, _ClientD] = {}
    for i, slot in enumerate(slots):
        c = _open_client(contents[slot], states[slot], build_discriminator=build_discriminator, disc_lr=disc_lr,
                         betas=betas, device=device, seed=seed, partition_id=partition_ids[slot],
                         reused=pool[i] if i < len(pool) else None, train="all")
        if reuse is not None:
            pool[i:i + 1] = [c.D]
        opened[slot] = c
    K, B = opened[slots[0]].fakes.shape[:2]
    loss, feedback_dtype = opened[slots[0]].loss, opened[slots[0]].feedback_dtype
    discs = [(opened[s].D, opened[s].opt) for s in slots]
    for k in range(K):
        real = torch.stack([sample_real[s](B, opened[s].gen).to(device) for s in slots])
        fake = torch.stack([opened[s].fakes[k] for s in slots]).to(device)
        # --- each D_i: min L_D(D_i(real_i), D_i(x̃_i)); then labels D_i(x̃_i) and f_i = ∂L_G/∂x̃_i ---
        stats, labels, feedback = discriminators_step(discs, real, fake, loss)
        for i, s in enumerate(slots):
            c = opened[s]
            c.steps_total += 1
            c.acc.append(stats[i])
            c.labels.append(labels[i].cpu())
            c.feedback.append(wire.encode_feedback(feedback[i], feedback_dtype, B))
    return {s: _close_client(opened[s], states[s], partition_ids[s]) for s in slots}


# =====================================================================================
# Server side: the strategy
# =====================================================================================
TIMING_STUDENTS = 64   # server-batching=auto times at most this many students' step both ways


@dataclass(frozen=True)
class PrivacyGANSettings:
    """What the PrivacyGAN server loop needs (the app builds it from the run config)."""

    num_rounds: int = 10
    alpha: float = 0.5
    alpha_final: float = 0.0            # > 0: alpha moves linearly to this by the last round (alpha_at)
    loss: str = "bce"
    batch_size: int = 64
    latent_dim: int = 100
    steps_per_round: int = 1
    server_batching: str = "auto"       # auto | on | off (see PrivacyGAN.update_students)
    client_disc_steps: int = 1
    fraction_train: float = 1.0
    min_nodes: int = 2
    min_replies: int = 1
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    max_reply_mb: float = 256.0
    max_feedback_norm: float = 1000.0   # per-sample L2 bound on the feedback as sent (B * dL/dx)
    fakes_dtype: str = "float32"
    feedback_dtype: str = "float32"
    student_init: str = "teacher"
    client_d_init: str = "random"
    server_negatives: int = 0           # the server's own images sent with each fake batch for D_i to reject
    sample_every: int = 25
    samples_per_client: int = 16
    eval_every: int = 0
    eval_samples: int = 2500
    client_eval: bool = False
    checkpoint_every: int = 50
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.alpha <= 1.0:
            raise ValueError(f"alpha = {self.alpha} must be in (0, 1] (thesis Eq. 5.9: alpha + beta = 1)")
        if not 0.0 <= self.alpha_final <= 1.0:
            raise ValueError(f"alpha_final = {self.alpha_final} must be in (0, 1], or 0 for a constant alpha")


class PrivacyGAN:
    """The PrivacyGAN server loop over a Flower :class:`Grid`.

    The app passes in the trained teacher (frozen here), a factory for student
    generators and their optimizers, and a recorder for the run folder.
    """

    def __init__(self, settings: PrivacyGANSettings, *, teacher_g: nn.Module, teacher_d: nn.Module | None,
                 make_generator: Callable[[], nn.Module],
                 make_gen_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
                 recorder: Recorder, device: str = "cpu", sample_shape: tuple[int, ...] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None,
                 global_histogram: list[int] | None = None,
                 sample_negatives: Callable[[int, torch.Generator], torch.Tensor] | None = None) -> None:
        """``evaluate(sets)`` scores sample sets on the server (e.g. FID against the test set);
        ``global_histogram`` is the population's label histogram for the clients' ``tv_global``;
        ``sample_negatives(n, gen)`` draws n of the server's own images (``server-negatives`` > 0)."""
        if settings.server_negatives > 0 and sample_negatives is None:
            raise ValueError("server_negatives > 0 needs sample_negatives: the server's own images")
        self.s = settings
        self.sample_negatives = sample_negatives
        self.evaluate = evaluate
        self.global_histogram = global_histogram
        self.eval_comm = wire.CommLog()  # evaluation traffic: logged, kept out of the training totals
        self.device = device
        self.teacher_g = teacher_g.to(device)
        self.teacher_d = teacher_d.to(device) if teacher_d is not None else None
        freeze(self.teacher_g, *( [self.teacher_d] if self.teacher_d is not None else []))
        if self.teacher_d is not None:
            self.teacher_d.train()  # batch statistics as in training; buffers are never written
        self.make_generator = make_generator
        # node -> partition and row labels such as "client 0 (classes 0,1)" (the app knows the
        # simulation's partition plan; the strategy does not need to)
        self.nodes = NodeBook(describe_partition)
        self.make_gen_optimizer = make_gen_optimizer
        self.recorder = recorder
        self.students: dict[int, tuple[nn.Module, torch.optim.Optimizer]] = {}
        self.partition_of = self.nodes.partition_of
        self.d_init_sent: set[int] = set()
        self.comm = wire.CommLog()
        self.rng = random.Random(settings.seed)
        self.torch_gen = torch.Generator(device=device).manual_seed(settings.seed + 17)
        self.fixed_z = sample_latent(settings.samples_per_client, settings.latent_dim,
                                     generator=torch.Generator(device=device).manual_seed(settings.seed + 29),
                                     device=device)
        self.dropped_total = 0
        self.start_round = 1
        self.restored: dict[tuple[str, int], dict] = {}
        self.control_bytes = 0   # resume handshake, kept out of the training totals
        self.batching_choice: tuple[int, bool] | None = None   # (students timed, batched faster?)
        self.batching_timing: dict | None = None   # the auto choice's measurement, logged once
        self.last_batching = "sequential"
        self.alpha = settings.alpha   # this round's JRLF weight (alpha_at; set by run_round)
        with torch.no_grad():
            probe = forward_keeping_buffers(self.teacher_g, self.fixed_z[:2])
        self.sample_shape = tuple(sample_shape or probe.shape[1:])

    # --- students -------------------------------------------------------------------
    def student(self, nid: int) -> tuple[nn.Module, torch.optim.Optimizer]:
        """G_i of node ``nid`` (created on first use: a copy of G_T, or random)."""
        if nid not in self.students:
            if self.s.student_init == "teacher":
                G = copy.deepcopy(self.teacher_g)
                for p in G.parameters():
                    p.requires_grad_(True)
            else:
                G = self.make_generator().to(self.device)
            G.train()
            self.students[nid] = (G, self.make_gen_optimizer(G))
        return self.students[nid]

    def label(self, nid: int) -> str:
        return self.nodes.label(nid)

    # --- one round --------------------------------------------------------------------
    def build_message(self, grid: Grid, nid: int, rnd: int) -> tuple[Message, torch.Tensor]:
        content, z = self.build_content(nid, rnd)
        return Message(content=content, dst_node_id=nid, message_type=wire.DISCRIMINATE, group_id=str(rnd)), z

    def build_content(self, nid: int, rnd: int) -> tuple[RecordDict, torch.Tensor]:
        """The fakes G_i(z) for node ``nid`` (K batches) and the latents they came from."""
        K, B = self.s.steps_per_round, self.s.batch_size
        G, _ = self.student(nid)
        z = sample_latent(K * B, self.s.latent_dim, generator=self.torch_gen, device=self.device).reshape(K, B, -1)
        fakes = generate_batches(G, z).reshape(K, B, *self.sample_shape)
        arrays = {wire.FAKES: wire.encode_fakes(fakes, self.s.fakes_dtype)}
        if self.s.server_negatives > 0:
            arrays[wire.NEGATIVES] = wire.encode_fakes(self.negatives(nid, rnd), "uint8")
        content = RecordDict({
            wire.FAKES: wire.tensor_record(**arrays),
            wire.CONFIG: ConfigRecord({
                "round": rnd, "loss": self.s.loss, "fakes-dtype": self.s.fakes_dtype,
                "feedback-dtype": self.s.feedback_dtype, "client-disc-steps": self.s.client_disc_steps,
            }),
        })
        if self.s.client_d_init == "teacher" and nid not in self.d_init_sent and self.teacher_d is not None:
            content[wire.D_INIT] = ArrayRecord(self.teacher_d.state_dict())
        return content, z

    def negatives(self, nid: int, rnd: int) -> torch.Tensor:
        """(K, M, *sample): ``server-negatives`` = M of the server's own images per fake batch, which
        D_i learns to reject next to the fakes (models.steps.discriminator_step). Real images of
        every class that are not the client's data teach D_i to tell its client's classes from the
        others, which rejecting fakes alone does not (issue #17, README). Drawn from (seed, round,
        node) alone, so a resumed run sends the same ones."""
        K, M = self.s.steps_per_round, self.s.server_negatives
        gen = torch.Generator().manual_seed((self.s.seed * 1_000_003 + rnd * 7919 + nid) % (2 ** 63))
        return self.sample_negatives(K * M, gen).reshape(K, M, *self.sample_shape)

    def parse_reply(self, nid: int, reply: Message) -> tuple[torch.Tensor, torch.Tensor, dict]:
        return self.parse_content(reply.content)

    def parse_content(self, content: RecordDict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """Labels (K, B), decoded feedback (K, B, *sample) and metrics of a reply; BadReply if unusable."""
        K, B = self.s.steps_per_round, self.s.batch_size
        check_dp_reply(wire.metrics_of(content))   # a client at its dp-target-epsilon sends no update
        wire.require_only(content, {wire.REPLY: {wire.LABELS, wire.FEEDBACK}, wire.METRICS: None})
        labels = wire.require_labels(wire.require_array(content, wire.REPLY, wire.LABELS, (K, B), "float32"))
        fb = wire.require_array(content, wire.REPLY, wire.FEEDBACK, (K, B, *self.sample_shape),
                                self.s.feedback_dtype)
        wire.require_norm(fb, "reply.feedback", self.s.max_feedback_norm, sample_dims=len(self.sample_shape))
        metrics = wire.metrics_of(content)
        for key in ("d_loss", "d_real_acc", "d_fake_acc", "d_steps_total"):
            if key not in metrics:
                raise wire.BadReply(f"missing metric '{key}'")
        return labels, wire.decode_feedback(fb, self.s.feedback_dtype, B), metrics

    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        t0 = time.monotonic()
        self.alpha = alpha_at(rnd, self.s.num_rounds, self.s.alpha, self.s.alpha_final)
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        messages, latents = {}, {}
        for nid in selected:
            messages[nid], latents[nid] = self.build_message(grid, nid, rnd)
        rejoined: set[int] = set()
        teacher_losses: dict[int, list[float] | None] = {}

        def arrived(replies: dict) -> None:
            """Replies in: note their partitions, then the students' JRLF steps (a rejoined node's
            feedback was for the fresh student's fakes: skipped once)."""
            self.nodes.identify({nid: metrics for nid, (_, _, metrics) in replies.items()}, live=nodes)
            new = self.adopt_rejoined(replies, nodes)
            rejoined.update(new)
            teacher_losses.update(self.update_students(
                {nid: (latents[nid], replies[nid][1]) for nid in replies if nid not in new}))

        # With cohorts (a reply carries several clients: strategies/cohort.py) students are updated as
        # their replies come in, while other cohorts work -- unless they are to be updated as one
        # batched computation (server-batching on, or auto having found it faster), and not at the
        # run's first exchange, where every node must be told apart on all replies at once
        # (NodeBook.identify). With one client per reply a step per pull gained nothing (README run 7).
        unbatched = self.s.server_batching == "off" or (
            self.s.server_batching == "auto" and self.batching_choice is not None and not self.batching_choice[1])
        streaming = self.nodes.identified and unbatched and getattr(grid, "clients_per_message", 1) > 1
        ex = exchange(grid, messages, timeout=self.s.round_timeout, parse=self.parse_reply,
                      max_reply_mb=self.s.max_reply_mb, on_reply=arrived if streaming else None)
        if not streaming:
            arrived(ex.replies)

        clients: dict[str, dict] = {}
        rolled_back: list[int] = []
        todo = [nid for nid in ex.replies if nid not in rejoined]
        if self.s.client_d_init == "teacher":
            self.d_init_sent.update(todo)
        for nid in todo:
            labels, feedback, metrics = ex.replies[nid]
            # a bounded reply can still push G_i or its Adam moments past float range: undone, node blamed
            if teacher_losses[nid] is None:
                del ex.replies[nid]
                ex.dropped[nid] = "its feedback made the student generator or its optimizer non-finite; update rolled back"
                log.warning("dropping node %s this round: %s", nid, ex.dropped[nid])
                rolled_back.append(nid)
                continue
            local = float(generator_loss(self.s.loss, labels))
            teacher = sum(teacher_losses[nid]) / len(teacher_losses[nid])
            g_loss = local if self.alpha == 1.0 else self.alpha * local + (1 - self.alpha) * teacher
            clients[self.label(nid)] = {
                "node": nid, "g_loss": g_loss, "g_loss_local": local, "g_loss_teacher": teacher,
                "d_loss": metrics["d_loss"], "d_real_acc": metrics["d_real_acc"],
                "d_fake_acc": metrics["d_fake_acc"], "d_steps_total": int(metrics["d_steps_total"]),
                **dp_columns(metrics),
            }
        self.dropped_total += len(ex.dropped)
        for nid in selected:
            self.comm.add(rnd, nid, wire.DISCRIMINATE, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        mean = lambda key: sum(c[key] for c in clients.values()) / max(1, len(clients))  # noqa: E731
        timing, self.batching_timing = self.batching_timing, None
        return {
            "round": rnd, "round_time": time.monotonic() - t0, "rolled_back": rolled_back,
            "late_replies": {str(n): round(age, 1) for n, age in ex.late.items()},
            "g_loss": mean("g_loss"), "d_loss": mean("d_loss"),
            "d_real_acc": mean("d_real_acc"), "d_fake_acc": mean("d_fake_acc"),
            "replies": len(ex.replies), "dropped": len(ex.dropped),
            "dropped_reasons": {str(n): why for n, why in ex.dropped.items()},
            "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
            "clients": clients, "server_batching": self.last_batching, "alpha": self.alpha, "streamed": streaming,
            **({"server_batching_timing": timing} if timing else {}),   # the round "auto" measured in
        }

    # --- the students' JRLF steps ---------------------------------------------------------
    def update_students(self, work: dict[int, tuple[torch.Tensor, torch.Tensor]]) -> dict[int, list[float] | None]:
        """The K JRLF steps (thesis Eq. 5.9) of every student in ``work`` (node -> (latents (K, B,
        latent), feedback (K, B, *sample))). Returns node -> its K teacher losses, or None for a
        student whose update left it (or its optimizer) non-finite: that one is rolled back.

        ``server-batching``: "off" updates the students one after another; "on" as stacked
        computations (models/batched.py: grouped layers or vmap, 32 students per stack on the
        CPU, all at once on CUDA; the same numbers to 1e-5); "auto" times both once, on copies of
        this round's students, and keeps the faster (logged, and in metrics.jsonl).
        """
        if not work:
            return {}
        batched = self._use_batching(work)
        self.last_batching = "batched" if batched else "sequential"
        if not batched:
            out: dict[int, list[float] | None] = {}
            for nid, (z, feedback) in work.items():
                G, opt = self.student(nid)
                losses: list[float] = []

                def update() -> None:
                    for k in range(self.s.steps_per_round):
                        losses.append(student_update(G, opt, z[k], feedback[k].to(self.device), self.teacher_d,
                                                     self.alpha, self.s.loss)["g_loss_teacher"])

                out[nid] = losses if guarded_update(update, [G], [opt]) else None
            return out
        nids = list(work)
        students = [self.student(nid) for nid in nids]
        snaps = [Snapshot([G], [opt]) for G, opt in students]
        z = torch.stack([work[nid][0] for nid in nids], dim=1)                       # (K, N, B, latent)
        fb = torch.stack([work[nid][1] for nid in nids], dim=1).to(self.device)      # (K, N, B, *sample)
        losses = {nid: [] for nid in nids}
        stacks = [(sl, Stack([G for G, _ in students[sl]])) for sl in chunk_slices(len(students), self.device)]
        for k in range(self.s.steps_per_round):
            for sl, stack in stacks:
                if k:
                    stack.restack_params()
                for nid, loss in zip(nids[sl], students_update(students[sl], z[k][sl], fb[k][sl], self.teacher_d,
                                                               self.alpha, self.s.loss, stack=stack)):
                    losses[nid].append(loss)
        out = {}
        for nid, (G, opt), snap in zip(nids, students, snaps):
            if all_finite([G], [opt]):
                out[nid] = losses[nid]
            else:   # steps are independent per student: roll back this one only
                snap.restore()
                out[nid] = None
        return out

    def _use_batching(self, work: dict) -> bool:
        mode = self.s.server_batching
        if mode == "off" or len(work) < 2:
            return False
        gens = [self.student(nid)[0] for nid in work]
        if not can_batch(gens):
            if mode == "on":
                log.warning("server-batching=on: these students cannot be stacked (different architectures, "
                            "devices or modes); updating them one by one")
            return False
        if mode == "on":
            return True
        sample = dict(list(work.items())[:TIMING_STUDENTS])   # copies of at most this many are timed
        if self.batching_choice is None or self.batching_choice[0] < len(sample):
            self.batching_choice = (len(sample), self._time_batching(sample))
        return self.batching_choice[1]

    def _time_batching(self, work: dict) -> bool:
        """One step of these students both ways, on copies of them; True when batched wins. The
        caller passes at most ``TIMING_STUDENTS`` (the copies cost memory: 1,000 DCGAN-32
        students with their Adam state are 17 GB); batching gains more with more students, so a
        sample that favours it decides for the whole round."""
        def copies():   # each student's generator and an optimizer over the copy, with the same state
            out = []
            for nid in work:
                G, opt = self.student(nid)
                G = copy.deepcopy(G)
                new = self.make_gen_optimizer(G)
                new.load_state_dict(opt.state_dict())
                out.append((G, new))
            return out

        z = torch.stack([w[0][0] for w in work.values()])
        fb = torch.stack([w[1][0] for w in work.values()]).to(self.device)
        sync = torch.cuda.synchronize if str(self.device).startswith("cuda") else (lambda: None)
        students_update(copies(), z, fb, self.teacher_d, self.alpha, self.s.loss)   # warm-up
        pairs = copies()
        sync()
        t0 = time.perf_counter()
        for n, (G, opt) in enumerate(pairs):
            student_update(G, opt, z[n], fb[n], self.teacher_d, self.alpha, self.s.loss)
        sync()
        t_seq = time.perf_counter() - t0
        pairs = copies()
        sync()
        t0 = time.perf_counter()
        students_update(pairs, z, fb, self.teacher_d, self.alpha, self.s.loss)
        sync()
        t_bat = time.perf_counter() - t0
        self.batching_timing = {"students": len(work), "sequential_s": round(t_seq, 4), "batched_s": round(t_bat, 4)}
        log.info("server-batching=auto: %d students' JRLF step takes %.1f ms one by one, %.1f ms batched: %s",
                 len(work), 1e3 * t_seq, 1e3 * t_bat, "batched" if t_bat < t_seq else "one by one")
        return t_bat < t_seq

    def adopt_rejoined(self, replies: dict, nodes: list[int]) -> set[int]:
        """A node that reports the partition of a node that has left (a restarted SuperNode
        gets a new node id) takes over that node's student generator."""
        rejoined = set()
        for nid, (_, _, metrics) in replies.items():
            pid = self.partition_of.get(nid)
            if pid is None:
                continue
            for old, old_pid in list(self.partition_of.items()):
                if old != nid and old_pid == pid and old not in nodes and old in self.students:
                    self.students[nid] = self.students.pop(old)
                    del self.partition_of[old]
                    rejoined.add(nid)
                    log.info("node %s rejoined as partition %d (was node %s): it takes over its student", nid, pid, old)
        return rejoined

    # --- outputs ----------------------------------------------------------------------
    def samples(self) -> dict[str, torch.Tensor]:
        """Fixed-z samples: the teacher's row, then one row per client's student."""
        rows = {}
        with torch.no_grad():
            rows["teacher"] = forward_keeping_buffers(self.teacher_g, self.fixed_z).cpu()
            for nid in self.nodes.order(self.students):
                G, _ = self.students[nid]
                rows[self.label(nid)] = G(self.fixed_z).cpu()
        return rows

    def eval_latents(self) -> torch.Tensor:
        """The same ``eval_samples`` latents at every evaluation (curves compare like with like)."""
        return sample_latent(self.s.eval_samples, self.s.latent_dim, device=self.device,
                             generator=torch.Generator(device=self.device).manual_seed(self.s.seed + 31))

    @torch.no_grad()
    def eval_sets(self) -> dict[str, torch.Tensor]:
        """``eval_samples`` samples of the teacher and of every student (node order). The frozen
        teacher is sampled in train mode like the students, on cloned buffers: evaluation never
        writes its BatchNorm statistics."""
        z = self.eval_latents()
        sets = {"teacher": torch.cat([forward_keeping_buffers(self.teacher_g, c) for c in z.split(500)]).cpu()}
        for nid in self.nodes.order(self.students):
            G, _ = self.students[nid]
            sets[self.label(nid)] = torch.cat([G(c) for c in z.split(500)]).cpu()
        return sets

    def evaluate_round(self, grid: Grid, rnd: int) -> dict:
        """Server-side scores of every generator, then each client's scores of its student's
        fakes against its own data (``evaluate.fakes``; only the fakes go down)."""
        out: dict = {}
        sets = self.eval_sets()
        if self.evaluate is not None:
            out["eval"] = self.evaluate(sets)
        if self.s.client_eval:
            contents = {nid: client_eval.fakes_content(sets[self.label(nid)], rnd, "uint8")
                        for nid in self.nodes.order(self.students) if nid in grid.get_node_ids()}
            out.update(client_eval.evaluate_clients(
                grid, contents, client_eval.EVAL_FAKES, rnd=rnd, timeout=self.s.round_timeout, comm=self.eval_comm,
                label=self.label, partition_of=self.partition_of, global_histogram=self.global_histogram))
        return out

    def checkpoint(self, rnd: int) -> dict:
        return {
            "round": rnd,
            "settings": asdict(self.s),
            "teacher_g": self.teacher_g.state_dict(),
            "teacher_d": self.teacher_d.state_dict() if self.teacher_d is not None else None,
            "students": {nid: {"g": G.state_dict(), "opt": opt.state_dict()} for nid, (G, opt) in self.students.items()},
            "partition_of": dict(self.partition_of),
            "comm": self.comm.state(),
            "dropped_total": self.dropped_total,
            "rng": self.rng.getstate(),
            "torch_gen": self.torch_gen.get_state(),
        }

    # --- resume ------------------------------------------------------------------------
    def restore(self, ckpt: dict) -> None:
        """Continue from a checkpoint: students, their optimizers, round, RNGs, byte counters.

        Students are matched to nodes by partition id when known (node ids change when a
        run is restarted), else by node id. Client discriminators live in the clients'
        memory for one Flower run, so after a resume every client starts a fresh D_i
        (and receives D_T again when ``client-d-init=teacher``).
        """
        self.start_round = int(ckpt["round"]) + 1
        parts = ckpt.get("partition_of", {})
        for nid, blob in ckpt["students"].items():
            key = ("p", parts[nid]) if nid in parts else ("n", nid)
            self.restored[key] = blob
        self.comm.down_total = int(ckpt["comm"]["down_total"])
        self.comm.up_total = int(ckpt["comm"]["up_total"])
        self.dropped_total = int(ckpt.get("dropped_total", 0))
        self.rng.setstate(ckpt["rng"])
        self.torch_gen.set_state(ckpt["torch_gen"])

    def adopt_restored(self, grid: Grid, nodes: list[int]) -> None:
        """Ask every node its partition id (``query.info``) and hand it its restored student."""
        msgs = {nid: Message(content=RecordDict({wire.CONFIG: ConfigRecord({"round": self.start_round})}),
                             dst_node_id=nid, message_type=wire.INFO, group_id="resume") for nid in nodes}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=lambda n, r: wire.metrics_of(r.content),
                      max_reply_mb=self.s.max_reply_mb)
        self.control_bytes += sum(ex.bytes_down.values()) + sum(ex.bytes_up.values())
        if ex.replies:   # two nodes claiming one partition would split one client's student
            check_identities(ex.replies)
            self.nodes.identified = True
        for nid in nodes:
            info = ex.replies.get(nid, {})
            key = ("p", int(info["partition_id"])) if "partition_id" in info else ("n", nid)
            if "partition_id" in info:
                self.partition_of[nid] = int(info["partition_id"])
            blob = self.restored.pop(key, None)
            if blob is None:
                continue
            G = self.make_generator().to(self.device)
            G.load_state_dict(blob["g"])
            G.train()
            opt = self.make_gen_optimizer(G)
            opt.load_state_dict(blob["opt"])
            self.students[nid] = (G, opt)
        log.info("PrivacyGAN: resumed at round %d with %d restored student(s); %d not matched to a node",
                 self.start_round, len(self.students), len(self.restored))

    # --- the loop ---------------------------------------------------------------------
    def run(self, grid: Grid) -> dict:
        nodes = wait_for_nodes(grid, self.s.min_nodes, self.s.node_wait_timeout)
        self.nodes.num_nodes = len(nodes)
        log.info("PrivacyGAN: %d nodes, %d rounds, alpha=%s, K=%d", len(nodes), self.s.num_rounds,
                 f"{self.s.alpha:g}" + (f" -> {self.s.alpha_final:g} (linear)" if self.s.alpha_final else ""),
                 self.s.steps_per_round)
        if self.restored:
            self.adopt_restored(grid, nodes)
        last: dict = {}
        for rnd in range(self.start_round, self.s.num_rounds + 1):
            check_stop()
            nodes = sorted(grid.get_node_ids()) or nodes
            t0 = time.monotonic()
            record = self.run_round(grid, rnd, nodes)
            record["wall_time"] = time.monotonic() - t0
            if (self.evaluate is not None or self.s.client_eval) and should(self.s.eval_every, rnd, self.s.num_rounds):
                t_eval = time.monotonic()
                record.update(self.evaluate_round(grid, rnd))
                record["eval_time"] = time.monotonic() - t_eval
            self.recorder.log_round(record)
            self.recorder.log_comm(self.comm.round_rows(rnd) + self.eval_comm.round_rows(rnd))
            self.recorder.progress(rnd, {**{k: record[k] for k in ("g_loss", "d_loss", "d_real_acc", "d_fake_acc")},
                                         **{k: record[k] for k in ("fid_mean", "tv_own_mean") if k in record}})
            if (self.s.sample_every and rnd % self.s.sample_every == 0) or rnd == self.s.num_rounds:
                self.recorder.save_samples(f"round{rnd:05d}", self.samples())
            if (self.s.checkpoint_every and rnd % self.s.checkpoint_every == 0) or rnd == self.s.num_rounds:
                self.recorder.save_checkpoint("server.pt", self.checkpoint(rnd))
            last = record
        return {"rounds": self.s.num_rounds, "last": last, "bytes_down": self.comm.down_total,
                "bytes_up": self.comm.up_total, "dropped_replies": self.dropped_total,
                "clients": {self.label(n): n for n in self.students}, "resumed_at": self.start_round
                if self.start_round > 1 else None, "control_bytes": self.control_bytes,
                "eval": last.get("eval", {}), "client_eval": last.get("client_eval", {}),
                "eval_bytes": self.eval_comm.down_total + self.eval_comm.up_total}


__all__ = ["PrivacyGAN", "PrivacyGANSettings", "alpha_at", "student_update", "generate_batches", "stale_feedback_errors",
           "train_teacher", "freeze",
           "client_discriminate", "CLIENT_STATE"]
