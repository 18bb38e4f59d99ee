"""Per-run output folders, logging, checkpoints, sample grids and progress lines.

Each training run gets its own folder::

    <output_dir>/runs/<UTC %Y%m%d-%H%M%S>-<strategy>-<dataset>[-<run_name>]/
        config.json       resolved configuration of the run
        metrics.jsonl     one JSON object per line (usually one per round)
        comm.jsonl        communication records (bytes sent/received, ...)
        summary.md        human-readable summary written at the end
        metrics.png       plots drawn by ``RunFolder.plot_metrics``
        samples/          image grids / scatter plots of generated samples
        checkpoints/      torch checkpoints, always written atomically

Plotting uses matplotlib's object API (``matplotlib.figure.Figure``) rather
than ``pyplot``; figures are rendered by the Agg canvas directly, so this
module never changes the global matplotlib backend and needs no display.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import re
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

__all__ = ["resolve_output_dir", "RunFolder", "Progress"]

# Largest number of images drawn in one row of a sample grid.
MAX_IMAGES_PER_ROW = 16
# Smallest on-screen size (pixels) of one image cell in a sample grid.
MIN_CELL_PX = 48
_DPI = 100


# --------------------------------------------------------------------------- #
# Paths
# --------------------------------------------------------------------------- #
def resolve_output_dir(output_dir: str | Path) -> Path:
    """Turn the user-supplied ``output_dir`` into an absolute path.

    * ``~`` / ``~user`` are expanded first.
    * An absolute path is returned unchanged.
    * A relative path is interpreted relative to ``$FEDGAN_HOME`` when that
      environment variable is set (and non-empty), otherwise relative to
      ``Path.home() / "fedgan"``.

    Relative paths are deliberately *not* resolved against the current working
    directory: under ``flwr run`` the ServerApp is started by the Flower
    runtime in a directory of its own choosing (not the directory the user
    typed the command in), so ``outputs`` would otherwise end up somewhere
    surprising and hard to find.
    """
    path = Path(output_dir).expanduser()
    if path.is_absolute():
        return path
    home = os.environ.get("FEDGAN_HOME", "").strip()
    base = Path(home).expanduser() if home else Path.home() / "fedgan"
    return (base / path).absolute()


def run_folders(output_dir: str | Path) -> list[Path]:
    """The run folders under ``<output_dir>/runs``, oldest name first ([] when there is none).

    Only folders whose names do not start with a dot: a dot-name there is not a run (e.g. the
    short-lived write probe of :func:`ensure_writable_dir`, which another process listing the
    folder at that moment would otherwise take for one)."""
    root = resolve_output_dir(output_dir) / "runs"
    try:
        entries = list(root.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(p for p in entries if not p.name.startswith(".") and p.is_dir())


def _sanitize(text: str, max_len: int = 60) -> str:
    """Reduce ``text`` to characters that are safe in a folder name."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("._-")
    cleaned = re.sub(r"_+", "_", cleaned)
    return cleaned[:max_len].rstrip("._-") or "x"


