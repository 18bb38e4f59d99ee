"""Local-only baseline (SPEC 1 and 4.5; the thesis' "GAN on the local dataset").

Every client trains its own (G_i, D_i) on its own data and never shares them: each
round the server sends ``train.alone`` (a ConfigRecord of settings) and client i runs
``local-steps`` base-GAN steps (``models.steps.train_gan_step``), keeping both networks,
both optimizers and its step count in its ``context.state``; the reply holds scalar
metrics only. For sample grids and the final evaluation the server asks for generated
samples (``query.alone_sample``), one row / set per client, as PrivacyGAN shows one
student per client. Every client starts from the same networks as the other baselines
(initialised from the run's seed), so differences come from the data alone.
"""

from __future__ import annotations

import io
import math
import random
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
from flwr.app import ConfigRecord, MetricRecord, RecordDict
from flwr.serverapp import Grid
from torch import nn

from models.dp import DPConfig
from models.steps import sample_latent
from strategies import wire
from strategies import client_eval
from strategies.base import (ClientDP, check_dp_reply, dp_columns, FederatedSettings, NodeBook, Recorder,
                             check_stop, exchange, gan_config, gan_optimizers, local_gan_steps, log,
                             param_dtype, require_replies, sample_nodes, seeded_models, should, wait_for_nodes)
from strategies.wire import make_message, require_metrics

ALONE = "train.alone"
ALONE_SAMPLE = "query.alone_sample"
SAMPLES = "samples"               # ArrayRecord {SAMPLES: (n, *sample)} client -> server, on request
CLIENT_STATE = "local.client"     # context.state ConfigRecord: G_i, D_i, optimizers, steps (a torch.save blob)
TRAIN_METRICS = ("g_loss", "d_loss", "d_real_acc", "d_fake_acc", "steps_total")


# =====================================================================================
# Client side: (G_i, D_i) never leave client i
# =====================================================================================
def load_alone(state: RecordDict, cfg: ConfigRecord, build_generator, build_discriminator, device: str):
    """(G, D, opt_g, opt_d, steps) of this client: from ``state``, or new ones on first contact
    (initialised from the run seed in the config, like the other baselines' networks)."""
    G, D = seeded_models(build_generator, build_discriminator, int(cfg["seed"]), device)
    opt_g, opt_d = gan_optimizers(cfg, G, D)
    steps = 0
    if CLIENT_STATE in state.config_records:
        blob = torch.load(io.BytesIO(state.config_records[CLIENT_STATE]["blob"]), map_location=device,
                          weights_only=False)
        G.load_state_dict(blob["G"])
        D.load_state_dict(blob["D"])
        opt_g.load_state_dict(blob["opt_g"])
        opt_d.load_state_dict(blob["opt_d"])
        steps = int(blob["steps"])
    return G, D, opt_g, opt_d, steps


def save_alone(state: RecordDict, G, D, opt_g, opt_d, steps: int) -> None:
    buf = io.BytesIO()
    torch.save({"G": G.state_dict(), "D": D.state_dict(), "opt_g": opt_g.state_dict(), "opt_d": opt_d.state_dict(),
                "steps": steps}, buf)
    state.config_records[CLIENT_STATE] = ConfigRecord({"blob": buf.getvalue(), "steps": steps})


