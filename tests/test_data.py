"""Tests for app.data: sources, partitions, server/client split and DataSpec."""

from __future__ import annotations

import struct
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app.data import (
    CIFAR10_CLASSES,
    DATASETS,
    GRID_MEANS,
    GRID_STD,
    PARTITIONS,
    RING_MEANS,
    RING_STD,
    SERVER_DATA,
    ArrayDataset,
    DataError,
    DataSpec,
    client_dataset,
    load_dataset,
    mode_means,
    partition_indices,
    partition_summary,
    server_dataset,
    split_server_clients,
    test_dataset,
)

CIFAR_ZIP = Path("/work/shared/data/cifar10_jpeg.zip")


def _assert_partition_of(parts, n):
    """Every index 0..n-1 appears in exactly one part."""
    allidx = np.concatenate(parts)
    assert allidx.size == n
    assert np.array_equal(np.sort(allidx), np.arange(n))


def _assert_sorted_int64(parts):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0)


# ---------------------------------------------------------------------------
# constants and the container
# ---------------------------------------------------------------------------


def test_public_constants():
    assert DATASETS == ("digits", "ring", "grid", "mnist", "cifar10", "imagefolder")
    assert PARTITIONS == ("iid", "fraction", "dirichlet", "classes", "full")
    assert SERVER_DATA == ("heldout", "full", "none")
    assert issubclass(DataError, ValueError)


def test_array_dataset_helpers():
    ds = ArrayDataset(
        x=torch.arange(12, dtype=torch.float32).reshape(6, 2),
        y=torch.tensor([0, 1, 1, 2, 2, 2]),
        num_classes=4,
        name="toy",
    )
    assert len(ds) == 6 and not ds.is_image and ds.sample_shape == (2,)
    assert ds.label_histogram().tolist() == [1, 2, 3, 0]
    sub = ds.subset(np.array([5, 0]))
    assert sub.y.tolist() == [2, 0] and sub.x[0].tolist() == [10.0, 11.0]
    assert sub.name == "toy" and sub.num_classes == 4 and sub.skipped == 0
    assert len(ds.subset(torch.tensor([True, False, True, False, False, False]))) == 2
    assert "toy" in repr(ds)
    with pytest.raises(ValueError):
        ArrayDataset(x=torch.zeros(3, 2), y=torch.zeros(2, dtype=torch.int64),
                     num_classes=1, name="bad")


# ---------------------------------------------------------------------------
# digits and the toy mixtures
# ---------------------------------------------------------------------------


def test_digits_shape_range_and_split():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert train.is_image and train.sample_shape == (1, 16, 16)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert len(train) + len(test) == 1797
    assert abs(len(test) / 1797 - 0.2) < 0.01
    for ds in (train, test):
        assert ds.x.min() >= -1.0 and ds.x.max() <= 1.0
        assert ds.x.min() < -0.99 and ds.x.max() > 0.9  # spans the range
        assert ds.num_classes == 10 and ds.name == "digits"
    # stratified: every class keeps ~20 % in test
    frac = test.label_histogram() / (train.label_histogram() + test.label_histogram())
    assert np.all(np.abs(frac - 0.2) < 0.02)
    # train and test hold different images (no row repeated across the split)
    tr = {bytes(r.numpy().tobytes()) for r in train.x}
    te = {bytes(r.numpy().tobytes()) for r in test.x}
    assert len(tr & te) <= 2  # sklearn digits contain a few exact duplicates
    # the split does not depend on the seed, and loads are cached
    assert load_dataset("digits", seed=7) is train


def test_digits_size_and_channels():
    ds = load_dataset("digits", image_size=8, channels=3, split="test")
    assert ds.sample_shape == (3, 8, 8)
    assert torch.equal(ds.x[:, 0], ds.x[:, 2])


