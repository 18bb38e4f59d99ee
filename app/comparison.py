"""Comparing strategies: bytes, time and quality from finished run folders (SPEC §7).

Pure analysis, importable without starting anything: read a run folder, count what
crossed the network per client and per generator step, check it against an analytic
formula from the models' sizes, find the bytes at which a quality target is reached,
model the wall time under bandwidth profiles (thesis Eq. 4.1/4.2, generalized), and
render the Markdown tables and plots that ``simulations/compare_strategies.py`` writes
(the script stays thin; it and the tests import this library module).

What a run folder holds (app/runs.py):

* ``config.json`` — the resolved run config (hyphenated keys, ``Config.to_run_config``);
* ``metrics.jsonl`` — one record per round: ``round``, ``wall_time`` (seconds of that
  round), ``bytes_down``/``bytes_up`` (training traffic of the round, all clients), on
  evaluation rounds ``eval`` (set name -> scores: images ``fid``, ``kid``, ``is``,
  ``extractor``, ``num_samples``; 2-D data ``modes_covered``, ``high_quality_pct``,
  ``reverse_kl``, ``num_samples``) and possibly ``client_eval`` (client label ->
  ``fid``, ``kid``, ``tv_own``, ``tv_global``);
* ``comm.jsonl`` — one row per node and message exchange: ``round``, ``node``,
  ``action``, ``down``, ``up`` and optionally ``partition``, ``phase``, ``dropped``,
  ``role``, ``group``, ``pair``.

Traffic classes (:func:`traffic_class`): a row is *evaluation* traffic when its
``phase`` is ``"eval"``, its action starts with ``evaluate.`` or it is a sample query
(``query.sample``, ``query.alone_sample``, ``query.bpgan_sample``: generated samples
fetched for grids and scores); ``query.info`` is *control* (the role/resume handshake);
everything else — including MGGAN's ``regroup`` rows and ``query.get_discriminator`` —
is *training* traffic. Only training traffic counts in the bytes columns.

Byte framing (strategies/wire.py, Flower's ``count_bytes``): an array entry costs
``NPY_HEADER_BYTES`` (128) + its raw data + ``len(key)``; a config value costs
``len(key)`` + 8 (int/float), 1 (bool) or ``len(value)`` (str); a metric value
``len(key)`` + 8 (a list: 8 per element). Record names themselves are not counted.

No Flower import here: the analytic formula builds the networks through ``app.builders``
(lazily, only when it is called) to read their parameter and buffer shapes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from app.runs import RunFolder, eval_sets

# ======================================================================================
# Reading a run folder
# ======================================================================================
#: Sample queries: generated samples fetched for grids and scoring (not training traffic).
SAMPLE_QUERIES = ("query.sample", "query.alone_sample", "query.bpgan_sample")
#: Control traffic: the role / partition handshake (BPGAN start, PrivacyGAN resume).
CONTROL_ACTIONS = ("query.info",)
#: Rows that ride inside another exchange's message (MGGAN books moved discriminators apart).
PIGGYBACK_ACTIONS = ("regroup",)


@dataclass
class RunData:
    """One finished run: its folder, resolved config and the two JSON-lines logs."""

    path: Path
    config: dict
    metrics: list[dict]
    comm: list[dict]

    @property
    def strategy(self) -> str:
        return str(self.config.get("strategy", "?"))


def read_run(path: str | Path) -> RunData:
    """Read ``config.json``, ``metrics.jsonl`` and ``comm.jsonl`` of a finished run folder.

    Raises FileNotFoundError naming the folder when it is not a run folder (no config.json).
    Metrics records are sorted by round (a resumed run keeps every round once).
    """
    run = RunFolder(path)
    if not (run.path / RunFolder.CONFIG).is_file():
        raise FileNotFoundError(f"{run.path} is not a run folder (no config.json)")
    metrics = sorted(run.read_jsonl(RunFolder.METRICS), key=lambda r: int(r.get("round", 0)))
    return RunData(run.path, run.read_config(), metrics, run.read_jsonl(RunFolder.COMM))


def traffic_class(row: Mapping[str, Any]) -> str:
    """``"eval"``, ``"control"`` or ``"train"`` for one comm.jsonl row (module docstring)."""
    action = str(row.get("action", ""))
    if row.get("phase") == "eval" or action.startswith("evaluate.") or action in SAMPLE_QUERIES:
        return "eval"
    if action in CONTROL_ACTIONS:
        return "control"
    return "train"


def training_rows(comm: Iterable[Mapping[str, Any]]) -> list[dict]:
    """The comm.jsonl rows that are training traffic (evaluation and control excluded)."""
    return [dict(r) for r in comm if traffic_class(r) == "train"]


def exchange_key(row: Mapping[str, Any]) -> str:
    """Which sequential message exchange of its round a training row belongs to.

    Rows of one ``send_and_receive`` share a ``phase`` when the strategy writes one (BPGAN:
    ``prime``, ``train``, ``generate``, ``discriminate``, ``flush`` — its DB and GB messages of
    a pipelined round are ONE exchange); otherwise one action is one exchange
    (data-parallel: ``train.dp_step``; alternating: ``train.dp_discriminator`` then
    ``train.dp_generator``).
    """
    phase = row.get("phase")
    return f"phase:{phase}" if phase else f"action:{row.get('action', '')}"


# ======================================================================================
# Generator steps
# ======================================================================================
def generator_steps_per_round(config: Mapping[str, Any], record: Mapping[str, Any] | None = None) -> int:
    """Generator updates one client's generator gets in one round of this strategy.

    * ``privacygan``: K = ``steps-per-round`` (K fake batches, K feedbacks, K student steps);
    * ``bpgan``: 1 (per round every generator block applies one feedback; the last round's
      feedback is applied by the final flush, so R rounds make R steps per pair); with a
      clipped WGAN critic (n = ``wgan-critic-steps`` D steps per G step) rounds whose number is
      a multiple of n count one step, the others none (⌊R/n⌋ in all);
    * ``dataparallel``: 1 (one D step and one G step of the global GAN per round); with n D
      steps per G step (``wgan-critic-steps`` for ``loss=wgan``, else ``client-disc-steps``) a
      round steps G only when its number is a multiple of n (``g_step`` in the record);
    * ``fedavg``, ``local``, ``mggan``, ``centralized``: ``local-steps`` base-GAN iterations
      (one G update each). MGGAN cuts a round short so a regrouping lands on its iteration:
      when ``record`` (a metrics.jsonl line) carries ``steps``, that number is used.
    """
    strategy = str(config.get("strategy", ""))
    if strategy == "privacygan":
        return int(config.get("steps-per-round", 1))
    if strategy in ("dataparallel", "bpgan"):
        if strategy == "dataparallel" and record is not None and "g_step" in record:
            return int(record["g_step"])
        n = disc_steps_per_g_step(config)
        if n == 1:
            return 1
        if record is not None and "round" in record:
            return int(int(record["round"]) % n == 0)
        raise ValueError(f"{strategy} with {n} D steps per G step: generator steps depend on the round; "
                         "pass its record")
    if strategy in ("fedavg", "local", "mggan", "centralized"):
        if strategy == "mggan" and record is not None and "steps" in record:
            return int(record["steps"])
        return int(config.get("local-steps", 1))
    raise ValueError(f"strategy {strategy!r}: no generator-step rule (known: privacygan, bpgan, dataparallel, "
                     f"fedavg, local, mggan, centralized)")


def mean_generator_steps_per_round(config: Mapping[str, Any]) -> float:
    """Generator steps per client per round on average (a data-parallel round with n D steps
    per G step makes 1/n); what the comparison divides step counts by."""
    if str(config.get("strategy", "")) in ("dataparallel", "bpgan"):
        return 1.0 / disc_steps_per_g_step(config)
    return float(max(1, generator_steps_per_round(config)))


def disc_steps_per_g_step(config: Mapping[str, Any]) -> int:
    """D steps per G step of a data-parallel or BPGAN run: ``wgan-critic-steps`` when its
    discriminator is the clipped WGAN critic (``loss=wgan``; BPGAN: ``bpgan-model`` wgan / dcwgan),
    else ``client-disc-steps`` (app.server_app.run_dataparallel / run_bpgan)."""
    loss = str(config.get("loss", "bce"))
    if str(config.get("strategy", "")) == "bpgan":
        from strategies.bpgan import resolve_model
        loss = resolve_model(str(config.get("bpgan-model", "dcgan")))[1]
    if loss == "wgan":
        return int(config.get("wgan-critic-steps", 5))
    return int(config.get("client-disc-steps", 1))


def mggan_plan(config: Mapping[str, Any], rounds: int) -> list[tuple[int, bool]]:
    """Per round: (iterations, regroup at the end of it) for MGGAN with a fixed interval.

    Follows ``strategies.mggan.MGGAN``: a round runs ``local-steps`` iterations, cut short so
    the iteration count lands on the next regrouping; a regrouping happens at the end of
    a round that reaches it, except the last round. ``regroup-interval = 0`` never
    regroups; ``-1`` (dynamic) depends on the loss trace — pass the recorded plan
    (:func:`recorded_mggan_plan`) instead.
    """
    interval, local = int(config.get("regroup-interval", -1)), int(config.get("local-steps", 1))
    if interval == -1:
        raise ValueError("mggan with regroup-interval = -1 regroups when the loss trace says so; "
                         "use recorded_mggan_plan(run) for its plan")
    it, next_at, plan = 0, (interval if interval > 0 else None), []
    for rnd in range(1, rounds + 1):
        steps = local
        if next_at is not None and next_at > it:
            steps = min(steps, next_at - it)
        it += steps
        regroup = next_at is not None and it >= next_at and rnd < rounds
        if regroup:
            next_at += interval
            if it >= next_at:
                next_at = it + interval
        plan.append((steps, regroup))
    return plan


def recorded_mggan_plan(run: RunData) -> list[tuple[int, bool]]:
    """(iterations, regrouped) of every round of a finished MGGAN run, from metrics.jsonl."""
    return [(int(r.get("steps", run.config.get("local-steps", 1))), bool(r.get("regrouped", False)))
            for r in run.metrics]


def rounds_for_steps(config: Mapping[str, Any], steps: int) -> int:
    """Rounds that give this strategy at least ``steps`` generator steps per client (the
    comparison runs every strategy for the same number of generator steps)."""
    if steps < 1:
        raise ValueError(f"steps = {steps}: must be >= 1")
    if str(config.get("strategy")) == "mggan" and int(config.get("regroup-interval", -1)) > 0:
        rounds = math.ceil(steps / int(config.get("local-steps", 1)))
        while sum(s for s, _ in mggan_plan(config, rounds)) < steps:
            rounds += 1
        return rounds
    if str(config.get("strategy")) in ("dataparallel", "bpgan"):
        return steps * disc_steps_per_g_step(config)
    return math.ceil(steps / generator_steps_per_round(config))


def generator_steps_of(run: RunData) -> list[int]:
    """Generator steps per client in each recorded round."""
    return [generator_steps_per_round(run.config, r) for r in run.metrics]


# ======================================================================================
# Measured bytes
# ======================================================================================
def bytes_by_node(run: RunData) -> dict[int, dict[str, int]]:
    """Training bytes per node over the whole run: node -> {down, up}."""
    out: dict[int, dict[str, int]] = {}
    for row in training_rows(run.comm):
        d = out.setdefault(int(row["node"]), {"down": 0, "up": 0})
        d["down"] += int(row.get("down", 0))
        d["up"] += int(row.get("up", 0))
    return out


def role_of_rows(run: RunData) -> dict[int, str]:
    """Node -> role where comm rows name one (BPGAN: discriminator / generator)."""
    return {int(r["node"]): str(r["role"]) for r in run.comm if r.get("role")}


def measured_bytes(run: RunData) -> dict:
    """Training bytes of a run as the table reports them.

    ``down_total``/``up_total`` over all clients; ``clients`` = nodes with training traffic;
    ``steps`` = generator steps per client over the run; ``down_per_step``/``up_per_step`` =
    bytes per client per generator step, i.e. total ÷ clients ÷ steps (the mean client;
    ``by_role`` splits BPGAN's discriminator and generator blocks).
    """
    nodes = bytes_by_node(run)
    steps = sum(generator_steps_of(run))
    down, up = sum(v["down"] for v in nodes.values()), sum(v["up"] for v in nodes.values())
    n = len(nodes)
    out = {"down_total": down, "up_total": up, "total": down + up, "clients": n, "steps": steps,
           "down_per_step": (down / n / steps) if n and steps else 0.0,
           "up_per_step": (up / n / steps) if n and steps else 0.0, "by_role": {}}
    roles = role_of_rows(run)
    for role in sorted(set(roles.values())):
        members = [nodes[nid] for nid, r in roles.items() if r == role and nid in nodes]
        if members and steps:
            out["by_role"][role] = {
                "nodes": len(members),
                "down_per_step": sum(m["down"] for m in members) / len(members) / steps,
                "up_per_step": sum(m["up"] for m in members) / len(members) / steps}
    return out


def cumulative_training_bytes(run: RunData) -> list[tuple[int, int]]:
    """(round, training bytes down+up of all clients up to the end of that round)."""
    per_round: dict[int, int] = {}
    for row in training_rows(run.comm):
        per_round[int(row["round"])] = per_round.get(int(row["round"]), 0) + int(row.get("down", 0)) + int(row.get("up", 0))
    total, out = 0, []
    for rec in run.metrics:
        total += per_round.get(int(rec["round"]), 0)
        out.append((int(rec["round"]), total))
    return out


# ======================================================================================
# Analytic bytes from the models' sizes (the project's own framing, strategies/wire.py)
# ======================================================================================
NPY_HEADER_BYTES = 128   # = strategies.wire.NPY_HEADER_BYTES (.npy v1 header of these shapes)
DTYPE_BYTES = {"float32": 4, "float16": 2, "uint8": 1, "int64": 8}


def array_bytes(key: str, shape: Sequence[int], itemsize: int) -> int:
    """One array entry: .npy header + raw data + the key's name (as ``strategies.wire.array_bytes``,
    for any item size: int64 buffers such as BatchNorm's ``num_batches_tracked`` take 8)."""
    return NPY_HEADER_BYTES + math.prod(shape) * int(itemsize) + len(key)


def config_bytes(values: Mapping[str, Any]) -> int:
    """A ConfigRecord's ``count_bytes``: per key ``len(key)`` + 1 (bool), 8 (int/float) or len (str)."""
    total = 0
    for k, v in values.items():
        if isinstance(v, bool):
            total += 1
        elif isinstance(v, (int, float)):
            total += 8
        elif isinstance(v, (str, bytes)):
            total += len(v)
        else:
            raise TypeError(f"config value {k!r} = {v!r}: not bool/int/float/str")
        total += len(k)
    return total


def metric_bytes(keys: Mapping[str, int] | Iterable[str]) -> int:
    """A MetricRecord's ``count_bytes``: ``len(key)`` + 8 per value (a list of n values: 8·n).

    ``keys``: names (one value each) or a mapping name -> number of values."""
    items = keys.items() if isinstance(keys, Mapping) else ((k, 1) for k in keys)
    return sum(len(k) + 8 * int(n) for k, n in items)


@dataclass(frozen=True)
class Entry:
    """One array of a network's record: its key, shape and item size in bytes."""

    key: str
    shape: tuple[int, ...]
    itemsize: int


def state_entries(module) -> list[Entry]:
    """Every entry of ``module.state_dict()`` (parameters and buffers): what travels as weights."""
    return [Entry(k, tuple(v.shape), v.element_size()) for k, v in module.state_dict().items()]


def grad_entries(module) -> list[Entry]:
    """One float32 gradient per named trainable parameter: what travels as a gradient."""
    return [Entry(n, tuple(p.shape), 4) for n, p in module.named_parameters() if p.requires_grad]


def entries_bytes(entries: Iterable[Entry]) -> int:
    return sum(array_bytes(e.key, e.shape, e.itemsize) for e in entries)


def model_sizes(config: Mapping[str, Any]) -> dict:
    """Parameter counts and record bytes of the run's G and D (built as the app builds them).

    BPGAN's D is built for the loss of its ``bpgan-model`` block kind, as the app does.
    """
    from app.builders import geometry, make_discriminator, make_generator
    from app.config import parse_config

    cfg = parse_config(dict(config))
    if cfg.strategy == "bpgan":
        from strategies.bpgan import resolve_model
        d_cfg = cfg.replace(loss=resolve_model(cfg.bpgan_model)[1])
    else:
        d_cfg = cfg
    G, D = make_generator(cfg), make_discriminator(d_cfg)
    return {"cfg": cfg, "sample_shape": tuple(geometry(cfg).sample_shape),
            "g_params": sum(p.numel() for p in G.parameters()), "d_params": sum(p.numel() for p in D.parameters()),
            "g_state": state_entries(G), "d_state": state_entries(D), "g_grads": grad_entries(G),
            "d_grads": grad_entries(D),
            "d_moments": {kind: _moment_entries(D, kind) for kind in ("adam", "rmsprop")}}


def _moment_entries(D, kind: str) -> list[Entry]:
    """D's optimizer moments as MGGAN moves them (``move-d-moments``): per parameter index i,
    ``i.step`` (a 0-d float32) and the moment tensors of the optimizer ``kind`` (``adam``:
    exp_avg, exp_avg_sq; ``rmsprop``, used by the ``wgan`` loss: square_avg)."""
    names = ("square_avg",) if kind == "rmsprop" else ("exp_avg", "exp_avg_sq")
    out = []
    for i, p in enumerate(D.parameters()):
        out.append(Entry(f"{i}.step", (), 4))
        out += [Entry(f"{i}.{n}", tuple(p.shape), 4) for n in names]
    return out


@dataclass
class Traffic:
    """Analytic bytes of a run: per node (down, up) plus the generator steps per node."""

    down: dict[str, int] = field(default_factory=dict)
    up: dict[str, int] = field(default_factory=dict)
    steps: int = 0
    roles: dict[str, str] = field(default_factory=dict)
    detail: dict = field(default_factory=dict)

    def add(self, node: str, down: int = 0, up: int = 0) -> None:
        self.down[node] = self.down.get(node, 0) + int(down)
        self.up[node] = self.up.get(node, 0) + int(up)

    def summary(self) -> dict:
        """The same keys as :func:`measured_bytes` (so the two can be compared one to one)."""
        n, down, up = len(self.down), sum(self.down.values()), sum(self.up.values())
        out = {"down_total": down, "up_total": up, "total": down + up, "clients": n, "steps": self.steps,
               "down_per_step": (down / n / self.steps) if n and self.steps else 0.0,
               "up_per_step": (up / n / self.steps) if n and self.steps else 0.0, "by_role": {}}
        for role in sorted(set(self.roles.values())):
            members = [k for k, r in self.roles.items() if r == role]
            if members and self.steps:
                out["by_role"][role] = {
                    "nodes": len(members),
                    "down_per_step": sum(self.down[m] for m in members) / len(members) / self.steps,
                    "up_per_step": sum(self.up[m] for m in members) / len(members) / self.steps}
        return out


def analytic_bytes(config: Mapping[str, Any], num_clients: int, rounds: int | None = None, *,
                   plan: list[tuple[int, bool]] | None = None) -> dict:
    """Training bytes a run must move, from the networks' sizes and the message layouts.

    Every client takes part in every round (``fraction-train = 1``, no dropped reply) and
    ``partition-id`` is known (simulation: each reply carries it as a metric). Per message
    (B = ``batch-size``, S = one sample's shape, K = ``steps-per-round``, |x| = the
    framing of :func:`array_bytes` / :func:`config_bytes` / :func:`metric_bytes`):

    * ``privacygan`` — down |fakes (K,B,*S) fakes-dtype| (+ |negatives (K,M,*S) uint8| with
      ``server-negatives`` = M > 0) + |config| (+ |D_T| once with ``client-d-init=teacher``); up
      |labels (K,B) f32| + |feedback (K,B,*S) feedback-dtype| + 6 metrics (7 with negatives:
      ``d_neg_acc``). K generator steps per round.
    * ``bpgan`` (N/2 pairs) — DB: down |D weights| + |fakes (B,*S)| + |config|, up |D grads|
      + |labels (B,)| + |feedback (B,*S)| + metrics; GB: down |config| (+ |labels| +
      |feedback| when it relays), up |fakes| + metrics. Pipelined: a priming GB exchange in
      round 1; both schedules end with a flush (feedback down, no fakes up). 1 step per round;
      with n critic steps per G step only every n-th D step's feedback is asked for (the DB
      config gains ``want-feedback``, critic-only replies carry labels only) and relayed, and
      the flush happens when R is a multiple of n: ⌊R/n⌋ steps.
    * ``dataparallel`` (thesis Fig. 4.7) — once per round down |G weights| + |D weights| +
      |config|; up |D grads| + |G grads| + metrics (a round without a G step: no |G grads|).
      ``dataparallel-mode = alternating``: that download twice, up |D grads| + metrics, then
      |G grads| + metrics. One G step per n rounds (n D steps per G step).
    * ``fedavg`` — down and up |G weights| + |D weights| in one record whose keys carry a
      ``g.`` / ``d.`` prefix (2 B more per entry), + config (``fedprox``: + ``proximal-mu``) /
      metrics; ``local-steps`` steps per round. Every ``fedavg-variant`` moves the same bytes:
      they differ in how the server aggregates, not in what crosses the network.
    * ``local`` — a config down and metrics up; ``mggan`` — config down, the loss trace
      (8 B per iteration) and metrics up, plus |D weights| (+ moments, + 13 B of optimizer
      kind) up at a regrouping and down with the next round's message.
    * ``centralized`` — nothing (no client).

    Returns :meth:`Traffic.summary` plus ``g_params``, ``d_params``, ``per_node`` and the
    one-message sizes in ``messages``. ``rounds`` defaults to ``num-rounds``; ``plan``
    (MGGAN) gives (iterations, regrouped) per round, e.g. from :func:`recorded_mggan_plan`.

    These are the volumes of thesis Eq. 4.1–4.3 — weights ω and gradients g of D and G,
    fakes F and labels L (here labels + feedback) — counted per message as Flower frames
    them, per client instead of per system.
    """
    sizes = model_sizes(config)
    cfg = sizes["cfg"]
    R = int(rounds if rounds is not None else cfg.num_rounds)
    B, S, N = cfg.batch_size, sizes["sample_shape"], int(num_clients)
    fake_size, fb_size = DTYPE_BYTES[cfg.fakes_dtype], DTYPE_BYTES[cfg.feedback_dtype]
    t = Traffic()
    msgs: dict[str, int] = {}
    strategy = cfg.strategy
    if strategy == "privacygan":
        K = cfg.steps_per_round
        down = array_bytes("fakes", (K, B, *S), fake_size) + config_bytes(
            {"round": 0, "loss": cfg.loss, "fakes-dtype": cfg.fakes_dtype, "feedback-dtype": cfg.feedback_dtype,
             "client-disc-steps": 0})
        M = cfg.server_negatives
        down += array_bytes("negatives", (K, M, *S), 1) if M > 0 else 0
        up = (array_bytes("labels", (K, B), 4) + array_bytes("feedback", (K, B, *S), fb_size)
              + metric_bytes(["d_loss", "d_real_acc", "d_fake_acc", "d_steps_total", "d_fresh", "partition_id"]
                             + (["d_neg_acc"] if M > 0 else [])))
        d_init = entries_bytes(sizes["d_state"]) if cfg.client_d_init == "teacher" and R > 0 else 0
        for i in range(N):
            t.add(f"client {i}", R * down + d_init, R * up)
        t.steps = R * K
        msgs = {"train.discriminate down": down, "train.discriminate up": up, "d_init (once)": d_init}
    elif strategy == "bpgan":
        t = _bpgan_traffic(cfg, sizes, N, R, msgs)
    elif strategy in ("dataparallel", "fedavg"):
        weights = entries_bytes(sizes["g_state"]) + entries_bytes(sizes["d_state"])
        if strategy == "dataparallel":
            n = cfg.disc_steps_for(cfg.loss)
            g_rounds = R // n                      # rounds whose number is a multiple of n step G
            config = {"round": 0, "loss": cfg.loss, "batch-size": 0, "latent-seed": 0}
            d_metrics = ["num-examples", "d_loss", "d_real_acc", "d_fake_acc", "d_real_out", "d_fake_out",
                         "partition_id"]
            if cfg.dataparallel_mode == "simultaneous":
                down = weights + config_bytes({**config, "want-g": True})
                up_d = entries_bytes(sizes["d_grads"]) + metric_bytes(d_metrics)
                up_g = entries_bytes(sizes["g_grads"]) + metric_bytes(["g_loss"])
                for i in range(N):
                    t.add(f"client {i}", R * down, R * up_d + g_rounds * up_g)
                msgs = {"train.dp_step down": down, "train.dp_step up": up_d + up_g,
                        "train.dp_step up (critic-only round)": up_d}
            else:
                down = weights + config_bytes(config)
                up_d = entries_bytes(sizes["d_grads"]) + metric_bytes(d_metrics)
                up_g = entries_bytes(sizes["g_grads"]) + metric_bytes(["num-examples", "g_loss", "partition_id"])
                for i in range(N):
                    t.add(f"client {i}", (R + g_rounds) * down, R * up_d + g_rounds * up_g)
                msgs = {"train.dp_discriminator down": down, "train.dp_discriminator up": up_d,
                        "train.dp_generator down": down, "train.dp_generator up": up_g}
            t.steps = g_rounds
        else:
            weights += 2 * (len(sizes["g_state"]) + len(sizes["d_state"]))     # the "g." / "d." key prefixes
            config = _gan_config(cfg)
            if cfg.fedavg_variant == "fedprox":
                config["proximal-mu"] = 0.0
            down = weights + config_bytes(config)
            up = weights + metric_bytes(["num-examples", "g_loss", "d_loss", "d_real_acc", "d_fake_acc",
                                         "steps_total", "partition_id"])
            for i in range(N):
                t.add(f"client {i}", R * down, R * up)
            t.steps = R * cfg.local_steps
            msgs = {"train.fedavg down": down, "train.fedavg up": up}
    elif strategy == "local":
        down = config_bytes(_gan_config(cfg))
        up = metric_bytes(["g_loss", "d_loss", "d_real_acc", "d_fake_acc", "steps_total", "partition_id"])
        for i in range(N):
            t.add(f"client {i}", R * down, R * up)
        t.steps = R * cfg.local_steps
        msgs = {"train.alone down": down, "train.alone up": up}
    elif strategy == "mggan":
        t = _mggan_traffic(cfg, sizes, N, R, plan, msgs)
    elif strategy == "centralized":
        t.steps = R * cfg.local_steps
    else:  # pragma: no cover - parse_config already refuses unknown strategies
        raise ValueError(f"strategy {strategy!r} unknown")
    out = t.summary()
    out.update(g_params=sizes["g_params"], d_params=sizes["d_params"], per_node={"down": t.down, "up": t.up},
               messages=msgs, **t.detail)
    return out


def _gan_config(cfg) -> dict:
    """``strategies.base.gan_config`` (fedavg, local): the settings of local GAN steps."""
    return {"round": 0, "loss": cfg.loss, "gen-lr": 0.0, "disc-lr": 0.0, "beta1": 0.0, "beta2": 0.0,
            "batch-size": 0, "steps": 0, "client-disc-steps": 0, "seed": 0}


def _bpgan_traffic(cfg, sizes: dict, N: int, R: int, msgs: dict) -> Traffic:
    """BPGAN: N/2 pairs (DB 2k, GB 2k+1); see :func:`analytic_bytes`. With n critic steps per
    generator step (a WGAN critic), only every n-th D step's feedback is asked for and relayed."""
    from strategies.bpgan import generator_step_due, resolve_model

    if N % 2:
        raise ValueError(f"bpgan needs an even number of clients, got {N}")
    g_block, d_loss = resolve_model(cfg.bpgan_model)
    n = cfg.disc_steps_for(d_loss)
    B, S = cfg.batch_size, sizes["sample_shape"]
    fake = array_bytes("fakes", (B, *S), DTYPE_BYTES[cfg.fakes_dtype])
    labels = array_bytes("labels", (B,), 4)
    feedback = array_bytes("feedback", (B, *S), DTYPE_BYTES[cfg.feedback_dtype])
    relay = labels + feedback
    g_cfg = config_bytes({"round": 0, "g-block": g_block, "d-loss": d_loss, "gen-lr": 0.0, "beta1": 0.0,
                          "beta2": 0.0, "batch-size": 0, "fakes-dtype": cfg.fakes_dtype,
                          "feedback-dtype": cfg.feedback_dtype, "feedback-for": 0, "make-fakes": True})

    def gb_up(relayed: bool, make_fakes: bool) -> int:
        keys = ["applied"] + (["g_loss"] if relayed else []) + (["generation"] if make_fakes else []) + \
               ["g_steps_total", "partition_id"]
        return (fake if make_fakes else 0) + metric_bytes(keys)

    d_cfg = {"round": 0, "d-loss": d_loss, "fakes-dtype": cfg.fakes_dtype, "feedback-dtype": cfg.feedback_dtype}
    if n > 1:
        d_cfg["want-feedback"] = True              # sent only with n > 1
    db_down = entries_bytes(sizes["d_state"]) + fake + config_bytes(d_cfg)
    db_up_g = entries_bytes(sizes["d_grads"]) + relay + metric_bytes(
        ["d_loss", "d_real_acc", "d_fake_acc", "batch_size", "d_steps_total", "partition_id"])
    db_up_critic = db_up_g - feedback                  # a critic-only round: labels, no feedback
    due = [r for r in range(1, R + 1) if generator_step_due(r, n)]   # D steps followed by a G step
    # GB messages: rounds 1..R (+ priming when pipelined); round r+1 relays F_r for r in due
    # (r < R); the flush relays F_R when R is due
    relayed = sum(1 for r in due if r < R)
    plain = R + (1 if cfg.bpgan_pipeline else 0) - relayed
    flush = 1 if R in due else 0
    t = Traffic()
    for k in range(N // 2):
        db, gb = f"client {2 * k}", f"client {2 * k + 1}"
        t.roles[db], t.roles[gb] = "discriminator", "generator"
        t.add(db, R * db_down, len(due) * db_up_g + (R - len(due)) * db_up_critic)
        t.add(gb, plain * g_cfg + (relayed + flush) * (g_cfg + relay),
              plain * gb_up(False, True) + relayed * gb_up(True, True) + flush * gb_up(True, False))
    t.steps = len(due)
    msgs.update({"train.discriminator_grad down": db_down, "train.discriminator_grad up": db_up_g,
                 "train.generator_step down (no feedback)": g_cfg,
                 "train.generator_step down (relayed feedback)": g_cfg + relay,
                 "train.generator_step up (fakes)": gb_up(True, True), "train.generator_step up (flush)": gb_up(True, False)})
    if n > 1:
        msgs.update({"train.discriminator_grad up (critic-only round)": db_up_critic,
                     "train.generator_step up (fakes, no feedback)": gb_up(False, True)})
    return t


def _mggan_traffic(cfg, sizes: dict, N: int, R: int, plan, msgs: dict) -> Traffic:
    """MGGAN: config down, loss trace up; D weights up at a regrouping and down next round."""
    if plan is None:
        plan = mggan_plan(cfg.to_run_config(), R)
    if len(plan) != R:
        raise ValueError(f"mggan plan has {len(plan)} rounds, expected {R}")
    losses = [x.strip() for x in cfg.mggan_losses.split(",")]
    t = Traffic()
    # Group k's D (its optimizer's moments with move-d-moments) leaves client k at a regrouping
    # and another group's D arrives with the next message; a derangement moves every D once, so
    # the totals are exact while a node is booked here with a D of its own group's size.
    for k in range(N):
        loss = losses[k % len(losses)]
        kind = "rmsprop" if loss == "wgan" else "adam"
        d_meta = config_bytes({"optimizer": kind})
        d_move = entries_bytes(sizes["d_state"]) + (entries_bytes(sizes["d_moments"][kind]) if cfg.move_d_moments else 0)
        base = config_bytes({"loss": loss, "gen-lr": 0.0, "disc-lr": 0.0, "beta1": 0.0, "beta2": 0.0, "lr-max": 0.0,
                             "lr-delta": 0.0, "lr-window": 0, "vrl-max": 0.0, "lr-rule": True,
                             "client-disc-steps": 0, "batch-size": 0, "move-d-moments": True, "start-iter": 0,
                             "steps": 0, "next-regroup": 0, "last-regroup": 0, "return-d": True})
        incoming = False
        for steps, regroup in plan:
            down = base + ((d_move + d_meta) if incoming and N >= 2 else 0)
            up = metric_bytes({"g_loss_trace": steps, "d_loss": 1, "d_real_acc": 1, "d_fake_acc": 1, "lr": 1,
                               "d_steps_total": 1, "moments_loaded": 1, "partition_id": 1})
            if regroup and N >= 2:
                up += d_move + d_meta
            t.add(f"client {k}", down, up)
            incoming = regroup
        msgs.setdefault("train.local down", base)
        msgs.setdefault(f"regroup, {kind} D (each way)", d_move + d_meta)
    t.steps = sum(s for s, _ in plan)
    t.detail["regroups"] = sum(1 for _, r in plan if r)
    return t


# ======================================================================================
# Quality
# ======================================================================================
#: Score keys for which a lower value is better; all others are "higher is better".
LOWER_IS_BETTER = ("fid", "kid", "reverse_kl", "tv_own", "tv_global", "tv_real")


def lower_is_better(key: str) -> bool:
    return key in LOWER_IS_BETTER or key.endswith("_kl")


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    return float(v) if math.isfinite(v) else None


def headline_quality(evaluation: Mapping[str, Any] | None, key: str = "fid") -> dict | None:
    """The one number a table shows for an ``eval`` dict, with where it comes from.

    * BPGAN (``{"per_gb", "mean", "best"}``): the mean over its generator blocks;
    * a ``mixture`` set (MGGAN): the mixture of the groups;
    * a ``global`` set (data-parallel, FedAvg, centralized): that one;
    * otherwise (one set per client: PrivacyGAN students, local): the mean over the sets
      that have the key, the teacher's row left out.

    Returns ``{"value", "extractor", "num_samples", "source"}`` or None when no set has the key.
    """
    if not isinstance(evaluation, Mapping) or not evaluation:
        return None
    nested = "per_gb" in evaluation  # BPGAN: its generator blocks' sets
    if not nested:
        for name in ("mixture", "global"):
            scores = evaluation.get(name)
            if isinstance(scores, Mapping) and _num(scores.get(key)) is not None:
                return {"value": _num(scores[key]), "extractor": scores.get("extractor"),
                        "num_samples": scores.get("num_samples"), "source": name}
    sets = {n: s for n, s in eval_sets(dict(evaluation)).items() if n != "teacher" and _num(s.get(key)) is not None}
    if not sets:
        return None
    first = next(iter(sets.values()))
    source = (f"mean of {len(sets)} generator blocks" if nested else
              next(iter(sets)) if len(sets) == 1 else f"mean of {len(sets)} sets")
    return {"value": statistics.fmean(_num(s[key]) for s in sets.values()), "extractor": first.get("extractor"),
            "num_samples": first.get("num_samples"), "source": source}


def client_fidelity(client_eval: Mapping[str, Any] | None) -> dict | None:
    """Mean of the per-client scores (``fid``, ``kid``, ``tv_own``, ``tv_global``) over clients."""
    if not isinstance(client_eval, Mapping) or not client_eval:
        return None
    rows = [v for v in client_eval.values() if isinstance(v, Mapping)]
    out: dict[str, Any] = {"clients": len(rows)}
    for key in ("fid", "kid", "tv_own", "tv_global"):
        vals = [_num(r.get(key)) for r in rows if _num(r.get(key)) is not None]
        if vals:
            out[key] = statistics.fmean(vals)
    return out if len(out) > 1 else None


def progress_of(run: RunData, compute_s: Sequence[float] | None = None) -> list[dict]:
    """Per round, cumulative: ``steps`` (generator steps per client), ``bytes`` (training bytes,
    all clients) and ``wall`` (round wall times, or the given per-round ``compute_s``)."""
    cum_bytes = dict(cumulative_training_bytes(run))
    steps = wall = 0.0
    out = []
    for i, rec in enumerate(run.metrics):
        steps += generator_steps_per_round(run.config, rec)
        wall += float(compute_s[i]) if compute_s is not None else float(rec.get("wall_time") or 0.0)
        out.append({"round": int(rec["round"]), "steps": int(steps), "bytes": cum_bytes.get(int(rec["round"]), 0),
                    "wall": wall})
    return out


def quality_curve(run: RunData, key: str = "fid", compute_s: Sequence[float] | None = None) -> list[dict]:
    """Every evaluation of a run: ``round``, ``steps`` (generator steps per client so far),
    ``bytes`` (cumulative training bytes, all clients), ``wall`` (cumulative round wall time,
    or of ``compute_s``) and the headline ``value`` of ``key`` (evaluations without it are skipped)."""
    out = []
    for rec, point in zip(run.metrics, progress_of(run, compute_s)):
        q = headline_quality(rec.get("eval"), key)
        if q is not None:
            out.append({**point, **q})
    return out


def final_quality(run: RunData, key: str = "fid") -> dict | None:
    """The last evaluation's headline quality (``round`` added), with its client fidelity."""
    for rec in reversed(run.metrics):
        q = headline_quality(rec.get("eval"), key)
        if q is not None:
            return {**q, "round": int(rec["round"]), "client": client_fidelity(rec.get("client_eval"))}
    for rec in reversed(run.metrics):   # client scores without a headline score
        c = client_fidelity(rec.get("client_eval"))
        if c is not None:
            return {"value": None, "round": int(rec["round"]), "client": c}
    return None


def bytes_to_target(curve: Sequence[tuple[float, float]], target: float, *,
                    lower_is_better: bool = True) -> float | None:
    """Bytes at which a quality curve first reaches ``target``, or None ("not reached").

    ``curve``: (cumulative training bytes, quality) points in round order. With
    ``lower_is_better`` (FID, KID) the target is reached at the first point with
    quality ≤ target, else ≥ target. Between that point (b1, q1) and the one before it
    (b0, q0) the crossing is interpolated linearly:
    b = b0 + (target − q0)·(b1 − b0)/(q1 − q0). A first point that already meets the
    target gives its own bytes (no earlier point to interpolate from).
    """
    def meets(q: float) -> bool:
        return q <= target if lower_is_better else q >= target

    prev: tuple[float, float] | None = None
    for b, q in curve:
        if q is None or not math.isfinite(q):
            continue
        if meets(q):
            if prev is None or q == prev[1]:
                return float(b)
            b0, q0 = prev
            return float(b0 + (target - q0) * (b - b0) / (q - q0))
        prev = (float(b), float(q))
    return None


# ======================================================================================
# Bandwidth profiles and modeled time (thesis Eq. 4.1 / 4.2, generalized)
# ======================================================================================
@dataclass(frozen=True)
class Profile:
    """A client's network link: uplink and downlink in bits/s, round-trip latency in seconds."""

    name: str
    uplink_bps: float
    downlink_bps: float
    latency_s: float

    def __post_init__(self) -> None:
        if not (self.uplink_bps > 0 and self.downlink_bps > 0 and self.latency_s >= 0):
            raise ValueError(f"profile {self.name!r}: uplink_bps and downlink_bps must be > 0 and latency_s >= 0, "
                             f"got {self.uplink_bps}, {self.downlink_bps}, {self.latency_s}")


# Typical values, documented elsewhere (links in bits/s, latency = round-trip time):
# * 3G: WebPageTest's "3G" connectivity profile — 1.6 Mbit/s down, 768 kbit/s up, 300 ms RTT
#   (WPO-Foundation/webpagetest, www/settings/connectivity.ini.sample).
# * 4G: WebPageTest's "LTE" profile — 12 Mbit/s both ways, 70 ms RTT (same file).
# * Wi-Fi: Firefox DevTools' "Wi-Fi" throttling preset — 30 Mbit/s down, 15 Mbit/s up, 2 ms
#   minimum latency (firefox devtools docs, network_monitor/throttling).
# * datacenter: 10 Gigabit Ethernet (IEEE 802.3ae) both ways and 0.5 ms, the round trip within
#   one datacenter in J. Dean's "Numbers everyone should know" (LADIS 2009 keynote).
PROFILES: dict[str, Profile] = {
    "3G": Profile("3G", uplink_bps=768e3, downlink_bps=1.6e6, latency_s=0.300),
    "4G": Profile("4G", uplink_bps=12e6, downlink_bps=12e6, latency_s=0.070),
    "Wi-Fi": Profile("Wi-Fi", uplink_bps=15e6, downlink_bps=30e6, latency_s=0.002),
    "datacenter": Profile("datacenter", uplink_bps=10e9, downlink_bps=10e9, latency_s=0.0005),
}


def load_profiles(path: str | Path | None = None, base: Mapping[str, Profile] | None = None) -> dict[str, Profile]:
    """The built-in :data:`PROFILES`, overridden / extended from a YAML or JSON file.

    The file maps a profile name to ``uplink_bps``, ``downlink_bps`` (bits/s) and
    ``latency_s`` (round trip, seconds); a name that exists is updated key by key, a
    new name needs all three. ValueError names the file, profile and key on a bad entry.
    """
    profiles = dict(base if base is not None else PROFILES)
    if path is None:
        return profiles
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}   # YAML is a superset of JSON: one parser for both
    if not isinstance(data, Mapping):
        raise ValueError(f"profiles file {path}: expected a mapping of profile name -> "
                         f"{{uplink_bps, downlink_bps, latency_s}}, got {type(data).__name__}")
    keys = ("uplink_bps", "downlink_bps", "latency_s")
    for name, entry in data.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f"profiles file {path}: profile {name!r} must be a mapping of {', '.join(keys)}")
        unknown = sorted(set(entry) - set(keys))
        if unknown:
            raise ValueError(f"profiles file {path}: profile {name!r} has unknown key(s) {unknown}; "
                             f"allowed: {', '.join(keys)}")
        old = profiles.get(str(name))
        values = {k: entry.get(k, getattr(old, k) if old else None) for k in keys}
        missing = [k for k, v in values.items() if v is None]
        if missing:
            raise ValueError(f"profiles file {path}: new profile {name!r} lacks {', '.join(missing)}")
        try:
            profiles[str(name)] = Profile(str(name), **{k: float(v) for k, v in values.items()})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"profiles file {path}: profile {name!r}: {exc}") from exc
    return profiles


