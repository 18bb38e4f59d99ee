"""Trained generators as files (app/generators.py) and the fedgan-sample command (app/sample.py)."""

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Context, RecordDict
from PIL import Image

from app import generators as gens
from app.builders import make_discriminator, make_generator
from app.config import parse_config
from app.runs import RunFolder
from app.sample import main
from app.server_app import RunRecorder
from models.losses import make_optimizer
from strategies import bpgan, local, mggan

PROJECT = Path(__file__).resolve().parent.parent
CFG = parse_config({"gen-features": 8, "disc-features": 8, "num-rounds": 4, "checkpoint-every": 2})


def tiny_generator(seed=1):
    torch.manual_seed(seed)
    G = make_generator(CFG)
    with torch.no_grad():   # non-trivial BatchNorm statistics and weights
        for m in G.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 1.5)
    return G


def expected(G, num, seed, batch, bn="batch"):
    """G(z) with z drawn batch by batch from one CPU generator seeded with ``seed``, quantized."""
    gen = torch.Generator().manual_seed(seed)
    G.train(bn == "batch")
    xs = []
    with torch.no_grad():
        for start in range(0, num, batch):
            xs.append(G(torch.randn(min(batch, num - start), G.latent_dim, generator=gen)))
    x = torch.cat(xs)
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


@pytest.fixture
def run_dir(tmp_path):
    G = tiny_generator()
    meta = gens.sidecar(CFG, "client0", owner="client", rnd=3, steps=12, run="20261203-000000-local-digits")
    gens.save_generator(tmp_path, "client0", G.state_dict(), meta)
    return tmp_path, G


def test_saved_generator_is_listed_and_rebuilt_with_its_weights(run_dir):
    folder, G = run_dir
    known = gens.list_generators(folder)
    assert list(known) == ["client0"]
    meta = known["client0"]
    assert (meta["name"], meta["round"], meta["steps"], meta["owner"]) == ("client0", 3, 12, "client")
    assert meta["architecture"] == {"kind": "dcgan", "latent_dim": 100, "channels": 1, "image_size": 16, "features": 8}
    H, _ = gens.load_generator(folder, "client0")
    for k, v in G.state_dict().items():
        assert torch.equal(v, H.state_dict()[k]), k


@pytest.mark.parametrize("bn", ["batch", "running"])
def test_npz_samples_equal_g_of_z_for_the_seed(run_dir, bn):
    folder, G = run_dir
    out = folder / "s.npz"
    assert main(["--run", str(folder), "--generator", "client0", "--num", "11", "--seed", "7", "--batch-size", "4",
                 "--device", "cpu", "--bn", bn, "--out", str(out)]) == 0
    z = np.load(out)
    assert z["images"].dtype == np.uint8 and z["images"].shape == (11, 16, 16, 1)
    assert np.array_equal(z["images"], expected(G, 11, 7, 4, bn))
    assert (str(z["generator"]), str(z["run"]), int(z["round"]), int(z["seed"])) == \
        ("client0", "20261203-000000-local-digits", 3, 7)
    assert json.loads(str(z["meta"]))["bn"] == bn
    # another seed, other samples
    main(["--run", str(folder), "--generator", "client0", "--num", "11", "--seed", "8", "--device", "cpu",
          "--out", str(folder / "t.npz")])
    assert not np.array_equal(np.load(folder / "t.npz")["images"], z["images"])


def test_png_samples_equal_g_of_z_and_carry_their_metadata(run_dir):
    folder, G = run_dir
    out = folder / "pngs"
    assert main(["--run", str(folder), "--generator", "client0", "--num", "5", "--seed", "3", "--batch-size", "2",
                 "--device", "cpu", "--out", str(out)]) == 0
    files = sorted(out.glob("*.png"))
    assert [p.name for p in files] == [f"{i:06d}.png" for i in range(5)]
    got = np.stack([np.asarray(Image.open(p))[:, :, None] for p in files])
    assert np.array_equal(got, expected(G, 5, 3, 2))
    info = json.loads((out / "samples.json").read_text())
    assert (info["generator"], info["round"], info["seed"], info["num"]) == ("client0", 3, 3, 5)
    # a folder that is not empty is refused (samples of two generators never mix)
    assert main(["--run", str(folder), "--generator", "client0", "--num", "2", "--out", str(out)]) == 1


def test_list_and_one_line_errors(run_dir, capsys):
    folder, _ = run_dir
    assert main(["--run", str(folder), "--list"]) == 0
    out = capsys.readouterr().out
    assert "1 generator(s)" in out and "client0" in out and "round 3" in out
    assert main(["--run", str(folder), "--generator", "nope", "--out", str(folder / "x.npz")]) == 1
    err = capsys.readouterr().err.strip()
    assert err == f"fedgan-sample: no generator 'nope' in {folder / 'generators'}; known: client0"
    missing = folder / "no-such-run"
    assert main(["--run", str(missing), "--list"]) == 1
    assert capsys.readouterr().err.strip() == f"fedgan-sample: run folder {missing}: no such folder"


