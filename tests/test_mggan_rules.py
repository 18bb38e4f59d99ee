"""MGGAN rules (thesis ch. 3): pairing, VRL, Algorithm 1, period A, regrouping interval."""

import itertools
import math
import random

import numpy as np
import pytest

from strategies.mggan_rules import (LearningRateController, RegroupSchedule, adjust_learning_rate, group_lr_max,
                                    period_a_end, random_derangement, regroup_anchor, schedule, vrl)


# --------------------------------------------------------------------------- derangement

def test_derangement_has_no_fixed_point_and_is_a_permutation():
    rng = random.Random(0)
    for n in range(2, 9):
        for _ in range(300):
            p = random_derangement(n, rng)
            assert sorted(p) == list(range(n))
            assert all(p[k] != k for k in range(n))


def test_derangement_n2_is_the_swap():
    rng = random.Random(1)
    assert all(random_derangement(2, rng) == [1, 0] for _ in range(50))


@pytest.mark.parametrize("n", [1, 0, -3])
def test_derangement_too_few_groups_raises(n):
    with pytest.raises(ValueError, match="derangement"):
        random_derangement(n, random.Random(0))


def test_derangement_is_uniform_chi_square():
    all_derangements = [p for p in itertools.permutations(range(4)) if all(p[k] != k for k in range(4))]
    assert len(all_derangements) == 9
    rng = random.Random(12345)
    draws = 9000
    counts = {p: 0 for p in all_derangements}
    for _ in range(draws):
        counts[tuple(random_derangement(4, rng))] += 1
    expected = draws / 9
    statistic = sum((c - expected) ** 2 / expected for c in counts.values())
    assert statistic < 26.12  # 99.9 % critical value of chi-square with 8 dof
    assert min(counts.values()) > 0


# --------------------------------------------------------------------------- VRL

def test_vrl_hand_values():
    assert vrl(1.2, 1.0) == pytest.approx(0.2)
    assert vrl(1.0, 1.25) == pytest.approx(0.2)
    assert vrl(3.0, 3.0) == 0.0
    assert vrl(-1.0, -2.0) == pytest.approx(0.5)  # |−1 − (−2)| / |−2|
    assert vrl(0.5, 0.0) == math.inf
    assert vrl(0.0, 0.0) == math.inf


# --------------------------------------------------------------------------- Algorithm 1

KW = dict(lr0=0.001, lr_max=0.002, delta=0.1, a=3, gamma_max=0.05)


def test_adjust_raise_inside_window():
    for i in (17, 20, 23):  # both window edges and the centre, i_T = 20, a = 3
        lr, branch = adjust_learning_rate(i, 20, 0.001, gamma=0.01, **KW)
        assert branch == "raise"
        assert lr == pytest.approx(0.0011)


def test_adjust_raise_at_threshold_equality():
    lr, branch = adjust_learning_rate(20, 20, 0.001, gamma=0.05, **KW)
    assert (lr, branch) == (pytest.approx(0.0011), "raise")


def test_adjust_cap():
    lr, branch = adjust_learning_rate(21, 20, 0.0019, gamma=0.0, **KW)  # 0.0019 * 1.1 = 0.00209
    assert (lr, branch) == (0.002, "cap")
    lr, branch = adjust_learning_rate(21, 20, 0.002, gamma=0.0, **KW)
    assert (lr, branch) == (0.002, "cap")
    # landing exactly on the limit counts as capping (Algorithm 1, line 3: L' >= L̄)
    lr, branch = adjust_learning_rate(21, 20, 0.001, gamma=0.0, **{**KW, "delta": 1.0})
    assert (lr, branch) == (0.002, "cap")


def test_adjust_hold_window_when_loss_moves_enough():
    lr, branch = adjust_learning_rate(19, 20, 0.0015, gamma=0.2, **KW)
    assert (lr, branch) == (0.0015, "hold-window")
    lr, branch = adjust_learning_rate(19, 20, 0.0015, gamma=math.inf, **KW)
    assert (lr, branch) == (0.0015, "hold-window")


