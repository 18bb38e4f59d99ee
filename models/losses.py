"""Adversarial objectives, the WGAN-GP penalty and the matching optimizers.

All discriminator / critic outputs are raw scores (no sigmoid). Every loss
is a mean over the batch.

* ``"bce"``     - standard GAN (Goodfellow et al., 2014) with the
  non-saturating generator loss -log sigma(D(G(z))).
* ``"wgan"``    - Wasserstein GAN with weight clipping (Arjovsky et al., 2017).
* ``"wgan-gp"`` - Wasserstein GAN with gradient penalty (Gulrajani et al., 2017).
* ``"hinge"``   - hinge loss (Lim & Ye, 2017; Miyato et al., 2018).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LOSS_KINDS = ("bce", "wgan", "wgan-gp", "hinge")

#: Weight-clipping bound of the original WGAN critic.
WGAN_CLIP = 0.01
#: Penalty coefficient lambda of WGAN-GP.
GP_WEIGHT = 10.0


def check_loss_kind(kind: str) -> str:
    """Return ``kind`` unchanged, or raise ValueError if it is not a known loss."""
    if kind not in LOSS_KINDS:
        raise ValueError(f"unknown loss kind {kind!r}; expected one of {LOSS_KINDS}")
    return kind


def generator_loss(kind: str, fake_out: Tensor) -> Tensor:
    """Generator objective given the discriminator's raw outputs on fakes.

    bce: mean of -log sigma(o) = softplus(-o) (non-saturating, numerically
    stable); wgan / wgan-gp / hinge: -mean(o).
    """
    check_loss_kind(kind)
    if kind == "bce":
        return F.softplus(-fake_out).mean()
    return -fake_out.mean()


def discriminator_loss(kind: str, real_out: Tensor, fake_out: Tensor) -> Tensor:
    """Discriminator / critic objective (to be minimised).

    bce:          softplus(-real).mean() + softplus(fake).mean()
                  (= binary cross-entropy with targets 1 for real, 0 for fake)
    wgan/wgan-gp: fake.mean() - real.mean() (negated Wasserstein estimate;
                  the gradient penalty is added separately)
    hinge:        relu(1 - real).mean() + relu(1 + fake).mean()
    """
    check_loss_kind(kind)
    if kind == "bce":
        return F.softplus(-real_out).mean() + F.softplus(fake_out).mean()
    if kind == "hinge":
        return F.relu(1.0 - real_out).mean() + F.relu(1.0 + fake_out).mean()
    return fake_out.mean() - real_out.mean()


#: the losses whose fake half is a per-sample "this is not data" term (:func:`negative_loss`)
NEGATIVE_LOSSES = ("bce", "hinge")


def negative_loss(kind: str, neg_out: Tensor) -> Tensor:
    """The fake half of :func:`discriminator_loss` on *negatives*: real images that are not the
    discriminator's data (PrivacyGAN's ``server-negatives``, issue #17), to be minimised.

    bce:   softplus(neg).mean()   (binary cross-entropy with target 0)
    hinge: relu(1 + neg).mean()
    Not defined for the Wasserstein critics, whose fake term has no per-sample target.
    """
    check_loss_kind(kind)
    if kind == "bce":
        return F.softplus(neg_out).mean()
    if kind == "hinge":
        return F.relu(1.0 + neg_out).mean()
    raise ValueError(f"negatives need a loss in {NEGATIVE_LOSSES}, got {kind!r}")


def gradient_penalty(D: nn.Module, real: Tensor, fake: Tensor) -> Tensor:
    """WGAN-GP penalty E[(||grad_x D(x_hat)||_2 - 1)^2].

    ``x_hat = eps * real + (1 - eps) * fake`` with one ``eps ~ U[0, 1]`` per
    sample. The graph is kept (``create_graph=True``) so the penalty can be
    differentiated with respect to the critic's parameters.
    """
    if real.shape != fake.shape:
        raise ValueError(f"real {tuple(real.shape)} and fake {tuple(fake.shape)} differ in shape")
    eps_shape = (real.shape[0],) + (1,) * (real.dim() - 1)
    eps = torch.rand(eps_shape, device=real.device, dtype=real.dtype)
    x_hat = (eps * real.detach() + (1.0 - eps) * fake.detach()).requires_grad_(True)
    with torch.enable_grad():
        out = D(x_hat)
        (grad,) = torch.autograd.grad(out.sum(), x_hat, create_graph=True)
    norms = grad.flatten(1).norm(2, dim=1)
    return ((norms - 1.0) ** 2).mean()


def make_optimizer(
    loss: str,
    params: Iterable[Tensor],
    lr: float,
    betas: tuple[float, float] = (0.5, 0.999),
) -> torch.optim.Optimizer:
    """Optimizer conventionally paired with ``loss``.

    ``"wgan"`` uses RMSprop, as recommended in the WGAN paper (momentum-based
    methods were reported to destabilise the clipped critic); every other
    loss uses Adam with ``betas`` (DCGAN default (0.5, 0.999)).
    """
    check_loss_kind(loss)
    if loss == "wgan":
        return torch.optim.RMSprop(params, lr=lr)
    return torch.optim.Adam(params, lr=lr, betas=betas)


__all__ = [
    "GP_WEIGHT",
    "LOSS_KINDS",
    "NEGATIVE_LOSSES",
    "WGAN_CLIP",
    "check_loss_kind",
    "discriminator_loss",
    "generator_loss",
    "gradient_penalty",
    "make_optimizer",
    "negative_loss",
]
