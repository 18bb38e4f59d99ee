"""Membership-inference scoring for the privacy audit (``simulations/privacy_audit.py``).

Pure functions over scores and tensors; what the attacks *observe* is decided by the script,
which only uses what a strategy's server legitimately receives or may send (docs/PRIVACY.md).

Convention: a higher score means "more likely a member" (a record the client trained on).

* :func:`attack_report` -- ROC AUC, a stratified bootstrap 95 % interval of it, and the true
  positive rate at 1 % and 0.1 % false positives (the max TPR whose FPR does not exceed the
  target: conservative, no interpolation between ROC points);
* :func:`dcr_scores` -- distance to the closest record: for each candidate, minus its smallest
  L2 distance to a set of generated samples (a generator that memorised a training image puts a
  sample close to it);
* :func:`probe_batches` -- candidates packed into the (K, B, ...) "fakes" layout of a PrivacyGAN
  ``train.discriminate`` message, with the padding it needed;
* :func:`discriminator_scores` -- a discriminator's raw output on each candidate (the server of
  BPGAN, data-parallel and FedAvg holds the global D: members tend to score as "real");
* :func:`learned_attack_scores` -- a black-box learned attack on samples in the spirit of LOGAN
  (Hayes et al., 2019): a classifier trained to tell a generator's samples from reference images
  of the same kind scores each candidate; images the generator memorised look like its samples;
* :func:`own_class_share` -- the share of generated samples labelled as one of a client's classes;
* :func:`chance_tpr_pmf`, :func:`chance_tpr_mean`, :func:`chance_tpr` -- what TPR at a low FPR an attack *at chance* reads
  with a given number of members and non-members (with ~100 of each, 1 % FPR admits one false
  positive, so a scorer that knows nothing still reads 1-2 % on average and more on some clients).
"""

from __future__ import annotations

import math

import numpy as np
import torch


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray, fpr: float) -> float:
    """The largest true-positive rate among ROC points with false-positive rate <= ``fpr``."""
    from sklearn.metrics import roc_curve

    f, t, _ = roc_curve(labels, scores)
    ok = f <= fpr + 1e-12
    return float(t[ok].max()) if ok.any() else 0.0