def client_alone(content: RecordDict, state: RecordDict, *,
                 sample_real: Callable[[int, torch.Generator], torch.Tensor],
                 build_generator: Callable[[], nn.Module], build_discriminator: Callable[[], nn.Module],
                 device: str, seed: int, partition_id: int | None = None,
                 dp: DPConfig | None = None, real_data: torch.Tensor | None = None) -> RecordDict:
    """``train.alone``: ``steps`` GAN steps of this client's own (G_i, D_i); metrics only go back.

    With ``dp`` every D step is a DP-SGD step (models/dp.py) counted in the client's accountant
    (reply metric ``dp_epsilon``); a client whose steps this round would exceed
    ``dp-target-epsilon`` trains nothing and says so (``dp_exhausted`` = 1)."""
    cfg = content.config_records[wire.CONFIG]
    G, D, opt_g, opt_d, done = load_alone(state, cfg, build_generator, build_discriminator, device)
    private, stop = ClientDP.begin(dp, state, real_data, D, str(cfg["loss"]), batch_size=int(cfg["batch-size"]),
                                   steps_more=int(cfg["steps"]) * int(cfg["client-disc-steps"]), seed=seed,
                                   partition_id=partition_id, device=device)
    if stop is not None:
        return stop
    stats = local_gan_steps(G, D, opt_g, opt_d, sample_real=sample_real, cfg=cfg, seed=seed,
                            partition_id=partition_id, steps_done=done, device=device, dp=private)
    done += int(cfg["steps"])
    save_alone(state, G, D, opt_g, opt_d, done)
    if private is not None:
        private.save()
    metrics = {"g_loss": stats.get("g_loss", math.nan), "d_loss": stats.get("d_loss", math.nan),
               "d_real_acc": stats.get("d_real_acc", math.nan), "d_fake_acc": stats.get("d_fake_acc", math.nan),
               "steps_total": done, **(private.metrics() if private is not None else {})}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({wire.METRICS: MetricRecord(metrics)})


def client_alone_sample(content: RecordDict, state: RecordDict, *, build_generator: Callable[[], nn.Module],
                        build_discriminator: Callable[[], nn.Module], device: str,
                        partition_id: int | None = None) -> RecordDict:
    """``query.alone_sample``: ``n`` samples of G_i from latents seeded by the server (generated data only)."""
    cfg = content.config_records[wire.CONFIG]
    G, _, _, _, done = load_alone(state, cfg, build_generator, build_discriminator, device)
    z = sample_latent(int(cfg["n"]), G.latent_dim, generator=torch.Generator(device=device).manual_seed(
        int(cfg["sample-seed"])), device=device)
    with torch.no_grad():
        x = G(z.to(param_dtype(G)))
    metrics = {"steps_total": done}
    if partition_id is not None:
        metrics["partition_id"] = int(partition_id)
    return RecordDict({SAMPLES: wire.tensor_record(**{SAMPLES: x.float()}), wire.METRICS: MetricRecord(metrics)})


# =====================================================================================
# Server side: only coordinates; holds no networks
# =====================================================================================
@dataclass(frozen=True)
class LocalSettings(FederatedSettings):
    """Each client alone: ``local_steps`` GAN steps per round on its own data."""

    local_steps: int = 25
    client_disc_steps: int = 1


