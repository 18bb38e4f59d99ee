"""Tests for models.dcgan, models.mlp, models.factory and models.losses."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    GP_WEIGHT,
    LOSS_KINDS,
    WGAN_CLIP,
    DCGANDiscriminator,
    DCGANGenerator,
    MLPDiscriminator,
    MLPGenerator,
    build_discriminator,
    build_generator,
    discriminator_loss,
    generator_loss,
    gradient_penalty,
    init_weights,
    make_optimizer,
)

LATENT = 8
FEAT = 8


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# --------------------------------------------------------------------- DCGAN
@pytest.mark.parametrize("side", [16, 32, 64])
@pytest.mark.parametrize("channels", [1, 3])
def test_dcgan_shapes_and_range(side, channels):
    G = DCGANGenerator(latent_dim=LATENT, channels=channels, image_size=side, features=FEAT)
    D = DCGANDiscriminator(channels=channels, image_size=side, features=FEAT)
    assert G.latent_dim == LATENT
    z = torch.randn(4, LATENT) * 5  # large codes still map into [-1, 1]
    x = G(z)
    assert x.shape == (4, channels, side, side)
    assert x.min() >= -1.0 and x.max() <= 1.0
    assert x.std() > 0
    out = D(x)
    assert out.shape == (4,)
    # raw scores, not probabilities: a sigmoid output could never be negative
    # or above one, a large random input gives both signs easily.
    scores = D(torch.randn(8, channels, side, side) * 10)
    assert scores.shape == (8,)


@pytest.mark.parametrize("side", [16, 32, 64])
def test_dcgan_depth_follows_side(side):
    G = DCGANGenerator(latent_dim=LATENT, image_size=side, features=FEAT)
    D = DCGANDiscriminator(image_size=side, features=FEAT)
    stages = {16: 2, 32: 3, 64: 4}[side]
    convt = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert len(convt) == stages + 1  # projection to 4x4 + stride-2 stages
    assert len(convs) == stages + 1  # stride-2 stages + final 4x4 -> 1x1
    assert convt[0].in_channels == LATENT
    assert convt[0].out_channels == FEAT * 2 ** (stages - 1)
    assert convt[0].stride == (1, 1) and convt[0].padding == (0, 0)
    assert convs[-1].out_channels == 1 and convs[-1].stride == (1, 1)
    assert isinstance(list(G.modules())[-1], nn.Tanh)


def test_generator_accepts_4d_latent():
    G = DCGANGenerator(latent_dim=LATENT, features=FEAT).eval()
    z = torch.randn(3, LATENT)
    assert torch.equal(G(z), G(z.view(3, LATENT, 1, 1)))


@pytest.mark.parametrize("side", [8, 28, 128])
def test_invalid_side_raises(side):
    with pytest.raises(ValueError, match="16, 32, 64"):
        DCGANGenerator(image_size=side)
    with pytest.raises(ValueError, match="16, 32, 64"):
        DCGANDiscriminator(image_size=side)


def test_invalid_channels_and_norm_raise():
    with pytest.raises(ValueError, match="channels"):
        DCGANGenerator(channels=2)
    with pytest.raises(ValueError, match="channels"):
        DCGANDiscriminator(channels=4)
    with pytest.raises(ValueError, match="spectral"):
        DCGANDiscriminator(norm="spectral")


@pytest.mark.parametrize(
    "norm, layer_type", [("batch", nn.BatchNorm2d), ("layer", nn.GroupNorm), ("none", None)]
)
def test_discriminator_norms(norm, layer_type):
    D = DCGANDiscriminator(image_size=32, features=FEAT, norm=norm)
    norms = [m for m in D.modules() if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm))]
    if layer_type is None:
        assert norms == []
    else:
        # every stride-2 stage except the first is normalised
        assert len(norms) == 2 and all(isinstance(m, layer_type) for m in norms)
    if norm == "layer":
        assert all(m.num_groups == 1 for m in norms)
        # per-sample: a sample's score does not depend on the rest of the batch
        D.train()
        x = torch.randn(6, 1, 32, 32)
        assert torch.allclose(D(x)[:2], D(x[:2]), atol=1e-6)
    first = list(D.net.children())[:2]
    assert isinstance(first[0], nn.Conv2d) and isinstance(first[1], nn.LeakyReLU)
    assert first[1].negative_slope == 0.2


def test_init_weights_statistics():
    G = DCGANGenerator(latent_dim=100, image_size=16, features=64)
    D = DCGANDiscriminator(image_size=16, features=64)
    for model in (G, D):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                if m.weight.numel() > 10_000:
                    assert abs(m.weight.std().item() - 0.02) < 0.002
                    assert abs(m.weight.mean().item()) < 0.002
                if m.bias is not None:
                    assert torch.count_nonzero(m.bias) == 0
            if isinstance(m, nn.BatchNorm2d):
                assert abs(m.weight.mean().item() - 1.0) < 0.01
                assert 0 < m.weight.std().item() < 0.05
                assert torch.count_nonzero(m.bias) == 0


def test_init_weights_on_linear_and_groupnorm():
    lin, gn = nn.Linear(200, 300), nn.GroupNorm(1, 500)
    init_weights(lin)
    init_weights(gn)
    assert abs(lin.weight.std().item() - 0.02) < 0.001
    assert torch.count_nonzero(lin.bias) == 0
    assert abs(gn.weight.mean().item() - 1.0) < 0.005
    assert torch.count_nonzero(gn.bias) == 0


# ----------------------------------------------------------------------- MLP
def test_mlp_shapes():
    G = MLPGenerator(latent_dim=LATENT, out_dim=2, hidden=16, layers=3)
    D = MLPDiscriminator(in_dim=2, hidden=16, layers=3)
    assert G.latent_dim == LATENT
    x = G(torch.randn(5, LATENT))
    assert x.shape == (5, 2)
    assert D(x).shape == (5,)
    assert len([m for m in G.modules() if isinstance(m, nn.Linear)]) == 4
    assert len([m for m in D.modules() if isinstance(m, nn.LeakyReLU)]) == 3
    assert len([m for m in G.modules() if isinstance(m, nn.ReLU)]) == 3
    # linear (unbounded) generator output
    assert isinstance(list(G.net.children())[-1], nn.Linear)


# ------------------------------------------------------------------- factory
def test_factory_builds_each_kind():
    g = build_generator("dcgan", latent_dim=LATENT, channels=3, image_size=32, features=FEAT)
    assert isinstance(g, DCGANGenerator) and g(torch.randn(2, LATENT)).shape == (2, 3, 32, 32)
    g = build_generator("mlp", latent_dim=LATENT, channels=1, image_size=16, features=16, out_dim=3)
    assert isinstance(g, MLPGenerator) and g(torch.randn(2, LATENT)).shape == (2, 3)
    assert g.net[0].out_features == 16
    d = build_discriminator("mlp", channels=1, image_size=16, features=16, loss="bce", in_dim=3)
    assert isinstance(d, MLPDiscriminator) and d(torch.randn(2, 3)).shape == (2,)


@pytest.mark.parametrize("loss", LOSS_KINDS)
def test_factory_norm_depends_on_loss(loss):
    d = build_discriminator("dcgan", channels=1, image_size=16, features=FEAT, loss=loss)
    assert isinstance(d, DCGANDiscriminator)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in d.modules())
    has_gn = any(isinstance(m, nn.GroupNorm) for m in d.modules())
    if loss == "wgan-gp":
        assert d.norm == "layer" and not has_bn and has_gn
    else:
        assert d.norm == "batch" and has_bn and not has_gn


def test_factory_unknown_kind_raises():
    with pytest.raises(ValueError, match="resnet.*dcgan"):
        build_generator("resnet", latent_dim=4, channels=1, image_size=16, features=8)
    with pytest.raises(ValueError, match="resnet.*dcgan"):
        build_discriminator("resnet", channels=1, image_size=16, features=8, loss="bce")
    with pytest.raises(ValueError, match="lsgan"):
        build_discriminator("dcgan", channels=1, image_size=16, features=8, loss="lsgan")


# -------------------------------------------------------------------- losses
def test_loss_constants():
    assert LOSS_KINDS == ("bce", "wgan", "wgan-gp", "hinge")
    assert WGAN_CLIP == 0.01 and GP_WEIGHT == 10.0


def test_generator_loss_values():
    o = torch.tensor([-3.0, 0.0, 2.0, 50.0, -50.0])
    ref = -F.logsigmoid(o).mean()
    assert torch.allclose(generator_loss("bce", o), ref, atol=1e-6)
    assert torch.allclose(
        generator_loss("bce", o),
        F.binary_cross_entropy_with_logits(o, torch.ones_like(o)),
        atol=1e-6,
    )
    assert torch.isfinite(generator_loss("bce", torch.tensor([-1e4, 1e4])))
    for kind in ("wgan", "wgan-gp", "hinge"):
        assert torch.allclose(generator_loss(kind, o), -o.mean())


def test_discriminator_loss_values():
    r = torch.tensor([2.0, -0.5, 0.3, 4.0])
    f = torch.tensor([-1.0, 0.7, -3.0, 1.5])
    bce = F.binary_cross_entropy_with_logits(
        torch.cat([r, f]), torch.cat([torch.ones(4), torch.zeros(4)]), reduction="none"
    )
    expected = bce[:4].mean() + bce[4:].mean()
    assert torch.allclose(discriminator_loss("bce", r, f), expected, atol=1e-6)
    for kind in ("wgan", "wgan-gp"):
        assert torch.allclose(discriminator_loss(kind, r, f), f.mean() - r.mean())
    hinge = (1 - r).clamp(min=0).mean() + (1 + f).clamp(min=0).mean()
    assert torch.allclose(discriminator_loss("hinge", r, f), hinge)
    # hand-computed hinge: real terms [0, 1.5, 0.7, 0] / 4, fake [0, 1.7, 0, 2.5] / 4
    assert discriminator_loss("hinge", r, f).item() == pytest.approx(2.2 / 4 + 4.2 / 4)


def test_losses_unknown_kind_raises():
    o = torch.zeros(3)
    with pytest.raises(ValueError, match="lsgan.*bce"):
        generator_loss("lsgan", o)
    with pytest.raises(ValueError, match="lsgan.*bce"):
        discriminator_loss("lsgan", o, o)
    with pytest.raises(ValueError, match="lsgan"):
        make_optimizer("lsgan", [nn.Parameter(torch.zeros(1))], 1e-3)


class _LinearCritic(nn.Module):
    """D(x) = <w, x>: its input gradient is w everywhere."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x.flatten(1) @ self.w