def bootstrap_auc(members: np.ndarray, nonmembers: np.ndarray, *, resamples: int = 1000,
                  seed: int = 0) -> tuple[float, float]:
    """2.5 and 97.5 percentiles of the AUC over resamples drawn with replacement, members and
    non-members resampled separately (their counts stay fixed)."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(len(members)), np.zeros(len(nonmembers))]
    aucs = np.empty(resamples)
    for r in range(resamples):
        m = members[rng.integers(0, len(members), len(members))]
        n = nonmembers[rng.integers(0, len(nonmembers), len(nonmembers))]
        aucs[r] = roc_auc_score(labels, np.r_[m, n])
    lo, hi = np.percentile(aucs, [2.5, 97.5])
    return float(lo), float(hi)


def chance_tpr_pmf(members: int, nonmembers: int, fpr: float) -> np.ndarray:
    """P(TPR at ``fpr`` = x / ``members``), x = 0..members, for scores that carry no information
    (every order of members and non-members equally likely, no ties), as :func:`tpr_at_fpr`
    reads it.

    At most j = floor(fpr * nonmembers) false positives fit, so the TPR counts the members ranked
    above the (j + 1)-th highest non-member: a negative hypergeometric count,
    P(X = x) = C(x + j, x) C(members - x + nonmembers - j - 1, members - x) / C(members + nonmembers, members),
    mean (j + 1) members / (nonmembers + 1)."""
    if members < 1 or nonmembers < 1:
        raise ValueError(f"chance TPR needs members and non-members, got {members} and {nonmembers}")
    k = math.floor(fpr * nonmembers + 1e-9) + 1          # the k-th highest non-member bounds the threshold
    pmf = np.zeros(members + 1)
    if k > nonmembers:                                   # every non-member may be a false positive
        pmf[members] = 1.0
        return pmf
    total = math.comb(members + nonmembers, members)
    for x in range(members + 1):
        pmf[x] = math.comb(x + k - 1, x) * math.comb(members - x + nonmembers - k, members - x) / total
    return pmf


def chance_tpr_mean(members: int, nonmembers: int, fpr: float) -> float:
    """The expected TPR at ``fpr`` of scores that carry no information: (j + 1) / (nonmembers + 1)
    with j = floor(fpr * nonmembers) false positives allowed (the mean of :func:`chance_tpr_pmf`
    over ``members``; 1 when every non-member may be a false positive)."""
    return (math.floor(fpr * nonmembers + 1e-9) + 1) / (nonmembers + 1)


def chance_tpr(counts, fpr: float = 0.01, q: float = 0.95, *, draws: int = 200_000, seed: int = 0) -> dict:
    """TPR at ``fpr`` of an attack at chance, for independent clients with ``counts`` =
    [(members, non-members)]: ``mean``, the expected TPR averaged over the clients;
    ``mean_quantile``, the ``q``-quantile of that average (compare a run's mean: above it is
    unlikely at chance; a seeded Monte Carlo of ``draws`` from the exact per-client distributions,
    since clients of different sizes put the average on no common lattice); each client's
    ``q``-quantile; and ``max_quantile``, the exact ``q``-quantile of the largest over the clients
    (compare the worst client)."""
    counts = [(int(m), int(n)) for m, n in counts]
    if not counts:
        raise ValueError("chance TPR needs at least one client")
    pmfs = [chance_tpr_pmf(m, n, fpr) for m, n in counts]
    grid = np.unique(np.concatenate([np.arange(m + 1) / m for m, _ in counts]))   # every TPR a client can read
    # P(TPR <= t) for each client at each t of the grid; the largest over independent clients is
    # <= t when every client is
    per_client = [np.cumsum(pmf)[np.floor(grid * m + 1e-9).astype(int).clip(max=m)]
                  for pmf, (m, _) in zip(pmfs, counts)]
    worst = np.prod(per_client, axis=0)

    def quantile(cdf):
        return float(grid[np.argmax(cdf >= q - 1e-12)])

    rng = np.random.default_rng(seed)
    average = sum(rng.choice(m + 1, size=draws, p=pmf / pmf.sum()) / m for pmf, (m, _) in zip(pmfs, counts))
    return {"fpr": fpr, "q": q, "mean": float(np.mean([chance_tpr_mean(m, n, fpr) for m, n in counts])),
            "mean_quantile": float(np.quantile(average / len(counts), q, method="inverted_cdf")),
            "client_quantile": [quantile(c) for c in per_client], "max_quantile": quantile(worst)}


def attack_report(member_scores, nonmember_scores, *, resamples: int = 1000, seed: int = 0) -> dict:
    """AUC, its bootstrap interval, TPR at 1 % and 0.1 % FPR, and the counts."""
    from sklearn.metrics import roc_auc_score

    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    if len(m) == 0 or len(n) == 0:
        raise ValueError(f"an attack needs members and non-members, got {len(m)} and {len(n)}")
    if not (np.isfinite(m).all() and np.isfinite(n).all()):
        raise ValueError("attack scores must be finite")
    labels = np.r_[np.ones(len(m)), np.zeros(len(n))]
    scores = np.r_[m, n]
    lo, hi = bootstrap_auc(m, n, resamples=resamples, seed=seed)
    return {"auc": float(roc_auc_score(labels, scores)), "auc_ci95": [lo, hi],
            "tpr_at_1pct_fpr": tpr_at_fpr(labels, scores, 0.01),
            "tpr_at_0.1pct_fpr": tpr_at_fpr(labels, scores, 0.001),
            "members": int(len(m)), "nonmembers": int(len(n))}


def roc_points(member_scores, nonmember_scores) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) of the ROC curve, for plots."""
    from sklearn.metrics import roc_curve

    m = np.asarray(member_scores, dtype=np.float64).ravel()
    n = np.asarray(nonmember_scores, dtype=np.float64).ravel()
    f, t, _ = roc_curve(np.r_[np.ones(len(m)), np.zeros(len(n))], np.r_[m, n])
    return f, t


