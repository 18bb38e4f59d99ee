"""Every trained generator as a file its owner can use: written, listed and rebuilt here.

A generator is kept as two files in a ``generators/`` folder::

    generators/<name>.pt     the generator's state_dict (CPU tensors, written atomically)
    generators/<name>.json   its sidecar: name, strategy, run, round, steps, owner, and the
                             architecture that rebuilds it (models.factory.build_generator)

Only the latest state is kept (each save replaces the files). Who writes what, and where:

* the **server** writes the generators it holds into the run folder each time it saves
  ``checkpoints/server.pt`` (``RunRecorder.save_checkpoint``): PrivacyGAN's ``teacher`` and
  ``student<i>`` (the student of client i), and the ``global`` generator of ``dataparallel``,
  ``fedavg`` and ``centralized``;
* a **client** writes the generator it trained itself — ``local``'s ``client<i>``, MGGAN's
  ``client<i>`` (the G of the group on client i) and BPGAN's ``gb<i>`` (the generator block on
  partition i) — after its training message in every checkpoint round (``checkpoint-every``)
  and the last round (:func:`client_generator_mod`). Nothing of it is sent to the server.
  In a **simulation** it goes into the run folder itself (found by the marker
  ``.flower-run-<Flower run id>`` the server leaves there; both run on one machine). On a
  **deployed** node (node config ``data-path``, ``role`` or ``node-dir`` set) it goes into the
  node's own folder: ``<node-dir>/node-runs/flower-run-<run id>/generators/``, where
  ``node-dir`` is the node-config key of that name, by default the run config's ``output-dir``
  resolved on the node (``$FEDGAN_HOME`` or ``~/fedgan`` for a relative one).

``fedgan-sample`` (app/sample.py) lists, rebuilds and samples them.
"""

from __future__ import annotations

import io
import json
import logging
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.runs import _atomic_write_bytes, _natural_key, resolve_output_dir
from models.factory import build_generator

GENERATORS = "generators"
MARKER = ".flower-run-"             # <run folder>/.flower-run-<Flower run id>: which Flower run writes there
SAVED = "fedgan.generator_saved"    # client context.state: (round, steps) of the last generator it wrote
NODE_DIR = "node-dir"               # node-config key: a deployed node's own folder
NODE_RUNS = "node-runs"
ARCH_KEYS = ("kind", "latent_dim", "channels", "image_size", "features")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

log = logging.getLogger("fedgan")


class GeneratorError(ValueError):
    """A generator cannot be found, read or rebuilt; the message is one line."""


# --------------------------------------------------------------------------- #
# Writing, listing, rebuilding
# --------------------------------------------------------------------------- #
def architecture(cfg) -> dict[str, Any]:
    """What rebuilds the run's generator (``app.builders.make_generator``) without the config."""
    from app.builders import geometry

    g = geometry(cfg)
    return {"kind": g.kind, "latent_dim": cfg.latent_dim, "channels": g.channels, "image_size": g.image_size,
            "features": cfg.gen_features}


def sidecar(cfg, name: str, *, owner: str, rnd: int, steps: int | None = None, run: str = "",
            flower_run_id: int | None = None, partition_id: int | None = None) -> dict[str, Any]:
    """The JSON sidecar of a generator of the run configured by ``cfg``."""
    meta = {"name": name, "strategy": cfg.strategy, "dataset": cfg.dataset, "run": run, "round": int(rnd),
            "steps": None if steps is None else int(steps), "owner": owner, "partition_id": partition_id,
            "flower_run_id": None if flower_run_id is None else str(flower_run_id),
            "architecture": architecture(cfg), "seed": cfg.seed,
            "saved_at": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    return meta


def save_generator(folder: str | Path, name: str, state_dict: dict, meta: dict) -> Path:
    """Write ``<folder>/generators/<name>.pt`` (the state_dict) and ``<name>.json`` (``meta``),
    each atomically, the sidecar last (a generator is listed once both are complete)."""
    if not _NAME.match(name):
        raise GeneratorError(f"generator name {name!r}: letters, digits, '.', '_' and '-' only")
    gdir = Path(folder) / GENERATORS
    gdir.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().cpu().clone() for k, v in state_dict.items()}
    path = _atomic_write_bytes(gdir / f"{name}.pt", lambda fh: torch.save(weights, fh))
    text = json.dumps({**meta, "name": name, "file": path.name}, indent=2, sort_keys=True) + "\n"
    _atomic_write_bytes(gdir / f"{name}.json", lambda fh: fh.write(text.encode("utf-8")))
    return path


