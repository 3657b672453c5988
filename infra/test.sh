#!/usr/bin/env bash
# The test suite as CI runs it: lint, then pytest (slow tests included, GPU tests skipped without a GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
unset PYTHONDONTWRITEBYTECODE  # let our own modules keep their .pyc between test processes
# A full disk makes pytest die while it starts (its temporary directories), with a traceback that hides why: say it.
for d in . "${TMPDIR:-/tmp}"; do
  free_kb=$(df -Pk "$d" 2>/dev/null | awk 'NR==2 {print $4}') || true  # never stops the tests itself
  if [ -n "$free_kb" ] && [ "$free_kb" -lt 3000000 ]; then
    echo "test.sh: warning: only $((free_kb / 1024)) MiB free under $d; the suite writes ~3 GB (models, runs): tests may fail with 'No space left on device'" >&2
  fi
done
.venv/bin/ruff check flows stages maths runtime schemas tests bench
exec .venv/bin/pytest -q -p no:cacheprovider --durations=15 "$@"
