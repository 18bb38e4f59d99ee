"""DCGAN generator and discriminator for small square images.

Architecture after Radford et al. (2016): strided (transposed) convolutions
with kernel 4, BatchNorm in the generator, LeakyReLU(0.2) in the
discriminator, Tanh on the generator output. The number of up/down sampling
stages follows the image side: a side of ``S`` needs ``log2(S / 4)`` stride-2
stages between the 4x4 feature map and the image.
"""

from __future__ import annotations

import math

from torch import Tensor, nn

ALLOWED_IMAGE_SIZES = (16, 32, 64)
ALLOWED_CHANNELS = (1, 3)
ALLOWED_NORMS = ("batch", "layer", "none")


def init_weights(module: nn.Module) -> None:
    """DCGAN weight initialisation, meant for ``model.apply(init_weights)``.

    Convolution, transposed convolution and linear weights are drawn from
    N(0, 0.02); affine weights of normalisation layers from N(1, 0.02); all
    biases are set to zero.
    """
    if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.BatchNorm1d)):
        if getattr(module, "weight", None) is not None:
            nn.init.normal_(module.weight, 1.0, 0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


def _num_stages(image_size: int) -> int:
    """Number of stride-2 stages between a 4x4 map and an ``image_size`` image."""
    if image_size not in ALLOWED_IMAGE_SIZES:
        raise ValueError(
            f"image_size must be one of {ALLOWED_IMAGE_SIZES}, got {image_size!r}"
        )
    return int(math.log2(image_size // 4))


def _check_channels(channels: int) -> None:
    if channels not in ALLOWED_CHANNELS:
        raise ValueError(f"channels must be one of {ALLOWED_CHANNELS}, got {channels!r}")


def _check_features(features: int) -> None:
    if not isinstance(features, int) or features < 1:
        raise ValueError(f"features must be a positive int, got {features!r}")


class DCGANGenerator(nn.Module):
    """Maps a latent vector ``z`` of shape (B, latent_dim) to images (B, C, S, S).

    Layout for ``n = log2(S / 4)`` stages and base width ``F``:
    z -> ConvT(latent_dim, F*2^(n-1), 4, 1, 0) -> 4x4, then ``n`` transposed
    convolutions (k=4, s=2, p=1) that halve the width and double the side; all
    but the last are followed by BatchNorm + ReLU, the last one outputs
    ``channels`` maps squashed into [-1, 1] by Tanh.
    """

    def __init__(
        self,
        latent_dim: int = 100,
        channels: int = 1,
        image_size: int = 16,
        features: int = 64,
    ) -> None:
        super().__init__()
        n = _num_stages(image_size)
        _check_channels(channels)
        _check_features(features)
        if latent_dim < 1:
            raise ValueError(f"latent_dim must be positive, got {latent_dim!r}")
        self.latent_dim = latent_dim
        self.channels = channels
        self.image_size = image_size

        width = features * 2 ** (n - 1)
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, width, 4, 1, 0, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        for _ in range(n - 1):
            layers += [
                nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False),
                nn.BatchNorm2d(width // 2),
                nn.ReLU(inplace=True),
            ]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, z: Tensor) -> Tensor:
        if z.dim() == 2:
            z = z.view(z.shape[0], z.shape[1], 1, 1)
        return self.net(z)


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(width)
    if norm == "layer":
        # One group over all channels: per-sample normalisation, no batch
        # coupling, as required for gradient-penalty critics.
        return nn.GroupNorm(1, width)
    return nn.Identity()


class DCGANDiscriminator(nn.Module):
    """Maps images (B, C, S, S) to raw scores of shape (B,) (no sigmoid).

    ``n = log2(S / 4)`` convolutions (k=4, s=2, p=1) with LeakyReLU(0.2)
    reduce the side to 4 while doubling the width from ``F``; every stage but
    the first is normalised according to ``norm``:

    * ``"batch"`` - BatchNorm2d (classic DCGAN),
    * ``"layer"`` - GroupNorm(1, C), a per-sample norm for WGAN-GP critics,
    * ``"none"``  - no normalisation.

    A final Conv(k=4, s=1, p=0) maps the 4x4 map to one logit / critic value.
    """

    def __init__(
        self,
        channels: int = 1,
        image_size: int = 16,
        features: int = 64,
        norm: str = "batch",
    ) -> None:
        super().__init__()
        n = _num_stages(image_size)
        _check_channels(channels)
        _check_features(features)
        if norm not in ALLOWED_NORMS:
            raise ValueError(f"norm must be one of {ALLOWED_NORMS}, got {norm!r}")
        self.channels = channels
        self.image_size = image_size
        self.norm = norm

        use_bias = norm == "none"
        layers: list[nn.Module] = [
            nn.Conv2d(channels, features, 4, 2, 1, bias=True),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width = features
        for _ in range(n - 1):
            layers += [
                nn.Conv2d(width, width * 2, 4, 2, 1, bias=use_bias),
                _norm_layer(norm, width * 2),
                nn.LeakyReLU(0.2, inplace=True),
            ]
            width *= 2
        layers.append(nn.Conv2d(width, 1, 4, 1, 0, bias=True))
        self.net = nn.Sequential(*layers)
        self.apply(init_weights)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x).view(x.shape[0])


__all__ = [
    "ALLOWED_CHANNELS",
    "ALLOWED_IMAGE_SIZES",
    "ALLOWED_NORMS",
    "DCGANDiscriminator",
    "DCGANGenerator",
    "init_weights",
]
