"""DP-SGD (models/dp.py): per-example clipping, the torch.func gradient, the noise, opacus's
accounting, every client code path under dp=true, config validation and budget exhaustion."""

import json
import math
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from app.builders import dp_settings, make_discriminator
from app.config import ConfigError, check_dp_data, parse_config
from models import MLPDiscriminator, MLPGenerator
from models.dcgan import DCGANDiscriminator
from models.dp import (DPAccount, DPConfig, clip_per_example, dp_discriminator_gradient, per_example_grads,
                       poisson_sample, private_real_gradient, real_term)
from models.factory import build_discriminator
from strategies import base, bpgan, dataparallel, fedavg, local, mggan, privacygan, wire
from strategies.base import DP_STATE, NullRecorder

pytestmark = pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")

NZ, DIM, H = 4, 2, 16
DATA = torch.randn(50, DIM, generator=torch.Generator().manual_seed(3))


def mlp_d(seed=0):
    torch.manual_seed(seed)
    return MLPDiscriminator(DIM, H, layers=2)


def mlp_g(seed=1):
    torch.manual_seed(seed)
    return MLPGenerator(NZ, DIM, H, layers=2)


def flat_norms(grads):
    return torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))


# ---------------------------------------------------------------------------------------------
# (a) clipping
# ---------------------------------------------------------------------------------------------
def test_per_example_clipping_bound_holds_and_small_gradients_are_unchanged():
    D = mlp_d()
    x = torch.randn(12, DIM) * 3
    grads = per_example_grads(D, x, "bce")
    norms = flat_norms(grads)
    C = float(norms.median())                     # about half are clipped, half are not
    clipped, before = clip_per_example(grads, C)
    assert torch.equal(before, norms)
    after = flat_norms(clipped)
    assert (after <= C + 1e-6).all()
    small = norms < C
    assert small.any() and (~small).any()
    for k in grads:
        assert torch.equal(clipped[k][small], grads[k][small])          # unchanged, bit for bit
    assert torch.allclose(after[~small], torch.full_like(after[~small], C), atol=1e-5)


