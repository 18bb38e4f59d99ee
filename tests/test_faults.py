"""The fault matrix of issue #16: what careless users and hostile or slow clients do, and what
the run must do about it. Each test reproduces one row of the issue's table (or a case next to
it) and checks the outcome: the reply dropped with its reason, the model untouched, the run
going on, one line naming the path or the key, nothing merged, nothing left running."""

from __future__ import annotations

import copy
import dataclasses
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import torch
from flwr.app import MetricRecord, RecordDict
from torch import nn

from app.config import ConfigError, parse_config
from app.loopback import _cmdline, process_alive
from app.runs import run_folders
from models import DCGANDiscriminator, DCGANGenerator
from strategies import wire
from strategies.base import (NodeBook, NullRecorder, RunFailed, _last_line, apply_with_blame, exchange,
                             guarded_update)
from strategies.privacygan import PrivacyGAN, PrivacyGANSettings, client_discriminate

from e2e_mods import scaled_feedback, simulate, simulation_processes, tagged_env

PROJECT = Path(__file__).resolve().parent.parent
PY = sys.executable
SIDE, C, NZ, F = 16, 1, 8, 8


# --------------------------------------------------------------------------------------------
# An in-process grid with Flower's push/pull interface: a node can answer at once, late, or never
# --------------------------------------------------------------------------------------------
class Reply:
    def __init__(self, content, reply_to, src):
        self.content = content
        self.metadata = SimpleNamespace(reply_to_message_id=reply_to, src_node_id=src)

    def has_error(self):
        return False


class LoopGrid:
    """``handler(nid, content) -> RecordDict``; nodes in ``hold`` keep their replies until released."""

    def __init__(self, nodes, handler):
        self.nodes, self.handler = list(nodes), handler
        self.hold: set[int] = set()
        self.ready, self.held, self.sent = {}, {}, []
        self._ids = itertools.count(1)

    def get_node_ids(self):
        return list(self.nodes)

    def push_messages(self, messages):
        ids = []
        for m in messages:
            mid, nid = f"m{next(self._ids)}", m.metadata.dst_node_id
            self.sent.append(nid)
            reply = Reply(self.handler(nid, m.content), mid, nid)
            (self.held if nid in self.hold else self.ready)[mid] = reply
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids):
        return [self.ready.pop(mid) for mid in list(message_ids) if mid in self.ready]

    def release(self):
        self.ready.update(self.held)
        self.held.clear()


