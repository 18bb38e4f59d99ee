"""The ClientApp: one handler per action; the client's data and D_i stay here.

Settings come from the run config (``flwr run``) or from the Config captured by
:func:`make_client_app` (simulation scripts, where ``context.run_config`` is empty).
In a deployment a SuperNode may point at its own private data with
``--node-config "data-path='/path/to/folder-or-zip'"``; the path is never sent anywhere.
A client that trains its own generator writes it itself (never sends it): into the run folder in
a simulation, into ``node-dir`` (node config; default: ``output-dir`` resolved on the node) when
deployed -- see app/generators.py.
"""

from __future__ import annotations

import time

_IMPORT_START = time.time()   # the timing trace (FEDGAN_TRACE) splits a message's seconds at these marks

import dataclasses
import inspect
import os
from functools import lru_cache
from typing import Callable

import torch
from flwr.app import Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from app.builders import dp_settings, geometry, image_evaluator, make_discriminator, make_generator
from app.config import Config, check_dp_data, config_from_context, resolve_device
from app.data import ArrayDataset, batch_sampler, client_dataset, set_image_cache_dir
from app.generators import client_generator_mod, node_root
from app.metrics import ImageEvaluator, ensure_classifier
from strategies import bpgan, client_eval, cohort, dataparallel, fedavg, local, mggan, wire
from strategies.base import TRACE_ENV, trace
from strategies.privacygan import client_discriminate, client_discriminate_cohort, cohort_can_batch

# --- per-client evaluation (SPEC 6): scores of fakes against this client's own data -------------
MAX_REAL_FOR_EVAL = 10_000
_evaluators: dict[tuple, ImageEvaluator] = {}


def own_data_evaluator(cfg: Config, data: ArrayDataset, pid: int | None) -> ImageEvaluator:
    """This client's evaluator: the run's feature net, the dataset classifier for labels, and
    the features of (up to 10,000 of) its own images. Built once per process and reused."""
    key = (cfg, pid, len(data))
    if key not in _evaluators:
        geo = geometry(cfg)   # a missing digits classifier trains itself here (seconds), as on the server
        ensure_classifier(cfg.dataset, geo.image_size, geo.channels, cfg.evaluator_dir)
        ev = image_evaluator(cfg, resolve_device(cfg.device), tv_name="tv_own")
        own = data
        if len(own) > MAX_REAL_FOR_EVAL:
            own = own.subset(torch.randperm(len(own), generator=torch.Generator().manual_seed(cfg.seed))
                             [:MAX_REAL_FOR_EVAL])
        ev.set_real(own.x, own.y, data.num_classes)
        _evaluators.clear()  # one client's evaluator per process is enough; bounds memory
        _evaluators[key] = ev
    return _evaluators[key]


def score_on_own_data(cfg: Config, data: ArrayDataset, pid: int | None, fakes: torch.Tensor) -> RecordDict:
    """The evaluate reply: scalars and the fakes' label histogram only (client_eval.ALLOWED).
    ``own_share`` and ``tv_own`` compare the fakes' labels with this client's own labels, which
    never leave it."""
    evaluator = own_data_evaluator(cfg, data, pid)
    scores = evaluator.score(fakes)
    if len(evaluator.real_histogram or []) != len(scores["label_histogram"]):
        raise ValueError(f"this node's data has {data.num_classes} classes of its own (e.g. the folders of its "
                         f"data-path) and the '{cfg.dataset}' classifier labels {len(scores['label_histogram'])}: "
                         f"its labels cannot be compared with the classifier's")
    metrics = {"fid": scores["fid"], "kid": scores["kid"], "kid_std": scores["kid_std"], "tv_own": scores["tv_own"],
               "num_fake": scores["num_samples"], "num_real": scores["num_real"],
               client_eval.OWN_SHARE: client_eval.own_class_share(scores["label_histogram"],
                                                                  evaluator.real_histogram),
               client_eval.HISTOGRAM: [int(v) for v in scores["label_histogram"]]}
    if pid is not None:
        metrics["partition_id"] = int(pid)
    return RecordDict({wire.METRICS: MetricRecord(metrics)})


# --- diagnostic: is D_i's score class-selective? (issue #17; opt-in, printed on the client only) --
D_FILTER_ENV = "FEDGAN_DIAG_D_FILTER"


