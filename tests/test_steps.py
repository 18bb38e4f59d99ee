"""Tests for models.steps: discriminator / generator updates, generator
feedback, and the JRLF combination of thesis Eq. 5.9."""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import (
    LOSS_KINDS,
    WGAN_CLIP,
    DCGANDiscriminator,
    DCGANGenerator,
    MLPDiscriminator,
    MLPGenerator,
    apply_feedback,
    discriminator_step,
    generator_feedback,
    generator_loss,
    generator_step,
    jrlf_feedback,
    make_optimizer,
    sample_latent,
    train_gan_step,
)

LATENT = 8
FEAT = 8
BATCH = 6
STAT_KEYS = {"d_loss", "d_real_acc", "d_fake_acc", "d_real_out", "d_fake_out"}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _dcgan_pair(norm: str = "batch"):
    G = DCGANGenerator(latent_dim=LATENT, channels=1, image_size=16, features=FEAT)
    D = DCGANDiscriminator(channels=1, image_size=16, features=FEAT, norm=norm)
    return G.train(), D.train()


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


def _g_grads(G):
    return [p.grad.clone() for p in G.parameters()]


# ------------------------------------------------------------ sample_latent
def test_sample_latent_shape_and_reproducible():
    z1 = sample_latent(5, LATENT, generator=torch.Generator().manual_seed(3))
    z2 = sample_latent(5, LATENT, generator=torch.Generator().manual_seed(3), device="cpu")
    assert z1.shape == (5, LATENT)
    assert torch.equal(z1, z2)
    assert not torch.equal(z1, sample_latent(5, LATENT))


# -------------------------------------------------------- generator_feedback
@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_generator_feedback_matches_autograd(kind):
    _, D = _dcgan_pair()
    D_ref = copy.deepcopy(D)
    fake = torch.randn(BATCH, 1, 16, 16)

    labels, feedback = generator_feedback(D, fake, kind)

    x = fake.clone().requires_grad_(True)
    out = D_ref(x)
    (ref,) = torch.autograd.grad(generator_loss(kind, out), x)
    assert labels.shape == (BATCH,)
    assert feedback.shape == fake.shape
    assert not labels.requires_grad and not feedback.requires_grad
    assert torch.allclose(labels, out.detach(), atol=1e-6)
    assert torch.allclose(feedback, ref, atol=1e-7)
    assert feedback.abs().sum() > 0
    assert all(p.grad is None for p in D.parameters())
    assert D.training  # mode untouched


def test_generator_feedback_leaves_generator_graph_alone():
    G, D = _dcgan_pair()
    z = torch.randn(BATCH, LATENT)
    fake = G(z)  # still attached to G's graph
    _, feedback = generator_feedback(D, fake, "bce")
    assert feedback.shape == fake.shape
    assert all(p.grad is None for p in G.parameters())
    assert all(p.grad is None for p in D.parameters())


@pytest.mark.parametrize("kind", ["bce", "wgan"])
def test_generator_feedback_keep_buffers(kind):
    _, D = _dcgan_pair()
    # give the running statistics non-trivial values first
    with torch.no_grad():
        D(torch.randn(BATCH, 1, 16, 16))
    before = _buffers(D)
    assert any("num_batches_tracked" in k for k in before)
    fake = torch.randn(BATCH, 1, 16, 16)

    D_plain = copy.deepcopy(D)
    labels_plain, fb_plain = generator_feedback(D_plain, fake, kind)
    # the plain train-mode query does move the statistics ...
    assert any(not torch.equal(before[k], v) for k, v in D_plain.named_buffers())

    labels, fb = generator_feedback(D, fake, kind, keep_buffers=True)
    # ... the frozen query does not, bit for bit
    for k, v in D.named_buffers():
        assert torch.equal(before[k], v), k
    # and gives the same (batch-statistics) outputs and feedback
    assert torch.equal(labels, labels_plain)
    assert torch.allclose(fb, fb_plain, atol=1e-7)
    assert D.training
    assert all(p.grad is None for p in D.parameters())


def test_generator_feedback_keep_buffers_eval_mode():
    _, D = _dcgan_pair()
    with torch.no_grad():
        D(torch.randn(BATCH, 1, 16, 16))
    D.eval()
    fake = torch.randn(BATCH, 1, 16, 16)
    labels, _ = generator_feedback(D, fake, "bce", keep_buffers=True)
    with torch.no_grad():
        assert torch.allclose(labels, D(fake), atol=1e-6)
    assert not D.training


