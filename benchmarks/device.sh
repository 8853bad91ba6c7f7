#!/usr/bin/env bash
# One prepared accelerator run (benchmarks/device.py): bash benchmarks/device.sh OUT [--budget_s=480 ...]
# Packages the GPU machine lacks (diffusers, ml_collections, grain, tensorboardX) travel as wheels in
# .whl/ (see benchmarks/README.md, "On a GPU"); they are installed into /tmp/site first.
set -euo pipefail
out=${1:?usage: bash benchmarks/device.sh OUT [flags]}
shift
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/nvidia-smi.csv" 2>/dev/null || true
python3 -m benchmarks.device --out="$out" "$@" 2>&1 | tee "$out/log.txt"
