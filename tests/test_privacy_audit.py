"""The privacy audit: closed-form checks of the scoring (app/audit.py) and the script end to end,
its probe going through the real ClientApp handler of a Flower simulation."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from app.audit import (attack_report, bootstrap_auc, chance_tpr, chance_tpr_pmf, dcr_scores, discriminator_scores,
                       learned_attack_scores, own_class_share, probe_batches, tpr_at_fpr)

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


def test_chance_tpr_enumerated_by_hand():
    # 2 members, 2 non-members, FPR 0 (no false positive fits): the members above the highest
    # non-member, over the 6 equally likely orders MMNN MNMN MNNM NMMN NMNM NNMM -> 2 1 1 0 0 0
    assert chance_tpr_pmf(2, 2, 0.0) == pytest.approx([3 / 6, 2 / 6, 1 / 6])
    # FPR 0.5 admits one of the two non-members: the members above the second one, by order:
    # MMNN 2, MNMN 2, MNNM 1, NMMN 2, NMNM 1, NNMM 0
    assert chance_tpr_pmf(2, 2, 0.5) == pytest.approx([1 / 6, 2 / 6, 3 / 6])
    assert chance_tpr_pmf(3, 1, 1.0).tolist() == [0, 0, 0, 1]          # every non-member may be above
    # the largest of two such clients: P(max <= t) = F(t)^2 = 1/4, 25/36, 1 at TPR 0, 1/2, 1
    two = chance_tpr([(2, 2), (2, 2)], fpr=0.0, q=0.5)
    assert two["max_quantile"] == 0.5 and two["client_quantile"] == [0.0, 0.0]   # one client: F(0) = 1/2
    assert chance_tpr([(2, 2), (2, 2)], fpr=0.0, q=0.25)["max_quantile"] == 0.0
    assert chance_tpr([(2, 2), (2, 2)], fpr=0.0, q=0.7)["max_quantile"] == 1.0
    assert two["mean"] == pytest.approx((2 / 6 * 0.5 + 1 / 6 * 1.0))   # = 1 / 3 = k / (n + 1), k = 1
    # the average of two (1, 1) clients is 0, 1/2, 1 with 1/4, 1/2, 1/4 (Monte Carlo, 200,000 draws)
    assert chance_tpr([(1, 1), (1, 1)], fpr=0.0, q=0.7)["mean_quantile"] == 0.5
    assert chance_tpr([(1, 1), (1, 1)], fpr=0.0, q=0.8)["mean_quantile"] == 1.0
    assert chance_tpr([(1, 1), (1, 1)], fpr=0.0, q=0.2)["mean_quantile"] == 0.0
    # clients of different sizes: (1, 1) reads 0 or 1 with 1/2 each; P(max <= t) = 1/4, 5/12, 1 at 0, 1/2, 1
    assert chance_tpr([(2, 2), (1, 1)], fpr=0.0, q=0.4)["max_quantile"] == 0.5
    assert chance_tpr([(2, 2), (1, 1)], fpr=0.0, q=0.42)["max_quantile"] == 1.0
    with pytest.raises(ValueError):
        chance_tpr_pmf(0, 5, 0.01)


@pytest.mark.parametrize("members,nonmembers", [(100, 100), (144, 144), (60, 250)])
def test_chance_tpr_matches_random_scores_read_by_tpr_at_fpr(members, nonmembers):
    """The closed form is what :func:`tpr_at_fpr` reads off scores that carry no information: the
    mean (j + 1) / (n + 1) with j = floor(0.01 n) false positives allowed, and the whole
    distribution, against 4,000 random draws."""
    pmf = chance_tpr_pmf(members, nonmembers, 0.01)
    assert pmf.sum() == pytest.approx(1.0)
    k = int(0.01 * nonmembers) + 1
    assert chance_tpr([(members, nonmembers)])["mean"] == pytest.approx(k / (nonmembers + 1))
    assert np.arange(members + 1) @ pmf / members == pytest.approx(k / (nonmembers + 1))   # the pmf's own mean
    rng = np.random.default_rng(0)
    labels = np.r_[np.ones(members), np.zeros(nonmembers)]
    draws = np.array([tpr_at_fpr(labels, rng.random(members + nonmembers), 0.01) for _ in range(4000)])
    counts = np.bincount(np.rint(draws * members).astype(int), minlength=members + 1)
    assert np.abs(counts / 4000 - pmf).max() < 0.03                       # each probability, sd <= 0.008
    q = chance_tpr([(members, nonmembers)] * 5)
    assert q["max_quantile"] > q["client_quantile"][0] > q["mean"] > 0
    assert np.mean(draws <= q["client_quantile"][0]) >= 0.95 - 0.02        # the quantile of one client
    worst = draws.reshape(800, 5).max(axis=1)                               # ... and of the worst of five
    assert np.mean(worst <= q["max_quantile"]) >= 0.95 - 0.03
    assert np.mean(worst < q["max_quantile"]) < 0.95
    average = draws.reshape(800, 5).mean(axis=1)                          # ... and of their average
    assert q["max_quantile"] > q["mean_quantile"] > q["mean"]
    assert abs(np.mean(average <= q["mean_quantile"]) - 0.95) < 0.04


def test_the_grid_puts_the_chance_level_next_to_the_probe_tpr():
    from simulations.privacy_audit import grid_table

    cells = [{"cell": 0, "strategy": "privacygan", "epsilon_target": 10.0, "epsilon_spent_max": 9.99,
              "client_images": [100, 100]}]
    results = [{"cell": 0, "attack": "probe (labels)", "auc": 0.5, "tpr_at_1pct_fpr": t, "members": 100,
                "nonmembers": 100} for t in (0.01, 0.03)]
    row = grid_table(cells, results, []).splitlines()[2]
    chance = chance_tpr([(100, 100), (100, 100)])
    assert f"| 0.020 (0.030) | {chance['mean_quantile']:.3f} ({chance['max_quantile']:.3f}) |" in row
    assert f"{chance['mean']:.3f}" == "0.020"                              # 2 / 101: one false positive fits


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


def test_discriminator_scores_are_the_raw_outputs_in_order_and_leave_d_unchanged():
    D = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 1))
    with torch.no_grad():
        D[1].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
        D[1].bias.fill_(0.5)
    before = {k: v.clone() for k, v in D.state_dict().items()}
    x = torch.arange(20.0).reshape(5, 1, 2, 2)
    scores = discriminator_scores(D, x, batch_size=2)      # 3 batches, the last one padded
    expected = (x.reshape(5, 4) @ torch.tensor([1.0, 2.0, 3.0, 4.0]) + 0.5).double().numpy()
    assert np.allclose(scores, expected)
    assert all(torch.equal(before[k], v) for k, v in D.state_dict().items())


def test_learned_attack_flags_what_the_generator_memorised():
    """Samples that are the members plus noise around them: the classifier trained on samples vs
    reference images (drawn like the non-members) ranks every member above every non-member."""
    gen = torch.Generator().manual_seed(0)
    members = torch.rand(30, 1, 4, 4, generator=gen) + 0.5
    samples = members.repeat(10, 1, 1, 1) + 0.05 * torch.randn(300, 1, 4, 4, generator=gen)
    reference, nonmembers = torch.rand(60, 1, 4, 4, generator=gen), torch.rand(30, 1, 4, 4, generator=gen)
    scores = learned_attack_scores(samples, reference, torch.cat([members, nonmembers]), steps=200, seed=1)
    assert attack_report(scores[:30], scores[30:], resamples=10)["auc"] == 1.0
    again = learned_attack_scores(samples, reference, torch.cat([members, nonmembers]), steps=200, seed=1)
    assert np.array_equal(scores, again)                  # seeded
    with pytest.raises(ValueError):
        learned_attack_scores(samples[:0], reference, members)


def test_the_learned_attack_splits_the_pool_in_disjoint_halves_and_caps_the_reference_set():
    """Half the unseen pool is the attacker's reference set, capped at the candidate limit; the
    other half its non-members, whole; a pool smaller than twice the limit (digits) is split as before."""
    from simulations.privacy_audit import split_pool

    pool = torch.arange(3000, dtype=torch.float32).reshape(3000, 1)
    ref, held = split_pool(pool, 1000, seed=7)
    assert len(ref) == 1000 and len(held) == 1500
    assert not set(ref[:, 0].tolist()) & set(held[:, 0].tolist())
    perm = torch.randperm(3000, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ref, pool[perm[:1000]]) and torch.equal(held, pool[perm[1500:]])   # the first half, capped
    small = pool[:263]
    ref, held = split_pool(small, 1000, seed=7)
    perm = torch.randperm(263, generator=torch.Generator().manual_seed(7))
    assert torch.equal(ref, small[perm[:131]]) and torch.equal(held, small[perm[131:]])
    assert torch.equal(split_pool(pool, 1000, seed=7)[0], split_pool(pool, 1000, seed=7)[0])   # seeded


def test_own_class_share_by_hand():
    assert own_class_share([10, 30, 0, 60], [1, 3]) == pytest.approx(0.9)
    assert own_class_share([5, 0, 5], [2]) == 0.5
    with pytest.raises(ValueError):
        own_class_share([0, 0], [0])


def test_grid_sizes_and_dp_budgets_are_derived_from_the_data():
    import math

    from app.config import ConfigError, parse_config
    from app.data import partition_summary
    from models.dp import DPAccount, sample_rate
    from simulations.privacy_audit import dp_sets, probe_steps, share_for

    cfg = parse_config({"min-nodes": 5})
    share = share_for(cfg, 5, 100)
    sizes = [p["size"] for p in partition_summary(cfg.replace(server_share=share).data_spec(), 5)]
    assert all(abs(n - 100) <= 3 for n in sizes), sizes
    with pytest.raises(ConfigError, match="--client-images 500"):
        share_for(cfg, 5, 500)                           # digits has ~288 images of two digits
    assert dp_sets(cfg, 5, 1000, math.inf) == (["dp=false"], 0.0)
    sets, sigma = dp_sets(cfg, 5, 1000, 3.0)
    assert sets == ["dp=true", f"dp-noise-multiplier={sigma!r}", "dp-target-epsilon=0"]
    n_min = min(p["size"] for p in partition_summary(cfg.data_spec(), 5))
    steps = cfg.dp_planned_steps() + probe_steps(cfg, 5, 1000)
    from app.probe import candidates

    per_client = [math.ceil(2 * len(candidates(cfg, pid, 5, 1000, 0)[0]) / cfg.batch_size) for pid in range(5)]
    assert probe_steps(cfg, 5, 1000) == max(per_client) * cfg.client_disc_steps > 0
    assert probe_steps(cfg.replace(strategy="fedavg"), 5, 1000) == 0
    spent = DPAccount([(sigma, sample_rate(cfg.batch_size, n_min), steps)]).epsilon(cfg.dp_delta)
    assert spent == pytest.approx(3.0, abs=0.05) and spent <= 3.0 + 1e-3


def test_audit_nonmembers_sets_the_non_member_count_and_the_probe_budget():
    """audit-nonmembers = N: N non-members of the client's classes that no client holds (at most
    the pool), members unchanged; the probe's D steps (and so the derived sigma) count them."""
    import math

    from app.config import ConfigError, parse_config
    from app.probe import candidates
    from simulations.privacy_audit import probe_steps, share_for

    cfg = parse_config({"min-nodes": 5})
    cfg = cfg.replace(server_share=share_for(cfg, 5, 100))
    mem, non, classes, pool = candidates(cfg, 0, 5, 1000, 0)
    assert len(non) == len(mem) and len(pool) > 2 * len(mem)       # default: as many as members
    wide = cfg.replace(audit_nonmembers=250)
    mem2, non2, _, pool2 = candidates(wide, 0, 5, 1000, 0)
    assert torch.equal(mem2, mem) and len(non2) == 250 and torch.equal(pool2, pool)
    pool_rows = {tuple(r.tolist()) for r in pool.reshape(len(pool), -1)}
    assert {tuple(r.tolist()) for r in non2.reshape(250, -1)} <= pool_rows      # unseen images of its classes
    assert len(candidates(cfg.replace(audit_nonmembers=10**6), 0, 5, 1000, 0)[1]) == len(pool)   # capped
    counts = [candidates(wide, pid, 5, 1000, 0) for pid in range(5)]
    per_client = [math.ceil((len(m) + min(250, len(p))) / cfg.batch_size) for m, _, _, p in counts]
    assert probe_steps(wide, 5, 1000) == max(per_client) * cfg.client_disc_steps > probe_steps(cfg, 5, 1000)
    with pytest.raises(ConfigError, match="audit-nonmembers"):
        parse_config({"audit-nonmembers": -1})