def test_ring_modes_and_std():
    ds = load_dataset("ring", seed=3)
    assert len(ds) == 8000 and ds.sample_shape == (2,) and ds.num_classes == 8
    assert ds.label_histogram().tolist() == [1000] * 8
    means, std = mode_means("ring")
    assert std == RING_STD == 0.02 and torch.equal(means, RING_MEANS)
    assert torch.unique(means, dim=0).shape[0] == 8
    assert torch.allclose(means.norm(dim=1), torch.full((8,), 2.0), atol=1e-6)
    angles = torch.atan2(means[:, 1], means[:, 0]) % (2 * np.pi)
    assert torch.allclose(torch.sort(angles).values,
                          torch.arange(8) * (2 * np.pi / 8), atol=1e-5)
    for k in range(8):
        pts = ds.x[ds.y == k]
        assert torch.allclose(pts.mean(0), means[k], atol=0.005)
        assert abs(float(pts.std(0).mean()) - 0.02) < 0.002
    test = load_dataset("ring", split="test", seed=3)
    assert len(test) == 2000
    assert not torch.equal(test.x[:10], ds.x[:10])
    # the seed changes the draw; the same seed repeats it
    assert not torch.equal(load_dataset("ring", seed=4).x, ds.x)


def test_grid_modes():
    ds = load_dataset("grid")
    assert len(ds) == 25000 and ds.num_classes == 25
    assert len(load_dataset("grid", split="test")) == 2500
    means, std = mode_means("grid")
    assert std == GRID_STD == 0.05 and torch.equal(means, GRID_MEANS)
    assert set(means[:, 0].tolist()) == {-4.0, -2.0, 0.0, 2.0, 4.0}
    assert torch.unique(means, dim=0).shape[0] == 25
    err = (ds.x - means[ds.y]).std()
    assert abs(float(err) - 0.05) < 0.003
    with pytest.raises(DataError):
        mode_means("digits")


def test_unknown_dataset_and_bad_args():
    with pytest.raises(DataError, match="nope"):
        load_dataset("nope")
    with pytest.raises(DataError, match="split"):
        load_dataset("digits", split="valid")
    with pytest.raises(DataError, match="channels"):
        load_dataset("digits", channels=2)


# ---------------------------------------------------------------------------
# partitions
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digit_labels():
    return load_dataset("digits").y.numpy()


