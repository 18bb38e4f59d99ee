"""Datasets, federated partitions and the server/client data split for fedgan.

Everything here returns :class:`ArrayDataset` objects: plain tensors held in
memory, images scaled to ``[-1, 1]`` (the range of a ``tanh`` generator) and
2-D toy points left as they are.

Sources
-------
``digits``
    scikit-learn's bundled 8x8 digits (1,797 images), upsampled to 16x16 by
    default.  Needs no download, so it is the default for tests and quick runs.
``ring`` / ``grid``
    The classic mode-collapse toys: 8 Gaussians on a circle of radius 2
    (std 0.02) and 25 Gaussians on the grid {-4,-2,0,2,4}^2 (std 0.05).
``mnist``
    torchvision's MNIST (downloaded when possible), 32x32 by default.
``cifar10``
    From a folder-per-class zip or tree, or from torchvision's
    ``cifar-10-batches-py`` layout.
``imagefolder:<path>``
    Any folder-per-class tree of images, or a zip of one.

Decoded datasets are kept in a per-process cache, because in a Flower
simulation every client message rebuilds its data.  The cached tensors are
shared: treat them as read-only.  Images decoded from files are also cached once
per machine as uint8 and memory-mapped by every process (see "The machine's
cache of decoded images" below); such datasets hold no float32 copy.
"""

from __future__ import annotations

import io
import math
import os
import zipfile
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "UNREADABLE", "MAX_UNREADABLE_SHARE",
    "ArrayDataset",
    "CIFAR10_CLASSES",
    "DATASETS",
    "DataError",
    "DataSpec",
    "GRID_MEANS",
    "GRID_STD",
    "PARTITIONS",
    "RING_MEANS",
    "RING_STD",
    "SERVER_DATA",
    "client_dataset",
    "pixels_to_unit",
    "SampleView",
    "load_dataset",
    "mode_means",
    "partition_indices",
    "partition_summary",
    "server_dataset",
    "split_server_clients",
    "test_dataset",
]

DATASETS = ("digits", "ring", "grid", "mnist", "cifar10", "imagefolder")
PARTITIONS = ("iid", "fraction", "dirichlet", "classes", "full")
SERVER_DATA = ("heldout", "full", "none")

CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".webp",
    ".tif",
    ".tiff",
    ".ppm",
    ".pgm",
)
_SPLIT_DIRS = ("train", "test")
_CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "fedgan")


class DataError(ValueError):
    """A dataset cannot be found, read or split as requested."""


# ---------------------------------------------------------------------------
# Container
# ---------------------------------------------------------------------------


def batch_sampler(x) -> "Callable[[int, torch.Generator], torch.Tensor]":
    """``sample(b, gen)``: ``b`` rows of ``x`` (a tensor or an ArrayDataset's ``view``) drawn
    uniformly with replacement from ``gen`` -- how every training step here draws its real batch."""
    return lambda b, gen: x[torch.randint(len(x), (b,), generator=gen)]


def pixels_to_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W, C)`` pixels to float32 ``(N, C, H, W)`` in ``[-1, 1]``.

    The same float operations the datasets always used (``p / 255``, then ``* 2 - 1``), so a
    dataset held as uint8 yields bit for bit the tensors it yielded when it was stored as float32.
    """
    t = pixels.permute(0, 3, 1, 2).to(torch.float32) / 255.0
    return (t.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()


class ArrayDataset:
    """Samples and labels.

    ``x`` is float32: images ``(N, C, H, W)`` in ``[-1, 1]`` or 2-D points ``(N, 2)``.  ``y``
    is int64 ``(N,)``: the class, or for the toy mixtures the index of the Gaussian a point was
    drawn from.  ``skipped`` counts image files that could not be decoded while loading.

    Images decoded from files (cifar10, mnist, imagefolder) are held as uint8 ``pixels``
    ``(M, H, W, C)`` -- usually a memory map of the machine's decoded-image cache, shared by
    every process that loads the same data -- plus the ``rows`` of them this dataset holds
    (None: all). Nothing then holds a float32 copy of the dataset: :attr:`view` converts just
    the rows a step samples, and :attr:`x` converts this dataset's rows when asked (evaluation,
    a teacher's whole set). Give either ``x`` or ``pixels``.
    """

    def __init__(self, x: torch.Tensor | None = None, y: torch.Tensor | None = None,
                 num_classes: int = 0, name: str = "", skipped: int = 0, *,
                 pixels: torch.Tensor | None = None, rows: torch.Tensor | None = None) -> None:
        if (x is None) == (pixels is None):
            raise ValueError("ArrayDataset takes either x (float samples) or pixels (uint8 images)")
        if y is None:
            raise ValueError("ArrayDataset needs labels y")
        if pixels is not None and (pixels.dtype != torch.uint8 or pixels.dim() != 4):
            raise ValueError(f"pixels must be uint8 (N, H, W, C), got {pixels.dtype} {tuple(pixels.shape)}")
        self._x, self._pixels, self._rows = x, pixels, rows
        self.y, self.num_classes, self.name, self.skipped = y, int(num_classes), name, int(skipped)
        n = (x.shape[0] if x is not None else pixels.shape[0] if rows is None else rows.shape[0])
        if n != y.shape[0]:
            raise ValueError(f"x has {n} rows but y has {y.shape[0]}")

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, n={len(self)}, "
            f"sample_shape={self.sample_shape}, num_classes={self.num_classes}, "
            f"skipped={self.skipped}, storage={'uint8' if self._pixels is not None else 'float32'})"
        )

    @property
    def x(self) -> torch.Tensor:
        """All samples as float32 (for uint8 storage: a fresh conversion of this dataset's rows)."""
        if self._x is not None:
            return self._x
        return pixels_to_unit(self._pixels if self._rows is None else self._pixels[self._rows])

    @property
    def view(self) -> "torch.Tensor | SampleView":
        """What a training step samples from: ``len(view)``, ``view.shape`` and ``view[idx]``
        (float32 rows). The float tensor itself for float storage; for uint8 storage a
        :class:`SampleView` that converts only the rows asked for."""
        return self._x if self._x is not None else SampleView(self)

    @property
    def pixels(self) -> torch.Tensor | None:
        """The uint8 storage (all of it, not only this dataset's rows), or None."""
        return self._pixels

    @property
    def is_image(self) -> bool:
        return self._pixels is not None or self._x.dim() == 4

    @property
    def sample_shape(self) -> tuple[int, ...]:
        if self._pixels is not None:
            _, h, w, c = self._pixels.shape
            return int(c), int(h), int(w)
        return tuple(int(s) for s in self._x.shape[1:])

    def rows_of(self, idx: torch.Tensor) -> torch.Tensor:
        """Samples ``idx`` (int64 indices into this dataset) as float32."""
        if self._x is not None:
            return self._x[idx]
        return pixels_to_unit(self._pixels[idx if self._rows is None else self._rows[idx]])

    def subset(self, idx) -> "ArrayDataset":
        """Rows ``idx`` (indices or a boolean mask) as a new dataset (uint8 storage is shared,
        not copied)."""
        index = torch.as_tensor(np.asarray(idx))
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        index = index.to(torch.int64).reshape(-1)
        if self._x is not None:
            return ArrayDataset(self._x[index], self.y[index], self.num_classes, self.name, self.skipped)
        rows = index if self._rows is None else self._rows[index]
        return ArrayDataset(y=self.y[index], num_classes=self.num_classes, name=self.name,
                            skipped=self.skipped, pixels=self._pixels, rows=rows)

    def label_histogram(self) -> np.ndarray:
        return np.bincount(
            self.y.numpy().astype(np.int64), minlength=self.num_classes
        )


class SampleView:
    """Float32 rows of a uint8-stored :class:`ArrayDataset`, converted on indexing; quacks like
    the float tensor for what training steps do with it (``len``, ``shape``, ``dtype``,
    ``view[idx]``)."""

    dtype = torch.float32

    def __init__(self, data: ArrayDataset) -> None:
        self._data = data
        self.shape = torch.Size((len(data), *data.sample_shape))

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, idx) -> torch.Tensor:
        if isinstance(idx, slice):
            idx = range(len(self))[idx]
        index = torch.as_tensor(idx)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        if index.dim() == 0:
            return self._data.rows_of(index.reshape(1).to(torch.int64))[0]
        return self._data.rows_of(index.to(torch.int64))