# --------------------------------------------------------------------------- #
# JSON helpers
# --------------------------------------------------------------------------- #
def _to_jsonable(obj: Any) -> Any:
    """Convert ``obj`` into something ``json.dumps(..., allow_nan=False)`` accepts.

    numpy / torch scalars become Python numbers, arrays and tensors become
    (nested) lists, NaN and +-Inf become ``None`` (JSON ``null``), paths become
    strings and anything else unknown is written as ``str(obj)``.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [_to_jsonable(v) for v in obj]
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu()
        return _to_jsonable(obj.item() if obj.numel() == 1 and obj.dim() == 0 else obj.tolist())
    # numpy scalars / arrays (duck-typed so numpy is not a hard requirement)
    if hasattr(obj, "dtype") and hasattr(obj, "tolist"):
        return _to_jsonable(obj.tolist())
    if hasattr(obj, "item"):
        try:
            return _to_jsonable(obj.item())
        except Exception:  # noqa: BLE001 - fall through to str()
            pass
    return str(obj)


def _dumps_line(record: dict) -> str:
    return json.dumps(_to_jsonable(record), allow_nan=False, separators=(",", ":"))


_UMASK = os.umask(0)
os.umask(_UMASK)


class RunFolderError(OSError):
    """A file or folder of the run cannot be written or read; the message is one line naming
    the path and the cause."""


_CAUSES = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
           errno.EACCES: "permission denied (not writable)", errno.EPERM: "operation not permitted",
           errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file, not a folder",
           errno.ENOENT: "no such file or folder", errno.EISDIR: "it is a folder, not a file",
           errno.EEXIST: "it exists and is not a folder"}


def describe_os_error(exc: BaseException) -> str:
    """The cause of an OS error in a few words (errno first, else its own text)."""
    if isinstance(exc, RunFolderError):
        return str(exc)
    if isinstance(exc, OSError) and exc.errno in _CAUSES:
        return _CAUSES[exc.errno]
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    return f"{type(exc).__name__}: {exc}"


def ensure_writable_dir(path: str | Path, what: str = "output folder") -> Path:
    """Create ``path`` (and its parents) and check a file can be written in it;
    :class:`RunFolderError` in one line otherwise."""
    path = Path(path)
    try:
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"{what} {path}: it exists and is not a folder")
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".fedgan-write-test.", dir=path)
        try:
            os.write(fd, b"0" * 4096)
        finally:
            os.close(fd)
            os.unlink(probe)
    except RunFolderError:
        raise
    except OSError as exc:
        raise RunFolderError(f"{what} {path}: {describe_os_error(exc)}") from None
    return path


def _atomic_write_bytes(path: Path, write: Callable[[Any], None]) -> Path:
    """Write a file through ``write(fileobj)`` so that ``path`` is never torn.

    Data goes to a temporary file in the same folder, which is flushed,
    fsync'ed and then renamed over ``path`` with ``os.replace`` (atomic on
    POSIX and Windows).  On any error the temporary file is removed and the
    previous content of ``path`` (if any) is left untouched.
    """
    path = Path(path)
    buffer = io.BytesIO()   # serialize in memory first: a full disk then fails as an OS error naming the file
    write(buffer)
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        raise RunFolderError(f"cannot write {path}: {describe_os_error(exc)}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getbuffer())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp_name, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp_name, path)
    except BaseException as exc:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        if isinstance(exc, OSError):
            raise RunFolderError(f"cannot write {path}: {describe_os_error(exc)}") from None
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Best effort: persist the rename itself (not supported everywhere)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def _as_number(value: Any) -> float | None:
    """Return ``value`` as a finite float, or None when it is not numeric."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return None
        value = value.item()
    elif not isinstance(value, (int, float)) and hasattr(value, "item"):
        try:
            value = value.item()
        except Exception:  # noqa: BLE001
            return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


