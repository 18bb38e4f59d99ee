"""Single training updates for GANs, written as pure functions.

The federated scheme splits the usual generator update in two halves:

1. whoever holds a discriminator computes, for a batch of generated samples
   ``x = G(z)``, the *feedback* ``dL_G/dx`` (:func:`generator_feedback`);
2. whoever holds the generator back-propagates that feedback through ``G``
   (:func:`apply_feedback`).

By the chain rule ``dL_G/dtheta = sum_x dL_G/dx * dx/dtheta``, so the two halves
together give exactly the centralised update :func:`generator_step`.
:func:`jrlf_feedback` mixes feedback from a local discriminator and a teacher
discriminator as in the joint local/teacher objective of thesis Eq. 5.9.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.func import functional_call

from .losses import (
    GP_WEIGHT,
    WGAN_CLIP,
    check_loss_kind,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    negative_loss,
)


# ---------------------------------------------------------------------------
# Latent sampling
# ---------------------------------------------------------------------------
def sample_latent(
    n: int,
    latent_dim: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """Draw ``n`` latent codes z ~ N(0, I) of shape (n, latent_dim).

    When ``generator`` is given and ``device`` is not, the codes are created
    on the generator's device.
    """
    if device is None and generator is not None:
        device = generator.device
    return torch.randn(n, latent_dim, generator=generator, device=device)


# ---------------------------------------------------------------------------
# Forward pass of a frozen network
# ---------------------------------------------------------------------------
def forward_keeping_buffers(module: nn.Module, *inputs: Tensor) -> Tensor:
    """``module(*inputs)`` in whatever train / eval mode ``module`` is in, but on cloned
    buffers: in train mode BatchNorm normalises with the batch's statistics as usual,
    while the module's own running statistics and ``num_batches_tracked`` stay exactly
    as they were. This is how a frozen teacher is sampled or queried.
    """
    state: dict[str, Tensor] = dict(module.named_parameters())
    state.update({name: buf.clone() for name, buf in module.named_buffers()})
    return functional_call(module, state, inputs)


def head_module(module: nn.Module) -> nn.Module:
    """The last sub-module (in registration order) that holds parameters of its own: a DCGAN
    discriminator's final convolution, an MLP's output layer."""
    last = None
    for m in module.modules():
        if next(m.parameters(recurse=False), None) is not None:
            last = m
    if last is None:
        raise ValueError(f"{type(module).__name__} has no parameters")
    return last


def train_only_head(module: nn.Module) -> None:
    """Freeze every parameter except those of :func:`head_module` (``requires_grad``). Optimizer
    steps and :func:`clip_weights` then leave the frozen body exactly as it was (its gradients stay
    ``None``), and the DP engine computes, clips and noises the head's per-example gradients only
    (models/dp.py works on the trainable parameters)."""
    head = {id(p) for p in head_module(module).parameters(recurse=False)}
    for p in module.parameters():
        p.requires_grad_(id(p) in head)


def clip_weights(module: nn.Module, clip: float) -> None:
    """The clipped WGAN's projection after each critic update: every trainable weight into
    [-clip, clip] (a frozen layer, :func:`train_only_head`, stays exactly as it was)."""
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.clamp_(-clip, clip)


# ---------------------------------------------------------------------------
# Discriminator update
#   objective: min_D  L_D(D(real), D(fake))             (losses.discriminator_loss)
#              + gp_weight * GP(D, real, fake)          (wgan-gp only)
#              + L_neg(D(negatives))                    (only when negatives are given:
#                                                        real images that are not D's data)
#   then, for wgan only, project the weights onto [-clip, clip].
# ---------------------------------------------------------------------------
def discriminator_step(
    D: nn.Module,
    opt: torch.optim.Optimizer,
    real: Tensor,
    fake: Tensor,
    kind: str,
    *,
    clip: float = WGAN_CLIP,
    gp_weight: float = GP_WEIGHT,
    negatives: Tensor | None = None,
) -> dict[str, float]:
    """One optimizer update of ``D`` on ``real`` and ``fake.detach()``.

    Real and fake samples go through ``D`` in two separate forward passes, so
    that BatchNorm sees homogeneous batches (DCGAN practice).

    ``negatives`` (bce / hinge only): real images that are *not* D's data, e.g. the
    PrivacyGAN server's own images of every class (run config ``server-negatives``). They go
    through ``D`` in a third forward pass and add :func:`losses.negative_loss` to the
    objective, so D learns to reject realistic images unlike its data, not only fakes;
    the statistics then add ``d_neg_acc`` (the share of negatives scored below 0).

    Returns Python floats: ``d_loss`` (the full minimised objective, penalty
    included), ``d_real_out`` / ``d_fake_out`` (mean raw outputs) and
    ``d_real_acc`` / ``d_fake_acc``: the fraction of real outputs above and of
    fake outputs below a threshold ``t``. ``t = 0`` for bce / hinge; for the
    Wasserstein critics, whose outputs have no fixed origin, ``t`` is the
    midpoint of the mean real and mean fake outputs.
    """
    check_loss_kind(kind)
    fake = fake.detach()
    opt.zero_grad(set_to_none=True)
    real_out = D(real)
    fake_out = D(fake)
    loss = discriminator_loss(kind, real_out, fake_out)
    if kind == "wgan-gp":
        loss = loss + gp_weight * gradient_penalty(D, real, fake)
    neg_out = None
    if negatives is not None:
        neg_out = D(negatives)
        loss = loss + negative_loss(kind, neg_out)
    loss.backward()
    opt.step()
    if kind == "wgan":
        clip_weights(D, clip)

    with torch.no_grad():
        real_out = real_out.detach()
        fake_out = fake_out.detach()
        real_mean = real_out.mean()
        fake_mean = fake_out.mean()
        if kind in ("wgan", "wgan-gp"):
            t = 0.5 * (real_mean + fake_mean)
        else:
            t = torch.zeros((), dtype=real_out.dtype, device=real_out.device)
        stats = {
            "d_loss": float(loss.detach()),
            "d_real_acc": float((real_out > t).float().mean()),
            "d_fake_acc": float((fake_out < t).float().mean()),
            "d_real_out": float(real_mean),
            "d_fake_out": float(fake_mean),
        }
        if neg_out is not None:
            stats["d_neg_acc"] = float((neg_out.detach() < t).float().mean())
        return stats


# ---------------------------------------------------------------------------
# Generator feedback (discriminator side)
#   objective: L_G(D(x)) on generated samples x (losses.generator_loss);
#   we return the labels D(x) and the feedback dL_G/dx, never touching D.grad.
# ---------------------------------------------------------------------------
def generator_feedback(
    D: nn.Module,
    fake: Tensor,
    kind: str,
    *,
    keep_buffers: bool = False,
) -> tuple[Tensor, Tensor]:
    """Return ``(labels, feedback)`` for a batch of generated samples.

    ``labels`` is ``D(fake)`` detached, shape (B,); ``feedback`` is
    ``d generator_loss(kind, D(fake)) / d fake``, detached, with the shape of
    ``fake``. The gradient is taken with respect to a private copy of the
    input only, so ``D``'s parameter ``.grad`` fields are not touched and
    ``fake`` need not require grad.

    With ``keep_buffers=True`` the forward pass runs through
    :func:`torch.func.functional_call` on cloned buffers: in train mode the
    outputs are the usual batch-statistics ones, but ``D``'s own running
    statistics and ``num_batches_tracked`` stay exactly as they were. This is
    how a frozen teacher discriminator is queried. ``D``'s train / eval mode
    is left to the caller.
    """
    check_loss_kind(kind)
    x = fake.detach().clone().requires_grad_(True)
    with torch.enable_grad():
        if keep_buffers:
            out = forward_keeping_buffers(D, x)
        else:
            out = D(x)
        loss = generator_loss(kind, out)
        (grad,) = torch.autograd.grad(loss, x)
    return out.detach(), grad.detach()


# ---------------------------------------------------------------------------
# Generator update from feedback (generator side)
#   objective: the same L_G, reached through the chain rule
#   dL_G/dtheta = sum_x feedback(x) * dx/dtheta   with x = G(z).
# ---------------------------------------------------------------------------
def apply_feedback(
    G: nn.Module,
    opt: torch.optim.Optimizer,
    z: Tensor,
    feedback: Tensor,
) -> None:
    """Back-propagate ``feedback`` (= dL/dG(z)) through ``G`` and step ``opt``.

    ``z`` must be the latent batch that produced the samples the feedback
    was computed on; ``feedback`` must have the shape of ``G(z)``.
    """
    opt.zero_grad(set_to_none=True)
    x = G(z)
    if x.shape != feedback.shape:
        raise ValueError(
            f"feedback shape {tuple(feedback.shape)} does not match G(z) shape {tuple(x.shape)}"
        )
    x.backward(feedback.to(device=x.device, dtype=x.dtype))
    opt.step()


# ---------------------------------------------------------------------------
# Joint local / teacher feedback (thesis Eq. 5.9, JRLF)
#   objective: L = alpha * L_local + beta * L_teacher,  beta = 1 - alpha
#   gradient:  dL/dx = alpha * f_local + beta * f_teacher
# ---------------------------------------------------------------------------
def jrlf_feedback(
    local_feedback: Tensor,
    teacher_feedback: Tensor | None,
    alpha: float,
) -> Tensor:
    """Combine local and teacher feedback according to thesis Eq. 5.9.

    ``alpha`` must lie in (0, 1]. For ``alpha == 1`` the local feedback is
    returned unchanged (no ``0 * teacher`` term, so a NaN/inf or missing
    teacher cannot leak in) and ``teacher_feedback`` may be ``None``.
    """
    alpha = float(alpha)
    if not (0.0 < alpha <= 1.0):
        raise ValueError(f"alpha must be in (0, 1], got {alpha!r}")
    if alpha == 1.0:
        return local_feedback
    if teacher_feedback is None:
        raise ValueError("teacher_feedback is required when alpha < 1")
    if teacher_feedback.shape != local_feedback.shape:
        raise ValueError(
            f"teacher feedback shape {tuple(teacher_feedback.shape)} differs from "
            f"local feedback shape {tuple(local_feedback.shape)}"
        )
    beta = 1.0 - alpha
    return alpha * local_feedback + beta * teacher_feedback


# ---------------------------------------------------------------------------
# PrivacyGAN student update (server side, thesis Eq. 5.9)
#   objective: alpha * L_G(D_i(G_i(z))) + (1 - alpha) * L_G(D_T(G_i(z)))
#   with the client's feedback f_i standing in for dL_G(D_i(x))/dx.
# ---------------------------------------------------------------------------
def student_update(G: nn.Module, opt: torch.optim.Optimizer, z: torch.Tensor, local_feedback: torch.Tensor,
                   teacher_d: nn.Module | None, alpha: float, loss: str) -> dict[str, float]:
    """One JRLF step of a student generator (thesis Eq. 5.9) from a client's feedback.

    ``local_feedback`` is ∂L_G(D_i(x̃))/∂x̃ as the client computed it; the teacher's
    part ∂L_G(D_T(x̃))/∂x̃ is computed here on the frozen D_T (its buffers untouched).
    The combined gradient α·f_i + (1−α)·f_T goes through G_i in one backward pass.
    Returns the teacher's generator loss on x̃ (NaN when α = 1, where it is unused).
    """
    x = G(z)
    teacher_loss = float("nan")
    teacher_feedback = None
    if alpha < 1.0:
        if teacher_d is None:
            raise ValueError("alpha < 1 needs a teacher discriminator")
        labels_t, teacher_feedback = generator_feedback(teacher_d, x.detach(), loss, keep_buffers=True)
        teacher_loss = float(generator_loss(loss, labels_t))
    grad = jrlf_feedback(local_feedback.to(x.device), teacher_feedback, alpha)
    opt.zero_grad(set_to_none=True)
    x.backward(grad)
    opt.step()
    return {"g_loss_teacher": teacher_loss}



# ---------------------------------------------------------------------------
# Centralised generator update
#   objective: min_G  L_G(D(G(z)))    (gradients taken w.r.t. G's parameters
#   only, so D's .grad fields are left as they were)
# ---------------------------------------------------------------------------
def generator_step(
    G: nn.Module,
    opt: torch.optim.Optimizer,
    D: nn.Module,
    z: Tensor,
    kind: str,
) -> float:
    """One plain generator update through ``D``; returns the loss value."""
    check_loss_kind(kind)
    opt.zero_grad(set_to_none=True)
    params = [p for p in G.parameters() if p.requires_grad]
    loss = generator_loss(kind, D(G(z)))
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    for p, g in zip(params, grads):
        if g is not None:
            p.grad = g
    opt.step()
    return float(loss.detach())


# ---------------------------------------------------------------------------
# Full centralised GAN iteration: d_steps discriminator updates on the same
# real batch (fresh z each time), then one generator update.
# ---------------------------------------------------------------------------
def train_gan_step(
    G: nn.Module,
    D: nn.Module,
    opt_g: torch.optim.Optimizer,
    opt_d: torch.optim.Optimizer,
    real: Tensor,
    *,
    kind: str,
    d_steps: int = 1,
    generator: torch.Generator | None = None,
) -> dict[str, float]:
    """Run ``d_steps`` discriminator updates and one generator update.

    Latent codes are drawn with ``generator`` (if given) on ``real.device``.
    Returns the discriminator statistics averaged over the ``d_steps``
    updates plus ``g_loss``.
    """
    check_loss_kind(kind)
    if d_steps < 1:
        raise ValueError(f"d_steps must be >= 1, got {d_steps!r}")
    batch = real.shape[0]
    totals: dict[str, float] = {}
    for _ in range(d_steps):
        z = sample_latent(batch, G.latent_dim, generator=generator, device=real.device)
        with torch.no_grad():
            fake = G(z)
        stats = discriminator_step(D, opt_d, real, fake, kind)
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    result = {key: value / d_steps for key, value in totals.items()}
    z = sample_latent(batch, G.latent_dim, generator=generator, device=real.device)
    result["g_loss"] = generator_step(G, opt_g, D, z, kind)
    return result


__all__ = [
    "apply_feedback",
    "discriminator_step",
    "forward_keeping_buffers",
    "generator_feedback",
    "generator_step",
    "jrlf_feedback",
    "sample_latent",
    "student_update",
    "train_gan_step",
]