def test_iid_covers_everything_once(digit_labels):
    parts = partition_indices(digit_labels, 7, "iid", seed=1)
    assert len(parts) == 7
    _assert_partition_of(parts, digit_labels.size)
    _assert_sorted_int64(parts)
    sizes = [p.size for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert not np.array_equal(parts[0], np.arange(parts[0].size))  # shuffled


def test_full_gives_everyone_everything(digit_labels):
    parts = partition_indices(digit_labels, 3, "full")
    for p in parts:
        assert np.array_equal(p, np.arange(digit_labels.size))


def test_classes_partition(digit_labels):
    parts = partition_indices(digit_labels, 5, "classes", classes_per_client=2)
    _assert_sorted_int64(parts)
    for i, p in enumerate(parts):
        assert set(np.unique(digit_labels[p]).tolist()) == {2 * i, 2 * i + 1}
    _assert_partition_of(parts, digit_labels.size)  # disjoint, nothing lost

    # overlapping ownership: 10 clients, 2 classes each -> each class has 2 owners
    parts = partition_indices(digit_labels, 10, "classes", classes_per_client=2)
    for i, p in enumerate(parts):
        assert set(np.unique(digit_labels[p]).tolist()) == {(2 * i) % 10, (2 * i + 1) % 10}
    _assert_partition_of(parts, digit_labels.size)
    c0 = [np.sum(digit_labels[p] == 0) for p in (parts[0], parts[5])]
    assert abs(c0[0] - c0[1]) <= 1


def test_fraction_partition(digit_labels):
    labels = digit_labels[:1430]
    n = labels.size
    parts = partition_indices(labels, 10, "fraction", fraction=0.1, seed=2)
    _assert_sorted_int64(parts)
    assert [p.size for p in parts] == [round(0.1 * n)] * 10
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size  # disjoint
    # round(0.1 * 1437) * 10 > 1437: still disjoint, each capped at n // 10
    parts = partition_indices(digit_labels, 10, "fraction", fraction=0.1, seed=2)
    assert [p.size for p in parts] == [digit_labels.size // 10] * 10
    allidx = np.concatenate(parts)
    assert np.unique(allidx).size == allidx.size
    # too large to be disjoint: independent draws of the right size
    n = digit_labels.size
    parts = partition_indices(digit_labels, 4, "fraction", fraction=0.5, seed=2)
    assert all(p.size == round(0.5 * n) for p in parts)
    assert all(np.unique(p).size == p.size for p in parts)
    assert np.intersect1d(parts[0], parts[1]).size > 0
    # 1:100
    parts = partition_indices(digit_labels, 3, "fraction", fraction=0.01)
    assert [p.size for p in parts] == [round(0.01 * n)] * 3


def test_dirichlet_covers_everything_once(digit_labels):
    parts = partition_indices(digit_labels, 4, "dirichlet", dirichlet_alpha=0.3, seed=5)
    assert len(parts) == 4
    _assert_partition_of(parts, digit_labels.size)
    _assert_sorted_int64(parts)
    again = partition_indices(digit_labels, 4, "dirichlet", dirichlet_alpha=0.3, seed=5)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = partition_indices(digit_labels, 4, "dirichlet", dirichlet_alpha=0.3, seed=6)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_is_numpy_only_skewed_by_alpha_and_bounded(digit_labels, monkeypatch):
    # no flwr-datasets / HF datasets behind it (a None entry makes any import fail)
    monkeypatch.setitem(sys.modules, "flwr_datasets", None)
    monkeypatch.setitem(sys.modules, "datasets", None)

    def skew(alpha):  # mean share of a partition's largest class
        parts = partition_indices(digit_labels, 5, "dirichlet", dirichlet_alpha=alpha, seed=0)
        _assert_partition_of(parts, digit_labels.size)
        assert min(p.size for p in parts) >= 10  # min(10, n // (2 * partitions))
        return np.mean([np.bincount(digit_labels[p], minlength=10).max() / p.size for p in parts])

    assert skew(0.05) > 0.5       # nearly one class per client
    assert skew(1000.0) < 0.15    # nearly uniform (10 classes)
    # 50 partitions at alpha 0.001: most get nothing, none can reach 10 items
    with pytest.raises(DataError, match=rf"dirichlet partitioning of {digit_labels.size} items into 50 .* < 10 items"):
        partition_indices(digit_labels, 50, "dirichlet", dirichlet_alpha=0.001, seed=0)


@pytest.mark.parametrize(
    "kwargs, word",
    [
        (dict(num_partitions=2, method="bogus"), "bogus"),
        (dict(num_partitions=0, method="iid"), "num_partitions"),
        (dict(num_partitions=2, method="fraction", fraction=0.0), "fraction"),
        (dict(num_partitions=2, method="fraction", fraction=1.5), "fraction"),
        (dict(num_partitions=2, method="classes", classes_per_client=0), "classes_per_client"),
        (dict(num_partitions=2, method="classes", classes_per_client=11), "classes_per_client"),
        (dict(num_partitions=2, method="dirichlet", dirichlet_alpha=0.0), "dirichlet_alpha"),
    ],
)
def test_partition_argument_errors(digit_labels, kwargs, word):
    with pytest.raises(DataError, match=word):
        partition_indices(digit_labels, **kwargs)


# ---------------------------------------------------------------------------
# server / client split
# ---------------------------------------------------------------------------


def test_heldout_split_is_stratified_and_disjoint(digit_labels):
    server, pool = split_server_clients(digit_labels, "heldout", server_share=0.3, seed=1)
    assert np.intersect1d(server, pool).size == 0
    assert np.array_equal(np.sort(np.concatenate([server, pool])),
                          np.arange(digit_labels.size))
    for c in range(10):
        total = np.sum(digit_labels == c)
        assert abs(np.sum(digit_labels[server] == c) - 0.3 * total) <= 1


def test_full_and_none_server_data(digit_labels):
    n = digit_labels.size
    server, pool = split_server_clients(digit_labels, "full")
    assert np.array_equal(server, np.arange(n)) and np.array_equal(pool, np.arange(n))
    server, pool = split_server_clients(digit_labels, "none")
    assert server.size == 0 and server.dtype == np.int64
    assert np.array_equal(pool, np.arange(n))
    with pytest.raises(DataError, match="server_data"):
        split_server_clients(digit_labels, "half")


# ---------------------------------------------------------------------------
# DataSpec level
# ---------------------------------------------------------------------------


def _row_keys(ds):
    return {r.numpy().tobytes() for r in ds.x}


def test_default_spec_server_and_clients_are_disjoint():
    spec = DataSpec()
    train = load_dataset("digits")
    server = server_dataset(spec)
    clients = [client_dataset(spec, i, 5) for i in range(5)]
    assert abs(len(server) - 0.5 * len(train)) <= 10
    assert len(server) + sum(len(c) for c in clients) == len(train)
    for i, c in enumerate(clients):
        assert set(np.unique(c.y.numpy()).tolist()) == {2 * i, 2 * i + 1}
        assert c.sample_shape == (1, 16, 16)
    # exact row bookkeeping: count each training row and check that the
    # server and clients together use every occurrence exactly once
    from collections import Counter

    have = Counter(r.numpy().tobytes() for r in train.x)
    used = Counter()
    for part in [server, *clients]:
        used.update(r.numpy().tobytes() for r in part.x)
    assert used == have
    assert len(_row_keys(server) & _row_keys(clients[0])) <= 2  # known duplicates
    # cached: the same object comes back
    assert client_dataset(spec, 1, 5) is clients[1]
    assert server_dataset(spec) is server
    test = test_dataset(spec)
    assert len(test) == 360


def test_spec_full_server_and_fraction_clients():
    spec = DataSpec(dataset="ring", partition="fraction", fraction=0.1, server_data="full")
    server = server_dataset(spec)
    assert len(server) == 8000
    clients = [client_dataset(spec, i, 10) for i in range(10)]
    assert all(len(c) == 800 for c in clients)
    summary = partition_summary(spec, 10)
    assert [s["size"] for s in summary] == [800] * 10
    assert summary[0]["partition"] == 0 and len(summary[0]["histogram"]) == 8
    assert sum(summary[3]["histogram"]) == 800


def test_spec_none_server_and_partition_errors():
    spec = DataSpec(dataset="ring", partition="iid", server_data="none")
    assert len(server_dataset(spec)) == 0
    assert sum(len(client_dataset(spec, i, 3)) for i in range(3)) == 8000
    with pytest.raises(DataError, match="partition_id"):
        client_dataset(spec, 3, 3)
    with pytest.raises(DataError, match="partition_id"):
        client_dataset(spec, -1, 3)


def test_partition_summary_classes():
    summary = partition_summary(DataSpec(), 5)
    assert [s["classes"] for s in summary] == [[2 * i, 2 * i + 1] for i in range(5)]
    assert all(s["size"] == sum(s["histogram"]) for s in summary)


# ---------------------------------------------------------------------------
# image folders, zips, MNIST and CIFAR-10 layouts
# ---------------------------------------------------------------------------


def _write_tree(root: Path, classes, per_class, size=(20, 12), corrupt=False):
    """Images whose red channel encodes the class index."""
    root.mkdir(parents=True, exist_ok=True)
    for ci, cls in enumerate(classes):
        d = root / cls
        d.mkdir(parents=True, exist_ok=True)
        for j in range(per_class):
            colour = (ci * 60, 100, 200)
            Image.new("RGB", size, colour).save(d / f"{j:03d}.png")
    if corrupt:
        (root / classes[0] / "broken.jpg").write_bytes(b"not an image at all")
    (root / "README.txt").write_text("ignored")


def _zip_tree(src: Path, archive: Path, top: str = ""):
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(src.rglob("*")):
            rel = path.relative_to(src).as_posix()
            name = f"{top}/{rel}" if top else rel
            if path.is_dir():
                zf.writestr(name + "/", "")
            else:
                zf.write(path, name)


def test_imagefolder_tree_and_zip(tmp_path):
    tree = tmp_path / "pets"
    _write_tree(tree, ["cat", "dog", "emu"], per_class=3, corrupt=True)
    ds = load_dataset(f"imagefolder:{tree}")
    assert ds.sample_shape == (3, 32, 32) and ds.num_classes == 3
    assert ds.skipped == 1 and len(ds) == 9
    assert ds.label_histogram().tolist() == [3, 3, 3]
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    # red channel identifies the class folder (sorted name order)
    red = ((ds.x[:, 0, 0, 0] + 1) * 127.5).round()
    assert torch.allclose(red, ds.y.float() * 60, atol=1)

    grey = load_dataset(f"imagefolder:{tree}", channels=1, image_size=8)
    assert grey.sample_shape == (1, 8, 8)

    archive = tmp_path / "pets.zip"
    _zip_tree(tree, archive, top="pets")
    zds = load_dataset(f"imagefolder:{archive}")
    assert zds.skipped == 1 and len(zds) == 9
    assert torch.equal(zds.y, ds.y) and torch.allclose(zds.x, ds.x)
    # no train/test subfolders: only a train split
    with pytest.raises(DataError, match="test"):
        load_dataset(f"imagefolder:{archive}", split="test")
    # the location may also come from data_dir
    assert len(load_dataset("imagefolder", data_dir=str(tree))) == 9


def test_imagefolder_with_splits(tmp_path):
    root = tmp_path / "split"
    _write_tree(root / "train", ["a", "b"], per_class=4)
    _write_tree(root / "test", ["a", "b"], per_class=2)
    archive = tmp_path / "split.zip"
    _zip_tree(root, archive)
    for src in (root, archive):
        train = load_dataset(f"imagefolder:{src}")
        test = load_dataset(f"imagefolder:{src}", split="test")
        assert len(train) == 8 and len(test) == 4
        assert test.label_histogram().tolist() == [2, 2]
    spec = DataSpec(dataset=f"imagefolder:{root}", partition="iid", server_share=0.5)
    assert len(server_dataset(spec)) == 4
    assert len(test_dataset(spec)) == 4


def test_imagefolder_errors_name_the_path(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(DataError, match=str(missing)):
        load_dataset(f"imagefolder:{missing}")
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(DataError, match=str(empty)):
        load_dataset(f"imagefolder:{empty}")
    bad = tmp_path / "all_bad"
    (bad / "x").mkdir(parents=True)
    (bad / "x" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(DataError, match=str(bad)):
        load_dataset(f"imagefolder:{bad}")
    flat = tmp_path / "flat"
    flat.mkdir()
    Image.new("RGB", (4, 4)).save(flat / "lonely.png")
    with pytest.raises(DataError, match=str(flat)):
        load_dataset(f"imagefolder:{flat}")


def test_cifar10_layouts_from_small_copies(tmp_path):
    root = tmp_path / "c10"
    _write_tree(root / "cifar10" / "train", list(CIFAR10_CLASSES), per_class=2, size=(32, 32))
    _write_tree(root / "cifar10" / "test", list(CIFAR10_CLASSES), per_class=1, size=(32, 32))
    archive = tmp_path / "c10.zip"
    _zip_tree(root, archive)
    for src in (archive, root / "cifar10"):
        train = load_dataset("cifar10", data_dir=str(src))
        assert train.sample_shape == (3, 32, 32) and len(train) == 20
        assert train.label_histogram().tolist() == [2] * 10
        assert len(load_dataset("cifar10", data_dir=str(src), split="test")) == 10
    small = load_dataset("cifar10", data_dir=str(archive), image_size=16, limit_per_class=1)
    assert small.sample_shape == (3, 16, 16) and len(small) == 10
    # wrong class folders are refused
    other = tmp_path / "other"
    _write_tree(other / "train", ["a", "b"], per_class=1)
    _write_tree(other / "test", ["a", "b"], per_class=1)
    with pytest.raises(DataError, match="CIFAR-10"):
        load_dataset("cifar10", data_dir=str(other))
    with pytest.raises(DataError, match="nowhere"):
        load_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not CIFAR_ZIP.is_file(), reason="shared CIFAR-10 zip not present")
def test_cifar10_shared_zip():
    with zipfile.ZipFile(CIFAR_ZIP) as zf:
        names = [n for n in zf.namelist() if n.endswith(".jpg")]
    assert len(names) == 60000
    assert {n.split("/")[2] for n in names} == set(CIFAR10_CLASSES)
    ds = load_dataset("cifar10", data_dir=str(CIFAR_ZIP), split="test", limit_per_class=4)
    assert ds.sample_shape == (3, 32, 32) and ds.num_classes == 10
    assert ds.label_histogram().tolist() == [4] * 10 and ds.skipped == 0
    assert ds.x.min() >= -1 and ds.x.max() <= 1 and ds.x.std() > 0.1


def _write_idx(path: Path, array: np.ndarray):
    magic = 0x0800 | {1: 0x01, 3: 0x03}[array.ndim]
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_raw_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 6), ("t10k", 3)):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)
    ds = load_dataset("mnist", data_dir=str(tmp_path))
    assert ds.sample_shape == (1, 32, 32) and len(ds) == 6
    assert ds.y.tolist() == [0, 1, 2, 3, 4, 5]
    assert ds.x.min() >= -1 and ds.x.max() <= 1
    assert len(load_dataset("mnist", data_dir=str(tmp_path), split="test")) == 3


