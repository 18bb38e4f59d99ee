"""Per-client evaluation through Flower's simulation engine: only fakes (or a seed) go
down, only scalars and the fakes' label histogram come up, and the scores are the ones
the client's own data gives."""

from pathlib import Path

import pytest
import torch
from flwr.app import MetricRecord, RecordDict

from app.config import parse_config
from app.data import client_dataset, test_dataset
from app.metrics import ImageEvaluator, embed, load_feature_net
from simulations import train_evaluator
from strategies import client_eval, wire
from strategies.wire import BadReply

from e2e_mods import read_kept, simulate

TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "teacher-steps": 3, "samples-per-client": 4,
        "sample-every": 0, "checkpoint-every": 0, "round-timeout": 120.0, "node-wait-timeout": 60.0,
        "num-rounds": 2, "eval-every": 1, "eval-samples": 48, "local-steps": 2, "partition": "classes"}


@pytest.fixture(scope="module")
def evaluators(tmp_path_factory):
    """A digits classifier trained by the project's own script (2 quick epochs: a test fixture,
    not an evaluator to report numbers with)."""
    folder = tmp_path_factory.mktemp("evaluators")
    rc = train_evaluator.main(["--dataset", "digits", "--epochs", "2", "--width", "4", "--min-accuracy", "0",
                               "--evaluator-dir", str(folder)])
    assert rc == 0 and (folder / "classifier-digits-16px-1ch.pt").is_file()
    return folder


def run_with_tap(cfg, num_clients, taps):
    """The run (its RunFolder) and what each client received and sent (tests/e2e_mods.py: eval_tap)."""
    run = simulate(cfg, num_clients, "eval_tap_app")
    assert Path(taps) == Path(cfg.output_dir).parent / "taps"
    return run, read_kept(taps)


def check_eval_replies(seen, message_type, cfg):
    evals = [r for r in seen if r["type"] == message_type]
    assert len(evals) == 2 * cfg.num_rounds, [r["type"] for r in seen]   # 2 clients, every round
    for r in evals:
        assert r["error"] is None, r["error"]
        assert r["up_arrays"] == set()                                   # nothing but scalars comes up
        assert set(r["up_metrics"]) <= client_eval.ALLOWED
        assert set(client_eval.SCALARS) <= set(r["up_metrics"])
        hist = r["up_metrics"][client_eval.HISTOGRAM]
        assert len(hist) == 10 and sum(hist) == cfg.eval_samples          # the fakes' labels, one per fake
    return evals


@pytest.mark.e2e
def test_privacygan_clients_score_the_fakes_they_are_sent_against_their_own_data(tmp_path, evaluators):
    cfg = parse_config({**TINY, "strategy": "privacygan", "evaluator-dir": str(evaluators),
                        "output-dir": str(tmp_path / "out"), "sample-every": 1, "checkpoint-every": 1})
    (tmp_path / "taps").mkdir()
    run, seen = run_with_tap(cfg, 2, tmp_path / "taps")
    # the frozen teacher stays frozen through evaluation, sample grids and checkpoints: weights and
    # BatchNorm buffers in server.pt are bit-identical to teacher.pt written after the teacher phase
    teacher, server = run.load_checkpoint("teacher.pt"), run.load_checkpoint("server.pt")
    for part in ("g", "d"):
        assert teacher[part].keys() == server[f"teacher_{part}"].keys()
        for k, v in teacher[part].items():
            assert torch.equal(v, server[f"teacher_{part}"][k]), (part, k)
    assert any("running_mean" in k for k in teacher["g"])
    evals = check_eval_replies(seen, client_eval.EVAL_FAKES, cfg)
    for r in evals:   # only the fakes (8-bit) travel down
        assert set(r["down_arrays"]) == {"fakes.fakes"}
        assert r["down_arrays"]["fakes.fakes"].dtype == torch.uint8
        assert tuple(r["down_arrays"]["fakes.fakes"].shape) == (cfg.eval_samples, 1, 16, 16)

    # the client's FID is what its own data gives for exactly those fakes
    r = evals[0]
    net = load_feature_net("classifier", dataset="digits", image_size=16, channels=1, evaluator_dir=str(evaluators))
    own = client_dataset(cfg.data_spec(), r["partition"], 2)
    ev = ImageEvaluator(net, tv_name="tv_own")
    ev.set_real(own.x, own.y, 10)
    expected = ev.score(wire.decode_fakes(r["down_arrays"]["fakes.fakes"], "uint8"))
    assert r["up_metrics"]["fid"] == pytest.approx(expected["fid"], rel=1e-9)
    assert r["up_metrics"]["tv_own"] == pytest.approx(expected["tv_own"], rel=1e-9)
    assert r["up_metrics"]["num_real"] == len(own)

    # metrics.jsonl: per-client scores every round, server-side FID vs the test set, tv_global added by the server
    records = run.read_jsonl("metrics.jsonl")
    glob = test_dataset(cfg.data_spec()).label_histogram()
    for rec in records:
        assert set(rec["client_eval"]) == {"client 0 (classes 0,1)", "client 1 (classes 2,3)"}
        for label, scores in rec["client_eval"].items():
            assert scores["tv_global"] == pytest.approx(client_eval.tv_distance(scores["label_histogram"], glob))
        assert rec["fid_mean"] == pytest.approx(sum(s["fid"] for s in rec["client_eval"].values()) / 2)
        assert set(rec["eval"]) == {"teacher", "client 0 (classes 0,1)", "client 1 (classes 2,3)"}
        assert rec["eval"]["teacher"]["extractor"] == "classifier"
        assert rec["eval"]["teacher"]["num_samples"] == cfg.eval_samples
        assert rec["eval"]["teacher"]["num_real"] == int(glob.sum())
    # evaluation traffic is logged apart from the training bytes
    comm = run.read_jsonl("comm.jsonl")
    eval_rows = [c for c in comm if c.get("phase") == "eval"]
    assert {c["action"] for c in eval_rows} == {client_eval.EVAL_FAKES} and len(eval_rows) == 4
    train_rows = [c for c in comm if "phase" not in c]
    assert sum(c["down"] for c in train_rows) == sum(rec["bytes_down"] for rec in records)


