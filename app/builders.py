"""Networks and optimizers for a run, built the same way on the server and the clients."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from app.config import Config
from app.metrics import ClassifierFeatures, EvaluatorMissing, FeatureNet, ImageEvaluator, load_classifier, load_feature_net
from models.dp import DPConfig
from models.factory import build_discriminator, build_generator
from models.losses import make_optimizer

# Native geometry of each dataset: (channels, side) for images, None for 2-D points.
_DEFAULT_GEOMETRY = {"digits": (1, 16), "mnist": (1, 32), "cifar10": (3, 32), "imagefolder": (3, 32)}


@dataclass(frozen=True)
class Geometry:
    """What one sample looks like: an image (channels, side, side) or a 2-D point."""

    kind: str           # "dcgan" or "mlp"
    channels: int
    image_size: int

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return (self.channels, self.image_size, self.image_size) if self.kind == "dcgan" else (2,)


def geometry(cfg: Config) -> Geometry:
    """Sample geometry and network family from the config alone (no data is loaded)."""
    name = cfg.dataset.split(":", 1)[0]
    if name in ("ring", "grid"):
        return Geometry("mlp", 0, 0)
    channels, side = _DEFAULT_GEOMETRY[name]
    return Geometry("dcgan", cfg.channels or channels, cfg.image_size or side)


def make_generator(cfg: Config) -> nn.Module:
    g = geometry(cfg)
    return build_generator(g.kind, latent_dim=cfg.latent_dim, channels=g.channels, image_size=g.image_size,
                           features=cfg.gen_features)


def make_discriminator(cfg: Config) -> nn.Module:
    """The run's D; with ``dp`` on, a DCGAN D gets GroupNorm ("layer") instead of BatchNorm
    (per-example gradients need a per-sample network; models/dp.py refuses BatchNorm)."""
    g = geometry(cfg)
    return build_discriminator(g.kind, channels=g.channels, image_size=g.image_size,
                               features=cfg.disc_features, loss=cfg.loss, norm="layer" if cfg.dp else None)


def dp_settings(cfg: Config) -> DPConfig | None:
    """What a client needs for DP-SGD (None when ``dp`` is off)."""
    if not cfg.dp:
        return None
    return DPConfig(noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
                    delta=cfg.dp_delta, target_epsilon=cfg.dp_target_epsilon, planned_steps=cfg.dp_planned_steps(),
                    clip_public=cfg.dp_clip_fakes)


def optimizer_for(cfg: Config, module: nn.Module, lr: float) -> torch.optim.Optimizer:
    return make_optimizer(cfg.loss, module.parameters(), lr, (cfg.adam_beta1, cfg.adam_beta2))


def feature_net(cfg: Config, device: str = "cpu") -> FeatureNet:
    """The run's feature network (``eval-extractor``) for its dataset and geometry."""
    g = geometry(cfg)
    return load_feature_net(cfg.eval_extractor, dataset=cfg.dataset, image_size=g.image_size, channels=g.channels,
                            evaluator_dir=cfg.evaluator_dir, inception_weights=cfg.inception_weights, device=device)


def image_evaluator(cfg: Config, device: str = "cpu", *, tv_name: str,
                    labels_required: bool = True) -> ImageEvaluator:
    """The run's feature network plus the dataset classifier that labels fakes (the feature net
    itself when it is the classifier). With ``labels_required=False`` a missing classifier
    only drops the label histograms (returns an evaluator without a labeller)."""
    net = feature_net(cfg, device)
    labeller = net if isinstance(net, ClassifierFeatures) else None
    if labeller is None:
        g = geometry(cfg)
        try:
            labeller = ClassifierFeatures(*load_classifier(cfg.dataset, g.image_size, g.channels, cfg.evaluator_dir,
                                                           device))
        except EvaluatorMissing:
            if labels_required:
                raise
    return ImageEvaluator(net, labeller, tv_name=tv_name)
