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