# ---------------------------------------------------------------------------------------------
# (b) the torch.func path equals autograd
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["bce", "wgan"])
@pytest.mark.parametrize("net", ["mlp", "dcgan"])
def test_dp_real_gradient_without_clipping_or_noise_is_the_autograd_gradient_over_qn(kind, net):
    if net == "mlp":
        D, x = mlp_d(), torch.randn(7, DIM)
    else:
        torch.manual_seed(0)
        D, x = DCGANDiscriminator(1, 16, 8, norm="layer"), torch.randn(7, 1, 16, 16)
    expected_batch = 5.5   # q * n
    got = private_real_gradient(D, x, kind, expected_batch=expected_batch, noise_multiplier=0.0, max_grad_norm=1e9)
    params = [p for p in D.parameters()]
    ref = torch.autograd.grad(real_term(kind, D(x)).sum(), params)
    for (name, _), r in zip(D.named_parameters(), ref):
        torch.testing.assert_close(got[name], r / expected_batch, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# (c) the noise
# ---------------------------------------------------------------------------------------------
def test_noise_has_std_sigma_times_c_and_is_seeded():
    D = MLPDiscriminator(DIM, 256, layers=3)       # ~130k coordinates
    empty = torch.zeros(0, DIM)                    # an empty Poisson draw: the data gradient is zero
    sigma, C = 1.7, 0.6

    def draw(seed):
        g = private_real_gradient(D, empty, "bce", expected_batch=1.0, noise_multiplier=sigma, max_grad_norm=C,
                                  noise_generator=torch.Generator().manual_seed(seed))
        return torch.cat([v.flatten() for v in g.values()])

    a = draw(5)
    assert a.numel() > 100_000
    assert abs(float(a.std()) / (sigma * C) - 1) < 0.02
    assert abs(float(a.mean())) < 0.02 * sigma * C
    assert torch.equal(a, draw(5)) and not torch.equal(a, draw(6))


def test_poisson_sampling_is_seeded_independent_and_may_be_empty():
    idx = poisson_sample(10_000, 0.1, torch.Generator().manual_seed(0))
    assert abs(len(idx) - 1000) < 150 and len(set(idx.tolist())) == len(idx)
    assert torch.equal(idx, poisson_sample(10_000, 0.1, torch.Generator().manual_seed(0)))
    sizes = [len(poisson_sample(3, 0.05, torch.Generator().manual_seed(s))) for s in range(50)]
    assert 0 in sizes
    # an empty draw still gives a well-formed (noise + fake-term) gradient and finite stats
    D = mlp_d()
    grads, stats = dp_discriminator_gradient(D, torch.zeros(0, DIM), torch.randn(4, DIM), "bce", expected_batch=2.0,
                                             noise_multiplier=1.0, max_grad_norm=1.0)
    assert set(grads) == {n for n, _ in D.named_parameters()}
    assert all(math.isfinite(v) for v in stats.values())


def test_fake_term_is_added_unclipped():
    D = mlp_d()
    fake = torch.randn(6, DIM) * 5
    grads, _ = dp_discriminator_gradient(D, torch.zeros(0, DIM), fake, "bce", expected_batch=1.0,
                                         noise_multiplier=0.0, max_grad_norm=1e-9)
    ref = torch.autograd.grad(torch.nn.functional.softplus(D(fake)).mean(), list(D.parameters()))
    for (name, _), r in zip(D.named_parameters(), ref):
        torch.testing.assert_close(grads[name], r, atol=1e-6, rtol=1e-6)


def test_negative_term_is_added_unclipped_and_changes_nothing_private():
    """server-negatives under DP: the gradient with negatives is the gradient without them plus
    the autograd gradient of negative_loss on D(negatives) -- same real batch, same noise seed."""
    D = mlp_d()
    real, fake, neg = DATA[:5], torch.randn(6, DIM), torch.randn(7, DIM) * 3
    kw = dict(expected_batch=5.0, noise_multiplier=0.8, max_grad_norm=0.5)
    plain, s_plain = dp_discriminator_gradient(D, real, fake, "bce", noise_generator=torch.Generator().manual_seed(4),
                                               **kw)
    with_neg, s_neg = dp_discriminator_gradient(D, real, fake, "bce", negatives=neg,
                                                noise_generator=torch.Generator().manual_seed(4), **kw)
    ref = torch.autograd.grad(torch.nn.functional.softplus(D(neg)).mean(), list(D.parameters()))
    for (name, _), r in zip(D.named_parameters(), ref):
        torch.testing.assert_close(with_neg[name], plain[name] + r, atol=1e-6, rtol=1e-6)
    assert "d_neg_acc" not in s_plain
    with torch.no_grad():
        assert s_neg["d_neg_acc"] == pytest.approx(float((D(neg) < 0).float().mean()))
    assert s_neg["d_real_acc"] == s_plain["d_real_acc"] and s_neg["d_fake_acc"] == s_plain["d_fake_acc"]


def _clipped_mean_of_single_image_grads(D, images, loss_of_out, C):
    """Reference for dp-clip-fakes: one autograd pass per image, each gradient scaled to norm
    <= C by hand, then the mean (and how many of them were clipped)."""
    params = list(D.parameters())
    total, clipped = [torch.zeros_like(p) for p in params], 0
    for x in images:
        g = torch.autograd.grad(loss_of_out(D(x.unsqueeze(0))).sum(), params)
        norm = float(torch.sqrt(sum(t.pow(2).sum() for t in g)))
        scale = min(1.0, C / norm)
        clipped += scale < 1.0
        total = [a + t * scale for a, t in zip(total, g)]
    return [t / len(images) for t in total], clipped


def test_clip_fakes_clips_each_public_image_like_a_record_and_adds_no_noise():
    """dp-clip-fakes: the DP gradient is the same private real term (same batch, same noise seed)
    plus the mean of the fakes' and the negatives' per-image gradients, each clipped to C."""
    D = mlp_d()
    real, fake, neg = DATA[:5], torch.randn(9, DIM) * 5, torch.randn(7, DIM) * 3
    C = 0.3
    kw = dict(expected_batch=5.0, noise_multiplier=0.8, max_grad_norm=C)
    got, s_got = dp_discriminator_gradient(D, real, fake, "bce", negatives=neg, clip_public=True,
                                           noise_generator=torch.Generator().manual_seed(4), **kw)
    private = private_real_gradient(D, real, "bce", noise_generator=torch.Generator().manual_seed(4), **kw)
    softplus = torch.nn.functional.softplus
    ref_fake, n_fake = _clipped_mean_of_single_image_grads(D, fake, softplus, C)
    ref_neg, n_neg = _clipped_mean_of_single_image_grads(D, neg, softplus, C)
    assert n_fake > 0 and n_neg > 0                 # the bound bites on some of them
    for (name, _), f, n in zip(D.named_parameters(), ref_fake, ref_neg):
        torch.testing.assert_close(got[name], private[name] + f + n, atol=1e-6, rtol=1e-5)
    _, s_plain = dp_discriminator_gradient(D, real, fake, "bce", negatives=neg,
                                           noise_generator=torch.Generator().manual_seed(4), **kw)
    assert s_got == s_plain                         # same forward statistics either way


def test_clip_fakes_reaches_every_dp_step_of_a_client(monkeypatch):
    """run config dp-clip-fakes -> DPConfig.clip_public -> each DP step a client takes."""
    assert dp_settings(parse_config({"dp": True, "dp-clip-fakes": True})).clip_public is True
    assert dp_settings(parse_config({"dp": True})).clip_public is False
    seen = []
    real_step, real_train = base.dp_discriminator_step, base.dp_train_gan_step

    def step(*a, **k):
        seen.append(("step", k["clip_public"]))
        return real_step(*a, **k)

    def train(*a, **k):
        seen.append(("train", k["clip_public"]))
        return real_train(*a, **k)
    monkeypatch.setattr(base, "dp_discriminator_step", step)
    monkeypatch.setattr(base, "dp_train_gan_step", train)
    dp = DPConfig(noise_multiplier=1.3, max_grad_norm=1.0, delta=1e-3, clip_public=True)
    K, B = 2, 8
    content = RecordDict({
        wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(torch.randn(K, B, DIM), "float32")}),
        wire.CONFIG: ConfigRecord({"round": 1, "loss": "bce", "fakes-dtype": "float32", "feedback-dtype": "float32",
                                   "client-disc-steps": 1})})
    privacygan.client_discriminate(content, RecordDict(), sample_real=_no_sampling, build_discriminator=mlp_d,
                                   disc_lr=1e-3, betas=(0.5, 0.999), device="cpu", seed=0, partition_id=0, dp=dp,
                                   real_data=DATA)
    ls = local.Local(local.LocalSettings(latent_dim=NZ, batch_size=B, local_steps=1), recorder=NullRecorder())
    local.client_alone(ls.train_content(1), RecordDict(), sample_real=_no_sampling, build_generator=mlp_g,
                       build_discriminator=mlp_d, device="cpu", seed=0, partition_id=0, dp=dp, real_data=DATA)
    assert seen == [("step", True)] * K + [("train", True)]


