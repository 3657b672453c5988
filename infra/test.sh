#!/usr/bin/env bash
# The test suite as CI runs it: lint, then pytest (slow tests included, GPU tests skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
unset PYTHONDONTWRITEBYTECODE  # let our own modules keep their .pyc between test processes
.venv/bin/ruff check flows stages maths runtime schemas tests bench
exec .venv/bin/pytest -q -p no:cacheprovider --durations=15 "$@"