# ---------------------------------------------------------------------------
# Toy 2-D mixtures
# ---------------------------------------------------------------------------

RING_STD = 0.02
GRID_STD = 0.05
_RING_RADIUS = 2.0
_RING_MODES = 8
RING_MEANS = torch.tensor(
    [
        [
            _RING_RADIUS * math.cos(2 * math.pi * k / _RING_MODES),
            _RING_RADIUS * math.sin(2 * math.pi * k / _RING_MODES),
        ]
        for k in range(_RING_MODES)
    ],
    dtype=torch.float32,
)
GRID_MEANS = torch.tensor(
    [[float(a), float(b)] for a in (-4, -2, 0, 2, 4) for b in (-4, -2, 0, 2, 4)],
    dtype=torch.float32,
)
# points per mode: (train, test)
_TOY_PER_MODE = {"ring": (1000, 250), "grid": (1000, 100)}


def mode_means(name: str) -> tuple[torch.Tensor, float]:
    """Means ``(M, 2)`` and the common std of the ``ring`` or ``grid`` mixture."""
    key = str(name).strip().lower()
    if key == "ring":
        return RING_MEANS.clone(), RING_STD
    if key == "grid":
        return GRID_MEANS.clone(), GRID_STD
    raise DataError(f"mode_means: {name!r} is not a toy mixture; use 'ring' or 'grid'")


def _toy(name: str, split: str, seed: int) -> ArrayDataset:
    means, std = mode_means(name)
    per_mode = _TOY_PER_MODE[name][0 if split == "train" else 1]
    num_modes = means.shape[0]
    rng = np.random.default_rng([seed & 0xFFFF_FFFF, 0 if split == "train" else 1])
    labels = rng.permutation(np.repeat(np.arange(num_modes), per_mode))
    noise = rng.standard_normal((labels.size, 2)).astype(np.float32) * std
    points = means.numpy()[labels] + noise
    return ArrayDataset(
        x=torch.from_numpy(points.astype(np.float32)),
        y=torch.from_numpy(labels.astype(np.int64)),
        num_classes=num_modes,
        name=name,
    )


# ---------------------------------------------------------------------------
# Image helpers
# ---------------------------------------------------------------------------


def _to_unit_range(x01: torch.Tensor) -> torch.Tensor:
    """Map ``[0, 1]`` to ``[-1, 1]`` (float32)."""
    return (x01.clamp(0.0, 1.0) * 2.0 - 1.0).to(torch.float32).contiguous()


def _prepare_array_images(
    x01: torch.Tensor, image_size: int, channels: int
) -> torch.Tensor:
    """Channel-convert and resize ``(N, C, H, W)`` images in ``[0, 1]``."""
    if channels == 1 and x01.shape[1] == 3:
        weights = torch.tensor([0.299, 0.587, 0.114], dtype=x01.dtype).view(1, 3, 1, 1)
        x01 = (x01 * weights).sum(dim=1, keepdim=True)
    elif channels == 3 and x01.shape[1] == 1:
        x01 = x01.expand(-1, 3, -1, -1)
    if tuple(x01.shape[-2:]) != (image_size, image_size):
        chunks = [
            F.interpolate(
                chunk,
                size=(image_size, image_size),
                mode="bilinear",
                align_corners=False,
                antialias=True,
            )
            for chunk in torch.split(x01, 4096)
        ]
        x01 = torch.cat(chunks) if chunks else x01.new_empty(
            (0, x01.shape[1], image_size, image_size)
        )
    return _to_unit_range(x01)