# ----------------------------------------- apply_feedback == generator_step
@pytest.mark.parametrize("kind", ["bce", "wgan"])
@pytest.mark.parametrize("opt_name", ["sgd", "adam"])
def test_apply_feedback_equals_generator_step(kind, opt_name):
    G, D = _dcgan_pair()
    G_a, D_a = G, D
    G_b, D_b = copy.deepcopy(G), copy.deepcopy(D)

    def make(params):
        if opt_name == "sgd":
            return torch.optim.SGD(params, lr=0.1)
        return torch.optim.Adam(params, lr=1e-2, betas=(0.5, 0.999))

    opt_a, opt_b = make(G_a.parameters()), make(G_b.parameters())
    start = [p.detach().clone() for p in G_a.parameters()]
    for _ in range(2):
        z = torch.randn(BATCH, LATENT)
        with torch.no_grad():
            fake = G_a(z)
        _, feedback = generator_feedback(D_a, fake, kind)
        apply_feedback(G_a, opt_a, z, feedback)
        loss = generator_step(G_b, opt_b, D_b, z, kind)
        assert math.isfinite(loss)

    moved = False
    for p0, pa, pb in zip(start, G_a.parameters(), G_b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
        moved |= not torch.allclose(p0, pa)
    assert moved
    # the centralised step leaves D's gradients unpolluted
    assert all(p.grad is None for p in D_b.parameters())


def test_generator_step_returns_loss_and_keeps_existing_d_grads():
    G, D = _dcgan_pair()
    for p in D.parameters():
        p.grad = torch.full_like(p, 7.0)
    z = torch.randn(BATCH, LATENT)
    D_ref, G_ref = copy.deepcopy(D), copy.deepcopy(G)
    expected = generator_loss("bce", D_ref(G_ref(z))).item()
    loss = generator_step(G, torch.optim.SGD(G.parameters(), lr=0.0), D, z, "bce")
    assert loss == pytest.approx(expected, rel=1e-6)
    assert all(torch.all(p.grad == 7.0) for p in D.parameters())


def test_apply_feedback_shape_mismatch_raises():
    G, _ = _dcgan_pair()
    opt = torch.optim.SGD(G.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="shape"):
        apply_feedback(G, opt, torch.randn(BATCH, LATENT), torch.zeros(BATCH, 1, 8, 8))


# ------------------------------------------------------ JRLF (thesis Eq. 5.9)
def _reference_g_loss(kind, out):
    if kind == "bce":
        return (-F.logsigmoid(out)).mean()
    return (-out).mean()


@pytest.mark.parametrize("kind", ["bce", "wgan"])
@pytest.mark.parametrize("alpha", [0.25, 0.7])
def test_jrlf_feedback_matches_joint_objective(kind, alpha):
    G, D_local = _dcgan_pair()
    _, D_teacher = _dcgan_pair()  # independently initialised teacher
    z = torch.randn(BATCH, LATENT)

    # reference: autograd of alpha * L_local + (1 - alpha) * L_teacher on G
    G_ref = copy.deepcopy(G)
    Dl_ref, Dt_ref = copy.deepcopy(D_local), copy.deepcopy(D_teacher)
    x = G_ref(z)
    joint = alpha * _reference_g_loss(kind, Dl_ref(x)) + (1 - alpha) * _reference_g_loss(
        kind, Dt_ref(x)
    )
    ref = torch.autograd.grad(joint, list(G_ref.parameters()))

    # feedback route: two discriminator queries, one combination, one backward
    with torch.no_grad():
        fake = G(z)
    _, f_local = generator_feedback(D_local, fake, kind)
    _, f_teacher = generator_feedback(D_teacher, fake, kind, keep_buffers=True)
    combined = jrlf_feedback(f_local, f_teacher, alpha)
    assert torch.allclose(combined, alpha * f_local + (1 - alpha) * f_teacher)
    apply_feedback(G, torch.optim.SGD(G.parameters(), lr=0.0), z, combined)

    for g, r in zip(_g_grads(G), ref):
        assert torch.allclose(g, r, atol=1e-5)
    # the teacher term really matters: local feedback alone differs
    G_loc = copy.deepcopy(G)
    apply_feedback(G_loc, torch.optim.SGD(G_loc.parameters(), lr=0.0), z, f_local)
    assert any(not torch.allclose(a, b, atol=1e-5) for a, b in zip(_g_grads(G_loc), ref))


@pytest.mark.parametrize("kind", ["bce", "wgan"])
def test_jrlf_alpha_one_is_plain_generator_gradient(kind):
    G, D = _dcgan_pair()
    z = torch.randn(BATCH, LATENT)
    with torch.no_grad():
        fake = G(z)
    _, f_local = generator_feedback(D, fake, kind)

    nan_teacher = torch.full_like(f_local, float("nan"))
    assert torch.equal(jrlf_feedback(f_local, nan_teacher, 1.0), f_local)
    assert torch.equal(jrlf_feedback(f_local, None, 1), f_local)

    G_ref = copy.deepcopy(G)
    apply_feedback(G, torch.optim.SGD(G.parameters(), lr=0.0), z, jrlf_feedback(f_local, None, 1.0))
    apply_feedback(G_ref, torch.optim.SGD(G_ref.parameters(), lr=0.0), z, f_local)
    for a, b in zip(_g_grads(G), _g_grads(G_ref)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.0001, 2.0, float("nan")])