@dataclass
class ExchangeBytes:
    """One synchronous message exchange: bytes down and up per client."""

    down: dict = field(default_factory=dict)
    up: dict = field(default_factory=dict)


@dataclass
class RoundCost:
    """What :func:`modeled_time` needs of one round: compute seconds and its exchanges in order."""

    round: int
    compute_s: float
    exchanges: list[ExchangeBytes] = field(default_factory=list)


LINKS = ("per-client", "shared")


def modeled_time(rounds: Iterable[RoundCost], profile: Profile, *, link: str = "per-client") -> float:
    """Modeled wall time of a run over a network ``profile`` (thesis Eq. 4.1/4.2, generalized).

    The thesis models a data-parallel run as T_DP = T_d + T_b + T_r + T_f + T_u (Eq. 4.1)
    and BPGAN as T_BP = … + T_m + T_n (Eq. 4.2): transmission terms volume/v plus compute
    terms. Here, per round r, with the round's measured compute time c_r (what the run took
    on the simulation's loopback, where transfer is ~free: local D/G steps T_r and the
    server's update T_u) and its sequential exchanges e = 1..E_r:

        T = Σ_r [ c_r + Σ_e transfer_e + latency · E_r ]

    * ``link="per-client"`` (default): every client has its own access link of the profile
      (phones on 3G/4G, the server's side is not the bottleneck); clients transfer in
      parallel and a synchronous exchange lasts as long as its slowest client:
      transfer_e = max_i (8·down_{i,e} / downlink + 8·up_{i,e} / uplink).
    * ``link="shared"``: all clients' traffic goes through one link of the profile (the
      parameter server's), the thesis' accounting (M·ω/v: volume of all M nodes over one
      speed v): transfer_e = 8·Σ_i down_{i,e} / downlink + 8·Σ_i up_{i,e} / uplink.

    ``latency`` is the profile's round-trip time, paid once per exchange (message down,
    reply up). The thesis' data-distribution term T_d = D/v is absent: data never moves.
    """
    if link not in LINKS:
        raise ValueError(f"link {link!r}: choose one of {', '.join(LINKS)}")
    total = 0.0
    for r in rounds:
        total += float(r.compute_s) + profile.latency_s * len(r.exchanges)
        for ex in r.exchanges:
            nodes = set(ex.down) | set(ex.up)
            if not nodes:
                continue
            if link == "per-client":
                total += max(8 * ex.down.get(n, 0) / profile.downlink_bps + 8 * ex.up.get(n, 0) / profile.uplink_bps
                             for n in nodes)
            else:
                total += 8 * sum(ex.down.values()) / profile.downlink_bps + 8 * sum(ex.up.values()) / profile.uplink_bps
    return total