class FakeMessage:
    """What a server builds before Flower sends it (a real Message needs a running Flower run)."""

    def __init__(self, content, dst_node_id, message_type, group_id=""):
        self.content = content
        self.metadata = SimpleNamespace(dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

    def has_error(self):
        return False


@pytest.fixture(autouse=True)
def server_side_messages(monkeypatch, request):
    """Unit tests build messages without a Flower run; the end-to-end ones use Flower's own."""
    import strategies.privacygan as privacygan_module

    if request.node.get_closest_marker("e2e") is None:
        monkeypatch.setattr(privacygan_module, "Message", FakeMessage)


def info(nid):
    return FakeMessage(content=RecordDict(), dst_node_id=nid, message_type=wire.INFO, group_id="t")


def test_a_straggler_gets_no_new_message_until_it_answers_and_its_late_reply_is_discarded():
    calls = {1: 0, 2: 0, 3: 0}

    def handler(nid, content):
        calls[nid] += 1
        return RecordDict({wire.METRICS: MetricRecord({"call": float(calls[nid])})})

    grid = LoopGrid([1, 2, 3], handler)
    grid.hold = {2}
    parse = lambda nid, r: wire.metrics_of(r.content)  # noqa: E731
    ex1 = exchange(grid, {n: info(n) for n in (1, 2, 3)}, timeout=0.3, parse=parse, poll=0.01)
    assert set(ex1.replies) == {1, 3} and "no reply within" in ex1.dropped[2]
    ex2 = exchange(grid, {n: info(n) for n in (1, 2, 3)}, timeout=0.3, parse=parse, poll=0.01)
    assert set(ex2.replies) == {1, 3} and "still busy" in ex2.dropped[2]
    assert grid.sent.count(2) == 1 and ex2.bytes_down.get(2) is None     # nothing new queued for it
    grid.hold.clear()
    grid.release()                                                       # the late reply arrives
    ex3 = exchange(grid, {n: info(n) for n in (1, 2, 3)}, timeout=0.3, parse=parse, poll=0.01)
    assert 2 in ex3.late and set(ex3.replies) == {1, 2, 3} and not ex3.dropped
    assert ex3.replies[2] == {"call": 2.0}        # the fresh reply is used, the late one (call 1) is not


def test_a_reply_over_max_reply_mb_is_dropped_unread():
    big = torch.zeros(600_000)   # 2.4 MB
    grid = LoopGrid([1, 2], lambda nid, c: RecordDict(
        {wire.METRICS: MetricRecord({"x": 1.0}), **({"extra": wire.tensor_record(extra=big)} if nid == 2 else {})}))
    seen = []
    ex = exchange(grid, {n: info(n) for n in (1, 2)}, timeout=1, parse=lambda n, r: seen.append(n) or 1,
                  max_reply_mb=1.0, poll=0.01)
    assert set(ex.replies) == {1} and seen == [1]
    assert "exceeds run config 'max-reply-mb' = 1" in ex.dropped[2] and ex.bytes_up[2] > 2_400_000


def test_the_last_line_of_a_client_error_has_no_stray_characters():
    ray_text = "Traceback (most recent call last):\\n  File \"x.py\", line 3\\nValueError: bad shape (3, 4)\\n')\""
    assert _last_line(ray_text) == "ValueError: bad shape (3, 4)"
    assert _last_line("RuntimeError: boom\n") == "RuntimeError: boom"


# --------------------------------------------------------------------------------------------
# Bounded replies and rolled-back updates
# --------------------------------------------------------------------------------------------
def nets(seed=0):
    torch.manual_seed(seed)
    return DCGANGenerator(NZ, C, SIDE, F), DCGANDiscriminator(C, SIDE, F)


def privacygan(**kw):
    G_T, D_T = nets()
    s = PrivacyGANSettings(latent_dim=NZ, batch_size=8, samples_per_client=4, min_nodes=1, steps_per_round=2, **kw)
    return PrivacyGAN(s, teacher_g=G_T, teacher_d=D_T, make_generator=lambda: DCGANGenerator(NZ, C, SIDE, F),
                      make_gen_optimizer=lambda G: torch.optim.Adam(G.parameters(), lr=1e-3, betas=(0.5, 0.999)),
                      recorder=NullRecorder(), sample_shape=(C, SIDE, SIDE))


def honest_client(states):
    data = torch.rand(40, C, SIDE, SIDE, generator=torch.Generator().manual_seed(1)) * 2 - 1

    def build():
        torch.manual_seed(123)
        return DCGANDiscriminator(C, SIDE, F)

    def handle(nid, content):
        return client_discriminate(content, states.setdefault(nid, RecordDict()),
                                   sample_real=lambda b, g: data[torch.randint(len(data), (b,), generator=g)],
                                   build_discriminator=build, disc_lr=1e-3, betas=(0.5, 0.999), device="cpu",
                                   seed=0, partition_id=nid)
    return handle


def state_of(strat, nid):
    """A student's weights and optimizer state (its BatchNorm statistics move whenever it makes fakes)."""
    G, opt = strat.student(nid)
    return ({k: p.detach().clone() for k, p in G.named_parameters()}, copy.deepcopy(opt.state_dict()["state"]))


def same_state(a, b):
    (ga, oa), (gb, ob) = a, b
    if any(not torch.equal(ga[k], gb[k]) for k in ga) or oa.keys() != ob.keys():
        return False
    return all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])


@pytest.mark.parametrize("factor", [1e30, 3e38 / 4])
def test_privacygan_drops_feedback_above_max_feedback_norm_and_the_students_stay_as_they_were(factor):
    """Rows 1-2 of the table: finite but huge feedback never reaches a student."""
    strat = privacygan()
    handle = honest_client({})
    grid = LoopGrid([0, 1, 2], lambda nid, c: scaled_feedback(handle(nid, c), factor) if nid == 1 else handle(nid, c))
    before = {n: state_of(strat, n) for n in (0, 1, 2)}
    record = strat.run_round(grid, 1, [0, 1, 2])
    assert "above run config 'max-feedback-norm' = 1000" in record["dropped_reasons"]["1"]
    assert record["replies"] == 2 and strat.dropped_total == 1 and record["rolled_back"] == []
    assert same_state(state_of(strat, 1), before[1])                       # the attacked student: untouched
    assert not same_state(state_of(strat, 0), before[0]) and not same_state(state_of(strat, 2), before[2])
    G1 = strat.students[1][0]
    assert all(torch.isfinite(p).all() for p in G1.parameters())


@pytest.mark.parametrize("batching", ["off", "on"])
def test_an_update_that_would_break_a_student_is_rolled_back_and_blamed_on_its_sender(batching):
    """With the norm bound opened up, 1e30 feedback passes the checks but would turn the student's
    Adam moments to inf: the update is undone and the reply counted as bad, others go through --
    also when all students step as one vmapped computation (server-batching=on)."""
    strat = privacygan(max_feedback_norm=1e38, server_batching=batching)
    handle = honest_client({})
    grid = LoopGrid([0, 1, 2], lambda nid, c: scaled_feedback(handle(nid, c), 1e30) if nid == 2 else handle(nid, c))
    before = {n: state_of(strat, n) for n in (0, 1, 2)}
    record = strat.run_round(grid, 1, [0, 1, 2])
    assert record["rolled_back"] == [2] and "rolled back" in record["dropped_reasons"]["2"]
    assert record["replies"] == 2 and set(record["dropped_reasons"]) == {"2"}
    assert same_state(state_of(strat, 2), before[2])
    assert not same_state(state_of(strat, 0), before[0]) and not same_state(state_of(strat, 1), before[1])
    # the next round goes on for everyone, honest node 2 included
    grid.handler = handle
    record2 = strat.run_round(grid, 2, [0, 1, 2])
    assert record2["replies"] == 3 and not record2["dropped_reasons"]