def test_jrlf_alpha_out_of_range_raises(alpha):
    f = torch.ones(2, 3)
    with pytest.raises(ValueError, match="alpha"):
        jrlf_feedback(f, f, alpha)


def test_jrlf_needs_teacher_below_one():
    f = torch.ones(2, 3)
    with pytest.raises(ValueError, match="teacher"):
        jrlf_feedback(f, None, 0.5)
    with pytest.raises(ValueError, match="shape"):
        jrlf_feedback(f, torch.ones(3, 2), 0.5)


# -------------------------------------------------------- discriminator_step
def _toy_points(n=64):
    real = torch.randn(n, 2) * 0.3 + 2.0
    fake = torch.randn(n, 2) * 0.3 - 2.0
    return real, fake


def test_discriminator_step_bce_learns_separable_problem():
    D = MLPDiscriminator(in_dim=2, hidden=16, layers=2)
    opt = torch.optim.Adam(D.parameters(), lr=1e-2)
    real, fake = _toy_points()
    losses, stats = [], {}
    for _ in range(30):
        stats = discriminator_step(D, opt, real, fake, "bce")
        losses.append(stats["d_loss"])
    assert set(stats) == STAT_KEYS
    assert all(isinstance(v, float) for v in stats.values())
    assert losses[-1] < 0.5 * losses[0]
    assert stats["d_real_acc"] == 1.0 and stats["d_fake_acc"] == 1.0
    assert stats["d_real_out"] > 0 > stats["d_fake_out"]


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_discriminator_step_stats(kind):
    norm = "layer" if kind == "wgan-gp" else "batch"
    _, D = _dcgan_pair(norm)
    opt = make_optimizer(kind, D.parameters(), 1e-3)
    real = torch.rand(BATCH, 1, 16, 16) * 2 - 1
    fake = torch.randn(BATCH, 1, 16, 16).requires_grad_(True)
    stats = discriminator_step(D, opt, real, fake, kind)
    assert set(stats) == STAT_KEYS
    for key in ("d_real_acc", "d_fake_acc"):
        assert 0.0 <= stats[key] <= 1.0
    assert all(math.isfinite(v) for v in stats.values())
    assert fake.grad is None  # fakes are detached