@pytest.mark.e2e
def test_local_clients_draw_and_score_their_own_fakes_and_send_only_scalars(tmp_path, evaluators):
    cfg = parse_config({**TINY, "strategy": "local", "evaluator-dir": str(evaluators),
                        "output-dir": str(tmp_path / "out")})
    (tmp_path / "taps").mkdir()
    run, seen = run_with_tap(cfg, 2, tmp_path / "taps")
    for r in check_eval_replies(seen, client_eval.EVAL_ALONE, cfg):
        assert r["down_arrays"] == {}                                   # G_i is on the client: no tensor goes down
    records = run.read_jsonl("metrics.jsonl")
    assert all(len(rec["client_eval"]) == 2 and "fid_mean" in rec for rec in records)
    # the server-side score (same seed, samples fetched for the benchmark) covers both clients' generators
    assert all(len(rec["eval"]) == 2 and rec["eval"][k]["extractor"] == "classifier"
               for rec in records for k in rec["eval"])


def test_bad_evaluate_replies_are_refused_with_a_reason():
    good = {"fid": 1.0, "kid": 0.1, "kid_std": 0.01, "tv_own": 0.2, "num_fake": 4, "num_real": 9,
            client_eval.HISTOGRAM: [1, 3]}
    assert client_eval.parse_scores(RecordDict({wire.METRICS: MetricRecord(good)}), 2)["fid"] == 1.0
    for bad, why in [({**good, "fid": float("nan")}, "not finite"), ({**good, "real_mean": 0.5}, "unexpected"),
                     ({k: v for k, v in good.items() if k != "kid"}, "missing metric 'kid'"),
                     ({**good, client_eval.HISTOGRAM: [1, 2, 1]}, "expected 2")]:
        with pytest.raises(BadReply, match=why):
            client_eval.parse_scores(RecordDict({wire.METRICS: MetricRecord(bad)}), 2)
    with_array = RecordDict({wire.METRICS: MetricRecord(good), "x": wire.tensor_record(x=torch.zeros(2))})
    with pytest.raises(BadReply, match="only scalars"):
        client_eval.parse_scores(with_array, 2)


def test_own_class_share_counts_the_fakes_in_the_classes_the_client_holds():
    own = [30, 0, 0, 10, 0]                        # the client holds classes 0 and 3
    assert client_eval.own_class_share([5, 1, 2, 2, 0], own) == pytest.approx(0.7)
    assert client_eval.own_class_share([0, 4, 4, 0, 2], own) == 0.0
    with pytest.raises(ValueError, match="same length"):
        client_eval.own_class_share([1, 2], own)
    good = {"fid": 1.0, "kid": 0.1, "kid_std": 0.01, "tv_own": 0.2, "num_fake": 4, "num_real": 9,
            client_eval.HISTOGRAM: [1, 3]}
    parsed = client_eval.parse_scores(RecordDict({wire.METRICS: MetricRecord({**good, "own_share": 0.75})}), 2)
    assert parsed["own_share"] == 0.75
    assert "own_share" not in client_eval.parse_scores(RecordDict({wire.METRICS: MetricRecord(good)}), 2)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(BadReply, match="own_share"):
            client_eval.parse_scores(RecordDict({wire.METRICS: MetricRecord({**good, "own_share": bad})}), 2)


