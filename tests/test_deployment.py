"""A real deployment on loopback: `flower-superlink`, `flower-supernode` processes with their
own data folders, and the `flwr run` CLI -- no simulation engine, no mocks.

What is checked: a plain run, `local` clients keeping their generators in their own node
folders, a SuperNode dying mid-run, a SuperNode pointed at a data folder that does not exist,
TLS (including a SuperNode that does not trust the SuperLink's CA), BPGAN with discriminator and
generator roles from --node-config, MGGAN moving discriminators between SuperNodes, a SuperNode
stopped and restarted with the same partition-id taking over its student, SuperNode
authentication (an unregistered node is refused). The SuperLink and SuperNodes are started by
`fedgan-superlink` / `fedgan-supernode` (warm app processes, app/warm.py) except in one test,
which uses plain `flower-superlink` / `flower-supernode`.
What crossed the wire is read from both ends: the
server's comm.jsonl and each ClientApp's own record of what it received and sent (FEDGAN_TRACE).
Every process the tests start is gone afterwards, also when a test fails (fixture teardown).

Cost on 2 CPU cores: a round takes 3-6 s with warm ClientApps (the SuperNode's own 3 s poll
dominates) and 10-13 s with plain SuperNodes; the round in which a SuperNode is SIGKILLed waits
~60 s for its heartbeat to lapse unless `round-timeout` ends it sooner.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from app import warm
from app.comparison import read_run, training_rows
from app.loopback import Loopback, export_digits_folders, make_node_key, process_alive
from strategies.base import TRACE_ENV

pytestmark = pytest.mark.e2e

# client-eval=false: the nodes' own folders label their classes by folder, not by the digits
# classifier, so the end-of-run report cannot score them (and each message costs a ClientApp process)
TINY = ("teacher-steps=5 gen-features=8 disc-features=8 batch-size=8 steps-per-round=1 "
        "sample-every=1 samples-per-client=4 node-wait-timeout=90 client-eval=false")


def config(out: Path, **keys) -> str:
    """TINY with ``keys`` (snake_case) added or replacing its entries: Flower refuses a key twice."""
    entries = dict(item.split("=", 1) for item in TINY.split())
    entries.update({k.replace("_", "-"): str(v) for k, v in keys.items()})
    entries["output-dir"] = json.dumps(str(out))
    return " ".join(f"{k}={v}" for k, v in entries.items())


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> list[Path]:
    """Three nodes' private folder-per-class PNG trees (digits {0,1}, {2,3}, {4,5})."""
    return export_digits_folders(tmp_path_factory.mktemp("data"), 3)


@pytest.fixture
def deploy(tmp_path):
    """Start Loopback deployments; teardown stops them and checks no process is left."""
    made: list[Loopback] = []

    def start(data_paths, **kwargs) -> Loopback:
        lb = Loopback(tmp_path / f"loopback{len(made)}", data_paths, **kwargs)
        made.append(lb)
        return lb.start()

    yield start
    leftovers = {}
    for lb in made:
        seen = lb.all_pids()
        lb.stop()
        left = sorted(p for p in seen | lb.all_pids() if process_alive(p))
        if left:
            leftovers[str(lb.dir)] = left
    assert not leftovers, f"processes left running: {leftovers}"


def run_folder(out: Path) -> Path:
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 1, runs
    return runs[0]


