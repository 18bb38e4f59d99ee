"""The ServerApp: parses the run config once, prepares the run folder and the teacher,
then hands the Grid to the strategy the config names.

Settings come from the run config (``flwr run``) or from the Config captured by
:func:`make_server_app` (simulation scripts, where ``context.run_config`` is empty).
A run that fails raises, so Flower records it as failed; its folder's summary.md says why.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import traceback
from pathlib import Path

import torch
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from app.builders import geometry, image_evaluator, make_discriminator, make_generator, optimizer_for
from app.config import (RESUMABLE, Config, ConfigError, check_tracking, config_from_context, parse_config,
                        resolve_device)
from app import data as data_module
from app.data import batch_sampler, client_dataset, mode_means, partition_summary, server_dataset, test_dataset
from app.generators import export_server_generators, flower_run_id_of, mark_flower_run
from app.metrics import (EvaluatorMissing, classifier_path, density_plot, describe_scores, ensure_classifier,
                         mode_metrics)
from app.runs import Progress, RunFolder, describe_os_error, eval_sets
from app.tracking import NullTracker, Tracker, make_tracker
from strategies.base import RunInterrupted, log, set_max_in_flight, set_poll_interval
from strategies.cohort import CohortGrid
from strategies.bpgan import BPGAN, BPGANSettings, resolve_model
from strategies.centralized import Centralized, CentralizedSettings
from strategies.dataparallel import DataParallel, DataParallelSettings
from strategies.fedavg import FedAvg, FedAvgSettings
from strategies.local import Local, LocalSettings
from strategies.mggan import MGGAN, MGGANSettings
from strategies.privacygan import PrivacyGAN, PrivacyGANSettings, train_teacher


def say(text: str) -> None:
    """A line for the person watching the run (stdout is what `flwr run --stream` shows)."""
    print(f"[fedgan] {text}", flush=True)


class RunRecorder:
    """Writes what a strategy reports into the run folder and prints progress."""

    def __init__(self, folder: RunFolder, total_rounds: int, means: torch.Tensor | None = None, *,
                 cfg: Config | None = None, flower_run_id: int | None = None, tracker: Tracker | None = None) -> None:
        self.folder = folder
        self.means = means
        self.cfg = cfg                      # given: the server's generators go to generators/ with each server.pt
        self.flower_run_id = flower_run_id
        self.tracker = tracker or NullTracker()   # live tracking mirrors metrics.jsonl and the grids (app/tracking.py)
        self.start = time.monotonic()
        self.rounds_logged = 0
        self.last_round = 0
        self._progress = Progress(total_rounds)
        self.dp_epsilon: dict[str, float] = {}   # client label -> latest dp_epsilon it reported

    def log_round(self, record: dict) -> None:
        for name, row in (record.get("clients") or {}).items():
            if isinstance(row, dict) and isinstance(row.get("dp_epsilon"), (int, float)):
                self.dp_epsilon[str(name)] = float(row["dp_epsilon"])
        if self.dp_epsilon:
            record = {**record, "dp_epsilon_max": max(self.dp_epsilon.values())}
        row = {**record, "elapsed": time.monotonic() - self.start}
        self.folder.log_metrics(row)
        self.rounds_logged += 1
        if isinstance(record.get("round"), (int, float)) and not isinstance(record.get("round"), bool):
            self.last_round = int(record["round"])
        self.tracker.log_round(row, step=self.last_round)

    def log_comm(self, rows: list[dict]) -> None:
        self.folder.log_comm(rows)

    def save_samples(self, tag: str, rows: dict) -> None:
        png = self.folder.save_samples(tag, rows)
        numbered = re.fullmatch(r"round(\d+)", tag)
        step = int(numbered.group(1)) if numbered else self.last_round
        self.tracker.log_image("samples", png, step)
        if rows and all(t.dim() == 2 and t.shape[1] == 2 for t in rows.values()):
            # 2-D data: also a density map (modes marked) and the raw points for later plots
            density = density_plot(self.folder.path / "samples" / f"{tag}_density.png", rows, self.means)
            torch.save({k: v.cpu() for k, v in rows.items()}, self.folder.path / "samples" / f"{tag}.pt")
            self.tracker.log_image("samples_density", density, step)

    def save_checkpoint(self, name: str, obj: object) -> None:
        self.folder.save_checkpoint(name, obj)
        if self.cfg is not None and name == "server.pt":   # teacher / students / global G, for fedgan-sample
            export_server_generators(self.folder.path, self.cfg, obj, flower_run_id=self.flower_run_id)

    def progress(self, rnd: int, metrics: dict) -> None:
        if self.dp_epsilon:   # DP runs: the largest epsilon any client has spent so far
            metrics = {**metrics, "max_eps": max(self.dp_epsilon.values())}
        self._progress.update(rnd, metrics)


class _Console(logging.StreamHandler):
    """Warnings (dropped nodes and why) also go to the console the user watches."""


def _attach_log_file(folder: RunFolder) -> logging.Handler:
    handler = logging.FileHandler(folder.path / "log.txt")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    if not any(isinstance(h, _Console) for h in log.handlers):
        console = _Console(sys.stdout)
        console.setLevel(logging.WARNING)
        console.setFormatter(logging.Formatter("[fedgan] %(levelname)s %(message)s"))
        log.addHandler(console)
    return handler


def prepare_teacher(cfg: Config, folder: RunFolder, device: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """Teacher phase (SPEC 4.2 step 1): load ``teacher-path`` or train on the server's data."""
    G, D = make_generator(cfg).to(device), make_discriminator(cfg).to(device)
    if cfg.teacher_path:
        path = Path(cfg.teacher_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"run config 'teacher-path' = {cfg.teacher_path!r}: no such file")
        blob = torch.load(path, map_location=device, weights_only=False)
        G.load_state_dict(blob["g"])
        try:
            D.load_state_dict(blob["d"])
        except RuntimeError as exc:
            if not cfg.dp:
                raise
            raise ConfigError(f"run config 'teacher-path' = {cfg.teacher_path!r}: its discriminator does not load "
                              "into the GroupNorm D that dp = true builds (a teacher trained with dp = false has "
                              f"BatchNorm; train one with dp = true): {str(exc).splitlines()[0]}") from None
        say(f"teacher loaded from {path}")
        return G, D
    if cfg.teacher_steps == 0:
        say("no teacher phase (alpha = 1): students start from a random generator")
        return G, D
    data = server_dataset(cfg.data_spec())
    if len(data) == 0:
        raise ValueError(f"run config 'server-data' = {cfg.server_data!r} leaves the server no data for the teacher")
    x = data.view
    say(f"teacher phase: {cfg.teacher_steps} steps on the server's own {len(data)} samples")
    progress = Progress(cfg.teacher_steps, label="teacher step")
    every = max(1, cfg.teacher_steps // 10)

    def on_step(step: int, stats: dict) -> None:
        if step % every == 0 or step == cfg.teacher_steps:
            progress.update(step, {"g_loss": stats["g_loss"], "d_loss": stats["d_loss"]})

    train_teacher(G, D, batch_sampler(x), steps=cfg.teacher_steps,
                  loss=cfg.loss, gen_lr=cfg.lr_for(cfg.loss, cfg.teacher_gen_lr),
                  disc_lr=cfg.lr_for(cfg.loss, cfg.teacher_disc_lr), betas=(cfg.adam_beta1, cfg.adam_beta2),
                  batch_size=cfg.batch_size, seed=cfg.seed, on_step=on_step, d_steps=cfg.disc_steps_for(cfg.loss))
    folder.save_checkpoint("teacher.pt", {"g": G.state_dict(), "d": D.state_dict(), "config": cfg.to_run_config()})
    return G, D


def partition_labeller(cfg: Config):
    """Row labels for sample grids from the simulation's partition plan (e.g. "client 0 (classes 0,1)").

    Only the run config is used (the plan every simulated client follows); it says
    nothing about a deployed node's private data, which keeps the plain "client <id>".
    """
    cache: dict[int, list[dict]] = {}

    def describe(pid: int, num_nodes: int) -> str:
        if cfg.partition not in ("classes", "dirichlet") or num_nodes < 1:
            return f"client {pid}"
        try:
            plan = cache.setdefault(num_nodes, partition_summary(cfg.data_spec(), num_nodes))
            classes = plan[pid]["classes"]
        except Exception:  # a deployment node outside the plan: no label, no failure
            return f"client {pid}"
        shown = ",".join(map(str, classes[:6])) + ("..." if len(classes) > 6 else "")
        return f"client {pid} (classes {shown})"

    return describe


def privacygan_settings(cfg: Config) -> PrivacyGANSettings:
    fields = PrivacyGANSettings.__dataclass_fields__
    return PrivacyGANSettings(**{**{k: getattr(cfg, k) for k in fields}, "client_eval": client_eval_enabled(cfg),
                                 "client_disc_steps": cfg.disc_steps_for(cfg.loss)})


def negatives_sampler(cfg: Config):
    """``server-negatives`` > 0: a sampler of the server's own images (the teacher's data), which the
    server sends with each fake batch for D_i to reject; None otherwise."""
    if cfg.server_negatives == 0:
        return None
    data = server_dataset(cfg.data_spec())
    if len(data) == 0:
        raise ValueError(f"run config 'server-negatives' = {cfg.server_negatives} needs images of the server's own "
                         f"('server-data' = {cfg.server_data!r} leaves it none)")
    return batch_sampler(data.view)


def run_privacygan(grid: Grid, cfg: Config, folder: RunFolder, device: str, recorder: RunRecorder,
                   checkpoint: dict | None = None) -> dict:
    if checkpoint is None:
        teacher_g, teacher_d = prepare_teacher(cfg, folder, device)
    else:  # resuming: the frozen teacher comes from the checkpoint, no second teacher phase
        teacher_g, teacher_d = make_generator(cfg).to(device), make_discriminator(cfg).to(device)
        teacher_g.load_state_dict(checkpoint["teacher_g"])
        teacher_d.load_state_dict(checkpoint["teacher_d"])
    strategy = PrivacyGAN(
        privacygan_settings(cfg), teacher_g=teacher_g, teacher_d=teacher_d,
        make_generator=lambda: make_generator(cfg),
        make_gen_optimizer=lambda G: optimizer_for(cfg, G, cfg.lr_for(cfg.loss, cfg.server_gen_lr)),
        recorder=recorder, device=device, sample_shape=geometry(cfg).sample_shape,
        describe_partition=partition_labeller(cfg), evaluate=sample_evaluator(cfg, device),
        global_histogram=global_label_histogram(cfg), sample_negatives=negatives_sampler(cfg))
    if checkpoint is not None:
        strategy.restore(checkpoint)
    # cohort-size M > 1: every SuperNode carries M virtual clients, one merged message per node
    return strategy.run(CohortGrid(grid, cfg.cohort_size) if cfg.cohort_size > 1 else grid)


def mggan_settings(cfg: Config) -> MGGANSettings:
    """MGGAN's settings. Rates and steps are set per group by base loss (``MGGANSettings.group_config``):
    ``client-gen-lr`` / ``client-disc-lr`` / ``client-disc-steps`` for most groups, and for a ``wgan``
    group the clipped WGAN's own schedule, ``wgan-lr`` (its L0) and ``wgan-critic-steps``."""
    direct = {k: getattr(cfg, k) for k in MGGANSettings.__dataclass_fields__ if hasattr(cfg, k)}
    return MGGANSettings(**{**direct, "group_losses": tuple(x.strip() for x in cfg.mggan_losses.split(",")),
                            "gen_lr": cfg.client_gen_lr, "disc_lr": cfg.client_disc_lr,
                            "client_disc_steps": cfg.client_disc_steps, "wgan_lr": cfg.wgan_lr,
                            "wgan_critic_steps": cfg.wgan_critic_steps,
                            "beta1": cfg.adam_beta1, "beta2": cfg.adam_beta2})


def image_evaluation(cfg: Config) -> bool:
    """Images are scored only when asked (``eval-every`` > 0): it needs a trained feature network."""
    return geometry(cfg).kind != "mlp" and cfg.eval_every > 0


def end_report_wanted(cfg: Config) -> bool:
    """The end-of-run report: with ``client-eval`` (PrivacyGAN, local; images) every client scores
    its generator's samples on its own data at the last round -- own-class share and TV to its own
    labels by the dataset classifier -- also when ``eval-every`` = 0 (then at the last round only)."""
    return (cfg.client_eval and cfg.strategy in ("privacygan", "local") and geometry(cfg).kind != "mlp"
            and cfg.eval_extractor == "classifier")


def prepare_end_report(cfg: Config) -> None:
    """At start: the report needs the dataset classifier; a missing digits one trains itself now
    (seconds; simulated clients share the cache), another dataset's report is skipped, saying how
    to train its classifier."""
    if not end_report_wanted(cfg) or image_evaluation(cfg):
        return
    geo = geometry(cfg)
    if ensure_classifier(cfg.dataset, geo.image_size, geo.channels, cfg.evaluator_dir, say=say) is None:
        say(f"no '{cfg.dataset}' classifier cached: the end-of-run client report is skipped (train one with "
            f"python simulations/train_evaluator.py --dataset {cfg.dataset} --image-size {geo.image_size} "
            f"--channels {geo.channels})")


def client_eval_enabled(cfg: Config) -> bool:
    """Clients score fakes on their own data: every ``eval-every`` rounds and the last, or (eval-every
    = 0) in the end-of-run report at the last round when the dataset classifier is there."""
    if not (cfg.client_eval and cfg.strategy in ("privacygan", "local")):
        return False
    if image_evaluation(cfg):
        return True
    geo = geometry(cfg)
    return end_report_wanted(cfg) and classifier_path(cfg.dataset, geo.image_size, geo.channels,
                                                      cfg.evaluator_dir).is_file()


def global_label_histogram(cfg: Config) -> list[int] | None:
    """The population's label histogram (the run config's test split), for ``tv_global``."""
    if not image_evaluation(cfg) and not client_eval_enabled(cfg):
        return None
    return test_dataset(cfg.data_spec()).label_histogram().tolist()


def sample_evaluator(cfg: Config, device: str = "cpu"):
    """Scores for sample sets on the server: mode coverage on 2-D mixtures; for images (when
    ``eval-every`` > 0) FID/KID/IS against the test split with the ``eval-extractor``
    features, plus the fakes' label histogram and its TV distance to the test labels."""
    if geometry(cfg).kind != "mlp":
        if not image_evaluation(cfg):
            return None
        try:  # a missing weights file stops the run at start, saying how to provide it
            evaluator = image_evaluator(cfg, device, tv_name="tv_global", labels_required=False)
        except EvaluatorMissing as exc:
            raise ConfigError(f"run config 'eval-every' = {cfg.eval_every} asks for quality scores with "
                              f"'eval-extractor' = {cfg.eval_extractor!r}, but {exc}") from exc
        if evaluator.labeller is None:
            say("no dataset classifier cached: label histograms and client fidelity are skipped")
        test = test_dataset(cfg.data_spec())
        evaluator.set_real(test.x, test.y, test.num_classes)
        say(f"quality: FID/KID/IS with {evaluator.net.name} features, {cfg.eval_samples:,} samples per generator "
            f"against the {len(test):,} test images, every {cfg.eval_every} round(s)")

        def evaluate_images(sets: dict[str, torch.Tensor]) -> dict:
            return {name: evaluator.score(x) for name, x in sets.items()}

        return evaluate_images
    means, std = mode_means(cfg.dataset)

    def evaluate(sets: dict[str, torch.Tensor]) -> dict:
        return {name: {k: v for k, v in mode_metrics(x, means, std).items()} for name, x in sets.items()}

    return evaluate


def run_mggan(grid: Grid, cfg: Config, folder: RunFolder, device: str, recorder: RunRecorder,
              checkpoint: dict | None = None) -> dict:
    return MGGAN(mggan_settings(cfg), recorder=recorder, evaluate=sample_evaluator(cfg, device)).run(grid)


def _settings(cls, cfg: Config, **mapped):
    """A strategy's Settings from the Config fields of the same name, plus explicit mappings."""
    fields = cls.__dataclass_fields__
    mapped = {"client_eval": client_eval_enabled(cfg), "client_disc_steps": cfg.disc_steps_for(cfg.loss), **mapped}
    return cls(**{**{k: getattr(cfg, k) for k in fields if hasattr(cfg, k)},
                  **{k: v for k, v in mapped.items() if k in fields}})


def _common(cfg: Config, device: str, recorder: RunRecorder) -> dict:
    return {"recorder": recorder, "evaluate": sample_evaluator(cfg, device), "device": device,
            "sample_shape": geometry(cfg).sample_shape}


def _on_client_lrs(cfg: Config) -> dict:
    return {"gen_lr": cfg.lr_for(cfg.loss, cfg.client_gen_lr), "disc_lr": cfg.lr_for(cfg.loss, cfg.client_disc_lr),
            "beta1": cfg.adam_beta1, "beta2": cfg.adam_beta2}


def _on_server_lrs(cfg: Config) -> dict:
    return {"gen_lr": cfg.lr_for(cfg.loss, cfg.server_gen_lr), "disc_lr": cfg.lr_for(cfg.loss, cfg.server_disc_lr),
            "beta1": cfg.adam_beta1, "beta2": cfg.adam_beta2}


def run_dataparallel(grid, cfg, folder, device, recorder, checkpoint=None) -> dict:
    return DataParallel(_settings(DataParallelSettings, cfg, **_on_server_lrs(cfg), mode=cfg.dataparallel_mode,
                                  disc_steps=cfg.disc_steps_for(cfg.loss)),
                        make_generator=lambda: make_generator(cfg), make_discriminator=lambda: make_discriminator(cfg),
                        describe_partition=partition_labeller(cfg), **_common(cfg, device, recorder)).run(grid)


def fedavg_settings(cfg: Config) -> FedAvgSettings:
    return _settings(FedAvgSettings, cfg, **_on_client_lrs(cfg), variant=cfg.fedavg_variant,
                     proximal_mu=cfg.fedprox_mu, server_lr=cfg.fedopt_server_lr, server_tau=cfg.fedopt_tau)


def run_fedavg(grid, cfg, folder, device, recorder, checkpoint=None) -> dict:
    strategy = FedAvg(fedavg_settings(cfg), make_generator=lambda: make_generator(cfg),
                      make_discriminator=lambda: make_discriminator(cfg), describe_partition=partition_labeller(cfg),
                      **_common(cfg, device, recorder))
    if checkpoint is not None:
        strategy.restore(checkpoint)
    return strategy.run(grid)


def run_local(grid, cfg, folder, device, recorder, checkpoint=None) -> dict:
    return Local(_settings(LocalSettings, cfg, **_on_client_lrs(cfg)), recorder=recorder,
                 evaluate=sample_evaluator(cfg, device), describe_partition=partition_labeller(cfg),
                 global_histogram=global_label_histogram(cfg)).run(grid)


def union_of_clients(cfg: Config) -> torch.Tensor:
    """The centralized reference's data: the union of the partitions of ``min-nodes`` clients."""
    spec = cfg.data_spec()
    return torch.cat([client_dataset(spec, i, cfg.min_nodes).x for i in range(cfg.min_nodes)])


def run_centralized(grid, cfg, folder, device, recorder, checkpoint=None) -> dict:
    x = union_of_clients(cfg)
    say(f"centralized reference: one GAN on the union of {cfg.min_nodes} clients' data ({len(x)} samples)")
    return Centralized(_settings(CentralizedSettings, cfg, **_on_server_lrs(cfg)),
                       sample_real=batch_sampler(x),
                       make_generator=lambda: make_generator(cfg), make_discriminator=lambda: make_discriminator(cfg),
                       **_common(cfg, device, recorder)).run(grid)


def bpgan_discriminator_config(cfg: Config) -> Config:
    """The run config as the BPGAN discriminator sees it: the loss of its block kind."""
    return cfg.replace(loss=resolve_model(cfg.bpgan_model)[1])


def run_bpgan(grid, cfg, folder, device, recorder, checkpoint=None) -> dict:
    """BPGAN (SPEC 4.3). The WGAN parts follow the clipped WGAN's own schedule: a ``wgan``
    generator block's RMSProp and the server's RMSProp for the ``wgan`` critic use ``wgan-lr``,
    and the critic takes ``wgan-critic-steps`` D steps per G step; a ``dcgan`` generator block
    uses ``client-gen-lr``, a DCGAN discriminator ``server-disc-lr`` and ``client-disc-steps``
    (1 by default: one D step per G step)."""
    g_block, d_loss = resolve_model(cfg.bpgan_model)
    settings = _settings(BPGANSettings, cfg, pipeline=cfg.bpgan_pipeline, g_block=g_block, d_loss=d_loss,
                         gen_lr=cfg.lr_for("wgan" if g_block == "wgan" else "bce", cfg.client_gen_lr),
                         disc_lr=cfg.lr_for(d_loss, cfg.server_disc_lr), critic_steps=cfg.disc_steps_for(d_loss),
                         beta1=cfg.adam_beta1, beta2=cfg.adam_beta2, samples_per_node=cfg.samples_per_client)
    return BPGAN(settings, discriminator=make_discriminator(bpgan_discriminator_config(cfg)).to(device),
                 **_common(cfg, device, recorder)).run(grid)


RUNNERS = {"privacygan": run_privacygan, "bpgan": run_bpgan, "mggan": run_mggan, "dataparallel": run_dataparallel,
           "fedavg": run_fedavg, "local": run_local, "centralized": run_centralized}


def run(grid: Grid, cfg: Config) -> Path:
    """Run one strategy end to end; returns the run folder. Raises if the run fails.

    A stop request (Ctrl-C / SIGTERM through ``simulations``) ends it at the next safe point
    with summary.md saying "interrupted" and the round to resume from. A resume that fails
    before any new round leaves the resumed run's files as they were."""
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    set_max_in_flight(cfg.max_in_flight)
    set_poll_interval(cfg.poll_interval)
    check_tracking(cfg)   # tracking=tensorboard|wandb without its package stops the run here, saying what to install
    checkpoint = None
    if cfg.resume:
        folder, cfg, checkpoint = open_for_resume(cfg)
    else:
        folder = RunFolder.create(cfg.output_dir, cfg.strategy, cfg.dataset, cfg.to_run_config(),
                                  run_name=cfg.run_name)
        for name in ("metrics.jsonl", "comm.jsonl"):  # present for every strategy, even one that sends nothing
            (folder.path / name).touch()
    flower_run_id = flower_run_id_of(grid)
    marker = mark_flower_run(folder.path, flower_run_id)   # how this run's simulated clients find the folder
    handler = _attach_log_file(folder)
    say(f"run folder: {folder.path}")
    tracker = make_tracker(cfg.tracking, folder.path, name=folder.path.name, config=cfg.to_run_config(),
                           purge_step=int(checkpoint["round"]) + 1 if checkpoint is not None else None)
    if cfg.tracking == "tensorboard":
        say(f"live tracking: tensorboard --logdir {folder.path}")
    elif cfg.tracking == "wandb":
        say(f"live tracking: Weights & Biases run in {folder.path / 'wandb'}")
    if checkpoint is not None:
        say(f"resuming from the checkpoint of round {checkpoint['round']} (the run's own config.json applies; "
            f"rounds after that checkpoint are redone, "
            f"{'clients start fresh discriminators' if cfg.strategy == 'privacygan' else 'clients start fresh optimizers'})")
    detail = (f"alpha={cfg.alpha}{f' -> {cfg.alpha_final} (linear over the rounds)' if cfg.alpha_final else ''} "
              f"steps-per-round={cfg.steps_per_round}" if cfg.strategy == "privacygan" else
              f"variant={cfg.fedavg_variant} local-steps={cfg.local_steps}" if cfg.strategy == "fedavg" else
              f"groups' losses={cfg.mggan_losses} local-steps={cfg.local_steps} regroup-interval={cfg.regroup_interval}")
    say(f"strategy={cfg.strategy} dataset={cfg.dataset} partition={cfg.partition} rounds={cfg.num_rounds} "
        f"{detail} device={device}")
    if cfg.dp:
        sigma = (f"derived per client for dp-target-epsilon={cfg.dp_target_epsilon:g} over "
                 f"{cfg.dp_planned_steps()} planned D steps (dp-noise-multiplier is ignored)"
                 if cfg.dp_target_epsilon > 0 else f"dp-noise-multiplier={cfg.dp_noise_multiplier:g}")
        say(f"differential privacy: DP-SGD on every client D step on real data (Poisson sampling at "
            f"q = batch-size / n, clipping dp-max-grad-norm={cfg.dp_max_grad_norm:g}, noise {sigma}); each client "
            f"reports (epsilon, dp-delta={cfg.dp_delta:g}); not covered: evaluation replies, sizes, label histograms, "
            f"loss/accuracy scalars -- see README 'Differential privacy'")
        if cfg.strategy == "privacygan" and cfg.server_data == "full" and cfg.teacher_steps > 0 and not cfg.teacher_path:
            say("differential privacy: server-data=full trains the teacher on the whole dataset, clients' records "
                "included, without DP -- the clients' (epsilon, delta) do not cover that; use server-data=heldout")
    if cfg.strategy == "privacygan" and cfg.steps_per_round > 1:
        say(f"steps-per-round={cfg.steps_per_round}: step 1 of each round is the exact JRLF update; steps "
            f"2..{cfg.steps_per_round} apply feedback on fakes made before the round's earlier updates (stale by up "
            f"to {cfg.steps_per_round - 1} generator steps; on the embedded demo's settings a relative gradient "
            f"error of 1.9-2.7 % at K = 4 and up to 5.3 % at K = 8, measured by simulations/staleness.py). "
            f"steps-per-round=1 is exact")
    started = time.monotonic()
    recorder = None
    try:
        if cfg.dataset.startswith("imagefolder:"):   # unreadable files are counted (and too many refused) up front
            test_dataset(cfg.data_spec())
            server_dataset(cfg.data_spec())
        means = mode_means(cfg.dataset)[0] if geometry(cfg).kind == "mlp" else None
        prepare_end_report(cfg)
        recorder = RunRecorder(folder, cfg.num_rounds, means, cfg=cfg, flower_run_id=flower_run_id, tracker=tracker)
        result = RUNNERS[cfg.strategy](grid, cfg, folder, device, recorder, checkpoint)
        if cfg.dp:
            result["dp_epsilon"] = dict(recorder.dp_epsilon)
        folder.plot_metrics(["g_loss", "d_loss", "d_real_acc", "d_fake_acc"])
        folder.plot_quality()
        _write_summary_or_say(folder, _summary(cfg, result, time.monotonic() - started, status="success"))
        for line in end_report_console(result):
            say(line)
    except RunInterrupted as exc:
        done = last_checkpoint_round(folder)
        if done is None:
            resume = "no checkpoint to resume from"
        elif cfg.strategy in RESUMABLE:
            resume = f"resume with --set resume={folder.path} (run config resume=\"{folder.path}\")"
        else:
            resume = "resuming is implemented for privacygan only"
        note = f"{exc}; last checkpoint: " + (f"round {done}" if done is not None else "none") + f"; {resume}"
        _write_summary_or_say(folder, _summary(cfg, {}, time.monotonic() - started, status="interrupted", error=note))
        say(f"run INTERRUPTED: {note}")
        return folder.path
    except BaseException as exc:
        error = (f"{describe_os_error(exc)}" if isinstance(exc, OSError)
                 else "".join(traceback.format_exception_only(type(exc), exc)).strip())
        if checkpoint is not None and not _wrote_rounds(recorder):
            if marker is not None:
                marker.unlink(missing_ok=True)
            say(f"resume FAILED before any new round: {error}; the run's files are unchanged")
        else:
            _write_summary_or_say(folder, _summary(cfg, {}, time.monotonic() - started, status="failed", error=error))
            say(f"run FAILED: {error}")
            say(f"results (partial) in {folder.path}")
        raise
    finally:
        tracker.close()
        log.removeHandler(handler)
        handler.close()
    say(f"finished in {time.monotonic() - started:.1f} s; results in {folder.path}")
    return folder.path


def _wrote_rounds(recorder: "RunRecorder | None") -> bool:
    return recorder is not None and recorder.rounds_logged > 0


def _write_summary_or_say(folder: RunFolder, text: str) -> None:
    """summary.md, or one line saying why it could not be written (the run's real error wins)."""
    try:
        folder.write_summary(text)
    except OSError as exc:
        say(f"could not write summary.md: {describe_os_error(exc)}")


def last_checkpoint_round(folder: RunFolder) -> int | None:
    """The round of checkpoints/server.pt, or None when there is none (or it is unreadable)."""
    if not (folder.path / "checkpoints" / "server.pt").is_file():
        return None
    try:
        return int(folder.load_checkpoint("server.pt")["round"])
    except Exception:
        return None


def inspect_resume(cfg: Config) -> tuple[RunFolder, Config, dict, int]:
    """Everything ``resume`` needs, read without changing a file: the run folder, its own
    config (with ``num-rounds`` given alongside ``resume`` applied: a value other than the
    default extends or ends the run there, and must exceed the checkpoint's round), its last
    checkpoint and that checkpoint's round. ConfigError naming the key for any misfit: not a
    run folder, no or an unreadable checkpoint, nothing left to do, networks that do not fit."""
    path = Path(cfg.resume).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"run config 'resume' = {cfg.resume!r}: not a run folder (no config.json there)")
    try:
        saved_raw = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"run config 'resume' = {cfg.resume!r}: config.json is unreadable ({exc})") from None
    saved = parse_config({**saved_raw, "resume": str(path)})
    if not (path / "checkpoints" / "server.pt").is_file():
        raise ConfigError(f"run config 'resume' = {cfg.resume!r}: no checkpoints/server.pt to resume from")
    folder = RunFolder(path)
    try:
        checkpoint = folder.load_checkpoint("server.pt")
        done = int(checkpoint["round"])
    except Exception as exc:  # a torn or foreign file: refuse rather than load part of it
        raise ConfigError(f"run config 'resume' = {cfg.resume!r}: checkpoints/server.pt is unreadable "
                          f"({type(exc).__name__}: {exc}); not resuming from it") from None
    given = cfg.num_rounds != Config.num_rounds   # the default (pyproject's value) means "not given"
    rounds = cfg.num_rounds if given else saved.num_rounds
    if rounds <= done:
        raise ConfigError(f"run config 'num-rounds' = {rounds}: the run in {path} has already done {done} round(s); "
                          f"give num-rounds > {done} with resume to extend it")
    check_resumable(saved, checkpoint, path)
    return folder, saved.replace(num_rounds=rounds), checkpoint, done


