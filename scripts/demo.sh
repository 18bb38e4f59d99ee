#!/usr/bin/env bash
# Set up (once) and run the main job: `flwr run .` on the embedded default
# (PrivacyGAN on scikit-learn's handwritten digits, 5 simulated clients).
# Extra arguments go to fedgan-run, e.g.: scripts/demo.sh --run-config "alpha=0.8"
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/fedgan-run "$@"