def _uint8_nhwc_to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, H, W, C)`` to float ``(N, C, H, W)`` in [0, 1]."""
    t = torch.from_numpy(np.asarray(images, dtype=np.float32))   # a copy: images may be a read-only memmap
    if t.dim() == 3:
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).contiguous() / 255.0


def _limit_rows(labels: np.ndarray, limit_per_class: int) -> np.ndarray:
    """Indices of the first ``limit_per_class`` items of each class (in order)."""
    keep = np.zeros(labels.shape[0], dtype=bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:limit_per_class]] = True
    return np.flatnonzero(keep)


# ---------------------------------------------------------------------------
# Folder-per-class trees and zips
# ---------------------------------------------------------------------------


def _is_image_name(parts: Sequence[str]) -> bool:
    if any(p.startswith(".") or p == "__MACOSX" for p in parts):
        return False
    return parts[-1].lower().endswith(IMAGE_EXTENSIONS)


def _list_tree(root: str) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = os.path.relpath(dirpath, root)
        prefix = () if rel == "." else tuple(rel.split(os.sep))
        for name in sorted(filenames):
            parts = prefix + (name,)
            if _is_image_name(parts):
                found.append(parts)
    return found


def _list_zip(archive: zipfile.ZipFile) -> list[tuple[str, ...]]:
    found = []
    for member in archive.namelist():
        if member.endswith("/"):
            continue
        parts = tuple(p for p in member.split("/") if p)
        if parts and _is_image_name(parts):
            found.append(parts)
    return sorted(found)


@dataclass(frozen=True)
class _Layout:
    """Image files of one split grouped by class (class index = position)."""

    classes: tuple[str, ...]
    # (class index, path parts relative to the source root)
    files: tuple[tuple[int, tuple[str, ...]], ...]


def _resolve_layout(
    paths: list[tuple[str, ...]], split: str, where: str
) -> _Layout:
    """Work out classes and the files of ``split`` from a file listing.

    A single wrapping top folder is skipped.  When every file sits under
    ``train/`` or ``test/`` those subfolders are the splits; otherwise the
    whole tree is the training split and ``split="test"`` is an error.
    """
    if not paths:
        raise DataError(f"no image files found under {where!r}")
    prefix_len = 0
    while True:
        rest = [p[prefix_len:] for p in paths]
        if all(len(p) >= 3 for p in rest):
            firsts = {p[0] for p in rest}
            if len(firsts) == 1 and not firsts <= set(_SPLIT_DIRS):
                prefix_len += 1
                continue
        break
    rest = [p[prefix_len:] for p in paths]

    has_splits = all(len(p) >= 3 and p[0] in _SPLIT_DIRS for p in rest)
    if has_splits:
        classes = sorted({p[1] for p in rest})
        chosen = [(p, r[1]) for p, r in zip(paths, rest) if r[0] == split]
        if not chosen:
            raise DataError(f"{where!r} has no {split!r} subfolder with images")
    else:
        if split != "train":
            raise DataError(
                f"{where!r} has no train/ and test/ subfolders, so it only "
                f"provides split='train' (asked for split={split!r})"
            )
        usable = [(p, r) for p, r in zip(paths, rest) if len(r) >= 2]
        if not usable:
            raise DataError(
                f"images under {where!r} must sit in one folder per class"
            )
        classes = sorted({r[0] for _, r in usable})
        chosen = [(p, r[0]) for p, r in usable]
    index = {c: i for i, c in enumerate(classes)}
    return _Layout(
        classes=tuple(classes),
        files=tuple((index[c], p) for p, c in chosen),
    )


# Image files that could not be decoded, per (path, split): (skipped, total, first names).
# The app reports them at load and in summary.md; more than MAX_UNREADABLE_SHARE fails the load.
UNREADABLE: dict[tuple[str, str], tuple[int, int, list[str]]] = {}
MAX_UNREADABLE_SHARE = 0.10


def _decode_files(
    layout: _Layout,
    read_bytes,
    image_size: int,
    channels: int,
    limit_per_class: int,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Decode the files of ``layout``; returns uint8 NHWC images, labels and the names of the
    files that could not be decoded."""
    from PIL import Image

    files = list(layout.files)
    if limit_per_class > 0:
        taken: dict[int, int] = {}
        kept = []
        for label, parts in files:
            if taken.get(label, 0) < limit_per_class:
                taken[label] = taken.get(label, 0) + 1
                kept.append((label, parts))
        files = kept
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), image_size, image_size, channels), dtype=np.uint8)
    labels = np.empty(len(files), dtype=np.int64)
    n = 0
    skipped: list[str] = []
    for label, parts in files:
        try:
            with Image.open(io.BytesIO(read_bytes(parts))) as im:
                im = im.convert(mode)
                if im.size != (image_size, image_size):
                    im = im.resize((image_size, image_size), Image.BILINEAR)
                arr = np.asarray(im, dtype=np.uint8)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            skipped.append("/".join(parts))
            continue
        out[n] = arr.reshape(image_size, image_size, channels)
        labels[n] = label
        n += 1
    return out[:n], labels[:n], skipped


def _load_image_source(
    path: str,
    split: str,
    image_size: int,
    channels: int,
    limit_per_class: int,
    name: str,
    expect_classes: Sequence[str] | None = None,
) -> ArrayDataset:
    """Read a folder-per-class directory or zip into an :class:`ArrayDataset`."""
    if not os.path.exists(path):
        raise DataError(f"{name}: path {path!r} does not exist")
    if os.path.isdir(path):
        paths = _list_tree(path)
        layout = _resolve_layout(paths, split, path)

        def read_bytes(parts: tuple[str, ...]) -> bytes:
            with open(os.path.join(path, *parts), "rb") as fh:
                return fh.read()

        decoded = _check_and_decode(
            layout, read_bytes, path, image_size, channels, limit_per_class,
            expect_classes,
        )
    elif zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            layout = _resolve_layout(_list_zip(archive), split, path)

            def read_bytes(parts: tuple[str, ...]) -> bytes:
                return archive.read("/".join(parts))

            decoded = _check_and_decode(
                layout, read_bytes, path, image_size, channels, limit_per_class,
                expect_classes,
            )
    else:
        raise DataError(
            f"{name}: {path!r} is neither a folder nor a zip archive"
        )
    images, labels, unreadable = decoded
    skipped, examples = len(unreadable), unreadable[:3]
    if images.shape[0] == 0:
        raise DataError(
            f"{name}: none of the {skipped} image files for split {split!r} "
            f"under {path!r} could be decoded"
        )
    if skipped:
        total = skipped + images.shape[0]
        UNREADABLE[(str(path), split)] = (skipped, total, examples)
        what = (f"{name}: {skipped} of {total} image files for split {split!r} under {path!r} could not be "
                f"decoded (e.g. {', '.join(examples)})")
        if skipped / total > MAX_UNREADABLE_SHARE:
            raise DataError(f"{what}; more than {MAX_UNREADABLE_SHARE:.0%} unreadable, refusing to train on the rest")
        print(f"[fedgan] WARNING {what}; skipped", flush=True)
    return ArrayDataset(
        pixels=torch.from_numpy(images),
        y=torch.from_numpy(labels),
        num_classes=len(layout.classes),
        name=name,
        skipped=skipped,
    )


