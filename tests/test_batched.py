"""models.batched: N students updated as one vmapped computation equal the same N updates made
one at a time (models.steps.student_update) -- parameters, BatchNorm running statistics,
Adam moments and step counts, teacher losses -- to 1e-5."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models.batched import Stack, can_batch, step_optimizers, students_update, teacher_feedback_batched
from models.factory import build_discriminator, build_generator
from models.losses import make_optimizer
from models.steps import generator_feedback, student_update

LATENT, B, N = 8, 6, 4


def _students(n: int, loss: str = "bce", kind: str = "dcgan"):
    torch.manual_seed(0)
    gens = [build_generator(kind, latent_dim=LATENT, channels=1, image_size=16, features=4, out_dim=2)
            for _ in range(n)]
    for G in gens:
        G.train()
    return [(G, make_optimizer(loss, G.parameters(), 2e-3, (0.5, 0.999))) for G in gens]


def _teacher(kind: str = "dcgan", loss: str = "bce"):
    torch.manual_seed(1)
    D = build_discriminator(kind, channels=1, image_size=16, features=4, loss=loss, in_dim=2)
    D.train()
    return D


def _assert_same(seq, bat, tol=1e-5):
    for (G1, o1), (G2, o2) in zip(seq, bat):
        for (n1, t1), (n2, t2) in zip(G1.state_dict().items(), G2.state_dict().items()):
            assert n1 == n2
            assert torch.allclose(t1.float(), t2.float(), atol=tol, rtol=tol), n1
        for p1, p2 in zip(G1.parameters(), G2.parameters()):
            s1, s2 = o1.state[p1], o2.state[p2]
            assert set(s1) == set(s2)
            for key in s1:
                assert torch.allclose(s1[key].float(), s2[key].float(), atol=tol, rtol=tol), key


@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_batched_students_equal_sequential_over_steps(alpha):
    """Three JRLF steps of 4 DCGAN students (BatchNorm in train mode): the first step creates the
    Adam state (students step one by one), later ones go through one functional-Adam call; one
    student skips step 2 (its step count falls behind, as with a dropped reply)."""
    seq, bat = _students(N), _students(N)
    teacher = _teacher()
    gen = torch.Generator().manual_seed(5)
    for step in range(3):
        who = [0, 1, 3] if step == 1 else list(range(N))
        z = torch.randn(len(who), B, LATENT, generator=gen)
        fb = torch.randn(len(who), B, 1, 16, 16, generator=gen) * 1e-2
        losses_seq = [student_update(seq[i][0], seq[i][1], z[j], fb[j], teacher if alpha < 1 else None, alpha,
                                     "bce")["g_loss_teacher"] for j, i in enumerate(who)]
        losses_bat = students_update([bat[i] for i in who], z, fb, teacher if alpha < 1 else None, alpha, "bce")
        for a, b in zip(losses_seq, losses_bat):
            assert (math.isnan(a) and math.isnan(b)) if alpha == 1 else abs(a - b) < 1e-5
    _assert_same(seq, bat)
    # the updates did something, and student 2 (skipped once) differs from student 0 in step count
    assert not torch.equal(seq[0][0].state_dict()["net.0.weight"], _students(1)[0][0].state_dict()["net.0.weight"])
    steps = [float(bat[i][1].state[next(bat[i][0].parameters())]["step"]) for i in range(N)]
    assert steps == [3.0, 3.0, 2.0, 3.0]
    # the teacher's running statistics were never written
    fresh = _teacher()
    for (name, b1), b2 in zip(teacher.named_buffers(), fresh.buffers()):
        assert torch.equal(b1, b2), name


def test_stack_with_kept_stack_over_k_steps_equals_sequential():
    """A round of K = 2 steps reusing one Stack (restacked after each optimizer step)."""
    seq, bat = _students(3), _students(3)
    teacher = _teacher()
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 3, B, LATENT, generator=gen)
    fb = torch.randn(2, 3, B, 1, 16, 16, generator=gen) * 1e-2
    stack = Stack([G for G, _ in bat])
    for k in range(2):
        for i in range(3):
            student_update(seq[i][0], seq[i][1], z[k, i], fb[k, i], teacher, 0.3, "bce")
        students_update(bat, z[k], fb[k], teacher, 0.3, "bce", stack=stack)
        stack.restack_params()
    _assert_same(seq, bat)


def test_teacher_feedback_batched_equals_per_batch():
    D = _teacher()
    x = torch.randn(3, B, 1, 16, 16)
    labels, fb = teacher_feedback_batched(D, x, "bce")
    for n in range(3):
        lab1, fb1 = generator_feedback(D, x[n], "bce", keep_buffers=True)
        assert torch.allclose(labels[n], lab1, atol=1e-6)
        assert torch.allclose(fb[n], fb1, atol=1e-7)


def test_rmsprop_students_step_one_by_one_and_still_match():
    """wgan students use RMSprop: step_optimizers falls back to opt.step() each, same result up to
    rounding. RMSprop's first step is lr·g/sqrt(0.01·g²) = 10·lr·sign(g), so the last-bit
    difference of a vmapped convolution's sum order in a gradient close to 0 can move a weight
    by up to 2·10·lr; measured 1.7e-5 here: 5e-5 tolerance (Adam, the default, holds 1e-5)."""
    seq, bat = _students(3, loss="wgan"), _students(3, loss="wgan")
    teacher = _teacher(loss="wgan")
    z = torch.randn(3, B, LATENT)
    fb = torch.randn(3, B, 1, 16, 16) * 1e-2
    for _ in range(2):
        for i in range(3):
            student_update(seq[i][0], seq[i][1], z[i], fb[i], teacher, 0.5, "wgan")
        students_update(bat, z, fb, teacher, 0.5, "wgan")
    _assert_same(seq, bat, tol=5e-5)


def test_step_optimizers_equals_step_each_for_adam_with_state():
    torch.manual_seed(3)
    nets = [nn.Linear(4, 3) for _ in range(3)]
    twins = copy.deepcopy(nets)
    opts = [torch.optim.Adam(m.parameters(), lr=0.1, betas=(0.5, 0.9)) for m in nets]
    topts = [torch.optim.Adam(m.parameters(), lr=0.1, betas=(0.5, 0.9)) for m in twins]
    for it in range(3):
        for ms, os_ in ((nets, opts), (twins, topts)):
            for m in ms:
                m.zero_grad()
                (m(torch.ones(2, 4)) ** 2).sum().backward()
        for o in opts:
            o.step()
        step_optimizers(topts)
    for m, t in zip(nets, twins):
        for p, q in zip(m.parameters(), t.parameters()):
            assert torch.allclose(p, q, atol=1e-7)


def test_can_batch_refuses_mixed_architectures_and_modes():
    a = _students(2)
    assert can_batch([G for G, _ in a])
    other = build_generator("dcgan", latent_dim=LATENT, channels=1, image_size=16, features=8)
    assert not can_batch([a[0][0], other])
    b = copy.deepcopy(a[1][0]).eval()
    assert not can_batch([a[0][0], b])
    assert not can_batch([a[0][0]])


@pytest.mark.parametrize("kind", ["bce", "hinge"])
def test_discriminators_step_equals_each_client_step_then_feedback(kind):
    """N clients' D step + feedback as one computation == discriminator_step then
    generator_feedback per client: weights, running statistics, Adam state, stats, labels, feedback."""
    from models.batched import discriminators_step
    from models.steps import discriminator_step

    def discs():
        torch.manual_seed(2)
        out = []
        for _ in range(3):
            D = build_discriminator("dcgan", channels=1, image_size=16, features=4, loss=kind)
            D.train()
            out.append((D, make_optimizer(kind, D.parameters(), 2e-3, (0.5, 0.999))))
        return out

    seq, bat = discs(), discs()
    gen = torch.Generator().manual_seed(4)
    for _ in range(3):   # the first step makes the Adam state; later ones share one functional-Adam call
        real = torch.rand(3, B, 1, 16, 16, generator=gen) * 2 - 1
        fake = torch.rand(3, B, 1, 16, 16, generator=gen) * 2 - 1
        ref = []
        for n, (D, opt) in enumerate(seq):
            st = discriminator_step(D, opt, real[n], fake[n], kind)
            ref.append((st, *generator_feedback(D, fake[n], kind)))
        stats, labels, fb = discriminators_step(bat, real, fake, kind)
        for n, (st, lab, f) in enumerate(ref):
            assert all(abs(st[k] - stats[n][k]) < 1e-5 for k in st)
            assert torch.allclose(labels[n], lab, atol=1e-5) and torch.allclose(fb[n], f, atol=1e-6)
    _assert_same(seq, bat)
