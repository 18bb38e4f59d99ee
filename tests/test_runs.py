"""Tests for app.runs: run folders, logging, checkpoints, figures, progress."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from app import runs
from app.runs import Progress, RunFolder, ensure_writable_dir, resolve_output_dir, run_folders


@pytest.fixture
def run(tmp_path) -> RunFolder:
    return RunFolder.create(tmp_path, "fedavg", "mnist", {"lr": 0.0002})


def _png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        return img.size  # (width, height)


# --------------------------------------------------------------------------- #
# resolve_output_dir
# --------------------------------------------------------------------------- #
def test_relative_output_dir_uses_fedgan_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_HOME", str(tmp_path / "home"))
    assert resolve_output_dir("outputs") == tmp_path / "home" / "outputs"
    assert resolve_output_dir("a/b") == tmp_path / "home" / "a" / "b"


def test_relative_output_dir_defaults_to_home_fedgan(tmp_path, monkeypatch):
    monkeypatch.delenv("FEDGAN_HOME", raising=False)
    monkeypatch.setattr(runs.Path, "home", classmethod(lambda cls: tmp_path))
    assert resolve_output_dir("outputs") == tmp_path / "fedgan" / "outputs"


def test_absolute_output_dir_kept_and_tilde_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_HOME", str(tmp_path / "home"))
    absolute = tmp_path / "elsewhere"
    assert resolve_output_dir(str(absolute)) == absolute
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert resolve_output_dir("~/out") == tmp_path / "user" / "out"


# --------------------------------------------------------------------------- #
# RunFolder.create / open
# --------------------------------------------------------------------------- #
def test_create_layout_and_config_round_trip(tmp_path):
    config = {"num_rounds": 3, "lr": 2e-4, "nested": {"b": [1, 2], "a": None},
              "path": Path("/data"), "np": np.float32(0.5), "t": torch.tensor(7)}
    run = RunFolder.create(tmp_path, "fedavg", "imagefolder:/x/y", config, run_name="try 1")

    assert run.path.is_absolute()
    assert run.path.parent == tmp_path / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-fedavg-imagefolder_x_y-try_1", run.path.name), run.path.name
    assert (run.path / "samples").is_dir()
    assert (run.path / "checkpoints").is_dir()

    text = (run.path / "config.json").read_text()
    loaded = json.loads(text)
    assert loaded == {"num_rounds": 3, "lr": 2e-4, "nested": {"a": None, "b": [1, 2]},
                      "path": "/data", "np": 0.5, "t": 7}
    assert text.rstrip("\n") == json.dumps(loaded, indent=2, sort_keys=True)
    assert RunFolder.open(run.path).read_config() == loaded


def test_create_relative_output_dir_under_fedgan_home(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDGAN_HOME", str(tmp_path))
    run = RunFolder.create("outs", "fedprox", "cifar10", {})
    assert run.path.parent == tmp_path / "outs" / "runs"
    assert re.fullmatch(r"\d{8}-\d{6}-fedprox-cifar10", run.path.name)


def test_run_folders_lists_runs_only_never_the_write_probe(tmp_path):
    # the write probe of ensure_writable_dir lives for a moment in <out>/runs; a listing taken then
    # (a test or compare_strategies waiting for the run folder) must not take it for a run
    assert run_folders(tmp_path) == []                       # no runs/ yet
    first = RunFolder.create(tmp_path, "fedavg", "digits", {}, run_name="a")
    second = RunFolder.create(tmp_path, "fedavg", "digits", {}, run_name="b")
    (tmp_path / "runs" / ".fedgan-write-test.abc123").write_bytes(b"0")
    (tmp_path / "runs" / ".hidden").mkdir()
    (tmp_path / "runs" / "notes.txt").write_text("x")
    assert run_folders(tmp_path) == sorted([first.path, second.path])
    ensure_writable_dir(tmp_path / "runs")                   # and the probe does not stay behind
    assert sorted(p.name for p in (tmp_path / "runs").iterdir() if p.name.startswith(".fedgan")) == [
        ".fedgan-write-test.abc123"]


def test_create_appends_counter_when_name_exists(tmp_path, monkeypatch):
    class FrozenDatetime:
        @staticmethod
        def now(tz=None):
            from datetime import datetime, timezone
            return datetime(2024, 1, 2, 3, 4, 5, tzinfo=timezone.utc)

    monkeypatch.setattr(runs, "datetime", FrozenDatetime)
    names = [RunFolder.create(tmp_path, "fedavg", "mnist", {}).path.name for _ in range(3)]
    assert names == ["20240102-030405-fedavg-mnist",
                     "20240102-030405-fedavg-mnist-2",
                     "20240102-030405-fedavg-mnist-3"]


def test_open_missing_folder_raises(tmp_path):
    with pytest.raises(OSError, match="no such folder"):
        RunFolder.open(tmp_path / "nope")


# --------------------------------------------------------------------------- #
# JSON lines
# --------------------------------------------------------------------------- #
def test_log_metrics_appends_and_writes_nan_as_null(run):
    run.log_metrics({"round": 1, "g_loss": 1.5, "d_loss": float("nan")})
    run.log_metrics({"round": 2, "g_loss": np.float32(0.25), "d_loss": torch.tensor(0.5),
                     "inf": float("inf"), "n": np.int64(3),
                     "clients": {"0": {"d_loss": float("-inf")}}})

    lines = (run.path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert "NaN" not in lines[0] and "Infinity" not in lines[1]
    assert json.loads(lines[0]) == {"round": 1, "g_loss": 1.5, "d_loss": None}
    assert run.read_jsonl("metrics.jsonl") == [
        {"round": 1, "g_loss": 1.5, "d_loss": None},
        {"round": 2, "g_loss": 0.25, "d_loss": 0.5, "inf": None, "n": 3,
         "clients": {"0": {"d_loss": None}}},
    ]


def test_log_comm_and_read_jsonl(run):
    assert run.read_jsonl("comm.jsonl") == []
    run.log_comm([{"round": 1, "cid": "0", "bytes_up": 10}, {"round": 1, "cid": "1", "bytes_up": 12}])
    run.log_comm([])
    run.log_comm([{"round": 2, "cid": "0", "bytes_up": 11}])
    assert [r["bytes_up"] for r in run.read_jsonl("comm.jsonl")] == [10, 12, 11]


def test_read_jsonl_skips_torn_last_line(run):
    run.log_metrics({"round": 1})
    with open(run.path / "metrics.jsonl", "a") as fh:
        fh.write('{"round": 2, "g_lo')
    assert run.read_jsonl("metrics.jsonl") == [{"round": 1}]


# --------------------------------------------------------------------------- #
# Checkpoints
# --------------------------------------------------------------------------- #
def test_checkpoint_round_trip(run):
    obj = {"round": 4, "weights": [torch.arange(6.0).reshape(2, 3)], "rng": np.arange(3),
           "meta": {"strategy": "fedavg"}}
    path = run.save_checkpoint("latest.pt", obj)
    assert path == run.path / "checkpoints" / "latest.pt"
    back = run.load_checkpoint("latest.pt")
    assert back["round"] == 4 and back["meta"] == {"strategy": "fedavg"}
    assert torch.equal(back["weights"][0], obj["weights"][0])
    assert np.array_equal(back["rng"], obj["rng"])
    assert sorted(p.name for p in run.checkpoints_dir.iterdir()) == ["latest.pt"]


def test_checkpoint_rejects_path_names(run):
    with pytest.raises(ValueError):
        run.save_checkpoint("../escape.pt", {})


def _failing_save(obj, f, *args, **kwargs):
    f.write(b"PARTIAL-CHECKPOINT-BYTES" * 100)
    raise RuntimeError("killed while saving")


def test_checkpoint_interrupted_first_save_leaves_nothing(run, monkeypatch):
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError, match="killed while saving"):
        run.save_checkpoint("latest.pt", {"round": 1})
    assert not (run.checkpoints_dir / "latest.pt").exists()
    assert list(run.checkpoints_dir.iterdir()) == []


def test_checkpoint_interrupted_overwrite_keeps_old_one(run, monkeypatch):
    run.save_checkpoint("latest.pt", {"round": 1})
    monkeypatch.setattr(torch, "save", _failing_save)
    with pytest.raises(RuntimeError):
        run.save_checkpoint("latest.pt", {"round": 2})
    monkeypatch.undo()
    assert run.load_checkpoint("latest.pt") == {"round": 1}
    assert [p.name for p in run.checkpoints_dir.iterdir()] == ["latest.pt"]


# --------------------------------------------------------------------------- #
# Samples
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("channels", [1, 3])
def test_save_samples_images_grow_with_rows(run, channels):
    torch.manual_seed(0)

    def imgs(b):
        return torch.rand(b, channels, 28, 28) * 2 - 1

    p1 = run.save_samples(f"one_{channels}", {"client 0 (p0)": imgs(20)})
    w1, h1 = _png_size(p1)
    p3 = run.save_samples(f"three_{channels}", {f"client {i} (p{i})": imgs(16) for i in range(3)})
    w3, h3 = _png_size(p3)

    assert p1 == run.path / "samples" / f"one_{channels}.png"
    assert h3 > h1 and w3 == w1
    # 16 cells per row, each at least ~40 px wide -> a readable width.
    assert w1 >= 16 * 40
    # each added row adds at least one cell height
    assert (h3 - h1) >= 2 * 40
    with Image.open(p3) as img:
        assert img.mode in ("RGB", "RGBA")


def test_save_samples_row_with_fewer_images_and_grayscale_content(run):
    # all-white (+1) grayscale images must render as white cells
    p = run.save_samples("white", {"a": torch.ones(2, 1, 8, 8), "b": -torch.ones(1, 1, 8, 8)})
    with Image.open(p) as img:
        arr = np.asarray(img.convert("L"))
    assert arr.min() < 50 and arr.max() > 200  # black (-1) and white (+1) both present


def test_save_samples_points_grow_with_entries(run):
    torch.manual_seed(0)
    w1, h1 = _png_size(run.save_samples("pts1", {"real": torch.randn(200, 2)}))
    w2, h2 = _png_size(run.save_samples("pts2", {"real": torch.randn(200, 2),
                                                  "client 0": torch.randn(200, 2)}))
    w5, h5 = _png_size(run.save_samples("pts5", {str(i): torch.randn(50, 2) for i in range(5)}))
    assert w2 > w1 and h2 == h1
    assert h5 > h2


def test_save_samples_rejects_mixed_shapes(run):
    with pytest.raises(ValueError):
        run.save_samples("bad", {"a": torch.zeros(2, 2), "b": torch.zeros(1, 1, 4, 4)})


# --------------------------------------------------------------------------- #
# Summary and metric plots
# --------------------------------------------------------------------------- #
def test_write_summary(run):
    path = run.write_summary("# Run\n\nfinal g_loss 1.0\n")
    assert path == run.path / "summary.md"
    assert path.read_text() == "# Run\n\nfinal g_loss 1.0\n"


def test_plot_metrics_with_per_client_values(run):
    for r in range(1, 5):
        run.log_metrics({
            "round": r, "g_loss": 1.0 / r, "d_loss": float("nan") if r == 2 else 0.5 * r,
            "status": "ok", "eval": {"fid": 100.0 - r},
            "clients": {"0": {"d_loss": 0.4 * r, "note": "x"}, "1": {"d_loss": 0.6 * r}},
        })
    path = run.plot_metrics()
    assert path == run.path / "metrics.png"
    w, h = _png_size(path)
    assert w > 200 and h > 200

    path.unlink()
    assert run.plot_metrics(["d_loss", "missing", "status"]) == run.path / "metrics.png"
    assert run.plot_metrics(["missing", "status"]) is None


def test_plot_metrics_nothing_to_plot(run):
    assert run.plot_metrics() is None  # no metrics.jsonl at all
    (run.path / "metrics.jsonl").write_text("")
    assert run.plot_metrics() is None
    run.log_metrics({"round": 1, "status": "started"})
    assert run.plot_metrics() is None
    assert not (run.path / "metrics.png").exists()


# --------------------------------------------------------------------------- #
# Progress
# --------------------------------------------------------------------------- #
class FakeClock:
    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_progress_eta_and_format():
    clock, out = FakeClock(), io.StringIO()
    prog = Progress(10, stream=out, clock=clock)

    assert prog.update(0) == "[fedgan] round 0/10 | elapsed 0:00:00 | ETA --"
    clock.t += 10
    line = prog.update(2, {"g_loss": 1.23456, "d_loss": 0.456, "n": 3})
    assert line == "[fedgan] round 2/10 | elapsed 0:00:10 | ETA 0:00:40 | g_loss 1.235 d_loss 0.456 n 3"
    assert out.getvalue().splitlines() == ["[fedgan] round 0/10 | elapsed 0:00:00 | ETA --", line]


def test_progress_long_runs_and_custom_label(capsys):
    clock = FakeClock(0.0)
    prog = Progress(200, label="step", clock=clock)
    clock.t = 31.0
    line = prog.update(12, {"g_loss": np.float32(1234.5678), "x": torch.tensor(0.5),
                            "bad": float("nan")})
    # 31 / 12 * 188 = 485.67 s -> 0:08:06
    assert line == ("[fedgan] step 12/200 | elapsed 0:00:31 | ETA 0:08:06"
                    " | g_loss 1235 x 0.5 bad nan")
    assert capsys.readouterr().out == line + "\n"
    clock.t = 2 * 3600 + 5
    assert prog.update(200).endswith("elapsed 2:00:05 | ETA 0:00:00")


def test_quality_plot_has_one_line_per_set_and_client_and_names_the_extractor(tmp_path):
    from app.runs import QUALITY_PANELS, quality_series

    folder = RunFolder.create(tmp_path, "privacygan", "digits", {})
    assert folder.plot_quality() is None                    # never evaluated: no plot
    for rnd, fid in [(1, 30.0), (2, 20.0)]:
        folder.log_metrics({"round": rnd, "g_loss": 1.0,
                            "eval": {"teacher": {"fid": fid, "extractor": "classifier", "num_samples": 500},
                                     "client 0": {"fid": fid + 1, "extractor": "classifier", "num_samples": 500}},
                            "client_eval": {"client 0": {"fid": fid / 2, "tv_own": 0.1, "own_share": fid / 100,
                                                         "num_fake": 500}}})
    series, note = quality_series(folder.read_jsonl("metrics.jsonl"), "eval", "fid")
    assert series == {"teacher": [(1, 30.0), (2, 20.0)], "client 0": [(1, 31.0), (2, 21.0)]}
    assert note == "classifier features, 500 samples"
    assert quality_series(folder.read_jsonl("metrics.jsonl"), "client_eval", "tv_own")[0] == {
        "client 0": [(1, 0.1), (2, 0.1)]}
    # the own-class share each client reports (issue #17: how it grows with training steps) is a panel
    assert ("client_eval", "own_share") in [(group, key) for group, key, _ in QUALITY_PANELS]
    assert quality_series(folder.read_jsonl("metrics.jsonl"), "client_eval", "own_share")[0] == {
        "client 0": [(1, 0.3), (2, 0.2)]}
    path = folder.plot_quality()
    assert path == folder.path / "quality.png" and path.stat().st_size > 10_000


def test_metrics_plot_legend_names_each_client_once(tmp_path, monkeypatch):
    """Per-client keys such as "client 0 (classes 0,1)" are the legend entries as they are (it read
    "client client 0 (classes 0,1)"); a bare id still gets "client <id>"."""
    from app.runs import client_legend_label

    assert client_legend_label("client 0 (classes 0,1)") == "client 0 (classes 0,1)"
    assert client_legend_label(3) == "client 3" and client_legend_label("7") == "client 7"
    folder = RunFolder.create(tmp_path, "privacygan", "digits", {})
    for rnd in (1, 2):
        folder.log_metrics({"round": rnd, "g_loss": 1.0, "clients": {"client 0 (classes 0,1)": {"g_loss": 0.5},
                                                                     "client 1 (classes 2,3)": {"g_loss": 1.5}}})
    figures = []
    monkeypatch.setattr(runs, "_save_figure", lambda fig, path: figures.append(fig) or path)
    folder.plot_metrics(["g_loss"])
    (legend,) = [ax.get_legend() for ax in figures[0].axes]
    assert [t.get_text() for t in legend.get_texts()] == ["client 0 (classes 0,1)", "client 1 (classes 2,3)",
                                                          "client mean", "g_loss"]