# ---------------------------------------------------------------------------------------------
# (d) accounting
# ---------------------------------------------------------------------------------------------
def test_epsilon_equals_opacus_rdp_accountant_and_survives_plain_serialisation():
    from opacus.accountants import RDPAccountant

    q, sigma, steps, delta = 0.02, 1.1, 300, 1e-5
    ref = RDPAccountant()
    for _ in range(steps):
        ref.step(noise_multiplier=sigma, sample_rate=q)
    acc = DPAccount()
    acc.step(sigma, q, steps)
    assert acc.epsilon(delta) == pytest.approx(ref.get_epsilon(delta), rel=1e-12)
    rec = ConfigRecord(acc.to_plain())                       # what lives in context.state
    back = DPAccount.from_plain(rec)
    assert back.history == acc.history and back.steps == steps
    assert back.epsilon(delta) == acc.epsilon(delta)
    assert DPAccount().epsilon(delta) == 0.0


def test_a_large_sigma_over_few_steps_is_accounted_past_opacus_default_orders():
    """sigma 100 over 2 steps has its best Renyi order at 832: over opacus's default orders (up to
    63) epsilon is overstated and opacus warns; the ledger's orders (rdp_orders()) find the tighter
    value, the library's own number at those orders. noise_for_target checks sigma 100 first."""
    import warnings

    from opacus.accountants import RDPAccountant

    from models.dp import rdp_orders

    q, sigma, steps, delta = 16 / 60, 100.0, 2, 1e-5
    ref = RDPAccountant()
    ref.history = [(sigma, q, steps)]
    with pytest.warns(UserWarning, match="largest alpha"):
        loose = ref.get_epsilon(delta)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tight = DPAccount([(sigma, q, steps)]).epsilon(delta)
        DPAccount.noise_for_target(3.0, 1e-3, q, 4)
    assert tight < 0.8 * loose
    assert tight == pytest.approx(ref.get_epsilon(delta, alphas=rdp_orders()), rel=1e-12)