def test_module_runs_as_a_command(tmp_path):
    out = subprocess.run([sys.executable, "-m", "app.sample", "--run", str(tmp_path / "gone"), "--list"], cwd=PROJECT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == \
        [f"fedgan-sample: run folder {tmp_path / 'gone'}: no such folder"]


def test_server_checkpoints_leave_their_generators_in_the_run_folder(tmp_path):
    folder = RunFolder.create(tmp_path, "privacygan", "digits", CFG.to_run_config())
    rec = RunRecorder(folder, 4, cfg=CFG, flower_run_id=42)
    teacher, s0, s1 = tiny_generator(1), tiny_generator(2), tiny_generator(3)
    rec.save_checkpoint("server.pt", {"round": 2, "teacher_g": teacher.state_dict(), "partition_of": {11: 1, 10: 0},
                                      "students": {10: {"g": s0.state_dict()}, 11: {"g": s1.state_dict()}}})
    known = gens.list_generators(folder.path)
    assert list(known) == ["student0", "student1", "teacher"]
    assert {m["round"] for m in known.values()} == {2} and {m["owner"] for m in known.values()} == {"server"}
    assert known["student1"]["partition_id"] == 1 and known["student1"]["run"] == folder.path.name
    H, _ = gens.load_generator(folder.path, "student1")
    assert all(torch.equal(v, H.state_dict()[k]) for k, v in s1.state_dict().items())
    # global generators (dataparallel, fedavg, centralized); nothing for checkpoints without one
    rec.save_checkpoint("server.pt", {"round": 4, "g": s0.state_dict(), "steps": 8})
    assert gens.list_generators(folder.path)["global"]["steps"] == 8
    assert gens.server_generators({"round": 4, "d": {}, "pairs": []}) == []   # bpgan / local / mggan: none


def local_state(steps=6):
    state = RecordDict()
    G, D = make_generator(CFG), make_discriminator(CFG)
    local.save_alone(state, G, D, make_optimizer("bce", G.parameters(), 1e-3, (0.5, 0.9)),
                     make_optimizer("bce", D.parameters(), 1e-3, (0.5, 0.9)), steps)
    return state, G


def message(mtype, rnd):
    """What the client side reads of a strategy's message (a Flower Message needs a running app)."""
    return SimpleNamespace(content=RecordDict({"config": ConfigRecord({"round": rnd})}),
                           metadata=SimpleNamespace(message_type=mtype, group_id=str(rnd)))


def test_a_simulated_client_writes_its_generator_into_the_run_folder_in_due_rounds(tmp_path):
    assert gens.CLIENT_GENERATORS["train.alone"][0] == local.CLIENT_STATE     # the state records it reads
    assert gens.CLIENT_GENERATORS["train.local"][0] == mggan.CLIENT_STATE
    assert gens.CLIENT_GENERATORS["train.generator_step"][0] == bpgan.GB_STATE
    cfg = CFG.replace(output_dir=str(tmp_path))
    folder = RunFolder.create(tmp_path, "local", "digits", cfg.to_run_config())
    gens.mark_flower_run(folder.path, 777)
    state, G = local_state()
    ctx = Context(run_id=777, node_id=5, node_config={"partition-id": 1, "num-partitions": 2}, state=state,
                  run_config={})
    assert gens.keep_client_generator(cfg, message("train.alone", 1), ctx) is None    # not a checkpoint round
    path = gens.keep_client_generator(cfg, message("train.alone", 2), ctx)           # checkpoint-every = 2
    assert path == folder.path / "generators" / "client1.pt"
    meta = gens.list_generators(folder.path)["client1"]
    assert (meta["round"], meta["steps"], meta["run"], meta["flower_run_id"]) == (2, 6, folder.path.name, "777")
    assert gens.keep_client_generator(cfg, message("query.alone_sample", 2), ctx) is None   # already written
    H, _ = gens.load_generator(folder.path, "client1")
    assert all(torch.equal(v, H.state_dict()[k]) for k, v in G.state_dict().items())


def test_a_deployed_client_writes_its_generator_into_its_node_folder(tmp_path):
    state, _ = local_state(steps=9)
    node = tmp_path / "node"
    ctx = Context(run_id=31, node_id=5, node_config={"data-path": "/data", "partition-id": 0, "node-dir": str(node)},
                  state=state, run_config={})
    cfg = CFG.replace(output_dir=str(tmp_path / "out"))
    mod = gens.client_generator_mod(lambda context: cfg)
    reply = SimpleNamespace(has_error=lambda: False)
    assert mod(message("train.alone", 4), ctx, lambda m, c: reply) is reply
    where = node / "node-runs" / "flower-run-31"
    assert gens.list_generators(where)["client0"]["steps"] == 9
    # without node-dir: the run config's output-dir, resolved on the node
    ctx = Context(run_id=32, node_id=6, node_config={"role": "generator", "partition-id": 1},
                  state=local_state()[0], run_config={})
    gens.keep_client_generator(cfg, message("train.alone", 4), ctx)
    assert (tmp_path / "out" / "node-runs" / "flower-run-32" / "generators" / "client1.pt").is_file()
