#!/usr/bin/env bash
# Set up (once) and run the whole test suite, end-to-end Flower runs included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