class Local:
    """Server loop of the local-only baseline. ``evaluate(samples_by_client)`` (from the app)
    scores each client's generator on ``eval_samples`` samples at the end."""

    def __init__(self, settings: LocalSettings, *, recorder: Recorder,
                 evaluate: Callable[[dict[str, torch.Tensor]], dict] | None = None,
                 describe_partition: Callable[[int, int], str] | None = None,
                 global_histogram: list[int] | None = None) -> None:
        self.s = settings
        self.recorder = recorder
        self.evaluate = evaluate
        self.global_histogram = global_histogram
        self.eval_comm = wire.CommLog()     # evaluate.alone: clients score their own fakes
        self.nodes = NodeBook(describe_partition)
        self.comm = wire.CommLog()          # training traffic (train.alone)
        self.sample_comm = wire.CommLog()   # sample queries for grids and evaluation
        self.rng = random.Random(settings.seed)
        self.dropped_total = 0
        self.steps_of: dict[int, int] = {}

    # --- message contents (pure) ----------------------------------------------------------
    def train_content(self, rnd: int) -> RecordDict:
        s = self.s
        return RecordDict({wire.CONFIG: gan_config(
            loss=s.loss, gen_lr=s.gen_lr, disc_lr=s.disc_lr, beta1=s.beta1, beta2=s.beta2, batch_size=s.batch_size,
            steps=s.local_steps, disc_steps=s.client_disc_steps, rnd=rnd, seed=s.seed)})

    def sample_content(self, rnd: int, n: int, sample_seed: int) -> RecordDict:
        content = self.train_content(rnd)
        content.config_records[wire.CONFIG]["n"] = n
        content.config_records[wire.CONFIG]["sample-seed"] = sample_seed
        return content

    @staticmethod
    def parse_train(content: RecordDict) -> dict[str, float]:
        """Metrics of a ``train.alone`` reply; a reply carrying anything but metrics is refused."""
        extra = [name for name, _ in content.items() if name != wire.METRICS]
        if extra:
            raise wire.BadReply(f"unexpected record(s) {extra} in a local-training reply (only metrics may travel)")
        metrics = wire.metrics_of(content)
        check_dp_reply(metrics)   # a client at its dp-target-epsilon did not train
        require_metrics(metrics, TRAIN_METRICS)
        return metrics

    @staticmethod
    def parse_samples(content: RecordDict, n: int) -> torch.Tensor:
        if SAMPLES not in content.array_records or SAMPLES not in content.array_records[SAMPLES]:
            raise wire.BadReply(f"missing array '{SAMPLES}.{SAMPLES}'")
        x = wire.get_tensor(content.array_records[SAMPLES], SAMPLES)
        if x.shape[0] != n or not torch.isfinite(x).all():
            raise wire.BadReply(f"samples have shape {tuple(x.shape)} (expected {n} rows) or hold NaN/Inf")
        return x

    # --- rounds ----------------------------------------------------------------------------
    def run_round(self, grid: Grid, rnd: int, nodes: list[int]) -> dict:
        selected = sample_nodes(nodes, self.s.fraction_train, self.s.min_replies, self.rng)
        msgs = {nid: make_message(self.train_content(rnd), nid, ALONE, rnd) for nid in selected}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=lambda nid, r: self.parse_train(r.content),
                      max_reply_mb=self.s.max_reply_mb)
        self.dropped_total += len(ex.dropped)
        self.nodes.identify(dict(ex.replies), live=selected)
        for nid, m in ex.replies.items():
            self.steps_of[nid] = int(m["steps_total"])
        for nid in selected:
            self.comm.add(rnd, nid, ALONE, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                          partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped)
        require_replies(rnd, ex, self.s.min_replies)
        clients = {self.nodes.label(nid): {"node": nid, **{k: ex.replies[nid][k] for k in TRAIN_METRICS},
                                           **dp_columns(ex.replies[nid])}
                   for nid in self.nodes.order(ex.replies)}
        for row in clients.values():
            row["steps_total"] = int(row["steps_total"])
        mean = lambda k: sum(c[k] for c in clients.values()) / len(clients)  # noqa: E731
        return {"round": rnd, "g_loss": mean("g_loss"), "d_loss": mean("d_loss"), "d_real_acc": mean("d_real_acc"),
                "d_fake_acc": mean("d_fake_acc"), "replies": len(ex.replies), "dropped": len(ex.dropped),
                "dropped_reasons": {str(n): why for n, why in ex.dropped.items()},
                "bytes_down": sum(ex.bytes_down.values()), "bytes_up": sum(ex.bytes_up.values()),
                "clients": clients}

    def collect_samples(self, grid: Grid, rnd: int, n: int, sample_seed: int,
                        phase: str = "samples") -> tuple[dict[str, torch.Tensor], int, int]:
        """n samples from every client that has trained (``query.alone_sample``); bytes down/up.

        This traffic exists only to look at / score the clients' generators (the other
        baselines sample on the server), so it is booked apart from the training bytes:
        its own rows in comm.jsonl (action ``query.alone_sample``) and ``sample_bytes_*``.
        """
        nodes = self.nodes.order(self.steps_of)
        msgs = {nid: make_message(self.sample_content(rnd, n, sample_seed), nid, ALONE_SAMPLE, rnd) for nid in nodes}
        ex = exchange(grid, msgs, timeout=self.s.round_timeout, parse=lambda nid, r: self.parse_samples(r.content, n),
                      max_reply_mb=self.s.max_reply_mb)
        self.dropped_total += len(ex.dropped)
        for nid in nodes:
            self.sample_comm.add(rnd, nid, ALONE_SAMPLE, ex.bytes_down.get(nid, 0), ex.bytes_up.get(nid, 0),
                                 partition=self.nodes.partition_of.get(nid), dropped=nid in ex.dropped, phase=phase)
        rows = {self.nodes.label(nid): ex.replies[nid] for nid in nodes if nid in ex.replies}
        return rows, sum(ex.bytes_down.values()), sum(ex.bytes_up.values())

    def checkpoint(self, rnd: int) -> dict:
        """The server side of the run (the networks live on the clients and stay there)."""
        return {"round": rnd, "settings": asdict(self.s), "partition_of": dict(self.nodes.partition_of),
                "steps_of": dict(self.steps_of), "comm": self.comm.state(), "sample_comm": self.sample_comm.state(),
                "dropped_total": self.dropped_total, "rng": self.rng.getstate()}

    def run(self, grid: Grid) -> dict:
        s = self.s
        nodes = wait_for_nodes(grid, s.min_nodes, s.node_wait_timeout)
        self.nodes.num_nodes = len(nodes)
        log.info("Local: %d clients each train alone, %d rounds x %d steps", len(nodes), s.num_rounds, s.local_steps)
        last: dict = {}
        evaluation: dict = {}
        for rnd in range(1, s.num_rounds + 1):
            check_stop()
            nodes = sorted(grid.get_node_ids()) or nodes
            t0 = time.monotonic()
            record = self.run_round(grid, rnd, nodes)
            record["wall_time"] = time.monotonic() - t0  # training only (sample grids and scoring excluded)
            record["sample_bytes_down"] = record["sample_bytes_up"] = 0
            if should(s.sample_every, rnd, s.num_rounds):
                rows, down, up = self.collect_samples(grid, rnd, s.samples_per_client, s.seed + 29)
                record["sample_bytes_down"] += down
                record["sample_bytes_up"] += up
                self.recorder.save_samples(f"round{rnd:05d}", rows)
            if (self.evaluate is not None or s.client_eval) and should(s.eval_every, rnd, s.num_rounds):
                t_eval = time.monotonic()
                if self.evaluate is not None:  # the same latents as the clients' own scoring below
                    sets, down, up = self.collect_samples(grid, rnd, s.eval_samples, s.seed + 31, phase="eval")
                    record["sample_bytes_down"] += down
                    record["sample_bytes_up"] += up
                    evaluation = self.evaluate(sets) if sets else {}
                    record["eval"] = evaluation
                if s.client_eval:
                    contents = {nid: self.sample_content(rnd, s.eval_samples, s.seed + 31)
                                for nid in self.nodes.order(self.steps_of) if nid in nodes}
                    record.update(client_eval.evaluate_clients(
                        grid, contents, client_eval.EVAL_ALONE, rnd=rnd, timeout=s.round_timeout,
                        comm=self.eval_comm, label=self.nodes.label, partition_of=self.nodes.partition_of,
                        global_histogram=self.global_histogram))
                record["eval_time"] = time.monotonic() - t_eval
            self.recorder.log_round(record)
            self.recorder.log_comm(self.comm.round_rows(rnd) + self.sample_comm.round_rows(rnd)
                                   + self.eval_comm.round_rows(rnd))
            self.recorder.progress(rnd, {k: record[k] for k in ("g_loss", "d_loss", "d_real_acc", "d_fake_acc")})
            if should(s.checkpoint_every, rnd, s.num_rounds):
                self.recorder.save_checkpoint("server.pt", self.checkpoint(rnd))
            last = record
        return {"rounds": s.num_rounds, "last": last, "bytes_down": self.comm.down_total,
                "bytes_up": self.comm.up_total, "sample_bytes_down": self.sample_comm.down_total,
                "sample_bytes_up": self.sample_comm.up_total, "dropped_replies": self.dropped_total,
                "clients": {self.nodes.label(n): n for n in self.nodes.order(self.steps_of)}, "eval": evaluation,
                "client_eval": last.get("client_eval", {}),
                "eval_bytes": self.eval_comm.down_total + self.eval_comm.up_total}


__all__ = ["Local", "LocalSettings", "client_alone", "client_alone_sample", "load_alone", "save_alone",
           "ALONE", "ALONE_SAMPLE", "SAMPLES", "CLIENT_STATE", "TRAIN_METRICS"]
