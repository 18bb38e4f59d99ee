"""MGGAN rules (thesis ch. 3): pairing, VRL, Algorithm 1, period A, regrouping interval."""

import itertools
import math
import random

import numpy as np
import pytest

from strategies.mggan_rules import (LearningRateController, RegroupSchedule, adjust_learning_rate,
                                    period_a_end, random_derangement, schedule, vrl)


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

def test_controller_flat_trace_raises_in_window_then_resets():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    assert c.lr == 0.001
    got, branches = [], []
    for i in range(30):
        got.append(c.step(i, 1.0, 20))
        branches.append(c.last_branch)
    raised = [0.0011, 0.00121, 0.001331, 0.0014641, 0.00161051, 0.001771561, 0.0019487171]
    expected = [0.001] * 17 + raised + [0.001] * 6
    assert got == pytest.approx(expected, rel=1e-12)
    assert branches == ["hold"] * 17 + ["raise"] * 7 + ["reset"] + ["hold"] * 5


def test_controller_no_schedule_keeps_lr0_and_first_call_has_no_vrl():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    for i in range(10):
        assert c.step(i, 1.0, None) == 0.001
        assert c.last_branch == "hold"
    # first call ever lands inside a window: no previous loss -> gamma = inf -> no raise
    d = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    assert d.step(20, 1.0, 20) == 0.001
    assert d.last_branch == "hold-window"
    assert d.step(21, 1.0, 20) == pytest.approx(0.0011)
    assert d.last_branch == "raise"


def test_controller_spike_holds_and_cap_applies():
    c = LearningRateController(lr0=0.001, lr_max=0.0013, delta=0.1, a=2, gamma_max=0.05)
    losses = {7: 1.0, 8: 1.0, 9: 2.0, 10: 2.0, 11: 2.0, 12: 2.0, 13: 2.0}
    seq = [(c.step(i, losses[i], 10), c.last_branch) for i in range(7, 14)]
    # i=8: gamma=0 -> 0.0011; i=9: gamma=|1-2|/2=0.5 -> hold-window; i=10: 0.00121;
    # i=11: 0.001331 >= 0.0013 -> cap; i=12: cap; i=13 = i_T + a + 1: reset
    assert seq[0] == (0.001, "hold")
    assert seq[1] == (pytest.approx(0.0011), "raise")
    assert seq[2] == (pytest.approx(0.0011), "hold-window")
    assert seq[3] == (pytest.approx(0.00121), "raise")
    assert seq[4] == (0.0013, "cap")
    assert seq[5] == (0.0013, "cap")
    assert seq[6] == (0.001, "reset")


def test_controller_state_dict_round_trip():
    c = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    for i in range(15, 19):
        c.step(i, 1.0, 20)
    d = c.state_dict()
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in d.values())
    fresh = LearningRateController(lr0=0.5, lr_max=0.5, delta=0.0, a=0, gamma_max=0.0)
    fresh.load_state_dict(d)
    assert fresh.state_dict() == d
    assert (fresh.lr, fresh.previous_loss) == (c.lr, c.previous_loss)
    # both continue identically
    for i in range(19, 30):
        assert fresh.step(i, 1.0, 20) == c.step(i, 1.0, 20)
    # "no previous loss" survives the round trip as None, not 0.0
    empty = LearningRateController(lr0=0.001, lr_max=1.0, delta=0.1, a=3, gamma_max=0.05)
    fresh.load_state_dict(empty.state_dict())
    assert fresh.previous_loss is None and fresh.lr == 0.001


def test_controller_validates():
    with pytest.raises(ValueError):
        LearningRateController(lr0=0.01, lr_max=0.001, delta=0.1, a=3, gamma_max=0.05)
    with pytest.raises(ValueError):
        LearningRateController(lr0=0.001, lr_max=0.01, delta=0.1, a=-1, gamma_max=0.05)


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
    for i in range(45):
        if s.due(i):
            s.advance()
        anchors.append(s.anchor(i, 3))
        lrs.append(c.step(i, 1.0, anchors[-1]))
    assert anchors[:21] == [20] * 21
    assert anchors[21:25] == [20] * 4       # after the regroup at 20: its window and reset
    assert anchors[25:45] == [40] * 20
    assert lrs[24] == 0.001 and c.lr == 0.001
    assert lrs[23] == pytest.approx(0.001 * 1.1 ** 7)
    assert lrs[43] == pytest.approx(0.001 * 1.1 ** 7)
    assert RegroupSchedule().anchor(5, 3) is None
