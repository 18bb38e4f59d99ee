"""The run configuration: parsed once, typed, validated.

Every knob of a run is a hyphenated key of ``[tool.flwr.app.config]`` in
``pyproject.toml`` (the working defaults) and can be overridden with
``flwr run . --run-config "key=value ..."`` or, in the simulation scripts, with a
YAML experiment file and command-line flags. :func:`parse_config` turns that flat
mapping into a frozen :class:`Config`; anything unknown or out of range raises
:class:`ConfigError` naming the key, the value and what is allowed, so a bad
setting stops the run before any work is done.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import difflib
from dataclasses import dataclass
from typing import Any, Mapping

from app.data import DATASETS, PARTITIONS, SERVER_DATA, DataSpec
from app.metrics import EXTRACTORS
from app.tracking import INSTALL_HINT, TRACKERS, missing_package
from models.losses import LOSS_KINDS, NEGATIVE_LOSSES
from strategies.fedavg import VARIANTS as FEDAVG_VARIANTS
from strategies.wire import FAKE_DTYPES, FEEDBACK_DTYPES

STRATEGIES = ("privacygan", "bpgan", "mggan", "dataparallel", "fedavg", "local", "centralized")
BPGAN_MODELS = ("dcgan", "wgan", "dcwgan", "wdcgan")
MODELS = ("auto", "dcgan", "mlp")
IMAGE_SIZES = (0, 16, 32, 64)
INITS = ("teacher", "random")
D_TRAIN = ("all", "head")
SERVER_BATCHING = ("auto", "on", "off")   # PrivacyGAN students: measured once / always vmapped / one by one
DEVICES = ("auto", "cpu", "cuda")
DATAPARALLEL_MODES = ("simultaneous", "alternating")
RESUMABLE = ("privacygan", "fedavg")


class ConfigError(ValueError):
    """A run-config key holds a value the run cannot use."""


@dataclass(frozen=True)
class Config:
    """Typed run configuration; field ``foo_bar`` is run-config key ``foo-bar``."""

    # --- what to run -----------------------------------------------------------
    strategy: str = "privacygan"
    num_rounds: int = 150
    seed: int = 0
    device: str = "auto"
    # --- data (app/data.py) ----------------------------------------------------
    dataset: str = "digits"
    data_dir: str = ""
    image_size: int = 0
    channels: int = 0
    partition: str = "classes"
    classes_per_client: int = 2
    fraction: float = 0.1
    dirichlet_alpha: float = 0.5
    server_data: str = "heldout"
    server_share: float = 0.5
    # --- models (models/) ------------------------------------------------------
    model: str = "auto"
    latent_dim: int = 100
    gen_features: int = 32
    disc_features: int = 32
    loss: str = "bce"
    batch_size: int = 64
    adam_beta1: float = 0.5
    adam_beta2: float = 0.999
    # --- PrivacyGAN (SPEC 4.2) -------------------------------------------------
    alpha: float = 0.5
    alpha_final: float = 0.0            # > 0: alpha moves linearly from alpha (round 1) to this (last round)
    teacher_steps: int = 1500
    teacher_path: str = ""
    teacher_gen_lr: float = 0.0002
    teacher_disc_lr: float = 0.0002
    student_init: str = "teacher"
    client_d_init: str = "random"
    client_d_train: str = "all"         # all | head: which of D_i's layers its client trains (head: the last)
    server_negatives: int = 0           # the server's own images per fake batch that D_i learns to reject (issue #17)
    server_gen_lr: float = 0.0002
    server_disc_lr: float = 0.0002
    client_disc_lr: float = 0.0002
    client_disc_steps: int = 1
    steps_per_round: int = 4
    server_batching: str = "auto"
    # --- the clipped WGAN's own schedule (Arjovsky et al. 2017), for every network trained with
    #     loss "wgan": RMSProp at wgan-lr, wgan-critic-steps critic updates per generator update
    wgan_critic_steps: int = 5
    wgan_lr: float = 0.00005
    # --- BPGAN (SPEC 4.3, thesis ch. 4) -----------------------------------------
    bpgan_model: str = "dcgan"
    bpgan_pipeline: bool = True
    # --- data-parallel baseline (thesis Fig. 4.7, Eq. 4.1) ------------------------
    dataparallel_mode: str = "simultaneous"
    # --- FedAvg and its Flower variants (strategies/fedavg.py) -----------------
    fedavg_variant: str = "fedavg"
    fedprox_mu: float = 0.01
    fedopt_server_lr: float = 0.01
    fedopt_tau: float = 0.001
    krum_malicious: int = 0
    trimmed_beta: float = 0.2
    # --- MGGAN (SPEC 4.4, thesis ch. 3) -----------------------------------------
    local_steps: int = 25
    mggan_losses: str = "bce"
    client_gen_lr: float = 0.0002
    regroup_interval: int = -1
    regroup_xi: float = 1.5
    regroup_t_max: int = 2000
    period_a_window: int = 50
    period_a_threshold: float = 0.01
    period_a_min: int = 100
    period_a_cap: int = 2000
    lr_rule: bool = True
    lr_window: int = 10
    lr_delta: float = 0.1
    lr_max: float = 0.001
    vrl_max: float = 0.05
    move_d_moments: bool = False
    eval_every: int = 0
    eval_samples: int = 2500
    eval_extractor: str = "classifier"
    evaluator_dir: str = ""
    inception_weights: str = ""
    client_eval: bool = True
    # --- federation mechanics (SPEC 4.1) ---------------------------------------
    fraction_train: float = 1.0
    min_nodes: int = 2
    min_replies: int = 1
    round_timeout: float = 300.0
    node_wait_timeout: float = 120.0
    max_reply_mb: float = 256.0        # a larger client reply is dropped unread
    max_in_flight: int = 0             # unanswered messages at a time per exchange (0 = all at once)
    poll_interval: float = 0.0         # seconds between the server's pulls for replies (0 = 0.1; simulations 0.02)
    cohort_batching: bool = True       # a cohort's D steps as one computation where possible (PrivacyGAN)
    cohort_size: int = 1               # virtual clients per simulated SuperNode (PrivacyGAN; strategies/cohort.py)
    max_feedback_norm: float = 1000.0  # per-sample L2 bound on feedback as sent (PrivacyGAN, BPGAN)
    max_update_norm: float = 100000.0  # L2 bound on a client's gradient or weight update
    fakes_dtype: str = "float32"
    feedback_dtype: str = "float32"
    # --- outputs (SPEC 7) ------------------------------------------------------
    output_dir: str = "fedgan-output"
    run_name: str = ""
    sample_every: int = 25
    samples_per_client: int = 16
    checkpoint_every: int = 10
    resume: str = ""
    tracking: str = "none"              # live tracking: none | tensorboard | wandb (app/tracking.py)
    # --- differential privacy: DP-SGD on every real-data gradient a client computes (models/dp.py) ---
    dp: bool = False
    dp_noise_multiplier: float = 1.0    # sigma (ignored when dp-target-epsilon > 0)
    dp_max_grad_norm: float = 1.0       # C, per-example L2 clipping bound over all of D's parameters
    dp_delta: float = 1e-5              # delta of the reported (epsilon, delta); must be < 1/n per client
    dp_target_epsilon: float = 0.0      # > 0: sigma derived per client for the planned steps; stop at it
    dp_clip_fakes: bool = False         # clip each fake's / negative's D gradient to C too (no noise, free)
    # --- the curious-server audit (simulations/privacy_audit.py, docs/PRIVACY.md) ---------------
    audit_probe: int = 0                # > 0 (PrivacyGAN): after training, probe each D_i with this many members
    audit_seed: int = 0                 # and as many non-members, drawn with this seed; audit_probe.pt
    audit_nonmembers: int = 0           # > 0: this many non-members per client instead (at most the pool)

    # ---------------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        """The data settings as app/data.py wants them."""
        return DataSpec(
            dataset=self.dataset,
            data_dir=self.data_dir,
            image_size=self.image_size,
            channels=self.channels,
            partition=self.partition,
            classes_per_client=self.classes_per_client,
            fraction=self.fraction,
            dirichlet_alpha=self.dirichlet_alpha,
            server_data=self.server_data,
            server_share=self.server_share,
            seed=self.seed,
        )

    def lr_for(self, loss: str, lr: float) -> float:
        """The learning rate a network trained with ``loss`` uses: ``wgan-lr`` for the clipped
        WGAN (its paper's RMSProp rate), else ``lr`` (the role's own key)."""
        return self.wgan_lr if loss == "wgan" else lr

    def disc_steps_for(self, loss: str) -> int:
        """Discriminator / critic updates per generator update for ``loss``: ``wgan-critic-steps``
        (n_critic of the WGAN paper) for the clipped WGAN, else ``client-disc-steps``."""
        return self.wgan_critic_steps if loss == "wgan" else self.client_disc_steps

    def dp_planned_steps(self) -> int:
        """DP discriminator steps on real data one client takes over the whole run if it trains
        every round (what ``dp-target-epsilon`` derives sigma for): PrivacyGAN rounds x
        steps-per-round x D steps; BPGAN / data-parallel one D gradient per round; FedAvg / local /
        MGGAN rounds x local-steps x D steps per iteration."""
        if self.strategy == "privacygan":
            return self.num_rounds * self.steps_per_round * self.disc_steps_for(self.loss)
        if self.strategy in ("bpgan", "dataparallel"):
            return self.num_rounds
        if self.strategy == "mggan":
            per = max(self.disc_steps_for(lo.strip()) for lo in self.mggan_losses.split(","))
            return self.num_rounds * self.local_steps * per
        return self.num_rounds * self.local_steps * self.disc_steps_for(self.loss)

    def to_run_config(self) -> dict[str, Any]:
        """The flat hyphenated mapping (what ``context.run_config`` holds)."""
        return {key_of(f.name): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes: Any) -> "Config":
        """A validated copy with some fields changed (snake_case names); paths are not checked
        again (they were, or were deliberately not, when this Config was parsed)."""
        return parse_config({**self.to_run_config(), **{key_of(k): v for k, v in changes.items()}},
                            check_paths=False)


def positive_int(text: str) -> int:
    """argparse type for counts given on a command line (clients, rounds, CPUs): an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def key_of(field_name: str) -> str:
    """Run-config key of a dataclass field: ``server_gen_lr`` -> ``server-gen-lr``."""
    return field_name.replace("_", "-")