def _check_and_decode(
    layout, read_bytes, path, image_size, channels, limit_per_class, expect_classes
):
    if expect_classes is not None and layout.classes != tuple(expect_classes):
        raise DataError(
            f"{path!r} holds class folders {list(layout.classes)}, expected the "
            f"CIFAR-10 classes {list(expect_classes)}"
        )
    key = _decoded_key(path, layout, image_size, channels, limit_per_class)
    return _cached(key, lambda: _decode_files(layout, read_bytes, image_size, channels, limit_per_class))


# ---------------------------------------------------------------------------
# The machine's cache of decoded images (uint8, memory-mapped)
# ---------------------------------------------------------------------------
# Every process that loads image data -- each Ray actor of a simulation, the ServerApp, a deployed
# SuperNode's fresh ClientApp process per message -- would otherwise decode the files again and
# hold its own copy. Instead the decoded uint8 images are written once per machine (under a file
# lock, so concurrent processes decode once) and every process memory-maps them: the pages are
# shared through the OS page cache, and datasets index rows of the map (ArrayDataset.pixels/rows).
# Where: set_image_cache_dir() (a deployed node: <node-dir>/data-cache, app/client_app.py), else
# FEDGAN_IMAGE_CACHE (a folder, or "off" to decode in memory in every process), else
# ~/.cache/fedgan/decoded. An entry holds only the node's own decoded files, stays on the machine
# and is never sent; it is keyed by the source path, the geometry and every file's name, size and
# modification time, so changed data is decoded again.
IMAGE_CACHE_ENV = "FEDGAN_IMAGE_CACHE"
DEFAULT_IMAGE_CACHE = os.path.join(_CACHE_ROOT, "decoded")
_IMAGE_CACHE_OFF = ("off", "0", "none", "false", "no")
_IMAGE_CACHE_VERSION = 2
_image_cache_dir: str | None = None


def set_image_cache_dir(path: str | os.PathLike | None) -> None:
    """Where decoded images are cached in this process (None: FEDGAN_IMAGE_CACHE, else the
    default ``~/.cache/fedgan/decoded``)."""
    global _image_cache_dir
    _image_cache_dir = None if path is None else os.fspath(path)


def image_cache_dir() -> str | None:
    """The folder decoded images are cached in, or None when caching is off."""
    if _image_cache_dir:
        return _image_cache_dir
    env = os.environ.get(IMAGE_CACHE_ENV, "").strip()
    if env.lower() in _IMAGE_CACHE_OFF:
        return None
    return os.path.expanduser(env) if env else DEFAULT_IMAGE_CACHE


def _entry_key(what: list, files: Iterable[str]) -> str | None:
    """The cache entry name for a source described by ``what`` and its files' signatures."""
    if image_cache_dir() is None:
        return None
    import hashlib
    import json

    h = hashlib.sha256()
    h.update(json.dumps([_IMAGE_CACHE_VERSION, *what]).encode())
    for line in files:
        h.update(f"{line}\n".encode())
    return h.hexdigest()[:32]


def _decoded_key(path: str, layout: _Layout, image_size: int, channels: int, limit: int) -> str | None:
    if image_cache_dir() is None:
        return None

    def files() -> Iterable[str]:
        if os.path.isdir(path):
            for label, parts in layout.files:
                st = os.stat(os.path.join(path, *parts))
                yield f"{label}/{'/'.join(parts)}/{st.st_size}/{st.st_mtime_ns}"
        else:
            st = os.stat(path)
            yield f"{st.st_size}/{st.st_mtime_ns}"
            for label, parts in layout.files:
                yield f"{label}/{'/'.join(parts)}"

    return _entry_key([os.path.abspath(path), image_size, channels, limit, list(layout.classes)], files())


def _folder_key(kind: str, folder: str, split: str, image_size: int, channels: int) -> str | None:
    """Key for a torchvision-format folder (its files' names, sizes and times); None when it does
    not exist yet (torchvision will download it; the next process finds it)."""
    if image_cache_dir() is None or not os.path.isdir(folder):
        return None
    lines = []
    for dirpath, _, names in sorted(os.walk(folder)):
        for fname in sorted(names):
            st = os.stat(os.path.join(dirpath, fname))
            lines.append(f"{os.path.relpath(os.path.join(dirpath, fname), folder)}/{st.st_size}/{st.st_mtime_ns}")
    return _entry_key([kind, os.path.abspath(folder), split, image_size, channels], lines)


def _read_decoded(key: str | None) -> tuple[np.ndarray, np.ndarray, list[str]] | None:
    if key is None:
        return None
    import json

    base = os.path.join(image_cache_dir(), key)
    try:
        with open(base + ".json") as fh:   # written last: its presence marks a complete entry
            unreadable = list(json.load(fh)["unreadable"])
        # copy-on-write map: shared pages, writable for torch.from_numpy, never written back
        images = np.load(base + ".images.npy", mmap_mode="c")
        labels = np.load(base + ".labels.npy")
    except (OSError, ValueError, KeyError):
        return None
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape[0] != images.shape[0]:
        return None
    return images, labels, unreadable