def test_mnist_failure_is_a_data_error(tmp_path, monkeypatch):
    import torchvision.datasets as tvd

    def refuse(*args, **kwargs):
        raise RuntimeError("offline")

    monkeypatch.setattr(tvd, "MNIST", refuse)
    with pytest.raises(DataError, match="MNIST/raw|MNIST"):
        load_dataset("mnist", data_dir=str(tmp_path / "m"))


# --- the on-disk cache of decoded images (a deployed node's own folder) -----------------------
def _image_tree(root: Path) -> Path:
    for label in ("3", "7"):
        (root / label).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((8, 8), 30 * i + int(label), dtype=np.uint8)).save(root / label / f"{i}.png")
    return root


def test_decoded_images_are_cached_once_and_decoded_again_when_a_file_changes(tmp_path, monkeypatch):
    import app.data as data

    tree = _image_tree(tmp_path / "tree")
    calls = []
    real = data._decode_files
    monkeypatch.setattr(data, "_decode_files", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, "off")
    data.set_image_cache_dir(None)
    assert data.image_cache_dir() is None
    plain = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
    data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
    assert len(calls) == 2                                       # off: every load decodes

    data.set_image_cache_dir(tmp_path / "cache")
    try:
        first = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
        again = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
        assert len(calls) == 3                                   # the second load decoded nothing
        for ds in (first, again):
            assert torch.equal(ds.x, plain.x) and torch.equal(ds.y, plain.y)
        entries = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock"))
        assert len(entries) == 3 and entries[0].endswith(".images.npy") and entries[1].endswith(".json")
        assert np.load(tmp_path / "cache" / entries[0]).dtype == np.uint8   # compact: uint8, never float32
        # another geometry is another entry; a changed file makes the old entry unused
        data._load_image_source(str(tree), "train", 4, 1, 0, "imagefolder")
        assert len(calls) == 4
        Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(tree / "7" / "0.png")
        changed = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
        assert len(calls) == 5 and not torch.equal(changed.x, plain.x)
    finally:
        data.set_image_cache_dir(None)


