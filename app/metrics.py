"""Sample-quality metrics (SPEC §6).

**Images**: FID, KID and IS, the statistics computed by torchmetrics on features from a
network chosen by name (``eval-extractor``):

* ``classifier``: the project's own dataset classifier (models/classifier.py), trained and
  cached by ``simulations/train_evaluator.py``; penultimate features for FID/KID, softmax
  for IS, argmax for the label histograms of generated samples;
* ``inception``: the standard Inception-v3 (torch-fidelity's port of the TF weights, through
  its public ``FeatureExtractorInceptionV3``); its weights file must be in torch hub's cache or at
  ``inception-weights`` (no download happens here; a clear error says where to put it).

The feature network runs once per sample set; FID/KID/IS are then computed from those
features (:func:`fid_from_features` etc.), so every score is a pure function of two
feature sets and is tested in closed form. Every reported number carries the extractor
name and the sample count (:func:`describe_scores`).

**2-D mixtures** (``ring``: 8 Gaussians, ``grid``: 25) use the protocol of the Unrolled-GAN,
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
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from models.classifier import Classifier, build_classifier
from strategies.client_eval import tv_distance


# =====================================================================================
# Feature networks: where their weights live
# =====================================================================================
class EvaluatorMissing(FileNotFoundError):
    """A feature network's weights are not where they should be; the message says how to get them."""


def evaluator_dir(configured: str = "") -> Path:
    """Where trained classifiers are cached: ``evaluator-dir`` when set, else
    ``$FEDGAN_EVALUATORS``, else ``~/.cache/fedgan/evaluators``."""
    text = configured or os.environ.get("FEDGAN_EVALUATORS", "")
    return Path(text).expanduser().absolute() if text else Path.home() / ".cache" / "fedgan" / "evaluators"


def dataset_key(dataset: str) -> str:
    """A file-name-safe key: ``cifar10``, ``digits``; ``imagefolder:/x/faces.zip`` -> ``imagefolder-faces``."""
    kind, _, location = dataset.partition(":")
    key = kind.strip().lower()
    if location.strip():
        stem = Path(location.strip().rstrip("/")).name
        stem = stem[:-4] if stem.lower().endswith(".zip") else stem
        key += "-" + stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", key)


def classifier_path(dataset: str, image_size: int, channels: int, directory: str = "") -> Path:
    """The cache file of the classifier for ``dataset`` at ``image_size`` px and ``channels``."""
    return evaluator_dir(directory) / f"classifier-{dataset_key(dataset)}-{image_size}px-{channels}ch.pt"