def _write_decoded(key: str | None, decoded: tuple[np.ndarray, np.ndarray, list[str]]) -> bool:
    if key is None:
        return False
    import json

    folder = image_cache_dir()
    base = os.path.join(folder, key)
    images, labels, unreadable = decoded
    try:
        os.makedirs(folder, exist_ok=True)
        for suffix, arr in ((".images.npy", images), (".labels.npy", labels)):
            tmp = f"{base}{suffix}.{os.getpid()}.tmp"
            with open(tmp, "wb") as fh:
                np.save(fh, np.ascontiguousarray(arr))
            os.replace(tmp, base + suffix)
        tmp = f"{base}.json.{os.getpid()}.tmp"   # written last: its presence marks a complete entry
        with open(tmp, "w") as fh:
            json.dump({"unreadable": unreadable, "shape": list(images.shape)}, fh)
        os.replace(tmp, base + ".json")
    except OSError as exc:
        print(f"[fedgan] WARNING cannot cache decoded images in {folder}: {exc}; decoding every time",
              flush=True)
        return False
    return True


class _EntryLock:
    """An exclusive lock on one cache entry across processes (``fcntl.flock``), so that actors
    starting together decode a dataset once; a no-op where it cannot be taken (no fcntl, the
    folder cannot be made -- the write then warns)."""

    def __init__(self, key: str | None) -> None:
        self.key, self.fh = key, None

    def __enter__(self) -> "_EntryLock":
        if self.key is None:
            return self
        try:
            import fcntl

            os.makedirs(image_cache_dir(), exist_ok=True)
            self.fh = open(os.path.join(image_cache_dir(), self.key + ".lock"), "a+")
            fcntl.flock(self.fh, fcntl.LOCK_EX)
        except (ImportError, OSError):
            if self.fh is not None:
                self.fh.close()
            self.fh = None
        return self

    def __exit__(self, *exc) -> None:
        if self.fh is not None:
            self.fh.close()   # closing releases the flock


def _cached(key: str | None, decode) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The entry ``key`` memory-mapped, decoding (``decode()``: uint8 NHWC images, labels, the
    unreadable files) and writing it first if no process has; in memory when caching is off."""
    hit = _read_decoded(key)
    if hit is not None:
        return hit
    with _EntryLock(key):
        hit = _read_decoded(key)   # another process may have written it while we waited
        if hit is not None:
            return hit
        decoded = decode()
        if _write_decoded(key, decoded):
            # map what was just written, so this process shares the pages too
            return _read_decoded(key) or decoded
        return decoded


def _quantise(x: torch.Tensor) -> np.ndarray:
    """float ``(N, C, H, W)`` in [-1, 1] to uint8 NHWC (the storage of decoded images)."""
    return ((x.permute(0, 2, 3, 1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()


def _array_source_pixels(images: np.ndarray, image_size: int, channels: int) -> np.ndarray:
    """uint8 ``(N, H, W)``/``(N, H, W, C)`` images from an array source at the asked geometry,
    as uint8 NHWC: unchanged when it already matches, else resized/converted in float (as before)
    and quantised to uint8 (an error of at most half a grey level)."""
    arr = np.asarray(images)
    if arr.ndim == 3:
        arr = arr[..., None]
    if arr.shape[1:] == (image_size, image_size, channels):
        return np.ascontiguousarray(arr, dtype=np.uint8)
    return _quantise(_prepare_array_images(_uint8_nhwc_to_unit(arr), image_size, channels))


# ---------------------------------------------------------------------------
# Individual sources
# ---------------------------------------------------------------------------


def _digits_split_raw(split: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """scikit-learn's digits, one split (80/20, stratified, seed 0): the raw grey levels 0..16
    as uint8 ``(N, 8, 8, 1)`` in index order, and the labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    labels = bunch.target.astype(np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(labels.size), test_size=0.2, stratify=labels, random_state=0
    )
    idx = np.sort(train_idx if split == "train" else test_idx)
    raw = bunch.images[idx]
    if raw.min() < 0 or raw.max() > 16 or not np.array_equal(raw, np.round(raw)):
        raise DataError("digits: scikit-learn's grey levels are not the integers 0..16 this loader stores")
    return raw.astype(np.uint8)[..., None], labels[idx], []


def _digits(split: str, image_size: int, channels: int) -> ArrayDataset:
    # The split is kept in the machine's cache (raw grey levels, exact): importing scikit-learn
    # costs ~1.2 s in every process that loads digits (each actor of each simulation run).
    from importlib.metadata import PackageNotFoundError, version

    try:
        sklearn_version = version("scikit-learn")   # its split is the one cached
    except PackageNotFoundError:
        sklearn_version = "unknown"
    key = _entry_key(["digits", split, sklearn_version], [])
    raw, labels, _ = _cached(key, lambda: _digits_split_raw(split))
    images = np.asarray(raw[..., 0], dtype=np.float32) / 16.0
    x01 = torch.from_numpy(images).unsqueeze(1)
    return ArrayDataset(
        x=_prepare_array_images(x01, image_size, channels),
        y=torch.from_numpy(labels),
        num_classes=10,
        name="digits",
    )


def _mnist(data_dir: str, split: str, image_size: int, channels: int) -> ArrayDataset:
    root = data_dir or os.path.join(_CACHE_ROOT, "mnist")

    def decode() -> tuple[np.ndarray, np.ndarray, list[str]]:
        try:
            from torchvision import datasets as tv_datasets

            raw = tv_datasets.MNIST(root, train=(split == "train"), download=True)
            images = raw.data.numpy() if torch.is_tensor(raw.data) else np.asarray(raw.data)
            labels = np.asarray(raw.targets, dtype=np.int64)
        except Exception as exc:  # download or parsing failures of any kind
            raise DataError(
                f"mnist: could not load or download MNIST into {root!r} ({exc}). "
                f"Without internet, put the four unpacked files "
                f"train-images-idx3-ubyte, train-labels-idx1-ubyte, "
                f"t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte into "
                f"{os.path.join(root, 'MNIST', 'raw')!r} (or set data_dir to a "
                f"folder holding MNIST/raw/)"
            ) from exc
        return _array_source_pixels(images, image_size, channels), labels, []

    key = _folder_key("mnist", os.path.join(root, "MNIST", "raw"), split, image_size, channels)
    images, labels, _ = _cached(key, decode)
    return ArrayDataset(pixels=torch.from_numpy(images), y=torch.from_numpy(labels), num_classes=10, name="mnist")


