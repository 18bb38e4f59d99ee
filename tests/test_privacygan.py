"""PrivacyGAN math and message handling, without the simulation engine.

The server's JRLF update, computed from what a client sends back, must equal the
autograd gradient of  α·L_G(D_i(G_i(z))) + (1−α)·L_G(D_T(G_i(z)))  taken in one process.
"""

import copy

import pytest
import torch
from flwr.app import ConfigRecord, RecordDict

from models import DCGANDiscriminator, DCGANGenerator, generator_loss
from strategies import wire
from strategies.base import NullRecorder
from strategies.privacygan import (CLIENT_STATE, PrivacyGAN, PrivacyGANSettings, _load_state, alpha_at, load_client_state,
                                   client_discriminate, stale_feedback_errors, student_update)

SIDE, C, NZ, F = 16, 1, 8, 8


def nets(seed=0):
    torch.manual_seed(seed)
    return (DCGANGenerator(NZ, C, SIDE, F), DCGANDiscriminator(C, SIDE, F), DCGANDiscriminator(C, SIDE, F))


def real_sampler(seed=1):
    data = torch.rand(50, C, SIDE, SIDE, generator=torch.Generator().manual_seed(seed)) * 2 - 1
    return lambda b, gen: data[torch.randint(len(data), (b,), generator=gen)]


def make_strategy(G_T, D_T, **kw):
    s = PrivacyGANSettings(latent_dim=NZ, batch_size=8, samples_per_client=4, **kw)
    return PrivacyGAN(s, teacher_g=G_T, teacher_d=D_T, make_generator=lambda: DCGANGenerator(NZ, C, SIDE, F),
                      make_gen_optimizer=lambda G: torch.optim.SGD(G.parameters(), lr=1.0),
                      recorder=NullRecorder(), sample_shape=(C, SIDE, SIDE))


def client(content, state, loss="bce", init_d=None):
    def build():
        torch.manual_seed(123)
        return DCGANDiscriminator(C, SIDE, F)
    return client_discriminate(content, state, sample_real=real_sampler(), build_discriminator=build,
                               disc_lr=1e-3, betas=(0.5, 0.999), device="cpu", seed=0, partition_id=0)


def client_d(state):
    torch.manual_seed(123)
    D = DCGANDiscriminator(C, SIDE, F)
    _load_state(state.config_records[CLIENT_STATE], D, torch.optim.Adam(D.parameters()))
    return D


def first_batch(content):
    """The same message cut to its first fake batch: what the exact K = 1 protocol would send."""
    fakes = wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES)
    return RecordDict({wire.FAKES: wire.tensor_record(**{wire.FAKES: fakes[:1].contiguous()}),
                       wire.CONFIG: content.config_records[wire.CONFIG]})


@pytest.mark.parametrize("K", [1, 2, 4])
@pytest.mark.parametrize("loss", ["bce", "wgan"])
@pytest.mark.parametrize("alpha", [0.3, 0.7, 1.0])
def test_first_step_of_a_k_step_round_equals_the_centralized_jrlf_update(loss, alpha, K):
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T, alpha=alpha, loss=loss, steps_per_round=K)
    G_before = copy.deepcopy(strat.student(7)[0])
    content, z = strat.build_content(7, 1)
    assert z.shape == (K, 8, NZ)
    # the fakes the client judges are exactly G_i(z_1) as the update recomputes it (BatchNorm on B, not K·B)
    sent = wire.decode_fakes(wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES), "float32")
    with torch.no_grad():
        assert torch.equal(sent[0], copy.deepcopy(G_before)(z[0]))
    reply = client(content, RecordDict(), loss)
    labels, feedback, _ = strat.parse_content(reply)
    G, opt = strat.student(7)
    student_update(G, opt, z[0], feedback[0], strat.teacher_d, alpha, loss)

    # reference: one process, autograd of the JRLF objective (thesis Eq. 5.9) on the same z, with D_i as
    # it is after its update on the first fake batch (the client's own function on that batch alone)
    ref_state = RecordDict()
    client(first_batch(content), ref_state, loss)
    D_i = client_d(ref_state).train()
    ref = copy.deepcopy(G_before)
    x = ref(z[0])
    objective = alpha * generator_loss(loss, D_i(x))
    if alpha < 1:
        objective = objective + (1 - alpha) * generator_loss(loss, D_T(x))
    grads = torch.autograd.grad(objective, list(ref.parameters()))
    for p_fed, p0, g in zip(G.parameters(), G_before.parameters(), grads):
        torch.testing.assert_close(p0 - p_fed, g, atol=1e-5, rtol=0)  # SGD lr=1: the step is the gradient
    # the labels the client sent for batch 1 are D_i's outputs on the fakes it received
    torch.testing.assert_close(labels[0], D_i(sent[0]).detach())