def d_filter_fractions() -> tuple[float, ...]:
    """The fractions FEDGAN_DIAG_D_FILTER asks for (e.g. ``0.5,0.1``); () when unset. Anything
    else than numbers in (0, 1] stops with a message naming the variable."""
    raw = os.environ.get(D_FILTER_ENV, "").strip()
    if not raw:
        return ()
    try:
        fracs = tuple(float(f) for f in raw.split(","))
    except ValueError:
        fracs = ()
    if not fracs or not all(0.0 < f <= 1.0 for f in fracs):
        raise ValueError(f"{D_FILTER_ENV}={raw!r}: give fractions in (0, 1], comma-separated, e.g. 0.5,0.1")
    return fracs


def d_filtered_scores(D: torch.nn.Module, fakes: torch.Tensor, evaluator: ImageEvaluator,
                      fractions: tuple[float, ...], batch_size: int) -> dict[float, dict]:
    """Own-class share and FID of the fraction of ``fakes`` that ``D`` scores most real, for each
    fraction (1.0: all of them). If D_i's score singled out the client's own classes, keeping the
    samples it rates highest would raise the share; this measures by how much. D runs in training
    mode in batches of ``batch_size``, as when it labels fakes during training."""
    was_training = D.training
    D.train()
    with torch.no_grad():
        logits = torch.cat([D(fakes[i:i + batch_size]).reshape(-1) for i in range(0, len(fakes), batch_size)])
    D.train(was_training)
    order = torch.argsort(logits, descending=True)
    out = {}
    for frac in (1.0, *fractions):
        keep = order[: max(1, int(round(len(fakes) * frac)))]
        sc = evaluator.score(fakes[keep])
        out[frac] = {"own_share": client_eval.own_class_share(sc["label_histogram"], evaluator.real_histogram),
                     "fid": float(sc["fid"]), "num": int(keep.numel())}
    return out


def _print_d_filter(cfg: Config, data: ArrayDataset, pid: int | None, fakes: torch.Tensor, context: Context) -> None:
    from strategies.privacygan import CLIENT_STATE, load_client_state

    if CLIENT_STATE not in context.state.config_records:
        return
    D = make_discriminator(cfg)
    D.load_state_dict(load_client_state(context.state.config_records[CLIENT_STATE])["d"])
    scores = d_filtered_scores(D, fakes, own_data_evaluator(cfg, data, pid), d_filter_fractions(), cfg.batch_size)
    print(f"[fedgan] D_i filter, partition {pid}: " + " | ".join(
        f"top {f:.2f}: own-class share {s['own_share']:.3f}, FID {s['fid']:.1f}" for f, s in scores.items()),
        flush=True)


@lru_cache(maxsize=8)
def _parsed(items: tuple) -> Config:
    # dataset=imagefolder:<path> names a path on the server's machine; a deployed node reads
    # its own data-path instead (and one without it fails with a DataError naming the path)
    return config_from_context(dict(items), check_paths=False)


def _config(fixed: Config | None, context: Context) -> Config:
    return fixed if fixed is not None else _parsed(tuple(sorted(context.run_config.items())))


@lru_cache(maxsize=8)
def reusable_modules(cfg: Config) -> dict:
    """Per process and run config: networks a handler may load a returning client's state into
    instead of building new ones (a simulation actor serves many clients, one message at a time)."""
    return {}


@lru_cache(maxsize=64)
def client_dp(cfg: Config, n: int):
    """This client's DP settings (models.dp.DPConfig; None with dp off), checked against its
    dataset size ``n`` at first contact: ``dp-delta`` < 1/n, and with ``dp-target-epsilon`` the
    noise multiplier derived for its own sample rate q = batch-size / n (a ConfigError naming
    the key otherwise: the client's reply is an error, the server drops it with that reason)."""
    dp = dp_settings(cfg)
    if dp is None:
        return None
    sigma = check_dp_data(cfg, n)
    return dataclasses.replace(dp, noise_multiplier=sigma)