def test_the_cache_is_on_by_default_and_can_be_moved_or_turned_off(monkeypatch, tmp_path):
    import app.data as data

    data.set_image_cache_dir(None)
    monkeypatch.delenv(data.IMAGE_CACHE_ENV, raising=False)
    assert data.image_cache_dir() == data.DEFAULT_IMAGE_CACHE
    assert data.DEFAULT_IMAGE_CACHE.endswith(str(Path(".cache") / "fedgan" / "decoded"))
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, str(tmp_path))
    assert data.image_cache_dir() == str(tmp_path)
    monkeypatch.setenv(data.IMAGE_CACHE_ENV, "OFF")
    assert data.image_cache_dir() is None
    data.set_image_cache_dir(tmp_path / "node")                  # a deployed node's folder wins
    try:
        assert data.image_cache_dir() == str(tmp_path / "node")
    finally:
        data.set_image_cache_dir(None)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_image_data_is_held_as_uint8_mapped_from_the_cache_file_and_converts_exactly(tmp_path):
    import app.data as data

    tree = _image_tree(tmp_path / "tree")
    data.set_image_cache_dir(tmp_path / "cache")
    try:
        ds = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
    finally:
        data.set_image_cache_dir(None)
    entry = next((tmp_path / "cache").glob("*.images.npy"))
    assert ds.pixels.dtype == torch.uint8 and tuple(ds.pixels.shape) == (8, 8, 8, 1)
    assert str(entry) in Path("/proc/self/maps").read_text()     # the storage is a map of the file
    # the float samples are exactly p / 255 * 2 - 1 of the stored grey levels (here 30 i + label)
    levels = torch.tensor([30.0 * i + c for c in (3, 7) for i in range(4)])
    expect = (levels / 255.0 * 2.0 - 1.0).view(8, 1, 1, 1).expand(8, 1, 8, 8)
    assert ds.x.dtype == torch.float32 and torch.equal(ds.x, expect)
    assert ds.sample_shape == (1, 8, 8) and ds.is_image
    # a training step's view converts only the rows it samples; subsets share the storage
    idx = torch.tensor([6, 1, 1])
    assert torch.equal(ds.view[idx], ds.x[idx]) and torch.equal(ds.view[2:4], ds.x[2:4])
    assert len(ds.view) == 8 and tuple(ds.view.shape) == (8, 1, 8, 8)
    sub = ds.subset(np.array([7, 0, 5]))
    assert sub.pixels is ds.pixels and torch.equal(sub.x, ds.x[[7, 0, 5]])
    assert torch.equal(sub.subset([2, 0]).x, ds.x[[5, 7]]) and sub.subset([2, 0]).y.tolist() == [1, 1]