def test_adjust_reset_right_after_window():
    lr, branch = adjust_learning_rate(24, 20, 0.0017, gamma=0.0, **KW)
    assert (lr, branch) == (0.001, "reset")


def test_adjust_hold_outside():
    for i in (0, 16, 25, 100):
        lr, branch = adjust_learning_rate(i, 20, 0.0013, gamma=0.0, **KW)
        assert (lr, branch) == (0.0013, "hold")


# --------------------------------------------------------------------------- controller

def drive(c, losses, anchor):
    """Run the controller as the client does: the rate of iteration i first, then its loss.

    ``losses`` maps iteration -> generator loss, iterated in order; ``anchor(i)`` is i_T."""
    got = []
    for i, loss in losses.items():
        got.append((c.rate(i, anchor(i)), c.last_branch))
        c.observe(loss)
    return got


def test_controller_flat_trace_raises_in_window_then_resets():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    assert c.lr == 0.001
    got = drive(c, {i: 1.0 for i in range(30)}, lambda i: 20)
    raised = [0.0011, 0.00121, 0.001331, 0.0014641, 0.00161051, 0.001771561, 0.0019487171]
    # the rate *used at* iteration i: window [17, 23] raised, 24 = i_T + a + 1 back to L0
    expected = [0.001] * 17 + raised + [0.001] * 6
    assert [lr for lr, _ in got] == pytest.approx(expected, rel=1e-12)
    assert [b for _, b in got] == ["hold"] * 17 + ["raise"] * 7 + ["reset"] + ["hold"] * 5


def test_controller_no_schedule_keeps_lr0_and_vrl_needs_two_earlier_losses():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    assert drive(c, {i: 1.0 for i in range(10)}, lambda i: None) == [(0.001, "hold")] * 10
    # a controller that starts inside a window: before iterations 0 and 1 fewer than two
    # losses exist, so gamma = inf and Algorithm 1 holds; from iteration 2 on gamma = VRL(L0, L1)
    d = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    assert d.gamma() == math.inf
    got = drive(d, {0: 1.0, 1: 1.0, 2: 1.0}, lambda i: 2)
    assert got == [(0.001, "hold-window"), (0.001, "hold-window"), (pytest.approx(0.0011), "raise")]
    assert d.gamma() == 0.0 and (d.previous_loss, d.latest_loss) == (1.0, 1.0)


def test_controller_gamma_comes_from_the_two_losses_before_the_iteration():
    c = LearningRateController(lr0=0.001, lr_max=0.0013, delta=0.1, a=2, gamma_max=0.05)
    # i_T = 10: window [8, 12], reset at 13. The loss jumps at iteration 8, so only the rate
    # of iteration 9 sees the jump: gamma_9 = VRL(L_7, L_8) = |1 - 2| / 2 = 0.5 > 0.05.
    losses = {6: 1.0, 7: 1.0, 8: 2.0, 9: 2.0, 10: 2.0, 11: 2.0, 12: 2.0, 13: 2.0, 14: 2.0}
    got = drive(c, losses, lambda i: 10)
    assert got == [
        (0.001, "hold"),                        # i=6: outside the window (and no loss yet)
        (0.001, "hold"),                        # i=7: outside the window
        (pytest.approx(0.0011), "raise"),       # i=8: gamma = VRL(L_6, L_7) = 0
        (pytest.approx(0.0011), "hold-window"),  # i=9: gamma = VRL(L_7, L_8) = 0.5
        (pytest.approx(0.00121), "raise"),      # i=10: gamma = VRL(L_8, L_9) = 0
        (0.0013, "cap"),                        # i=11: 0.001331 >= 0.0013
        (0.0013, "cap"),                        # i=12
        (0.001, "reset"),                       # i=13 = i_T + a + 1
        (0.001, "hold"),                        # i=14
    ]