def test_gradient_penalty_exact_on_linear_critic():
    D = _LinearCritic([3.0, 4.0])  # ||w|| = 5 -> penalty (5 - 1)^2 = 16
    real, fake = torch.randn(6, 2), torch.randn(6, 2)
    gp = gradient_penalty(D, real, fake)
    assert gp.item() == pytest.approx(16.0, rel=1e-6)
    # create_graph=True: the penalty is differentiable w.r.t. the critic:
    # d/dw (||w|| - 1)^2 = 2 (||w|| - 1) w / ||w||
    (g,) = torch.autograd.grad(gp, D.w)
    assert torch.allclose(g, torch.tensor([2 * 4 * 3 / 5, 2 * 4 * 4 / 5]), atol=1e-5)


def test_gradient_penalty_uses_interpolates():
    # D(x) = sum(x^2) / 2 has input gradient x, so the penalty depends on
    # where the interpolates lie: all on the unit sphere -> exactly zero.
    class Quad(nn.Module):
        def forward(self, x):
            return 0.5 * (x.flatten(1) ** 2).sum(1)

    real = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert gradient_penalty(Quad(), real, real.clone()).item() == pytest.approx(0.0, abs=1e-10)
    fake = torch.zeros(2, 2)  # interpolates eps * real, norm eps in [0, 1]
    gp = gradient_penalty(Quad(), real, fake).item()
    assert 0.0 <= gp <= 1.0


def test_make_optimizer_choice():
    p = [nn.Parameter(torch.zeros(3))]
    opt = make_optimizer("wgan", p, 5e-5)
    assert isinstance(opt, torch.optim.RMSprop) and opt.param_groups[0]["lr"] == 5e-5
    for kind in ("bce", "wgan-gp", "hinge"):
        opt = make_optimizer(kind, p, 2e-4)
        assert isinstance(opt, torch.optim.Adam)
        assert opt.param_groups[0]["betas"] == (0.5, 0.999)
    opt = make_optimizer("bce", p, 1e-3, betas=(0.0, 0.9))
    assert opt.param_groups[0]["betas"] == (0.0, 0.9)


def test_models_package_is_flower_free():
    import pathlib

    root = pathlib.Path(__file__).resolve().parents[1] / "models"
    for path in root.glob("*.py"):
        text = path.read_text()
        assert "import flwr" not in text and "from flwr" not in text, path
