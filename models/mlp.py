"""Small fully connected GAN for low-dimensional toy data (e.g. a ring of
eight 2-D Gaussians)."""

from __future__ import annotations

from torch import Tensor, nn


def _check(hidden: int, layers: int) -> None:
    if hidden < 1:
        raise ValueError(f"hidden must be positive, got {hidden!r}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers!r}")


class MLPGenerator(nn.Module):
    """``layers`` hidden Linear+ReLU blocks of width ``hidden`` followed by a
    linear projection to ``out_dim`` (unbounded output)."""

    def __init__(
        self, latent_dim: int = 100, out_dim: int = 2, hidden: int = 128, layers: int = 3
    ) -> None:
        super().__init__()
        _check(hidden, layers)
        self.latent_dim = latent_dim
        self.out_dim = out_dim
        blocks: list[nn.Module] = []
        width = latent_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.ReLU(inplace=True)]
            width = hidden
        blocks.append(nn.Linear(width, out_dim))
        self.net = nn.Sequential(*blocks)

    def forward(self, z: Tensor) -> Tensor:
        return self.net(z.flatten(1))


class MLPDiscriminator(nn.Module):
    """``layers`` hidden Linear+LeakyReLU(0.2) blocks, then one linear output
    unit; returns raw scores of shape (B,) (no sigmoid)."""

    def __init__(self, in_dim: int = 2, hidden: int = 128, layers: int = 3) -> None:
        super().__init__()
        _check(hidden, layers)
        self.in_dim = in_dim
        blocks: list[nn.Module] = []
        width = in_dim
        for _ in range(layers):
            blocks += [nn.Linear(width, hidden), nn.LeakyReLU(0.2, inplace=True)]
            width = hidden
        blocks.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.flatten(1)).view(x.shape[0])


__all__ = ["MLPDiscriminator", "MLPGenerator"]
