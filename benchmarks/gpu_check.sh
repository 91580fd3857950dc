#!/usr/bin/env bash
# The GPU acceptance run in one command (docs/benchmarks.md, "GPU acceptance run"): install the wheels carried in
# .whl/ (benchmarks/fetch_gpu_wheels.sh) on top of the GPU image, then run benchmarks.gpu_check into OUT.
#   bash benchmarks/gpu_check.sh OUT
set -euo pipefail
out=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
site=/tmp/site
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
fi
export PYTHONPATH="$site:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 -m benchmarks.gpu_check --output "$out" 2>&1 | tee "$out/gpu_check.log"