# ======================================================================================
# The thesis' closed-form model (§4.3, Eq. 4.1–4.3), next to the measured-bytes model
# ======================================================================================
@dataclass(frozen=True)
class ThesisSystem:
    """The variables of thesis §4.3 for one synchronous iteration (one D and one G update).

    Volumes in bytes, ``v`` in bytes/s, times in seconds: ``D`` the training data the system
    processes, ``M`` the work nodes, ``t_D`` / ``t_G`` seconds per byte of training data to
    train the discriminator / generator, ``t_S`` the parameter server's seconds per byte of
    model data, ``omega`` / ``g`` the weights / gradients of one network (the thesis takes G
    and D of equal size), ``F`` the fakes and ``L`` the labels a node pair exchanges.
    """

    v: float
    D: float
    M: int
    t_D: float
    t_G: float
    t_S: float
    omega: float
    g: float
    F: float
    L: float


def thesis_t_dp(s: ThesisSystem, *, load_data: bool = True) -> dict[str, float]:
    """Data parallelism, thesis Eq. 4.1: T_DP = T_d + T_b + T_r + T_f + T_u with
    T_d = D/v, T_b = M·2ω/v, T_f = M·2g/v (weights and gradients of both networks),
    T_r = D(t_D + t_G)/M, T_u = t_S(g + ω)M. (The sum as printed in Eq. 4.1 writes Mω/v + Mg/v,
    dropping the factor 2 of its own term definitions; Eq. 4.3 uses 2Mω/v + 2Mg/v, as here.)
    ``load_data=False`` leaves out T_d: federated data is already on the clients."""
    terms = {"T_d": s.D / s.v if load_data else 0.0, "T_b": s.M * 2 * s.omega / s.v, "T_f": s.M * 2 * s.g / s.v,
             "T_r": s.D * (s.t_D + s.t_G) / s.M, "T_u": s.t_S * (s.g + s.omega) * s.M}
    return {**terms, "total": sum(terms.values())}


