"""Sample-quality metrics.

2-D mixtures (``ring``: 8 Gaussians, ``grid``: 25) use the protocol of the Unrolled-GAN,
VEEGAN and PacGAN tables, on 2,500 samples by default:

* each sample is assigned to its nearest mode mean; it is **high quality** when it lies
  within 3 standard deviations of that mean;
* a mode is **covered** when at least ``min_per_mode`` high-quality samples are assigned
  to it (default 1, as VEEGAN counts "modes captured");
* **reverse KL** KL(p_gen || p_data) between the mode histogram of the high-quality
  samples and the true (uniform) mode weights; modes with no samples contribute 0, and
  with no high-quality sample at all it is +inf.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch


def mode_metrics(samples: torch.Tensor, means: torch.Tensor, std: float, *, min_per_mode: int = 1) -> dict:
    """Modes covered, % high-quality samples and reverse KL of 2-D ``samples`` (N, 2)."""
    x = torch.as_tensor(samples, dtype=torch.float64)
    mu = torch.as_tensor(means, dtype=torch.float64)
    if x.dim() != 2 or x.shape[1] != mu.shape[1]:
        raise ValueError(f"samples of shape {tuple(x.shape)} do not match modes of dimension {mu.shape[1]}")
    dist = torch.cdist(x, mu)                      # (N, M)
    nearest_d, nearest = dist.min(dim=1)
    good = nearest_d <= 3.0 * std
    hist = torch.bincount(nearest[good], minlength=len(mu)).numpy()
    n_good = int(good.sum())
    if n_good:
        p = hist / n_good
        q = 1.0 / len(mu)
        reverse_kl = float(sum(pi * math.log(pi / q) for pi in p if pi > 0))
    else:
        reverse_kl = math.inf
    return {
        "modes_covered": int((hist >= min_per_mode).sum()),
        "num_modes": int(len(mu)),
        "high_quality_pct": 100.0 * n_good / len(x),
        "reverse_kl": reverse_kl,
        "mode_histogram": hist.tolist(),
        "num_samples": int(len(x)),
    }


def density_plot(path: str | Path, panels: dict[str, torch.Tensor], means: torch.Tensor | None = None,
                 *, lim: float = 3.0, bins: int = 120) -> Path:
    """One 2-D histogram (density heat map) per panel, real mode means marked; saved as PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure

    n = len(panels)
    fig = Figure(figsize=(2.6 * n, 2.8))
    FigureCanvasAgg(fig)
    for i, (title, pts) in enumerate(panels.items(), start=1):
        ax = fig.add_subplot(1, n, i)
        pts = torch.as_tensor(pts).double().numpy()
        # log colour scale: a mode that holds a few samples stays visible next to a crowded one
        ax.set_facecolor("black")
        ax.hist2d(pts[:, 0], pts[:, 1], bins=bins, range=[[-lim, lim], [-lim, lim]], norm=LogNorm(), cmin=1,
                  cmap="magma")
        if means is not None:
            m = torch.as_tensor(means).numpy()
            ax.scatter(m[:, 0], m[:, 1], s=12, c="#35c0ff", marker="x", linewidths=0.8)
        ax.set_title(title, fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


__all__ = ["mode_metrics", "density_plot", "np"]