def test_privacygan_rounds_with_batched_students_equal_rounds_one_by_one():
    """server-batching=on and =off: three K=2 rounds with the same clients give the same students
    (weights, BatchNorm statistics, Adam state) to 1e-5 and the same per-client losses; "auto"
    records its measurement once and which way it went."""
    runs = {}
    for mode in ("off", "on", "auto"):
        torch.manual_seed(0)
        strat = privacygan(server_batching=mode)
        grid = LoopGrid([0, 1, 2], honest_client({}))
        records = [strat.run_round(grid, rnd, [0, 1, 2]) for rnd in (1, 2, 3)]
        runs[mode] = (strat, records)
    (off, rec_off), (on, rec_on), (auto, rec_auto) = runs["off"], runs["on"], runs["auto"]
    assert [r["server_batching"] for r in rec_off] == ["sequential"] * 3
    assert [r["server_batching"] for r in rec_on] == ["batched"] * 3
    assert "server_batching_timing" in rec_auto[0] and all("server_batching_timing" not in r for r in rec_auto[1:])
    assert rec_auto[0]["server_batching_timing"]["students"] == 3
    for nid in (0, 1, 2):
        for (G1, o1), (G2, o2) in ((off.student(nid), on.student(nid)), (off.student(nid), auto.student(nid))):
            for (k, a), b in zip(G1.state_dict().items(), G2.state_dict().values()):
                assert torch.allclose(a.float(), b.float(), atol=1e-5, rtol=1e-5), k
            for sa, sb in zip(o1.state_dict()["state"].values(), o2.state_dict()["state"].values()):
                assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-5, rtol=1e-5) for k in sa)
    for r1, r2 in zip(rec_off, rec_on):
        for label, c in r1["clients"].items():
            assert abs(c["g_loss"] - r2["clients"][label]["g_loss"]) < 1e-5
            assert abs(c["d_loss"] - r2["clients"][label]["d_loss"]) < 1e-5


def test_an_alpha_schedule_trains_each_round_with_that_rounds_alpha():
    """alpha-final: alpha 0.5 -> 1.0 over 3 rounds is, step for step, the same students as
    rounds run at the constant alphas 0.5, 0.75, 1.0 one after another (and differs from a
    constant 0.5); at alpha 1 the reported generator loss is the local one alone."""
    def run(schedule: bool, alphas):
        torch.manual_seed(0)
        strat = privacygan(alpha=0.5, alpha_final=1.0 if schedule else 0.0, num_rounds=3, server_batching="off")
        grid = LoopGrid([0, 1], honest_client({}))
        records = []
        for rnd, a in zip((1, 2, 3), alphas):
            if not schedule:
                strat.s = dataclasses.replace(strat.s, alpha=a)
            records.append(strat.run_round(grid, rnd, [0, 1]))
        return strat, records

    scheduled, rec = run(True, [None] * 3)
    by_hand, _ = run(False, [0.5, 0.75, 1.0])
    constant, _ = run(False, [0.5, 0.5, 0.5])
    assert [r["alpha"] for r in rec] == [0.5, 0.75, 1.0]
    c = rec[1]["clients"]["client 0"] if "client 0" in rec[1]["clients"] else next(iter(rec[1]["clients"].values()))
    assert c["g_loss"] == pytest.approx(0.75 * c["g_loss_local"] + 0.25 * c["g_loss_teacher"], rel=1e-6)
    assert all(c["g_loss"] == c["g_loss_local"] for c in rec[2]["clients"].values())
    for nid in (0, 1):
        a, b, k = scheduled.student(nid)[0], by_hand.student(nid)[0], constant.student(nid)[0]
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
        assert any(not torch.equal(x, y) for x, y in zip(a.state_dict().values(), k.state_dict().values()))


def test_apply_with_blame_finds_the_reply_that_overflows_and_applies_the_rest_exactly():
    torch.manual_seed(0)
    model = nn.Linear(3, 1, bias=False)
    opt = torch.optim.SGD(model.parameters(), lr=10.0)
    w0 = model.weight.detach().clone()
    grads = {1: torch.tensor([[1.0, 2.0, 3.0]]), 2: torch.full((1, 3), 3e38), 3: torch.tensor([[-1.0, 0.0, 1.0]])}

    def apply(nids):
        opt.zero_grad()
        model.weight.grad = sum(grads[n] for n in nids) / len(nids)
        opt.step()

    assert apply_with_blame(apply, [1, 2, 3], [model], [opt]) == [2]
    assert torch.equal(model.weight.detach(), w0 - 10.0 * (grads[1] + grads[3]) / 2)
    assert guarded_update(lambda: apply([2]), [model], [opt]) is False
    assert torch.equal(model.weight.detach(), w0 - 10.0 * (grads[1] + grads[3]) / 2)