def _cifar10_torchvision(root: str, split: str, image_size: int, channels: int):
    def decode() -> tuple[np.ndarray, np.ndarray, list[str]]:
        from torchvision import datasets as tv_datasets

        raw = tv_datasets.CIFAR10(root, train=(split == "train"), download=True)
        if tuple(raw.classes) != CIFAR10_CLASSES:
            raise DataError(f"cifar10: unexpected class list {raw.classes} in {root!r}")
        return (_array_source_pixels(raw.data, image_size, channels),
                np.asarray(raw.targets, dtype=np.int64), [])

    key = _folder_key("cifar10", os.path.join(root, "cifar-10-batches-py"), split, image_size, channels)
    images, labels, _ = _cached(key, decode)
    return ArrayDataset(pixels=torch.from_numpy(images), y=torch.from_numpy(labels), num_classes=10, name="cifar10")


_CIFAR_HELP = (
    "set data_dir to one of: a zip of class folders such as "
    "/path/to/cifar10_jpeg.zip (members cifar10/train/<class>/*.jpg and "
    "cifar10/test/<class>/*.jpg), an extracted folder with train/<class>/ and "
    "test/<class>/ subfolders, or a torchvision root holding "
    "cifar-10-batches-py/"
)


def _cifar10(
    data_dir: str, split: str, image_size: int, channels: int, limit_per_class: int
) -> ArrayDataset:
    if data_dir:
        if not os.path.exists(data_dir):
            raise DataError(f"cifar10: data_dir {data_dir!r} does not exist; {_CIFAR_HELP}")
        root = data_dir
        if os.path.basename(os.path.normpath(root)) == "cifar-10-batches-py":
            root = os.path.dirname(os.path.normpath(root))
        if os.path.isdir(os.path.join(root, "cifar-10-batches-py")) or (
            os.path.isdir(root) and not _list_tree(root)
        ):
            try:
                ds = _cifar10_torchvision(root, split, image_size, channels)
            except DataError:
                raise
            except Exception as exc:  # download or parsing failures
                raise DataError(
                    f"cifar10: could not read or download CIFAR-10 in {root!r} "
                    f"({exc}); {_CIFAR_HELP}"
                ) from exc
        else:
            # A folder-per-class tree or zip; limit_per_class is applied before
            # decoding so that tests can read a few images of a large archive.
            return _load_image_source(
                data_dir, split, image_size, channels, limit_per_class,
                "cifar10", expect_classes=CIFAR10_CLASSES,
            )
    else:
        root = os.path.join(_CACHE_ROOT, "cifar10")
        try:
            ds = _cifar10_torchvision(root, split, image_size, channels)
        except Exception as exc:
            raise DataError(
                f"cifar10: no data_dir given and downloading CIFAR-10 into "
                f"{root!r} failed ({exc}); {_CIFAR_HELP}"
            ) from exc
    if limit_per_class:
        ds = ds.subset(_limit_rows(ds.y.numpy(), limit_per_class))
    return ds


# ---------------------------------------------------------------------------
# load_dataset
# ---------------------------------------------------------------------------

_DEFAULT_SIZE = {"digits": 16, "mnist": 32, "cifar10": 32, "imagefolder": 32}
_DEFAULT_CHANNELS = {"digits": 1, "mnist": 1, "cifar10": 3, "imagefolder": 3}


def _parse_name(name: str, data_dir: str) -> tuple[str, str]:
    """Split a dataset name into (kind, location)."""
    text = str(name).strip()
    kind, sep, location = text.partition(":")
    kind = kind.strip().lower()
    if kind not in DATASETS:
        raise DataError(
            f"unknown dataset {name!r}; choose one of {', '.join(DATASETS[:-1])} "
            f"or imagefolder:<path>"
        )
    if kind == "imagefolder":
        location = location.strip() if sep else ""
        location = location or data_dir
        if not location:
            raise DataError(
                "dataset 'imagefolder' needs a location: use 'imagefolder:<path>' "
                "or set data_dir"
            )
    else:
        if sep:
            raise DataError(
                f"unknown dataset {name!r}; only imagefolder takes a ':<path>' suffix "
                f"(use data_dir for {kind})"
            )
        location = data_dir
    if location:
        location = os.path.abspath(os.path.expanduser(location))
    return kind, location


def load_dataset(
    name: str,
    *,
    data_dir: str = "",
    image_size: int = 0,
    channels: int = 0,
    split: str = "train",
    seed: int = 0,
    limit_per_class: int = 0,
) -> ArrayDataset:
    """Load one split of a dataset (cached per process).

    ``image_size``/``channels`` of 0 pick the dataset's default (digits 16x16x1,
    mnist 32x32x1, cifar10 and imagefolder 32x32x3); both are ignored by the
    2-D ``ring``/``grid`` mixtures, whose points depend on ``seed``.
    ``limit_per_class`` > 0 keeps only the first items of each class, which
    makes large sources cheap to read in tests and smoke runs.
    """
    kind, location = _parse_name(name, data_dir)
    split = str(split).strip().lower()
    if split not in _SPLIT_DIRS:
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    for arg, value in (("image_size", image_size), ("channels", channels),
                       ("limit_per_class", limit_per_class)):
        if not isinstance(value, (int, np.integer)) or value < 0:
            raise DataError(f"{arg} must be a non-negative integer, got {value!r}")
    if kind in ("ring", "grid"):
        image_size, channels, location = 0, 0, ""
    else:
        image_size = int(image_size) or _DEFAULT_SIZE[kind]
        channels = int(channels) or _DEFAULT_CHANNELS[kind]
        if channels not in (1, 3):
            raise DataError(f"channels must be 0, 1 or 3, got {channels!r}")
        seed = 0  # images do not depend on the seed; share one cache entry
    return _load_cached(
        kind, location, int(image_size), int(channels), split, int(seed),
        int(limit_per_class),
    )