def rounds(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_two_supernodes_run_privacygan_and_leave_no_process(deploy, folders, tmp_path):
    lb = deploy(folders[:2])
    out = tmp_path / "out"
    during: set[int] = set()

    def watch(line: str) -> None:   # while round 1 is done, the ServerApp and ClientApps exist too
        if "round 1/2" in line:
            during.update(lb.all_pids())

    rc, output, run_id, status = lb.run(config(out, num_rounds=2, min_nodes=2), timeout=300, on_line=watch)
    assert run_id is not None, output
    assert status == "finished:completed", output
    folder = run_folder(out)
    assert f"run folder: {folder}" in output
    metrics = rounds(folder)
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["replies"] == 2 and m["dropped"] == 0 for m in metrics), metrics
    assert (folder / "samples" / "round00002.png").exists()
    assert "- status: **success**" in (folder / "summary.md").read_text()
    # the FAB was built from the deployment's slim copy of the app, not the project folder (.venv, tests)
    (installed,) = (lb.flwr_home / "apps").iterdir()
    assert {p.name for p in installed.iterdir()} == {p.name for p in lb.app_dir.iterdir()} - {".gitignore"}
    assert not {p.name for p in installed.iterdir()} & {"tests", "simulations", ".venv"}

    # fedgan-run against the same deployment tells the truth about a run that fails on the server
    missing = tmp_path / "no-teacher.pt"
    launch = subprocess.run([sys.executable, "-m", "app.launch", "--connection", lb.name, "--run-config",
                             config(out, teacher_path=json.dumps(str(missing)))], env=lb.env(), cwd=lb.project,
                            capture_output=True, text=True, timeout=300)
    assert launch.returncode == 1, launch.stdout + launch.stderr
    assert "finished:failed" in launch.stdout and f"'teacher-path' = '{missing}': no such file" in launch.stdout
    # a bad value is named before the deployment is asked to run anything
    launch = subprocess.run([sys.executable, "-m", "app.launch", "--connection", lb.name, "--run-config",
                             config(out, alpha=1.5)], env=lb.env(), cwd=lb.project, capture_output=True,
                            text=True, timeout=300)
    assert launch.returncode == 2 and "run config 'alpha' = 1.5 is not allowed" in launch.stderr
    assert "started run" not in launch.stdout

    started = during | lb.all_pids()
    assert lb.superlink.pid in started and all(p.pid in started for p in lb.supernodes)
    lb.stop()
    assert not [p for p in started if process_alive(p)]
    assert not lb.all_pids()


def test_local_clients_keep_their_generators_in_their_own_node_folders(deploy, folders, tmp_path):
    """strategy=local on real SuperNodes: each node writes the generator it trained into its own
    node-dir (never sent); the server's run folder holds none; fedgan-sample draws from a node's."""
    lb = deploy(folders[:2])
    out = tmp_path / "out"
    rc, output, run_id, status = lb.run(config(out, strategy='"local"', num_rounds=2, min_nodes=2, local_steps=2),
                                        timeout=300)
    assert status == "finished:completed", output
    folder = run_folder(out)
    assert [m["round"] for m in rounds(folder)] == [1, 2]
    assert not (folder / "generators").exists()          # local's server trains no generator
    from app.generators import list_generators
    from app.sample import main as fedgan_sample

    for i in range(2):
        node_run = lb.dir / f"supernode{i}" / "fedgan" / "node-runs" / f"flower-run-{run_id}"
        known = list_generators(node_run)
        assert list(known) == [f"client{i}"], (i, known)
        meta = known[f"client{i}"]
        assert (meta["owner"], meta["round"], meta["steps"], meta["flower_run_id"]) == \
            ("client", 2, 4, str(run_id))
    target = tmp_path / "node1.npz"
    node1 = lb.dir / "supernode1" / "fedgan" / "node-runs" / f"flower-run-{run_id}"
    assert fedgan_sample(["--run", str(node1), "--generator", "client1", "--num", "6", "--out", str(target)]) == 0
    assert __import__("numpy").load(target)["images"].shape == (6, 16, 16, 1)


def test_a_supernode_killed_mid_run_is_dropped_and_the_run_completes(deploy, folders, tmp_path):
    lb = deploy(folders[:3])
    victim = lb.node_id(2)
    assert victim, lb.node_logs[2].read_text()
    # the warm launcher's folder (socket, shim): the SIGKILLed wrapper cannot remove it
    (scratch,) = {Path(p.environ()[warm.SOCKET_ENV]).parent for p in psutil.Process(lb.supernodes[2].pid).children()}
    out = tmp_path / "out"
    killed_after: list[int] = []

    def killer() -> None:      # SIGKILL node 2 (and its ClientApps) once round 1 is in metrics.jsonl
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not killed_after:
            runs = list((out / "runs").glob("*/metrics.jsonl")) if (out / "runs").exists() else []
            if runs and rounds(runs[0].parent):
                lb.kill_supernode(2, signal.SIGKILL)
                killed_after.append(len(rounds(runs[0].parent)))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    rc, output, run_id, status = lb.run(
        config(out, num_rounds=3, min_nodes=3, min_replies=1, round_timeout=20), timeout=420)
    thread.join(timeout=5)
    assert killed_after == [1], (killed_after, output)
    assert not process_alive(lb.supernodes[2].pid)
    assert status == "finished:completed", output
    folder = run_folder(out)
    metrics = rounds(folder)
    assert [m["round"] for m in metrics] == [1, 2, 3]
    assert metrics[0]["replies"] == 3 and metrics[0]["dropped"] == 0
    later = metrics[1:]
    assert all(m["replies"] == 2 for m in later), later
    # the dead node is dropped in the round it died in, with Flower's reason
    assert victim in later[0]["dropped_reasons"], later[0]
    reason = later[0]["dropped_reasons"][victim]
    assert "code 5" in reason or "no reply" in reason, reason   # node unavailable (or silent)
    assert all(set(m["dropped_reasons"]) <= {victim} for m in later)
    log = (folder / "log.txt").read_text()
    assert f"dropping node {victim} this round:" in log
    assert "- status: **success**" in (folder / "summary.md").read_text()
    assert scratch.is_dir()
    lb.stop()                    # the deployment's stop sweeps it (app.warm.sweep_stale)
    assert not scratch.exists()