# --------------------------------------------------------------------------------------------
# Node identity
# --------------------------------------------------------------------------------------------
def test_a_later_node_claiming_a_live_nodes_partition_is_kept_apart(caplog):
    book = NodeBook()
    book.identify({10: {"partition_id": 0}, 11: {"partition_id": 1}})
    with caplog.at_level(logging.WARNING, logger="fedgan"):
        book.identify({12: {"partition_id": 0}, 13: {"partition_id": -1}}, live=[10, 11, 12, 13])
    assert book.partition_of == {10: 0, 11: 1}
    assert book.label(12) == "node 12" and book.label(13) == "node 13" and book.label(10) == "client 0"
    assert "claims partition 0, which node 10 holds" in caplog.text and "partition id -1" in caplog.text
    # a node taking over the partition of a node that left is a rejoin
    book.identify({14: {"partition_id": 1}}, live=[10, 14])
    assert book.partition_of[14] == 1


@pytest.mark.parametrize("pids, match", [((0, 0, 1), "all report partition id 0"),
                                         ((0, -1, 1), "report partition id -1")])
def test_a_run_whose_nodes_cannot_be_told_apart_is_refused_before_any_update(pids, match):
    strat = privacygan()
    handle = honest_client({})

    def handler(nid, content):
        reply = handle(nid, content)
        reply[wire.METRICS] = MetricRecord({**dict(reply[wire.METRICS]), "partition_id": pids[nid]})
        return reply

    before = {n: state_of(strat, n) for n in (0, 1, 2)}
    with pytest.raises(RunFailed, match=match):
        strat.run_round(LoopGrid([0, 1, 2], handler), 1, [0, 1, 2])
    assert all(same_state(state_of(strat, n), before[n]) for n in (0, 1, 2))


def test_resume_refuses_two_nodes_claiming_one_partition():
    strat = privacygan()
    strat.restored = {("p", 0): {"g": strat.teacher_g.state_dict(), "opt": {}}}
    grid = LoopGrid([5, 6], lambda nid, c: RecordDict({wire.METRICS: MetricRecord({"partition_id": 0.0})}))
    with pytest.raises(RunFailed, match="all report partition id 0"):
        strat.adopt_restored(grid, [5, 6])


