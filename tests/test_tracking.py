"""Live tracking (app/tracking.py): the `tracking` run-config key, what a TensorBoard tracker
writes (read back with TensorBoard's own EventAccumulator), that a failing tracker never
stops a run, and one tiny run that leaves event files in its run folder."""

import logging
from pathlib import Path

import pytest
import torch

from app import tracking
from app.config import ConfigError, check_tracking, parse_config
from app.runs import RunFolder
from app.server_app import RunRecorder
from app.tracking import NullTracker, TensorBoardTracker, Tracker, make_tracker, round_scalars, series_name

pytest.importorskip("tensorboard")   # in the `test` extra, so CI runs all of this
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RECORDS = [
    {"round": 1, "g_loss": 0.75, "d_loss": 1.25, "bytes_down": 1000, "bytes_up": 2000, "rolled_back": [],
     "dropped_reasons": {}, "clients": {"client 0 (classes 0,1)": {"node": 11, "g_loss": 0.5, "d_real_acc": 0.25},
                                        "client 1 (classes 2,3)": {"node": 12, "g_loss": 1.0, "d_real_acc": 0.5}}},
    {"round": 2, "g_loss": 0.625, "d_loss": 1.5, "bytes_down": 1000, "bytes_up": 2000, "epsilon": 3.5,
     "clients": {"client 0 (classes 0,1)": {"node": 11, "g_loss": 0.25, "d_real_acc": 0.75},
                 "client 1 (classes 2,3)": {"node": 12, "g_loss": 1.5, "d_real_acc": 1.0}},
     "eval": {"teacher": {"fid": 12.5, "extractor": "classifier", "label_histogram": [1, 2]}},
     "client_eval": {"client 0 (classes 0,1)": {"tv_own": 0.125, "own_share": 0.875, "partition_id": 0}},
     "fid_mean": 20.0},
]


def read_events(logdir: Path) -> EventAccumulator:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "images": 0})
    acc.Reload()
    return acc


def scalars(acc: EventAccumulator, tag: str) -> list[tuple[int, float]]:
    return [(e.step, pytest.approx(e.value)) for e in acc.Scalars(tag)]


def test_round_records_become_tagged_scalars():
    assert series_name("client 0 (classes 0,1)") == "client_0" and series_name("gb 3") == "gb_3"
    got = round_scalars(RECORDS[1])
    assert got == {"g_loss": 0.625, "d_loss": 1.5, "bytes_down": 1000.0, "bytes_up": 2000.0, "epsilon": 3.5,
                   "g_loss/client_0": 0.25, "d_real_acc/client_0": 0.75, "g_loss/client_1": 1.5,
                   "d_real_acc/client_1": 1.0, "eval.fid/teacher": 12.5, "client_eval.tv_own/client_0": 0.125,
                   "client_eval.own_share/client_0": 0.875, "fid_mean": 20.0}
    # the step, node ids, strings, lists, booleans and non-finite values are not series
    assert round_scalars({"round": 3, "ok": True, "x": float("nan"), "why": "late", "h": [1, 2]}) == {}