def test_controller_state_dict_round_trip():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    drive(c, {15: 1.0, 16: 1.5, 17: 1.4, 18: 1.4}, lambda i: 20)
    d = c.state_dict()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
    fresh = LearningRateController(lr0=0.5, lr_max=0.5, delta=0.0, a=0, gamma_max=0.0)
    fresh.load_state_dict(d)
    assert fresh.state_dict() == d
    assert (fresh.lr, fresh.previous_loss, fresh.latest_loss) == (c.lr, 1.4, 1.4)
    # both continue identically
    losses = {i: 1.0 + 0.01 * (i % 3) for i in range(19, 30)}
    assert drive(fresh, losses, lambda i: 20) == drive(c, losses, lambda i: 20)
    # "no loss yet" / "one loss yet" survive the round trip as None, not 0.0
    empty = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    fresh.load_state_dict(empty.state_dict())
    assert (fresh.previous_loss, fresh.latest_loss, fresh.lr) == (None, None, 0.001)
    empty.observe(0.0)
    fresh.load_state_dict(empty.state_dict())
    assert (fresh.previous_loss, fresh.latest_loss) == (None, 0.0) and fresh.gamma() == math.inf


def test_controller_validates():
    with pytest.raises(ValueError):
        LearningRateController(lr0=0.01, lr_max=0.001, delta=0.1, a=3, gamma_max=0.05)
    with pytest.raises(ValueError):
        LearningRateController(lr0=0.001, lr_max=0.01, delta=0.1, a=-1, gamma_max=0.05)


# --------------------------------------------------------------------------- i_T of Algorithm 1

def test_regroup_anchor_is_the_regrouping_whose_window_or_reset_holds_the_iteration():
    # upcoming regroup at 100, last one at 50, a = 10: regions [40, 61] and [90, 111]
    assert regroup_anchor(61, 100, 50, 10) == 50       # reset of the last one
    assert regroup_anchor(62, 100, 50, 10) is None     # between regions: Algorithm 1 holds
    assert regroup_anchor(89, 100, 50, 10) is None
    assert regroup_anchor(90, 100, 50, 10) == 100      # window of the upcoming one
    # after the regroup at 100 (next one at 200): still its window, then its reset
    assert [regroup_anchor(i, 200, 100, 10) for i in (100, 110, 111, 112, 189, 190)] == [
        100, 100, 100, None, None, 200]
    # overlapping regions (T = 10 <= 2a + 1): the upcoming regrouping wins
    assert regroup_anchor(105, 110, 100, 10) == 110
    # nothing scheduled or performed; a = 0
    assert regroup_anchor(5, None, None, 10) is None
    assert [regroup_anchor(i, 100, None, 0) for i in (99, 100, 101, 102)] == [None, 100, 100, None]
    assert [regroup_anchor(i, None, 100, 0) for i in (99, 100, 101, 102)] == [None, 100, 100, None]
    with pytest.raises(ValueError):
        regroup_anchor(0, 10, None, -1)


def test_group_lr_max_keeps_the_headroom_ratio_and_never_undercuts_l0():
    assert group_lr_max(1e-3, 2e-4, 2e-4) == 1e-3                 # the configured base rate: lr-max itself
    assert group_lr_max(3 * 2**-10, 2**-10, 2**-12) == 3 * 2**-12  # WGAN group: same L̄/L0 = 3
    assert group_lr_max(1e-3, 2e-4, 5e-5) == pytest.approx(2.5e-4, rel=1e-15)
    for lr0_ref, lr0 in ((3e-4, 7e-5), (1e-4, 1e-4 * (1 + 2**-50)), (0.1, 0.3), (2e-4, 5e-5)):
        cap = group_lr_max(lr0_ref, lr0_ref, lr0)                  # lr-max == the base rate: no headroom
        assert cap >= lr0 and cap == pytest.approx(lr0, rel=1e-15)
        LearningRateController(lr0=lr0, lr_max=cap, delta=0.1, a=1, gamma_max=0.1)  # accepted
    with pytest.raises(ValueError, match="lr_max"):
        group_lr_max(1e-4, 2e-4, 5e-5)


# --------------------------------------------------------------------------- period A

def naive_period_a_end(losses, window, threshold, min_iters, cap):
    """Direct O(n·window) transcription of the documented test, as a reference."""
    for j in range(max(min_iters, 2 * window), min(len(losses), cap) + 1):
        prev = sum(losses[j - 2 * window:j - window]) / window
        cur = sum(losses[j - window:j]) / window
        if (prev - cur) / abs(prev) < threshold:
            return j
    return cap if len(losses) >= cap else None


