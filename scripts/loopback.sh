#!/usr/bin/env bash
# A real Flower deployment on this machine: one SuperLink and N SuperNodes on 127.0.0.1,
# each SuperNode with its own data folder. Thin wrapper around `python -m app.loopback`.
#
#   scripts/loopback.sh start --nodes 2 [--tls] --dir /tmp/fedgan-loopback   # prints the flwr run command
#   scripts/loopback.sh status --dir /tmp/fedgan-loopback
#   scripts/loopback.sh stop --dir /tmp/fedgan-loopback
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .venv/bin/python ] || bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
exec .venv/bin/python -m app.loopback "$@"
