#!/usr/bin/env bash
# Issue 17's device run: benchmarks/gpu.py on a lent H100 or H200, in one command of about 8 minutes.
#
# Here, once:  make gpu-wheels      (diffusers is not in the device machine's image: .whl/, git-ignored)
# Then, through the device tool:     run(command="bash benchmarks/gpu_run.sh", carry=[".whl"], timeout_s=560)
# Every JSON line and the GPU's name land in $OUT (gpu.log, gpu.txt); the last line is the summary with
# images/s, GPU busy, MFU and the ratios to the naive loop. Extra arguments go to gpu.py (--compile
# max-autotune, --profile ...); the defaults below fit the 10-minute limit of one command.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 benchmarks/gpu.py --root /tmp/k22 --batch 32 --rows 64 --naive-rows 8 \
    --compile default reduce-overhead --dtype bfloat16 float16 "$@" 2>&1 | tee "$OUT/gpu.log"
