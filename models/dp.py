"""Differentially private discriminator updates (DP-SGD) and their privacy accounting.

What is protected: every gradient a client computes on its *real* records. A discriminator
step's objective is the sum of a real-data term and a fake-data term,

    L_D = E_real[l_r(D(x))] + E_fake[l_f(D(x~))]
          bce : l_r(o) = softplus(-o) (= -log sigma(o)),  l_f(o) = softplus(o)
          wgan: l_r(o) = -o,                               l_f(o) = o

and only the real term touches private data. DP-SGD (Abadi et al., 2016) on that term:

1. Poisson sampling: each of the client's n records joins the batch independently with
   probability q = batch_size / n (:func:`poisson_sample`; an empty draw is allowed);
2. per-example gradients g_i = grad_theta l_r(D(x_i)) over all of D's parameters jointly;
3. clipping: g_i <- g_i * min(1, C / ||g_i||_2);
4. sum, add Gaussian noise N(0, sigma^2 C^2) per coordinate, divide by the *expected* batch
   size q*n (the standard estimator under Poisson sampling);
5. add the gradient of the fake term (mean over the fakes) and, with PrivacyGAN's
   ``server-negatives``, of the negative term (the server's own images with target "fake",
   :func:`models.losses.negative_loss`): ordinary and unclipped by default; with
   ``clip_public`` (run config ``dp-clip-fakes``) each fake's and negative's own gradient is
   clipped to the same bound C too — no noise and not counted, only so that the public terms
   pull on D at the scale of the clipped real term (:func:`public_gradient`).

Step 5 depends only on the current D (itself the output of earlier private steps) and on
inputs the server chose or a generator produced, never on a real record, so the whole step
is post-processing of the Gaussian mechanism of steps 1-4: its (epsilon, delta) are those
of the sampled Gaussian mechanism, counted by opacus's RDP accountant (:class:`DPAccount`).
The same holds for every generator update and everything a server receives from a DP-trained
D (labels, feedback, weights): post-processing.

Why the per-example gradients are done by hand with ``torch.func`` (functional_call + vmap +
grad) and not with opacus's GradSampleModule / PrivacyEngine: opacus wraps an ``nn.Module``
and its optimizer for *one* loss over *one* batch and clips and noises everything that flows
into ``.grad``. Here a discriminator step mixes a private real-data term with a fake term that
must be neither clipped nor counted, and some strategies (data-parallel, BPGAN's
discriminator nodes) send the gradient to a server instead of stepping an optimizer. So the
clipping and noising are done here explicitly; the *accounting* is opacus's.

Per-example gradients are meaningless when a batch's samples are coupled, so a discriminator
with BatchNorm is refused (:func:`check_dp_module`); use GroupNorm ("layer") or no norm.
Only the losses whose real term is a per-example sum without a penalty are supported
(:data:`DP_LOSSES`): WGAN-GP's gradient penalty mixes real and fake samples per example and
is refused. Pure PyTorch (plus opacus's accountant): no Flower here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from .losses import WGAN_CLIP, check_loss_kind, negative_loss
from .steps import clip_weights, generator_step, sample_latent

#: Losses whose discriminator objective DP-SGD supports (real term = a per-example sum).
DP_LOSSES = ("bce", "wgan")
#: A derived noise multiplier above this is treated as "the target epsilon is unreachable".
MAX_NOISE_MULTIPLIER = 100.0
# Renyi orders the accountant minimises over: opacus's defaults (1.1 ... 63) and larger ones. A
# large sigma over few steps has its best order above 63 (sigma 100, q 0.27, 2-30 steps: 136-832),
# where opacus's defaults would overstate epsilon and warn "Optimal order is the largest alpha";
# wherever the best order is <= 63 (the README's DP cells: 3.4-18) epsilon is unchanged.
EXTRA_RDP_ORDERS = [float(a) for a in range(64, 256, 8)] + [float(a) for a in range(256, 2049, 64)]


def rdp_orders() -> list[float]:
    """opacus's default orders and :data:`EXTRA_RDP_ORDERS` (opacus is imported here, not at module
    level: it takes ~4 s)."""
    from opacus.accountants import RDPAccountant

    return list(RDPAccountant.DEFAULT_ALPHAS) + EXTRA_RDP_ORDERS


@dataclass(frozen=True)
class DPConfig:
    """A run's DP settings as a client needs them.

    ``target_epsilon`` > 0: the noise multiplier is derived (per client, from its own sample
    rate) so that ``planned_steps`` DP steps reach exactly that epsilon at ``delta``, and
    ``noise_multiplier`` is ignored; the client stops training once its next step would
    exceed the target.
    """

    noise_multiplier: float = 1.0
    max_grad_norm: float = 1.0
    delta: float = 1e-5
    target_epsilon: float = 0.0
    planned_steps: int = 0
    clip_public: bool = False   # clip the fakes' (and negatives') per-example gradients to C as well


# ---------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------
def check_dp_loss(kind: str) -> str:
    """``kind`` unchanged, or a ValueError: DP-SGD needs a per-example real-data term."""
    check_loss_kind(kind)
    if kind not in DP_LOSSES:
        why = ("its gradient penalty couples real and fake samples and is not a per-example sum"
               if kind == "wgan-gp" else "its DP real-data term is not implemented")
        raise ValueError(f"DP training does not support loss {kind!r} ({why}); use one of {DP_LOSSES}")
    return kind


def check_dp_module(D: nn.Module) -> None:
    """ValueError when ``D`` has a BatchNorm layer (per-example gradients need per-sample nets)."""
    for name, m in D.named_modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            raise ValueError(f"DP training needs a discriminator without BatchNorm (per-example gradients are "
                             f"meaningless when a batch's samples are coupled); found {type(m).__name__} at "
                             f"'{name}': build it with norm 'layer' (GroupNorm) or 'none'")


def sample_rate(batch_size: int, n: int) -> float:
    """Poisson sample rate q = batch_size / n (capped at 1)."""
    if n < 1:
        raise ValueError(f"a DP client needs at least one record, got n = {n}")
    return min(1.0, float(batch_size) / float(n))


# ---------------------------------------------------------------------------
# Poisson sampling
# ---------------------------------------------------------------------------
def poisson_sample(n: int, q: float, generator: torch.Generator | None = None) -> Tensor:
    """Indices of a Poisson-sampled batch: each of ``n`` records is included independently
    with probability ``q``. May be empty (the DP step then adds noise only)."""
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sample rate must be in (0, 1], got {q!r}")
    mask = torch.rand(n, generator=generator) < q
    return mask.nonzero(as_tuple=False).flatten()


# ---------------------------------------------------------------------------
# Per-example gradients of the real term, clipped
# ---------------------------------------------------------------------------
def real_term(kind: str, out: Tensor) -> Tensor:
    """Per-example real-data loss of the discriminator for raw outputs ``out``."""
    check_dp_loss(kind)
    if kind == "bce":
        return F.softplus(-out)
    return -out


def fake_term(kind: str, out: Tensor) -> Tensor:
    """Mean fake-data loss of the discriminator for raw outputs ``out``."""
    check_dp_loss(kind)
    if kind == "bce":
        return F.softplus(out).mean()
    return out.mean()


def _trainable(D: nn.Module) -> dict[str, Tensor]:
    return {k: p.detach() for k, p in D.named_parameters() if p.requires_grad}


def per_example_grads(D: nn.Module, real: Tensor, kind: str,
                      term: Callable[[str, Tensor], Tensor] | None = None) -> dict[str, Tensor]:
    """{parameter name: (B, *shape)} gradients of ``term(kind, D(x_i))`` per example (default
    :func:`real_term`), by ``torch.func`` (each example through D alone; D's buffers are read,
    not updated)."""
    check_dp_loss(kind)
    check_dp_module(D)
    term = real_term if term is None else term
    params = _trainable(D)
    buffers = {k: b.detach() for k, b in D.named_buffers()}

    def loss_one(p: dict[str, Tensor], x: Tensor) -> Tensor:
        out = functional_call(D, (p, buffers), (x.unsqueeze(0),))
        return term(kind, out).sum()

    return vmap(grad(loss_one), in_dims=(None, 0), randomness="different")(params, real)


def clip_per_example(grads: dict[str, Tensor], max_norm: float) -> tuple[dict[str, Tensor], Tensor]:
    """Scale each example's gradient (over all parameters jointly) to L2 norm <= ``max_norm``;
    gradients already within the bound are left exactly as they are. Returns the clipped
    gradients and the per-example norms before clipping."""
    if max_norm <= 0:
        raise ValueError(f"max_grad_norm must be > 0, got {max_norm!r}")
    first = next(iter(grads.values()))
    if first.shape[0] == 0:
        return grads, first.new_zeros(0)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factor = torch.where(norms > max_norm, max_norm / norms.clamp_min(1e-12), torch.ones_like(norms))
    return {k: g * factor.view(-1, *([1] * (g.dim() - 1))) for k, g in grads.items()}, norms


def private_real_gradient(D: nn.Module, real: Tensor, kind: str, *, expected_batch: float,
                          noise_multiplier: float, max_grad_norm: float,
                          noise_generator: torch.Generator | None = None) -> dict[str, Tensor]:
    """The Gaussian mechanism on the real term: (sum_i clip_C(g_i) + N(0, sigma^2 C^2)) / (q n).

    ``real`` may hold zero rows (an empty Poisson draw): the result is then noise only.
    """
    if expected_batch <= 0:
        raise ValueError(f"expected batch size must be > 0, got {expected_batch!r}")
    if noise_multiplier < 0:
        raise ValueError(f"noise multiplier must be >= 0, got {noise_multiplier!r}")
    params = _trainable(D)
    if real.shape[0] > 0:
        clipped, _ = clip_per_example(per_example_grads(D, real, kind), max_grad_norm)
        summed = {k: g.sum(0) for k, g in clipped.items()}
    else:
        check_dp_loss(kind)
        check_dp_module(D)
        summed = {k: torch.zeros_like(p) for k, p in params.items()}
    std = float(noise_multiplier) * float(max_grad_norm)
    out = {}
    for k, s in summed.items():
        if std > 0:
            noise = torch.normal(0.0, std, size=tuple(s.shape), generator=noise_generator,
                                 device=noise_generator.device if noise_generator is not None else s.device)
            s = s + noise.to(device=s.device, dtype=s.dtype)
        out[k] = s / float(expected_batch)
    return out


def public_gradient(D: nn.Module, images: Tensor, kind: str, term: Callable[[str, Tensor], Tensor],
                    max_grad_norm: float) -> dict[str, Tensor]:
    """The mean over ``images`` of each image's gradient of ``term(kind, D(image))`` clipped to
    L2 norm ``max_grad_norm`` — the public terms' counterpart of the real term's clipping, with
    no noise: the images are fakes or the server's own, so nothing here is counted. Without it a
    fake's gradient is not bounded by C while every real record's is, and under DP's noise D
    settles on "everything is fake" (``d_real_acc`` 0; docs/PRIVACY.md "Clipped fakes and a
    faster D_i", which also shows that the students' gain comes from ``client-disc-lr``)."""
    clipped, _ = clip_per_example(per_example_grads(D, images.detach(), kind, term), max_grad_norm)
    return {k: g.mean(0) for k, g in clipped.items()}


# ---------------------------------------------------------------------------
# The DP discriminator gradient / step
# ---------------------------------------------------------------------------
def _stats(kind: str, real_out: Tensor, fake_out: Tensor, loss: float,
           neg_out: Tensor | None = None) -> dict[str, float]:
    """The statistics of :func:`models.steps.discriminator_step`; an empty real batch reports
    0 for its real-side numbers (they must stay finite on the wire)."""
    with torch.no_grad():
        fake_mean = fake_out.mean()
        real_mean = real_out.mean() if real_out.numel() else fake_mean.new_zeros(())
        if kind == "wgan":
            t = 0.5 * (real_mean + fake_mean) if real_out.numel() else fake_mean
        else:
            t = torch.zeros((), dtype=fake_out.dtype, device=fake_out.device)
        stats = {"d_loss": float(loss),
                 "d_real_acc": float((real_out > t).float().mean()) if real_out.numel() else 0.0,
                 "d_fake_acc": float((fake_out < t).float().mean()),
                 "d_real_out": float(real_mean), "d_fake_out": float(fake_mean)}
        if neg_out is not None:
            stats["d_neg_acc"] = float((neg_out < t).float().mean())
        return stats


def dp_discriminator_gradient(D: nn.Module, real: Tensor, fake: Tensor, kind: str, *, expected_batch: float,
                              noise_multiplier: float, max_grad_norm: float,
                              noise_generator: torch.Generator | None = None,
                              negatives: Tensor | None = None,
                              clip_public: bool = False) -> tuple[dict[str, Tensor], dict[str, float]]:
    """DP gradient of the discriminator objective: the private real term
    (:func:`private_real_gradient`) plus the gradient of the fake term (post-processing).

    ``negatives`` (bce only under DP): public images that are not the client's, e.g. PrivacyGAN's
    ``server-negatives``; their term :func:`models.losses.negative_loss` is added like the fake
    term (it reads no real record), and the stats then add ``d_neg_acc``.

    ``clip_public``: the fake (and negative) term's gradient is the mean of per-image gradients
    each clipped to ``max_grad_norm`` (:func:`public_gradient`) instead of the plain mean — the
    same objective's gradient on the real term's scale; still no noise and not counted.

    Returns ``({parameter name: gradient}, stats)`` with the keys of
    :func:`models.steps.discriminator_step` (``d_loss`` is the non-private objective value on
    the drawn batch, for monitoring). ``D``'s ``.grad`` fields are not touched.
    """
    check_dp_loss(kind)
    check_dp_module(D)
    grads = private_real_gradient(D, real, kind, expected_batch=expected_batch, noise_multiplier=noise_multiplier,
                                  max_grad_norm=max_grad_norm, noise_generator=noise_generator)
    named = [(k, p) for k, p in D.named_parameters() if p.requires_grad]
    with torch.set_grad_enabled(not clip_public):
        fake_out = D(fake.detach())
        f_loss = fake_term(kind, fake_out)
        neg_out = None
        if negatives is not None:
            # --- public negative term: min_D negative_loss(D(negatives)) ---
            neg_out = D(negatives.detach())
            f_loss = f_loss + negative_loss(kind, neg_out)
    if clip_public:
        # --- public terms, each image's gradient clipped to C like a real record's (no noise) ---
        public = [public_gradient(D, fake, kind, fake_term, max_grad_norm)]
        if negatives is not None:
            public.append(public_gradient(D, negatives, kind, negative_loss, max_grad_norm))
        f_grads = [sum(part[k] for part in public) for k, _ in named]   # same keys: D's trainable parameters
    else:
        f_grads = torch.autograd.grad(f_loss, [p for _, p in named], allow_unused=True)
    for (k, p), g in zip(named, f_grads):
        if g is not None:
            grads[k] = grads[k] + g.detach()
    with torch.no_grad():
        real_out = D(real) if real.shape[0] > 0 else fake_out.new_zeros(0)
        r_loss = float(real_term(kind, real_out).mean()) if real_out.numel() else 0.0
    return grads, _stats(kind, real_out, fake_out.detach(), r_loss + float(f_loss.detach()),
                         neg_out.detach() if neg_out is not None else None)


def fill_dp_grad(D: nn.Module, real: Tensor, fake: Tensor, kind: str, **dp) -> dict[str, float]:
    """Set every trainable parameter's ``.grad`` to the DP gradient (see
    :func:`dp_discriminator_gradient`, whose keyword arguments ``dp`` are) and return the stats."""
    grads, stats = dp_discriminator_gradient(D, real, fake, kind, **dp)
    for k, p in D.named_parameters():
        if k in grads:
            p.grad = grads[k].to(dtype=p.dtype)
    return stats


def dp_discriminator_step(D: nn.Module, opt: torch.optim.Optimizer, real: Tensor, fake: Tensor, kind: str, *,
                          expected_batch: float, noise_multiplier: float, max_grad_norm: float,
                          noise_generator: torch.Generator | None = None, clip: float = WGAN_CLIP,
                          negatives: Tensor | None = None, clip_public: bool = False) -> dict[str, float]:
    """The DP counterpart of :func:`models.steps.discriminator_step`: one optimizer update of
    ``D`` with the DP gradient (then, for ``wgan``, the usual weight clipping — post-processing).
    Same stats dict: ``d_loss``, ``d_real_acc``, ``d_fake_acc``, ``d_real_out``, ``d_fake_out``
    (+ ``d_neg_acc`` with ``negatives``, see :func:`dp_discriminator_gradient`)."""
    opt.zero_grad(set_to_none=True)
    stats = fill_dp_grad(D, real, fake, kind, expected_batch=expected_batch, noise_multiplier=noise_multiplier,
                         max_grad_norm=max_grad_norm, noise_generator=noise_generator, negatives=negatives,
                         clip_public=clip_public)
    opt.step()
    if kind == "wgan":
        clip_weights(D, clip)
    return stats


def dp_train_gan_step(G: nn.Module, D: nn.Module, opt_g: torch.optim.Optimizer, opt_d: torch.optim.Optimizer,
                      draw_real: Callable[[], Tensor], *, kind: str, batch_size: int, d_steps: int = 1,
                      expected_batch: float, noise_multiplier: float, max_grad_norm: float,
                      generator: torch.Generator | None = None,
                      noise_generator: torch.Generator | None = None,
                      on_d_step: Callable[[], None] | None = None, clip_public: bool = False) -> dict[str, float]:
    """The DP counterpart of :func:`models.steps.train_gan_step`: ``d_steps`` DP discriminator
    steps, each on a fresh Poisson batch from ``draw_real()`` and ``batch_size`` fakes
    (``on_d_step`` is called after each, e.g. to step the accountant), then one ordinary
    generator step (it never touches real data: post-processing)."""
    if d_steps < 1:
        raise ValueError(f"d_steps must be >= 1, got {d_steps!r}")
    device = next(D.parameters()).device
    totals: dict[str, float] = {}
    for _ in range(d_steps):
        real = draw_real()
        z = sample_latent(batch_size, G.latent_dim, generator=generator, device=device)
        with torch.no_grad():
            fake = G(z)
        stats = dp_discriminator_step(D, opt_d, real, fake, kind, expected_batch=expected_batch,
                                      noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
                                      noise_generator=noise_generator, clip_public=clip_public)
        if on_d_step is not None:
            on_d_step()
        for key, value in stats.items():
            totals[key] = totals.get(key, 0.0) + value
    result = {key: value / d_steps for key, value in totals.items()}
    z = sample_latent(batch_size, G.latent_dim, generator=generator, device=device)
    result["g_loss"] = generator_step(G, opt_g, D, z, kind)
    return result


# ---------------------------------------------------------------------------
# Accounting (opacus's RDP accountant)
# ---------------------------------------------------------------------------
class DPAccount:
    """A client's privacy ledger: opacus ``RDPAccountant`` history of (sigma, q, steps) runs.

    Serialises to plain lists (:meth:`to_plain` / :meth:`from_plain`) so a Flower
    ConfigRecord can keep it in ``context.state`` between rounds.
    """

    def __init__(self, history: list[tuple[float, float, int]] | None = None) -> None:
        self.history: list[tuple[float, float, int]] = [(float(s), float(q), int(n)) for s, q, n in (history or [])]

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        """Count ``steps`` steps at (sigma, q), merged into the last run when equal (as
        ``RDPAccountant.step`` does one step at a time)."""
        sigma, q, steps = float(noise_multiplier), float(sample_rate), int(steps)
        if steps < 1:
            return
        if self.history and self.history[-1][:2] == (sigma, q):
            self.history[-1] = (sigma, q, self.history[-1][2] + steps)
        else:
            self.history.append((sigma, q, steps))

    @property
    def steps(self) -> int:
        return sum(n for _, _, n in self.history)

    @staticmethod
    def _accountant(history):
        from opacus.accountants import RDPAccountant

        acc = RDPAccountant()
        acc.history = list(history)
        return acc

    def epsilon(self, delta: float) -> float:
        """epsilon at ``delta`` over all steps so far (0 before the first step)."""
        if not self.history:
            return 0.0
        return float(self._accountant(self.history).get_epsilon(delta=float(delta), alphas=rdp_orders()))

    def would_exceed(self, target_eps: float, delta: float, steps_more: int = 1, *,
                     noise_multiplier: float | None = None, sample_rate: float | None = None) -> bool:
        """Whether ``steps_more`` further steps (at the given sigma / q, default: the last ones)
        would take epsilon above ``target_eps``. ``target_eps <= 0``: no target, never."""
        if target_eps <= 0 or steps_more <= 0:
            return False
        if noise_multiplier is None or sample_rate is None:
            if not self.history:
                raise ValueError("give noise_multiplier and sample_rate for an account without steps")
            noise_multiplier = self.history[-1][0] if noise_multiplier is None else noise_multiplier
            sample_rate = self.history[-1][1] if sample_rate is None else sample_rate
        future = DPAccount(self.history)
        future.history.append((float(noise_multiplier), float(sample_rate), int(steps_more)))
        return future.epsilon(delta) > target_eps

    @staticmethod
    def noise_for_target(target_eps: float, delta: float, q: float, planned_steps: int) -> float:
        """sigma so that ``planned_steps`` steps at rate ``q`` give ``target_eps`` at ``delta``
        (opacus ``get_noise_multiplier``); ValueError when unreachable (sigma would exceed
        :data:`MAX_NOISE_MULTIPLIER`)."""
        from opacus.accountants.utils import get_noise_multiplier

        if target_eps <= 0 or planned_steps < 1:
            raise ValueError(f"need target epsilon > 0 and planned steps >= 1, got {target_eps!r}, {planned_steps!r}")
        at_max = DPAccount([(MAX_NOISE_MULTIPLIER, float(q), int(planned_steps))]).epsilon(delta)
        if at_max > target_eps:   # fail fast: opacus would keep doubling sigma up to 1e6
            raise ValueError(f"target epsilon {target_eps} is unreachable for {planned_steps} steps at sample rate "
                             f"{q:.4g} and delta {delta:g}: even noise multiplier {MAX_NOISE_MULTIPLIER:g} gives "
                             f"epsilon {at_max:.3g}")
        try:
            sigma = float(get_noise_multiplier(target_epsilon=float(target_eps), target_delta=float(delta),
                                               sample_rate=float(q), steps=int(planned_steps), accountant="rdp",
                                               alphas=rdp_orders()))
        except ValueError as exc:
            raise ValueError(f"target epsilon {target_eps} is unreachable for {planned_steps} steps at sample rate "
                             f"{q:.4g} and delta {delta:g}: {exc}") from None
        if not math.isfinite(sigma) or sigma > MAX_NOISE_MULTIPLIER:
            raise ValueError(f"target epsilon {target_eps} is unreachable for {planned_steps} steps at sample rate "
                             f"{q:.4g} and delta {delta:g}: it needs noise multiplier {sigma:.3g} "
                             f"(> {MAX_NOISE_MULTIPLIER:g})")
        return sigma

    # --- plain values for a ConfigRecord ---------------------------------------------------
    def to_plain(self) -> dict[str, list]:
        return {"sigma": [s for s, _, _ in self.history], "q": [q for _, q, _ in self.history],
                "steps": [n for _, _, n in self.history]}

    @classmethod
    def from_plain(cls, plain) -> "DPAccount":
        sig, qs, ns = list(plain.get("sigma", [])), list(plain.get("q", [])), list(plain.get("steps", []))
        if not (len(sig) == len(qs) == len(ns)):
            raise ValueError("DP account: sigma, q and steps lists differ in length")
        return cls(list(zip(sig, qs, ns)))


__all__ = ["DPConfig", "DPAccount", "DP_LOSSES", "MAX_NOISE_MULTIPLIER", "EXTRA_RDP_ORDERS", "rdp_orders", "check_dp_loss", "check_dp_module",
           "sample_rate", "poisson_sample", "real_term", "fake_term", "per_example_grads", "clip_per_example",
           "private_real_gradient", "public_gradient", "dp_discriminator_gradient", "fill_dp_grad", "dp_discriminator_step",
           "dp_train_gan_step"]