def test_staleness_is_zero_at_the_first_step_and_grows_after_it():
    G_T, D_T, _ = nets()
    G = copy.deepcopy(G_T)
    torch.manual_seed(5)
    D = DCGANDiscriminator(C, SIDE, F)
    z = torch.randn(4, 8, NZ, generator=torch.Generator().manual_seed(3))
    errors = stale_feedback_errors(G, torch.optim.Adam(G.parameters(), 1e-2), D, torch.optim.Adam(D.parameters(), 1e-3),
                                   D_T, z, real_sampler(), torch.Generator().manual_seed(0), alpha=0.5, loss="bce")
    assert len(errors) == 4
    assert errors[0] < 1e-5                       # step 1 is exact
    assert all(e > 1e-3 for e in errors[1:])      # steps 2..K apply feedback on outdated fakes


def test_alpha_one_is_exactly_the_plain_federated_gan_update():
    G_T, D_T, D_i = nets()
    z = torch.randn(8, NZ)
    G1 = copy.deepcopy(G_T)
    G2 = copy.deepcopy(G_T)
    f = torch.randn(8, C, SIDE, SIDE) * 1e-3
    student_update(G1, torch.optim.SGD(G1.parameters(), lr=0.1), z, f, D_T, 1.0, "bce")
    opt = torch.optim.SGD(G2.parameters(), lr=0.1)
    x = G2(z)
    opt.zero_grad()
    x.backward(f)
    opt.step()
    for a, b in zip(G1.parameters(), G2.parameters()):
        assert torch.equal(a, b)


def test_alpha_outside_unit_interval_is_refused():
    for alpha in (0.0, 1.5, -1):
        with pytest.raises(ValueError, match="alpha"):
            PrivacyGANSettings(alpha=alpha)


def test_alpha_schedule_is_linear_from_alpha_to_alpha_final_over_the_rounds():
    assert [alpha_at(r, 5, 0.5) for r in range(1, 6)] == [0.5] * 5                      # no schedule
    assert [alpha_at(r, 5, 0.5, 1.0) for r in range(1, 6)] == [0.5, 0.625, 0.75, 0.875, 1.0]
    assert [alpha_at(r, 3, 0.9, 0.3) for r in (1, 2, 3)] == pytest.approx([0.9, 0.6, 0.3])  # either way
    assert alpha_at(1, 1, 0.5, 1.0) == 0.5                                               # a single round
    with pytest.raises(ValueError, match="alpha_final"):
        PrivacyGANSettings(alpha_final=1.5)


def test_teacher_never_changes_during_student_updates():
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T, alpha=0.5)
    before_d = copy.deepcopy(strat.teacher_d.state_dict())
    before_g = copy.deepcopy(strat.teacher_g.state_dict())
    state = RecordDict()
    for rnd in range(3):
        content, z = strat.build_content(1, rnd)
        _, fb, _ = strat.parse_content(client(content, state))
        G, opt = strat.student(1)
        student_update(G, opt, z[0], fb[0], strat.teacher_d, 0.5, "bce")
    strat.samples()
    for k, v in strat.teacher_d.state_dict().items():
        assert torch.equal(v, before_d[k]), k
    for k, v in strat.teacher_g.state_dict().items():
        assert torch.equal(v, before_g[k]), k
    assert all(p.grad is None and not p.requires_grad for p in strat.teacher_d.parameters())
    # ... while the student did move away from its teacher initialisation
    assert not torch.equal(next(strat.student(1)[0].parameters()), next(strat.teacher_g.parameters()))


def contains(haystack: torch.Tensor, needle: torch.Tensor) -> bool:
    """True when the values of ``needle`` appear in ``haystack`` as one contiguous run."""
    h, n = haystack.detach().float().flatten(), needle.detach().float().flatten()
    if n.numel() > h.numel():
        return False
    return bool((h.unfold(0, n.numel(), 1) == n).all(dim=1).any())