def thesis_t_bp(s: ThesisSystem, *, load_data: bool = True) -> dict[str, float]:
    """BPGAN, thesis Eq. 4.2: T_BP = T_d + T_b + T_f + T_m + T_n + T_r + T_u with T_b = Mω/v and
    T_f = Mg/v (only the discriminator's weights and gradients), T_m = (M/2)F/v and
    T_n = (M/2)L/v (fakes and labels within the M/2 pairs), T_r = D·t_D/(M/2) (D is trained on
    the M/2 discriminator blocks while the generator blocks train in parallel) and
    T_u = t_S(g + ω)M/2."""
    half = s.M / 2
    terms = {"T_d": s.D / s.v if load_data else 0.0, "T_b": s.M * s.omega / s.v, "T_f": s.M * s.g / s.v,
             "T_m": half * s.F / s.v, "T_n": half * s.L / s.v, "T_r": s.D * s.t_D / half,
             "T_u": s.t_S * (s.g + s.omega) * half}
    return {**terms, "total": sum(terms.values())}


def thesis_difference(s: ThesisSystem) -> float:
    """Thesis Eq. 4.3, the closed form of T_DP − T_BP when t_D = t_G:
    (M/v)(ω + g − (F + L)/2) + t_S(g + ω)M/2 (with t_D ≠ t_G the term D(t_G − t_D)/M adds)."""
    return (s.M / s.v) * (s.omega + s.g - (s.F + s.L) / 2) + s.t_S * (s.g + s.omega) * s.M / 2 \
        + s.D * (s.t_G - s.t_D) / s.M