def test_noise_for_target_reaches_the_target_and_would_exceed_after_it():
    q, steps, delta, target = 0.05, 200, 1e-5, 3.0
    sigma = DPAccount.noise_for_target(target, delta, q, steps)
    acc = DPAccount()
    acc.step(sigma, q, steps)
    assert acc.epsilon(delta) <= target
    assert acc.epsilon(delta) == pytest.approx(target, rel=0.02)
    assert not DPAccount().would_exceed(target, delta, steps, noise_multiplier=sigma, sample_rate=q)
    assert acc.would_exceed(target, delta, steps)
    with pytest.raises(ValueError, match="unreachable"):
        DPAccount.noise_for_target(1e-4, delta, 0.5, 10_000)


# ---------------------------------------------------------------------------------------------
# (f) bad settings stop at start, naming the key
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, key", [
    ({"dp": True, "dp-noise-multiplier": 0}, "dp-noise-multiplier"),
    ({"dp": True, "dp-noise-multiplier": -1}, "dp-noise-multiplier"),
    ({"dp": True, "dp-max-grad-norm": 0}, "dp-max-grad-norm"),
    ({"dp": True, "dp-delta": 0}, "dp-delta"),
    ({"dp": True, "dp-delta": 1.5}, "dp-delta"),
    ({"dp": True, "dp-target-epsilon": -1}, "dp-target-epsilon"),
    ({"dp": True, "loss": "wgan-gp"}, "loss"),
    ({"dp": True, "loss": "hinge"}, "loss"),
    ({"dp": True, "strategy": "mggan", "mggan-losses": "bce,wgan-gp"}, "mggan-losses"),
    ({"dp": True, "strategy": "centralized"}, "dp"),
    ({"dp": True, "strategy": "fedavg", "resume": "/nonexistent/run"}, "resume"),
])
def test_bad_dp_settings_stop_at_start_naming_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_config(raw)


def test_data_dependent_dp_checks_name_their_key():
    cfg = parse_config({"dp": True, "dp-delta": 0.01})
    with pytest.raises(ConfigError, match="'dp-delta'.*1/n"):
        check_dp_data(cfg, 100)                       # delta >= 1/n
    assert check_dp_data(cfg, 99) == cfg.dp_noise_multiplier
    unreachable = parse_config({"dp": True, "dp-target-epsilon": 0.001, "num-rounds": 50})
    with pytest.raises(ConfigError, match="'dp-target-epsilon'"):
        check_dp_data(unreachable, 100)
    ok = parse_config({"dp": True, "dp-target-epsilon": 5.0, "num-rounds": 5, "steps-per-round": 1})
    assert 0 < check_dp_data(ok, 1000) < 100


def test_a_client_checks_its_own_n_at_first_contact():
    """The ClientApp resolves a client's DP settings from its dataset size (an error reply naming the key)."""
    from app.client_app import client_dp

    assert client_dp(parse_config({}), 100) is None
    with pytest.raises(ConfigError, match="'dp-delta'"):
        client_dp(parse_config({"dp": True, "dp-delta": 0.02}), 100)
    target = parse_config({"dp": True, "dp-target-epsilon": 4.0, "num-rounds": 5, "steps-per-round": 1})
    dp = client_dp(target, 640)
    q = target.batch_size / 640
    assert dp.noise_multiplier == pytest.approx(DPAccount.noise_for_target(4.0, target.dp_delta, q,
                                                                           target.dp_planned_steps()))
    assert dp.target_epsilon == 4.0 and dp.planned_steps == target.dp_planned_steps()