def test_discriminator_state_persists_on_the_client_and_never_travels():
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T, steps_per_round=2, client_disc_steps=3)
    state = RecordDict()
    for rnd in (1, 2, 3):
        content, _ = strat.build_content(1, rnd)
        reply = client(content, state)
        _, _, metrics = strat.parse_content(reply)
        assert metrics["d_steps_total"] == rnd * 2 * 3        # K · client-disc-steps per round
        assert metrics["d_fresh"] == (1 if rnd == 1 else 0)
        assert set(reply.keys()) == {wire.REPLY, wire.METRICS}
        assert set(reply.array_records[wire.REPLY].keys()) == {wire.LABELS, wire.FEEDBACK}
        # no weight, buffer or optimizer moment of D_i is in the reply, in any position or shape
        D_i = client_d(state)
        opt_state = _opt_state(state)
        secrets = [t for t in D_i.state_dict().values() if t.is_floating_point() and t.numel() >= 4]
        secrets += [t for st in opt_state.values() for t in st.values()
                    if torch.is_tensor(t) and t.is_floating_point() and t.numel() >= 4]
        for key in reply.array_records[wire.REPLY].keys():
            sent = wire.get_tensor(reply.array_records[wire.REPLY], key)
            assert not any(contains(sent, t) for t in secrets), key
    assert state.config_records[CLIENT_STATE]["d-steps-total"] == 18


def _opt_state(state):
    return load_client_state(state.config_records[CLIENT_STATE])["opt"]["state"]


def test_client_d_init_teacher_loads_the_teachers_weights_once():
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T, client_d_init="teacher")
    content, _ = strat.build_content(1, 1)
    assert wire.D_INIT in content.array_records
    state = RecordDict()
    client(content, state)
    blob = load_client_state(state.config_records[CLIENT_STATE])
    # one D step moved it, but it started from D_T, not from the client's random init:
    diff_teacher = sum((blob["d"][k].float() - v.float()).abs().sum() for k, v in D_T.state_dict().items()
                       if v.is_floating_point())
    torch.manual_seed(123)
    fresh = DCGANDiscriminator(C, SIDE, F).state_dict()
    diff_random = sum((blob["d"][k].float() - v.float()).abs().sum() for k, v in fresh.items()
                      if v.is_floating_point())
    assert diff_teacher < diff_random


@pytest.mark.parametrize("fakes_dtype,fake_item", [("float32", 4), ("float16", 2), ("uint8", 1)])
@pytest.mark.parametrize("feedback_dtype,fb_item", [("float32", 4), ("float16", 2)])
def test_bytes_of_one_round_equal_hand_arithmetic(fakes_dtype, fake_item, feedback_dtype, fb_item):
    G_T, D_T, _ = nets()
    K, B = 3, 8
    strat = make_strategy(G_T, D_T, steps_per_round=K, fakes_dtype=fakes_dtype, feedback_dtype=feedback_dtype)
    content, _ = strat.build_content(1, 1)
    n = K * B * C * SIDE * SIDE
    config = {"round": 8, "loss": 3, "fakes-dtype": len(fakes_dtype), "feedback-dtype": len(feedback_dtype),
              "client-disc-steps": 8}
    down = (128 + n * fake_item + len("fakes")) + sum(len(k) + v for k, v in config.items())
    assert wire.record_bytes(content) == down
    reply = client(content, RecordDict())
    metric_keys = ["d_loss", "d_real_acc", "d_fake_acc", "d_steps_total", "d_fresh", "partition_id"]
    up = (128 + K * B * 4 + len("labels")) + (128 + n * fb_item + len("feedback")) \
        + sum(8 + len(k) for k in metric_keys)
    assert wire.record_bytes(reply) == up