# --------------------------------------------------------------------------- #
# Run folder
# --------------------------------------------------------------------------- #
class RunFolder:
    """One run's output folder (see the module docstring for its layout)."""

    METRICS = "metrics.jsonl"
    COMM = "comm.jsonl"
    CONFIG = "config.json"
    SUMMARY = "summary.md"

    def __init__(self, path: str | Path):
        self.path: Path = Path(path).expanduser().absolute()

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- construction ------------------------------------------------------ #
    @classmethod
    def create(
        cls,
        output_dir: str | Path,
        strategy: str,
        dataset: str,
        config: dict,
        *,
        run_name: str = "",
    ) -> "RunFolder":
        """Create a fresh run folder under ``<resolved output_dir>/runs/``.

        The folder name is ``<UTC timestamp>-<strategy>-<dataset>[-<run_name>]``
        with unsafe characters replaced; if it already exists, ``-2``, ``-3``,
        ... is appended.  ``config`` is written to ``config.json``.
        """
        runs_dir = ensure_writable_dir(resolve_output_dir(output_dir) / "runs")
        stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
        parts = [stamp, _sanitize(strategy), _sanitize(dataset)]
        if run_name:
            parts.append(_sanitize(run_name))
        base = "-".join(parts)

        suffix = 1
        while True:
            candidate = runs_dir / (base if suffix == 1 else f"{base}-{suffix}")
            try:
                candidate.mkdir()  # fails if it exists -> safe against races
                break
            except FileExistsError:
                suffix += 1
            except OSError as exc:
                raise RunFolderError(f"cannot create the run folder {candidate}: {describe_os_error(exc)}") from None

        run = cls(candidate)
        try:
            run.samples_dir.mkdir(exist_ok=True)
            run.checkpoints_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"cannot create folders in {candidate}: {describe_os_error(exc)}") from None
        text = json.dumps(_to_jsonable(dict(config)), indent=2, sort_keys=True, allow_nan=False)
        _atomic_write_bytes(run.path / cls.CONFIG, lambda fh: fh.write((text + "\n").encode()))
        return run

    @classmethod
    def open(cls, path: str | Path) -> "RunFolder":
        """Attach to an existing run folder (e.g. to resume or re-plot)."""
        run = cls(path)
        if not run.path.is_dir():
            raise RunFolderError(f"run folder {run.path}: no such folder")
        try:
            run.samples_dir.mkdir(exist_ok=True)
            run.checkpoints_dir.mkdir(exist_ok=True)
        except OSError as exc:
            raise RunFolderError(f"run folder {run.path}: {describe_os_error(exc)}") from None
        return run

    # -- layout ------------------------------------------------------------ #
    @property
    def samples_dir(self) -> Path:
        return self.path / "samples"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    def write_config(self, config: dict) -> Path:
        """Rewrite config.json (atomically), e.g. when a resumed run is extended."""
        text = json.dumps(_to_jsonable(dict(config)), indent=2, sort_keys=True, allow_nan=False)
        return _atomic_write_bytes(self.path / self.CONFIG, lambda fh: fh.write((text + "\n").encode()))

    def read_config(self) -> dict:
        """Return the content of config.json (empty dict if absent)."""
        cfg = self.path / self.CONFIG
        return json.loads(cfg.read_text()) if cfg.exists() else {}

    # -- JSON lines -------------------------------------------------------- #
    def _append_lines(self, name: str, records: Iterable[dict]) -> None:
        lines = [_dumps_line(r) + "\n" for r in records]
        if not lines:
            return
        try:
            with open(self.path / name, "a", encoding="utf-8") as fh:
                for line in lines:
                    fh.write(line)
                    fh.flush()
        except OSError as exc:
            raise RunFolderError(f"cannot write {self.path / name}: {describe_os_error(exc)}") from None

    def log_metrics(self, record: dict) -> None:
        """Append one record to metrics.jsonl (NaN/Inf are stored as null)."""
        self._append_lines(self.METRICS, [record])

    def log_comm(self, records: list[dict]) -> None:
        """Append communication records to comm.jsonl, one per line."""
        self._append_lines(self.COMM, records)

    def read_jsonl(self, name: str) -> list[dict]:
        """Read a JSON-lines file of this run; a missing file gives ``[]``.

        Blank lines and a torn (undecodable) line, e.g. left by a crash while
        appending, are skipped.
        """
        file = self.path / name
        if not file.exists():
            return []
        out: list[dict] = []
        with open(file, encoding="utf-8") as fh:
            for line in fh:
                line = line.strip()
                if not line:
                    continue
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out

    def keep_jsonl(self, name: str, keep: Callable[[dict], bool]) -> int:
        """Rewrite a JSON-lines file keeping only the records ``keep`` accepts (atomically);
        returns how many were dropped. Used when a run resumes from a checkpoint, so rounds
        done after that checkpoint are not listed twice."""
        records = self.read_jsonl(name)
        kept = [r for r in records if keep(r)]
        text = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in kept)
        _atomic_write_bytes(self.path / name, lambda fh: fh.write(text.encode("utf-8")))
        return len(records) - len(kept)

    # -- checkpoints ------------------------------------------------------- #
    def _checkpoint_path(self, name: str) -> Path:
        if not name or Path(name).name != name or name in (".", ".."):
            raise ValueError(f"checkpoint name must be a plain file name, got {name!r}")
        return self.checkpoints_dir / name

    def save_checkpoint(self, name: str, obj: Any) -> Path:
        """``torch.save`` ``obj`` to checkpoints/<name> atomically.

        The data is written to a temporary file in checkpoints/, flushed and
        fsync'ed, then renamed over the final name.  A crash or kill while
        saving therefore leaves either the old checkpoint or the new one under
        ``name``, never a partial file.
        """
        target = self._checkpoint_path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        return _atomic_write_bytes(target, lambda fh: torch.save(obj, fh))

    def load_checkpoint(self, name: str) -> Any:
        """Load checkpoints/<name> onto the CPU (full unpickling: trusted files only)."""
        return torch.load(self._checkpoint_path(name), map_location="cpu", weights_only=False)

    # -- samples ----------------------------------------------------------- #
    def save_samples(self, tag: str, rows: dict[str, torch.Tensor]) -> Path:
        """Draw generated samples into samples/<tag>.png and return its path.

        ``rows`` maps a label to a tensor.  Either all tensors are images
        ``(B, C, H, W)`` with values in [-1, 1] and C in {1, 3} -- one grid row
        per entry, at most 16 images, the label written to the left -- or all
        are 2-D points ``(B, 2)`` -- one scatter subplot per entry, titled
        with the label.
        """
        if not rows:
            raise ValueError("save_samples needs at least one row")
        tensors = {str(k): torch.as_tensor(v).detach().cpu().float() for k, v in rows.items()}
        dims = {t.dim() for t in tensors.values()}
        if dims == {4}:
            fig = _image_rows_figure(tag, tensors)
        elif dims == {2} and all(t.shape[1] == 2 for t in tensors.values()):
            fig = _scatter_figure(tag, tensors)
        else:
            shapes = {k: tuple(t.shape) for k, t in tensors.items()}
            raise ValueError(f"expected all (B, C, H, W) images or all (B, 2) points, got {shapes}")
        self.samples_dir.mkdir(parents=True, exist_ok=True)
        return _save_figure(fig, self.samples_dir / f"{_sanitize(tag, 120)}.png")

    # -- summary / plots --------------------------------------------------- #
    def write_summary(self, text: str) -> Path:
        """Write ``text`` to summary.md (atomically) and return the path."""
        return _atomic_write_bytes(self.path / self.SUMMARY, lambda fh: fh.write(text.encode("utf-8")))

    def plot_metrics(self, keys: list[str] | None = None) -> Path | None:
        """Plot numeric series of metrics.jsonl over ``round`` into metrics.png.

        Top-level numbers are plotted directly; nested dicts other than
        ``clients`` are flattened to dotted keys (``{"eval": {"fid": 3}}`` ->
        ``eval.fid``).  Per-client values under ``{"clients": {id: {key: v}}}``
        get one thin line per client plus a dashed client-mean line, in the
        same subplot as the top-level value of the same key.  ``keys`` limits
        (and orders) the subplots; missing or non-numeric keys are skipped.
        Returns None when there is nothing to plot.
        """
        records = self.read_jsonl(self.METRICS)
        series, client_series, order = _collect_series(records)
        wanted = [k for k in (keys if keys is not None else order) if k in series or k in client_series]
        if not wanted:
            return None

        from matplotlib.figure import Figure

        ncols = min(3, len(wanted))
        nrows = math.ceil(len(wanted) / ncols)
        fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), dpi=_DPI)
        for i, key in enumerate(wanted):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            per_client = client_series.get(key, {})
            for cid in sorted(per_client, key=_natural_key):
                xs, ys = zip(*per_client[cid])
                ax.plot(xs, ys, linewidth=0.9, alpha=0.6, label=client_legend_label(cid))
            if per_client:
                by_round: dict[float, list[float]] = {}
                for pts in per_client.values():
                    for x, y in pts:
                        by_round.setdefault(x, []).append(y)
                xs = sorted(by_round)
                ax.plot(xs, [sum(by_round[x]) / len(by_round[x]) for x in xs],
                        color="black", linestyle="--", linewidth=1.6, label="client mean")
            if key in series:
                xs, ys = zip(*series[key])
                ax.plot(xs, ys, color="tab:red", linewidth=1.8, marker="." if len(xs) < 30 else None,
                        label=key if per_client else None)
            ax.set_title(key)
            ax.set_xlabel("round")
            ax.grid(True, alpha=0.3)
            if per_client and len(per_client) <= 12:
                ax.legend(fontsize=7)
        fig.tight_layout()
        return _save_figure(fig, self.path / "metrics.png")

    def plot_quality(self) -> Path | None:
        """quality.png: every quality score over rounds, one line per sample set / client and a
        dashed mean (from metrics.jsonl). None when the run was never evaluated."""
        records = self.read_jsonl(self.METRICS)
        panels = [(title, *quality_series(records, group, key)) for group, key, title in QUALITY_PANELS]
        panels = [p for p in panels if p[1]]
        if not panels:
            return None
        from matplotlib.figure import Figure

        ncols = min(3, len(panels))
        nrows = math.ceil(len(panels) / ncols)
        fig = Figure(figsize=(5.0 * ncols, 3.4 * nrows), dpi=_DPI)
        for i, (title, series, note) in enumerate(panels):
            ax = fig.add_subplot(nrows, ncols, i + 1)
            by_round: dict[int, list[float]] = {}
            for name in sorted(series, key=_natural_key):
                xs, ys = zip(*series[name])
                ax.plot(xs, ys, linewidth=1.0, marker="." if len(xs) < 30 else None, label=name)
                for x, y in series[name]:
                    by_round.setdefault(x, []).append(y)
            if len(series) > 1:
                xs = sorted(by_round)
                ax.plot(xs, [sum(by_round[x]) / len(by_round[x]) for x in xs], color="black", linestyle="--",
                        linewidth=1.6, label="mean")
            ax.set_title(title + (f"\n({note})" if note else ""), fontsize=9)
            ax.set_xlabel("round")
            ax.grid(True, alpha=0.3)
            if len(series) <= 12:
                ax.legend(fontsize=6)
        fig.tight_layout()
        return _save_figure(fig, self.path / "quality.png")


