"""BPGAN and the baselines end to end through Flower's simulation engine."""

import pickle
import uuid
from pathlib import Path

import pytest
import torch
from flwr.simulation import run_simulation

from app.client_app import make_client_app
from app.config import parse_config
from app.runs import RunFolder
from app.server_app import make_server_app
from strategies.base import RunFailed

pytestmark = pytest.mark.e2e
TINY = {"gen-features": 8, "disc-features": 8, "batch-size": 8, "samples-per-client": 4, "sample-every": 0,
        "local-steps": 3, "num-rounds": 2, "round-timeout": 120.0, "node-wait-timeout": 60.0, "partition": "iid"}


def simulate(cfg, n, mods=()):
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg, mods=list(mods)),
                   num_supernodes=n, backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return RunFolder.open(next((Path(cfg.output_dir) / "runs").iterdir()))


def names(content):
    return {f"{rec}.{key}": tuple(content[rec][key].shape) for rec in content.array_records
            for key in content[rec].keys()}


def test_bpgan_generator_nodes_get_no_data_and_discriminator_nodes_no_generator(tmp_path):
    taps = tmp_path / "taps"
    taps.mkdir()

    def tap(msg, context, call_next):
        reply = call_next(msg, context)
        Path(taps, uuid.uuid4().hex).write_bytes(pickle.dumps({
            "partition": int(context.node_config["partition-id"]), "type": msg.metadata.message_type,
            "down": names(msg.content), "up": {} if reply.has_error() else names(reply.content)}))
        return reply

    cfg = parse_config({**TINY, "strategy": "bpgan", "min-nodes": 4, "output-dir": str(tmp_path / "out")})
    run = simulate(cfg, 4, [tap])
    seen = [pickle.loads(p.read_bytes()) for p in taps.iterdir()]
    g_shapes = {tuple(v.shape) for v in __import__("app.builders", fromlist=["x"]).make_generator(cfg).state_dict().values()}
    for rec in seen:
        if rec["partition"] % 2:   # generator blocks: fakes go up, only feedback comes down - never real data or D
            assert rec["type"] in ("query.info", "train.generator_step", "query.bpgan_sample"), rec["type"]
            assert all(not k.startswith("d_weights") for k in rec["down"])
            assert all(not (len(s) == 4 and s[0] > 1 and k != "relay.feedback") for k, s in rec["down"].items())
        else:                      # discriminator blocks: D weights and fakes come down, never G's weights
            assert rec["type"] in ("query.info", "train.discriminator_grad"), rec["type"]
            d_keys = [k for k in rec["down"] if k.startswith("d_weights.")]
            assert rec["type"] == "query.info" or d_keys
            assert not any(k.startswith(("g.", "g_weights")) for k in rec["down"])
            assert all(s not in g_shapes or k.startswith("d_weights.") for k, s in rec["down"].items()
                       if k != "fakes.fakes")
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2] and all(m["dropped"] == 0 for m in metrics)
    assert "status: **success**" in (run.path / "summary.md").read_text()


def test_bpgan_with_an_odd_number_of_nodes_stops_with_a_clear_error(tmp_path):
    cfg = parse_config({**TINY, "strategy": "bpgan", "min-nodes": 2, "output-dir": str(tmp_path)})
    with pytest.raises(RunFailed, match="odd|even|pair"):
        simulate(cfg, 3)
    run = RunFolder.open(next((tmp_path / "runs").iterdir()))
    assert "status: **failed**" in (run.path / "summary.md").read_text()


@pytest.mark.parametrize("strategy", ["dataparallel", "fedavg", "local", "centralized"])
def test_baseline_runs_and_writes_the_same_run_folder(tmp_path, strategy):
    cfg = parse_config({**TINY, "strategy": strategy, "min-nodes": 2, "output-dir": str(tmp_path)})
    run = simulate(cfg, 2)
    metrics = run.read_jsonl("metrics.jsonl")
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(torch.isfinite(torch.tensor(m["g_loss"])) for m in metrics)
    for name in ("config.json", "comm.jsonl", "summary.md", "checkpoints/server.pt"):
        assert (run.path / name).exists(), name
    assert list((run.path / "samples").glob("*.png"))
    assert "status: **success**" in (run.path / "summary.md").read_text()
