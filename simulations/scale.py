#!/usr/bin/env python
"""What a PrivacyGAN round of N virtual clients costs, three ways, measured in one run.

For each client count the same rounds (K = 1: per client one fake batch, one D_i step on a real
batch and the fakes, its labels and feedback, one JRLF step of the student, thesis Eq. 5.9) are run

* ``sequential``      in this process, one client after another, written directly against
                      ``models/steps.py`` (``discriminator_step``, ``generator_feedback``,
                      ``student_update``): the work without any federation;
* ``batched-server``  the same, with the students' JRLF steps as stacked computations
                      (``models/batched.py``: grouped layers on the CPU, vmap on CUDA; 32
                      networks per stack on the CPU, ``--stack-chunk``; what the ServerApp does
                      with ``server-batching``);
* ``batched``         the same, with the clients' D steps and feedback batched too
                      (``discriminators_step``): the whole round as few large computations;
* ``simulation``      through Flower's Simulation Engine (``simulations/common.py``), N
                      SuperNodes, the real ServerApp and ClientApp, one CPU per virtual client;
                      with ``--cohort-size 1,10`` once per size M: N / M SuperNodes each carrying
                      a cohort of M virtual clients (run config ``cohort-size``, one message per
                      node per round; ``strategies/cohort.py``).

It prints seconds per round (the median of the timed rounds, after one warm-up round),
milliseconds per client, each mode's throughput relative to ``sequential``, the peak RSS of
the whole process tree (this process and every descendant: Ray's workers too), sampled every
0.1 s (for the simulation also the peak PSS, sampled every 2 s, by kind of process: ServerApp,
actors, Ray's daemons, SuperLink...), and on CUDA the peak GPU memory; writes ``scale.json`` and a log-log plot
``scale.png`` of round time against clients.

    python simulations/scale.py                                       # 10, 100, 1000 clients, all modes
    python simulations/scale.py --clients 100 --modes sequential,batched --device cuda --image-size 32 \\
        --channels 3 --features 64                                    # DCGAN-32 on a GPU

The networks are the DCGANs of the run config (``--features`` feature maps, latent
``--latent-dim``) on scikit-learn's digits, every client holding the clients' whole pool
(``partition=full``: the cost per client does not depend on how the data is split). The teacher
is untrained in the in-process modes (its cost per step is the same). Timings depend on the
machine and on whatever else runs on it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import threading
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.batched import CPU_CHUNK, Stack, chunk_slices, discriminators_step, students_update  # noqa: E402
from models.factory import build_discriminator, build_generator  # noqa: E402
from models.losses import make_optimizer  # noqa: E402
from models.steps import discriminator_step, generator_feedback, sample_latent, student_update  # noqa: E402

MODES = ("sequential", "batched-server", "batched", "simulation")
IN_PROCESS = MODES[:3]


# -------------------------------------------------------------------------------------------
# Peak memory of the process tree
# -------------------------------------------------------------------------------------------
def process_kind(proc: psutil.Process) -> str:
    """What a process of a simulation is, from its command line (for the memory breakdown)."""
    try:
        cmd = " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "other"
    for needle, kind in (("ClientAppActor", "ray actors (ClientApp)"), ("flower-superlink", "SuperLink"),
                         ("flower-superexec", "SuperExec"), ("flwr-simulation", "simulation runtime (ServerApp)"),
                         ("flwr-serverapp", "simulation runtime (ServerApp)"), ("ray", "Ray daemons"),
                         ("raylet", "Ray daemons"), ("gcs_server", "Ray daemons")):
        if needle in cmd:
            return kind
    return "this script" if proc.pid == os.getpid() else "other"


class TreeRSS:
    """Samples the summed RSS of this process, all its descendants and the processes of its
    simulations' SuperLink (app/simulation.py) every ``every`` seconds; every ``pss_every``
    seconds also their PSS (pages shared between processes -- torch's libraries, a mapped
    dataset -- split between them, which RSS counts once per process), by kind of process,
    keeping the breakdown at the highest PSS total."""

    def __init__(self, every: float = 0.1, pss_every: float = 2.0) -> None:
        self.every, self.pss_every, self.peak = every, pss_every, 0
        self.peak_pss, self.pss_breakdown = 0, {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._last_pss = 0.0

    @staticmethod
    def processes() -> list[psutil.Process]:
        from app.simulation import shared_processes

        me = psutil.Process()
        # the Simulation Engine's processes run under a detached SuperLink, not under this one
        return list({p.pid: p for p in [me, *me.children(recursive=True), *shared_processes()]}.values())

    def sample(self) -> int:
        total = 0
        for proc in self.processes():
            try:
                total += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total

    def sample_pss(self) -> None:
        by_kind: dict[str, int] = {}
        for proc in self.processes():
            try:
                pss = getattr(proc.memory_full_info(), "pss", None)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if pss is None:   # not Linux: no PSS
                return
            kind = process_kind(proc)
            by_kind[kind] = by_kind.get(kind, 0) + pss
        if sum(by_kind.values()) > self.peak_pss:
            self.peak_pss, self.pss_breakdown = sum(by_kind.values()), by_kind

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            if time.monotonic() - self._last_pss >= self.pss_every:
                self.sample_pss()
                self._last_pss = time.monotonic()
            self._stop.wait(self.every)

    def __enter__(self) -> "TreeRSS":
        self.peak = self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.sample())


# -------------------------------------------------------------------------------------------
# The in-process rounds
# -------------------------------------------------------------------------------------------
class World:
    """N clients' D_i and the server's N students, the frozen teacher, each client's data."""

    def __init__(self, n: int, args: argparse.Namespace, real: torch.Tensor, device: torch.device,
                 dtype: torch.dtype = torch.float32, d_lr: float = 2e-4) -> None:
        torch.manual_seed(args.seed)
        g = dict(latent_dim=args.latent_dim, channels=real.shape[1], image_size=real.shape[-1],
                 features=args.features)
        self.teacher_g = build_generator("dcgan", **g).to(device)
        self.teacher_d = build_discriminator("dcgan", channels=real.shape[1], image_size=real.shape[-1],
                                             features=args.features, loss="bce").to(device)
        for p in [*self.teacher_g.parameters(), *self.teacher_d.parameters()]:
            p.requires_grad_(False)
        self.students, self.discs = [], []
        for _ in range(n):
            G = copy.deepcopy(self.teacher_g).train()
            for p in G.parameters():
                p.requires_grad_(True)
            self.students.append((G, make_optimizer("bce", G.parameters(), 2e-4, (0.5, 0.999))))
            D = build_discriminator("dcgan", channels=real.shape[1], image_size=real.shape[-1],
                                    features=args.features, loss="bce").to(device).train()
            self.discs.append((D, make_optimizer("bce", D.parameters(), d_lr, (0.5, 0.999))))
        for m in [self.teacher_g, self.teacher_d, *(G for G, _ in self.students), *(D for D, _ in self.discs)]:
            m.to(dtype)
        self.real, self.n, self.args, self.device, self.dtype = real, n, args, device, dtype
        self.gen = torch.Generator(device=device).manual_seed(args.seed + 1)
        self.data_gen = torch.Generator().manual_seed(args.seed + 2)

    def batch_of_reals(self) -> torch.Tensor:
        """Each client's real batch from its own data (here: the clients' whole pool, uint8 -> [-1, 1])."""
        idx = torch.randint(len(self.real), (self.n, self.args.batch_size), generator=self.data_gen)
        return (self.real[idx].to(self.device, non_blocking=True).to(self.dtype) / 127.5 - 1.0)

    def round(self, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
        """One round; returns the fakes (N, B, ...) and the clients' feedback on them."""
        B, L, alpha = self.args.batch_size, self.args.latent_dim, self.args.alpha
        z = sample_latent(self.n * B, L, generator=self.gen, device=self.device).reshape(self.n, B, L).to(self.dtype)
        real = self.batch_of_reals()
        if mode == "sequential":
            out = []
            for i, ((G, opt), (D, d_opt)) in enumerate(zip(self.students, self.discs)):
                with torch.no_grad():                                       # server: x̃_i = G_i(z_i)
                    fakes = G(z[i])
                discriminator_step(D, d_opt, real[i], fakes, "bce")        # client i: D_i step
                _, feedback = generator_feedback(D, fakes, "bce")          # client i: labels, f_i
                student_update(G, opt, z[i], feedback, self.teacher_d, alpha, "bce")   # server: JRLF
                out.append((fakes, feedback))
            return torch.stack([f for f, _ in out]), torch.stack([f for _, f in out])
        chunk = self.args.stack_chunk or None
        stacks = [(sl, Stack([G for G, _ in self.students[sl]], path=self.args.stack_path))
                  for sl in chunk_slices(self.n, self.device, chunk)]
        with torch.no_grad():
            fakes = torch.cat([stack(z[sl]) for sl, stack in stacks])
        for _, stack in stacks:
            stack.write_buffers()
        if mode == "batched":
            _, _, feedback = discriminators_step(self.discs, real, fakes, "bce", path=self.args.stack_path, chunk=chunk)
        else:   # batched-server: the clients one by one, as separate ClientApps would
            feedback = torch.empty_like(fakes)
            for i, (D, d_opt) in enumerate(self.discs):
                discriminator_step(D, d_opt, real[i], fakes[i], "bce")
                _, feedback[i] = generator_feedback(D, fakes[i], "bce")
        for sl, stack in stacks:
            students_update(self.students[sl], z[sl], feedback[sl], self.teacher_d, alpha, "bce", stack=stack)
        return fakes, feedback


def check_equal(n: int, args: argparse.Namespace, real: torch.Tensor, device: torch.device) -> dict:
    """How exact the batched round is: one round from the same start, latents and real batches,
    sequential and batched in float32 (TF32 off on CUDA), each compared with the sequential
    round in float64 (the reference). Relative errors (max |x - ref| / max |ref| per tensor, the
    largest over tensors) of the fakes, the clients' D_i gradients, their feedback and the
    students' JRLF gradients. The clients' D learning rate is 0 here: Adam's first step moves
    each weight by about ±lr whatever the gradient's size, so rounding in a near-zero gradient
    entry would move the D_i that computes the feedback apart between the runs."""
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    worlds, outs = {}, {}
    try:
        for name, mode, dtype in (("reference", "sequential", torch.float64), ("sequential", "sequential", torch.float32),
                                  ("batched", "batched", torch.float32)):
            worlds[name] = World(n, args, real, device, dtype=dtype, d_lr=0.0)
            outs[name] = worlds[name].round(mode)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32

    def rel(x, ref):
        return float((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-300))

    def grads_rel(pairs_x, pairs_ref):
        return max(rel(px.grad, pr.grad) for (mx, _), (mr, _) in zip(pairs_x, pairs_ref)
                   for px, pr in zip(mx.parameters(), mr.parameters()))

    ref, out = worlds["reference"], {"clients": n}
    for name in ("sequential", "batched"):
        w = worlds[name]
        out[name] = {"fakes": rel(outs[name][0], outs["reference"][0]), "d_grads": grads_rel(w.discs, ref.discs),
                     "feedback": rel(outs[name][1], outs["reference"][1]),
                     "g_grads": grads_rel(w.students, ref.students)}
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_in_process(mode: str, n: int, args: argparse.Namespace, real: torch.Tensor, device: torch.device) -> dict:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with TreeRSS() as rss:
        world = World(n, args, real, device)
        times = []
        for r in range(args.rounds + 1):          # round 0 warms up (allocations, vmap's first trace)
            sync(device)
            t0 = time.perf_counter()
            world.round(mode)
            sync(device)
            if r:
                times.append(time.perf_counter() - t0)
    out = {"round_s": statistics.median(times), "rounds_timed": len(times), "peak_rss_gb": rss.peak / 1e9}
    if device.type == "cuda":
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if args.profile:
        out["profile"] = profile_round(world, mode)
    del world
    return out


def profile_round(world: "World", mode: str) -> dict:
    """One more round under torch.profiler (CPU): its self CPU time, the share spent in
    convolutions (forward and backward: arithmetic that batching barely shortens), and the top ops."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        world.round(mode)
    ops = [(e.key, e.self_cpu_time_total / 1e3) for e in prof.key_averages()]
    total = sum(ms for _, ms in ops)
    conv = sum(ms for name, ms in ops if "convolution" in name)
    top = sorted(ops, key=lambda kv: -kv[1])[:6]
    return {"cpu_ms": total, "conv_ms": conv, "top": [[name, ms] for name, ms in top]}


def run_through_engine(n: int, args: argparse.Namespace, cohort: int = 1) -> dict:
    """The same rounds through Flower's Simulation Engine; the median server-side round time of
    rounds 2.. (round 1 starts the actors) from the run's metrics.jsonl."""
    from app.comparison import read_run
    from app.config import parse_config
    from simulations.common import simulate
    from strategies.base import TRACE_ENV   # Flower is needed here anyway; the in-process modes do without

    cfg = parse_config({
        "strategy": "privacygan", "dataset": "digits", "partition": "full", "server-data": "heldout",
        "image-size": args.image_size, "channels": args.channels,
        "gen-features": args.features, "disc-features": args.features, "latent-dim": args.latent_dim,
        "batch-size": args.batch_size, "alpha": args.alpha, "steps-per-round": 1, "teacher-steps": 1,
        "num-rounds": args.rounds + 1, "min-nodes": n, "min-replies": n, "sample-every": 0, "eval-every": 0,
        "client-eval": False, "checkpoint-every": 0, "samples-per-client": 1, "seed": args.seed,
        "server-batching": args.server_batching, "device": args.device, "max-in-flight": args.max_in_flight,
        "node-wait-timeout": max(120.0, 1.0 * n), "round-timeout": max(300.0, 2.0 * n),
        "output-dir": str(Path(args.output_dir) / "runs-scale"), "cohort-size": cohort,
        "cohort-batching": args.cohort_batching == "on",
    })
    trace_file = Path(args.output_dir).resolve() / f"trace-{n}.jsonl"
    trace_file.unlink(missing_ok=True)
    previous = os.environ.get(TRACE_ENV)
    os.environ[TRACE_ENV] = str(trace_file)   # Ray's actors inherit it: one line per message from each side
    try:
        with TreeRSS() as rss:
            t0 = time.monotonic()
            folder = simulate(cfg, n, client_cpus=1, client_gpus=args.client_gpus)
            wall = time.monotonic() - t0
    finally:
        if previous is None:
            os.environ.pop(TRACE_ENV, None)
        else:
            os.environ[TRACE_ENV] = previous
    rounds = [r for r in read_run(folder).metrics if int(r.get("round", 0)) >= 2 and "round_time" in r]
    if not rounds:
        raise RuntimeError(f"{folder}: no timed rounds in metrics.jsonl")
    return {"round_s": statistics.median(float(r["round_time"]) for r in rounds), "rounds_timed": len(rounds),
            "peak_rss_gb": rss.peak / 1e9, "wall_s": wall, "run_folder": str(folder),
            "peak_pss_gb": rss.peak_pss / 1e9,
            "pss_by_process_gb": {k: v / 1e9 for k, v in sorted(rss.pss_breakdown.items())},
            "server_batching": rounds[-1].get("server_batching"),
            "breakdown": round_breakdown(trace_file, rounds)}


def round_breakdown(trace_file: Path, rounds: list[dict]) -> dict:
    """Where a simulated round's seconds go (medians over rounds 2..), from the FEDGAN_TRACE lines:
    ``server`` = the round's time outside its exchange (fakes made, students updated, records
    written); ``clients`` = the ClientApp handlers' time (summed, and divided by the number of
    actor processes that ran them, as they run in parallel); ``engine`` = the exchange's time not
    spent in a handler (the Simulation Engine moving messages and contexts to and from its actors);
    and the median handler time per message."""
    rows = [json.loads(line) for line in trace_file.read_text().splitlines() if line.strip()]
    push = {r["msg"]: r for r in rows if r.get("side") == "server" and r.get("event") == "push"}
    reply = {r["msg"]: r for r in rows if r.get("side") == "server" and r.get("event") == "reply"}
    client = {r["msg"]: r for r in rows if r.get("side") == "client"}
    parts: dict[str, list[float]] = {"server": [], "clients_sum": [], "clients_wall": [], "engine": [],
                                     "handler_ms": [], "actors": []}
    for rec in rounds:
        ids = [m for m, r in push.items() if str(r.get("round")) == str(rec["round"]) and m in client and m in reply]
        if not ids:
            continue
        exchange_s = max(reply[m]["t"] for m in ids) - min(push[m]["t"] for m in ids)
        handlers = [client[m]["handler_end"] - client[m]["handler_start"] for m in ids]
        actors = len({client[m]["pid"] for m in ids})
        parts["server"].append(float(rec["round_time"]) - exchange_s)
        parts["clients_sum"].append(sum(handlers))
        parts["clients_wall"].append(sum(handlers) / actors)
        parts["engine"].append(exchange_s - sum(handlers) / actors)
        parts["handler_ms"].append(1e3 * statistics.median(handlers))
        parts["actors"].append(actors)
    return {k: statistics.median(v) for k, v in parts.items() if v}


# -------------------------------------------------------------------------------------------
def load_reals(args: argparse.Namespace) -> torch.Tensor:
    """The clients' pool of digits as uint8 (N, C, H, W): 1 byte per pixel, turned into float per batch."""
    from app.data import DataSpec, client_dataset

    spec = DataSpec(dataset="digits", image_size=args.image_size, channels=args.channels, partition="full",
                    server_data="heldout", seed=args.seed)
    x = client_dataset(spec, 0, 1).x
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)