def save_classifier(path: str | Path, net: Classifier, meta: dict) -> Path:
    """Write weights + architecture + provenance (accuracy, time, device) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"config": net.config(), "state_dict": {k: v.detach().cpu() for k, v in net.state_dict().items()},
                "meta": dict(meta)}, tmp)
    os.replace(tmp, path)
    return path


def load_classifier(dataset: str, image_size: int, channels: int, directory: str = "",
                    device: str = "cpu") -> tuple[Classifier, dict]:
    """The cached classifier (eval mode, frozen) and its meta; EvaluatorMissing names the command."""
    path = classifier_path(dataset, image_size, channels, directory)
    if not path.is_file():
        raise EvaluatorMissing(
            f"no '{dataset}' classifier for {channels}x{image_size}x{image_size} images at {path}. Train and cache "
            f"it with: python simulations/train_evaluator.py --dataset {dataset} --image-size {image_size} "
            f"--channels {channels}" + (f" --evaluator-dir {directory}" if directory else "")
            + " (or set eval-extractor=inception)")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    net = build_classifier(blob["config"])
    net.load_state_dict(blob["state_dict"])
    net.to(device).eval().requires_grad_(False)
    return net, dict(blob.get("meta", {}))


# Datasets whose classifier trains itself when it is missing: scikit-learn ships the digits, so
# every machine has the training split, and the quick recipe takes seconds on one CPU core
# (5 epochs: test accuracy 0.99; simulations/train_evaluator.py's full recipe, 15 epochs: 0.994).
AUTO_TRAIN = {"digits": dict(epochs=5, batch_size=64, lr=0.05, shift=1, width=16)}


def ensure_classifier(dataset: str, image_size: int, channels: int, directory: str = "",
                      say=None) -> Path | None:
    """The cached classifier's path; a missing one of a dataset in :data:`AUTO_TRAIN` is trained
    first (quick recipe, seconds) and cached. None when it is missing and cannot train itself.

    Concurrent callers (the server and simulated clients share one cache) serialize on a lock
    file, so the classifier is trained once and a reader never sees a partial file."""
    path = classifier_path(dataset, image_size, channels, directory)
    if path.is_file():
        return path
    recipe = AUTO_TRAIN.get(dataset)
    if recipe is None:
        return None
    import fcntl
    import time

    from app.data import load_dataset
    from models.classifier import accuracy, predict, train_epoch

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.is_file():   # another process trained it while this one waited
            return path
        if say is not None:
            say(f"no '{dataset}' classifier cached: training one ({recipe['epochs']} epochs, seconds) into {path}")
        start = time.monotonic()
        train = load_dataset(dataset, image_size=image_size, channels=channels, split="train")
        test = load_dataset(dataset, image_size=image_size, channels=channels, split="test")
        gen = torch.Generator().manual_seed(0)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            net = Classifier(train.x.shape[1], train.x.shape[-1], train.num_classes, width=recipe["width"])
        opt = torch.optim.SGD(net.parameters(), lr=recipe["lr"], momentum=0.9, nesterov=True, weight_decay=5e-4)
        steps = recipe["epochs"] * (len(train) // recipe["batch_size"])
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe["lr"], total_steps=steps, pct_start=0.2,
                                                    anneal_strategy="linear", div_factor=10, final_div_factor=100)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # a network this small is no faster on more threads, and they contend
        try:
            for _ in range(recipe["epochs"]):
                train_epoch(net, opt, sched, train.x, train.y, batch_size=recipe["batch_size"], gen=gen, flip=False,
                            shift=recipe["shift"], label_smoothing=0.2)
            acc = accuracy(predict(net, test.x), test.y)
        finally:
            torch.set_num_threads(threads)
        seconds = time.monotonic() - start
        save_classifier(path, net.to(memory_format=torch.contiguous_format),
                        {"dataset": dataset, "test_accuracy": acc, "num_train": len(train), "num_test": len(test),
                         "epochs": recipe["epochs"], "train_seconds": round(seconds, 1), "device": "cpu",
                         "recipe": "auto (app.metrics.ensure_classifier)", "torch": str(torch.__version__),
                         "trained_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        if say is not None:
            say(f"'{dataset}' classifier trained in {seconds:.1f} s: test accuracy {acc:.3f}")
    return path


# =====================================================================================
# Feature networks by name
# =====================================================================================
EXTRACTORS = ("classifier", "inception")
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE


def inception_weights_path(configured: str = "") -> Path:
    """``inception-weights`` when set, else torch hub's cache (``$TORCH_HOME/hub/checkpoints/``),
    where torchmetrics / torch-fidelity would have downloaded the file."""
    if configured:
        return Path(configured).expanduser().absolute()
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE


class FeatureNet(nn.Module):
    """A named embedding for FID/KID plus logits for IS: ``forward(x) -> (features, logits)``.

    ``x`` are images in [-1, 1] as the generators make them (any side, 1 or 3 channels).
    """

    name: str
    num_features: int


class ClassifierFeatures(FeatureNet):
    """The project's own dataset classifier: penultimate layer + class logits."""

    name = "classifier"

    def __init__(self, net: Classifier, meta: dict | None = None) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.meta = dict(meta or {})
        self.num_features = net.num_features
        self.num_classes = net.num_classes

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.net.features(self.net.prepare(x.float()))
        return f, self.net.head(f)


