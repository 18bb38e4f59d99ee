"""Image classifiers the project trains itself to score generated samples (SPEC §6).

A small all-convolutional network in the spirit of the fast CIFAR-10 trainers
(conv -> [conv, pool, BN, GELU, conv, BN, GELU] x 3 -> global max pool -> linear):

* :meth:`Classifier.features` is the penultimate layer (``num_features`` values per
  image): the embedding FID and KID are computed on;
* :meth:`Classifier.forward` returns class logits: the softmax IS is computed on, and
  the argmax that labels generated samples for the label histograms.

Pure PyTorch: no Flower, no data loading, no file paths (those live in app/).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F


def _conv_group(c_in: int, c_out: int, pool: bool) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False)]
    if pool:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.BatchNorm2d(c_out), nn.GELU(),
               nn.Conv2d(c_out, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.GELU()]
    return nn.Sequential(*layers)


class Classifier(nn.Module):
    """Classifier for ``channels`` x ``side`` x ``side`` images in [-1, 1].

    ``width`` is the channel count of the first layer; each of the three groups
    doubles it. Groups pool while the map is larger than 4x4, so 8-, 16- and
    32-pixel inputs all work.
    """

    def __init__(self, channels: int, side: int, num_classes: int, width: int = 32) -> None:
        super().__init__()
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if side < 8:
            raise ValueError(f"side must be at least 8 pixels, got {side}")
        self.channels, self.side, self.num_classes, self.width = channels, side, num_classes, width
        widths = [width, 2 * width, 4 * width, 8 * width]
        stem = [nn.Conv2d(channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.GELU()]
        groups, s = [], side
        for c_in, c_out in zip(widths[:-1], widths[1:]):
            pool = s > 4
            groups.append(_conv_group(c_in, c_out, pool))
            s = s // 2 if pool else s
        self.body = nn.Sequential(*stem, *groups)
        self.num_features = widths[-1]
        self.head = nn.Linear(self.num_features, num_classes, bias=False)

    def config(self) -> dict:
        """What :func:`build_classifier` needs to rebuild this network."""
        return {"channels": self.channels, "side": self.side, "num_classes": self.num_classes, "width": self.width}

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate embedding (N, num_features): global max pool of the last group."""
        return torch.amax(self.body(x), dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """Bring images of any side / 1 or 3 channels to this network's input geometry."""
        if x.dim() != 4:
            raise ValueError(f"expected images (N, C, H, W), got shape {tuple(x.shape)}")
        if x.shape[1] != self.channels:
            if x.shape[1] == 1 and self.channels == 3:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and self.channels == 1:
                x = x.mean(dim=1, keepdim=True)
            else:
                raise ValueError(f"cannot feed {x.shape[1]}-channel images to a {self.channels}-channel classifier")
        if x.shape[-1] != self.side or x.shape[-2] != self.side:
            x = F.interpolate(x, size=(self.side, self.side), mode="bilinear", align_corners=False, antialias=True)
        return x


def build_classifier(config: dict) -> Classifier:
    return Classifier(int(config["channels"]), int(config["side"]), int(config["num_classes"]),
                      int(config.get("width", 32)))


# ---------------------------------------------------------------------------------------
# Training (framework-free; the script in simulations/ drives it)
# ---------------------------------------------------------------------------------------
def augment(x: torch.Tensor, gen: torch.Generator, *, flip: bool, shift: int) -> torch.Tensor:
    """Random horizontal flips (when ``flip``) and translations by up to ``shift`` pixels
    (reflection padding), the usual CIFAR-10 augmentation."""
    n = x.shape[0]
    if flip:
        mask = torch.rand(n, generator=gen) < 0.5
        x = torch.where(mask[:, None, None, None], x.flip(-1), x)
    if shift:
        side = x.shape[-1]
        padded = F.pad(x, (shift,) * 4, mode="reflect")
        dx, dy = torch.randint(0, 2 * shift + 1, (2,), generator=gen).tolist()
        # one offset per batch keeps this a cheap slice; batches are small enough to vary it
        x = padded[:, :, dy:dy + side, dx:dx + side]
    return x


def train_epoch(net: Classifier, opt: torch.optim.Optimizer, sched, x: torch.Tensor, y: torch.Tensor, *,
                batch_size: int, gen: torch.Generator, flip: bool, shift: int, label_smoothing: float,
                autocast_bf16: bool = False, device: str = "cpu") -> float:
    """One pass over (x, y) in shuffled mini-batches; returns the mean training loss."""
    net.train()
    order = torch.randperm(len(x), generator=gen)
    total, seen = 0.0, 0
    for start in range(0, len(x) - batch_size + 1, batch_size):
        idx = order[start:start + batch_size]
        xb = augment(x[idx], gen, flip=flip, shift=shift).to(device, memory_format=torch.channels_last)
        yb = y[idx].to(device)
        with torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=autocast_bf16):
            loss = F.cross_entropy(net(xb), yb, label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        total += float(loss.detach()) * len(idx)
        seen += len(idx)
    return total / max(seen, 1)


@torch.no_grad()
def predict(net: Classifier, x: torch.Tensor, *, batch_size: int = 500, device: str = "cpu",
            flip_tta: bool = False) -> torch.Tensor:
    """Logits for ``x`` (eval mode); with ``flip_tta`` the mean over the image and its mirror."""
    net.eval()
    out = []
    for start in range(0, len(x), batch_size):
        xb = x[start:start + batch_size].to(device, memory_format=torch.channels_last)
        logits = net(xb).float()
        if flip_tta:
            logits = 0.5 * (logits + net(xb.flip(-1)).float())
        out.append(logits.cpu())
    return torch.cat(out) if out else torch.empty(0, net.num_classes)


def accuracy(logits: torch.Tensor, y: torch.Tensor) -> float:
    return float((logits.argmax(1) == y).float().mean()) if len(y) else float("nan")


__all__ = ["Classifier", "build_classifier", "augment", "train_epoch", "predict", "accuracy"]