@lru_cache(maxsize=16)
def _load_cached(
    kind: str,
    location: str,
    image_size: int,
    channels: int,
    split: str,
    seed: int,
    limit_per_class: int,
) -> ArrayDataset:
    if kind in ("ring", "grid"):
        ds = _toy(kind, split, seed)
    elif kind == "digits":
        ds = _digits(split, image_size, channels)
    elif kind == "mnist":
        ds = _mnist(location, split, image_size, channels)
    elif kind == "cifar10":
        return _cifar10(location, split, image_size, channels, limit_per_class)
    else:  # imagefolder
        return _load_image_source(
            location, split, image_size, channels, limit_per_class, "imagefolder"
        )
    if limit_per_class:
        ds = ds.subset(_limit_rows(ds.y.numpy(), limit_per_class))
    return ds


# ---------------------------------------------------------------------------
# Partitioning
# ---------------------------------------------------------------------------


def _rng(seed: int, salt: int) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFF_FFFF, salt])


def _sorted_int64(parts: Iterable[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    method: str,
    *,
    seed: int = 0,
    fraction: float = 0.1,
    dirichlet_alpha: float = 0.5,
    classes_per_client: int = 2,
    num_classes: int | None = None,
) -> list[np.ndarray]:
    """Split positions ``0..len(labels)-1`` among ``num_partitions`` clients.

    Methods:
      * ``iid`` -- a shuffled split into near-equal parts (sizes differ by <= 1);
      * ``full`` -- every client gets every index;
      * ``fraction`` -- every client gets ``round(fraction * n)`` random items,
        disjoint across clients while ``fraction * num_partitions <= 1``
        (then capped at ``n // num_partitions`` should rounding overshoot),
        otherwise drawn independently for each client;
      * ``dirichlet`` -- label-Dirichlet shares per class (see ``_dirichlet``);
      * ``classes`` -- client ``i`` holds classes ``(i*k + j) mod C`` for
        ``j < k``; each class is shared out evenly among its holders.
    Returns one sorted int64 array per client.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    method = str(method).strip().lower()
    if method not in PARTITIONS:
        raise DataError(
            f"unknown partition method {method!r}; choose one of {', '.join(PARTITIONS)}"
        )
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise DataError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    num_partitions = int(num_partitions)

    if method == "full":
        return [np.arange(n, dtype=np.int64) for _ in range(num_partitions)]

    if method == "iid":
        perm = _rng(seed, 11).permutation(n)
        return _sorted_int64(np.array_split(perm, num_partitions))

    if method == "fraction":
        if not (0.0 < float(fraction) <= 1.0):
            raise DataError(f"fraction must lie in (0, 1], got {fraction!r}")
        size = min(n, max(1, int(round(float(fraction) * n)))) if n else 0
        rng = _rng(seed, 12)
        if float(fraction) * num_partitions <= 1.0 + 1e-9:
            # Disjoint subsets; rounding up may overshoot n by a few items,
            # in which case every client gets n // num_partitions instead.
            size = min(size, n // num_partitions)
            perm = rng.permutation(n)
            return _sorted_int64(
                perm[i * size:(i + 1) * size] for i in range(num_partitions)
            )
        return _sorted_int64(
            rng.choice(n, size=size, replace=False) for _ in range(num_partitions)
        )

    if method == "dirichlet":
        if not float(dirichlet_alpha) > 0.0:
            raise DataError(f"dirichlet_alpha must be > 0, got {dirichlet_alpha!r}")
        return _dirichlet(labels, num_partitions, float(dirichlet_alpha), seed)

    # classes
    num_cls = int(num_classes) if num_classes is not None else (
        int(labels.max()) + 1 if n else 0
    )
    k = classes_per_client
    if not isinstance(k, (int, np.integer)) or not 1 <= k <= num_cls:
        raise DataError(
            f"classes_per_client must be an integer in [1, {num_cls}], got {k!r}"
        )
    k = int(k)
    holders: dict[int, list[int]] = {}
    for client in range(num_partitions):
        for j in range(k):
            holders.setdefault((client * k + j) % num_cls, []).append(client)
    rng = _rng(seed, 13)
    parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
    for cls in range(num_cls):
        owners = holders.get(cls)
        if not owners:
            continue
        members = rng.permutation(np.flatnonzero(labels == cls))
        for owner, chunk in zip(owners, np.array_split(members, len(owners))):
            parts[owner].append(chunk)
    return _sorted_int64(
        np.concatenate(p) if p else np.empty(0, dtype=np.int64) for p in parts
    )


_DIRICHLET_TRIES = 10


def _dirichlet(
    labels: np.ndarray, num_partitions: int, alpha: float, seed: int
) -> list[np.ndarray]:
    """Label-Dirichlet partition (Hsu et al. 2019; the scheme of flwr-datasets'
    ``DirichletPartitioner`` with ``self_balancing=True``), in numpy.

    Per class, the members are shuffled and cut into ``num_partitions`` pieces by
    shares drawn from ``Dirichlet(alpha)``; a partition that already holds its
    even share ``n / num_partitions`` takes no more (self-balancing). Every
    partition must end up with ``min(10, n // (2 * num_partitions))`` items or
    more; the whole draw is repeated (up to ``_DIRICHLET_TRIES`` times) until it
    does. Deterministic for a seed; disjoint and covering every index.
    """
    n = labels.shape[0]
    min_size = max(0, min(10, n // (2 * num_partitions)))
    target = n / num_partitions
    rng = _rng(seed, 14)
    classes = np.unique(labels)
    smallest = 0
    for _ in range(_DIRICHLET_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(num_partitions)]
        sizes = np.zeros(num_partitions, dtype=np.int64)
        for cls in classes:
            members = rng.permutation(np.flatnonzero(labels == cls))
            share = rng.dirichlet(np.full(num_partitions, alpha))
            share = np.where(sizes < target, share, 0.0)
            if not share.sum() > 0.0:  # underflow: share evenly among the open ones
                share = (sizes < target).astype(np.float64)
                if not share.sum() > 0.0:
                    share = np.ones(num_partitions)
            cuts = (np.cumsum(share / share.sum()) * members.size).astype(np.int64)[:-1]
            for i, chunk in enumerate(np.split(members, cuts)):
                parts[i].append(chunk)
                sizes[i] += chunk.size
        smallest = int(sizes.min())
        if smallest >= min_size:
            return _sorted_int64(np.concatenate(p) for p in parts)
    raise DataError(
        f"dirichlet partitioning of {n} items into {num_partitions} partitions "
        f"with dirichlet_alpha={alpha} failed: after {_DIRICHLET_TRIES} draws a "
        f"partition still held {smallest} < {min_size} items; raise dirichlet-alpha "
        f"or use fewer partitions"
    )


def split_server_clients(
    labels: np.ndarray,
    server_data: str,
    *,
    server_share: float = 0.5,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Return ``(server_idx, client_pool_idx)`` over positions of ``labels``.

    ``heldout`` gives the server ``server_share`` of every class and leaves the
    rest to the clients; ``full`` gives both sides everything; ``none`` gives
    the server nothing.
    """
    labels = np.asarray(labels).reshape(-1)
    n = labels.shape[0]
    mode = str(server_data).strip().lower()
    everything = np.arange(n, dtype=np.int64)
    if mode == "full":
        return everything, everything.copy()
    if mode == "none":
        return np.empty(0, dtype=np.int64), everything
    if mode != "heldout":
        raise DataError(
            f"unknown server_data {server_data!r}; choose one of {', '.join(SERVER_DATA)}"
        )
    share = float(server_share)
    if not 0.0 <= share <= 1.0:
        raise DataError(f"server_share must lie in [0, 1], got {server_share!r}")
    rng = _rng(seed, 21)
    server = []
    for cls in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == cls))
        server.append(members[: int(round(share * members.size))])
    server_idx = np.sort(np.concatenate(server)).astype(np.int64) if server else (
        np.empty(0, dtype=np.int64)
    )
    mask = np.ones(n, dtype=bool)
    mask[server_idx] = False
    return server_idx, np.flatnonzero(mask).astype(np.int64)


