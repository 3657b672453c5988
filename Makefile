# Two commands do everything on a fresh machine (each installs what it needs into .venv first):
#   make run    - the training pipeline on its embedded default, configs/default.yaml (SmolLM2-135M prepared
#                 offline, a cached warm start, GTPO on synthetic tool-arith, local SQLite MLflow, Prefect
#                 without a server)
#   make test   - the test suite
.PHONY: setup run test lint bench

setup:
	bash infra/setup.sh

run: setup
	.venv/bin/turntree run --config configs/default.yaml $(ARGS)

test: setup
	bash infra/test.sh $(ARGS)

lint: setup
	.venv/bin/ruff check flows stages maths runtime schemas tests bench

bench: setup
	for b in bench/bench_*.py; do OMP_NUM_THREADS=1 .venv/bin/python $$b || exit 1; done
