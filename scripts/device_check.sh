#!/usr/bin/env bash
# The prepared GPU check (issue #13): 100 DCGAN-32 PrivacyGAN clients, batch 32, one process
# sequential and batched, and the same rounds through Flower's Simulation Engine (Ray actors
# sharing the GPU), in one call of the device tool:
#
#   .venv/bin/python scripts/device_bundle.py           # here, once: .device/ (~47 MiB)
#   run(command="bash scripts/device_check.sh", carry=[".device"], timeout_s=540)
#
# On the machine scripts/device_run.sh makes .venv from .device (the image has torch, not Flower
# or Ray). What comes back ($OUT, or fedgan-output/device): scale.json, scale.md, scale.png, the
# log. CLIENTS, DEVICE, ROUNDS and COHORTS (scale.py's --cohort-size, e.g. 1,10) override the
# defaults, e.g. DEVICE=cpu CLIENTS=10 to rehearse it on a CPU machine.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-fedgan-output/device}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
{ command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; } \
  2>&1 | tee "$OUT/machine.txt" || true
nproc >> "$OUT/machine.txt"
bash scripts/device_run.sh simulations/scale.py --clients "${CLIENTS:-100}" \
  --modes sequential,batched,simulation --device "${DEVICE:-cuda}" --image-size 32 --channels 3 \
  --features 64 --latent-dim 100 --batch-size 32 --rounds "${ROUNDS:-5}" --cohort-size "${COHORTS:-1}" \
  --output-dir "$OUT/work" 2>&1 | tee "$OUT/scale.log"
cp "$OUT"/work/scale.json "$OUT"/work/scale.md "$OUT"/work/scale.png "$OUT"/
rm -rf "$OUT/work"   # run folders and traces: more files than the tool brings back
