"""Live experiment tracking (optional): TensorBoard or Weights & Biases next to the run folder.

``tracking`` (run config) picks the backend: ``none`` (default), ``tensorboard`` or ``wandb``.
Both need the optional extra ``pip install -e ".[tracking]"``. The run folder's JSONL files stay
the source of truth; a tracker only mirrors them while the run goes:

* every round, every numeric value of the record written to ``metrics.jsonl`` becomes a scalar
  at step = round: top-level values under their key (``g_loss``, ``bytes_down``, ``epsilon``),
  per-client values as one series per client (``g_loss/client_0``), scores per sample set or
  client as ``<group>.<score>/<set>`` (``eval.fid/teacher``, ``client_eval.tv_own/client_0``);
* every sample grid written to ``samples/`` becomes an image (tag ``samples``) at its round.

TensorBoard writes its event files into ``<run>/tensorboard`` (``tensorboard --logdir <run>``);
W&B writes into ``<run>/wandb``, offline unless ``WANDB_MODE`` says otherwise (``wandb sync``
uploads an offline run later). A tracker that fails logs one warning and the run goes on.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
from pathlib import Path
from typing import Any, Mapping

log = logging.getLogger("fedgan")

TRACKERS = ("none", "tensorboard", "wandb")
# the importable package each backend needs
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}
INSTALL_HINT = 'pip install -e ".[tracking]"'
SKIPPED_KEYS = {"round", "node", "partition_id"}   # the step itself, and identifiers (not measurements)


def missing_package(kind: str) -> str | None:
    """The package ``kind`` needs when it is not installed, else None."""
    package = PACKAGES.get(kind)
    if package is None:
        return None
    try:
        found = importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        found = False
    return None if found else package


def series_name(label: Any) -> str:
    """A tag-safe name for a client or sample set: ``client 0 (classes 0,1)`` -> ``client_0``."""
    text = str(label).split(" (", 1)[0].strip() or str(label)
    return re.sub(r"[^A-Za-z0-9_.\-]+", "_", text).strip("_") or "_"


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def round_scalars(record: Mapping[str, Any]) -> dict[str, float]:
    """Every finite numeric value of a metrics record, keyed by its tag (see the module docstring)."""
    out: dict[str, float] = {}

    def walk(path: list[str], obj: Mapping[str, Any]) -> None:
        for key, value in obj.items():
            key = str(key)
            if isinstance(value, Mapping):
                walk(path + [key], value)
                continue
            if key in SKIPPED_KEYS:
                continue
            number = _number(value)
            if number is None:
                continue
            parts = path + [key]
            if parts[0] == "clients" and len(parts) == 3:      # per-client training values
                tag = f"{parts[2]}/{series_name(parts[1])}"
            elif len(parts) >= 3:                               # <group>[.<sub>].<score>/<set or client>
                tag = ".".join(parts[:-2] + [parts[-1]]) + "/" + series_name(parts[-2])
            else:
                tag = "/".join(parts)
            out[tag] = number

    walk([], record)
    return out


def read_image(path: str | Path):
    """An RGB (H, W, 3) uint8 array of a PNG written by the run folder."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


class Tracker:
    """Mirrors a run's rounds and sample grids to a tracking backend. Subclasses implement
    ``_scalars``, ``_image`` and ``_close``; the public methods never raise: a failure logs one
    warning (the first of its kind) and the run goes on."""

    name = "none"

    def __init__(self) -> None:
        self._warned: set[str] = set()
        self.failures = 0
        self.broken = False   # the backend could not start: every later call does nothing

    def _guard(self, what: str, fn, *args) -> None:
        if self.broken:
            return
        try:
            self._open()
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            self.broken = True
            self.failures += 1
            log.warning("tracking (%s) could not start, the run goes on without it (metrics.jsonl is complete): "
                        "%s: %s", self.name, type(exc).__name__, exc)
            return
        try:
            fn(*args)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            self.failures += 1
            if what not in self._warned:
                self._warned.add(what)
                log.warning("tracking (%s): %s failed, the run goes on (metrics.jsonl is complete): %s: %s",
                            self.name, what, type(exc).__name__, exc)

    def log_round(self, record: Mapping[str, Any], step: int | None = None) -> None:
        """One metrics.jsonl record, at step ``record['round']`` (or ``step``)."""
        if step is None:
            step = int(record["round"]) if _number(record.get("round")) is not None else 0
        self._guard("logging a round", lambda: self._scalars(round_scalars(record), int(step)))

    def log_image(self, tag: str, path: str | Path, step: int) -> None:
        """A PNG written by the run folder (a sample grid), at ``step``."""
        self._guard("logging an image", lambda: self._image(tag, read_image(path), int(step)))

    def close(self) -> None:
        if self.opened and not self.broken:
            self._guard("closing", self._close)

    opened = False

    def _open(self) -> None:
        """Start the backend on first use (nothing is written into the run folder before)."""
        self.opened = True

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        pass

    def _image(self, tag: str, image, step: int) -> None:
        pass

    def _close(self) -> None:
        pass