_RACE = """
import sys, time
import app.data as data
real = data._decode_files
def slow(*a, **k):
    print("decoded", flush=True)
    time.sleep(1.5)
    return real(*a, **k)
data._decode_files = slow
data.set_image_cache_dir(sys.argv[2])
ds = data._load_image_source(sys.argv[1], "train", 8, 1, 0, "imagefolder")
print("rows", len(ds), float(ds.x.sum()), flush=True)
"""


def test_processes_loading_the_same_data_at_once_decode_it_once(tmp_path):
    import subprocess

    tree = _image_tree(tmp_path / "tree")
    root = Path(__file__).resolve().parent.parent
    procs = [subprocess.Popen([sys.executable, "-c", _RACE, str(tree), str(tmp_path / "cache")], cwd=root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-500:] for o in outs]
    assert sum(o[0].count("decoded") for o in outs) == 1        # the others waited and mapped the entry
    assert len({o[0].split("rows", 1)[1] for o in outs}) == 1    # and all hold the same data


def test_an_unwritable_cache_folder_only_costs_the_cache(tmp_path, capsys):
    import app.data as data

    tree = _image_tree(tmp_path / "tree")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    data.set_image_cache_dir(blocker / "cache")
    try:
        ds = data._load_image_source(str(tree), "train", 8, 1, 0, "imagefolder")
    finally:
        data.set_image_cache_dir(None)
    assert len(ds) == 8
    assert f"cannot cache decoded images in {blocker / 'cache'}" in capsys.readouterr().out


