"""models.batched: N students updated as one computation (grouped layers or vmap) equal the same
N updates made one at a time (models.steps.student_update) -- parameters, BatchNorm running
statistics, Adam moments and step counts, teacher losses -- to 1e-5; the grouped layers equal
each network's own forward and backward pass."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from models.batched import Stack, can_batch, chunk_slices, grouped_plan, step_optimizers, students_update, teacher_feedback_batched
from models.dcgan import DCGANDiscriminator, DCGANGenerator
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


@pytest.mark.parametrize("path", ["grouped", "vmap"])
@pytest.mark.parametrize("alpha", [0.5, 1.0])
def test_batched_students_equal_sequential_over_steps(alpha, path):
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
        losses_bat = students_update([bat[i] for i in who], z, fb, teacher if alpha < 1 else None, alpha, "bce",
                                     path=path)
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


@pytest.mark.parametrize("path", ["grouped", "vmap"])
def test_stack_with_kept_stack_over_k_steps_equals_sequential(path):
    """A round of K = 2 steps reusing one Stack (restacked after each optimizer step)."""
    seq, bat = _students(3), _students(3)
    teacher = _teacher()
    gen = torch.Generator().manual_seed(9)
    z = torch.randn(2, 3, B, LATENT, generator=gen)
    fb = torch.randn(2, 3, B, 1, 16, 16, generator=gen) * 1e-2
    stack = Stack([G for G, _ in bat], path=path)
    assert stack.path == path
    for k in range(2):
        for i in range(3):
            student_update(seq[i][0], seq[i][1], z[k, i], fb[k, i], teacher, 0.3, "bce")
        students_update(bat, z[k], fb[k], teacher, 0.3, "bce", stack=stack)
        stack.restack_params()
    _assert_same(seq, bat)


@pytest.mark.parametrize("path", ["grouped", "vmap"])
@pytest.mark.parametrize("train", [True, False])
def test_teacher_feedback_batched_equals_per_batch(path, train):
    D = _teacher().train(train)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    x = torch.randn(3, B, 1, 16, 16)
    labels, fb = teacher_feedback_batched(D, x, "bce", path=path)
    assert all(torch.equal(v, D.state_dict()[k]) for k, v in before.items())   # the teacher is never written
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


@pytest.mark.parametrize("path", ["grouped", "vmap"])
@pytest.mark.parametrize("kind", ["bce", "hinge"])
def test_discriminators_step_equals_each_client_step_then_feedback(kind, path):
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
        stats, labels, fb = discriminators_step(bat, real, fake, kind, path=path)
        for n, (st, lab, f) in enumerate(ref):
            assert all(abs(st[k] - stats[n][k]) < 1e-5 for k in st)
            assert torch.allclose(labels[n], lab, atol=1e-5) and torch.allclose(fb[n], f, atol=1e-6)
    _assert_same(seq, bat)


# --- the grouped layers themselves -------------------------------------------------------------
def _nets(kind: str, n: int, **kw):
    torch.manual_seed(11)
    if kind == "G":
        nets = [DCGANGenerator(latent_dim=LATENT, **kw) for _ in range(n)]
    else:
        nets = [DCGANDiscriminator(**kw) for _ in range(n)]
    for m in nets:   # away from the initialisation (BatchNorm weights 1 ± 0.02, biases 0): every entry matters
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return nets


@pytest.mark.parametrize("kind, kw, train", [
    ("G", dict(channels=1, image_size=16, features=4), True),
    ("G", dict(channels=3, image_size=32, features=8), True),
    ("G", dict(channels=3, image_size=32, features=8), False),
    ("D", dict(channels=1, image_size=16, features=4, norm="batch"), True),
    ("D", dict(channels=3, image_size=32, features=8, norm="batch"), False),
    ("D", dict(channels=3, image_size=32, features=8, norm="layer"), True),
    ("D", dict(channels=1, image_size=16, features=4, norm="none"), True),
])
def test_grouped_layers_equal_each_network_forward_backward_and_running_stats(kind, kw, train):
    """Stack(path="grouped") == each network on its own slice: outputs, the gradient of every
    network's parameters and of the inputs, and the BatchNorm running statistics (and
    num_batches_tracked) written back -- in train and eval mode, for BatchNorm, GroupNorm(1, C)
    ("layer") and no norm (convolutions with biases)."""
    n = 3
    ref, mine = _nets(kind, n, **kw), _nets(kind, n, **kw)
    for m in ref + mine:
        m.train(train)
    gen = torch.Generator().manual_seed(12)
    x = (torch.randn(n, B, LATENT, generator=gen) if kind == "G"
         else torch.rand(n, B, kw["channels"], kw["image_size"], kw["image_size"], generator=gen) * 2 - 1)
    stack = Stack(mine, path="grouped")
    assert stack.path == "grouped"
    x_ref, x_mine = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    out_ref = torch.stack([m(x_ref[i]) for i, m in enumerate(ref)])
    out_mine = stack(x_mine)
    assert out_mine.shape == out_ref.shape
    assert torch.allclose(out_mine, out_ref, atol=1e-5, rtol=1e-5)
    weight = torch.randn(out_ref.shape, generator=gen)          # a different gradient for every output
    (out_ref * weight).sum().backward()
    (out_mine * weight).sum().backward()
    stack.grads_to_modules()
    stack.write_buffers()
    assert torch.allclose(x_mine.grad, x_ref.grad, atol=1e-5, rtol=1e-4)
    for a, b in zip(ref, mine):
        for (name, p), q in zip(a.named_parameters(), b.parameters()):
            assert torch.allclose(q.grad, p.grad, atol=1e-5, rtol=1e-4), name
        for (name, t), u in zip(a.named_buffers(), b.buffers()):
            assert torch.allclose(u.float(), t.float(), atol=1e-6), name
    if train and any(isinstance(layer, nn.BatchNorm2d) for layer in ref[0].modules()):
        assert int(dict(mine[0].named_buffers())["net.1.num_batches_tracked" if kind == "G"
                                                   else "net.3.num_batches_tracked"]) == 1


def test_grouped_transposed_convolution_with_few_channels_and_a_bias():
    """The image layer of a generator (fewer than 8 output channels) runs as batched matrix
    products + col2im; with a bias (DCGAN's has none) it still equals the layer."""
    n = 4
    ref, mine = _nets("G", n, channels=3, image_size=16, features=8), _nets("G", n, channels=3, image_size=16, features=8)
    for nets in (ref, mine):
        for m in nets:
            torch.manual_seed(13)
            m.net[-2] = nn.ConvTranspose2d(8, 3, 4, 2, 1, bias=True)
            nn.init.normal_(m.net[-2].bias, 0.0, 0.5)
    z = torch.randn(n, B, LATENT)
    stack = Stack(mine, path="grouped")
    out = stack(z)
    expected = torch.stack([m(z[i]) for i, m in enumerate(ref)])
    assert torch.allclose(out, expected, atol=1e-5)
    out.sum().backward()
    expected.sum().backward()
    stack.grads_to_modules()
    for a, b in zip(ref, mine):
        assert torch.allclose(b.net[-2].bias.grad, a.net[-2].bias.grad, atol=1e-4)
        assert torch.allclose(b.net[-2].weight.grad, a.net[-2].weight.grad, atol=1e-4)


def test_stack_path_chosen_and_validated():
    gens = _nets("G", 2, channels=1, image_size=16, features=4)
    assert Stack(gens).path == "grouped"                         # DCGANs on the CPU
    assert Stack(gens, path="vmap").path == "vmap"
    mlps = [build_generator("mlp", latent_dim=LATENT, channels=1, image_size=16, features=4, out_dim=2)
            for _ in range(2)]
    assert grouped_plan(mlps[0]) is None and Stack(mlps).path == "vmap"
    with pytest.raises(ValueError, match="MLPGenerator has no grouped path"):
        Stack(mlps, path="grouped")
    with pytest.raises(ValueError, match="path must be one of"):
        Stack(gens, path="fast")
    odd = _nets("D", 2, channels=1, image_size=16, features=4)
    odd[0].net[0] = nn.Conv2d(1, 4, 4, 2, 1, dilation=1, padding_mode="reflect")
    assert grouped_plan(odd[0]) is None                          # a layer the grouped path does not compute


def test_chunked_stacks_equal_one_stack_and_sequential():
    """5 students and 5 clients' D_i in stacks of 2 (2 + 2 + 1): the same updates as one by one,
    the stats, labels and feedback in client order."""
    from models.batched import discriminators_step
    from models.steps import discriminator_step

    assert [(sl.start, sl.stop) for sl in chunk_slices(5, "cpu", 2)] == [(0, 2), (2, 4), (4, 5)]
    assert len(chunk_slices(100, "cpu")) == 4 and len(chunk_slices(100, "meta")) == 1   # 32 per stack on the CPU only
    with pytest.raises(ValueError, match="chunk must be at least 1"):
        chunk_slices(5, "cpu", 0)
    seq, bat = _students(5), _students(5)
    teacher = _teacher()
    gen = torch.Generator().manual_seed(21)
    for _ in range(2):
        z = torch.randn(5, B, LATENT, generator=gen)
        fb = torch.randn(5, B, 1, 16, 16, generator=gen) * 1e-2
        expected = [student_update(G, o, z[i], fb[i], teacher, 0.5, "bce")["g_loss_teacher"] for i, (G, o) in enumerate(seq)]
        got = students_update(bat, z, fb, teacher, 0.5, "bce", chunk=2)
        assert len(got) == 5 and all(abs(a - b) < 1e-5 for a, b in zip(expected, got))
    _assert_same(seq, bat)

    def discs():
        torch.manual_seed(22)
        return [(D, make_optimizer("bce", D.parameters(), 2e-3, (0.5, 0.999)))
                for D in (build_discriminator("dcgan", channels=1, image_size=16, features=4, loss="bce").train()
                          for _ in range(5))]
    dseq, dbat = discs(), discs()
    for _ in range(2):
        real = torch.rand(5, B, 1, 16, 16, generator=gen) * 2 - 1
        fake = torch.rand(5, B, 1, 16, 16, generator=gen) * 2 - 1
        stats, labels, feedback = discriminators_step(dbat, real, fake, "bce", chunk=2)
        assert len(stats) == 5 and labels.shape == (5, B) and feedback.shape == fake.shape
        for n, (D, opt) in enumerate(dseq):
            st = discriminator_step(D, opt, real[n], fake[n], "bce")
            lab, f = generator_feedback(D, fake[n], "bce")
            assert abs(st["d_loss"] - stats[n]["d_loss"]) < 1e-5
            assert torch.allclose(labels[n], lab, atol=1e-5) and torch.allclose(feedback[n], f, atol=1e-6)
    _assert_same(dseq, dbat)