# ---------------------------------------------------------------------------
# Experiment-level data
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DataSpec:
    """Which data a run uses and how it is shared between server and clients."""

    dataset: str = "digits"
    data_dir: str = ""
    image_size: int = 0  # 0 = dataset default
    channels: int = 0  # 0 = dataset default
    partition: str = "classes"
    classes_per_client: int = 2
    fraction: float = 0.1
    dirichlet_alpha: float = 0.5
    server_data: str = "heldout"
    server_share: float = 0.5
    seed: int = 0


def _load_split(spec: DataSpec, split: str) -> ArrayDataset:
    return load_dataset(
        spec.dataset,
        data_dir=spec.data_dir,
        image_size=spec.image_size,
        channels=spec.channels,
        split=split,
        seed=spec.seed,
    )


def _take(ds: ArrayDataset, idx: np.ndarray) -> ArrayDataset:
    """Subset that shares the tensors when ``idx`` is simply everything."""
    if idx.size == len(ds) and np.array_equal(idx, np.arange(len(ds))):
        return ds
    return ds.subset(idx)


@lru_cache(maxsize=16)
def _server_and_pool(spec: DataSpec) -> tuple[np.ndarray, np.ndarray]:
    labels = _load_split(spec, "train").y.numpy()
    return split_server_clients(
        labels, spec.server_data, server_share=spec.server_share, seed=spec.seed
    )


@lru_cache(maxsize=16)
def _client_indices(spec: DataSpec, num_partitions: int) -> tuple[np.ndarray, ...]:
    """Per-client indices into the training split (not into the pool)."""
    ds = _load_split(spec, "train")
    _, pool = _server_and_pool(spec)
    parts = partition_indices(
        ds.y.numpy()[pool],
        num_partitions,
        spec.partition,
        seed=spec.seed,
        fraction=spec.fraction,
        dirichlet_alpha=spec.dirichlet_alpha,
        classes_per_client=spec.classes_per_client,
        num_classes=ds.num_classes,
    )
    return tuple(pool[p] for p in parts)


@lru_cache(maxsize=4)
def server_dataset(spec: DataSpec) -> ArrayDataset:
    """The server's share of the training split (may be empty)."""
    server_idx, _ = _server_and_pool(spec)
    return _take(_load_split(spec, "train"), server_idx)


@lru_cache(maxsize=16)
def client_dataset(spec: DataSpec, partition_id: int, num_partitions: int) -> ArrayDataset:
    """Client ``partition_id``'s part of the clients' pool of the training split."""
    if not isinstance(num_partitions, (int, np.integer)) or num_partitions < 1:
        raise DataError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if not isinstance(partition_id, (int, np.integer)) or not (
        0 <= partition_id < num_partitions
    ):
        raise DataError(
            f"partition_id must be in [0, {num_partitions - 1}], got {partition_id!r}"
        )
    idx = _client_indices(spec, int(num_partitions))[int(partition_id)]
    return _take(_load_split(spec, "train"), idx)


@lru_cache(maxsize=4)
def test_dataset(spec: DataSpec) -> ArrayDataset:
    """The test split of the dataset (whole, not partitioned)."""
    return _load_split(spec, "test")


# Keep pytest from collecting this function when a test module imports it.
test_dataset.__test__ = False  # type: ignore[attr-defined]


def partition_summary(spec: DataSpec, num_partitions: int) -> list[dict]:
    """Size and class make-up of every client partition, for logs and docs."""
    ds = _load_split(spec, "train")
    labels = ds.y.numpy()
    summary = []
    for i, idx in enumerate(_client_indices(spec, int(num_partitions))):
        hist = np.bincount(labels[idx], minlength=ds.num_classes)
        summary.append(
            {
                "partition": i,
                "size": int(idx.size),
                "classes": [int(c) for c in np.flatnonzero(hist)],
                "histogram": [int(h) for h in hist],
            }
        )
    return summary