def test_a_deployed_node_caches_its_images_in_its_own_node_dir(tmp_path):
    import app.data as data
    from flwr.app import Context, RecordDict

    from app.client_app import local_data
    from app.config import parse_config

    tree = _image_tree(tmp_path / "tree")
    cfg = parse_config({"output-dir": str(tmp_path / "out")})
    node = {"data-path": str(tree), "partition-id": 0, "node-dir": str(tmp_path / "node")}
    ctx = Context(run_id=1, node_id=1, node_config=node, state=RecordDict(), run_config={})
    try:
        ds, pid = local_data(cfg, ctx)
    finally:
        data.set_image_cache_dir(None)
    assert pid == 0 and len(ds) == 8
    assert len(list((tmp_path / "node" / "data-cache").glob("*.images.npy"))) == 1


def test_data_memory_script_reports_uint8_storage_shared_by_its_processes(tmp_path):
    import json
    import subprocess

    tree = _image_tree(tmp_path / "tree")
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "simulations/data_memory.py", "--dataset", f"imagefolder:{tree}",
                           "--processes", "2", "--batches", "3", "--batch-size", "4",
                           "--cache", str(tmp_path / "cache"), "--output-dir", str(tmp_path / "out")],
                          cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "out" / "data_memory.json").read_text())
    rows = report["processes"]
    assert [r["process"] for r in rows] == [0, 1] and {r["storage"] for r in rows} == {"uint8"}
    assert sum(r["rows"] for r in rows) == 4                     # the clients' half of 8 images, split in two
    assert len(list((tmp_path / "cache").glob("*.images.npy"))) == 1
    assert "sum of PSS" in done.stdout