class InceptionFeatures(FeatureNet):
    """Inception-v3 as FID's reference implementation uses it, through torch-fidelity's public
    feature extractor (``torch_fidelity.FeatureExtractorInceptionV3``, TF-1.x-compatible
    bilinear resize to 299): 2048-d pool features and the 1008 logits; images become 8-bit RGB."""

    name = "inception"

    def __init__(self, weights: str | Path) -> None:
        super().__init__()
        from torch_fidelity import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                               feature_extractor_weights_path=str(weights))
        self.num_features = 2048
        self.num_classes = 1008

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        u8 = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        f, logits = self.net(u8)  # in features_list order
        return f.reshape(len(x), -1), logits.reshape(len(x), -1)


def load_feature_net(extractor: str, *, dataset: str = "", image_size: int = 0, channels: int = 0,
                     evaluator_dir: str = "", inception_weights: str = "", device: str = "cpu") -> FeatureNet:
    """The feature network named ``extractor`` (``classifier`` or ``inception``), ready on ``device``.

    Missing weights raise :class:`EvaluatorMissing` saying which file to put where.
    """
    if extractor == "classifier":
        net, meta = load_classifier(dataset, image_size, channels, evaluator_dir, device)
        return ClassifierFeatures(net, meta).to(device)
    if extractor == "inception":
        path = inception_weights_path(inception_weights)
        if not path.is_file():
            raise EvaluatorMissing(
                f"Inception-v3 weights not found at {path}. Download {INCEPTION_URL} on a machine with internet "
                f"and put the file there (torch hub's cache, $TORCH_HOME/hub/checkpoints/), or set run config "
                f"'inception-weights' to its path (or use eval-extractor=classifier)")
        return InceptionFeatures(path).to(device)
    raise ValueError(f"unknown feature extractor {extractor!r}; choose one of {', '.join(EXTRACTORS)}")


