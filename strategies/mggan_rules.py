"""MGGAN scheduling rules (H. Wu, PhD thesis, chapter 3), as pure functions.

MGGAN trains K generative groups (G_k, D_k) side by side without sharing parameters.
Every so often the groups are *regrouped*: generator k is paired with the discriminator
of another group (§3.2.1). This module holds the bookkeeping that decides *when* and
*how* that happens, and nothing else — no Flower, no torch — so the strategy that
moves weights around can stay thin and these rules can be tested exactly:

* :func:`random_derangement` — the pairing k → π(k), with π(k) ≠ k (a generator always
  meets a *new* discriminator);
* :func:`vrl` — the Variation Ratio of the Loss, Eq. 3.1 (§3.2.3);
* :func:`adjust_learning_rate` / :class:`LearningRateController` — Algorithm 1, the
  learning-rate rule around each regrouping (§3.2.2);
* :func:`period_a_end` — a concrete test for "the loss no longer decreases obviously",
  which ends period A and gives T0 (§3.2.2, §3.2.4);
* :class:`RegroupSchedule` / :func:`schedule` — the regrouping interval
  T0 = |period A|, T ← min(T·ξ, T̄) (§3.2.4), plus a fixed-interval mode and an
  "off" mode for ablations.

Iterations are counted from 0 by the caller; "iteration i_T" is the iteration at which
a regrouping is performed.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

__all__ = [
    "random_derangement",
    "vrl",
    "adjust_learning_rate",
    "LearningRateController",
    "period_a_end",
    "RegroupSchedule",
    "schedule",
]

# Branch labels reported by adjust_learning_rate.
RAISE, CAP, HOLD_WINDOW, RESET, HOLD = "raise", "cap", "hold-window", "reset", "hold"


# --------------------------------------------------------------------------- pairing

def random_derangement(n: int, rng: random.Random) -> list[int]:
    """A uniformly random derangement of ``range(n)``: a permutation ``p`` with ``p[k] != k``.

    At a regrouping instance (thesis §3.2.1) generator k is paired with discriminator
    ``p[k]`` of another generative group, so no generator keeps its own partner.

    Sampling is by rejection: shuffle ``range(n)`` with ``rng`` until the result has no
    fixed point. Every permutation is equally likely after a shuffle, so conditioning on
    "no fixed point" leaves every derangement equally likely. About e ≈ 2.72 shuffles
    are needed on average, for any n.

    Raises ``ValueError`` for n < 2: with a single group there is no other discriminator
    to pair with, so no derangement of one element exists (and n ≤ 0 is meaningless).
    """
    if n < 2:
        raise ValueError(
            f"a derangement needs n >= 2 groups, got n={n} (a single group has no other "
            "discriminator to be paired with, so no derangement of 1 element exists)")
    p = list(range(n))
    while True:
        rng.shuffle(p)
        if all(k != v for k, v in enumerate(p)):
            return p


# --------------------------------------------------------------------------- Eq. 3.1

def vrl(previous: float, current: float) -> float:
    """Variation Ratio of the Loss, thesis Eq. 3.1: ``VRL_n = |L_{n-1} - L_n| / L_n``.

    The denominator is taken as ``|L_n|`` so that losses which can be negative (e.g. a
    WGAN critic-based generator loss) still give a non-negative ratio. When the current
    loss is exactly 0 the ratio is unbounded and ``math.inf`` is returned (an infinite
    VRL never satisfies ``γ ≤ γ̄``, so Algorithm 1 then leaves the rate alone).
    """
    if current == 0:
        return math.inf
    return abs(previous - current) / abs(current)


# --------------------------------------------------------------------------- Algorithm 1

def adjust_learning_rate(i: int, i_T: int, lr: float, *, lr0: float, lr_max: float, delta: float,
                         a: int, gamma: float, gamma_max: float) -> tuple[float, str]:
    """One application of Algorithm 1 (thesis §3.2.2) to one generative group.

    Parameters follow the thesis: ``i`` current iteration, ``i_T`` the iteration of the
    (next or most recent) regrouping, ``a`` the half-width α of the adjusting region,
    ``lr_max`` the upper limit L̄, ``delta`` the adjusting ratio δ, ``gamma`` the current
    VRL γ (Eq. 3.1), ``gamma_max`` its threshold γ̄, ``lr`` the current rate L and ``lr0``
    the rate at the beginning of period A (L0).

    Returns ``(new_lr, branch)``:

    * ``i_T - a <= i <= i_T + a`` and ``gamma <= gamma_max`` → ``lr + lr*delta``
      (branch ``"raise"``), or ``lr_max`` if that reaches the limit (``"cap"``; lines 3–4
      of Algorithm 1 use ``L' >= L̄``, so landing exactly on the limit also reports
      ``"cap"``). The aim is to push the training out of the local optimum that forms
      just before a regrouping.
    * inside the window but ``gamma > gamma_max`` → unchanged (``"hold-window"``): the
      loss is still moving enough on its own, so no push is needed (§3.2.3). A NaN
      ``gamma`` also lands here.
    * ``i == i_T + a + 1`` → ``lr0`` (``"reset"``): the window is over and the new
      pairing should learn with the base model's rate again.
    * anything else → unchanged (``"hold"``).

    The thesis keeps raising the internal L while outputting the capped L'; here the
    returned (capped) value is the new rate, so the rate never exceeds ``lr_max``.
    """
    if a < 0:
        raise ValueError(f"a (the adjusting half-width α) must be >= 0, got {a}")
    if i_T - a <= i <= i_T + a:
        if gamma <= gamma_max:
            raised = lr + lr * delta
            if raised >= lr_max:
                return lr_max, CAP
            return raised, RAISE
        return lr, HOLD_WINDOW
    if i == i_T + a + 1:
        return lr0, RESET
    return lr, HOLD


@dataclass
class LearningRateController:
    """Per-group state for Algorithm 1: the current rate and the previous loss.

    Feed one generator loss per iteration with :meth:`step`; it computes γ = VRL from the
    previous loss (Eq. 3.1; on the very first call there is no previous loss and γ is
    taken as ∞, i.e. "do not raise") and applies :func:`adjust_learning_rate` around
    ``i_T``. While no regrouping is scheduled (``i_T is None``, i.e. during period A,
    or with regrouping switched off) the rate is left untouched, so it stays ``lr0`` —
    "in period A, we use the learning rate set by the base GAN model" (§3.2.2).

    ``i_T`` should be the regrouping the current iteration belongs to: the upcoming one
    before and during its window, and the one just performed until its reset at
    ``i_T + a + 1`` (see :meth:`RegroupSchedule.anchor`).
    """

    lr0: float
    lr_max: float
    delta: float
    a: int
    gamma_max: float
    lr: float = field(init=False)
    previous_loss: float | None = None
    last_branch: str | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        if not self.lr0 > 0:
            raise ValueError(f"lr0 must be > 0, got {self.lr0}")
        if self.lr_max < self.lr0:
            raise ValueError(f"lr_max ({self.lr_max}) must be >= lr0 ({self.lr0})")
        if self.delta < 0:
            raise ValueError(f"delta must be >= 0, got {self.delta}")
        if self.a < 0:
            raise ValueError(f"a must be >= 0, got {self.a}")
        if self.gamma_max < 0:
            raise ValueError(f"gamma_max must be >= 0, got {self.gamma_max}")
        self.lr = self.lr0

    def step(self, i: int, loss: float, i_T: int | None) -> float:
        """Record iteration ``i``'s generator loss and return the rate to use next."""
        loss = float(loss)
        gamma = math.inf if self.previous_loss is None else vrl(self.previous_loss, loss)
        self.previous_loss = loss
        if i_T is None:
            self.last_branch = HOLD
            return self.lr
        self.lr, self.last_branch = adjust_learning_rate(
            i, i_T, self.lr, lr0=self.lr0, lr_max=self.lr_max, delta=self.delta, a=self.a,
            gamma=gamma, gamma_max=self.gamma_max)
        return self.lr

    def state_dict(self) -> dict:
        """Plain ints/floats only (fits a Flower ``ConfigRecord``); ``None`` is encoded by a flag."""
        return {
            "lr0": float(self.lr0),
            "lr_max": float(self.lr_max),
            "delta": float(self.delta),
            "a": int(self.a),
            "gamma_max": float(self.gamma_max),
            "lr": float(self.lr),
            "has_previous_loss": int(self.previous_loss is not None),
            "previous_loss": float(self.previous_loss) if self.previous_loss is not None else 0.0,
        }

    def load_state_dict(self, d: dict) -> None:
        """Inverse of :meth:`state_dict` (``last_branch`` is diagnostic and not stored)."""
        self.lr0 = float(d["lr0"])
        self.lr_max = float(d["lr_max"])
        self.delta = float(d["delta"])
        self.a = int(d["a"])
        self.gamma_max = float(d["gamma_max"])
        self.lr = float(d["lr"])
        self.previous_loss = float(d["previous_loss"]) if int(d["has_previous_loss"]) else None