def decay_then_flat(flat_from=150, n=600):
    v = [2 * math.exp(-j / 40) + 0.5 for j in range(flat_from)]
    return v + [v[-1]] * (n - flat_from)


def test_period_a_ends_after_flattening():
    losses = decay_then_flat(150)
    end = period_a_end(losses, window=50, threshold=0.01, min_iters=100, cap=2000)
    # Before j = 150 the window average still drops > 10 % per window; by j = 150 + 2·50
    # both windows are flat (improvement 0); at j = 150 + 50 the previous window is still
    # decaying (its mean exceeds the flat value by ~0.06, > 1 %). So the end is in (200, 250].
    assert 200 < end <= 250
    assert end == naive_period_a_end(losses, 50, 0.01, 100, 2000)


def test_period_a_answer_only_needs_the_prefix():
    losses = decay_then_flat(150)
    end = period_a_end(losses)
    for j in range(0, end):
        assert period_a_end(losses[:j]) is None
    assert period_a_end(losses[:end]) == end
    assert period_a_end(np.asarray(losses[:end + 7])) == end


def test_period_a_still_decreasing_or_short_is_undecided():
    assert period_a_end([1.0] * 99) is None  # shorter than max(min_iters, 2·window)
    steep = [10.0 - 0.05 * j for j in range(150)]
    assert period_a_end(steep) is None
    assert period_a_end([]) is None


def test_period_a_never_flattens_ends_at_cap():
    geometric = [math.exp(-j / 1000) for j in range(2500)]  # ~4.9 % drop per 50-iteration window
    assert period_a_end(geometric[:1999]) is None
    assert period_a_end(geometric[:2000]) == 2000
    assert period_a_end(geometric) == 2000
    assert period_a_end(geometric, cap=500) == 500
    assert period_a_end(geometric[:499], cap=500) is None


def test_period_a_noisy_flat_ends_at_first_check():
    rng = random.Random(7)
    noisy = [1.0 + rng.uniform(-0.03, 0.03) for _ in range(400)]
    assert period_a_end(noisy, window=50, min_iters=100) == 100
    assert period_a_end(noisy, window=50, min_iters=40) == 100   # 2·window dominates
    assert period_a_end(noisy, window=20, min_iters=130) == 130  # min_iters dominates


def test_period_a_threshold_is_strict():
    flat = [1.0] * 300
    assert period_a_end(flat, threshold=0.01) == 100
    assert period_a_end(flat, threshold=0.0, cap=250) == 250  # improvement 0 is not < 0


def test_period_a_matches_naive_reference_on_random_walks():
    rng = np.random.default_rng(3)
    for _ in range(20):
        trace = list(5.0 + np.cumsum(rng.normal(-0.01, 0.05, size=500)) * 0.1)
        for window, thr in ((10, 0.01), (25, 0.002)):
            assert (period_a_end(trace, window=window, threshold=thr, min_iters=30, cap=450)
                    == naive_period_a_end(trace, window, thr, 30, 450))


def test_period_a_long_trace_is_fast():
    import time
    trace = [math.exp(-j / 1e5) for j in range(200_000)]  # ~4.9 % drop per window
    t = time.perf_counter()
    assert period_a_end(trace, window=5000, cap=10**9) is None
    assert time.perf_counter() - t < 1.0


# --------------------------------------------------------------------------- §3.2.4

def test_dynamic_schedule_grows_and_caps():
    s = RegroupSchedule(xi=1.5, t_max=300)
    assert s.t is None and s.next_at is None
    assert not s.due(10**9)
    s.start(100)
    assert (s.t, s.next_at) == (100, 100)
    assert not s.due(99) and s.due(100)
    seen_next, seen_t = [s.next_at], [s.t]
    for _ in range(4):
        seen_next.append(s.advance())
        seen_t.append(s.t)
    # T: 100 -> 150 -> 225 -> ceil(337.5)=338 capped to 300 -> 300
    assert seen_t == [100, 150, 225, 300, 300]
    assert seen_next == [100, 250, 475, 775, 1075]
    assert s.regroups == 4
    assert not s.due(1074) and s.due(1075)