def test_lossy_codecs_are_what_the_client_trains_on():
    """uint8 fakes: the client's D_i step and its labels use the decoded 8-bit values, not the
    server's float fakes; float16 feedback: the server's update uses the decoded values."""
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T, fakes_dtype="uint8", feedback_dtype="float16")
    content, z = strat.build_content(1, 1)
    raw = wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES)
    assert raw.dtype == torch.uint8
    decoded = wire.decode_fakes(raw, "uint8")[0]
    exact = strat.student(1)[0](z[0]).detach()
    assert 0 < (decoded - exact).abs().max() <= 1 / 127.5 + 1e-6       # lossy, within half a level

    def d_after_one_step(fakes):
        """Reference: the client's first D step on (its first real batch, ``fakes``)."""
        state = RecordDict()
        client(RecordDict({wire.FAKES: wire.tensor_record(**{wire.FAKES: fakes.unsqueeze(0)}),
                           wire.CONFIG: ConfigRecord({**dict(content.config_records[wire.CONFIG]),
                                                      "fakes-dtype": "float32"})}), state)
        return client_d(state)

    state = RecordDict()
    reply = client(content, state)
    trained = client_d(state).state_dict()
    on_decoded, on_exact = d_after_one_step(decoded).state_dict(), d_after_one_step(exact).state_dict()
    for k, v in trained.items():
        assert torch.equal(v, on_decoded[k]), k
    assert any(not torch.equal(v, on_exact[k]) for k, v in trained.items())
    labels, feedback, _ = strat.parse_content(reply)
    torch.testing.assert_close(labels[0], client_d(state).train()(decoded).detach())
    # float16 feedback: what the server applies is the decoded float16 value
    fb16 = wire.get_tensor(reply.array_records[wire.REPLY], wire.FEEDBACK)
    assert fb16.dtype == torch.float16
    assert torch.equal(feedback, fb16.float() / 8)


def test_a_rejoining_node_takes_over_the_student_of_its_partition():
    G_T, D_T, _ = nets()
    strat = make_strategy(G_T, D_T)
    G_old, _ = strat.student(11)
    strat.partition_of[11] = 0
    with torch.no_grad():
        next(G_old.parameters()).add_(1.0)               # the student has learned something
    strat.student(22)                                     # the restarted node's fresh student
    strat.partition_of[22] = 0
    rejoined = strat.adopt_rejoined({22: (None, None, {"partition_id": 0})}, nodes=[22])
    assert rejoined == {22} and strat.students[22][0] is G_old and 11 not in strat.students
    # a node that is still connected keeps its own student
    strat.student(33)
    strat.partition_of[33] = 0
    assert strat.adopt_rejoined({33: (None, None, {})}, nodes=[22, 33]) == set()


def test_a_returning_client_reuses_the_processes_d_and_replies_exactly_as_with_a_new_one():
    """One process serving two clients alternately (a simulation actor): with ``reuse`` D_i is built
    once per new client and otherwise loaded into the module the last message used; replies and
    saved states are bit-identical to building D_i anew for every message."""
    G_T, D_T, _ = nets()
    built = []

    def run(reuse):
        strat = make_strategy(G_T, D_T, steps_per_round=2)   # the same fakes in both runs
        states = {1: RecordDict(), 2: RecordDict()}
        replies = []

        def build(pid):
            def make():
                built.append(pid)
                torch.manual_seed(100 + pid)
                return DCGANDiscriminator(C, SIDE, F)
            return make

        for rnd in (1, 2, 3):
            for nid in (1, 2):
                content, _ = strat.build_content(nid, rnd)
                replies.append(client_discriminate(content, states[nid], sample_real=real_sampler(nid),
                                                   build_discriminator=build(nid), disc_lr=1e-3, betas=(0.5, 0.999),
                                                   device="cpu", seed=0, partition_id=nid, reuse=reuse))
        return replies, states

    torch.manual_seed(0)
    fresh_replies, fresh_states = run(None)
    assert built == [1, 2] * 3
    built.clear()
    torch.manual_seed(0)
    reuse: dict = {}
    reused_replies, reused_states = run(reuse)
    assert built == [1, 2] and isinstance(reuse["d"], DCGANDiscriminator)   # no rebuild after first contact
    for a, b in zip(fresh_replies, reused_replies):
        for key in (wire.LABELS, wire.FEEDBACK):
            assert torch.equal(wire.get_tensor(a.array_records[wire.REPLY], key),
                               wire.get_tensor(b.array_records[wire.REPLY], key))
    for nid in (1, 2):
        sa, sb = (load_client_state(s[nid].config_records[CLIENT_STATE]) for s in (fresh_states, reused_states))
        assert all(torch.equal(sa["d"][k], sb["d"][k]) for k in sa["d"]) and sa["steps"] == sb["steps"] == 6