def dcr_scores(candidates: torch.Tensor, samples: torch.Tensor, *, chunk: int = 1024) -> np.ndarray:
    """Minus the L2 distance from each candidate to its closest generated sample (flattened)."""
    c = candidates.reshape(len(candidates), -1).double()
    s = samples.reshape(len(samples), -1).double()
    if c.shape[1] != s.shape[1]:
        raise ValueError(f"candidates have {c.shape[1]} values each, samples {s.shape[1]}")
    best = torch.full((len(c),), math.inf, dtype=torch.float64)
    for start in range(0, len(s), chunk):
        best = torch.minimum(best, torch.cdist(c, s[start:start + chunk]).min(dim=1).values)
    return (-best).numpy()


def probe_batches(candidates: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, int]:
    """``candidates`` (N, ...) as (K, B, ...) with K = ceil(N / B), the last batch padded by
    repeating the first candidates; returns the batches and N (the first N scores are the
    candidates', in order)."""
    n = len(candidates)
    if n == 0:
        raise ValueError("no candidates to probe with")
    k = math.ceil(n / batch_size)
    x = candidates[torch.arange(k * batch_size) % n]   # the padding repeats candidates from the start
    return x.reshape(k, batch_size, *candidates.shape[1:]), n


def discriminator_scores(D: torch.nn.Module, candidates: torch.Tensor, batch_size: int) -> np.ndarray:
    """D's raw output (logit / critic value) on each candidate, higher = judged real.

    Candidates go through a copy of D in training mode, in batches of ``batch_size`` (as D saw
    batches in training: a server-side D with BatchNorm has never seen real data, so only batch
    statistics are meaningful); ``D`` itself is not changed."""
    import copy

    net = copy.deepcopy(D).train()
    batches, n = probe_batches(candidates, batch_size)
    with torch.no_grad():
        out = torch.cat([net(b.to(next(net.parameters()).device)).reshape(-1).cpu() for b in batches])
    return out[:n].double().numpy()


def learned_attack_scores(generated: torch.Tensor, reference: torch.Tensor, candidates: torch.Tensor, *,
                          steps: int = 400, hidden: int = 256, lr: float = 1e-3, seed: int = 0) -> np.ndarray:
    """Black-box learned membership attack on a generator's samples (LOGAN-style).

    An MLP on the flattened images learns to output 1 on ``generated`` samples and 0 on
    ``reference`` images (the attacker's own images of the same classes, which must be disjoint
    from the non-member candidates), the two classes weighted equally; each candidate's score is
    the MLP's logit. Full-batch Adam, ``steps`` steps, seeded; returns numpy scores."""
    if len(generated) == 0 or len(reference) == 0:
        raise ValueError(f"the learned attack needs samples and reference images, got {len(generated)} and "
                         f"{len(reference)}")
    torch.manual_seed(seed)
    dim = generated[0].numel()
    x = torch.cat([generated.reshape(len(generated), -1), reference.reshape(len(reference), -1)]).float()
    y = torch.cat([torch.ones(len(generated)), torch.zeros(len(reference))])
    w = torch.cat([torch.full((len(generated),), 0.5 / len(generated)),
                   torch.full((len(reference),), 0.5 / len(reference))])
    net = torch.nn.Sequential(torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden),
                              torch.nn.ReLU(), torch.nn.Linear(hidden, 1))
    opt = torch.optim.Adam(net.parameters(), lr=lr, weight_decay=1e-4)
    for _ in range(steps):
        opt.zero_grad()
        loss = (w * torch.nn.functional.binary_cross_entropy_with_logits(net(x).squeeze(1), y,
                                                                        reduction="none")).sum()
        loss.backward()
        opt.step()
    with torch.no_grad():
        return net(candidates.reshape(len(candidates), -1).float()).squeeze(1).double().numpy()


def own_class_share(histogram, classes) -> float:
    """Share of samples whose label (``histogram``: counts per class) is one of ``classes``."""
    total = float(sum(histogram))
    if total <= 0:
        raise ValueError("an empty label histogram has no own-class share")
    return float(sum(histogram[c] for c in classes)) / total


__all__ = ["tpr_at_fpr", "bootstrap_auc", "attack_report", "roc_points", "dcr_scores", "probe_batches",
           "discriminator_scores", "learned_attack_scores", "own_class_share", "chance_tpr_pmf", "chance_tpr_mean",
           "chance_tpr"]
