#!/usr/bin/env bash
# One-shot GPU check of issue 24 (bench/gpu_check.py says what each section measures).
#
#   on the GPU machine (device tool, carry [".whl"]):  bash bench/gpu_check.sh
#   CPU smoke here:  .venv/bin/python bench/gpu_check.py simenv /tmp/h200sim   # once: only the GPU image's packages
#                    PYTHON=/tmp/h200sim/bin/python bash bench/gpu_check.sh --cpu-smoke
#
# Writes $OUT/gpu_check.json (every section's figures, written after each section) and $OUT/gpu_check.log
# (the sections' own output), and prints a summary. The GPU run is capped at GPU_CHECK_TIMEOUT seconds (360).
# The wheels in .whl/ (pydantic and what it needs, math-verify and what it needs: not in the GPU image) are
# installed into /tmp/site first when there is a .whl/ folder.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/gpu_check_out}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
smoke=0
for a in "$@"; do [ "$a" = "--cpu-smoke" ] && smoke=1; done
if [ "$smoke" = 0 ] && ls .whl/*.whl >/dev/null 2>&1; then
  if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "gpu_check: installing .whl/*.whl failed: the sections that need pydantic will fail" >&2
  fi
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
if [ "$smoke" = 1 ]; then
  exec "$PY" bench/gpu_check.py --out "$OUT" "$@"
fi
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv,noheader
timeout -k 10 "${GPU_CHECK_TIMEOUT:-360}" "$PY" bench/gpu_check.py --out "$OUT" "$@"
rc=$?
[ "$rc" = 124 ] && echo "gpu_check: stopped at ${GPU_CHECK_TIMEOUT:-360} s; partial results in $OUT/gpu_check.json"
exit "$rc"
