"""Server-side wiring that needs no simulation: teacher loading, node sampling, labels."""

import random

import pytest
import torch

from app.builders import make_discriminator, make_generator
from app.config import parse_config
from app.runs import RunFolder
from app.server_app import partition_labeller, prepare_teacher
from strategies.base import sample_nodes


def test_teacher_is_loaded_from_teacher_path(tmp_path):
    cfg = parse_config({"gen-features": 8, "disc-features": 8})
    torch.manual_seed(5)
    G, D = make_generator(cfg), make_discriminator(cfg)
    torch.save({"g": G.state_dict(), "d": D.state_dict()}, tmp_path / "t.pt")
    folder = RunFolder.create(tmp_path, "privacygan", "digits", {})
    G2, D2 = prepare_teacher(cfg.replace(teacher_path=str(tmp_path / "t.pt")), folder, "cpu")
    for a, b in zip(list(G.state_dict().values()) + list(D.state_dict().values()),
                    list(G2.state_dict().values()) + list(D2.state_dict().values())):
        assert torch.equal(a, b)


def test_missing_teacher_path_names_the_key(tmp_path):
    cfg = parse_config({"teacher-path": str(tmp_path / "nope.pt")})
    with pytest.raises(FileNotFoundError, match="'teacher-path'"):
        prepare_teacher(cfg, RunFolder.create(tmp_path, "privacygan", "digits", {}), "cpu")


def test_teacher_phase_trains_and_checkpoints(tmp_path):
    cfg = parse_config({"gen-features": 8, "disc-features": 8, "teacher-steps": 3, "batch-size": 8})
    folder = RunFolder.create(tmp_path, "privacygan", "digits", {})
    torch.manual_seed(0)
    G0 = make_generator(cfg)
    torch.manual_seed(0)
    G, _ = prepare_teacher(cfg, folder, "cpu")
    saved = folder.load_checkpoint("teacher.pt")
    assert all(torch.equal(saved["g"][k], v) for k, v in G.state_dict().items())
    assert not all(torch.equal(a, b) for a, b in zip(G0.parameters(), G.parameters()))


def test_sample_nodes_takes_the_fraction_but_at_least_min_replies():
    nodes = list(range(10))
    rng = random.Random(0)
    assert len(sample_nodes(nodes, 0.3, 1, rng)) == 3
    assert len(sample_nodes(nodes, 0.05, 2, rng)) == 2
    assert sample_nodes(nodes, 1.0, 1, rng) == nodes
    draws = {tuple(sample_nodes(nodes, 0.2, 1, rng)) for _ in range(50)}
    assert len(draws) > 10  # really sampled, not a fixed subset


def test_grid_rows_are_labelled_with_the_simulation_plan():
    describe = partition_labeller(parse_config({}))
    assert [describe(i, 5) for i in range(5)] == [f"client {i} (classes {2 * i},{2 * i + 1})" for i in range(5)]
    assert describe(7, 5) == "client 7"  # outside the plan (e.g. a deployment node): plain label


@pytest.mark.parametrize("scores, expected", [
    ({"fid": 3.0, "kid": 0.1, "is": 2.0, "extractor": "classifier", "num_samples": 10, "num_real": 20},
     "- pair 0: FID 3.00, KID 0.1, IS 2.00 (classifier features, 10 samples vs 20 real)"),
    ({"modes_covered": 7, "num_modes": 8, "high_quality_pct": 91.0, "reverse_kl": 0.1, "num_samples": 2500},
     "- pair 0: 7/8 modes, 91.0% high-quality, reverse KL 0.100 (2500 samples)"),
])
def test_summary_lists_bpgan_scores_per_generator_node(scores, expected):
    from app.server_app import _summary
    from strategies.bpgan import summarize_scores

    result = {"rounds": 1, "bytes_down": 1, "bytes_up": 1, "dropped_replies": 0, "last": {}, "clients": {},
              "eval": summarize_scores({"pair 0": scores})}   # {"per_gb", "mean", "best"}
    text = _summary(parse_config({"strategy": "bpgan"}), result, 1.0, status="success")
    assert expected in text.splitlines()


def record_optimizer_steps():
    """Every optimizer step from now on, as (optimizer class, lr, number of parameters), through
    torch's global step hook; returns (records, handle to remove)."""
    from torch.optim.optimizer import register_optimizer_step_post_hook

    seen = []
    handle = register_optimizer_step_post_hook(
        lambda opt, args, kwargs: seen.append((type(opt).__name__, opt.param_groups[0]["lr"],
                                               sum(p.numel() for g in opt.param_groups for p in g["params"]))))
    return seen, handle


def test_the_clipped_wgan_teacher_follows_its_papers_schedule(tmp_path):
    """loss=wgan: RMSProp at wgan-lr and wgan-critic-steps critic updates per generator update."""
    cfg = parse_config({"gen-features": 8, "disc-features": 8, "teacher-steps": 2, "batch-size": 8, "loss": "wgan",
                        "wgan-critic-steps": 3, "wgan-lr": 7e-5})
    seen, handle = record_optimizer_steps()
    try:
        prepare_teacher(cfg, RunFolder.create(tmp_path, "privacygan", "digits", {}), "cpu")
    finally:
        handle.remove()
    g_params = sum(p.numel() for p in make_generator(cfg).parameters())
    assert [(name, lr) for name, lr, _ in seen] == [("RMSprop", 7e-5)] * (2 * (3 + 1))
    assert [n == g_params for _, _, n in seen] == [False, False, False, True] * 2   # 3 critic steps, then G
    # the same schedule for every other loss keeps the role's own keys
    seen, handle = record_optimizer_steps()
    try:
        prepare_teacher(cfg.replace(loss="bce"), RunFolder.create(tmp_path / "b", "privacygan", "digits", {}), "cpu")
    finally:
        handle.remove()
    assert [(name, lr) for name, lr, _ in seen] == [("Adam", cfg.teacher_disc_lr), ("Adam", cfg.teacher_gen_lr)] * 2


def test_wgan_schedule_reaches_every_strategys_settings():
    from app.server_app import _on_client_lrs, _on_server_lrs, _settings, privacygan_settings
    from strategies.centralized import CentralizedSettings
    from strategies.dataparallel import DataParallelSettings
    from strategies.fedavg import FedAvgSettings
    from strategies.local import LocalSettings

    wgan = parse_config({"loss": "wgan", "client-disc-steps": 2})
    bce = wgan.replace(loss="bce")
    assert privacygan_settings(wgan).client_disc_steps == 5 and privacygan_settings(bce).client_disc_steps == 2
    for cls, lrs in ((FedAvgSettings, _on_client_lrs), (LocalSettings, _on_client_lrs),
                     (CentralizedSettings, _on_server_lrs)):
        s = _settings(cls, wgan, **lrs(wgan))
        assert (s.client_disc_steps, s.gen_lr, s.disc_lr) == (5, 5e-5, 5e-5), cls
        s = _settings(cls, bce, **lrs(bce))
        assert s.client_disc_steps == 2 and s.gen_lr == 2e-4, cls
    dp = _settings(DataParallelSettings, wgan, **_on_server_lrs(wgan), disc_steps=wgan.disc_steps_for(wgan.loss))
    assert (dp.disc_steps, dp.gen_lr, dp.disc_lr) == (5, 5e-5, 5e-5)