def test_simulation_launchers_check_every_partition_before_starting():
    """simulate() and fedgan-run check each virtual client's n before Ray starts, naming the key."""
    from app.client_app import check_dp_partitions
    from app.data import partition_summary
    from app.launch import check_run_config

    cfg = parse_config({"dp": True, "dp-delta": 0.01})        # digits by class: ~144 records per client of 5
    smallest = min(p["size"] for p in partition_summary(cfg.data_spec(), 5))
    assert 0.01 >= 1.0 / smallest                              # so the check must refuse it
    with pytest.raises(ConfigError, match="'dp-delta'"):
        check_dp_partitions(cfg, 5)
    check_dp_partitions(parse_config({"dp": True, "dp-delta": 0.001, "partition": "iid"}), 1)  # one: 719
    check_dp_partitions(parse_config({"dp": False, "dp-delta": 0.5}), 5)   # dp off: nothing to check
    # BPGAN: only the discriminator nodes (half of them) hold data, so each holds twice as much
    # (and delta < 1/n is stricter): 0.004 is fine for 4 holders of ~180 records, not for 2 of ~360
    bp = {"dp": True, "dp-delta": 0.004, "strategy": "bpgan", "min-nodes": 2, "partition": "iid"}
    check_dp_partitions(parse_config({**bp, "strategy": "local"}), 4)
    with pytest.raises(ConfigError, match="'dp-delta'.*n = 360"):
        check_dp_partitions(parse_config(bp), 4)
    assert "'dp-delta'" in check_run_config("dp=true dp-delta=0.01", num_supernodes=5)
    assert check_run_config("dp=true dp-delta=0.01", num_supernodes=None) is None   # deployed: nodes check


def test_dp_discriminators_have_no_batchnorm_and_batchnorm_is_refused():
    cfg = parse_config({"dp": True})
    D = make_discriminator(cfg)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in D.modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in D.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in make_discriminator(parse_config({})).modules())
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                   for m in make_discriminator(parse_config({"dp": True, "dataset": "ring"})).modules())
    bn = build_discriminator("dcgan", channels=1, image_size=16, features=8, loss="bce", norm="batch")
    with pytest.raises(ValueError, match="BatchNorm"):
        per_example_grads(bn, torch.randn(2, 1, 16, 16), "bce")
    with pytest.raises(ValueError, match="wgan-gp"):
        per_example_grads(mlp_d(), torch.randn(2, DIM), "wgan-gp")


# ---------------------------------------------------------------------------------------------
# (e) every client code path trains D on real data only through the DP step
# ---------------------------------------------------------------------------------------------
def _forbid(*_a, **_k):
    raise AssertionError("a non-DP real-data step ran with dp on")


def _no_sampling(*_a, **_k):
    raise AssertionError("the non-DP real-batch sampler was used with dp on")


@pytest.fixture
def dp_only(monkeypatch):
    """The non-DP real-data functions of every strategy raise; DP steps are counted."""
    for mod, name in ((privacygan, "discriminator_step"), (bpgan, "discriminator_gradient"),
                      (dataparallel, "discriminator_gradients"), (base, "train_gan_step"),
                      (mggan, "train_gan_step")):
        monkeypatch.setattr(mod, name, _forbid)
    calls = []
    real_count = base.ClientDP._count

    def count(self):
        calls.append(1)
        real_count(self)
    monkeypatch.setattr(base.ClientDP, "_count", count)
    return calls


DP = DPConfig(noise_multiplier=1.3, max_grad_norm=1.0, delta=1e-3)


def expected_eps(steps, batch, n=len(DATA)):
    acc = DPAccount()
    acc.step(DP.noise_multiplier, min(1.0, batch / n), steps)
    return acc.epsilon(DP.delta)


