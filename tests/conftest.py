"""Test-wide environment: opt into Ray's future handling of accelerator variables for actors
with num_gpus=0 (as simulations/common.py and fedgan-run do), which silences its FutureWarning
and changes nothing on a CPU machine."""

import os

os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