def generators_dir(run_dir: str | Path) -> Path:
    """The ``generators/`` folder of a run folder (or of a node's run folder); ``run_dir`` may
    also be that folder itself."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise GeneratorError(f"run folder {run_dir.absolute()}: no such folder")
    if (run_dir / GENERATORS).is_dir():
        return run_dir / GENERATORS
    if run_dir.name == GENERATORS or (any(run_dir.glob("*.json")) and any(run_dir.glob("*.pt"))):
        return run_dir
    raise GeneratorError(f"run folder {run_dir.absolute()}: no saved generators (no {GENERATORS}/ folder in it)")


def list_generators(run_dir: str | Path) -> dict[str, dict]:
    """``{name: sidecar}`` of every complete generator (sidecar and weights) of a run, in
    natural order; unreadable sidecars are skipped."""
    gdir = generators_dir(run_dir)
    out = {}
    for side in sorted(gdir.glob("*.json"), key=lambda p: _natural_key(p.stem)):
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(meta, dict) and (gdir / f"{side.stem}.pt").is_file():
            out[side.stem] = meta
    return out


def build_from(meta: dict) -> nn.Module:
    """A fresh generator of the architecture in a sidecar."""
    arch = meta.get("architecture") or {}
    missing = [k for k in ARCH_KEYS if k not in arch]
    if missing:
        raise GeneratorError(f"generator {meta.get('name')!r}: its sidecar lacks architecture key(s) {missing}")
    return build_generator(str(arch["kind"]), latent_dim=int(arch["latent_dim"]), channels=int(arch["channels"]),
                           image_size=int(arch["image_size"]), features=int(arch["features"]))


def load_generator(run_dir: str | Path, name: str, device: str = "cpu") -> tuple[nn.Module, dict]:
    """The generator ``name`` of a run, rebuilt from its sidecar with its weights loaded, and
    the sidecar. GeneratorError naming the known generators when there is none of that name."""
    known = list_generators(run_dir)
    if name not in known:
        listed = ", ".join(known) if known else "none"
        raise GeneratorError(f"no generator {name!r} in {generators_dir(run_dir).absolute()}; known: {listed}")
    meta = known[name]
    G = build_from(meta)
    path = generators_dir(run_dir) / f"{name}.pt"
    try:
        G.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as exc:  # a torn or foreign file: say which, in one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise GeneratorError(f"generator {name!r}: {path} does not load into its architecture "
                             f"({type(exc).__name__}: {first})") from None
    return G.to(device), meta


# --------------------------------------------------------------------------- #
# Server side: the generators in a checkpoint
# --------------------------------------------------------------------------- #
def server_generators(obj: Any) -> list[tuple[str, dict, dict]]:
    """``(name, state_dict, extra sidecar fields)`` of the generators in a server checkpoint:
    PrivacyGAN's teacher and students, or the ``global`` generator (key ``g``)."""
    if not isinstance(obj, dict):
        return []
    out = []
    if "students" in obj:
        if obj.get("teacher_g") is not None:
            out.append(("teacher", obj["teacher_g"], {}))
        parts = obj.get("partition_of") or {}
        for nid, blob in sorted(obj["students"].items(), key=lambda kv: (parts.get(kv[0], 1 << 62), kv[0])):
            pid = parts.get(nid)
            name = f"student{int(pid)}" if pid is not None else f"student-node{nid}"
            out.append((name, blob["g"], {"partition_id": None if pid is None else int(pid)}))
    elif isinstance(obj.get("g"), dict):
        steps = obj.get("steps", obj.get("g_steps"))
        out.append(("global", obj["g"], {"steps": None if steps is None else int(steps)}))
    return out


