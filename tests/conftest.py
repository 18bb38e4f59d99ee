"""Test-wide environment: opt into Ray's future handling of accelerator variables for actors
with num_gpus=0 (as simulations/common.py and fedgan-run do), which silences its FutureWarning
and changes nothing on a CPU machine; and one Ray CPU for simulations (FEDGAN_RAY_CPUS, inherited
by the scripts tests start): the virtual clients of a tiny run take turns on one actor, one
actor start instead of two (~2 s a run on 2 cores). Tests of concurrency ask for more
(tests/e2e_mods.py: ``spread``)."""

import os

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FEDGAN_RAY_CPUS", "1")

# Decoded images are cached per machine (app/data.py, default ~/.cache/fedgan/decoded): tests,
# and the simulations they start, cache into a folder of their own, removed at the end.
if "FEDGAN_IMAGE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _cache = tempfile.mkdtemp(prefix="fedgan-test-image-cache-")
    os.environ["FEDGAN_IMAGE_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, True)