_FIELDS = {key_of(f.name): f for f in dataclasses.fields(Config)}


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Convert ``value`` to the type of the field's default, or raise naming the key."""
    kind = type(default)
    if value is None or (isinstance(value, str) and value.strip() == "" and kind is not str):
        if kind is str:
            return ""
        raise ConfigError(f"run config '{key}' is empty: expected a {kind.__name__}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"run config '{key}' = {value!r}: expected a finite number")
            return number
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"run config '{key}' = {value!r}: expected a {kind.__name__}")


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(
            f"run config '{key}' = {value!r} is not allowed; choose one of {', '.join(map(repr, allowed))}"
        )


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"run config '{key}' = {value!r} is not allowed; it must be {allowed}")


def parse_config(raw: Mapping[str, Any] | None = None, *, check_paths: bool = True) -> Config:
    """Parse a flat run-config mapping (hyphenated keys) into a validated Config.

    Missing keys take the defaults; unknown keys, wrong types and values out of range
    raise :class:`ConfigError` naming the key, the value and what is allowed.
    ``check_paths=False`` skips the checks of paths on this machine (``dataset=imagefolder:<path>``),
    for a process that does not read them (a deployed ClientApp uses its node's ``data-path``).
    """
    raw = dict(raw or {})
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=3)
            hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
            raise ConfigError(f"unknown run config key '{key}' (value {value!r}){hint}")
        f = _FIELDS[key]
        values[f.name] = _coerce(key, value, f.default)
    cfg = Config(**values)
    validate(cfg, check_paths=check_paths)
    return cfg