@torch.no_grad()
def embed(net: FeatureNet, x: torch.Tensor, *, batch_size: int = 250,
          device: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (float64) and logits (float32) of images ``x``, batch by batch, on the CPU."""
    device = device or next(net.parameters()).device
    feats, logits = [], []
    for start in range(0, len(x), batch_size):
        f, lg = net(x[start:start + batch_size].to(device))
        feats.append(f.double().cpu())
        logits.append(lg.float().cpu())
    if not feats:
        return torch.empty(0, net.num_features, dtype=torch.float64), torch.empty(0, 0)
    return torch.cat(feats), torch.cat(logits)


# =====================================================================================
# FID, KID, IS on precomputed features (torchmetrics does the statistics)
# =====================================================================================
class _Given(nn.Module):
    """Hands torchmetrics features that were already computed (so one pass of the feature
    net serves FID, KID and the label histogram)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def fid_from_features(real: torch.Tensor, fake: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two feature sets (N, d) (torchmetrics, float64):
    ``|mu_r - mu_f|^2 + Tr(S_r + S_f - 2 (S_r S_f)^(1/2))``."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    if len(real) < 2 or len(fake) < 2:
        raise ValueError(f"FID needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake")
    metric = FrechetInceptionDistance(feature=_Given(real.shape[1]))
    metric.set_dtype(torch.float64)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    return max(float(metric.compute()), 0.0)


def kid_from_features(real: torch.Tensor, fake: torch.Tensor, *, subset_size: int = 1000, subsets: int = 100,
                      seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance: mean and std of the unbiased MMD^2 with the cubic polynomial
    kernel over ``subsets`` random subsets (size capped by the smaller set); seeded."""
    from torchmetrics.image.kid import KernelInceptionDistance

    real, fake = torch.as_tensor(real).double(), torch.as_tensor(fake).double()
    size = min(subset_size, len(real), len(fake))
    if size < 2:
        raise ValueError(f"KID needs at least 2 samples per set, got {len(real)} real and {len(fake)} fake")
    with warnings.catch_warnings():  # "will save all extracted features": that is the point here
        warnings.simplefilter("ignore", UserWarning)
        metric = KernelInceptionDistance(feature=_Given(real.shape[1]), subsets=subsets, subset_size=size)
    metric.update(real, real=True)
    metric.update(fake, real=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)


def inception_score_from_logits(logits: torch.Tensor, *, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))), mean and std over ``splits`` random chunks (torchmetrics; seeded)."""
    from torchmetrics.image.inception import InceptionScore

    logits = torch.as_tensor(logits).double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=_Given(logits.shape[1]), splits=max(1, min(splits, len(logits))))
    metric.update(logits)
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # one split: std over one value
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), (0.0 if metric.splits == 1 else float(std))


def label_histogram(logits: torch.Tensor, num_classes: int) -> list[int]:
    """How many samples the classifier puts in each class (argmax of the logits)."""
    return torch.bincount(torch.as_tensor(logits).argmax(dim=1), minlength=num_classes)[:num_classes].tolist()


class ImageEvaluator:
    """FID / KID / IS of generated images against a fixed real set, plus the label histogram
    of the fakes and their total-variation distance to the real labels (client fidelity).

    ``labeller`` classifies the fakes (the dataset classifier); with the classifier as
    extractor it is the same network.
    """

    def __init__(self, net: FeatureNet, labeller: ClassifierFeatures | None = None, *, kid_subset: int = 1000,
                 tv_name: str = "tv_real") -> None:
        self.net = net
        self.tv_name = tv_name
        self.labeller = labeller if labeller is not None else (net if isinstance(net, ClassifierFeatures) else None)
        self.kid_subset = kid_subset
        self.real_features: torch.Tensor | None = None
        self.real_histogram: list[int] | None = None

    def set_real(self, images: torch.Tensor, labels: torch.Tensor | None = None, num_classes: int = 0) -> None:
        """The reference set: its features are computed once; its label histogram (true labels) is kept
        for the TV distance."""
        self.real_features, _ = embed(self.net, images)
        if labels is not None and num_classes:
            self.real_histogram = torch.bincount(torch.as_tensor(labels), minlength=num_classes).tolist()

    def score(self, fakes: torch.Tensor) -> dict:
        if self.real_features is None:
            raise RuntimeError("ImageEvaluator.set_real must be called before score")
        feats, logits = embed(self.net, fakes)
        kid, kid_std = kid_from_features(self.real_features, feats, subset_size=self.kid_subset)
        is_mean, is_std = inception_score_from_logits(logits)
        out = {"fid": fid_from_features(self.real_features, feats), "kid": kid, "kid_std": kid_std,
               "is": is_mean, "is_std": is_std, "extractor": self.net.name, "num_samples": int(len(fakes)),
               "num_real": int(len(self.real_features))}
        if self.labeller is not None:
            cls_logits = logits if self.labeller is self.net else embed(self.labeller, fakes)[1]
            hist = label_histogram(cls_logits, self.labeller.num_classes)
            out["label_histogram"] = hist
            if self.real_histogram is not None:
                out[self.tv_name] = tv_distance(hist, self.real_histogram)
        return out


def describe_scores(scores: dict) -> str:
    """'FID 12.34, KID 0.0123 (classifier, 2,500 samples)': numbers always with extractor and count."""
    if "fid" not in scores:
        return ""
    return (f"FID {scores['fid']:.2f}, KID {scores['kid']:.3g}, IS {scores['is']:.2f} "
            f"({scores['extractor']} features, {scores['num_samples']:,} samples vs {scores['num_real']:,} real)")


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


__all__ = ["mode_metrics", "density_plot", "EvaluatorMissing", "evaluator_dir", "classifier_path",
           "save_classifier", "load_classifier", "ensure_classifier", "AUTO_TRAIN", "EXTRACTORS", "INCEPTION_FILE",
           "inception_weights_path",
           "FeatureNet", "ClassifierFeatures", "InceptionFeatures", "load_feature_net", "embed",
           "fid_from_features", "kid_from_features", "inception_score_from_logits", "label_histogram",
           "tv_distance", "ImageEvaluator", "describe_scores"]
