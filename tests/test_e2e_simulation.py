"""End to end through Flower's simulation engine: privacy of every message, teacher
frozen, D_i state kept on its client, bytes logged, bad replies survived."""


import json

import pytest
import torch

from app.config import parse_config
from app.data import client_dataset
from app.runs import RunFolder
from strategies import client_eval, cohort, wire
from strategies.base import TRACE_ENV
from strategies.base import RunFailed

from e2e_mods import read_kept, simulate

pytestmark = pytest.mark.e2e

TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "teacher-steps": 5, "samples-per-client": 4,
        "sample-every": 1, "checkpoint-every": 1, "round-timeout": 120.0, "node-wait-timeout": 60.0}


def test_messages_carry_only_fakes_labels_feedback_config_and_metrics(tmp_path, capsys):
    taps = tmp_path / "taps"
    taps.mkdir()
    # no digits classifier in this evaluator folder: the end-of-run report trains one (seconds) and caches it
    cfg = parse_config({**TINY, "num-rounds": 2, "steps-per-round": 2, "fakes-dtype": "float16",
                        "output-dir": str(tmp_path / "out"), "min-nodes": 3, "eval-samples": 64,
                        "evaluator-dir": str(tmp_path / "evaluators")})
    run = simulate(cfg, 3, "tap_app")
    records = read_kept(taps)
    reports = [r for r in records if r["type"] == client_eval.EVAL_FAKES]
    records = [r for r in records if r["type"] != client_eval.EVAL_FAKES]
    assert len(records) == 3 * 2  # 3 clients x 2 rounds, every one tapped
    check_end_of_run_report(run, cfg, reports, capsys.readouterr().out)
    K, B, shape = 2, 8, (1, 16, 16)
    for r in records:
        assert r["error"] is None
        assert r["type"] == wire.DISCRIMINATE
        # --- what goes down: fakes and per-round settings only ---
        assert set(r["down"]) == {wire.FAKES, wire.CONFIG}
        assert set(r["down"][wire.FAKES]) == {wire.FAKES}
        # --- what comes up: labels, feedback, scalar metrics only ---
        assert set(r["up"]) == {wire.REPLY, wire.METRICS}
        assert set(r["up"][wire.REPLY]) == {wire.LABELS, wire.FEEDBACK}
        assert set(r["up"][wire.METRICS]) <= {"d_loss", "d_real_acc", "d_fake_acc", "d_steps_total", "d_fresh",
                                              "partition_id"}
        assert r["up"][wire.REPLY][wire.LABELS].shape == (K, B)
        assert r["up"][wire.REPLY][wire.FEEDBACK].shape == (K, B, *shape)
        # --- no array is, or is shaped like, a batch of this client's real data ---
        real = client_dataset(cfg.data_spec(), r["partition"], 3).x.reshape(-1, 256)
        for direction in ("down", "up"):
            for rec in r[direction].values():
                for t in rec.values():
                    if not isinstance(t, torch.Tensor):
                        continue
                    assert not (t.dim() == 4 and tuple(t.shape[1:]) == shape)
                    flat = t.float().reshape(-1, 256) if t.numel() % 256 == 0 else None
                    if flat is not None:
                        dist = torch.cdist(flat, real).min()
                        assert dist > 1e-3, "an array equals a real sample"
    # D_i's state stays and grows on its client: K steps per round, counted there
    metrics = run.read_jsonl("metrics.jsonl")
    assert [sorted(c["d_steps_total"] for c in m["clients"].values()) for m in metrics] == [[2, 2, 2], [4, 4, 4]]
    # the teacher never changes after the teacher phase
    teacher = run.load_checkpoint("teacher.pt")
    server = run.load_checkpoint("server.pt")
    for part in ("g", "d"):
        for k, v in teacher[part].items():
            assert torch.equal(v, server[f"teacher_{part}"][k]), (part, k)
    # bytes logged per client and round equal hand arithmetic (float16 fakes, float32 feedback)
    n = K * B * 256
    down = 128 + n * 2 + len("fakes") + (5 + 8) + (4 + 3) + (11 + 7) + (14 + 7) + (17 + 8)
    up = (128 + K * B * 4 + 6) + (128 + n * 4 + 8) + sum(8 + len(k) for k in
                                                        ["d_loss", "d_real_acc", "d_fake_acc", "d_steps_total",
                                                         "d_fresh", "partition_id"])
    comm = [row for row in run.read_jsonl("comm.jsonl") if row.get("phase") != "eval"]   # the report is apart
    assert len(comm) == 6 and all(row["down"] == down and row["up"] == up for row in comm)
    assert sorted(row["partition"] for row in comm) == [0, 0, 1, 1, 2, 2]
    assert "status: **success**" in (run.path / "summary.md").read_text()
    assert len(list((run.path / "samples").glob("*.png"))) == 2
    # the server's generators are in the run folder for fedgan-sample: the teacher and every student
    from app.generators import list_generators
    assert list(list_generators(run.path)) == ["student0", "student1", "student2", "teacher"]