def plot(results: list[dict], path: Path) -> None:
    import logging

    import matplotlib

    matplotlib.use("Agg")
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)   # "findfont: ... not found" noise
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for mode in dict.fromkeys(r["mode"] for r in results):
        pts = sorted((r["clients"], r["round_s"]) for r in results if r["mode"] == mode)
        if pts:
            ax.plot(*zip(*pts), marker="o", label=mode)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("clients (one PrivacyGAN step each per round)")
    ax.set_ylabel("seconds per round")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(results: list[dict]) -> str:
    seq = {r["clients"]: r["round_s"] for r in results if r["mode"] == "sequential"}
    lines = ["| clients | mode | s / round | ms / client | throughput vs sequential | peak RSS (GB) | peak GPU (GB) |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = f"{seq[r['clients']] / r['round_s']:.2f}" if r["clients"] in seq else "-"
        gpu = f"{r['peak_gpu_gb']:.2f}" if "peak_gpu_gb" in r else "-"
        lines.append(f"| {r['clients']} | {r['mode']} | {r['round_s']:.3f} | {1e3 * r['round_s'] / r['clients']:.2f} | "
                     f"{ratio} | {r['peak_rss_gb']:.2f} | {gpu} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from app.launch import HelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--clients", default="10,100,1000", help="comma-separated client counts")
    p.add_argument("--modes", default=",".join(MODES), help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per point (after one warm-up round)")
    p.add_argument("--features", type=int, default=16, help="gen-features = disc-features")
    p.add_argument("--latent-dim", type=int, default=32, help="latent size of the generators")
    p.add_argument("--batch-size", type=int, default=32, help="fakes and real samples per batch")
    p.add_argument("--image-size", type=int, default=16, choices=(16, 32, 64), help="digits resized to this side")
    p.add_argument("--channels", type=int, default=1, choices=(1, 3), help="1 grey, 3 colour (the grey copied)")
    p.add_argument("--alpha", type=float, default=0.5, help="JRLF weight of the client's feedback")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu", help="where the in-process modes run")
    p.add_argument("--threads", type=int, default=1, help="torch threads of the in-process modes (one CPU, "
                   "as one virtual client gets)")
    p.add_argument("--stack-path", choices=("auto", "grouped", "vmap"), default="auto",
                   help="how the batched modes compute the stacked networks (models.batched.Stack): grouped "
                   "layers, vmap of functional_call, or auto (grouped on the CPU, vmap on CUDA)")
    p.add_argument("--stack-chunk", type=int, default=0, help="networks per stacked computation in the batched "
                   "modes (0: models.batched's default, 32 on the CPU, all at once on CUDA)")
    p.add_argument("--server-batching", choices=("auto", "on", "off"), default="auto",
                   help="the ServerApp's server-batching in the simulation mode")
    p.add_argument("--max-in-flight", type=int, default=0, help="the simulation's run config max-in-flight "
                   "(0: what simulations/common.py picks, 16 x the actors that run at once)")
    p.add_argument("--cohort-size", default="1", help="comma-separated: virtual clients per simulated SuperNode "
                   "(run config cohort-size) for the simulation mode, one simulation per size, e.g. 1,10")
    p.add_argument("--cohort-batching", choices=("on", "off"), default="on",
                   help="run config cohort-batching in the simulation mode: a cohort's D steps as one computation")
    p.add_argument("--client-gpus", type=float, default=None, help="GPUs per virtual client in the simulation mode "
                   "(default 0 on CPU machines, 1/clients with CUDA)")
    p.add_argument("--output-dir", default="fedgan-output/scale", help="where scale.json, scale.png and the "
                   "simulation's runs go")
    p.add_argument("--seed", type=int, default=0, help="seed of networks, latents and batches")
    p.add_argument("--profile", action="store_true", help="profile one more round of each in-process mode "
                   "(torch.profiler): its CPU time, the convolutions' share and the top ops")
    p.add_argument("--check", action="store_true", help="first check on this device that one batched round "
                   "equals one sequential round (largest parameter difference; default: no check)")
    args = p.parse_args(argv)
    try:
        counts = [int(c) for c in args.clients.split(",") if c.strip()]
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        cohorts = [int(c) for c in args.cohort_size.split(",") if c.strip()]
    except ValueError:
        p.error(f"--clients {args.clients!r}: expected comma-separated integers")
    bad = [m for m in modes if m not in MODES]
    if not cohorts or min(cohorts) < 1:
        p.error(f"--cohort-size {args.cohort_size!r}: expected comma-separated integers >= 1")
    if bad or not counts or min(counts) < 1:
        p.error(f"--modes: unknown {bad}" if bad else "--clients: positive integers")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is visible")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    torch.set_num_threads(args.threads)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    real = load_reals(args) if any(m in IN_PROCESS for m in modes) else None
    results, checks = [], []
    if args.check:
        checks.append(check_equal(min(counts), args, real if real is not None else load_reals(args), device))
        c = checks[-1]
        print(f"[scale] check: one round of {c['clients']} clients on {device}, float32 vs a float64 sequential "
              "reference, relative error (the largest over tensors)", flush=True)
        for name in ("sequential", "batched"):
            e = c[name]
            print(f"[scale]   {name:<10} fakes {e['fakes']:.1e}  D_i gradients {e['d_grads']:.1e}  feedback "
                  f"{e['feedback']:.1e}  student gradients {e['g_grads']:.1e}", flush=True)
    on_cpu = device.type == "cpu"
    stack_path = {"auto": "grouped layers" if on_cpu else "vmap", "grouped": "grouped layers"}.get(args.stack_path,
                                                                                                 args.stack_path)
    print(f"[scale] device {device}, DCGANs with {args.features} feature maps on {args.channels}x{args.image_size}x"
          f"{args.image_size} digits, batch {args.batch_size}, latent {args.latent_dim}, {args.rounds} timed rounds; "
          f"batched modes stack the networks as {stack_path}, "
          f"{args.stack_chunk or (CPU_CHUNK if on_cpu else 'all')} at a time", flush=True)
    for n in counts:
        runs = [(m, 1) for m in modes if m != "simulation"]
        runs += [("simulation", c) for c in cohorts if "simulation" in modes]
        for mode, cohort in runs:
            if n % cohort:
                print(f"[scale] {n} clients: cohorts of {cohort} do not divide them; skipped", flush=True)
                continue
            t0 = time.monotonic()
            try:
                r = run_through_engine(n, args, cohort) if mode == "simulation" else run_in_process(mode, n, args, real,
                                                                                                   device)
            except torch.cuda.OutOfMemoryError as exc:
                print(f"[scale] {n} clients, {mode}: out of GPU memory ({str(exc).splitlines()[0]}); "
                      "use fewer clients or smaller --features", flush=True)
                continue
            if cohort > 1:
                mode = f"simulation, cohorts of {cohort}"
            r.update(clients=n, mode=mode, cohort_size=cohort, device=str(device), elapsed_s=time.monotonic() - t0)
            results.append(r)
            if "breakdown" in r:
                b = r["breakdown"]
                print(f"[scale]        a simulated round: server {b['server']:.2f} s, clients' handlers {b['clients_sum']:.2f} s "
                      f"({b['clients_wall']:.2f} s on {b['actors']:.0f} actors; {b['handler_ms']:.1f} ms per message), "
                      f"the engine moving messages {b['engine']:.2f} s", flush=True)
            if "profile" in r:
                pr = r["profile"]
                print(f"[scale]        profiled round: {pr['cpu_ms']:.0f} ms of CPU, convolutions (forward and backward) "
                      f"{pr['conv_ms']:.0f} ms ({pr['conv_ms'] / max(pr['cpu_ms'], 1e-9):.0%}); top: "
                      + ", ".join(f"{name} {ms:.0f}" for name, ms in pr["top"]), flush=True)
            if r.get("pss_by_process_gb"):
                print(f"[scale]        peak PSS {r['peak_pss_gb']:.2f} GB: " + ", ".join(
                    f"{k} {v:.2f}" for k, v in r["pss_by_process_gb"].items()), flush=True)
            print(f"[scale] {n:>5} clients  {mode:<15} {r['round_s']:.3f} s/round  "
                  f"{1e3 * r['round_s'] / n:.2f} ms/client  peak RSS {r['peak_rss_gb']:.2f} GB"
                  + (f"  peak GPU {r['peak_gpu_gb']:.2f} GB" if "peak_gpu_gb" in r else "")
                  + f"  ({r['elapsed_s']:.0f} s)", flush=True)
            (out / "scale.json").write_text(json.dumps({"settings": vars(args), "checks": checks, "results": results}, indent=1))
    print(table(results), flush=True)
    (out / "scale.md").write_text(table(results) + "\n")
    if results:
        plot(results, out / "scale.png")
    print(f"[scale] wrote {out / 'scale.json'}, {out / 'scale.md'} and {out / 'scale.png'}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