# --------------------------------------------------------------------------------------------
# Validation gaps (row 11)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, match", [
    ({"server-gen-lr": float("inf")}, "'server-gen-lr' = inf: expected a finite number"),
    ({"alpha": "nan"}, "'alpha' = 'nan': expected a finite number"),
    ({"batch-size": ""}, "'batch-size' is empty"),
    ({"round-timeout": None}, "'round-timeout' is empty"),
    ({"dataset": None}, "'dataset' = '' is not allowed"),
    ({"max-feedback-norm": 0}, "'max-feedback-norm' = 0.0 is not allowed"),
])
def test_non_finite_and_empty_values_are_refused_naming_the_key(raw, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(raw)


def test_fedgan_run_names_a_bad_key_before_flower_sees_it(capsys):
    from app.launch import main

    assert main(["--run-config", "alpa=0.8"]) == 2
    assert "unknown run config key 'alpa'" in capsys.readouterr().err
    assert main(["--run-config", "server-gen-lr=inf"]) == 2
    assert "'server-gen-lr' = inf" in capsys.readouterr().err


def cli(*args, timeout=120, **kw):
    return subprocess.run([PY, *args], cwd=PROJECT, capture_output=True, text=True, timeout=timeout, **kw)


def test_clients_below_one_are_refused_by_the_launcher():
    out = cli("simulations/run.py", "--clients", "0")
    assert out.returncode == 2 and "--clients: 0 must be at least 1" in out.stderr


# --------------------------------------------------------------------------------------------
# Files: experiment files, output folders, full disks, corrupt images (rows 5-6, 8-9)
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("make, cause", [
    (lambda d: d / "missing.yaml", "no such file or folder"),
    (lambda d: d, "it is a folder, not a file"),
    (lambda d: (d / "bin.yaml").write_bytes(b"\x89PNG\r\n\x1a\n\xff\xfe\x00") and d / "bin.yaml", "not UTF-8 text"),
    (lambda d: (d / "bad.yaml").write_text("alpha: [0.5\nnum-rounds: 3\n") and d / "bad.yaml", "not valid YAML (line"),
    (lambda d: (d / "list.yaml").write_text("- alpha\n- 0.5\n") and d / "list.yaml", "expected a mapping"),
])
def test_a_bad_experiment_file_is_one_line_naming_the_file(tmp_path, make, cause):
    from simulations.common import read_experiment

    path = make(tmp_path)
    with pytest.raises(ConfigError) as err:
        read_experiment(path)
    text = str(err.value)
    assert text.startswith(f"experiment file {path}: ") and cause in text and "\n" not in text


def test_the_launcher_reports_a_bad_experiment_file_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("alpha: [0.5\n")
    out = cli("simulations/run.py", "--config", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"experiment file {bad}: not valid YAML" in out.stderr


@pytest.mark.parametrize("where, cause", [
    (lambda d: (d / "file").write_text("x") and d / "file" / "out", "a part of the path is a file, not a folder"),
    (lambda d: Path("/proc/1/fedgan-out"), None),
])
def test_an_output_folder_that_cannot_be_written_is_one_line_naming_it(tmp_path, where, cause):
    from app.runs import RunFolderError
    from simulations.common import preflight

    out_dir = where(tmp_path)
    with pytest.raises(RunFolderError) as err:
        preflight(parse_config({"output-dir": str(out_dir)}))
    text = str(err.value)
    assert text.startswith("output folder ") and str(out_dir) in text and "\n" not in text
    if cause:
        assert cause in text


def test_the_launcher_refuses_an_unwritable_output_folder_before_starting(tmp_path):
    (tmp_path / "file").write_text("x")
    out = cli("simulations/run.py", "--output-dir", str(tmp_path / "file" / "out"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines()[-1] == (f"[fedgan] error: output folder {tmp_path / 'file' / 'out'}/runs: "
                                                  "a part of the path is a file, not a folder")


@pytest.fixture
def small_mount(tmp_path):
    """A 700 kB tmpfs (full-disk cases) and a read-only one; skipped where mounting is not allowed."""
    mounts = []

    def mount(name, options):
        target = tmp_path / name
        target.mkdir()
        out = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True)
        if out.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({out.stderr.decode().strip()}); needs root in a container")
        mounts.append(target)
        return target

    yield mount
    for target in mounts:
        subprocess.run(["umount", "-l", str(target)], capture_output=True)


def test_a_read_only_output_folder_is_one_line(small_mount):
    from app.runs import RunFolderError
    from simulations.common import preflight

    ro = small_mount("ro", "ro,size=1m")
    with pytest.raises(RunFolderError, match=r"^output folder .*/ro/runs: read-only file system$"):
        preflight(parse_config({"output-dir": str(ro)}))


def test_a_full_disk_names_the_file_and_the_last_checkpoint_survives(small_mount):
    from app.runs import RunFolder, RunFolderError

    disk = small_mount("full", "size=700k")
    folder = RunFolder.create(disk, "privacygan", "digits", {"a": 1})
    folder.save_checkpoint("server.pt", {"round": 1, "w": torch.zeros(1000)})
    with pytest.raises(RunFolderError) as err:
        folder.save_checkpoint("server.pt", {"round": 2, "w": torch.zeros(400_000)})   # 1.6 MB > 700 kB
    assert str(err.value) == f"cannot write {folder.path / 'checkpoints' / 'server.pt'}: no space left on the device"
    assert folder.load_checkpoint("server.pt")["round"] == 1
    assert not [p for p in (folder.path / "checkpoints").iterdir() if p.name != "server.pt"]   # no temp file left


def write_images(root: Path, n: int, corrupt: int) -> None:
    from PIL import Image

    for i in range(n):
        d = root / ("a" if i % 2 else "b")
        d.mkdir(parents=True, exist_ok=True)
        if i < corrupt:
            (d / f"{i}.png").write_bytes(b"not an image at all")
        else:
            Image.new("RGB", (8, 8), (i * 10 % 255, 0, 0)).save(d / f"{i}.png")


def test_too_many_unreadable_images_stop_the_load_and_a_few_are_reported(tmp_path, capsys):
    from app import data
    from app.config import parse_config as parse
    from app.server_app import _summary

    write_images(tmp_path / "bad", 21, corrupt=9)
    with pytest.raises(data.DataError, match=r"9 of 21 image files .* more than 10% unreadable"):
        data.load_dataset(f"imagefolder:{tmp_path / 'bad'}")
    write_images(tmp_path / "few", 21, corrupt=2)
    ds = data.load_dataset(f"imagefolder:{tmp_path / 'few'}")
    assert len(ds) == 19 and ds.skipped == 2
    assert "2 of 21 image files" in capsys.readouterr().out
    summary = _summary(parse({}), {}, 1.0, status="success")
    assert f"UNREADABLE: 2 of 21 image files of split 'train' under {tmp_path / 'few'}" in summary


# --------------------------------------------------------------------------------------------
# Through Flower's simulation engine: hostile replies, stragglers (rows 1-3, 12)
# --------------------------------------------------------------------------------------------
TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "teacher-steps": 5, "samples-per-client": 4,
        "sample-every": 0, "checkpoint-every": 1, "steps-per-round": 1, "node-wait-timeout": 60.0,
        "client-eval": False}   # the end-of-run report (~7 s a run here) is tested in test_client_eval.py


@pytest.mark.e2e
def test_hostile_replies_are_dropped_and_the_run_succeeds(tmp_path):
    # client-eval off (TINY): the end-of-run report's (good) evaluate replies would identify nodes 1 and 2
    cfg = parse_config({**TINY, "num-rounds": 2, "min-nodes": 3, "max-reply-mb": 1.0,
                        "output-dir": str(tmp_path / "out")})
    folder = simulate(cfg, 3, "hostile_app")
    assert "status: **success**" in (folder.path / "summary.md").read_text()
    rounds = folder.read_jsonl("metrics.jsonl")
    assert [r["replies"] for r in rounds] == [1, 1]
    for r in rounds:
        reasons = sorted(r["dropped_reasons"].values())
        assert any("max-feedback-norm" in why for why in reasons) and any("max-reply-mb" in why for why in reasons)
        assert all(k.startswith("client 0") for k in r["clients"])
    ckpt = folder.load_checkpoint("server.pt")
    teacher = ckpt["teacher_g"]
    parts = ckpt["partition_of"]
    assert sorted(parts.values()) == [0]            # no good reply ever came from nodes 1 and 2
    weights = [k for k in teacher if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    others = [blob["g"] for nid, blob in ckpt["students"].items() if nid not in parts]
    assert len(others) == 2
    for g in others:   # never updated: still the teacher's copy, finite
        assert all(torch.equal(g[k], teacher[k]) for k in weights)
    by_pid = {parts[nid]: blob["g"] for nid, blob in ckpt["students"].items() if nid in parts}
    assert any(not torch.equal(by_pid[0][k], teacher[k]) for k in teacher)


@pytest.mark.e2e
def test_a_straggler_does_not_stall_the_others_and_a_node_slow_once_comes_back(tmp_path):
    """Row 3. From the round after the first one in which all three nodes answered (round 1,
    unless the workers' start-up outlasts the timeout: tests/e2e_mods.py, slow) node 1 stops
    answering in time (it sleeps until the run has ended) and node 2 is late once, by 4 s."""
    out_dir = tmp_path / "out"
    timeout = 40.0   # the mod reads it from the run config; the workers' start-up took 20-26 s in the
    # whole suite on the CI machine (~10 s alone), the rounds after it ~1 s
    cfg = parse_config({**TINY, "num-rounds": 12, "min-nodes": 3, "round-timeout": timeout,
                        "output-dir": str(out_dir)})
    folder = simulate(cfg, 3, "slow_app", spread=True)
    assert "status: **success**" in (folder.path / "summary.md").read_text()
    rounds = folder.read_jsonl("metrics.jsonl")
    assert len(rounds) == 12
    label = lambda r, p: [k for k in r["clients"] if k.startswith(f"client {p}")]  # noqa: E731
    full = [i for i, r in enumerate(rounds) if all(label(r, p) for p in range(3))]
    assert full and full[0] <= 3, [sorted(r["clients"]) for r in rounds]       # start-up over by round 4
    warm, after = rounds[full[0]:], rounds[full[0] + 1:]
    assert all(label(r, 0) for r in warm)                                          # healthy: every round
    assert not any(label(r, 1) for r in after)                                     # the straggler: dropped
    assert not label(after[0], 2) and label(rounds[-1], 2)                         # late once: back
    reasons = lambda rs: [why for r in rs for why in r["dropped_reasons"].values()]  # noqa: E731
    assert sum(f"no reply within {timeout:.0f} s" in w for w in reasons(after[:1])) == 2   # its first round only
    assert not any("no reply within" in w for w in reasons(after[1:]))
    assert sum("still busy" in w for w in reasons(after[1:])) >= len(after) - 1     # never re-sent
    assert any(r["late_replies"] for r in after)                                   # node 2's, discarded
    assert [r["round_time"] < timeout for r in warm].count(False) == 1             # one slow round only


# --------------------------------------------------------------------------------------------
# Ctrl-C / SIGTERM, then resume (row 4), and resumes that do not fit (row 7)
# --------------------------------------------------------------------------------------------
def descendants(pid: int) -> set[int]:
    try:
        return {c.pid for c in psutil.Process(pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return set()


def alive(pid: int) -> bool:
    return process_alive(pid)


def start_run(out_dir: Path, *extra: str) -> subprocess.Popen:
    sets = [a for k, v in {**TINY, "checkpoint-every": 1}.items() for a in ("--set", f"{k}={v}")]
    return subprocess.Popen([PY, "simulations/run.py", "--clients", "2", "--output-dir", str(out_dir), *sets, *extra],
                            cwd=PROJECT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=tagged_env(str(out_dir)))


def wait_for_rounds(out_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = run_folders(out_dir)
        if runs and (runs[0] / "metrics.jsonl").is_file() and \
                len((runs[0] / "metrics.jsonl").read_text().splitlines()) >= n:
            return runs[0]
        assert proc.poll() is None, proc.stdout.read()
        time.sleep(0.5)
    raise AssertionError(f"no {n} rounds within {timeout} s")


@pytest.mark.e2e
@pytest.mark.parametrize("sig, to_group", [(signal.SIGINT, True), (signal.SIGTERM, False)])
def test_a_signal_stops_the_run_within_seconds_leaves_nothing_running_and_it_resumes(tmp_path, sig, to_group):
    out_dir = tmp_path / "out"
    proc = start_run(out_dir, "--rounds", "400")
    run = wait_for_rounds(out_dir, proc, 3)
    family = descendants(proc.pid) | simulation_processes(psutil.Process(proc.pid).create_time(), tag=str(out_dir))
    assert any("flower-superlink" in _cmdline(p) for p in family)   # the tag reaches the detached SuperLink
    assert any("raylet" in _cmdline(p) for p in family)             # ... and the Ray cluster it runs on
    sent = time.monotonic()
    if to_group:
        os.killpg(proc.pid, sig)          # what Ctrl-C in a terminal does
    else:
        os.kill(proc.pid, sig)            # what a process manager does
    output, _ = proc.communicate(timeout=60)
    stopped_in = time.monotonic() - sent
    assert proc.returncode == 130, output
    assert stopped_in < 20, f"took {stopped_in:.1f} s to stop"
    summary = (run / "summary.md").read_text()
    assert "status: **interrupted**" in summary and "resume with --set resume=" in summary
    done = torch.load(run / "checkpoints" / "server.pt", weights_only=False)["round"]
    assert f"last checkpoint: round {done}" in summary and "Traceback" not in output
    deadline = time.monotonic() + 20          # Ray's workers exit shortly after the driver, the SuperLink with the script
    while [p for p in family if alive(p)] and time.monotonic() < deadline:
        time.sleep(0.5)
    left = [(p, _cmdline(p)[:80]) for p in family if alive(p)]
    assert not left, f"processes left behind: {left}"
    if sig != signal.SIGINT:
        return
    # resume to the end; the rounds after the checkpoint are redone, none is lost or doubled
    resumed = start_run(out_dir, "--set", f"resume={run}", "--rounds", str(done + 2))
    output, _ = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, output
    assert "status: **success**" in (run / "summary.md").read_text()
    rounds = [json.loads(line)["round"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rounds == list(range(1, done + 3))
    # resuming a finished run, or one whose checkpoint does not fit, changes no file
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = cli("simulations/run.py", "--set", f"resume={run}", "--rounds", "1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert f"the run in {run} has already done {done + 2} round(s)" in out.stderr
    original = (run / "config.json").read_bytes()
    (run / "config.json").write_text(json.dumps({**json.loads(original), "gen-features": 16}))
    out = cli("simulations/run.py", "--set", f"resume={run}", "--rounds", str(done + 5))
    assert out.returncode == 1 and "does not fit the run's config" in out.stderr and "Traceback" not in out.stderr
    (run / "config.json").write_bytes(original)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_too_few_replies_at_scale_names_the_limit_and_what_to_change():
    """1,000 nodes of which 990 did not answer within round-timeout: one readable line with three
    examples, the count of the rest, and the keys to change (not a thousand reasons)."""
    from strategies.base import Exchange, require_replies

    ex = Exchange(replies={n: None for n in range(10)},
                  dropped={n: "no reply within 300 s (it gets no new message until it answers)" for n in range(10, 1000)})
    with pytest.raises(RunFailed) as err:
        require_replies(4, ex, 1000)
    msg = str(err.value)
    assert msg.startswith("round 4: 10 good repl(ies), run config 'min-replies' asks for 1000 (node 10: no reply")
    assert "and 987 more" in msg and msg.count("node ") == 3
    assert "990 node(s) did not answer in time: raise run config 'round-timeout'" in msg and "'min-replies'" in msg
    ex_bad = Exchange(replies={}, dropped={1: "labels not finite"})
    with pytest.raises(RunFailed) as err:
        require_replies(1, ex_bad, 1)
    assert "round-timeout" not in str(err.value)     # no timing hint for a bad reply


def test_workers_killed_by_rays_memory_monitor_name_the_limit_and_what_to_change():
    from strategies.base import Exchange, require_replies

    oom = ("error reply (code 0: unknown): <class 'ray.exceptions.OutOfMemoryError'>:<'1 worker(s) were killed "
           "due to the node running low on memory. ... exceeds the memory usage threshold of 0.950000")
    ex = Exchange(replies={1: None}, dropped={2: oom, 3: oom, 4: "labels not finite"})
    with pytest.raises(RunFailed) as err:
        require_replies(2, ex, 2)
    msg = str(err.value)
    assert msg.startswith("round 2: 1 good repl(ies), run config 'min-replies' asks for 2 (node 2: error reply")
    assert "2 node(s) lost their worker to Ray's memory monitor" in msg and "RAY_memory_usage_threshold" in msg
    assert "FEDGAN_RAY_CPUS" in msg and "'min-replies'" in msg and "round-timeout" not in msg


@pytest.mark.e2e
def test_a_run_whose_actors_ray_kills_for_memory_fails_saying_which_limit_and_what_to_change(tmp_path, monkeypatch):
    """Ray's memory monitor provoked for real: a threshold of 2 % of the machine's memory (always
    passed) makes Ray kill every ClientApp worker; the run fails at round 1 naming the limit."""
    monkeypatch.setenv("RAY_memory_usage_threshold", "0.02")
    monkeypatch.setenv("RAY_memory_monitor_refresh_ms", "50")
    cfg = parse_config({**TINY, "strategy": "fedavg", "num-rounds": 2, "local-steps": 1, "min-nodes": 2,
                        "round-timeout": 60.0, "output-dir": str(tmp_path / "out")})
    with pytest.raises(RunFailed, match="lost their worker to Ray's memory monitor") as err:
        simulate(cfg, 2)
    assert "OutOfMemoryError" in str(err.value) and "FEDGAN_RAY_CPUS" in str(err.value)
    (run,) = (tmp_path / "out" / "runs").iterdir()
    summary = (run / "summary.md").read_text()
    assert "status: **failed**" in summary and "Ray's memory monitor" in summary


def test_max_in_flight_keeps_that_many_messages_unanswered_and_gets_every_reply():
    """max-in-flight = 2 over 5 nodes: never more than 2 messages pushed and not yet pulled, every
    node answered and booked; with a node that never answers and a short timeout, the nodes still
    queued behind the window are dropped as not sent, and nothing is booked for them."""
    from strategies.base import set_max_in_flight

    class CountingGrid(LoopGrid):
        def __init__(self, *a):
            super().__init__(*a)
            self.out, self.most = 0, 0

        def push_messages(self, messages):
            self.out += len(messages)
            self.most = max(self.most, self.out)
            return super().push_messages(messages)

        def pull_messages(self, ids):
            got = super().pull_messages(ids)
            self.out -= len(got)
            return got

    handler = lambda nid, c: RecordDict({wire.METRICS: MetricRecord({"n": float(nid)})})  # noqa: E731
    parse = lambda nid, r: wire.metrics_of(r.content)  # noqa: E731
    set_max_in_flight(2)
    try:
        grid = CountingGrid([1, 2, 3, 4, 5], handler)
        ex = exchange(grid, {n: info(n) for n in (1, 2, 3, 4, 5)}, timeout=5, parse=parse, poll=0.01)
        assert set(ex.replies) == {1, 2, 3, 4, 5} and not ex.dropped and grid.most == 2
        assert set(ex.bytes_down) == {1, 2, 3, 4, 5}
        grid = CountingGrid([6, 7, 8, 9], handler)
        grid.hold = {6, 7}                       # the first two never answer: the window stays full
        ex = exchange(grid, {n: info(n) for n in (6, 7, 8, 9)}, timeout=0.2, parse=parse, poll=0.01)
        assert "no reply within" in ex.dropped[6] and "no reply within" in ex.dropped[7]
        assert "not sent: round-timeout" in ex.dropped[8] and "'max-in-flight' = 2" in ex.dropped[9]
        assert set(ex.bytes_down) == {6, 7} and grid.sent == [6, 7]
    finally:
        set_max_in_flight(0)


def test_poll_interval_sets_how_often_the_server_pulls_while_it_waits():
    """Run config poll-interval: a node that never answers within a 0.3 s round is pulled for about
    every poll-interval seconds (many pulls at 0.02 s, a few at 0.15 s); 0 restores 0.1 s; a negative
    value stops the run naming the key."""
    from app.config import ConfigError, parse_config
    from strategies import base
    from strategies.base import set_poll_interval

    class PullCountingGrid(LoopGrid):
        pulls = 0

        def pull_messages(self, ids):
            self.pulls += 1
            return super().pull_messages(ids)

    handler = lambda nid, c: RecordDict({wire.METRICS: MetricRecord({"n": float(nid)})})  # noqa: E731
    counts = {}
    try:
        for seconds in (0.02, 0.15):
            set_poll_interval(seconds)
            grid = PullCountingGrid([1], handler)
            grid.hold = {1}
            ex = exchange(grid, {1: info(1)}, timeout=0.3, parse=lambda nid, r: wire.metrics_of(r.content))
            assert "no reply within" in ex.dropped[1]
            counts[seconds] = grid.pulls
        assert counts[0.02] >= 3 * counts[0.15] and counts[0.15] <= 4, counts
        set_poll_interval(0)
        assert base.POLL_INTERVAL == 0.1
    finally:
        set_poll_interval(0)
    with pytest.raises(ConfigError, match=r"'poll-interval' = -1"):
        parse_config({"poll-interval": -1})