_DIGITS_FROM_CACHE = """
import sys
import torch
from app import data
ds = data._digits(sys.argv[1], 16, 1)
torch.save({"x": ds.x, "y": ds.y}, sys.argv[2])
print("sklearn imported:", "sklearn" in sys.modules)
"""


def test_digits_come_from_the_machines_cache_equal_to_scikit_learns_split_without_importing_it(tmp_path):
    """A process that finds the digits split in the cache never imports scikit-learn (~1.2 s in each
    simulation actor), and gets exactly the tensors scikit-learn's 80/20 stratified split gives."""
    import subprocess

    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    import app.data as data

    bunch = load_digits()
    train_idx, test_idx = train_test_split(np.arange(bunch.target.size), test_size=0.2, stratify=bunch.target,
                                           random_state=0)
    root = Path(__file__).resolve().parent.parent
    env = {**__import__("os").environ, "FEDGAN_IMAGE_CACHE": str(tmp_path / "cache")}
    for split, idx in (("train", train_idx), ("test", test_idx)):
        idx = np.sort(idx)
        want_x = data._prepare_array_images(torch.from_numpy(bunch.images[idx].astype(np.float32) / 16.0).unsqueeze(1),
                                            16, 1)
        imported = []
        for attempt in range(2):   # the first process fills the cache, the second reads it
            out = tmp_path / f"{split}{attempt}.pt"
            proc = subprocess.run([sys.executable, "-c", _DIGITS_FROM_CACHE, split, str(out)], cwd=root, env=env,
                                  capture_output=True, text=True, timeout=120)
            assert proc.returncode == 0, proc.stderr[-2000:]
            imported.append(proc.stdout.strip())
            got = torch.load(out)
            assert torch.equal(got["x"], want_x) and torch.equal(got["y"], torch.from_numpy(bunch.target[idx]))
        assert imported == ["sklearn imported: True", "sklearn imported: False"], (split, imported)
