#!/usr/bin/env bash
# On a GPU machine whose image has PyTorch but not Flower or Ray (the lent H100/H200 machines;
# no network there): make .venv over the image's interpreter from the wheels in .device/
# (built here by scripts/device_bundle.py and carried along), then run `.venv/bin/python ARGS...`.
#
#   bash scripts/device_run.sh simulations/scale.py --clients 100 --device cuda ...
#
# .venv sees the image's packages (torch, CUDA, numpy ...) through a .pth file and holds, ahead
# of them, Flower, Ray and what they need at this project's versions; this tree is fedgan (on
# its path), with its commands (fedgan-superlink ...) in .venv/bin beside flwr and ray, where
# app/ looks for them. DEVICE_PYTHON picks the image's interpreter (default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${DEVICE_PYTHON:-python3}"
if [ -x .venv/bin/flower-superlink ] && [ -x .venv/bin/fedgan-superlink ]; then
  echo "[device_run] .venv is there already"
else
  SECONDS=0
  "$PY" scripts/device_bundle.py --out .device --install .venv
  echo "[device_run] .venv made from .device in ${SECONDS} s"
fi
.venv/bin/python - <<'PYEOF'
import flwr, ray, torch
import app
cuda = torch.cuda.is_available()
print(f"[device_run] flwr {flwr.__version__}, ray {ray.__version__}, torch {torch.__version__}, fedgan from "
      f"{app.__file__.rsplit('/', 2)[0]}, CUDA: {torch.cuda.get_device_name(0) if cuda else 'none'}", flush=True)
PYEOF
[ $# -eq 0 ] && exit 0
exec .venv/bin/python "$@"
