"""FedAvg's Flower variants: each aggregation against hand arithmetic, FedProx's client term,
the record layout, and the checks of their run-config keys."""

import math

import pytest
import torch
from flwr.app import ArrayRecord, MetricRecord, RecordDict
from torch import nn

from app.config import ConfigError, parse_config
from strategies.fedavg import (ARRAYS, FedAvgSettings, Proximal, flower_aggregate, flower_strategy, pack, unpack)

GEN = torch.Generator().manual_seed(3)


def content(state: dict[str, torch.Tensor], n: int) -> RecordDict:
    return RecordDict({ARRAYS: ArrayRecord(state), "metrics": MetricRecord({"num-examples": n})})


def states(k: int, scale=1.0):
    return [{"g.w": scale * torch.randn(3, 4, generator=GEN), "g.bn.running_mean": torch.rand(4, generator=GEN),
             "g.bn.num_batches_tracked": torch.tensor(5 * (i + 1), dtype=torch.int64)} for i in range(k)]


CURRENT = {"g.w": torch.zeros(3, 4), "g.bn.running_mean": torch.zeros(4),
           "g.bn.num_batches_tracked": torch.tensor(0, dtype=torch.int64)}
PARAMS = {"g.w"}


def test_pack_and_unpack_keep_both_networks_apart():
    G, D = nn.Linear(2, 3), nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1))
    rec = pack(G, D)
    assert set(rec.keys()) == {"g.weight", "g.bias", "d.0.weight", "d.0.bias", "d.1.weight", "d.1.bias",
                               "d.1.running_mean", "d.1.running_var", "d.1.num_batches_tracked"}
    g, d = unpack({k: torch.from_numpy(rec[k].numpy()) for k in rec.keys()})
    assert all(torch.equal(g[k], v) for k, v in G.state_dict().items())
    assert all(torch.equal(d[k], v) for k, v in D.state_dict().items())


def test_fedavg_variant_is_the_example_weighted_average():
    sts, ns = states(3), [10, 30, 60]
    out = flower_aggregate(flower_strategy(FedAvgSettings()), 1, [content(s, n) for s, n in zip(sts, ns)],
                           CURRENT, PARAMS)
    for key in ("g.w", "g.bn.running_mean"):
        assert torch.allclose(out[key], sum(n * s[key] for s, n in zip(sts, ns)) / 100, atol=1e-6)
    assert out["g.bn.num_batches_tracked"].dtype == torch.int64
    assert int(out["g.bn.num_batches_tracked"]) == round((10 * 5 + 30 * 10 + 60 * 15) / 100)


def test_fedadam_steps_the_parameters_with_adam_on_the_averaged_move_and_averages_the_statistics():
    """FedAdam (Reddi et al. 2021, Alg. 2): Δ = avg - w, m = β1 m + (1-β1) Δ, v = β2 v + (1-β2) Δ²,
    w += η_t m / (√v + τ) with Flower's bias-corrected η_t = η √(1-β2^(t+1)) / (1-β1^(t+1))."""
    s = FedAvgSettings(variant="fedadam", server_lr=0.05, server_tau=1e-3)
    strategy = flower_strategy(s)
    w, m, v = CURRENT["g.w"].clone(), torch.zeros(3, 4), torch.zeros(3, 4)
    current = dict(CURRENT)
    for rnd in (1, 2):
        sts, ns = states(2), [1, 3]
        avg = (sts[0]["g.w"] + 3 * sts[1]["g.w"]) / 4
        delta = avg - w
        m = 0.9 * m + 0.1 * delta
        v = 0.99 * v + 0.01 * delta ** 2
        eta = 0.05 * math.sqrt(1 - 0.99 ** (rnd + 1)) / (1 - 0.9 ** (rnd + 1))
        w = w + eta * m / (v.sqrt() + 1e-3)
        out = flower_aggregate(strategy, rnd, [content(x, n) for x, n in zip(sts, ns)], current, PARAMS)
        assert torch.allclose(out["g.w"], w, atol=1e-5), rnd
        mean_bn = (sts[0]["g.bn.running_mean"] + 3 * sts[1]["g.bn.running_mean"]) / 4
        assert torch.allclose(out["g.bn.running_mean"], mean_bn, atol=1e-6)   # statistics: plain average
        current = out


