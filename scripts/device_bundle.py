"""Build ``.device/``: the wheels a GPU machine needs to run fedgan's simulations when its image
has PyTorch but neither Flower nor Ray (the lent H100/H200 machines: Python 3.12, x86-64, no
network), small enough to travel with the working tree (the device tool carries 64 MiB in all).

What goes in: every distribution fedgan needs at run time (its requirements, followed through
their extras and environment markers for the target Python), at the version installed in this
project's ``.venv`` -- minus what the image provides (``PROVIDED``: torch and the scientific stack)
and minus ``uv`` (Flower uses it only for runtime dependency installation, which fedgan turns
off). Ray's wheel (70 MiB for 2.55.1, Python 3.12) is repacked without what a Flower simulation never imports (the Java
jars, RLlib, Tune, Serve, Data, Train, the dashboard's web client) and packed with xz: 16.5 MiB.
fedgan itself is not packed: the machine runs this tree.

    .venv/bin/python scripts/device_bundle.py            # -> .device/*.whl + .device/MANIFEST.txt

Then on the machine, from the repository root (``carry: [".device"]``): ``bash
scripts/device_run.sh`` runs ``python3 scripts/device_bundle.py --install .venv`` (the image's
interpreter: a ``.venv`` over it with the bundle installed) once, then the command it is given.
Building needs pip with access to an index here (it downloads the target's wheels).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import importlib.metadata as md
import io
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parent.parent

# what the GPU image provides (/work/.library/device/KINDS.md, read 2026-11-17): these are not
# carried. Everything else fedgan needs is, at this .venv's version, so no version on the image
# (typer, rich, packaging, protobuf, grpcio ... where Flower pins a range) can get in the way.
PROVIDED = {
    "torch", "torchvision", "triton", "numpy", "scipy", "scikit-learn", "joblib", "threadpoolctl",
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "pyparsing", "python-dateutil", "six",
    "pillow", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "fsspec", "filelock", "setuptools",
    "typing-extensions", "torchmetrics", "lightning-utilities", "psutil", "pyyaml", "requests", "certifi",
    "idna", "urllib3", "charset-normalizer", "uvloop",
}
NOT_NEEDED = {"uv"}   # flwr's runtime dependency installer; fedgan runs with it disabled
# Ray: what a Flower simulation (ray.init, actors, ActorPool, the `ray start` daemons) never loads
RAY_DROP = ("ray/jars/", "ray/rllib/", "ray/tune/", "ray/serve/", "ray/data/", "ray/train/", "ray/llm/",
            "ray/dashboard/client/")
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64",
             "manylinux2014_x86_64", "manylinux1_x86_64", "linux_x86_64")
LIMIT_MIB = 60   # of the tool's 64 MiB; the repository itself is ~3 MB


def closure(root: str, python: str, skip: set[str]) -> dict[str, str]:
    """``{name: installed version}`` of ``root``'s run-time requirements, transitively, with each
    requirement's extras followed and its markers evaluated for Python ``python`` on Linux."""
    env = {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython"}
    found: dict[str, str] = {}
    todo: list[tuple[str, frozenset[str]]] = [(canonicalize_name(root), frozenset())]
    done: set[tuple[str, frozenset[str]]] = set()
    while todo:
        name, extras = todo.pop()
        if (name, extras) in done:
            continue
        done.add((name, extras))
        try:
            dist = md.distribution(name)
        except md.PackageNotFoundError:
            raise SystemExit(f"device_bundle: {name} is needed but not installed in {sys.prefix}; "
                             f"run scripts/setup.sh first") from None
        found[name] = dist.version
        for line in dist.requires or []:
            req = Requirement(line)
            wanted = any(req.marker is None or req.marker.evaluate({**env, "extra": e}) for e in extras or {""})
            if not wanted:
                continue
            dep = canonicalize_name(req.name)
            if dep not in skip:
                todo.append((dep, frozenset(req.extras)))
    found.pop(canonicalize_name(root), None)
    return found


def download(pins: dict[str, str], python: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
           "--python-version", python, "--implementation", "cp", "-d", str(dest)]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += [f"{n}=={v}" for n, v in sorted(pins.items())]
    subprocess.run(cmd, check=True)


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def slim_wheel(src: Path, drop: tuple[str, ...]) -> tuple[Path, int, int]:
    """The wheel ``src`` without the files under ``drop``, as ``<wheel name>.tar.xz`` beside it
    (xz packs Ray's native binaries into about half of what deflate does); its RECORD lists exactly
    what is left. ``src`` is removed. Returns (the archive, files dropped, bytes dropped unpacked).
    :func:`rewheel` turns the archive back into an installable wheel."""
    out = src.with_name(src.name + ".tar.xz")
    n = size = 0
    with zipfile.ZipFile(src) as zin, tarfile.open(out, "w:xz", preset=9) as tar:
        record_name = next(i.filename for i in zin.infolist() if i.filename.endswith(".dist-info/RECORD"))
        rows = []

        def add(name: str, data: bytes, mode: int = 0o644) -> None:
            member = tarfile.TarInfo(name)
            member.size, member.mode = len(data), mode
            tar.addfile(member, io.BytesIO(data))

        for info in zin.infolist():
            if info.is_dir() or info.filename == record_name:
                continue
            if info.filename.startswith(drop):
                n, size = n + 1, size + info.file_size
                continue
            data = zin.read(info)
            add(info.filename, data, (info.external_attr >> 16) & 0o777 or 0o644)
            rows.append(f"{info.filename},{_record_hash(data)},{len(data)}")
        rows.append(f"{record_name},,")
        add(record_name, ("\n".join(rows) + "\n").encode())
    src.unlink()
    return out, n, size


def rewheel(archive: Path, dest: Path) -> Path:
    """The wheel packed by :func:`slim_wheel`, rebuilt (stored, not compressed) in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / archive.name.removesuffix(".tar.xz")
    with tarfile.open(archive) as tar, zipfile.ZipFile(wheel, "w", zipfile.ZIP_STORED) as zout:
        for member in tar:
            info = zipfile.ZipInfo(member.name, date_time=(2020, 1, 1, 0, 0, 0))
            info.external_attr = (0o100000 | member.mode) << 16
            zout.writestr(info, tar.extractfile(member).read())
    return wheel


def install(bundle: Path, venv: Path, image_python: str) -> None:
    """On the machine: ``venv`` over ``image_python`` (it sees the image's packages through a
    ``.pth`` file, after its own), the bundle's wheels installed into it, and this tree as fedgan:
    on ``sys.path`` through another ``.pth`` (so the code that runs is the tree's, edited or not)
    with fedgan's commands from pyproject.toml in ``venv/bin`` beside ``flwr`` and ``ray``."""
    if not any(bundle.glob("*.whl")):
        raise SystemExit(f"device_bundle: no wheels in {bundle}: build them with scripts/device_bundle.py "
                         f"and carry that folder")
    purelib = 'import sys, sysconfig; print(sysconfig.get_paths()["purelib"], "%d.%d" % sys.version_info[:2])'
    image_site, version = subprocess.run([image_python, "-c", purelib], check=True, capture_output=True,
                                         text=True).stdout.split()
    manifest = bundle / "MANIFEST.txt"
    built_for = re.search(r"for Python (\d+\.\d+)", manifest.read_text()) if manifest.exists() else None
    if built_for and built_for.group(1) != version:
        raise SystemExit(f"device_bundle: {bundle} holds wheels for Python {built_for.group(1)}, but {image_python} "
                         f"is Python {version}: build it again with --python {version}")
    subprocess.run([image_python, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = Path(subprocess.run([python, "-c", purelib], check=True, capture_output=True, text=True).stdout.split()[0])
    # .pth files are read in name order and appended: the tree ahead of the image's packages
    (site / "_fedgan-tree.pth").write_text(f"{ROOT}\n")
    (site / "device-image.pth").write_text(f"{image_site}\n")
    wheels = venv / "ray-wheel"
    rebuilt = [rewheel(a, wheels) for a in sorted(bundle.glob("*.whl.tar.xz"))]
    subprocess.run([python, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                    "--disable-pip-version-check", *map(str, sorted(bundle.glob("*.whl"))), *map(str, rebuilt)],
                   check=True)
    shutil.rmtree(wheels, ignore_errors=True)   # none when the bundle packs no wheel
    import tomllib
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    for name, target in scripts.items():
        module, func = target.split(":")
        path = venv / "bin" / name
        path.write_text(f"#!{python}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        path.chmod(0o755)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--python", default="3.12", help="the machine's Python (major.minor)")
    ap.add_argument("--out", type=Path, default=ROOT / ".device", help="folder for the wheels (git-ignored)")
    ap.add_argument("--install", type=Path, metavar="VENV",
                    help="on the machine: make VENV from the wheels in --out over this interpreter, and exit")
    args = ap.parse_args(argv)
    if args.install:
        install(args.out, args.install, sys.executable)
        return 0
    pins = closure("fedgan", args.python, skip=PROVIDED | NOT_NEEDED)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    print(f"[device_bundle] {len(pins)} distributions for Python {args.python}: downloading", flush=True)
    download(pins, args.python, args.out)
    (ray,) = args.out.glob("ray-*.whl")
    before = ray.stat().st_size
    packed, n, size = slim_wheel(ray, RAY_DROP)
    print(f"[device_bundle] {ray.name}: {before / 2**20:.1f} MiB -> {packed.name} {packed.stat().st_size / 2**20:.1f} "
          f"MiB ({n} files, {size / 2**20:.0f} MiB unpacked, left out)", flush=True)
    wheels = sorted(args.out.glob("*.whl")) + sorted(args.out.glob("*.whl.tar.xz"))
    total = sum(w.stat().st_size for w in wheels)
    lines = [f"{w.name}\t{w.stat().st_size}" for w in wheels]
    (args.out / "MANIFEST.txt").write_text(
        f"# built by scripts/device_bundle.py for Python {args.python}; not carried (the image has "
        f"them, or fedgan does not need them): {', '.join(sorted(PROVIDED | NOT_NEEDED))}\n" + "\n".join(lines) + "\n")
    print(f"[device_bundle] {len(wheels)} files, {total / 2**20:.1f} MiB in {args.out}", flush=True)
    if total > LIMIT_MIB * 2**20:
        print(f"[device_bundle] over {LIMIT_MIB} MiB: the device tool carries 64 MiB with the repository",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