def test_privacygan_client_uses_only_dp_steps(dp_only):
    K, B = 2, 8
    content = RecordDict({
        wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(torch.randn(K, B, DIM), "float32")}),
        wire.CONFIG: ConfigRecord({"round": 1, "loss": "bce", "fakes-dtype": "float32", "feedback-dtype": "float32",
                                   "client-disc-steps": 2})})
    state = RecordDict()
    for rnd in (1, 2):
        reply = privacygan.client_discriminate(content, state, sample_real=_no_sampling, build_discriminator=mlp_d,
                                               disc_lr=1e-3, betas=(0.5, 0.999), device="cpu", seed=0,
                                               partition_id=0, dp=DP, real_data=DATA)
        eps = reply.metric_records[wire.METRICS]["dp_epsilon"]
        assert eps == pytest.approx(expected_eps(rnd * K * 2, B), rel=1e-9)
    assert len(dp_only) == 2 * K * 2 and DP_STATE in state.config_records


def test_bpgan_discriminator_node_sends_a_dp_gradient(dp_only):
    D = mlp_d()
    B = 8
    content = RecordDict({
        bpgan.D_WEIGHTS: ArrayRecord(D.state_dict()),
        wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(torch.randn(B, DIM), "float32")}),
        wire.CONFIG: ConfigRecord({"d-loss": "bce", "fakes-dtype": "float32", "feedback-dtype": "float32"})})
    state = RecordDict()
    reply = bpgan.client_discriminator_grad(content, state, sample_real=_no_sampling, build_discriminator=mlp_d,
                                            device="cpu", seed=0, partition_id=0, dp=DP, real_data=DATA)
    assert bpgan.D_GRADS in reply.array_records and len(dp_only) == 1
    assert reply.metric_records[wire.METRICS]["dp_epsilon"] == pytest.approx(expected_eps(1, B), rel=1e-9)


@pytest.mark.parametrize("mode", ["simultaneous", "alternating"])
def test_dataparallel_clients_send_dp_gradients(dp_only, mode):
    B = 8
    s = dataparallel.DataParallelSettings(latent_dim=NZ, batch_size=B, mode=mode)
    strat = dataparallel.DataParallel(s, make_generator=mlp_g, make_discriminator=mlp_d, recorder=NullRecorder())
    state = RecordDict()
    build = {"build_generator": mlp_g, "build_discriminator": mlp_d, "device": "cpu"}
    if mode == "simultaneous":
        reply = dataparallel.client_dp_step(strat.step_content(1, 11, True), state, sample_real=_no_sampling, seed=0,
                                            partition_id=0, dp=DP, real_data=DATA, **build)
        d_grads, g_grads, _, metrics = strat.parse_step(reply, True)
        assert g_grads is not None
    else:
        reply = dataparallel.client_dp_discriminator(strat.discriminator_content(1, 11), state, sample_real=_no_sampling,
                                                     seed=0, partition_id=0, dp=DP, real_data=DATA, **build)
        d_grads, _, metrics = strat.parse_content(reply, strat.D)
    assert len(dp_only) == 1
    assert metrics["dp_epsilon"] == pytest.approx(expected_eps(1, B), rel=1e-9)


def test_fedavg_and_local_clients_train_d_only_with_dp_steps(dp_only):
    B, steps = 8, 3
    fs = fedavg.FedAvg(fedavg.FedAvgSettings(latent_dim=NZ, batch_size=B, local_steps=steps), make_generator=mlp_g,
                       make_discriminator=mlp_d, recorder=NullRecorder())
    state = RecordDict()
    reply = fedavg.client_fedavg(fs.build_content(1), state, sample_real=_no_sampling, num_examples=len(DATA),
                                 build_generator=mlp_g, build_discriminator=mlp_d, device="cpu", seed=0,
                                 partition_id=0, dp=DP, real_data=DATA)
    _, _, metrics = fs.parse_content(reply)
    assert len(dp_only) == steps and metrics["dp_epsilon"] == pytest.approx(expected_eps(steps, B), rel=1e-9)

    ls = local.Local(local.LocalSettings(latent_dim=NZ, batch_size=B, local_steps=steps), recorder=NullRecorder())
    state = RecordDict()
    reply = local.client_alone(ls.train_content(1), state, sample_real=_no_sampling, build_generator=mlp_g,
                               build_discriminator=mlp_d, device="cpu", seed=0, partition_id=0, dp=DP, real_data=DATA)
    metrics = local.Local.parse_train(reply)
    assert len(dp_only) == 2 * steps and metrics["dp_epsilon"] == pytest.approx(expected_eps(steps, B), rel=1e-9)