@pytest.mark.parametrize("loss, dp", [("bce", False), ("wgan", False), ("bce", True)])
def test_client_d_train_head_moves_only_the_last_layer_of_the_teachers_d(loss, dp):
    """client-d-train=head: over two messages D_i's last convolution moves and every other
    parameter stays exactly D_T's (also under the clipped WGAN's weight clamp and with DP-SGD, whose
    per-example gradients then cover the head only)."""
    from models.dp import DPConfig

    norm = "layer" if dp else "batch"
    G_T, _, _ = nets()
    torch.manual_seed(5)
    D_T = DCGANDiscriminator(C, SIDE, F, norm=norm)
    with torch.no_grad():   # make some body weights exceed the WGAN clamp: a clamp would move them
        D_T.net[0].weight.mul_(10.0)
    strat = make_strategy(G_T, D_T, client_d_init="teacher", loss=loss, steps_per_round=2)
    data = torch.rand(40, C, SIDE, SIDE, generator=torch.Generator().manual_seed(3)) * 2 - 1
    state = RecordDict()
    for rnd in (1, 2):
        content, _ = strat.build_content(1, rnd)
        strat.d_init_sent.add(1)
        reply = client_discriminate(
            content, state, sample_real=real_sampler(), build_discriminator=lambda: DCGANDiscriminator(C, SIDE, F, norm=norm),
            disc_lr=1e-2, betas=(0.5, 0.999), device="cpu", seed=0, partition_id=0, train="head",
            dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-3) if dp else None,
            real_data=data if dp else None)
        assert wire.REPLY in reply
    d = load_client_state(state.config_records[CLIENT_STATE])["d"]
    head = f"net.{len(D_T.net) - 1}."
    params = dict(D_T.named_parameters())
    assert {k for k in params if k.startswith(head)} == {head + "weight", head + "bias"}
    assert not torch.equal(d[head + "weight"], params[head + "weight"])   # (a WGAN critic's bias gets no gradient)
    for k, v in params.items():
        if not k.startswith(head):
            assert torch.equal(d[k], v), k


def test_client_d_train_head_needs_privacygan_and_the_teachers_d():
    from app.config import ConfigError, parse_config

    with pytest.raises(ConfigError, match=r"'client-d-train' = 'head'.*client-d-init = 'teacher'"):
        parse_config({"client-d-train": "head"})
    with pytest.raises(ConfigError, match=r"'client-d-train' = 'head'.*unless strategy = privacygan"):
        parse_config({"client-d-train": "head", "strategy": "local"})
    with pytest.raises(ConfigError, match=r"'client-d-train' = 'last'"):
        parse_config({"client-d-train": "last", "client-d-init": "teacher"})
    assert parse_config({"client-d-train": "head", "client-d-init": "teacher"}).client_d_train == "head"


# --- server-negatives (issue #17): the server's own images for D_i to reject ------------------
def server_images(n=40, seed=5):
    """The server's 'own data': images on the 8-bit grid (as decoded datasets are), so the
    uint8 wire encoding carries them exactly."""
    pixels = torch.randint(0, 256, (n, C, SIDE, SIDE), generator=torch.Generator().manual_seed(seed))
    return pixels.float() / 127.5 - 1.0


def negatives_strategy(K=2, M=3, **kw):
    G_T, D_T, _ = nets()
    images = server_images()
    s = PrivacyGANSettings(latent_dim=NZ, batch_size=8, samples_per_client=4, steps_per_round=K,
                           server_negatives=M, **kw)
    strat = PrivacyGAN(s, teacher_g=G_T, teacher_d=D_T, make_generator=lambda: DCGANGenerator(NZ, C, SIDE, F),
                       make_gen_optimizer=lambda G: torch.optim.SGD(G.parameters(), lr=1.0),
                       recorder=NullRecorder(), sample_shape=(C, SIDE, SIDE),
                       sample_negatives=lambda b, gen: images[torch.randint(len(images), (b,), generator=gen)])
    return strat, images