# --------------------------------------------------------------------------- period A

def period_a_end(losses: Sequence[float], *, window: int = 50, threshold: float = 0.01,
                 min_iters: int = 100, cap: int = 2000) -> int | None:
    """Decide where period A ends, from a group's generator-loss trace; that length is T0.

    The thesis ends period A "when the loss does not show the obvious decrease" (§3.2.2)
    and sets T0 to its length (§3.2.4), without fixing a test. This is the test used here.

    Let ``m(j) = mean(losses[j-window:j])`` be the moving average of the last ``window``
    losses of the first ``j`` iterations, and for ``j >= 2*window`` let::

        improvement(j) = (m(j - window) - m(j)) / |m(j - window)|

    the relative drop of that average over one window. Period A ends at the first
    ``j`` with ``max(min_iters, 2*window) <= j <= cap`` such that
    ``improvement(j) < threshold`` — the average no longer falls by at least
    ``threshold`` (1 % by default) per window. If that never happens it ends at
    ``j = cap`` anyway, so a loss that keeps creeping down does not postpone
    regrouping forever. (If ``m(j - window) == 0`` the improvement is taken as +∞ when
    the average went down and 0 otherwise.)

    Returns that ``j`` — the number of iterations in period A, i.e. T0 and the iteration
    of the first regrouping — or ``None`` while ``losses`` is too short to decide (no
    qualifying ``j <= len(losses)`` yet and ``len(losses) < cap``). The result depends
    only on ``losses[:j]``, so calling it after every iteration with the growing trace
    returns ``None`` until the first iteration at which it can answer. Cost is O(n)
    (cumulative sums), independent of ``window``. A NaN in the trace makes the
    comparisons false, so only the cap can end period A across it.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")
    if min_iters < 0:
        raise ValueError(f"min_iters must be >= 0, got {min_iters}")
    n = min(len(losses), cap)
    first = max(min_iters, 2 * window)
    if n >= first:
        x = np.asarray(losses[:n], dtype=np.float64)
        c = np.concatenate(([0.0], np.cumsum(x)))
        js = np.arange(first, n + 1)
        cur = (c[js] - c[js - window]) / window
        prev = (c[js - window] - c[js - 2 * window]) / window
        drop = prev - cur
        with np.errstate(divide="ignore", invalid="ignore"):
            improvement = np.where(prev != 0, drop / np.abs(prev), np.where(drop > 0, np.inf, 0.0))
        hits = np.flatnonzero(improvement < threshold)
        if hits.size:
            return int(js[hits[0]])
    if len(losses) >= cap:
        return cap
    return None


# --------------------------------------------------------------------------- §3.2.4

@dataclass
class RegroupSchedule:
    """When to regroup: the regrouping interval T of thesis §3.2.4.

    Modes, chosen by ``fixed_interval``:

    * ``-1`` (dynamic, the thesis rule): nothing is scheduled until :meth:`start` is
      called with the length ``t0`` of period A (see :func:`period_a_end`). Then
      T = T0 = t0 and the first regrouping is at iteration t0; after each regrouping
      T ← min(⌈T·ξ⌉, T̄) and the next one is T iterations later. ξ > 1 makes the
      interval grow as more modes are learned; T̄ (``t_max``) keeps it from growing
      so large that new pairings become too rare.
    * ``N > 0``: regroup every N iterations (at N, 2N, 3N, …) from the start.
    * ``0``: never regroup (``next_at`` stays ``None``), i.e. K independent GANs.

    ``next_at`` is i_T for Algorithm 1; ``last_at`` (an addition to the thesis
    bookkeeping) remembers the regrouping just performed so that its learning-rate
    window and reset can still be applied after ``next_at`` has moved on.
    """

    xi: float = 1.5
    t_max: int = 2000
    fixed_interval: int = -1
    t: int | None = None
    next_at: int | None = None
    regroups: int = 0
    last_at: int | None = None

    def __post_init__(self) -> None:
        if not self.xi > 1:
            raise ValueError(f"xi (the growth factor ξ) must be > 1, got {self.xi}")
        if self.t_max < 1:
            raise ValueError(f"t_max (the cap T̄) must be >= 1, got {self.t_max}")
        if self.fixed_interval < -1:
            raise ValueError(f"fixed_interval must be -1 (dynamic), 0 (never) or > 0, got {self.fixed_interval}")
        if self.fixed_interval > 0 and self.t is None and self.next_at is None:
            self.t = self.fixed_interval
            self.next_at = self.fixed_interval

    @property
    def dynamic(self) -> bool:
        return self.fixed_interval == -1

    def start(self, t0: int) -> None:
        """Dynamic mode: period A ended after ``t0`` iterations; regroup first at iteration t0."""
        if not self.dynamic:
            raise RuntimeError("start() is only meaningful in dynamic mode (fixed_interval == -1)")
        if self.t is not None:
            raise RuntimeError("the schedule has already been started")
        if t0 < 1:
            raise ValueError(f"t0 (length of period A) must be >= 1, got {t0}")
        self.t = int(t0)
        self.next_at = int(t0)

    def due(self, iteration: int) -> bool:
        """True when a regrouping should be performed at ``iteration`` (never while unscheduled)."""
        return self.next_at is not None and iteration >= self.next_at

    def advance(self) -> int:
        """Record the regrouping performed at ``next_at``; grow T (dynamic mode) and return the new ``next_at``."""
        if self.next_at is None or self.t is None:
            raise RuntimeError("no regrouping is scheduled")
        self.regroups += 1
        self.last_at = self.next_at
        if self.dynamic:
            # ⌈T·ξ⌉ with a tiny tolerance, so 100·1.1 = 110.00000000000001 gives 110, not 111.
            self.t = min(math.ceil(self.t * self.xi - 1e-9), self.t_max)
        self.next_at += self.t
        return self.next_at

    def anchor(self, iteration: int, a: int) -> int | None:
        """The i_T that Algorithm 1 should use at ``iteration`` for a window half-width ``a``.

        The upcoming regrouping once ``iteration >= next_at - a``; otherwise the one just
        performed while ``iteration <= last_at + a + 1`` (its window and reset); otherwise
        the upcoming one. ``None`` while nothing is scheduled or performed.
        """
        if self.next_at is not None and iteration >= self.next_at - a:
            return self.next_at
        if self.last_at is not None and iteration <= self.last_at + a + 1:
            return self.last_at
        return self.next_at

    def state_dict(self) -> dict:
        """Plain ints/floats only (fits a Flower ``ConfigRecord``); ``None`` is stored as -1."""
        def enc(v: int | None) -> int:
            return -1 if v is None else int(v)
        return {
            "xi": float(self.xi),
            "t_max": int(self.t_max),
            "fixed_interval": int(self.fixed_interval),
            "t": enc(self.t),
            "next_at": enc(self.next_at),
            "regroups": int(self.regroups),
            "last_at": enc(self.last_at),
        }

    def load_state_dict(self, d: dict) -> None:
        """Inverse of :meth:`state_dict`."""
        def dec(v) -> int | None:
            v = int(v)
            return None if v < 0 else v
        self.xi = float(d["xi"])
        self.t_max = int(d["t_max"])
        self.fixed_interval = int(d["fixed_interval"])
        self.t = dec(d["t"])
        self.next_at = dec(d["next_at"])
        self.regroups = int(d["regroups"])
        self.last_at = dec(d.get("last_at", -1))


def schedule(t0: int, xi: float, t_max: int, count: int) -> list[int]:
    """The first ``count`` regrouping iterations of the dynamic schedule (thesis §3.2.4).

    Period A lasts ``t0`` iterations, so the first regrouping is at ``t0``; each later
    interval is ``min(⌈T·ξ⌉, t_max)``. E.g. ``schedule(100, 2, 300, 4) == [100, 300, 600, 900]``.
    Computed with :class:`RegroupSchedule`, so the two always agree.
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    s = RegroupSchedule(xi=xi, t_max=t_max)
    s.start(t0)
    out: list[int] = []
    for _ in range(count):
        out.append(s.next_at)
        s.advance()
    return out