def test_mggan_client_trains_d_only_with_dp_steps(dp_only):
    srv = mggan.MGGAN(mggan.MGGANSettings(batch_size=8), recorder=NullRecorder())
    srv.group_of = {0: 0}
    content = RecordDict({wire.CONFIG: srv.config_for(0, **{"start-iter": 0, "steps": 4, "next-regroup": -1,
                                                            "last-regroup": -1, "return-d": False})})
    state = RecordDict()
    reply = mggan.client_local(content, state, sample_real=_no_sampling, build_generator=mlp_g,
                               build_discriminator=mlp_d, device="cpu", seed=0, partition_id=0, dp=DP, real_data=DATA)
    m = reply.metric_records[wire.METRICS]
    assert len(dp_only) == 4 and len(m[mggan.TRACE]) == 4
    assert m["dp_epsilon"] == pytest.approx(expected_eps(4, 8), rel=1e-9)


def test_client_noise_seed_is_a_secret_kept_in_state_and_never_sent():
    """The run seed is known to the server: the noise / Poisson draws use a per-client secret."""
    B = 8
    ls = local.Local(local.LocalSettings(latent_dim=NZ, batch_size=B, local_steps=1), recorder=NullRecorder())
    kw = dict(sample_real=_no_sampling, build_generator=mlp_g, build_discriminator=mlp_d, device="cpu", seed=0,
              partition_id=0, dp=DP, real_data=DATA)
    states = [RecordDict(), RecordDict()]
    replies = [local.client_alone(ls.train_content(1), st, **kw) for st in states]
    secrets_ = [int(st.config_records[DP_STATE]["secret"]) for st in states]
    assert secrets_[0] != secrets_[1]                                  # same run seed, different draws
    for reply, secret in zip(replies, secrets_):
        assert str(secret) not in repr(dict(reply.metric_records[wire.METRICS]))
    local.client_alone(ls.train_content(2), states[0], **kw)
    assert int(states[0].config_records[DP_STATE]["secret"]) == secrets_[0]   # kept between rounds
    assert DPAccount.from_plain(states[0].config_records[DP_STATE]).steps == 2


# ---------------------------------------------------------------------------------------------
# (g) exhaustion
# ---------------------------------------------------------------------------------------------
def test_a_client_at_its_target_epsilon_stops_and_says_so():
    B, steps = 8, 2
    q = B / len(DATA)
    dp = DPConfig(noise_multiplier=DPAccount.noise_for_target(2.0, 1e-3, q, 2 * steps), max_grad_norm=1.0,
                  delta=1e-3, target_epsilon=2.0, planned_steps=2 * steps)
    ls = local.Local(local.LocalSettings(latent_dim=NZ, batch_size=B, local_steps=steps), recorder=NullRecorder())
    state = RecordDict()
    kw = dict(sample_real=_no_sampling, build_generator=mlp_g, build_discriminator=mlp_d, device="cpu", seed=0,
              partition_id=3, dp=dp, real_data=DATA)
    for rnd in (1, 2):                          # the planned steps fit the budget
        m = local.Local.parse_train(local.client_alone(ls.train_content(rnd), state, **kw))
        assert m["dp_epsilon"] <= 2.0
    blob_before = bytes(state.config_records[local.CLIENT_STATE]["blob"])
    reply = local.client_alone(ls.train_content(3), state, **kw)
    m = reply.metric_records[wire.METRICS]
    assert m["dp_exhausted"] == 1 and m["partition_id"] == 3 and m["dp_epsilon"] <= 2.0
    assert list(reply.array_records) == []
    assert bytes(state.config_records[local.CLIENT_STATE]["blob"]) == blob_before     # no step taken
    with pytest.raises(wire.BadReply, match="dp-target-epsilon"):
        local.Local.parse_train(reply)        # the server drops it with a logged reason; it is no training reply