def test_tensorboard_tracker_writes_scalars_per_client_series_and_images_that_read_back(tmp_path):
    png = RunFolder.create(tmp_path / "out", "privacygan", "digits", {}).save_samples(
        "round00002", {"teacher": torch.zeros(4, 1, 16, 16), "client 0": torch.ones(4, 1, 16, 16)})
    tracker = TensorBoardTracker(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()          # nothing is written before the first round
    for rec in RECORDS:
        tracker.log_round(rec)
    tracker.log_image("samples", png, 2)
    tracker.close()
    assert tracker.failures == 0
    acc = read_events(tmp_path / "tb")
    assert scalars(acc, "g_loss") == [(1, 0.75), (2, 0.625)]
    assert scalars(acc, "g_loss/client_0") == [(1, 0.5), (2, 0.25)]
    assert scalars(acc, "g_loss/client_1") == [(1, 1.0), (2, 1.5)]
    assert scalars(acc, "d_real_acc/client_1") == [(1, 0.5), (2, 1.0)]
    assert scalars(acc, "bytes_up") == [(1, 2000.0), (2, 2000.0)]
    assert scalars(acc, "eval.fid/teacher") == [(2, 12.5)]
    assert scalars(acc, "client_eval.own_share/client_0") == [(2, 0.875)]
    assert scalars(acc, "epsilon") == [(2, 3.5)]
    assert not [t for t in acc.Tags()["scalars"] if t.startswith(("node", "round")) or "/node" in t]
    (image,) = acc.Images("samples")
    from PIL import Image
    with Image.open(png) as grid:
        assert (image.step, image.width, image.height) == (2, *grid.size)


def test_tracking_key_is_validated_naming_the_key():
    assert parse_config({}).tracking == "none"
    assert parse_config({"tracking": "tensorboard"}).tracking == "tensorboard"
    with pytest.raises(ConfigError, match=r"'tracking' = 'mlflow'.*'none', 'tensorboard', 'wandb'"):
        parse_config({"tracking": "mlflow"})


def test_a_missing_tracking_package_stops_the_run_at_start_saying_what_to_install(tmp_path, monkeypatch):
    from app.server_app import run

    check_tracking(parse_config({"tracking": "tensorboard"}))        # installed here: no error
    assert tracking.missing_package("tensorboard") is None and tracking.missing_package("none") is None
    monkeypatch.setitem(tracking.PACKAGES, "tensorboard", "tensorboard_not_installed_here")
    assert tracking.missing_package("tensorboard") == "tensorboard_not_installed_here"
    monkeypatch.setattr("app.config.missing_package", lambda kind: tracking.PACKAGES.get(kind))   # none installed
    for kind, package in (("tensorboard", "tensorboard_not_installed_here"), ("wandb", "wandb")):
        cfg = parse_config({"tracking": kind, "output-dir": str(tmp_path / "out")})
        with pytest.raises(ConfigError, match=rf"'tracking' = '{kind}' needs the package '{package}'.*"
                                              r'pip install -e "\.\[tracking\]"'):
            run(None, cfg)
    assert not (tmp_path / "out").exists()        # stopped before a run folder was made
    check_tracking(parse_config({"tracking": "none"}))


class Broken(Tracker):
    name = "broken"

    def _scalars(self, scalars, step):
        raise OSError("disk full")

    def _image(self, tag, image, step):
        raise RuntimeError("no images today")


def test_a_failing_tracker_warns_once_and_the_run_folder_is_written_anyway(tmp_path, caplog):
    folder = RunFolder.create(tmp_path / "out", "privacygan", "digits", {})
    recorder = RunRecorder(folder, 2, tracker=Broken())
    with caplog.at_level(logging.WARNING, logger="fedgan"):
        for rec in RECORDS:
            recorder.log_round(rec)
        recorder.save_samples("round00002", {"teacher": torch.zeros(2, 1, 16, 16)})
    assert [r["round"] for r in folder.read_jsonl("metrics.jsonl")] == [1, 2]
    assert (folder.samples_dir / "round00002.png").is_file()
    warnings = [r.getMessage() for r in caplog.records if "tracking (broken)" in r.getMessage()]
    assert len(warnings) == 2 and "disk full" in warnings[0] and "no images today" in warnings[1]
    assert recorder.tracker.failures == 3


def test_a_backend_that_cannot_start_gives_no_tracker_and_a_warning(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(tracking, "TensorBoardTracker", lambda *a, **k: (_ for _ in ()).throw(ImportError("nope")))
    with caplog.at_level(logging.WARNING, logger="fedgan"):
        assert isinstance(make_tracker("tensorboard", tmp_path), NullTracker)
    assert "could not start" in caplog.text and 'pip install -e ".[tracking]"' in caplog.text


def test_the_recorder_mirrors_rounds_and_grids_at_their_round(tmp_path):
    seen = []

    class Spy(Tracker):
        def _scalars(self, scalars, step):
            seen.append(("scalars", step, scalars["g_loss"]))

        def _image(self, tag, image, step):
            seen.append((tag, step, image.shape[2]))

    folder = RunFolder.create(tmp_path / "out", "local", "digits", {})
    recorder = RunRecorder(folder, 3, tracker=Spy())
    recorder.save_samples("round00001", {"client 0": torch.zeros(2, 1, 16, 16)})   # local: grid before the record
    recorder.log_round(RECORDS[0])
    recorder.log_round({**RECORDS[1], "round": 2})
    recorder.save_samples("final", {"client 0": torch.zeros(2, 1, 16, 16)})
    assert seen == [("samples", 1, 3), ("scalars", 1, 0.75), ("scalars", 2, 0.625), ("samples", 2, 3)]


@pytest.mark.e2e
def test_a_tiny_run_with_tracking_tensorboard_leaves_event_files_in_its_run_folder(tmp_path):
    from e2e_mods import simulate

    cfg = parse_config({"gen-features": 8, "disc-features": 8, "batch-size": 8, "teacher-steps": 3,
                        "samples-per-client": 4, "sample-every": 1, "checkpoint-every": 0, "steps-per-round": 1,
                        "num-rounds": 2, "min-nodes": 2, "client-eval": False, "round-timeout": 120.0,
                        "node-wait-timeout": 60.0, "tracking": "tensorboard", "output-dir": str(tmp_path / "out")})
    run = simulate(cfg, 2).path
    assert [run] == list((tmp_path / "out" / "runs").iterdir())
    assert "status: **success**" in (run / "summary.md").read_text()
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    acc = read_events(run / "tensorboard")
    assert [e.step for e in acc.Scalars("g_loss")] == [1, 2]
    rows = RunFolder.open(run).read_jsonl("metrics.jsonl")
    assert [e.value for e in acc.Scalars("d_loss")] == pytest.approx([r["d_loss"] for r in rows])
    assert {"g_loss/client_0", "g_loss/client_1"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Images("samples")] == [1, 2]