def open_for_resume(cfg: Config) -> tuple[RunFolder, Config, dict]:
    """:func:`inspect_resume`, then the changes a resume makes: config.json gets the new
    ``num-rounds`` when it changed, and records written after the checkpoint are removed from
    metrics.jsonl and comm.jsonl (those rounds run again)."""
    folder, cfg_resumed, checkpoint, done = inspect_resume(cfg)
    folder = RunFolder.open(folder.path)
    saved = folder.read_config()
    if saved.get("num-rounds") != cfg_resumed.num_rounds:
        say(f"resume: num-rounds {saved.get('num-rounds')} -> {cfg_resumed.num_rounds}")
        folder.write_config({**saved, "num-rounds": cfg_resumed.num_rounds})
    folder.keep_jsonl("metrics.jsonl", lambda rec: int(rec.get("round", 0)) <= done)
    folder.keep_jsonl("comm.jsonl", lambda rec: int(rec.get("round", 0)) <= done)
    return folder, cfg_resumed, checkpoint


def check_resumable(cfg: Config, checkpoint: dict, path: Path) -> None:
    """ConfigError unless every network in ``checkpoint`` loads into the networks ``cfg`` builds."""
    try:
        if cfg.strategy == "fedavg":
            make_generator(cfg).load_state_dict(checkpoint["g"])
            make_discriminator(cfg).load_state_dict(checkpoint["d"])
            return
        make_generator(cfg).load_state_dict(checkpoint["teacher_g"])
        make_discriminator(cfg).load_state_dict(checkpoint["teacher_d"])
        for blob in checkpoint["students"].values():
            G = make_generator(cfg)
            G.load_state_dict(blob["g"])
            optimizer_for(cfg, G, cfg.lr_for(cfg.loss, cfg.server_gen_lr)).load_state_dict(blob["opt"])
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        text = str(exc).strip()
        first = text.splitlines()[0] if text else type(exc).__name__
        raise ConfigError(f"run config 'resume' = {str(path)!r}: checkpoints/server.pt does not fit the run's "
                          f"config ({type(exc).__name__}: {first}); not resuming from it") from None