def measure_step_times(config: Mapping[str, Any], *, repeats: int = 10) -> dict[str, float]:
    """t_D, t_G (seconds per byte of training data) and t_S (seconds per byte of model data) on
    this machine, for the run's networks and batch: the median time of one discriminator
    gradient on (B real, B fake), one generator gradient through D on B latents, and one
    optimizer step of D, divided by the bytes of the B real samples (float32) and of D's
    gradients."""
    import time

    import torch

    from app.builders import make_discriminator, make_generator, optimizer_for
    from models.losses import discriminator_loss, generator_loss
    from models.steps import sample_latent
    sizes = model_sizes(config)
    cfg = sizes["cfg"]
    G, D = make_generator(cfg), make_discriminator(cfg)
    B = cfg.batch_size
    real = torch.rand(B, *sizes["sample_shape"]) * 2 - 1
    z = sample_latent(B, cfg.latent_dim, generator=torch.Generator().manual_seed(0))
    opt = optimizer_for(cfg, D, 1e-4)

    def timed(fn) -> float:
        fn()   # warm-up
        out = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
        return statistics.median(out)

    def d_grad() -> None:
        with torch.no_grad():
            fake = G(z)
        torch.autograd.grad(discriminator_loss(cfg.loss, D(real), D(fake)), list(D.parameters()))

    def g_grad() -> None:
        torch.autograd.grad(generator_loss(cfg.loss, D(G(z))), list(G.parameters()))

    def server_step() -> None:
        for p in D.parameters():
            p.grad = torch.zeros_like(p)
        opt.step()

    data_bytes = B * math.prod(sizes["sample_shape"]) * 4
    return {"t_D": timed(d_grad) / data_bytes, "t_G": timed(g_grad) / data_bytes,
            "t_S": timed(server_step) / entries_bytes(sizes["d_grads"]), "batch_bytes": data_bytes}