def test_cohorts_carry_several_clients_per_supernode_with_the_same_messages_and_bytes_per_client(tmp_path, capsys,
                                                                                                  monkeypatch):
    """cohort-size = 2: 4 virtual clients on 2 SuperNodes, their D steps batched (cohort-batching, the
    default). What crosses the wire is one message per node and round, holding each client's own
    records (``c<j>/<name>``); each client handles its fakes with its own partition and D_i, sends
    exactly what a client on a node of its own sends, and is charged the same bytes; the end-of-run
    report reaches every client through its cohort too."""
    (tmp_path / "taps").mkdir()
    cfg = parse_config({**TINY, "num-rounds": 2, "steps-per-round": 2, "fakes-dtype": "float16", "cohort-size": 2,
                        "output-dir": str(tmp_path / "out"), "min-nodes": 4, "eval-samples": 64,
                        "evaluator-dir": str(tmp_path / "evaluators")})
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace.jsonl"))
    run = simulate(cfg, 4, "tap_app")
    records = read_kept(tmp_path / "taps")   # the tap sees each message as it crosses the wire
    handled = [json.loads(line) for line in (tmp_path / "trace.jsonl").read_text().splitlines()]
    handled = [t for t in handled if t.get("side") == "cohort"]
    assert len(handled) == 4 and all(t["batched"] and t["clients"] == 2 for t in handled)   # D steps at once

    def clients_of(r, kind):
        """partition ids of the clients a merged message carried (from their own metrics replies)."""
        assert r["error"] is None and r["down"][cohort.COHORT]["size"] == 2
        down = {f"c{j}/{name}" for j in (0, 1) for name in kind[0]}
        up = {f"c{j}/{name}" for j in (0, 1) for name in kind[1]}
        assert set(r["down"]) == down | {cohort.COHORT} and set(r["up"]) == up | {cohort.COHORT}
        return sorted(int(r["up"][f"c{j}/{wire.METRICS}"]["partition_id"]) for j in (0, 1))

    train = [r for r in records if r["type"] == wire.DISCRIMINATE]
    assert len(train) == 4                                            # 2 rounds x 2 SuperNodes
    nodes = {}
    for r in train:
        pids = clients_of(r, ({wire.FAKES, wire.CONFIG}, {wire.REPLY, wire.METRICS}))
        assert pids == [2 * r["partition"], 2 * r["partition"] + 1]   # node p carries clients 2p and 2p + 1
        nodes.setdefault(r["node"], set()).update(pids)
    assert sorted(map(sorted, nodes.values())) == [[0, 1], [2, 3]]   # two SuperNodes, a cohort of two each
    reports = [r for r in records if r["type"] == client_eval.EVAL_FAKES]
    assert sorted(p for r in reports for p in clients_of(r, ({wire.FAKES, wire.CONFIG}, {wire.METRICS}))) \
        == [0, 1, 2, 3]
    metrics = run.read_jsonl("metrics.jsonl")
    assert [sorted(c["d_steps_total"] for c in m["clients"].values()) for m in metrics] == [[2] * 4, [4] * 4]
    # per client and round, the hand arithmetic of a client on a node of its own
    n = 2 * 8 * 256
    down = 128 + n * 2 + len("fakes") + (5 + 8) + (4 + 3) + (11 + 7) + (14 + 7) + (17 + 8)
    up = (128 + 2 * 8 * 4 + 6) + (128 + n * 4 + 8) + sum(8 + len(k) for k in
                                                        ["d_loss", "d_real_acc", "d_fake_acc", "d_steps_total",
                                                         "d_fresh", "partition_id"])
    comm = [row for row in run.read_jsonl("comm.jsonl") if row.get("phase") != "eval"]
    assert len(comm) == 8 and all(row["down"] == down and row["up"] == up for row in comm)
    assert sorted(row["partition"] for row in comm) == [0, 0, 1, 1, 2, 2, 3, 3]
    assert "status: **success**" in (run.path / "summary.md").read_text()
    assert "client 3 (classes 6,7)" in capsys.readouterr().out