def test_the_roc_plot_draws_every_panel_and_nothing_when_no_cell_was_attacked(tmp_path):
    """A grid whose cells all failed has no curves: no plot and no crash (the report still ends
    the run, with exit code 1 for the failed cells)."""
    from simulations.privacy_audit import plot

    assert plot({}, tmp_path / "none.png") is False and not (tmp_path / "none.png").exists()
    curve = (np.array([0.0, 0.5, 1.0]), np.array([0.0, 0.8, 1.0]))
    assert plot({("privacygan", 10.0, 100, "probe", 0): curve}, tmp_path / "roc.png") is True
    assert (tmp_path / "roc.png").stat().st_size > 0


def test_the_audit_reads_its_experiment_file_and_stops_at_start_on_a_bad_one(tmp_path, capsys):
    """--config is the cells' base (a key in it is validated like any run-config key); a missing
    or bad file is one line naming it, exit code 1, before anything trains."""
    from simulations.privacy_audit import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("num-rounds: 0\n")
    assert main(["--config", str(bad), "--out", str(tmp_path / "a")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("[fedgan] error: ") and "num-rounds" in err and len(err.strip().splitlines()) == 1
    assert main(["--config", str(tmp_path / "missing.yaml"), "--out", str(tmp_path / "b")]) == 1
    assert "missing.yaml" in capsys.readouterr().err
    nodata = tmp_path / "nodata.yaml"
    nodata.write_text(f"dataset: cifar10\ndata-dir: {tmp_path / 'no-cifar'}\n")
    assert main(["--config", str(nodata), "--client-images", "100", "--out", str(tmp_path / "c")]) == 1
    err = capsys.readouterr().err
    assert str(tmp_path / "no-cifar") in err and len(err.strip().splitlines()) == 1
    assert not any((tmp_path / d).exists() for d in ("a", "b"))


@pytest.mark.e2e
def test_the_audit_script_probes_through_the_clientapp_and_writes_its_report(tmp_path):
    from simulations.privacy_audit import main

    out = tmp_path / "audit"
    experiment = tmp_path / "tiny.yaml"   # the run's keys from an experiment file, as --config gives them
    experiment.write_text("num-rounds: 2\nteacher-steps: 10\ngen-features: 8\ndisc-features: 8\nbatch-size: 16\n"
                          "steps-per-round: 1\nlocal-steps: 2\n")
    rc = main(["--clients", "2", "--config", str(experiment), "--output-dir", str(tmp_path), "--strategies",
               "privacygan", "local", "--candidates", "24", "--samples", "64", "--bootstrap", "20", "--out", str(out)])
    assert rc == 0
    report = json.loads((out / "audit.json").read_text())
    rows = report["results"]
    attacks = {(r["strategy"], r["attack"], r["client"]) for r in rows}
    assert attacks == {("privacygan", "probe (labels)", 0), ("privacygan", "probe (labels)", 1),
                       ("privacygan", "probe (feedback norm)", 0), ("privacygan", "probe (feedback norm)", 1),
                       ("privacygan", "samples (DCR, student0)", 0), ("privacygan", "samples (DCR, student1)", 1),
                       ("privacygan", "samples (learned, student0)", 0),
                       ("privacygan", "samples (learned, student1)", 1),
                       ("local", "samples (DCR, client0)", 0), ("local", "samples (DCR, client1)", 1),
                       ("local", "samples (learned, client0)", 0), ("local", "samples (learned, client1)", 1)}
    for r in rows:
        assert 0.0 <= r["auc"] <= 1.0 and r["auc_ci95"][0] <= r["auc"] <= r["auc_ci95"][1]
        assert r["probed_after_round"] == 2 and r["epsilon_target"] == "inf" and r["epsilon"] is None
        if "learned" in r["attack"]:   # half the non-member pool trains the attack: fewer candidates
            assert 0 < r["members"] == r["nonmembers"] <= 24
        else:
            assert (r["members"], r["nonmembers"]) == (24, 24)
    # the utility of every generator the audit attacked, scored against the client's own images
    assert {(u["strategy"], u["client"]) for u in report["utility"]} == {(s, c) for s in ("privacygan", "local")
                                                                         for c in (0, 1)}
    assert all(0.0 <= u["own_share"] <= 1.0 and u["fid_own"] > 0 for u in report["utility"])
    assert (out / "grid.md").read_text().count("| privacygan |") == 1
    assert (out / "roc.png").stat().st_size > 0
    # the probe went through the ClientApp handler, on the D_i the client trained: it reports
    # its 2 training steps (1 per round) plus one step per probe batch (48 candidates / 16 = 3)
    probes = [r for r in rows if r["attack"].startswith("probe")]
    assert all((r["probe_batches"], r["client_d_steps_after_probe"]) == (3, 5) for r in probes), probes
    run = Path(probes[0]["run"])
    last = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == 2 and all(c["d_steps_total"] == 2 for c in last["clients"].values())


@pytest.mark.e2e
def test_the_audit_trains_with_dp_at_the_asked_budget_and_attacks_the_global_d(tmp_path):
    """--epsilons 3: every client's own ledger ends at (just under) 3, the PrivacyGAN probe included;
    FedAvg's server-side D is attacked from its checkpoint."""
    from simulations.privacy_audit import main

    out = tmp_path / "audit"
    rc = main(["--clients", "2", "--rounds", "2", "--output-dir", str(tmp_path), "--strategies", "privacygan",
               "fedavg", "--epsilons", "3", "--client-images", "60", "--candidates", "24", "--samples", "64",
               "--bootstrap", "20", "--out", str(out), "--set", "teacher-steps=10", "--set", "gen-features=8",
               "--set", "disc-features=8", "--set", "batch-size=16", "--set", "steps-per-round=1",
               "--set", "local-steps=2", "--set", "dp-delta=1e-3", "--nonmembers", "40"])
    assert rc == 0
    report = json.loads((out / "audit.json").read_text())
    assert [(c["strategy"], c["epsilon_target"]) for c in report["cells"]] == [("privacygan", 3.0), ("fedavg", 3.0)]
    # --nonmembers 40: 24 members against 40 non-members in the probe, the D-weights and DCR attacks
    # (the learned attack pairs its halves of the pool), and the probe's 4 batches (64 / 16) are in
    # the budget: epsilon_spent_max below stays <= 3
    assert report["setup"]["nonmembers_per_client"] == 40
    assert {(r["members"], r["nonmembers"]) for r in report["results"] if "learned" not in r["attack"]} == {(24, 40)}
    assert {r["probe_batches"] for r in report["results"] if r["attack"].startswith("probe")} == {4}
    for c in report["cells"]:
        assert all(abs(n - 60) <= 2 for n in c["client_images"]) and c["noise_multiplier"] > 0
        assert 2.9 < c["epsilon_spent_max"] <= 3.0 + 1e-6
    rows = report["results"]
    assert {r["attack"] for r in rows if r["strategy"] == "fedavg"} == {"D weights", "samples (DCR, global)",
                                                                        "samples (learned, global)"}
    probes = [r for r in rows if r["attack"] == "probe (labels)"]
    assert len(probes) == 2 and all(2.9 < r["epsilon"] <= 3.0 + 1e-6 for r in probes)
    last = json.loads(Path(probes[0]["run"], "metrics.jsonl").read_text().splitlines()[-1])["clients"]
    for r in probes:   # the probe's D steps are counted: the ledger moved on after the last round
        trained = [c["dp_epsilon"] for name, c in last.items() if name.split(" (")[0] == f"client {r['client']}"]
        assert len(trained) == 1 and trained[0] < r["epsilon"]
