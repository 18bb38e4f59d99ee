"""The curious server's probe of PrivacyGAN's client discriminators (docs/PRIVACY.md).

Run by the ServerApp after the last round when run config ``audit-probe`` > 0 (what
``simulations/privacy_audit.py`` sets): the server sends each client one more
``train.discriminate`` message -- through the real ClientApp handler -- whose "fakes" are real
candidates, the client's own training images (members) and as many images of its classes that
no client holds (non-members; ``audit-nonmembers`` > 0: that many), and keeps D_i's labels and feedback norms on them in
``audit_probe.pt`` in the run folder. The members are known to the audit because it is a
simulation on a public dataset: a real server would not know them, which only makes the
measured leak an upper bound for this attack.
"""

from __future__ import annotations

from pathlib import Path

import torch

from app.audit import probe_batches
from app.config import Config
from app.data import client_dataset, server_dataset, test_dataset
from strategies.base import log

PROBE_FILE = "audit_probe.pt"


def candidates(cfg: Config, pid: int, num_clients: int, limit: int, seed: int):
    """(members, non-members, classes, pool): at most ``limit`` of client ``pid``'s training
    images and as many images of its classes that no client holds (the server's share and the
    test split) -- or, with run config ``audit-nonmembers`` > 0, that many of those (at most the
    pool), which makes a TPR at a low FPR finer (1 % of 100 non-members is a single image) --
    drawn with a seeded generator; ``pool`` is every such non-member image."""
    spec = cfg.data_spec()
    own = client_dataset(spec, pid, num_clients)
    classes = sorted({int(c) for c in own.y.tolist()})
    server, test = server_dataset(spec), test_dataset(spec)
    pool_x = torch.cat([server.x, test.x]) if len(server) else test.x
    pool_y = torch.cat([server.y, test.y]) if len(server) else test.y
    others = pool_x[torch.isin(pool_y, torch.tensor(classes))]
    n = min(len(own), len(others), limit)
    n_non = min(len(others), cfg.audit_nonmembers) if cfg.audit_nonmembers > 0 else n
    gen = torch.Generator().manual_seed(seed * 1009 + pid)
    members = own.x[torch.randperm(len(own), generator=gen)[:n]]
    nonmembers = others[torch.randperm(len(others), generator=gen)[:n_non]]
    return members, nonmembers, classes, others


def probe(grid, cfg: Config, num_clients: int, limit: int, seed: int) -> dict:
    """The PrivacyGAN probe through the grid, after training: candidates sent as fakes; per
    partition id, D_i's label scores and feedback-norm scores of (members, non-members)."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from strategies import wire

    nodes = list(grid.get_node_ids())
    asks = [Message(content=RecordDict({wire.CONFIG: ConfigRecord({"round": cfg.num_rounds + 1})}),
                    dst_node_id=nid, message_type=wire.INFO, group_id="audit") for nid in nodes]
    pid_of = {}
    for reply in grid.send_and_receive(asks, timeout=cfg.round_timeout):
        if not reply.has_error():
            pid_of[reply.metadata.src_node_id] = int(wire.metrics_of(reply.content)["partition_id"])
    out, msgs, layout = {}, [], {}
    for nid, pid in sorted(pid_of.items(), key=lambda kv: kv[1]):
        mem, non, classes, _ = candidates(cfg, pid, num_clients, limit, seed)
        both = torch.cat([mem, non])
        order = torch.randperm(len(both), generator=torch.Generator().manual_seed(seed + pid))
        fakes, n = probe_batches(both[order], cfg.batch_size)
        layout[nid] = (pid, order, len(mem), n, classes, fakes.shape[0])
        content = RecordDict({
            wire.FAKES: wire.tensor_record(**{wire.FAKES: wire.encode_fakes(fakes, "float32")}),
            wire.CONFIG: ConfigRecord({"round": cfg.num_rounds + 1, "loss": cfg.loss, "fakes-dtype": "float32",
                                       "feedback-dtype": "float32", "client-disc-steps": cfg.client_disc_steps}),
        })
        msgs.append(Message(content=content, dst_node_id=nid, message_type=wire.DISCRIMINATE, group_id="audit"))
    for reply in grid.send_and_receive(msgs, timeout=cfg.round_timeout):
        nid = reply.metadata.src_node_id
        if reply.has_error() or nid not in layout:
            log.warning(f"audit probe: node {nid}: no probe reply ({reply.error.reason if reply.has_error() else 'unknown node'})")
            continue
        metrics = wire.metrics_of(reply.content)
        if metrics.get("dp_exhausted"):
            log.warning(f"audit probe: node {nid}: refused the probe, its dp-target-epsilon is spent")
            continue
        pid, order, m, n, classes, k = layout[nid]
        labels = wire.get_tensor(reply.content.array_records[wire.REPLY], wire.LABELS).reshape(-1)[:n]
        feedback = wire.get_tensor(reply.content.array_records[wire.REPLY], wire.FEEDBACK)
        fb_norm = feedback.reshape(k * cfg.batch_size, -1).norm(dim=1)[:n]
        back = torch.empty(n, dtype=torch.long)
        back[order] = torch.arange(n)          # position of candidate j in the probe
        label_scores, fb_scores = labels[back].double(), -fb_norm[back].double()
        out[pid] = {"classes": classes, "members": m, "batches": k,
                    # D_i's step count as the client reports it: its training steps + one per probe batch
                    "d_steps_total": int(metrics["d_steps_total"]),
                    **({"dp_epsilon": float(metrics["dp_epsilon"])} if "dp_epsilon" in metrics else {}),
                    "label": (label_scores[:m].numpy(), label_scores[m:].numpy()),
                    "feedback": (fb_scores[:m].numpy(), fb_scores[m:].numpy())}
    return out


def save_probe(folder: str | Path, result: dict) -> Path:
    """Write the probe's scores (numpy arrays, plain values) to ``audit_probe.pt``."""
    path = Path(folder) / PROBE_FILE
    torch.save(result, path)
    return path


def load_probe(folder: str | Path) -> dict:
    """The probe's scores of a run folder ({} when the run has none: no client answered)."""
    path = Path(folder) / PROBE_FILE
    return torch.load(path, weights_only=False) if path.is_file() else {}


__all__ = ["candidates", "probe", "save_probe", "load_probe", "PROBE_FILE"]