def check_end_of_run_report(run, cfg, reports, output):
    """The end-of-run report of the embedded default (PrivacyGAN, digits by class, client-eval on,
    eval-every 0): each client got samples of its own student once, at the last round, labelled them
    on its side and sent back scalars only; summary.md and the console show one row per client with
    exactly the numbers the clients sent."""
    assert len(reports) == 3 and {r["partition"] for r in reports} == {0, 1, 2}
    assert (run.path.parent.parent.parent / "evaluators" / "classifier-digits-16px-1ch.pt").is_file()
    sent = {}
    for r in reports:
        assert r["error"] is None, r["error"]
        assert set(r["down"]) == {wire.FAKES, wire.CONFIG} and r["down"][wire.CONFIG]["round"] == cfg.num_rounds
        assert tuple(r["down"][wire.FAKES][wire.FAKES].shape) == (cfg.eval_samples, 1, 16, 16)
        assert set(r["up"]) == {wire.METRICS} and set(r["up"][wire.METRICS]) <= client_eval.ALLOWED
        up = r["up"][wire.METRICS]
        own = client_dataset(cfg.data_spec(), r["partition"], 3).label_histogram().tolist()
        assert up[client_eval.OWN_SHARE] == pytest.approx(client_eval.own_class_share(up["label_histogram"], own))
        assert up["tv_own"] == pytest.approx(client_eval.tv_distance(up["label_histogram"], own))
        sent[r["partition"]] = up
    summary = (run.path / "summary.md").read_text()
    assert "## End-of-run report: each client's generator, scored on the client" in summary
    rows = [line for line in summary.splitlines() if line.startswith("| client ") and not line.startswith("| client |")]
    assert len(rows) == 3
    for pid, label in enumerate(["client 0 (classes 0,1)", "client 1 (classes 2,3)", "client 2 (classes 4,5)"]):
        (row,) = [line for line in rows if line.startswith(f"| {label} |")]
        share, tv = row.split(" | ")[1:3]
        assert (share, tv) == (f"{sent[pid]['own_share']:.3f}", f"{sent[pid]['tv_own']:.3f}")
        assert (f"{label}: own-class share {sent[pid]['own_share']:.2f}, TV to own labels "
                f"{sent[pid]['tv_own']:.3f}") in output
    assert "end-of-run report, scored on each client" in output


def test_bad_replies_are_dropped_with_a_reason_and_the_round_completes(tmp_path):
    cfg = parse_config({**TINY, "num-rounds": 2, "steps-per-round": 1, "output-dir": str(tmp_path / "out"),
                        "min-nodes": 5, "min-replies": 1, "client-eval": False})   # training replies only
    run = simulate(cfg, 5, "corrupt_app")
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    for m in metrics:
        assert m["replies"] == 1 and m["dropped"] == 4
        assert list(m["clients"]) == ["client 4 (classes 8,9)"]
        reasons = " | ".join(m["dropped_reasons"].values())
        for needle in ("shape", "NaN", "missing array 'reply.labels'", "error reply (code 2", "simulated client crash"):
            assert needle in reasons, (needle, reasons)
    log = (run.path / "log.txt").read_text()
    assert log.count("dropping node") == 8
    assert "status: **success**" in (run.path / "summary.md").read_text()


def test_too_few_good_replies_fail_the_run_with_a_clear_message(tmp_path):
    cfg = parse_config({**TINY, "num-rounds": 2, "output-dir": str(tmp_path / "out"), "min-nodes": 5,
                        "min-replies": 2})
    with pytest.raises(RunFailed, match="min-replies"):
        simulate(cfg, 5, "corrupt_app")
    run = RunFolder.open(next((tmp_path / "out" / "runs").iterdir()))
    summary = (run.path / "summary.md").read_text()
    assert "status: **failed**" in summary
    assert "round 1: 1 good repl(ies), run config 'min-replies' asks for 2" in summary
