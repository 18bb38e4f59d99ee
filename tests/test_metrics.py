"""2-D mode metrics in closed form."""

import math

import torch

from app.data import GRID_MEANS, GRID_STD, RING_MEANS, RING_STD, mode_means
from app.metrics import density_plot, mode_metrics


def test_exact_mode_samples_cover_all_modes_with_full_quality():
    x = RING_MEANS.repeat(2500 // 8 + 1, 1)[:2496]
    m = mode_metrics(x, RING_MEANS, RING_STD)
    assert (m["modes_covered"], m["high_quality_pct"]) == (8, 100.0)
    assert m["reverse_kl"] == 0.0


def test_a_collapsed_sample_covers_one_mode_with_reverse_kl_log8():
    x = RING_MEANS[3].repeat(2500, 1) + 0.01
    m = mode_metrics(x, RING_MEANS, RING_STD)
    assert m["modes_covered"] == 1 and m["high_quality_pct"] == 100.0
    assert math.isclose(m["reverse_kl"], math.log(8))
    assert m["mode_histogram"][3] == 2500


def test_high_quality_is_within_three_sigma():
    means, std = mode_means("ring")
    inside = means[0] + torch.tensor([2.9 * std, 0.0])
    outside = means[0] + torch.tensor([3.1 * std, 0.0])
    m = mode_metrics(torch.stack([inside, outside]), means, std)
    assert m["high_quality_pct"] == 50.0 and m["modes_covered"] == 1


def test_nothing_near_a_mode_gives_zero_and_infinite_kl():
    m = mode_metrics(torch.zeros(100, 2), RING_MEANS, RING_STD)
    assert (m["modes_covered"], m["high_quality_pct"], m["reverse_kl"]) == (0, 0.0, math.inf)


def test_grid_has_25_modes_and_samples_from_the_data_score_well():
    from app.data import load_dataset

    ds = load_dataset("grid")
    m = mode_metrics(ds.x[:2500], GRID_MEANS, GRID_STD)
    assert m["num_modes"] == 25 and m["modes_covered"] == 25 and m["high_quality_pct"] > 99.0


def test_density_plot_writes_a_png(tmp_path):
    p = density_plot(tmp_path / "d.png", {"a": torch.randn(500, 2), "b": RING_MEANS}, RING_MEANS)
    assert p.stat().st_size > 1000 and p.read_bytes()[:4] == b"\x89PNG"
