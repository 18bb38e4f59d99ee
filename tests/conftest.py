"""Test-wide environment: opt into Ray's future handling of accelerator variables for actors
with num_gpus=0 (as simulations/common.py and fedgan-run do), which silences its FutureWarning
and changes nothing on a CPU machine; and one Ray CPU for simulations (FEDGAN_RAY_CPUS, inherited
by the scripts tests start): the virtual clients of a tiny run take turns on one actor, one
actor start instead of two (~2 s a run on 2 cores). Tests of concurrency ask for more
(tests/e2e_mods.py: ``spread``)."""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
os.environ.setdefault("FEDGAN_RAY_CPUS", "1")


def _own_folder(variable: str, prefix: str) -> None:
    """``variable`` names a folder of this test session's own, removed at the end, unless it is set."""
    if variable not in os.environ:
        folder = tempfile.mkdtemp(prefix=prefix)
        os.environ[variable] = folder
        atexit.register(shutil.rmtree, folder, True)


# Decoded images are cached per machine (app/data.py, default ~/.cache/fedgan/decoded): tests,
# and the simulations they start, cache into a folder of their own.
_own_folder("FEDGAN_IMAGE_CACHE", "fedgan-test-image-cache-")
# The dataset classifiers likewise (app/metrics.py, default ~/.cache/fedgan/evaluators): the suite
# trains the digits one its end-of-run reports need (ensure_classifier, ~10 s here) into a folder of
# its own, so no test scores with a classifier the user trained there (a CIFAR-10 one would turn on
# reports the tests do not expect) and none is left behind in the user's cache.
_own_folder("FEDGAN_EVALUATORS", "fedgan-test-evaluators-")