def test_the_end_of_run_report_is_on_by_default_for_image_runs_with_a_classifier(tmp_path):
    from app.metrics import classifier_path, ensure_classifier
    from app.server_app import client_eval_enabled, end_report_console, end_report_markdown

    ev = str(tmp_path / "ev")
    cfg = parse_config({"evaluator-dir": ev})                    # the embedded default: eval-every = 0
    assert not client_eval_enabled(cfg)                          # no classifier yet (run() trains the digits one)
    path = classifier_path("digits", 16, 1, ev)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"stand-in")
    assert client_eval_enabled(cfg) and client_eval_enabled(cfg.replace(strategy="local"))
    assert not client_eval_enabled(cfg.replace(client_eval=False))
    assert not client_eval_enabled(cfg.replace(strategy="mggan"))
    assert not client_eval_enabled(cfg.replace(dataset="ring", model="mlp"))
    assert not client_eval_enabled(cfg.replace(eval_extractor="inception"))
    assert ensure_classifier("cifar10", 32, 3, ev) is None       # only the digits classifier trains itself
    result = {"client_eval": {f"client {i} (classes {2 * i},{2 * i + 1})": {
        "own_share": 0.9 + i / 100, "tv_own": 0.1, "tv_global": 0.8, "fid": 5.0, "kid": 0.01, "num_fake": 2500,
        "num_real": 144} for i in range(3)}}
    rows = [line for line in end_report_markdown(result) if line.startswith("| client ") and "own-class" not in line]
    assert rows == [f"| client {i} (classes {2 * i},{2 * i + 1}) | {0.9 + i / 100:.3f} | 0.100 | 0.800 | 5.00 | "
                    f"0.0100 | 2,500 / 144 |" for i in range(3)]
    assert end_report_console(result)[1] == "  client 0 (classes 0,1): own-class share 0.90, TV to own labels 0.100"
    assert end_report_markdown({}) == [] and end_report_console({"client_eval": {}}) == []


def test_the_d_filter_diagnostic_scores_the_samples_d_rates_highest(evaluators, monkeypatch):
    """FEDGAN_DIAG_D_FILTER (issue #17): own-class share and FID of the fakes D rates most real.
    Here the "fakes" are real test digits, half of the client's own classes, and D scores a
    sample by whether the classifier calls it one of them: keeping D's top half must then raise
    the share from about the overall mix to about 1."""
    from app.client_app import D_FILTER_ENV, d_filter_fractions, d_filtered_scores, own_data_evaluator

    cfg = parse_config({**TINY, "evaluator-dir": str(evaluators)})
    own = client_dataset(cfg.data_spec(), 0, 5)                   # partition=classes: two digits
    ev = own_data_evaluator(cfg, own, 0)
    test = test_dataset(cfg.data_spec())
    held = torch.tensor(sorted(set(own.y.tolist())))
    mine, other = torch.isin(test.y, held).nonzero().flatten()[:60], (~torch.isin(test.y, held)).nonzero().flatten()[:60]
    fakes = test.x[torch.cat([mine, other])]

    class ByClass(torch.nn.Module):   # "real" when the evaluator's classifier labels an own class
        def forward(self, x):
            return torch.isin(embed(ev.labeller, x)[1].argmax(dim=1), held).float()

    scores = d_filtered_scores(ByClass(), fakes, ev, (0.5,), batch_size=8)
    assert set(scores) == {1.0, 0.5} and scores[1.0]["num"] == 120 and scores[0.5]["num"] == 60
    assert scores[1.0]["own_share"] == pytest.approx(ev_share(ev, fakes), abs=1e-9)
    assert scores[0.5]["own_share"] > scores[1.0]["own_share"] + 0.3

    monkeypatch.setenv(D_FILTER_ENV, "0.5,0.1")
    assert d_filter_fractions() == (0.5, 0.1)
    for bad in ("0", "1.5", "half", ","):
        monkeypatch.setenv(D_FILTER_ENV, bad)
        with pytest.raises(ValueError, match=D_FILTER_ENV):
            d_filter_fractions()


def ev_share(ev, fakes):
    return client_eval.own_class_share(ev.score(fakes)["label_histogram"], ev.real_histogram)