def _check_image_folder(key: str, dataset: str) -> None:
    """``imagefolder:<path>``: the path must exist and be a folder (a folder-per-class tree) or a
    zip of one, else a ConfigError naming the key and the path (before any run starts)."""
    import os
    import zipfile

    raw = dataset.split(":", 1)[1].strip()
    path = os.path.abspath(os.path.expanduser(raw))
    if not os.path.exists(path):
        problem = "no such folder"
    elif os.path.isdir(path) or zipfile.is_zipfile(path):
        return
    else:
        problem = "it is a file, not a folder (nor a zip of a folder-per-class tree)"
    raise ConfigError(f"run config '{key}' = {dataset!r}: {path}: {problem}; "
                      f"expected 'imagefolder:<folder-per-class folder or a zip of one>'")


def validate(cfg: Config, *, check_paths: bool = True) -> None:
    """Raise ConfigError for the first invalid setting of ``cfg`` (``check_paths``: see
    :func:`parse_config`)."""
    k = key_of
    _one_of(k("strategy"), cfg.strategy, STRATEGIES)
    _one_of(k("device"), cfg.device, DEVICES)
    name = cfg.dataset.split(":", 1)[0]
    _one_of(k("dataset"), name, DATASETS)
    if name == "imagefolder":
        _check(":" in cfg.dataset and cfg.dataset.split(":", 1)[1] != "", k("dataset"), cfg.dataset,
               "'imagefolder:<path to a folder-per-class tree or a zip of one>'")
        if check_paths:
            _check_image_folder(k("dataset"), cfg.dataset)
    _one_of(k("partition"), cfg.partition, PARTITIONS)
    _one_of(k("server-data"), cfg.server_data, SERVER_DATA)
    _one_of(k("image-size"), cfg.image_size, IMAGE_SIZES)
    _one_of(k("channels"), cfg.channels, (0, 1, 3))
    _one_of(k("model"), cfg.model, MODELS)
    _one_of(k("loss"), cfg.loss, LOSS_KINDS)
    _one_of(k("student-init"), cfg.student_init, INITS)
    _one_of(k("client-d-init"), cfg.client_d_init, INITS)
    _one_of(k("client-d-train"), cfg.client_d_train, D_TRAIN)
    _one_of(k("server-batching"), cfg.server_batching, SERVER_BATCHING)
    _one_of(k("eval-extractor"), cfg.eval_extractor, EXTRACTORS)
    _one_of(k("tracking"), cfg.tracking, TRACKERS)
    _one_of(k("fakes-dtype"), cfg.fakes_dtype, FAKE_DTYPES)
    _one_of(k("feedback-dtype"), cfg.feedback_dtype, FEEDBACK_DTYPES)
    # JRLF weight (thesis Eq. 5.9): alpha + beta = 1 with alpha in (0, 1].
    _check(0.0 < cfg.alpha <= 1.0, k("alpha"), cfg.alpha, "in (0, 1] (beta = 1 - alpha; 1 = plain federated GAN)")
    _check(0.0 <= cfg.alpha_final <= 1.0, k("alpha-final"), cfg.alpha_final,
           "in (0, 1] (alpha at the last round, reached linearly from alpha), or 0 for a constant alpha")
    _check(0.0 < cfg.fraction <= 1.0, k("fraction"), cfg.fraction, "in (0, 1] (0.1 = the thesis' 1:10, 0.01 = 1:100)")
    _check(0.0 < cfg.fraction_train <= 1.0, k("fraction-train"), cfg.fraction_train, "in (0, 1]")
    _check(0.0 < cfg.server_share < 1.0, k("server-share"), cfg.server_share, "in (0, 1)")
    _check(cfg.dirichlet_alpha > 0, k("dirichlet-alpha"), cfg.dirichlet_alpha, "> 0")
    _check(0.0 <= cfg.adam_beta1 < 1.0, k("adam-beta1"), cfg.adam_beta1, "in [0, 1)")
    _check(0.0 <= cfg.adam_beta2 < 1.0, k("adam-beta2"), cfg.adam_beta2, "in [0, 1)")
    _one_of(k("dataparallel-mode"), cfg.dataparallel_mode, DATAPARALLEL_MODES)
    _one_of(k("fedavg-variant"), cfg.fedavg_variant, FEDAVG_VARIANTS)
    _check(cfg.fedprox_mu >= 0, k("fedprox-mu"), cfg.fedprox_mu, ">= 0 (0 = plain FedAvg)")
    _check(cfg.fedopt_server_lr > 0, k("fedopt-server-lr"), cfg.fedopt_server_lr, "> 0")
    _check(cfg.fedopt_tau > 0, k("fedopt-tau"), cfg.fedopt_tau, "> 0")
    _check(0.0 <= cfg.trimmed_beta < 0.5, k("trimmed-beta"), cfg.trimmed_beta,
           "in [0, 0.5) (the share cut at each end, per coordinate)")
    _check(cfg.krum_malicious >= 0, k("krum-malicious"), cfg.krum_malicious, "an integer >= 0")
    _check(not (cfg.strategy == "fedavg" and cfg.fedavg_variant == "krum" and cfg.krum_malicious > 0)
           or cfg.min_nodes >= 2 * cfg.krum_malicious + 3, k("krum-malicious"), cfg.krum_malicious,
           f"at most (min-nodes - 3) / 2 = {(cfg.min_nodes - 3) // 2} with min-nodes = {cfg.min_nodes} "
           "(Krum scores each reply by its n - f - 2 nearest others)")
    for name_ in ("num_rounds", "latent_dim", "gen_features", "disc_features", "batch_size", "client_disc_steps",
                  "wgan_critic_steps",
                  "steps_per_round", "min_nodes", "min_replies", "samples_per_client", "classes_per_client"):
        _check(getattr(cfg, name_) >= 1, k(name_), getattr(cfg, name_), "an integer >= 1")
    for name_ in ("teacher_steps", "sample_every", "checkpoint_every", "max_in_flight"):
        _check(getattr(cfg, name_) >= 0, k(name_), getattr(cfg, name_), "an integer >= 0 (0 = never)")
    for name_ in ("teacher_gen_lr", "teacher_disc_lr", "server_gen_lr", "server_disc_lr", "client_disc_lr", "wgan_lr",
                  "round_timeout", "node_wait_timeout", "max_reply_mb", "max_feedback_norm", "max_update_norm"):
        _check(getattr(cfg, name_) > 0, k(name_), getattr(cfg, name_), "> 0")
    _check(0.0 <= cfg.poll_interval <= 10.0, k("poll-interval"), cfg.poll_interval,
           "in [0, 10] seconds (0 = 0.1 s, what a deployment uses)")
    _check(cfg.min_replies <= cfg.min_nodes, k("min-replies"), cfg.min_replies,
           f"<= min-nodes ({cfg.min_nodes})")
    _one_of(k("bpgan-model"), cfg.bpgan_model, BPGAN_MODELS)
    _check(cfg.strategy != "bpgan" or cfg.min_nodes % 2 == 0, k("min-nodes"), cfg.min_nodes,
           "even for bpgan (discriminator and generator nodes come in pairs)")
    # MGGAN
    losses = cfg.mggan_losses.split(",")
    for loss in losses:
        _check(loss.strip() in LOSS_KINDS, k("mggan-losses"), cfg.mggan_losses,
               f"a comma-separated list of {', '.join(LOSS_KINDS)} (one per group, cycled)")
    _check(len({lo.strip() == "wgan-gp" for lo in losses}) == 1, k("mggan-losses"), cfg.mggan_losses,
           "all 'wgan-gp' or none: groups share one D architecture and wgan-gp critics have no BatchNorm")
    _check(cfg.regroup_interval >= -1, k("regroup-interval"), cfg.regroup_interval,
           "-1 (dynamic: period A, xi, t-max), 0 (never) or a fixed number of iterations")
    _check(cfg.regroup_xi > 1.0, k("regroup-xi"), cfg.regroup_xi, "> 1 (the interval grows by this factor)")
    for name_ in ("local_steps", "regroup_t_max", "period_a_window", "period_a_cap", "eval_samples"):
        _check(getattr(cfg, name_) >= 1, k(name_), getattr(cfg, name_), "an integer >= 1")
    for name_ in ("period_a_min", "lr_window", "eval_every"):
        _check(getattr(cfg, name_) >= 0, k(name_), getattr(cfg, name_), "an integer >= 0")
    for name_ in ("client_gen_lr", "lr_max", "period_a_threshold"):
        _check(getattr(cfg, name_) > 0, k(name_), getattr(cfg, name_), "> 0")
    for name_ in ("lr_delta", "vrl_max"):
        _check(getattr(cfg, name_) >= 0, k(name_), getattr(cfg, name_), ">= 0")
    two_d = name in ("ring", "grid")
    _check(not (two_d and cfg.model == "dcgan"), k("model"), cfg.model, "'mlp' or 'auto' for 2-D data")
    _check(not (not two_d and cfg.model == "mlp"), k("model"), cfg.model, "'dcgan' or 'auto' for image data")
    _check(not (two_d and cfg.fakes_dtype == "uint8"), k("fakes-dtype"), cfg.fakes_dtype,
           "'float32' or 'float16' for 2-D data (uint8 quantizes images in [-1, 1])")
    _check(cfg.resume == "" or cfg.strategy in RESUMABLE, k("resume"), cfg.resume,
           f"empty: resuming is implemented for strategies {', '.join(map(repr, RESUMABLE))}")
    validate_dp(cfg)
    _check(cfg.audit_probe >= 0, k("audit-probe"), cfg.audit_probe, ">= 0 (0 = no probe)")
    _check(cfg.audit_nonmembers >= 0, k("audit-nonmembers"), cfg.audit_nonmembers,
           "an integer >= 0 (0 = as many non-members as members)")
    _check(cfg.audit_probe == 0 or cfg.strategy == "privacygan", k("audit-probe"), cfg.audit_probe,
           "0 unless strategy = privacygan (the probe asks D_i for labels and feedback on chosen inputs)")
    _check(cfg.cohort_size >= 1, k("cohort-size"), cfg.cohort_size, "an integer >= 1 (1 = a SuperNode per client)")
    _check(cfg.cohort_size == 1 or cfg.strategy == "privacygan", k("cohort-size"), cfg.cohort_size,
           "1 unless strategy = privacygan (cohorts of virtual clients per SuperNode are built for it only)")
    _check(cfg.server_negatives >= 0, k("server-negatives"), cfg.server_negatives, "an integer >= 0 (0 = none)")
    _check(cfg.server_negatives == 0 or cfg.strategy == "privacygan", k("server-negatives"), cfg.server_negatives,
           "0 unless strategy = privacygan (the server's images go with the fakes it sends each D_i)")
    _check(cfg.client_d_train == "all" or cfg.strategy == "privacygan", k("client-d-train"), cfg.client_d_train,
           "'all' unless strategy = privacygan (head trains D_i's last layer on the teacher's frozen layers)")
    if cfg.strategy != "privacygan":
        return
    _check(cfg.client_d_train == "all" or cfg.client_d_init == "teacher", k("client-d-train"), cfg.client_d_train,
           "'all' unless client-d-init = 'teacher' (head keeps D_i's other layers as initialised: the teacher's "
           "D_T, not random ones)")
    _check(cfg.server_negatives == 0 or cfg.server_data != "none", k("server-negatives"), cfg.server_negatives,
           "0 when server-data = 'none' (the negatives are the server's own images)")
    _check(cfg.server_negatives == 0 or cfg.loss in NEGATIVE_LOSSES, k("server-negatives"), cfg.server_negatives,
           f"0 unless loss is one of {', '.join(NEGATIVE_LOSSES)} (a Wasserstein critic's fake term has no "
           "per-sample target)")
    _check(cfg.teacher_steps > 0 or cfg.teacher_path != "" or (cfg.alpha == 1.0 and cfg.alpha_final in (0.0, 1.0)),
           k("teacher-steps"), cfg.teacher_steps, "> 0 unless teacher-path is given or alpha = 1 (and alpha-final "
           "is 0 or 1)")
    _check(cfg.server_data != "none" or cfg.teacher_path != "" or cfg.teacher_steps == 0, k("server-data"),
           cfg.server_data, "'heldout' or 'full' when the server trains a teacher")