def _summary(cfg: Config, result: dict, seconds: float, *, status: str, error: str = "") -> str:
    lines = [f"# fedgan run: {cfg.strategy} on {cfg.dataset}", "", f"- status: **{status}**",
             f"- wall time: {seconds:.1f} s"]
    if error:
        lines.append(f"- {'stopped' if status == 'interrupted' else 'error'}: `{error}`")
    for (path, split), (skipped, total, examples) in sorted(data_module.UNREADABLE.items()):
        lines.append(f"- UNREADABLE: {skipped} of {total} image files of split {split!r} under {path} could not be "
                     f"decoded and were skipped (e.g. {', '.join(examples)})")
    if result:
        last = result.get("last", {})
        lines += [
            f"- rounds: {result['rounds']}, clients trained: {len(result.get('clients', {}))}",
            f"- bytes down (server->clients): {result['bytes_down']:,}",
            f"- bytes up (clients->server): {result['bytes_up']:,}",
            f"- dropped replies: {result['dropped_replies']}",
            f"- last round: g_loss {last.get('g_loss', float('nan')):.4f}, d_loss {last.get('d_loss', float('nan')):.4f}, "
            f"D accuracy real {last.get('d_real_acc', float('nan')):.3f} / fake {last.get('d_fake_acc', float('nan')):.3f}",
        ]
        if result.get("resumed_at"):
            lines.append(f"- resumed at round {result['resumed_at']} (resume handshake: {result['control_bytes']:,} "
                         f"bytes, not in the totals above)")
        if "regroups" in result:
            lines += [f"- iterations: {result['iterations']}, regroups: {result['regroups']}, "
                      f"period A: {result['period_a'] if result['period_a'] is not None else 'not detected / fixed T'}"]
        for name, scores in eval_sets(result.get("eval")).items():
            if "fid" in scores:
                tv = f", TV to test labels {scores['tv_global']:.3f}" if "tv_global" in scores else ""
                lines.append(f"- {name}: {describe_scores(scores)}{tv}")
        for name, scores in eval_sets(result.get("eval")).items():
            if "modes_covered" in scores:
                lines.append(f"- {name}: {scores['modes_covered']}/{scores['num_modes']} modes, "
                             f"{scores['high_quality_pct']:.1f}% high-quality, reverse KL {scores['reverse_kl']:.3f} "
                             f"({scores['num_samples']} samples)")
        lines += dp_report_markdown(cfg, result)
        lines += end_report_markdown(result)
    lines += ["", "## Configuration", "", "```", *(f"{k} = {v!r}" for k, v in cfg.to_run_config().items()), "```", ""]
    return "\n".join(lines)


