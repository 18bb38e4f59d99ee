"""The ClientApp: one handler per action; the client's data and D_i stay here.

Settings come from the run config (``flwr run``) or from the Config captured by
:func:`make_client_app` (simulation scripts, where ``context.run_config`` is empty).
In a deployment a SuperNode may point at its own private data with
``--node-config "data-path='/path/to/folder-or-zip'"``; the path is never sent anywhere.
"""

from __future__ import annotations

import dataclasses
from functools import lru_cache

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.builders import geometry, make_discriminator, make_generator
from app.config import Config, config_from_context, resolve_device
from app.data import ArrayDataset, client_dataset
from strategies import mggan
from strategies.privacygan import client_discriminate


@lru_cache(maxsize=8)
def _parsed(items: tuple) -> Config:
    return config_from_context(dict(items))


def _config(fixed: Config | None, context: Context) -> Config:
    return fixed if fixed is not None else _parsed(tuple(sorted(context.run_config.items())))


def local_data(cfg: Config, context: Context) -> tuple[ArrayDataset, int | None]:
    """This node's private training data and its partition id (None in a deployment without one)."""
    node = context.node_config
    data_path = str(node.get("data-path", "") or "")
    if data_path:
        # A deployment node's own folder-per-class tree (or zip): all of it is this client's.
        geo = geometry(cfg)  # the run's image geometry, so the node's images fit the run's networks
        spec = dataclasses.replace(cfg.data_spec(), dataset=f"imagefolder:{data_path}", partition="full",
                                   server_data="none", image_size=geo.image_size, channels=geo.channels)
        pid = node.get("partition-id")
        return client_dataset(spec, 0, 1), (int(pid) if pid is not None else None)
    pid, n = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    return client_dataset(cfg.data_spec(), pid, n), pid


ROLES = {"discriminator": 0, "generator": 1}


def node_info(node_config) -> dict[str, int]:
    """partition_id (when set), role (0 discriminator / 1 generator / -1 unknown) and has_data.

    The role comes from the node config (``role='discriminator'|'generator'``, deployment);
    without one, from the partition id as in a BPGAN simulation (even: discriminator,
    odd: generator).
    """
    out: dict[str, int] = {"has_data": int(bool(node_config.get("data-path")))}
    pid = node_config.get("partition-id")
    if pid is not None:
        out["partition_id"] = int(pid)
    if "role" in node_config:
        out["role"] = ROLES.get(str(node_config["role"]), -1)
    else:
        out["role"] = int(pid) % 2 if pid is not None else -1
    return out


def make_client_app(config: Config | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; ``config`` fixes the settings (else they come from the run config).

    ``mods`` are Flower client mods (``mod(msg, context, call_next)``), e.g. to inspect
    every message in tests.
    """
    app = ClientApp(mods=mods or [])

    @app.train("discriminate")
    def discriminate(msg: Message, context: Context) -> Message:
        cfg = _config(config, context)
        data, pid = local_data(cfg, context)
        device = resolve_device(cfg.device)
        x = data.x

        def sample_real(batch: int, gen: torch.Generator) -> torch.Tensor:
            return x[torch.randint(len(x), (batch,), generator=gen)]

        reply = client_discriminate(
            msg.content, context.state, sample_real=sample_real,
            build_discriminator=lambda: make_discriminator(cfg), disc_lr=cfg.client_disc_lr,
            betas=(cfg.adam_beta1, cfg.adam_beta2), device=device, seed=cfg.seed, partition_id=pid)
        return Message(content=reply, reply_to=msg)

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        """What the server may know about this node: its partition id, its role and whether
        it holds a private data folder (never the path or anything about the data)."""
        return Message(content=RecordDict({"metrics": MetricRecord(node_info(context.node_config))}), reply_to=msg)

    # --- MGGAN: group k's (G_k, D_k) live here -------------------------------------------
    def builders(cfg: Config) -> dict:
        return {"build_generator": lambda: make_generator(cfg),
                "build_discriminator": lambda: make_discriminator(cfg), "device": resolve_device(cfg.device)}

    @app.train("local")
    def local(msg: Message, context: Context) -> Message:
        cfg = _config(config, context)
        data, pid = local_data(cfg, context)
        x = data.x

        def sample_real(batch: int, gen: torch.Generator) -> torch.Tensor:
            return x[torch.randint(len(x), (batch,), generator=gen)]

        reply = mggan.client_local(msg.content, context.state, sample_real=sample_real, seed=cfg.seed,
                                   partition_id=pid, **builders(cfg))
        return Message(content=reply, reply_to=msg)

    @app.query("get_discriminator")
    def get_discriminator(msg: Message, context: Context) -> Message:
        reply = mggan.client_get_discriminator(msg.content, context.state, **builders(_config(config, context)))
        return Message(content=reply, reply_to=msg)

    @app.query("sample")
    def sample(msg: Message, context: Context) -> Message:
        reply = mggan.client_sample(msg.content, context.state, **builders(_config(config, context)))
        return Message(content=reply, reply_to=msg)

    return app


app = make_client_app()
