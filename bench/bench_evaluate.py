"""Evaluation throughput on the embedded default: SmolLM2-135M-Instruct (vLLM) on synthetic problems.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_evaluate.py [--problems 8] [--iterations 2] [--max-new-tokens 192]
        [--benchmark synthetic:func-synth] [--model smollm2] [--backend vllm]

Measures problems per minute of the evaluate stage's loop (``stages.evaluate.EVALUATORS``), with all problems
batched through the engine and the sandbox pool at once, against a baseline measured in the same run: the same
problems evaluated one at a time (one problem per generate call and sandbox batch). Prints both and the
ratio. The engine is built once and warmed up before timing; both passes use the same seeds, so they do the
same work apart from batching. Skips (exit 0 with a message) when the model or vLLM is not available.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)


def _evaluate(engine, problems, params, bench) -> tuple[float, list[dict]]:
    from stages.evaluate import EVALUATORS

    t0 = time.perf_counter()
    rows = []
    for kind, fn in EVALUATORS.items():
        subset = [p for p in problems if p["kind"] == kind]
        if subset:
            rows += fn(engine, subset, params, bench)
    return time.perf_counter() - t0, rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--backend", default="vllm", choices=["vllm", "transformers"])
    ap.add_argument("--benchmark", default="synthetic:func-synth")
    ap.add_argument("--problems", type=int, default=8)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=192)
    args = ap.parse_args()

    from maths.eval_metrics import summarize
    from schemas.params.evaluate import EvalParams
    from stages.evaluate import load_problems

    try:
        from runtime.engines import make_engine
        from runtime.models import resolve_model

        t0 = time.perf_counter()
        model_dir = resolve_model(args.model)
        t_model = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine = make_engine(model_dir, backend=args.backend, seed=0)
        t_engine = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 - a benchmark skips, it does not fail, without its model/engine
        print(f"SKIP: model {args.model!r} / {args.backend} engine not available: {type(e).__name__}: {e}")
        return 0

    params = EvalParams(
        benchmark=args.benchmark,
        max_problems=args.problems,
        iterations=args.iterations,
        max_new_tokens=args.max_new_tokens,
        backend=args.backend,
        bootstrap=0,
    )
    with tempfile.TemporaryDirectory() as tmp:
        bench, problems = load_problems(params, {}, Path(tmp))
    bench = bench or args.benchmark
    print(f"model {model_dir} (prepared in {t_model:.1f} s), {args.backend} engine built in {t_engine:.1f} s")
    print(f"{len(problems)} problems of {bench}, K={args.iterations}, max_new_tokens={args.max_new_tokens}")

    _evaluate(engine, problems[:1], params.model_copy(update={"iterations": 1}), bench)  # warm-up (kernels)

    t_batched, rows = _evaluate(engine, problems, params, bench)
    t_single = 0.0
    for p in problems:
        dt, _ = _evaluate(engine, [p], params, bench)
        t_single += dt

    kinds = {p["problem_id"]: p["kind"] for p in problems}
    metrics = summarize(rows, kinds=kinds, iterations=params.iterations, bootstrap=0)
    rate_b, rate_s = len(problems) / t_batched * 60, len(problems) / t_single * 60
    attempts = len(rows)
    print(
        f"batched (all problems at once): {t_batched:7.1f} s  {rate_b:7.2f} problems/min  ({attempts} attempts)"
    )
    print(f"baseline (one problem at a time): {t_single:5.1f} s  {rate_s:7.2f} problems/min")
    print(f"ratio batched / one-at-a-time: {rate_b / rate_s:.2f}x")
    shown = {k: round(v, 3) for k, v in sorted(metrics.items()) if "_ci_" not in k}
    print(f"scores (batched pass): {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