def dp_report_markdown(cfg: Config, result: dict) -> list[str]:
    """summary.md's differential-privacy section: each client's (epsilon, delta) at its last reply."""
    if not cfg.dp:
        return []
    eps = result.get("dp_epsilon") or {}
    lines = ["", "## Differential privacy", "",
             f"DP-SGD on every discriminator step a client took on its real data (clipping C = "
             f"{cfg.dp_max_grad_norm:g}, " + (f"noise derived per client for a target epsilon of "
                                             f"{cfg.dp_target_epsilon:g}" if cfg.dp_target_epsilon > 0 else
                                             f"noise multiplier {cfg.dp_noise_multiplier:g}") +
             f"); record-level (epsilon, delta = {cfg.dp_delta:g}) per client, from its own RDP accountant. "
             "Not covered: evaluation replies, dataset sizes, label histograms, loss/accuracy scalars.", ""]
    if not eps:
        return lines + ["No client reported an epsilon."]
    lines += ["| client | epsilon |", "|---|---|"]
    lines += [f"| {name} | {value:.3f} |" for name, value in eps.items()]
    lines += ["", f"Largest: {max(eps.values()):.3f}."]
    return lines


def _fmt(scores: dict, key: str, spec: str) -> str:
    return format(scores[key], spec) if isinstance(scores.get(key), (int, float)) else "–"