def test_a_supernode_with_a_missing_data_path_is_reported_and_the_run_completes(deploy, folders, tmp_path):
    missing = tmp_path / "no-such-folder"
    lb = deploy([folders[0], missing], warm=False)   # plain flower-supernodes: cold ClientApps work as well
    bad = lb.node_id(1)
    out = tmp_path / "out"
    rc, output, run_id, status = lb.run(config(out, num_rounds=1, min_nodes=2, min_replies=1), timeout=300)
    assert status == "finished:completed", output
    folder = run_folder(out)
    metrics = rounds(folder)
    assert [m["replies"] for m in metrics] == [1], metrics
    for m in metrics:
        assert list(m["dropped_reasons"]) == [bad], m
        reason = m["dropped_reasons"][bad]
        assert "code 2" in reason and str(missing) in reason, reason
    log = (folder / "log.txt").read_text()
    assert f"dropping node {bad} this round:" in log and str(missing) in log

# --- what crossed the wire, from both ends ----------------------------------------------------
def node_traces(path: Path) -> dict[int, list[dict]]:
    """The ClientApps' own records (FEDGAN_TRACE), by node id, in the order they were handled."""
    out: dict[int, list[dict]] = {}
    for line in path.read_text().splitlines():
        row = json.loads(line)
        if row.get("side") == "client":
            out.setdefault(int(row["node"]), []).append(row)
    return out


def comm_rows(folder: Path) -> list[dict]:
    return read_run(folder).comm


def assert_both_ends_agree(folder: Path, trace: Path, lost: set[int] = frozenset()) -> dict[int, list[dict]]:
    """Per node and round, the bytes the server booked in comm.jsonl (MGGAN books a moved
    discriminator as its own 'regroup' row) equal what that node's ClientApp received and sent;
    and metrics.jsonl's per-round totals are the sums of comm.jsonl's training rows. Only nodes in
    ``lost`` (stopped mid-run) may have handled a message whose reply the server never booked."""
    seen = node_traces(trace)
    run = read_run(folder)
    server: dict[tuple, list[int]] = {}
    for row in run.comm:
        if row.get("dropped"):
            continue
        acc = server.setdefault((int(row["node"]), str(row["round"])), [0, 0])
        acc[0] += row["down"]
        acc[1] += row["up"]
    node_side: dict[tuple, list[int]] = {}
    for nid, rows in seen.items():
        for r in rows:
            if r["type"].startswith("query.info") or r["round"].startswith("eval"):
                continue   # control and evaluation messages are not training traffic (app/comparison.py)
            acc = node_side.setdefault((nid, str(r["round"])), [0, 0])
            acc[0] += r["bytes_in"]
            acc[1] += r.get("bytes_out", 0)
    assert {key: node_side.get(key) for key in server} == server, (server, node_side)
    unbooked = {key for key in node_side if key not in server}
    assert {nid for nid, _ in unbooked} <= set(lost), (unbooked, server)
    training = training_rows(run.comm)
    for m in run.metrics:   # the round's training bytes (sample grids and control messages apart)
        rows = [r for r in training if r["round"] == m["round"]]
        assert (m["bytes_down"], m["bytes_up"]) == (sum(r["down"] for r in rows), sum(r["up"] for r in rows)), m
    return seen


