"""Build generators / discriminators from configuration values."""

from __future__ import annotations

from torch import nn

from .dcgan import DCGANDiscriminator, DCGANGenerator
from .losses import check_loss_kind
from .mlp import MLPDiscriminator, MLPGenerator

MODEL_KINDS = ("dcgan", "mlp")


def _check_kind(kind: str) -> None:
    if kind not in MODEL_KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {MODEL_KINDS}")


def build_generator(
    kind: str,
    *,
    latent_dim: int,
    channels: int,
    image_size: int,
    features: int,
    out_dim: int = 2,
) -> nn.Module:
    """Generator for ``kind``: ``"dcgan"`` (images) or ``"mlp"`` (vectors of
    size ``out_dim``, hidden width ``features``; channels/image_size unused)."""
    _check_kind(kind)
    if kind == "dcgan":
        return DCGANGenerator(
            latent_dim=latent_dim, channels=channels, image_size=image_size, features=features
        )
    return MLPGenerator(latent_dim=latent_dim, out_dim=out_dim, hidden=features)


def build_discriminator(
    kind: str,
    *,
    channels: int,
    image_size: int,
    features: int,
    loss: str,
    in_dim: int = 2,
    norm: str | None = None,
) -> nn.Module:
    """Discriminator / critic for ``kind``.

    For ``"dcgan"`` the normalisation depends on the loss: a WGAN-GP critic
    must not couple samples within a batch (the penalty is defined per
    sample), so it gets the per-sample ``"layer"`` norm; all other losses use
    BatchNorm. ``norm`` (``"batch"`` | ``"layer"`` (GroupNorm(1, C)) | ``"none"``) overrides
    that choice: DP training (models/dp.py) needs a discriminator without BatchNorm and asks for
    ``"layer"``. For ``"mlp"`` the hidden width is ``features`` (an MLP D has no normalisation).
    """
    _check_kind(kind)
    check_loss_kind(loss)
    if kind == "dcgan":
        if norm is None:
            norm = "layer" if loss == "wgan-gp" else "batch"
        return DCGANDiscriminator(
            channels=channels, image_size=image_size, features=features, norm=norm
        )
    return MLPDiscriminator(in_dim=in_dim, hidden=features)


__all__ = ["MODEL_KINDS", "build_discriminator", "build_generator"]