def export_server_generators(folder: str | Path, cfg, obj: Any, *, flower_run_id: int | None = None) -> list[str]:
    """Write the generators of server checkpoint ``obj`` into ``<folder>/generators/``."""
    folder = Path(folder)
    names = []
    for name, state, extra in server_generators(obj):
        meta = sidecar(cfg, name, owner="server", rnd=int(obj.get("round", 0)), run=folder.name,
                       flower_run_id=flower_run_id)
        meta.update(extra)
        save_generator(folder, name, state, meta)
        names.append(name)
    return names


def mark_flower_run(folder: str | Path, flower_run_id: int | None) -> Path | None:
    """Leave ``.flower-run-<id>`` in the run folder so the run's simulated clients find it."""
    if flower_run_id is None:
        return None
    marker = Path(folder) / f"{MARKER}{flower_run_id}"
    marker.touch()
    return marker


def flower_run_id_of(grid: Any) -> int | None:
    """The Flower run id of a ServerApp's grid (None for a test double without one)."""
    try:
        return int(grid.run.run_id)
    except Exception:
        return None


# --------------------------------------------------------------------------- #
# Client side: the generator a client trained, written by the client itself
# --------------------------------------------------------------------------- #
# message type -> (context.state record, blob key of G, blob key of its step count, name prefix)
CLIENT_GENERATORS = {
    "train.alone": ("local.client", "G", "steps", "client"),
    "query.alone_sample": ("local.client", "G", "steps", "client"),
    "evaluate.alone": ("local.client", "G", "steps", "client"),
    "train.local": ("mggan.client", "G", "iteration", "client"),
    "query.sample": ("mggan.client", "G", "iteration", "client"),
    "train.generator_step": ("bpgan.generator", "g", "g_steps", "gb"),
    "query.bpgan_sample": ("bpgan.generator", "g", "g_steps", "gb"),
}
_RUN_FOLDERS: dict[tuple, Path] = {}


def find_run_folder(cfg, flower_run_id: int) -> Path | None:
    """The run folder the server made for Flower run ``flower_run_id`` on this machine (its
    marker), under ``output-dir`` (or the ``resume`` folder); None when it is not here."""
    key = (cfg.output_dir, cfg.resume, flower_run_id)
    if key in _RUN_FOLDERS:
        return _RUN_FOLDERS[key]
    marker = f"{MARKER}{flower_run_id}"
    hits = []
    if cfg.resume and (Path(cfg.resume).expanduser() / marker).exists():
        hits = [Path(cfg.resume).expanduser() / marker]
    if not hits:
        hits = sorted((resolve_output_dir(cfg.output_dir) / "runs").glob(f"*/{marker}"))
    if not hits:
        return None
    _RUN_FOLDERS[key] = hits[0].parent.absolute()
    return _RUN_FOLDERS[key]


def deployed(node_config) -> bool:
    """A SuperNode of a deployment (its own data folder, role or node folder configured);
    a simulated node's config holds only partition-id and num-partitions."""
    return any(k in node_config for k in ("data-path", "role", NODE_DIR))


def node_root(cfg, node_config) -> Path:
    """A deployed node's own folder: ``node-dir``, else the run's ``output-dir`` resolved on the node."""
    base = str(node_config.get(NODE_DIR, "") or "")
    return Path(base).expanduser().absolute() if base else resolve_output_dir(cfg.output_dir)