def test_bpgan_on_supernodes_with_discriminator_and_generator_roles(deploy, folders, tmp_path, monkeypatch):
    """BPGAN's roles come from --node-config: the discriminator node holds the data and gets D's
    weights and fakes; the generator node holds none and gets only labels and feedback."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    lb = deploy([])
    lb.add_supernode(folders[0], partition_id=0, num_partitions=2, extra_config="role='discriminator'")
    lb.add_supernode(None, partition_id=1, num_partitions=2, extra_config="role='generator'")
    d_node, g_node = int(lb.node_id(0)), int(lb.node_id(1))
    out = tmp_path / "out"
    rc, output, run_id, status = lb.run(config(out, strategy='"bpgan"', num_rounds=2, min_nodes=2, sample_every=0), timeout=300)
    assert status == "finished:completed", output
    folder = run_folder(out)
    assert [(m["round"], m["dropped"]) for m in rounds(folder)] == [(1, 0), (2, 0)]
    seen = assert_both_ends_agree(folder, trace)
    d_types = {r["type"] for r in seen[d_node]}
    g_types = {r["type"] for r in seen[g_node]}
    assert "train.discriminator_grad" in d_types and d_types <= {"query.info", "train.discriminator_grad"}
    assert "train.generator_step" in g_types and g_types <= {"query.info", "train.generator_step",
                                                             "query.bpgan_sample"}
    for r in seen[d_node]:
        if r["type"] == "train.discriminator_grad":
            assert "d_weights" in r["records_in"] and "d_grads" in r["records_out"], r
    for r in seen[g_node]:
        if r["type"] == "train.generator_step":    # labels and feedback in, fakes out; never D or data
            assert "d_weights" not in r["records_in"] and "d_grads" not in r["records_out"], r
    roles = {row["node"]: row["role"] for row in comm_rows(folder)}
    assert roles == {d_node: "discriminator", g_node: "generator"}
    # the generator node kept its generator in its own folder, never on the server
    assert (lb.dir / "supernode1" / "fedgan" / "node-runs" / f"flower-run-{run_id}").is_dir()


def test_mggan_moves_discriminators_between_supernodes(deploy, folders, tmp_path, monkeypatch):
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    lb = deploy(folders[:2])
    out = tmp_path / "out"
    rc, output, run_id, status = lb.run(config(out, strategy='"mggan"', num_rounds=3, min_nodes=2, local_steps=2,
                                               regroup_interval=2, sample_every=0), timeout=300)
    assert status == "finished:completed", output
    folder = run_folder(out)
    metrics = rounds(folder)
    regrouped = [m["round"] for m in metrics if m.get("regrouped")]
    assert regrouped, metrics
    seen = assert_both_ends_agree(folder, trace)
    moved = [r for r in comm_rows(folder) if r["action"] == "regroup"]
    assert moved and all(r["down"] > 0 or r["up"] > 0 for r in moved), moved
    first = regrouped[0]
    for nid, rows in seen.items():   # D_k left each node in the regrouping round's reply ...
        by_round = {r["round"]: r for r in rows if r["type"] == "train.local"}
        assert "d" in by_round[str(first)]["records_out"], by_round[str(first)]
        assert "d" in by_round[str(first + 1)]["records_in"], by_round[str(first + 1)]   # ... and another came in
    ups = sorted(r["up"] for r in moved if r["round"] == first)
    downs = sorted(r["down"] for r in moved if r["round"] == first + 1)
    assert ups == downs and ups, moved   # each discriminator arrives with exactly the bytes it left with


def test_a_restarted_supernode_takes_over_its_student(deploy, folders, tmp_path, monkeypatch):
    """SuperNode 1 is stopped after round 1 of 10 and a new one is started with the same partition-id and
    data: the new node id takes over partition 1's student generator and the run completes."""
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv(TRACE_ENV, str(trace))
    lb = deploy(folders[:2])
    old = lb.node_id(1)
    out = tmp_path / "out"
    restarted: list[int] = []

    def restart() -> None:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not restarted:
            runs = list((out / "runs").glob("*/metrics.jsonl")) if (out / "runs").exists() else []
            if runs and rounds(runs[0].parent):
                lb.stop_supernode(1)   # SIGTERM: it deregisters at once (no heartbeat wait)
                restarted.append(lb.add_supernode(folders[1], partition_id=1, num_partitions=2))
                return
            time.sleep(0.2)

    thread = threading.Thread(target=restart, daemon=True)
    thread.start()
    rc, output, run_id, status = lb.run(config(out, num_rounds=10, min_nodes=2, min_replies=1, round_timeout=60),
                                        timeout=420)
    thread.join(timeout=5)
    assert restarted == [2], (restarted, output)
    assert not process_alive(lb.supernodes[1].pid)
    new = lb.node_id(2)
    assert new and new != old
    assert status == "finished:completed", output
    folder = run_folder(out)
    metrics = rounds(folder)
    assert [m["round"] for m in metrics] == list(range(1, 11))   # rounds to spare: a new node takes seconds to join
    label = "client 1 (classes 2,3)"
    assert metrics[0]["clients"][label]["node"] == int(old)
    assert metrics[-1]["clients"][label]["node"] == int(new), metrics[-1]   # the same student, a new node
    assert metrics[-1]["replies"] == 2
    log = (folder / "log.txt").read_text()
    assert f"node {new} rejoined as partition 1 (was node {old}): it takes over its student" in log
    assert "- status: **success**" in (folder / "summary.md").read_text()
    seen = assert_both_ends_agree(folder, trace, lost={int(old)})   # what crossed the wire, both ends
    assert {r["partition"] for r in seen[int(new)]} == {1}
    assert any(r["type"] == "train.discriminate" for r in seen[int(new)])
    for nid, rows in seen.items():   # fakes in; labels and feedback out -- never weights or images
        for r in rows:
            if r["type"] == "train.discriminate":
                assert set(r["records_in"]) == {"fakes", "config"} and set(r["records_out"]) == {"reply", "metrics"}, r
                assert r["records_out"]["reply"] == ["feedback", "labels"], r


