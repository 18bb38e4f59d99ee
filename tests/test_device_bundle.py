"""scripts/device_bundle.py: what a GPU machine without Flower and Ray is sent, and how it is set
up there -- checked here offline with small wheels made on the spot (the real bundle needs an
index to download from)."""

from __future__ import annotations

import importlib.metadata as md
import importlib.util
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("device_bundle", ROOT / "scripts" / "device_bundle.py")
bundle = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bundle)


def make_wheel(folder: Path, name: str, files: dict[str, str], scripts: dict[str, str] | None = None) -> Path:
    """A minimal valid wheel of ``name`` 1.0 holding ``files`` (path -> text), with a RECORD."""
    info = f"{name}-1.0.dist-info"
    files = {**files, f"{info}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n",
             f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    if scripts:
        files[f"{info}/entry_points.txt"] = "[console_scripts]\n" + "".join(f"{k} = {v}\n" for k, v in scripts.items())
    rows = []
    path = folder / f"{name}-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for member, text in files.items():
            z.writestr(member, text)
            rows.append(f"{member},{bundle._record_hash(text.encode())},{len(text.encode())}")
        z.writestr(f"{info}/RECORD", "\n".join(rows + [f"{info}/RECORD,,"]) + "\n")
    return path


def test_the_closure_pins_this_venvs_versions_and_leaves_out_what_the_image_has():
    pins = bundle.closure("fedgan", "3.12", skip=bundle.PROVIDED | bundle.NOT_NEEDED)
    for name in ("flwr", "ray", "grpcio", "protobuf", "opacus", "torch-fidelity", "cryptography"):
        assert pins[name] == md.version(name), name
    assert "greenlet" in pins and "uvicorn" in pins       # extras followed: sqlalchemy[asyncio], flwr's uvicorn[standard]
    assert not set(pins) & (bundle.PROVIDED | bundle.NOT_NEEDED)
    assert "torch" not in pins and "uv" not in pins and "fedgan" not in pins


def test_a_slimmed_wheel_comes_back_with_exactly_the_kept_files_and_a_true_record(tmp_path):
    src = make_wheel(tmp_path, "tinyray", {"tinyray/__init__.py": "X = 1\n", "tinyray/core/bin.py": "B = 2\n",
                                           "tinyray/jars/big.py": "J = 3\n" * 1000})
    kept = {n: zipfile.ZipFile(src).read(n) for n in ("tinyray/__init__.py", "tinyray/core/bin.py")}
    packed, dropped, size = bundle.slim_wheel(src, ("tinyray/jars/",))
    assert not src.exists() and packed.name == src.name + ".tar.xz"
    assert (dropped, size) == (1, len("J = 3\n" * 1000))
    wheel = bundle.rewheel(packed, tmp_path / "out")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert not any(n.startswith("tinyray/jars/") for n in names)
        assert {n: z.read(n) for n in kept} == kept
        record = z.read("tinyray-1.0.dist-info/RECORD").decode().splitlines()
        for row in record:
            member, digest, length = row.rsplit(",", 2)
            if member.endswith("RECORD"):
                continue
            data = z.read(member)
            assert digest == bundle._record_hash(data) and int(length) == len(data), row
        assert {r.split(",")[0] for r in record} == names


@pytest.mark.e2e
def test_install_makes_a_venv_over_the_image_with_the_bundle_ahead_of_it_and_this_tree_as_fedgan(tmp_path):
    """Here this project's .venv plays the image: the new venv must see its torch, take the
    bundle's packages first (one of them packed like Ray) and import fedgan from this tree."""
    wheels = tmp_path / "bundle"
    wheels.mkdir()
    make_wheel(wheels, "tinypkg", {"tinypkg/__init__.py": "WHERE = 'bundle'\n"},
               scripts={"tinypkg-hello": "tinypkg:__init__"})
    bundle.slim_wheel(make_wheel(wheels, "tinyray", {"tinyray/__init__.py": "OK = True\n",
                                                     "tinyray/jars/x.py": "\n"}), ("tinyray/jars/",))
    venv = tmp_path / "venv"
    bundle.install(wheels, venv, sys.executable)
    image_site = sysconfig.get_paths()["purelib"]
    probe = ("import sys, tinypkg, tinyray, torch, app, flwr; "
             f"print(tinypkg.WHERE, tinyray.OK, app.__file__, torch.__file__, "
             f"{str(ROOT)!r} in sys.path[:sys.path.index({image_site!r})])")
    out = subprocess.run([venv / "bin" / "python", "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    where, ok, app_file, torch_file, tree_first = out.stdout.split()
    assert (where, ok, tree_first) == ("bundle", "True", "True")   # the tree ahead of the image's packages
    assert Path(app_file).resolve() == ROOT / "app" / "__init__.py"        # the tree, not a copy
    assert Path(torch_file).resolve().is_relative_to(Path(sys.prefix).resolve())   # the image's torch
    assert (venv / "bin" / "tinypkg-hello").exists()                         # the bundle's commands ...
    for name in ("fedgan-run", "fedgan-sample", "fedgan-supernode", "fedgan-superlink"):   # ... and fedgan's
        assert (venv / "bin" / name).exists(), name
    helped = subprocess.run([venv / "bin" / "fedgan-sample", "--help"], capture_output=True, text=True, timeout=120)
    assert helped.returncode == 0 and "usage" in helped.stdout.lower(), helped.stderr
    assert not (venv / "ray-wheel").exists()
    # a bundle folder without wheels, or one built for another Python, is one clear line
    with pytest.raises(SystemExit, match="no wheels in"):
        bundle.install(tmp_path / "empty", tmp_path / "venv2", sys.executable)
    (wheels / "MANIFEST.txt").write_text("# built by scripts/device_bundle.py for Python 3.99; ...\n")
    with pytest.raises(SystemExit, match=r"wheels for Python 3\.99, but .* is Python 3\.\d+: build it again"):
        bundle.install(wheels, tmp_path / "venv3", sys.executable)
    assert not (tmp_path / "venv3").exists()
    plain = tmp_path / "plain"          # a bundle with no packed wheel installs as well
    plain.mkdir()
    make_wheel(plain, "tinypkg", {"tinypkg/__init__.py": "WHERE = 'plain'\n"})
    bundle.install(plain, tmp_path / "venv4", sys.executable)
    out = subprocess.run([tmp_path / "venv4" / "bin" / "python", "-c", "import tinypkg; print(tinypkg.WHERE)"],
                         capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "plain", out.stderr