def thesis_system(config: Mapping[str, Any], num_nodes: int, profile: Profile,
                  step_times: Mapping[str, float]) -> ThesisSystem:
    """The thesis' variables for one iteration of a run's setup: ω and g the mean of G's and
    D's record sizes (weights, gradients), F one fake batch, L its labels and feedback (this
    protocol's "labels"), D the real samples of M nodes' batches, v the harmonic mean of the
    profile's uplink and downlink in bytes/s (equal volumes down and up take as long as at
    that single speed), t_D, t_G, t_S measured (:func:`measure_step_times`)."""
    sizes = model_sizes(config)
    cfg = sizes["cfg"]
    S, B = sizes["sample_shape"], cfg.batch_size
    v = 2 / (8 / profile.downlink_bps + 8 / profile.uplink_bps)
    return ThesisSystem(
        v=v, D=num_nodes * step_times["batch_bytes"], M=int(num_nodes),
        t_D=step_times["t_D"], t_G=step_times["t_G"], t_S=step_times["t_S"],
        omega=(entries_bytes(sizes["g_state"]) + entries_bytes(sizes["d_state"])) / 2,
        g=(entries_bytes(sizes["g_grads"]) + entries_bytes(sizes["d_grads"])) / 2,
        F=array_bytes("fakes", (B, *S), DTYPE_BYTES[cfg.fakes_dtype]),
        L=array_bytes("labels", (B,), 4) + array_bytes("feedback", (B, *S), DTYPE_BYTES[cfg.feedback_dtype]))