def test_fedyogi_moves_its_second_moment_by_the_sign_rule_with_no_bias_correction():
    """FedYogi (Reddi et al. 2021, Alg. 2): m = β1 m + (1-β1) Δ, v = v - (1-β2) Δ² sign(v - Δ²),
    w += η m / (√v + τ) -- Flower's FedYogi takes η as it is (no bias correction, unlike its
    FedAdam); the statistics are averaged."""
    s = FedAvgSettings(variant="fedyogi", server_lr=0.05, server_tau=1e-3)
    strategy = flower_strategy(s)
    w, m, v = CURRENT["g.w"].clone(), torch.zeros(3, 4), torch.zeros(3, 4)
    current = dict(CURRENT)
    for rnd in (1, 2, 3):
        sts, ns = states(2), [1, 3]
        delta = (sts[0]["g.w"] + 3 * sts[1]["g.w"]) / 4 - w
        m = 0.9 * m + 0.1 * delta
        v = v - 0.01 * delta ** 2 * torch.sign(v - delta ** 2)
        w = w + 0.05 * m / (v.sqrt() + 1e-3)
        out = flower_aggregate(strategy, rnd, [content(x, n) for x, n in zip(sts, ns)], current, PARAMS)
        assert torch.allclose(out["g.w"], w, atol=1e-5), rnd
        mean_bn = (sts[0]["g.bn.running_mean"] + 3 * sts[1]["g.bn.running_mean"]) / 4
        assert torch.allclose(out["g.bn.running_mean"], mean_bn, atol=1e-6)
        current = out


def test_krum_picks_the_reply_closest_to_its_nearest_others():
    base = torch.randn(3, 4, generator=GEN)
    sts = [{"g.w": base + 0.01 * i} for i in range(3)] + [{"g.w": base + 10.0}]
    out = flower_aggregate(flower_strategy(FedAvgSettings(variant="krum")), 1, [content(s, 1) for s in sts],
                           {"g.w": torch.zeros(3, 4)}, {"g.w"})
    # hand: n = 4, f = 0 -> each reply is scored by its n - f - 2 = 2 nearest others' squared distances
    d = torch.tensor([[float(((a["g.w"] - b["g.w"]) ** 2).sum()) for b in sts] for a in sts])
    scores = [float(row.sort().values[1:3].sum()) for row in d]
    assert torch.equal(out["g.w"], sts[min(range(4), key=scores.__getitem__)]["g.w"])
    assert torch.equal(out["g.w"], sts[1]["g.w"])   # the middle of the cluster, never the outlier


def test_trimmed_mean_cuts_the_highest_and_lowest_share_per_coordinate():
    sts = [{"g.w": torch.randn(3, 4, generator=GEN)} for _ in range(5)]
    sts[4]["g.w"][0, 0] = 1e6                      # one poisoned coordinate is cut away
    out = flower_aggregate(flower_strategy(FedAvgSettings(variant="trimmed-mean", trimmed_beta=0.2)), 1,
                           [content(s, 1) for s in sts], {"g.w": torch.zeros(3, 4)}, {"g.w"})
    stacked = torch.stack([s["g.w"] for s in sts]).sort(dim=0).values
    assert torch.allclose(out["g.w"], stacked[1:4].mean(dim=0), atol=1e-6)
    assert float(out["g.w"][0, 0]) < 10


def test_an_aggregation_tried_twice_gives_the_same_result():
    """The roll-back's blame search aggregates the same replies more than once; FedTrimmedAvg
    consumes the records it reads, so each try must read its own copy."""
    replies = [content(s, 1) for s in states(5)]
    strategy = flower_strategy(FedAvgSettings(variant="trimmed-mean"))
    first = flower_aggregate(strategy, 1, replies, CURRENT, PARAMS)
    second = flower_aggregate(strategy, 1, replies, CURRENT, PARAMS)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_proximal_step_is_sgd_on_the_local_loss_plus_the_proximal_term():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    anchor = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.weight.add_(0.5)                      # the client has moved away from w_t
    x = torch.randn(8, 3)
    opt = Proximal(torch.optim.SGD(model.parameters(), lr=0.1), model, mu=0.3)
    for p, a in zip(opt.anchor, anchor.values()):
        p.copy_(a)                                  # w_t = the round's global weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt.zero_grad()
    model(x).pow(2).mean().backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    opt.step()
    for k, value in model.state_dict().items():
        hand = before[k] - 0.1 * (grads[k] + 0.3 * (before[k] - anchor[k]))
        assert torch.allclose(value, hand, atol=1e-6), k


@pytest.mark.parametrize("raw, key", [
    ({"fedavg-variant": "fedmedian"}, "fedavg-variant"),
    ({"fedprox-mu": -0.1}, "fedprox-mu"),
    ({"fedopt-server-lr": 0}, "fedopt-server-lr"),
    ({"fedopt-tau": -1}, "fedopt-tau"),
    ({"trimmed-beta": 0.5}, "trimmed-beta"),
    ({"krum-malicious": -1}, "krum-malicious"),
    ({"strategy": "fedavg", "fedavg-variant": "krum", "krum-malicious": 1, "min-nodes": 4}, "krum-malicious"),
])
def test_bad_variant_settings_stop_at_start_naming_the_key(raw, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        parse_config(raw)


def test_krum_with_enough_nodes_for_its_malicious_count_is_accepted():
    cfg = parse_config({"strategy": "fedavg", "fedavg-variant": "krum", "krum-malicious": 1, "min-nodes": 5})
    assert cfg.krum_malicious == 1