def validate_dp(cfg: Config) -> None:
    from models.dp import DP_LOSSES   # the losses with a per-example real-data term

    """The DP keys (checked whatever ``dp`` is, so a bad value never waits for dp=true) and,
    with ``dp`` on, what DP-SGD cannot cover: a gradient-penalty loss, the centralized reference."""
    k = key_of
    _check(cfg.dp_noise_multiplier > 0, k("dp-noise-multiplier"), cfg.dp_noise_multiplier, "> 0 (sigma)")
    _check(cfg.dp_max_grad_norm > 0, k("dp-max-grad-norm"), cfg.dp_max_grad_norm, "> 0 (the clipping bound C)")
    _check(0.0 < cfg.dp_delta < 1.0, k("dp-delta"), cfg.dp_delta, "in (0, 1), and below 1/n for every client's n")
    _check(cfg.dp_target_epsilon >= 0, k("dp-target-epsilon"), cfg.dp_target_epsilon, ">= 0 (0 = no target)")
    if not cfg.dp:
        return
    _check(cfg.resume == "", k("resume"), cfg.resume,
           "empty with dp = true: each client's privacy accountant lives in its context.state, which a resumed "
           "Flower run starts empty, so the reported epsilon would restart from 0")
    _check(cfg.strategy != "centralized", k("dp"), cfg.dp,
           "false for strategy 'centralized': its server trains on the pooled data, there is no client whose "
           "gradients DP-SGD could protect")
    if cfg.strategy == "mggan":
        for loss in cfg.mggan_losses.split(","):
            _check(loss.strip() in DP_LOSSES, k("mggan-losses"), cfg.mggan_losses,
                   f"made of {', '.join(DP_LOSSES)} with dp = true (DP-SGD needs a per-example real-data term; "
                   "wgan-gp's gradient penalty is not one)")
    elif cfg.strategy != "bpgan":   # BPGAN's D loss follows bpgan-model: bce or wgan, both supported
        _check(cfg.loss in DP_LOSSES, k("loss"), cfg.loss,
               f"one of {', '.join(map(repr, DP_LOSSES))} with dp = true (DP-SGD needs a per-example real-data "
               "term; wgan-gp's gradient penalty is not one)")