def thesis_rows(dp: RunData, bp: RunData, num_nodes: int, profiles: Mapping[str, Profile],
                step_times: Mapping[str, float], *, warmup: str = "median") -> list[dict]:
    """Per profile: the thesis' T_DP, T_BP and Eq. 4.3 for as many iterations as the runs made
    generator steps, next to the measured-bytes model of the two runs with one shared link (the
    thesis' accounting: every node's volume over one speed v). T_d is left out of the thesis
    terms (data never moves here); both sides include their compute."""
    steps = sum(generator_steps_of(dp))
    dp_costs, bp_costs = round_costs(dp, warmup=warmup), round_costs(bp, warmup=warmup)
    out = []
    for name, p in profiles.items():
        s = thesis_system(dp.config, num_nodes, p, step_times)
        t_dp, t_bp = thesis_t_dp(s, load_data=False)["total"] * steps, thesis_t_bp(s, load_data=False)["total"] * steps
        m_dp, m_bp = modeled_time(dp_costs, p, link="shared"), modeled_time(bp_costs, p, link="shared")
        out.append({"profile": name, "iterations": steps, "thesis_dp_s": t_dp, "thesis_bp_s": t_bp,
                    "thesis_diff_s": thesis_difference(s) * steps, "measured_dp_s": m_dp, "measured_bp_s": m_bp,
                    "measured_diff_s": m_dp - m_bp, "system": vars(s)})
    return out


def render_thesis_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Markdown: the thesis' closed form next to the measured-bytes model, per profile."""
    head = ["profile", "T_DP thesis Eq. 4.1", "data-parallel run, measured bytes", "T_BP thesis Eq. 4.2",
            "BPGAN run, measured bytes", "T_DP − T_BP thesis Eq. 4.3", "measured difference"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['profile']} | {_fmt_seconds(r['thesis_dp_s'])} | {_fmt_seconds(r['measured_dp_s'])} | "
                     f"{_fmt_seconds(r['thesis_bp_s'])} | {_fmt_seconds(r['measured_bp_s'])} | "
                     f"{_fmt_seconds(r['thesis_diff_s'])} | {_fmt_seconds(r['measured_diff_s'])} |")
    return "\n".join(lines)


def round_costs(run: RunData, *, warmup: str = "median") -> list[RoundCost]:
    """The run's rounds as :class:`RoundCost`: compute = the round's recorded ``wall_time`` (the
    strategies time training apart from scoring, which goes to ``eval_time`` and is not
    counted), exchanges from the training rows of
    comm.jsonl grouped by :func:`exchange_key` in their order of appearance (MGGAN's
    ``regroup`` rows ride with the first exchange of their node in that round).

    ``warmup="median"`` replaces round 1's compute by the median of the later rounds: in a
    simulation round 1 also pays the engine's start (Ray actors, torch imports: ~10 s on
    2 CPU cores), which a deployment pays once and not per round; ``"keep"`` leaves it.
    """
    if warmup not in ("median", "keep"):
        raise ValueError(f"warmup {warmup!r}: choose 'median' or 'keep'")
    by_round: dict[int, list[dict]] = {}
    for row in training_rows(run.comm):
        by_round.setdefault(int(row["round"]), []).append(row)
    out = []
    for rec in run.metrics:
        rnd = int(rec["round"])
        compute = float(rec.get("wall_time") or 0.0)
        order: list[str] = []
        groups: dict[str, ExchangeBytes] = {}
        first_of_node: dict[int, str] = {}
        rows = by_round.get(rnd, [])
        for row in rows:
            if row.get("action") in PIGGYBACK_ACTIONS:
                continue
            key = exchange_key(row)
            if key not in groups:
                order.append(key)
                groups[key] = ExchangeBytes()
            nid = int(row["node"])
            first_of_node.setdefault(nid, key)
            ex = groups[key]
            ex.down[nid] = ex.down.get(nid, 0) + int(row.get("down", 0))
            ex.up[nid] = ex.up.get(nid, 0) + int(row.get("up", 0))
        for row in rows:
            if row.get("action") not in PIGGYBACK_ACTIONS:
                continue
            nid = int(row["node"])
            key = first_of_node.get(nid)
            if key is None:
                key = exchange_key(row)
                order.append(key)
                groups[key] = ExchangeBytes()
            ex = groups[key]
            ex.down[nid] = ex.down.get(nid, 0) + int(row.get("down", 0))
            ex.up[nid] = ex.up.get(nid, 0) + int(row.get("up", 0))
        out.append(RoundCost(rnd, compute, [groups[k] for k in order]))
    if warmup == "median" and len(out) > 1:
        out[0].compute_s = statistics.median(r.compute_s for r in out[1:])
    return out


# ======================================================================================
# One row of the comparison, tables, plots
# ======================================================================================
def summarize_run(run: RunData, *, label: str, quality_key: str = "fid", target: float | None = None,
                  profiles: Mapping[str, Profile] | None = None, link: str = "per-client",
                  warmup: str = "median", run_seconds: float | None = None) -> dict:
    """Everything the comparison reports about one run (a JSON-ready dict)."""
    measured = measured_bytes(run)
    wall = [float(r.get("wall_time") or 0.0) for r in run.metrics]
    costs = round_costs(run, warmup=warmup)
    compute = [c.compute_s for c in costs]
    curve = quality_curve(run, quality_key, compute)
    lower = lower_is_better(quality_key)
    reached = (bytes_to_target([(p["bytes"], p["value"]) for p in curve], target, lower_is_better=lower)
               if target is not None else None)
    profiles = profiles if profiles is not None else PROFILES
    return {
        "label": label, "strategy": run.strategy, "run": str(run.path), "rounds": len(run.metrics),
        "bytes": measured, "wall_time_s": sum(wall), "first_round_s": wall[0] if wall else 0.0,
        "run_seconds": run_seconds, "quality_key": quality_key, "final": final_quality(run, quality_key),
        "curve": curve, "target": target, "bytes_to_target": reached,
        "progress": progress_of(run, compute), "eval_time_s": sum(float(r.get("eval_time") or 0.0) for r in run.metrics),
        "modeled_time_s": {name: modeled_time(costs, p, link=link) for name, p in profiles.items()},
        "link": link, "warmup": warmup,
        "config": {k: run.config.get(k) for k in ("strategy", "dataset", "partition", "batch-size", "gen-features",
                                                  "disc-features", "steps-per-round", "local-steps",
                                                  "fakes-dtype", "feedback-dtype", "eval-every", "eval-samples",
                                                  "eval-extractor")},
    }


def _fmt_int(x: float | int | None) -> str:
    return "n/a" if x is None else f"{int(round(x)):,}"


def _fmt_bytes(x: float | None) -> str:
    """12,345 B / 1.23 MB style, for totals."""
    if x is None:
        return "n/a"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= size:
            return f"{x / size:.2f} {unit}"
    return f"{int(round(x))} B"


SCORE_NAMES = {"fid": "FID", "kid": "KID", "is": "IS", "high_quality_pct": "HQ samples", "modes_covered": "modes",
               "reverse_kl": "reverse KL"}


def format_quality(q: Mapping[str, Any] | None, key: str = "fid") -> str:
    """"FID 12.3 (classifier, 2,500)"; "HQ samples 45.2% (2,500)"; "n/a" when there is none."""
    if not q or q.get("value") is None:
        return "n/a"
    value, n, ex = q["value"], q.get("num_samples"), q.get("extractor")
    name = SCORE_NAMES.get(key, key)
    text = f"{name} {value:.1f}%" if key == "high_quality_pct" else (
        f"{name} {value:.4f}" if key == "kid" else f"{name} {value:.3g}" if key != "fid" else f"{name} {value:.1f}")
    inside = ", ".join(p for p in ((str(ex) if ex else ""), (f"{int(n):,}" if n else "")) if p)
    return f"{text} ({inside})" if inside else text