# Quality panels: (record key, score key, title). "eval" holds the server's scores per sample
# set (vs the test split); "client_eval" the clients' scores of their own generator on their data.
QUALITY_PANELS = (
    ("eval", "fid", "FID vs test set (server)"),
    ("client_eval", "fid", "FID vs own data (on each client)"),
    ("client_eval", "own_share", "own-class share (fakes labelled as the client's classes)"),
    ("eval", "kid", "KID vs test set (server)"),
    ("client_eval", "tv_own", "TV(fake labels, own labels)"),
    ("client_eval", "tv_global", "TV(fake labels, global labels)"),
    ("eval", "tv_global", "TV(fake labels, test labels)"),
    ("eval", "modes_covered", "modes covered"),
    ("eval", "high_quality_pct", "% high-quality samples"),
    ("eval", "reverse_kl", "reverse KL of mode histogram"),
)


def eval_sets(block: dict | None) -> dict[str, dict]:
    """The scores per sample set of an ``eval`` record. BPGAN nests them as
    ``{"per_gb": {...}, "mean": {...}, "best": {...}}``; that is flattened to the sets."""
    block = block or {}
    if isinstance(block.get("per_gb"), dict):
        return dict(block["per_gb"])
    return {name: scores for name, scores in block.items() if isinstance(scores, dict)}