def test_server_negatives_are_the_servers_images_and_d_i_is_trained_to_reject_them():
    """What goes down: (K, M) of the server's own images as uint8 next to the fakes; what the
    client does with them: each D step adds the negatives' term (replayed here by hand with
    models.steps.discriminator_step, the same real batches, seeds and optimizer); what comes
    back: labels and feedback for the fakes only, plus d_neg_acc."""
    from models.losses import make_optimizer
    from models.steps import discriminator_step, generator_feedback
    K, M, B = 2, 3, 8
    strat, images = negatives_strategy(K, M)
    content, _ = strat.build_content(1, 1)
    sent = wire.get_tensor(content.array_records[wire.FAKES], wire.NEGATIVES)
    assert sent.dtype == torch.uint8 and tuple(sent.shape) == (K, M, C, SIDE, SIDE)
    decoded = wire.decode_fakes(sent, "uint8")
    for img in decoded.reshape(K * M, C, SIDE, SIDE):
        assert any(torch.equal(img, s) for s in images)          # one of the server's own images, exactly
    state = RecordDict()
    reply = client(content, state)
    assert set(reply.array_records[wire.REPLY].keys()) == {wire.LABELS, wire.FEEDBACK}
    labels, _, metrics = strat.parse_content(reply)
    assert tuple(labels.shape) == (K, B) and 0.0 <= metrics["d_neg_acc"] <= 1.0

    torch.manual_seed(123)
    D = DCGANDiscriminator(C, SIDE, F)
    opt = make_optimizer("bce", D.parameters(), 1e-3, (0.5, 0.999))
    gen, sample = torch.Generator().manual_seed(0), real_sampler()
    fakes = wire.decode_fakes(wire.get_tensor(content.array_records[wire.FAKES], wire.FAKES), "float32")
    for k in range(K):
        discriminator_step(D, opt, sample(B, gen), fakes[k], "bce", negatives=decoded[k])
        generator_feedback(D, fakes[k], "bce")       # the feedback pass (BatchNorm statistics move too)
    for (key, mine), theirs in zip(D.state_dict().items(), client_d(state).state_dict().values()):
        assert torch.allclose(mine.float(), theirs.float(), atol=1e-6), key
    # ... and it is not what the client would have done without them
    plain = RecordDict({wire.FAKES: wire.tensor_record(**{wire.FAKES: fakes}),
                        wire.CONFIG: content.config_records[wire.CONFIG]})
    state_plain = RecordDict()
    client(plain, state_plain)
    assert not all(torch.allclose(a.float(), b.float(), atol=1e-6) for a, b in
                   zip(client_d(state_plain).state_dict().values(), client_d(state).state_dict().values()))


def test_server_negatives_bytes_equal_hand_arithmetic_and_resume_draws_the_same_ones():
    K, M, B = 2, 3, 8
    strat, _ = negatives_strategy(K, M)
    content, _ = strat.build_content(1, 1)
    n = K * B * C * SIDE * SIDE
    config = {"round": 8, "loss": 3, "fakes-dtype": 7, "feedback-dtype": 7, "client-disc-steps": 8}
    down = (128 + n * 4 + len("fakes")) + (128 + K * M * C * SIDE * SIDE * 1 + len("negatives")) \
        + sum(len(k) + v for k, v in config.items())
    assert wire.record_bytes(content) == down
    metric_keys = ["d_loss", "d_real_acc", "d_fake_acc", "d_steps_total", "d_fresh", "d_neg_acc", "partition_id"]
    up = (128 + K * B * 4 + len("labels")) + (128 + n * 4 + len("feedback")) + sum(8 + len(k) for k in metric_keys)
    assert wire.record_bytes(client(content, RecordDict())) == up
    # drawn from (seed, round, node) alone: a restarted server sends the same negatives
    again, _ = negatives_strategy(K, M)
    assert torch.equal(again.negatives(1, 1), strat.negatives(1, 1))
    assert not torch.equal(strat.negatives(1, 2), strat.negatives(1, 1))
    assert not torch.equal(strat.negatives(2, 1), strat.negatives(1, 1))


def test_server_negatives_need_a_sampler_and_go_through_the_dp_step_with_dp():
    G_T, D_T, _ = nets()
    with pytest.raises(ValueError, match="needs sample_negatives"):
        make_strategy(G_T, D_T, server_negatives=4)
    strat, _ = negatives_strategy()
    content, _ = strat.build_content(1, 1)
    from models.dp import DPConfig

    def no_sampling(*_a, **_k):
        raise AssertionError("the non-DP real-batch sampler was used with dp on")
    reply = client_discriminate(content, RecordDict(), sample_real=no_sampling,
                                build_discriminator=lambda: DCGANDiscriminator(C, SIDE, F, norm="layer"),
                                disc_lr=1e-3, betas=(0.5, 0.999), device="cpu", seed=0, partition_id=0,
                                dp=DPConfig(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-5),
                                real_data=torch.zeros(20, C, SIDE, SIDE))
    metrics = reply.metric_records[wire.METRICS]
    assert 0.0 <= metrics["d_neg_acc"] <= 1.0 and metrics["dp_epsilon"] > 0