class _FixedCritic(nn.Module):
    """D(x) = x[:, 0] + 0 * w: outputs are the first coordinate."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        return x[:, 0] + 0.0 * self.w


@pytest.mark.parametrize(
    "kind, real_acc, fake_acc", [("bce", 1.0, 0.75), ("hinge", 1.0, 0.75), ("wgan", 0.75, 0.75)]
)
def test_discriminator_step_accuracy_threshold(kind, real_acc, fake_acc):
    real = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    fake = torch.tensor([[-1.0], [-1.0], [-1.0], [5.0]])
    D = _FixedCritic()
    stats = discriminator_step(D, torch.optim.SGD(D.parameters(), lr=0.0), real, fake, kind)
    # bce/hinge: threshold 0; wgan: midpoint (2.5 + 0.5) / 2 = 1.5
    assert stats["d_real_acc"] == real_acc
    assert stats["d_fake_acc"] == fake_acc
    assert stats["d_real_out"] == pytest.approx(2.5)
    assert stats["d_fake_out"] == pytest.approx(0.5)


def test_discriminator_step_wgan_clips_weights():
    D = MLPDiscriminator(in_dim=2, hidden=16, layers=2)
    assert max(p.abs().max().item() for p in D.parameters()) > WGAN_CLIP  # default init
    opt = make_optimizer("wgan", D.parameters(), 5e-5)
    real, fake = _toy_points(16)
    discriminator_step(D, opt, real, fake, "wgan")
    flat = torch.cat([p.detach().flatten() for p in D.parameters()])
    # compare in float32, the parameters' precision
    assert (flat.abs() <= torch.tensor(WGAN_CLIP)).all()
    assert (flat.abs() == torch.tensor(WGAN_CLIP)).any()
    discriminator_step(D, opt, real, fake, "wgan", clip=0.003)
    flat = torch.cat([p.detach().flatten() for p in D.parameters()])
    assert (flat.abs() <= torch.tensor(0.003)).all()


@pytest.mark.parametrize("kind", ["bce", "wgan-gp", "hinge"])
def test_discriminator_step_does_not_clip_other_losses(kind):
    D = MLPDiscriminator(in_dim=2, hidden=16, layers=2)
    opt = make_optimizer(kind, D.parameters(), 1e-4)
    real, fake = _toy_points(16)
    discriminator_step(D, opt, real, fake, kind)
    assert max(p.abs().max().item() for p in D.parameters()) > 0.1


class _LinearCritic(nn.Module):
    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(torch.tensor(w))

    def forward(self, x):
        return x @ self.w


def test_discriminator_step_wgan_gp_adds_penalty():
    # linear critic: input gradient is w, penalty (||w|| - 1)^2 = 16 exactly
    D = _LinearCritic([3.0, 4.0])
    real, fake = _toy_points(8)
    w = D.w.detach().clone()
    expected = (fake @ w).mean() - (real @ w).mean() + 10.0 * 16.0
    opt = torch.optim.SGD(D.parameters(), lr=0.01)
    stats = discriminator_step(D, opt, real, fake, "wgan-gp")
    assert stats["d_loss"] == pytest.approx(expected.item(), rel=1e-5)
    # gradient = mean(fake) - mean(real) + 10 * 2 * (||w|| - 1) * w / ||w||
    grad = fake.mean(0) - real.mean(0) + 10.0 * 2 * 4 * w / 5
    assert torch.allclose(D.w.detach(), w - 0.01 * grad, atol=1e-5)
    stats = discriminator_step(
        _LinearCritic([3.0, 4.0]), torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.0),
        real, fake, "wgan-gp", gp_weight=0.0,
    )
    assert stats["d_loss"] == pytest.approx((expected - 160.0).item(), rel=1e-4, abs=1e-4)


# ------------------------------------------------------------- train_gan_step
def _ring(n, generator=None):
    angles = torch.randint(0, 8, (n,), generator=generator).float() * (2 * math.pi / 8)
    centers = torch.stack([angles.cos(), angles.sin()], 1) * 2.0
    return centers + 0.02 * torch.randn(n, 2, generator=generator)


@pytest.mark.parametrize("kind", LOSS_KINDS)
def test_train_gan_step_mlp(kind):
    G = MLPGenerator(latent_dim=LATENT, out_dim=2, hidden=16, layers=2)
    D = MLPDiscriminator(in_dim=2, hidden=16, layers=2)
    opt_g = make_optimizer(kind, G.parameters(), 1e-3)
    opt_d = make_optimizer(kind, D.parameters(), 1e-3)
    gen = torch.Generator().manual_seed(1)
    g_before = [p.detach().clone() for p in G.parameters()]
    for _ in range(3):
        stats = train_gan_step(G, D, opt_g, opt_d, _ring(32, gen), kind=kind, d_steps=2, generator=gen)
        assert set(stats) == STAT_KEYS | {"g_loss"}
        assert all(math.isfinite(v) for v in stats.values())
        assert 0.0 <= stats["d_real_acc"] <= 1.0 and 0.0 <= stats["d_fake_acc"] <= 1.0
    assert any(not torch.equal(a, b) for a, b in zip(g_before, G.parameters()))
    if kind == "wgan":
        assert all((p.abs() <= torch.tensor(WGAN_CLIP)).all() for p in D.parameters())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in D.parameters())


def test_train_gan_step_reproducible_with_generator():
    def run():
        torch.manual_seed(5)
        G = MLPGenerator(latent_dim=LATENT, hidden=16, layers=2)
        D = MLPDiscriminator(hidden=16, layers=2)
        opt_g = make_optimizer("bce", G.parameters(), 1e-3)
        opt_d = make_optimizer("bce", D.parameters(), 1e-3)
        real = _ring(16, torch.Generator().manual_seed(2))
        gen = torch.Generator().manual_seed(9)
        return [train_gan_step(G, D, opt_g, opt_d, real, kind="bce", generator=gen) for _ in range(2)]

    assert run() == run()


def test_train_gan_step_rejects_bad_d_steps():
    G = MLPGenerator(latent_dim=LATENT, hidden=8, layers=1)
    D = MLPDiscriminator(hidden=8, layers=1)
    opt = torch.optim.SGD(list(G.parameters()) + list(D.parameters()), lr=0.0)
    with pytest.raises(ValueError, match="d_steps"):
        train_gan_step(G, D, opt, opt, _ring(4), kind="bce", d_steps=0)


def test_discriminator_step_separate_real_and_fake_passes():
    # With BatchNorm in train mode the outputs depend on the batch; the step
    # must normalise real and fake batches separately (DCGAN practice).
    _, D = _dcgan_pair("batch")
    D_ref = copy.deepcopy(D)
    real = torch.rand(BATCH, 1, 16, 16) * 2 - 1
    fake = torch.randn(BATCH, 1, 16, 16) * 3
    stats = discriminator_step(D, torch.optim.SGD(D.parameters(), lr=0.0), real, fake, "bce")
    with torch.no_grad():
        sep_real, sep_fake = D_ref(real).mean().item(), D_ref(fake).mean().item()
        joint = D_ref(torch.cat([real, fake]))
    assert stats["d_real_out"] == pytest.approx(sep_real, abs=1e-5)
    assert stats["d_fake_out"] == pytest.approx(sep_fake, abs=1e-5)
    assert abs(joint[:BATCH].mean().item() - sep_real) > 1e-3  # the check is meaningful


@pytest.mark.parametrize("kind", ["bce", "hinge"])
def test_discriminator_step_with_negatives_equals_the_hand_written_objective(kind):
    """Negatives (PrivacyGAN's server-negatives) add the fake half of the loss on a third
    forward pass: L_D(D(real), D(fake)) + L_neg(D(neg)), with L_neg = softplus(o) (bce) or
    relu(1 + o) (hinge). One SGD step equals that objective's gradient step, and differs from
    the step without negatives."""
    _, D = _dcgan_pair()
    real, fake, neg = (torch.rand(BATCH, 1, 16, 16) * 2 - 1 for _ in range(3))
    by_hand, without = copy.deepcopy(D), copy.deepcopy(D)
    stats = discriminator_step(D, torch.optim.SGD(D.parameters(), lr=0.1), real, fake, kind, negatives=neg)

    r, f, n = by_hand(real), by_hand(fake), by_hand(neg)
    if kind == "bce":
        loss = F.softplus(-r).mean() + F.softplus(f).mean() + F.softplus(n).mean()
    else:
        loss = F.relu(1 - r).mean() + F.relu(1 + f).mean() + F.relu(1 + n).mean()
    loss.backward()
    with torch.no_grad():
        for p in by_hand.parameters():
            p -= 0.1 * p.grad
    discriminator_step(without, torch.optim.SGD(without.parameters(), lr=0.1), real, fake, kind)

    assert stats["d_loss"] == pytest.approx(float(loss.detach()), rel=1e-6)
    assert stats["d_neg_acc"] == pytest.approx(float((n < 0).float().mean()))
    for a, b, c in zip(D.parameters(), by_hand.parameters(), without.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert any(not torch.allclose(a, c, atol=1e-6) for a, c in zip(D.parameters(), without.parameters()))
    # buffers: BatchNorm saw the three batches one after another, as in the hand-written passes
    for (k, a), (_, b) in zip(D.named_buffers(), by_hand.named_buffers()):
        assert torch.allclose(a.float(), b.float()), k


def test_negatives_are_refused_for_wasserstein_critics():
    _, D = _dcgan_pair(norm="layer")
    x = torch.zeros(BATCH, 1, 16, 16)
    with pytest.raises(ValueError, match="negatives need a loss in"):
        discriminator_step(D, torch.optim.SGD(D.parameters(), lr=0.1), x, x, "wgan", negatives=x)