def node_run_folder(cfg, node_config, flower_run_id: int) -> Path:
    """A deployed node's folder for this run: ``<node-dir>/node-runs/flower-run-<id>``."""
    return node_root(cfg, node_config) / NODE_RUNS / f"flower-run-{flower_run_id}"


def client_target(cfg, node_config, flower_run_id: int) -> tuple[Path, str]:
    """Where this client writes its generator, and the run's name for the sidecar."""
    if not deployed(node_config):
        run = find_run_folder(cfg, flower_run_id)
        if run is not None:
            return run, run.name
        log.warning("the run folder of Flower run %s is not under %s; this client keeps its generator in its "
                    "node folder instead", flower_run_id, resolve_output_dir(cfg.output_dir) / "runs")
    folder = node_run_folder(cfg, node_config, flower_run_id)
    return folder, folder.name


def message_round(msg) -> int | None:
    """The round a strategy message belongs to (its group id, else its config's ``round``)."""
    try:
        return int(msg.metadata.group_id)
    except (TypeError, ValueError):
        pass
    try:
        return int(msg.content.config_records["config"]["round"])
    except Exception:
        return None


def due(cfg, rnd: int | None) -> bool:
    """A checkpoint round (``checkpoint-every``) or the last round."""
    if rnd is None:
        return False
    return (cfg.checkpoint_every > 0 and rnd % cfg.checkpoint_every == 0) or rnd >= cfg.num_rounds


def keep_client_generator(cfg, msg, context) -> Path | None:
    """After a message that trained (or sampled) this client's own generator, in a checkpoint
    round or the last one: write the generator unless this state was written already."""
    spec = CLIENT_GENERATORS.get(msg.metadata.message_type)
    if spec is None:
        return None
    record, g_key, steps_key, prefix = spec
    rnd = message_round(msg)
    state = context.state
    if not due(cfg, rnd) or record not in state.config_records:
        return None
    blob = torch.load(io.BytesIO(state.config_records[record]["blob"]), map_location="cpu", weights_only=False)
    steps = int(blob.get(steps_key, 0))
    if SAVED in state.config_records:
        done = state.config_records[SAVED]
        if int(done["round"]) == rnd and int(done["steps"]) == steps:
            return None
    pid = context.node_config.get("partition-id")
    name = f"{prefix}{int(pid)}" if pid is not None else f"{prefix}-node{context.node_id}"
    folder, run = client_target(cfg, context.node_config, context.run_id)
    meta = sidecar(cfg, name, owner="client", rnd=rnd, steps=steps, run=run, flower_run_id=context.run_id,
                   partition_id=None if pid is None else int(pid))
    path = save_generator(folder, name, blob[g_key], meta)
    from flwr.app import ConfigRecord

    state.config_records[SAVED] = ConfigRecord({"round": int(rnd), "steps": steps})
    return path


def client_generator_mod(config_of):
    """A Flower client mod that keeps this client's generator (:func:`keep_client_generator`)
    after each reply; ``config_of(context)`` gives the run's Config. A failure to write is
    logged, never turned into an error reply (the training it follows did happen)."""

    def mod(msg, context, call_next):
        reply = call_next(msg, context)
        if msg.metadata.message_type in CLIENT_GENERATORS and not reply.has_error():
            try:
                keep_client_generator(config_of(context), msg, context)
            except Exception as exc:  # noqa: BLE001 - reported, the reply still goes
                log.error("could not save this client's generator: %s: %s", type(exc).__name__, exc)
        return reply

    return mod


__all__ = ["GENERATORS", "MARKER", "NODE_DIR", "GeneratorError", "architecture", "sidecar", "save_generator",
           "generators_dir", "list_generators", "build_from", "load_generator", "server_generators",
           "export_server_generators", "mark_flower_run", "flower_run_id_of", "find_run_folder", "deployed",
           "node_run_folder", "client_target", "keep_client_generator", "client_generator_mod", "CLIENT_GENERATORS"]