class NullTracker(Tracker):
    """``tracking = "none"``: nothing happens."""


class TensorBoardTracker(Tracker):
    """Event files in ``logdir`` through ``torch.utils.tensorboard.SummaryWriter``, flushed every
    round. ``purge_step`` (a resumed run: the first redone round) hides what the crashed run wrote
    from that step on, so every round is shown once."""

    name = "tensorboard"

    def __init__(self, logdir: str | Path, purge_step: int | None = None) -> None:
        super().__init__()
        from torch.utils.tensorboard import SummaryWriter   # fails here, at start, when tensorboard is missing

        self._writer_class = SummaryWriter
        self.logdir = Path(logdir)
        self.purge_step = purge_step
        self.writer = None

    def _open(self) -> None:
        if self.writer is None:
            self.writer = self._writer_class(log_dir=str(self.logdir), purge_step=self.purge_step, flush_secs=30)
        self.opened = True

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)
        self.writer.flush()

    def _image(self, tag: str, image, step: int) -> None:
        self.writer.add_image(tag, image, global_step=step, dataformats="HWC")
        self.writer.flush()

    def _close(self) -> None:
        self.writer.close()


class WandbTracker(Tracker):
    """A W&B run whose files live in ``<run folder>/wandb``; ``mode`` is ``WANDB_MODE`` when set,
    else ``offline`` (no network needed; ``wandb sync <run folder>/wandb/offline-run-*`` uploads it)."""

    name = "wandb"

    def __init__(self, run_dir: str | Path, *, name: str, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        import wandb   # fails here, at start, when wandb is missing

        self._wandb = wandb
        self.run_dir, self.run_name, self.config = Path(run_dir), name, dict(config or {})
        self.run = None
        self._last_step = -1

    def _open(self) -> None:
        if self.run is None:
            (self.run_dir / "wandb").mkdir(parents=True, exist_ok=True)
            self.run = self._wandb.init(project=os.environ.get("WANDB_PROJECT", "fedgan"), name=self.run_name,
                                        dir=str(self.run_dir), mode=os.environ.get("WANDB_MODE") or "offline",
                                        config=self.config)
        self.opened = True

    def _scalars(self, scalars: dict[str, float], step: int) -> None:
        if step <= self._last_step:    # W&B refuses steps that go back (a resumed run redoes rounds)
            return
        self.run.log(dict(scalars), step=step)
        self._last_step = step

    def _image(self, tag: str, image, step: int) -> None:
        self.run.log({tag: self._wandb.Image(image)}, step=max(step, self._last_step))

    def _close(self) -> None:
        self.run.finish()


def make_tracker(kind: str, run_dir: str | Path, *, name: str = "", config: Mapping[str, Any] | None = None,
                 purge_step: int | None = None) -> Tracker:
    """The tracker ``kind`` names, writing inside ``run_dir``. One that cannot start (package
    missing, backend error) logs a warning and gives a :class:`NullTracker`: the run goes on.
    (The server checks the package at start, :func:`app.config.check_tracking`, so a missing
    one stops a run before any work instead.)"""
    if kind == "none":
        return NullTracker()
    try:
        if kind == "tensorboard":
            return TensorBoardTracker(Path(run_dir) / "tensorboard", purge_step=purge_step)
        if kind == "wandb":
            return WandbTracker(run_dir, name=name or Path(run_dir).name, config=config)
        raise ValueError(f"unknown tracker {kind!r}; choose one of {', '.join(TRACKERS)}")
    except Exception as exc:  # noqa: BLE001
        log.warning("tracking (%s) could not start, the run goes on without it: %s: %s (install: %s)",
                    kind, type(exc).__name__, exc, INSTALL_HINT)
        return NullTracker()


__all__ = ["TRACKERS", "INSTALL_HINT", "Tracker", "NullTracker", "TensorBoardTracker", "WandbTracker", "make_tracker",
           "missing_package", "round_scalars", "series_name", "read_image"]