def test_tls_and_authentication_admit_only_registered_nodes_that_trust_the_ca(deploy, folders, tmp_path):
    """Over TLS with SuperNode authentication: two registered nodes train; a node whose key was
    never registered is refused, and so is a node that does not trust the SuperLink's CA."""
    lb = deploy([], tls=True, auth=True)
    config_toml = (lb.flwr_home / "config.toml").read_text()
    assert "root-certificates" in config_toml and "insecure" not in config_toml
    keys = [make_node_key(tmp_path / "keys", f"node{i}") for i in range(4)]
    for private, public in keys[:2] + keys[3:]:
        reg = lb.register_node_key(public)
        assert reg.returncode == 0 and "registered" in (reg.stdout + reg.stderr), reg
    for i in range(3):
        lb.add_supernode(folders[i], partition_id=i, num_partitions=3, auth_key=keys[i][0])
    # a registered key, but started without --root-certificates (and without --insecure)
    lb.add_supernode(folders[2], partition_id=3, num_partitions=3, auth_key=keys[3][0], trust_ca=False)
    deadline = time.monotonic() + 60
    while any(lb.supernodes[i].poll() is None for i in (2, 3)) and time.monotonic() < deadline:
        time.sleep(0.5)
    unregistered, untrusting = (lb.node_logs[i].read_text(errors="replace") for i in (2, 3))
    assert lb.supernodes[2].returncode not in (None, 0), unregistered
    assert "Failed to activate SuperNode" in unregistered or "305" in unregistered, unregistered
    assert lb.supernodes[3].returncode not in (None, 0), untrusting
    assert "CERTIFICATE_VERIFY_FAILED" in untrusting or "handshake" in untrusting.lower(), untrusting
    assert "SuperNode ID" not in unregistered + untrusting
    out = tmp_path / "out"
    rc, output, run_id, status = lb.run(config(out, num_rounds=2, min_nodes=2), timeout=300)
    assert status == "finished:completed", output
    folder = run_folder(out)
    metrics = rounds(folder)
    assert [m["round"] for m in metrics] == [1, 2]
    assert all(m["replies"] == 2 and m["dropped"] == 0 for m in metrics), metrics
    assert "- status: **success**" in (folder / "summary.md").read_text()
    listed = {n["node-id"]: n["status"] for n in lb.supernode_list()}
    assert sorted(listed.values()) == ["online", "online", "registered"], listed   # node 3's key: never online