def check_dp_data(cfg: Config, n: int, batch_size: int | None = None) -> float:
    """Checks that need a client's dataset size ``n`` (made on the client at first contact,
    where n is known): ``dp-delta`` < 1/n and, with ``dp-target-epsilon``, that the target is
    reachable for :meth:`Config.dp_planned_steps`. Returns the client's noise multiplier."""
    from models.dp import DPAccount, sample_rate

    _check(cfg.dp_delta < 1.0 / max(1, n), key_of("dp-delta"), cfg.dp_delta,
           f"< 1/n = {1.0 / max(1, n):.3g} (this client holds n = {n} records; delta >= 1/n allows "
           "publishing a record outright)")
    if cfg.dp_target_epsilon <= 0:
        return cfg.dp_noise_multiplier
    q = sample_rate(batch_size or cfg.batch_size, n)
    try:
        return DPAccount.noise_for_target(cfg.dp_target_epsilon, cfg.dp_delta, q, cfg.dp_planned_steps())
    except ValueError as exc:
        raise ConfigError(f"run config 'dp-target-epsilon' = {cfg.dp_target_epsilon!r} is not allowed: {exc}") \
            from None


def config_from_context(run_config: Mapping[str, Any], *, check_paths: bool = True) -> Config:
    """Parse ``context.run_config``; an empty mapping gives the defaults."""
    return parse_config(dict(run_config), check_paths=check_paths)


def resolve_device(name: str) -> str:
    """``auto`` -> ``cuda`` when available, else ``cpu``; ``cuda`` without a GPU is an error."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run config 'device' = 'cuda' but no CUDA device is available; use 'auto' or 'cpu'")
    return name


def check_tracking(cfg: Config) -> None:
    """ConfigError when ``tracking`` names a backend whose package is not installed. Called where
    the tracker runs (the server, at start) and by the launchers -- not in :func:`validate`,
    since clients parse the same run config and never track."""
    package = missing_package(cfg.tracking)
    if package is not None:
        raise ConfigError(f"run config 'tracking' = {cfg.tracking!r} needs the package '{package}', which is not "
                          f"installed; install the tracking extra: {INSTALL_HINT} (or set tracking=none)")


__all__ = ["Config", "ConfigError", "parse_config", "validate", "config_from_context", "key_of",
           "resolve_device", "check_tracking", "STRATEGIES", "validate_dp", "check_dp_data"]
