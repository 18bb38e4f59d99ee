"""The privacy audit: closed-form checks of the scoring (app/audit.py) and the script end to end,
its probe going through the real ClientApp handler of a Flower simulation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.audit import attack_report, bootstrap_auc, dcr_scores, probe_batches, tpr_at_fpr

PROJECT = Path(__file__).resolve().parent.parent


def test_separated_scores_give_auc_one_and_full_tpr():
    rep = attack_report([5, 6, 7, 8], [1, 2, 3], resamples=50)
    assert rep["auc"] == 1.0 and rep["auc_ci95"] == [1.0, 1.0]
    assert rep["tpr_at_1pct_fpr"] == 1.0 and rep["tpr_at_0.1pct_fpr"] == 1.0
    assert (rep["members"], rep["nonmembers"]) == (4, 3)
    assert attack_report([1, 2, 3], [5, 6, 7], resamples=10)["auc"] == 0.0


def test_identical_distributions_give_auc_near_half_and_the_interval_holds_the_estimate():
    rng = np.random.default_rng(0)
    m, n = rng.normal(size=2000), rng.normal(size=2000)
    rep = attack_report(m, n, resamples=200, seed=1)
    assert abs(rep["auc"] - 0.5) < 0.03
    lo, hi = rep["auc_ci95"]
    assert lo <= rep["auc"] <= hi and hi - lo < 0.08
    assert rep["tpr_at_1pct_fpr"] < 0.05


def test_tpr_at_fpr_on_a_hand_made_roc():
    # 100 non-members at 0..99; members: 30 above every non-member, 70 at 50.5
    non = np.arange(100.0)
    mem = np.r_[np.full(30, 200.0), np.full(70, 50.5)]
    labels, scores = np.r_[np.ones(100), np.zeros(100)], np.r_[mem, non]
    assert tpr_at_fpr(labels, scores, 0.01) == pytest.approx(0.30)   # 1 % FPR admits no non-member above 98.5
    assert tpr_at_fpr(labels, scores, 0.001) == pytest.approx(0.30)
    assert tpr_at_fpr(labels, scores, 0.49) == pytest.approx(1.0)    # threshold 50.5: 49 non-members above
    assert tpr_at_fpr(labels, scores, 0.48) == pytest.approx(0.30)


def test_bootstrap_is_seeded():
    rng = np.random.default_rng(3)
    m, n = rng.normal(0.5, 1, 100), rng.normal(0, 1, 100)
    assert bootstrap_auc(m, n, resamples=100, seed=7) == bootstrap_auc(m, n, resamples=100, seed=7)


def test_dcr_exact_copies_are_members_with_auc_one():
    gen = torch.Generator().manual_seed(0)
    members = torch.rand(20, 1, 4, 4, generator=gen)
    nonmembers = torch.rand(20, 1, 4, 4, generator=gen)
    samples = torch.cat([members, torch.rand(30, 1, 4, 4, generator=gen)])   # a generator that memorised
    m, n = dcr_scores(members, samples, chunk=7), dcr_scores(nonmembers, samples, chunk=7)
    assert np.all(m == 0.0) and np.all(n < 0)
    assert attack_report(m, n, resamples=10)["auc"] == 1.0
    # against one sample the score is minus the plain L2 distance
    d = dcr_scores(nonmembers[:1], samples[:1])
    assert d[0] == pytest.approx(-float((nonmembers[0] - samples[0]).double().norm()))


def test_probe_batches_pack_and_pad_in_order():
    x = torch.arange(5.0).reshape(5, 1)
    batches, n = probe_batches(x, 4)
    assert n == 5 and batches.shape == (2, 4, 1)
    assert batches.reshape(-1).tolist() == [0, 1, 2, 3, 4, 0, 1, 2]
    assert probe_batches(x[:1], 3)[0].reshape(-1).tolist() == [0, 0, 0]
    with pytest.raises(ValueError):
        probe_batches(x[:0], 4)


@pytest.mark.e2e
def test_the_audit_script_probes_through_the_clientapp_and_writes_its_report(tmp_path):
    from simulations.privacy_audit import main

    out = tmp_path / "audit"
    rc = main(["--clients", "2", "--rounds", "2", "--output-dir", str(tmp_path), "--strategies", "privacygan",
               "local", "--candidates", "24", "--samples", "64", "--bootstrap", "20", "--out", str(out),
               "--set", "teacher-steps=10", "--set", "gen-features=8", "--set", "disc-features=8",
               "--set", "batch-size=16", "--set", "steps-per-round=1", "--set", "local-steps=2"])
    assert rc == 0
    report = json.loads((out / "audit.json").read_text())
    rows = report["results"]
    attacks = {(r["strategy"], r["attack"], r["client"]) for r in rows}
    assert attacks == {("privacygan", "probe (labels)", 0), ("privacygan", "probe (labels)", 1),
                       ("privacygan", "probe (feedback norm)", 0), ("privacygan", "probe (feedback norm)", 1),
                       ("privacygan", "samples (DCR, student0)", 0), ("privacygan", "samples (DCR, student1)", 1),
                       ("local", "samples (DCR, client0)", 0), ("local", "samples (DCR, client1)", 1)}
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and r["auc_ci95"][0] <= r["auc"] <= r["auc_ci95"][1]
        assert (r["members"], r["nonmembers"]) == (24, 24) and r["probed_after_round"] == 2
    assert (out / "roc.png").stat().st_size > 0
    # the probe went through the ClientApp handler, on the D_i the client trained: it reports
    # its 2 training steps (1 per round) plus one step per probe batch (48 candidates / 16 = 3)
    probes = [r for r in rows if r["attack"].startswith("probe")]
    assert all((r["probe_batches"], r["client_d_steps_after_probe"]) == (3, 5) for r in probes), probes
    run = Path(probes[0]["run"])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and all(c["d_steps_total"] == 2 for c in last["clients"].values())