def test_late_regrouping_counts_the_next_interval_from_where_it_happened():
    s = RegroupSchedule(xi=1.5, t_max=300)
    s.start(17)                            # period A was 17 iterations, detected at a round end (20)
    assert s.advance(20) == 20 + 26        # T1 = ceil(17 * 1.5) = 26 after the regrouping at 20
    assert (s.last_at, s.t, s.regroups) == (20, 26, 1)
    assert s.advance() == 46 + 39          # on time: T2 = 39 after 46
    with pytest.raises(ValueError, match="before it is due"):
        s.advance(84)


def test_fixed_and_never_modes():
    s = RegroupSchedule(fixed_interval=25)
    assert (s.t, s.next_at) == (25, 25)
    assert [s.next_at] + [s.advance() for _ in range(2)] == [25, 50, 75]
    assert s.t == 25
    with pytest.raises(RuntimeError):
        s.start(100)
    off = RegroupSchedule(fixed_interval=0)
    assert off.next_at is None
    assert not any(off.due(i) for i in range(0, 100_000, 997))
    with pytest.raises(RuntimeError):
        off.advance()


def test_schedule_function_agrees():
    assert schedule(100, 2, 300, 5) == [100, 300, 600, 900, 1200]
    assert schedule(100, 1.5, 300, 5) == [100, 250, 475, 775, 1075]
    assert schedule(100, 1.1, 10_000, 2) == [100, 210]  # 100·1.1 is 110.00000000000001 in floats
    assert schedule(7, 3.0, 50, 0) == []
    for t0, xi, t_max in ((1, 1.5, 7), (37, 1.25, 400), (500, 2.0, 300)):
        s = RegroupSchedule(xi=xi, t_max=t_max)
        s.start(t0)
        manual = []
        for _ in range(12):
            manual.append(s.next_at)
            s.advance()
        assert schedule(t0, xi, t_max, 12) == manual


def test_schedule_validation():
    for xi in (1.0, 0.5):
        with pytest.raises(ValueError, match="xi"):
            RegroupSchedule(xi=xi)
    with pytest.raises(ValueError):
        RegroupSchedule(t_max=0)
    with pytest.raises(ValueError):
        RegroupSchedule(fixed_interval=-2)


def test_schedule_state_dict_round_trip():
    s = RegroupSchedule(xi=1.5, t_max=300)
    fresh = RegroupSchedule()
    fresh.load_state_dict(s.state_dict())
    assert (fresh.t, fresh.next_at, fresh.last_at) == (None, None, None)
    s.start(100)
    s.advance()
    d = s.state_dict()
    assert all(isinstance(v, (int, float)) for v in d.values())
    fresh.load_state_dict(d)
    assert fresh == s
    assert fresh.advance() == s.advance() == 475


def test_anchor_keeps_the_window_around_a_performed_regroup():
    s = RegroupSchedule(fixed_interval=20)
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    anchors, lrs = [], []
    for i in range(46):
        if s.due(i):
            s.advance()
        anchors.append(s.anchor(i, 3))
        assert anchors[-1] == regroup_anchor(i, s.next_at, s.last_at, 3)
        lrs.append(c.rate(i, anchors[-1]))
        c.observe(1.0)
    assert anchors[:17] == [None] * 17
    assert anchors[17:21] == [20] * 4       # window before the regroup at 20
    assert anchors[21:25] == [20] * 4       # after it (next_at has moved to 40): its window and reset
    assert anchors[25:37] == [None] * 12
    assert anchors[37:45] == [40] * 8
    assert anchors[45] is None
    raised = [0.001 * 1.1 ** k for k in range(1, 8)]
    assert lrs == pytest.approx([0.001] * 17 + raised + [0.001] * 13 + raised + [0.001] * 2, rel=1e-12)
    assert RegroupSchedule().anchor(5, 3) is None