def end_report_markdown(result: dict) -> list[str]:
    """summary.md's end-of-run report: one table row per client, from the scores each client
    computed on its own data at the last round (``client_eval``); empty when there are none."""
    per_client = result.get("client_eval") or {}
    missing = (result.get("last") or {}).get("client_eval_dropped") or {}
    if not per_client:
        return ["", "## End-of-run report: each client's generator, scored on the client", "",
                "Not scored: " + "; ".join(f"node {n}: {why}" for n, why in missing.items())] if missing else []
    first = next(iter(per_client.values()))
    lines = ["", "## End-of-run report: each client's generator, scored on the client", "",
             f"At the last round each client labelled {int(first.get('num_fake', 0)):,} samples of its generator "
             f"with the dataset classifier and compared them with its own data; only these numbers came back. "
             f"Own-class share: the share of samples labelled as a class the client holds (an even spread over "
             f"10 classes scores 0.2 for a client holding 2). TV: total-variation distance between the samples' "
             f"label histogram and the client's own (0 = the same distribution) or the population's.", "",
             "| client | own-class share | TV to own labels | TV to global labels | FID vs own data | KID | "
             "samples / own |", "|---|---|---|---|---|---|---|"]
    for name, s in per_client.items():
        lines.append(f"| {name} | {_fmt(s, 'own_share', '.3f')} | {_fmt(s, 'tv_own', '.3f')} | "
                     f"{_fmt(s, 'tv_global', '.3f')} | {_fmt(s, 'fid', '.2f')} | {_fmt(s, 'kid', '.4f')} | "
                     f"{int(s.get('num_fake', 0)):,} / {int(s.get('num_real', 0)):,} |")
    shares = [s["own_share"] for s in per_client.values() if "own_share" in s]
    if shares:
        lines += ["", f"Mean over {len(shares)} client(s): own-class share {sum(shares) / len(shares):.3f}, "
                      f"TV to own labels {sum(s['tv_own'] for s in per_client.values()) / len(per_client):.3f}."]
    if missing:
        lines += ["", "Not scored: " + "; ".join(f"node {n}: {why}" for n, why in missing.items())]
    return lines