def test_exhausted_replies_are_refused_by_every_strategy_parser():
    reply = RecordDict({wire.METRICS: wire.MetricRecord({"dp_exhausted": 1, "dp_epsilon": 1.0})})
    strat = dataparallel.DataParallel(dataparallel.DataParallelSettings(latent_dim=NZ, batch_size=8),
                                      make_generator=mlp_g, make_discriminator=mlp_d, recorder=NullRecorder())
    fs = fedavg.FedAvg(fedavg.FedAvgSettings(latent_dim=NZ, batch_size=8), make_generator=mlp_g,
                       make_discriminator=mlp_d, recorder=NullRecorder())
    for parse in (lambda: strat.parse_step(reply, True), lambda: strat.parse_content(reply, strat.D),
                  lambda: fs.parse_content(reply), lambda: local.Local.parse_train(reply)):
        with pytest.raises(wire.BadReply, match="dp-target-epsilon"):
            parse()


def test_exhausted_clients_do_not_count_towards_min_replies():
    class Reply:   # what exchange() reads of a pulled reply
        def __init__(self, content):
            self.content = content

        def has_error(self):
            return False

    exhausted = RecordDict({wire.METRICS: wire.MetricRecord({"dp_exhausted": 1, "dp_epsilon": 2.0,
                                                             "partition_id": 4})})
    ex = base.Exchange()
    base._take(ex, 7, Reply(exhausted),
               lambda nid, reply: local.Local.parse_train(reply.content), limit=10**9, max_reply_mb=1e3)
    assert ex.replies == {} and "partition 4" in ex.dropped[7] and "dp-target-epsilon" in ex.dropped[7]
    with pytest.raises(base.RunFailed, match="min-replies.*dp-target-epsilon"):
        base.require_replies(3, ex, 1)


# ---------------------------------------------------------------------------------------------
# end to end: a tiny dp=true local run through Flower's simulation engine
# ---------------------------------------------------------------------------------------------
@pytest.mark.e2e
def test_dp_local_run_reports_epsilon_per_client_per_round(tmp_path):
    from app.data import client_dataset
    from e2e_mods import simulate

    TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "samples-per-client": 4, "sample-every": 0,
            "round-timeout": 120.0, "node-wait-timeout": 60.0, "partition": "iid"}
    cfg = parse_config({**TINY, "strategy": "local", "dataset": "ring", "num-rounds": 3, "local-steps": 2,
                        "dp": True, "dp-noise-multiplier": 1.2, "dp-delta": 1e-4, "min-nodes": 2,
                        "client-eval": False, "output-dir": str(tmp_path / "out")})
    run = simulate(cfg, 2)
    rows = [json.loads(line) for line in Path(run.path, "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "clients" in r and isinstance(r["clients"], dict) and r["clients"]
            and all(isinstance(c, dict) and "dp_epsilon" in c for c in r["clients"].values())]
    assert len(rows) == 3
    per_client: dict[str, list[float]] = {}
    for r in rows:
        assert r["dp_epsilon_max"] == max(c["dp_epsilon"] for c in r["clients"].values())
        for name, c in r["clients"].items():
            per_client.setdefault(name, []).append(c["dp_epsilon"])
    assert len(per_client) == 2
    for name, eps in per_client.items():
        assert all(b > a for a, b in zip(eps, eps[1:])), (name, eps)
        pid = int(name.split()[1])                  # "client <partition id>"
        q = min(1.0, cfg.batch_size / len(client_dataset(cfg.data_spec(), pid, 2)))
        for rnd, e in enumerate(eps, 1):
            acc = DPAccount()
            acc.step(1.2, q, rnd * cfg.local_steps * cfg.client_disc_steps)
            assert e == pytest.approx(acc.epsilon(1e-4), rel=1e-9)
    summary = Path(run.path, "summary.md").read_text()
    assert "## Differential privacy" in summary and all(name in summary for name in per_client)