def quality_series(records: list[dict], group: str, key: str) -> tuple[dict[str, list[tuple[int, float]]], str]:
    """{set or client: [(round, value)]} of ``record[group][name][key]``, and a note naming the
    extractor and sample count (every FID is reported with them)."""
    out: dict[str, list[tuple[int, float]]] = {}
    note = ""
    for rec in records:
        for name, scores in eval_sets(rec.get(group)).items():
            if isinstance(scores.get(key), (int, float)) and math.isfinite(scores[key]):
                out.setdefault(str(name), []).append((int(rec.get("round", 0)), float(scores[key])))
                if "extractor" in scores and not note:
                    note = f"{scores['extractor']} features, {scores.get('num_samples', '?')} samples"
                elif group == "client_eval" and "num_fake" in scores and not note:
                    note = f"{int(scores['num_fake'])} fakes vs each client's data"
    return out, note


def client_legend_label(cid: Any) -> str:
    """A per-client line's legend entry: the record's client key as it is when it already names
    the client ("client 0 (classes 0,1)"), else "client <id>" for a bare id."""
    text = str(cid)
    return text if text.startswith("client") else f"client {text}"


def _natural_key(text: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(text)))


def _collect_series(records: list[dict]):
    """Split metric records into {key: [(round, value)]} and per-client series."""
    series: dict[str, list[tuple[float, float]]] = {}
    clients: dict[str, dict[str, list[tuple[float, float]]]] = {}
    order: list[str] = []

    def note(key: str) -> None:
        if key not in order:
            order.append(key)

    def walk(prefix: str, obj: dict, x: float) -> None:
        for k, v in obj.items():
            key = f"{prefix}{k}"
            if isinstance(v, dict):
                walk(key + ".", v, x)
                continue
            y = _as_number(v)
            if y is not None:
                series.setdefault(key, []).append((x, y))
                note(key)

    for idx, rec in enumerate(records):
        if not isinstance(rec, dict):
            continue
        x = _as_number(rec.get("round"))
        x = float(idx + 1) if x is None else x
        top = {k: v for k, v in rec.items() if k not in ("round", "clients")}
        walk("", top, x)
        per_client = rec.get("clients")
        if isinstance(per_client, dict):
            for cid, values in per_client.items():
                if not isinstance(values, dict):
                    continue
                for k, v in values.items():
                    y = _as_number(v)
                    if y is not None:
                        clients.setdefault(k, {}).setdefault(str(cid), []).append((x, y))
                        note(k)
    return series, clients, order