def end_report_console(result: dict) -> list[str]:
    """The same report as lines for the console (the end of `flwr run`'s output)."""
    per_client = result.get("client_eval") or {}
    missing = (result.get("last") or {}).get("client_eval_dropped") or {}
    if not per_client:
        return [f"end-of-run report: no client could score its generator ({len(missing)} failed; see summary.md)"] \
            if missing else []
    first = next(iter(per_client.values()))
    lines = [f"end-of-run report, scored on each client ({int(first.get('num_fake', 0)):,} samples of its "
             f"generator, labelled by the dataset classifier):"]
    for name, s in per_client.items():
        lines.append(f"  {name}: own-class share {_fmt(s, 'own_share', '.2f')}, TV to own labels "
                     f"{_fmt(s, 'tv_own', '.3f')}")
    return lines


def last_status(folder: Path) -> str | None:
    """The status summary.md of a run folder records (success, failed, interrupted)."""
    try:
        m = re.search(r"^- status: \*\*(\w+)\*\*", (Path(folder) / "summary.md").read_text(), re.M)
    except OSError:
        return None
    return m.group(1) if m else None


def make_server_app(config: Config | None = None) -> ServerApp:
    """A ServerApp; ``config`` fixes the settings (else they come from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        from app.simulation import watch_stop_requests
        from strategies.base import STOP

        cfg = config if config is not None else config_from_context(context.run_config)
        # a stop request written for this Flower run (app/simulation.py: what a Ctrl-C in a
        # simulation script sends) stops the run at its next safe point, as STOP does in-process
        with watch_stop_requests(cfg.output_dir, flower_run_id_of(grid), STOP):
            folder = run(grid, cfg)
            if cfg.audit_probe > 0 and not STOP.is_set() and last_status(folder) == "success":
                from app.probe import probe, save_probe

                nodes = len(list(grid.get_node_ids()))
                non = cfg.audit_nonmembers or "as many"
                say(f"audit probe: up to {cfg.audit_probe} member and {non} non-member candidates per client "
                    "sent as fakes")
                save_probe(folder, probe(grid, cfg, nodes, cfg.audit_probe, cfg.audit_seed))

    return app


app = make_server_app()

__all__ = ["app", "make_server_app", "run", "inspect_resume", "open_for_resume", "prepare_teacher", "RunRecorder"]