def check_dp_partitions(cfg: Config, num_partitions: int) -> None:
    """Before a simulation starts: every virtual client's DP check (:func:`client_dp`) on the
    partition it will hold, so a ``dp-delta`` >= 1/n or an unreachable ``dp-target-epsilon``
    stops the launch naming the key instead of failing round 1 (a deployed node still checks
    its own data at first contact)."""
    if not cfg.dp:
        return
    from app.data import partition_summary

    holders = max(1, num_partitions // 2) if cfg.strategy == "bpgan" else num_partitions   # see local_data
    for part in partition_summary(cfg.data_spec(), holders):
        client_dp(cfg, int(part["size"]))


_DATA_SECONDS: list[float] = []   # data loading time of the message being handled (trace only)


def local_data(cfg: Config, context: Context) -> tuple[ArrayDataset, int | None]:
    """This node's private training data and its partition id (None in a deployment without one)."""
    start = time.perf_counter()
    try:
        return _local_data(cfg, context)
    finally:
        _DATA_SECONDS.append(time.perf_counter() - start)


def _local_data(cfg: Config, context: Context) -> tuple[ArrayDataset, int | None]:
    node = context.node_config
    data_path = str(node.get("data-path", "") or "")
    if data_path:
        # A deployment node's own folder-per-class tree (or zip): all of it is this client's,
        # decoded once into the node's own folder (app/data.py: set_image_cache_dir), never sent.
        set_image_cache_dir(node_root(cfg, node) / "data-cache")
        geo = geometry(cfg)  # the run's image geometry, so the node's images fit the run's networks
        spec = dataclasses.replace(cfg.data_spec(), dataset=f"imagefolder:{data_path}", partition="full",
                                   server_data="none", image_size=geo.image_size, channels=geo.channels)
        pid = node.get("partition-id")
        return client_dataset(spec, 0, 1), (int(pid) if pid is not None else None)
    pid, n = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
    if cfg.strategy == "bpgan":  # only the discriminator nodes (even ids) hold data: split it among them
        return client_dataset(cfg.data_spec(), pid // 2, max(1, n // 2)), pid
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


def process_start_time() -> float | None:
    """When this process started (epoch seconds): the fork time a warm launcher recorded
    (app/warm.py), else from /proc (clock ticks since boot, ~10 ms), else psutil's."""
    if forked := os.environ.get("FEDGAN_FORKED_AT"):
        return float(forked)
    try:
        with open("/proc/self/stat") as fh:
            ticks = int(fh.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/uptime") as fh:
            uptime = float(fh.read().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        try:
            import psutil
            return psutil.Process().create_time()
        except Exception:   # noqa: BLE001 -- the trace is best effort
            return None


def trace_mod(msg: Message, context: Context, call_next) -> Message:
    """With ``FEDGAN_TRACE`` set on the node: one JSON line per message with the marks that split
    its time (process start, app import, handler, data loading); docs/DEPLOYMENT.md."""
    if not os.environ.get(TRACE_ENV):
        return call_next(msg, context)
    _DATA_SECONDS.clear()
    start = time.time()
    reply = None
    try:
        reply = call_next(msg, context)
        return reply
    finally:
        end = time.time()
        out = {} if reply is None or reply.has_error() else {"bytes_out": wire.message_bytes(reply),
                                                              "records_out": record_names(reply.content)}
        trace(side="client", msg=msg.metadata.message_id, type=msg.metadata.message_type,
              round=msg.metadata.group_id, partition=context.node_config.get("partition-id"),
              node=context.node_id, proc_start=process_start_time(), import_start=_IMPORT_START,
              import_end=_IMPORT_END, handler_start=start, data_s=sum(_DATA_SECONDS), handler_end=end,
              bytes_in=wire.message_bytes(msg), records_in=record_names(msg.content), **out)


def cohort_mod_with(together: dict[str, Callable]) -> Callable:
    """The mod that handles a message for a cohort (run config ``cohort-size`` > 1;
    strategies/cohort.py) once per client it carries: client j of simulated node p is partition
    p·M + j of N·M (M the cohort size, N the SuperNodes), with its own slice of the node's state,
    exactly as a node of its own would handle it. Any other message passes through.

    ``together`` maps a message type to ``fn(msg, contexts, contents)`` that may handle all of a
    cohort's clients at once (slot -> the client's Context and content; returns slot -> reply
    content, or None to decline): PrivacyGAN's batched D steps."""

    def cohort_mod(msg: Message, context: Context, call_next) -> Message:
        if not cohort.is_cohort(msg.content):
            return call_next(msg, context)
        node = context.node_config
        if node.get("data-path"):
            raise ValueError("run config 'cohort-size' > 1 is for simulated clients: a node with its own data-path "
                             "is one client")
        size = int(msg.content.config_records[cohort.COHORT]["size"])
        pid, n = int(node.get("partition-id", 0)), int(node.get("num-partitions", 1))
        original = msg.content

        def own_context(slot: int, state: RecordDict) -> Context:
            return Context(run_id=context.run_id, node_id=context.node_id, state=state, run_config=context.run_config,
                           node_config={**node, "partition-id": pid * size + slot, "num-partitions": n * size})

        def handle(slot: int, content: RecordDict, state: RecordDict) -> RecordDict:
            msg.content = content
            reply = call_next(msg, own_context(slot, state))
            if reply.has_error():
                raise RuntimeError(reply.error.reason)
            return reply.content

        handle_all, batched = None, []
        fn = together.get(msg.metadata.message_type)
        if fn is not None:
            def handle_all(contents: dict, states: dict) -> dict | None:
                out = fn(msg, {s: own_context(s, states[s]) for s in contents}, contents)
                batched.append(out is not None)
                return out

        try:
            merged = cohort.run_cohort(original, context.state, handle, handle_all)
        finally:
            msg.content = original
        if fn is not None:   # the timing trace (FEDGAN_TRACE) says whether the cohort was handled at once
            trace(side="cohort", msg=msg.metadata.message_id, type=msg.metadata.message_type,
                  clients=len(original.config_records[cohort.COHORT]["slots"]), batched=bool(batched and batched[0]))
        return Message(content=merged, reply_to=msg)

    return cohort_mod


def record_names(content: RecordDict) -> dict[str, list[str]]:
    """The names in a message's content, by record (what crossed the wire, without the values)."""
    return {name: sorted(rec.keys()) for name, rec in content.items()}


def make_client_app(config: Config | None = None, mods: list | None = None) -> ClientApp:
    """A ClientApp; ``config`` fixes the settings (else they come from the run config).

    ``mods`` are Flower client mods (``mod(msg, context, call_next)``), e.g. to inspect
    every message in tests.
    """
    # mods, outermost first: the timing trace; a test's ``mods``, which see each message as it
    # crosses the wire (a cohort's merged one included); cohorts; and innermost, after a message
    # that trained this client's own generator (local, MGGAN, BPGAN's generator blocks) in a
    # checkpoint round or the last one, the client writes it (app/generators.py) -- into the run
    # folder in a simulation, its node folder when deployed
    together: dict[str, Callable] = {}   # message type -> a cohort's clients handled at once
    app = ClientApp(mods=[trace_mod, *(mods or []), cohort_mod_with(together),
                          client_generator_mod(lambda context: _config(config, context))])

    @app.train("discriminate")
    def discriminate(msg: Message, context: Context) -> Message:
        cfg = _config(config, context)
        data, pid = local_data(cfg, context)
        device = resolve_device(cfg.device)
        x = data.view   # float rows converted as sampled (uint8 storage: no float copy)
        reply = client_discriminate(
            msg.content, context.state, sample_real=batch_sampler(x),
            build_discriminator=lambda: make_discriminator(cfg), disc_lr=cfg.lr_for(cfg.loss, cfg.client_disc_lr),
            betas=(cfg.adam_beta1, cfg.adam_beta2), device=device, seed=cfg.seed, partition_id=pid,
            dp=client_dp(cfg, len(x)), real_data=x, reuse=reusable_modules(cfg), train=cfg.client_d_train)
        return Message(content=reply, reply_to=msg)

    def discriminate_cohort(msg: Message, contexts: dict[int, Context], contents: dict[int, RecordDict]):
        """A cohort's clients' D steps as one computation (run config ``cohort-batching``), when
        privacygan.cohort_can_batch allows it; else None (each client handled on its own)."""
        cfg = _config(config, next(iter(contexts.values())))
        if not cfg.cohort_batching or cohort_can_batch(contents, dp=cfg.dp, train=cfg.client_d_train) is not None:
            return None
        samplers, pids = {}, {}
        for slot, ctx in contexts.items():
            data, pids[slot] = local_data(cfg, ctx)
            samplers[slot] = batch_sampler(data.view)
        return client_discriminate_cohort(
            contents, {s: ctx.state for s, ctx in contexts.items()}, sample_real=samplers, partition_ids=pids,
            build_discriminator=lambda: make_discriminator(cfg), disc_lr=cfg.lr_for(cfg.loss, cfg.client_disc_lr),
            betas=(cfg.adam_beta1, cfg.adam_beta2), device=resolve_device(cfg.device), seed=cfg.seed,
            reuse=reusable_modules(cfg))

    together[wire.DISCRIMINATE] = discriminate_cohort

    def builders(cfg: Config) -> dict:
        return {"build_generator": lambda: make_generator(cfg),
                "build_discriminator": lambda: make_discriminator(cfg), "device": resolve_device(cfg.device)}

    # --- baselines: dataparallel, fedavg, local ------------------------------------------
    def with_data(cfg: Config, context: Context) -> dict:
        data, pid = local_data(cfg, context)
        x = data.view   # float rows converted as sampled (uint8 storage: no float copy)
        return {"sample_real": batch_sampler(x), "partition_id": pid,
                "num_examples": len(x), "real_data": x, "dp": client_dp(cfg, len(x))}

    def handler(fn, *, data: bool):
        """A ClientApp handler around a strategy's client function: it gets this node's data
        sampler (when ``data``), model builders, device, seed and partition id — whichever of
        them its signature asks for."""
        wanted = set(inspect.signature(fn).parameters)

        def handle(msg: Message, context: Context) -> Message:
            cfg = _config(config, context)
            kw = {**builders(cfg), "seed": cfg.seed}
            if data:
                kw.update(with_data(cfg, context))
            else:
                part = context.node_config.get("partition-id")
                kw["partition_id"] = int(part) if part is not None else None
            kw = {k: v for k, v in kw.items() if k in wanted}
            return Message(content=fn(msg.content, context.state, **kw), reply_to=msg)
        return handle

    # --- BPGAN: a discriminator node keeps only its data; a generator node keeps G ------------
    app.train("generator_step")(handler(bpgan.client_generator_step, data=False))
    app.query("bpgan_sample")(handler(bpgan.client_bpgan_sample, data=False))

    @app.train("discriminator_grad")
    def discriminator_grad(msg: Message, context: Context) -> Message:
        cfg = _config(config, context)
        d_cfg = cfg.replace(loss=bpgan.resolve_model(cfg.bpgan_model)[1])  # the D of this run's block kind
        data = with_data(cfg, context)
        reply = bpgan.client_discriminator_grad(
            msg.content, context.state, sample_real=data["sample_real"], partition_id=data["partition_id"],
            build_discriminator=lambda: make_discriminator(d_cfg), device=resolve_device(cfg.device), seed=cfg.seed,
            dp=data["dp"], real_data=data["real_data"])
        return Message(content=reply, reply_to=msg)

    app.train("dp_step")(handler(dataparallel.client_dp_step, data=True))
    app.train("dp_discriminator")(handler(dataparallel.client_dp_discriminator, data=True))
    app.train("dp_generator")(handler(dataparallel.client_dp_generator, data=False))
    app.train("fedavg")(handler(fedavg.client_fedavg, data=True))
    app.train("alone")(handler(local.client_alone, data=True))
    app.query("alone_sample")(handler(local.client_alone_sample, data=False))

    # --- per-client evaluation: fakes in, scalars out --------------------------------------------
    @app.evaluate("fakes")
    def evaluate_fakes(msg: Message, context: Context) -> Message:
        """PrivacyGAN: score the fakes of this client's student G_i (sent by the server)."""
        cfg = _config(config, context)
        data, pid = local_data(cfg, context)
        rec = msg.content.array_records[wire.FAKES]
        fakes = wire.decode_fakes(wire.get_tensor(rec, wire.FAKES),
                                  str(msg.content.config_records[wire.CONFIG]["fakes-dtype"]))
        if d_filter_fractions():   # the client's own log only; nothing of it is sent
            _print_d_filter(cfg, data, pid, fakes, context)
        return Message(content=score_on_own_data(cfg, data, pid, fakes), reply_to=msg)

    @app.evaluate("alone")
    def evaluate_alone(msg: Message, context: Context) -> Message:
        """Local-only: G_i lives here; draw the requested fakes from the server's seed and score them."""
        cfg = _config(config, context)
        data, pid = local_data(cfg, context)
        drawn = local.client_alone_sample(msg.content, context.state, **builders(cfg))
        fakes = wire.get_tensor(drawn.array_records[local.SAMPLES], local.SAMPLES)
        return Message(content=score_on_own_data(cfg, data, pid, fakes), reply_to=msg)

    @app.query("info")
    def info(msg: Message, context: Context) -> Message:
        """What the server may know about this node: its partition id, its role and whether
        it holds a private data folder (never the path or anything about the data)."""
        return Message(content=RecordDict({"metrics": MetricRecord(node_info(context.node_config))}), reply_to=msg)

    # --- MGGAN: group k's (G_k, D_k) live here ---------------------------------------------
    app.train("local")(handler(mggan.client_local, data=True))
    app.query("get_discriminator")(handler(mggan.client_get_discriminator, data=False))
    app.query("sample")(handler(mggan.client_sample, data=False))

    return app


app = make_client_app()
_IMPORT_END = time.time()