# --------------------------------------------------------------------------- #
# Figures
# --------------------------------------------------------------------------- #
def _save_figure(fig, path: Path) -> Path:
    """Render ``fig`` as PNG into ``path`` atomically (no pyplot involved)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    return _atomic_write_bytes(path, lambda fh: fig.savefig(fh, format="png", dpi=fig.dpi))


def _image_grid(images: torch.Tensor, ncols: int, pad: int = 2) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H+2p, ncols*(W+p)+p) strip.

    Missing cells (B < ncols) stay white.
    """
    b, c, h, w = images.shape
    strip = torch.ones(c, h + 2 * pad, ncols * (w + pad) + pad)
    for i in range(min(b, ncols)):
        x0 = pad + i * (w + pad)
        strip[:, pad:pad + h, x0:x0 + w] = images[i]
    return strip


def _image_rows_figure(tag: str, tensors: dict[str, torch.Tensor]):
    from matplotlib.figure import Figure

    channels = {t.shape[1] for t in tensors.values()}
    sizes = {tuple(t.shape[2:]) for t in tensors.values()}
    if len(channels) != 1 or channels.pop() not in (1, 3) or len(sizes) != 1:
        raise ValueError("image rows must share C in {1, 3} and the same H, W")
    h, w = sizes.pop()
    ncols = max(1, min(MAX_IMAGES_PER_ROW, max(t.shape[0] for t in tensors.values())))

    pad = 2
    strip_h, strip_w = h + 2 * pad, ncols * (w + pad) + pad
    # Integer upscale so one cell is at least MIN_CELL_PX on screen.
    scale = max(1, math.ceil(MIN_CELL_PX / max(1, min(h, w))))
    label_px, title_px, gap_px = 170, 34, 6
    row_px = strip_h * scale
    fig_w = label_px + strip_w * scale + 10
    fig_h = title_px + len(tensors) * (row_px + gap_px) + 4
    fig = Figure(figsize=(fig_w / _DPI, fig_h / _DPI), dpi=_DPI, facecolor="white")
    fig.text(0.5, 1 - (title_px / 2) / fig_h, str(tag), ha="center", va="center", fontsize=12)

    for r, (label, imgs) in enumerate(tensors.items()):
        imgs = ((imgs[:ncols].clamp(-1, 1) + 1) / 2).nan_to_num(0.5)
        strip = _image_grid(imgs, ncols, pad)
        top = title_px + r * (row_px + gap_px)
        bottom_frac = 1 - (top + row_px) / fig_h
        ax = fig.add_axes((label_px / fig_w, bottom_frac, strip_w * scale / fig_w, row_px / fig_h))
        if strip.shape[0] == 1:
            ax.imshow(strip[0].numpy(), cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        else:
            ax.imshow(strip.permute(1, 2, 0).numpy(), interpolation="nearest")
        ax.set_axis_off()
        fig.text((label_px - 8) / fig_w, bottom_frac + (row_px / 2) / fig_h, label,
                 ha="right", va="center", fontsize=10)
    return fig


def _scatter_figure(tag: str, tensors: dict[str, torch.Tensor]):
    from matplotlib.figure import Figure

    n = len(tensors)
    ncols = min(4, n)
    nrows = math.ceil(n / ncols)
    fig = Figure(figsize=(3.6 * ncols, 3.6 * nrows + 0.4), dpi=_DPI, facecolor="white")
    fig.suptitle(str(tag))
    for i, (label, pts) in enumerate(tensors.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        pts = pts.numpy()
        ax.scatter(pts[:, 0], pts[:, 1], s=4, alpha=0.6)
        ax.set_title(label, fontsize=10)
        ax.set_aspect("equal", adjustable="datalim")
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------- #
# Progress line
# --------------------------------------------------------------------------- #
def _fmt_duration(seconds: float) -> str:
    """Format seconds as ``H:MM:SS`` (hours unbounded)."""
    total = max(0, int(round(seconds)))
    h, rem = divmod(total, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}"


def _fmt_value(value: Any) -> str:
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return str(value)
    num = value
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        num = value.item()
    elif not isinstance(value, float) and hasattr(value, "item"):
        try:
            num = value.item()
        except Exception:  # noqa: BLE001
            return str(value)
    if isinstance(num, int) and not isinstance(num, bool):
        return str(num)
    if isinstance(num, float):
        return f"{num:.4g}"
    return str(value)


class Progress:
    """Prints one-line progress reports with elapsed time and ETA.

    Example line::

        [fedgan] round 12/200 | elapsed 0:00:31 | ETA 0:07:52 | g_loss 1.234 d_loss 0.456

    The clock starts when the object is created; ``clock`` can be replaced by
    a fake in tests.
    """

    def __init__(self, total: int, *, label: str = "round", stream=None,
                 clock: Callable[[], float] = time.monotonic):
        self.total = int(total)
        self.label = label
        self.stream = stream
        self.clock = clock
        self.start = clock()

    def update(self, done: int, metrics: dict[str, float] | None = None) -> str:
        """Build, print (flushed) and return the progress line for ``done`` steps."""
        elapsed = max(0.0, self.clock() - self.start)
        if done > 0:
            eta = _fmt_duration(elapsed / done * max(0, self.total - done))
        else:
            eta = "--"
        line = (f"[fedgan] {self.label} {done}/{self.total} | "
                f"elapsed {_fmt_duration(elapsed)} | ETA {eta}")
        if metrics:
            line += " | " + " ".join(f"{k} {_fmt_value(v)}" for k, v in metrics.items())
        print(line, file=self.stream if self.stream is not None else sys.stdout, flush=True)
        return line