def format_client(c: Mapping[str, Any] | None) -> str:
    """Client fidelity: mean client FID and TV distance to the client's own labels."""
    if not c:
        return "—"
    parts = []
    if "fid" in c:
        parts.append(f"FID {c['fid']:.1f}")
    if "tv_own" in c:
        parts.append(f"TV own {c['tv_own']:.2f}")
    if "tv_global" in c:
        parts.append(f"TV global {c['tv_global']:.2f}")
    return ", ".join(parts) + f" ({c['clients']} clients)"


def render_table(rows: Sequence[Mapping[str, Any]], *, baseline: Mapping[str, str] | None = None,
                 target: float | None = None, quality_key: str = "fid") -> str:
    """The Markdown results table: one line per strategy / variant.

    ``baseline`` maps a variant's label to the label of the row it is compared with
    (bytes saved and quality change); a row with ``error`` shows it instead of numbers.
    """
    by_label = {r["label"]: r for r in rows}
    tname = SCORE_NAMES.get(quality_key, quality_key)
    goal = ("≤" if lower_is_better(quality_key) else "≥")
    head = ["strategy / variant", "G steps per client", "rounds", "down B / client / G step",
            "up B / client / G step", "training bytes (all clients)", "wall time s (round 1)", "final quality",
            "client fidelity", (f"bytes to {tname} {goal} {target:g} (all clients)" if target is not None
                                else "bytes to target"),
            "vs base: bytes / quality"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            lines.append(f"| {r['label']} | " + " | ".join(["—"] * (len(head) - 2)) + f" | failed: {r['error']} |")
            continue
        b = r["bytes"]
        down, up = _fmt_int(b["down_per_step"]), _fmt_int(b["up_per_step"])
        if b.get("by_role"):
            down += " (" + ", ".join(f"{k[0].upper()}B {_fmt_int(v['down_per_step'])}" for k, v in b["by_role"].items()) + ")"
            up += " (" + ", ".join(f"{k[0].upper()}B {_fmt_int(v['up_per_step'])}" for k, v in b["by_role"].items()) + ")"
        if target is None:
            reached = "n/a (no target given)"
        elif not r.get("curve"):
            reached = "n/a (no scores)"
        else:
            reached = "not reached" if r.get("bytes_to_target") is None else _fmt_bytes(r["bytes_to_target"])
        versus = "—"
        base = by_label.get((baseline or {}).get(r["label"], ""))
        if base is not None and not base.get("error"):
            bb = base["bytes"]["total"]
            saved = (1 - b["total"] / bb) * 100 if bb else 0.0
            fq, bq = (r.get("final") or {}).get("value"), (base.get("final") or {}).get("value")
            dq = f"{tname} {fq - bq:+.2f}" if fq is not None and bq is not None else "quality n/a"
            versus = f"{saved:+.1f}% bytes saved, {dq} (vs {base['label']})"
        label = r["label"] + (" (†)" if r.get("warning") else "")
        lines.append(f"| {label} | {b['steps']:,} | {r['rounds']:,} | {down} | {up} | {_fmt_bytes(b['total'])} | "
                     f"{r['wall_time_s']:.1f} ({r['first_round_s']:.1f}) | {format_quality(r.get('final'), quality_key)} | "
                     f"{format_client((r.get('final') or {}).get('client'))} | {reached} | {versus} |")
    for r in rows:
        if r.get("warning"):
            lines.append(f"\n(†) {r['label']}: {r['warning']}")
    return "\n".join(lines)


def render_time_table(rows: Sequence[Mapping[str, Any]], profiles: Mapping[str, Profile]) -> str:
    """Modeled wall time (seconds) of every row under every bandwidth profile (Markdown)."""
    names = list(profiles)
    head = ["strategy / variant"] + [f"{n} ({_bps(profiles[n].downlink_bps)}↓ {_bps(profiles[n].uplink_bps)}↑ "
                                     f"{profiles[n].latency_s * 1000:g} ms)" for n in names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if r.get("error"):
            continue
        lines.append(f"| {r['label']} | " + " | ".join(_fmt_seconds(r["modeled_time_s"].get(n)) for n in names) + " |")
    return "\n".join(lines)


def _bps(x: float) -> str:
    for unit, size in (("Gbit/s", 1e9), ("Mbit/s", 1e6), ("kbit/s", 1e3)):
        if x >= size:
            return f"{x / size:g} {unit}"
    return f"{x:g} bit/s"


def _fmt_seconds(s: float | None) -> str:
    if s is None:
        return "n/a"
    if s >= 3600:
        return f"{s / 3600:.2f} h"
    if s >= 120:
        return f"{s / 60:.1f} min"
    return f"{s:.1f} s"


def _save(fig, path: Path) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    fig.savefig(path, format="png", dpi=fig.dpi)
    return path


def plot_bytes(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Cumulative training bytes (all clients) vs rounds and vs generator steps, one line per row
    (log scale; a row that sends nothing, e.g. centralized, is named in the title instead)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.4), dpi=100)
    ax_r, ax_s = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    silent = []
    for i, r in enumerate(rows):
        if r.get("error"):
            continue
        style = "-" if i < 10 else "--"   # matplotlib cycles 10 colours
        pts = [p for p in r["progress"] if p["bytes"] > 0]
        if not pts:
            silent.append(r["label"])
            continue
        ax_r.plot([p["round"] for p in pts], [p["bytes"] for p in pts], style, label=r["label"])
        ax_s.plot([p["steps"] for p in pts], [p["bytes"] for p in pts], style, label=r["label"])
    for ax, xl in ((ax_r, "round"), (ax_s, "generator steps per client")):
        ax.set_xlabel(xl)
        ax.set_ylabel("cumulative training bytes")
        ax.set_yscale("log")
        ax.grid(True, alpha=0.3)
    ax_s.legend(fontsize=7)
    fig.suptitle("training traffic" + (f" (no traffic: {', '.join(silent)})" if silent else ""))
    fig.tight_layout()
    return _save(fig, Path(path))


def plot_quality(rows: Sequence[Mapping[str, Any]], path: str | Path, *, x: str, quality_key: str = "fid",
                 target: float | None = None) -> Path | None:
    """Quality vs cumulative training bytes (``x="bytes"``, log scale) or vs cumulative round wall
    time (``x="wall"``), one line per row with scores; None when no row has any."""
    from matplotlib.figure import Figure

    if x not in ("bytes", "wall"):
        raise ValueError(f"x {x!r}: choose 'bytes' or 'wall'")
    fig = Figure(figsize=(7, 4.6), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    drawn = 0
    for i, r in enumerate(rows):
        pts = [(p[x], p["value"]) for p in r.get("curve") or [] if p[x] > 0 or x == "wall"]
        if not pts:
            continue
        xs, ys = zip(*pts)
        ax.plot(xs, ys, "-" if i < 10 else "--", marker=".", label=r["label"])
        drawn += 1
    if not drawn:
        return None
    if target is not None:
        ax.axhline(target, color="gray", linestyle="--", linewidth=1, label=f"target {target:g}")
    if x == "bytes":
        ax.set_xscale("log")
    ax.set_xlabel("cumulative training bytes (all clients)" if x == "bytes" else
                  "cumulative round wall time (s; round 1 as in the modeled time)")
    ax.set_ylabel(quality_key + (" (lower is better)" if lower_is_better(quality_key) else " (higher is better)"))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, Path(path))


__all__ = ["RunData", "read_run", "traffic_class", "training_rows", "exchange_key", "generator_steps_per_round",
           "mean_generator_steps_per_round", "disc_steps_per_g_step", "ThesisSystem", "thesis_t_dp",
           "thesis_t_bp", "thesis_difference", "measure_step_times", "thesis_system", "thesis_rows",
           "render_thesis_table",
           "mggan_plan", "recorded_mggan_plan", "rounds_for_steps", "generator_steps_of", "bytes_by_node",
           "measured_bytes", "cumulative_training_bytes", "progress_of", "array_bytes", "config_bytes", "metric_bytes",
           "model_sizes", "analytic_bytes", "headline_quality", "client_fidelity", "quality_curve", "final_quality",
           "bytes_to_target", "lower_is_better", "Profile", "PROFILES", "load_profiles", "ExchangeBytes", "RoundCost",
           "modeled_time", "round_costs", "summarize_run", "render_table", "render_time_table", "format_quality",
           "plot_bytes", "plot_quality"]
