"""Evaluate stage: pass@1 per self-correction iteration (code), accuracy with tool use (math), pass@k.

    run(EvalParams, {"checkpoint": model_dir, "problems": problems uri (optional)}, out) -> StageOutput
        tables:  {"eval_results": out/eval_results.parquet}  (schemas.tables.EVAL_RESULTS, one row per attempt)
        metrics: eval/<bench>/pass_at_1_attempt<k> (+ _ci_low/_ci_high, 95% bootstrap over problems), k = 1..K
                 eval/<bench>/pass_at_<k> (unbiased, n > 1), eval/<bench>/accuracy (math, + CI),
                 eval/<bench>/avg_turns, eval/<bench>/avg_tool_calls, eval/<bench>/difficulty/<d>/…,
                 eval/<bench>/problems_per_min, timing/evaluate, timing/evaluate_engine          (names: maths.eval_metrics)

Code problems (``evaluate_code``): the self-correction loop *is* a MURPHY refinement tree with n roots, one
child per failed node and depth K, so it runs through the rollout stage's ``refinement_trees`` — the same
prompts, the same sandbox feedback (``feedback_text``) and the same feedback prompt as training
(``prompts.feedback_prompt_ids``: task + last attempt + feedback). Each depth is one batched
``engine.generate`` over all live samples of all problems and one ``run_tests_many`` over their programs. A
sample (root-to-leaf chain) is solved at k if any of its first k attempts passes; attempts stop at the first
pass.

Math problems (``evaluate_math``): one tool-integrated attempt per sample through the rollout stage's TIR loop
(``tir_trajectories``: the model writes python blocks, sees their output, answers \\boxed{}), judged by
``maths.reward_fns.math_correct``; turns and tool calls are counted per sample.

The loops take any *engine-like* object — ``.tokenizer`` and ``.generate(prompts, SamplingSpec) ->
list[list[Generation]]`` — so tests can drive them with a scripted policy.
"""

from __future__ import annotations

import collections
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

from maths import prompts
from maths.eval_metrics import bench_key, pass_at_k, summarize
from runtime import progress
from runtime.engines import live
from runtime.tableio import read_table, write_table
from schemas.benchmarks import BENCHMARKS, benchmark_names
from schemas.outputs import StageOutput
from schemas.params.evaluate import EvalParams
from schemas.tables import EVAL_RESULTS, PROBLEMS

__all__ = [
    "EVAL_SOURCES",
    "EngineLike",
    "evaluate_code",
    "evaluate_math",
    "load_problems",
    "pass_at_k",
    "run",
]
log = logging.getLogger("turntree.evaluate")


class EngineLike(Protocol):
    """What the attempt loops need from an engine (runtime.engines.Engine, or a scripted stand-in in tests)."""

    tokenizer: Any

    def generate(self, prompts: list[list[int]], spec: Any) -> list[list[Any]]: ...


# --- benchmarks ------------------------------------------------------------------------------------------------
# Evaluation names that differ from the data stage's source names (its ALIASES): evaluate on the test split.
EVAL_SOURCES: dict[str, str] = {b.name: b.evaluate_as for b in BENCHMARKS.values() if b.evaluate_as}
# Synthetic eval problems are drawn with a seed offset so they differ from the training draw of the same seed.
SYNTHETIC_EVAL_SEED_OFFSET = 1_000_003


def _source_for(params: EvalParams) -> tuple[str, str]:
    """(data-stage source, format) of params.benchmark; with params.data_root, named sets resolve there."""
    from stages.data import ALIASES
    from stages.data.sources import find_data_file

    name = params.benchmark.strip()
    source = EVAL_SOURCES.get(name.lower(), name.lower() if name.lower() in ALIASES else name)
    alias = ALIASES.get(source)
    if alias is not None and params.data_root and not alias.path.startswith("bundled:"):
        path = find_data_file(Path(params.data_root), alias.path)
        if path is None:
            raise FileNotFoundError(
                f"benchmark {name!r}: {alias.path}[.gz] not found under data_root {params.data_root}; "
                "leave data_root unset to use the benchmarks shipped with turntree"
            )
        return str(path), alias.format
    if (
        alias is None
        and not source.startswith(("synthetic:", "hf:"))
        and not Path(source).expanduser().exists()
    ):
        known = benchmark_names(listed_only=False) + [
            "synthetic:<family>",
            "heldout",
            "<JSONL/Parquet path>",
        ]
        raise ValueError(f"unknown benchmark {name!r}: expected one of {known}")
    return source, "auto"


def bench_name(benchmark: str) -> str:
    """Display name of a benchmark: its name, or a path's file stem."""
    path = Path(benchmark).expanduser()
    return (
        path.stem
        if ("/" in benchmark or path.suffix) and not benchmark.startswith("synthetic:")
        else benchmark
    )


def load_problems(params: EvalParams, inputs: dict[str, str], out: Path) -> tuple[str | None, list[dict]]:
    """(benchmark name, problem dicts) — from inputs["problems"] filtered by params.split (name None: each
    problem reports under its ``source``), else params.benchmark through the data stage, used whole.
    At most params.max_problems, in stored order."""
    if params.benchmark == "heldout" and not inputs.get("problems"):
        raise ValueError(
            "benchmark 'heldout' evaluates the run's own problems table: pass inputs['problems']"
        )
    if inputs.get("problems"):
        rows = read_table(inputs["problems"], PROBLEMS).to_pylist()
        if params.split != "all":
            rows = [r for r in rows if r["split"] == params.split]
        if not rows:
            raise ValueError(f"problems table {inputs['problems']} has no rows with split {params.split!r}")
        bench = None
    else:
        from stages.data import prepare

        source, fmt = _source_for(params)
        synthetic = source.startswith("synthetic:")
        res = prepare(
            [source],
            out / "data",
            format=fmt,
            seed=params.seed + (SYNTHETIC_EVAL_SEED_OFFSET if synthetic else 0),
            eval_fraction=0.0,
            synthetic_count=params.max_problems or 64,
            max_problems=params.max_problems,
        )
        rows = read_table(res.uri("problems"), PROBLEMS).to_pylist()
        bench = bench_name(params.benchmark)
    if params.max_problems is not None:
        rows = rows[: params.max_problems]
    return bench, rows


# --- attempt loops ---------------------------------------------------------------------------------------------
def _spec(params: EvalParams, stop: list[str] | None = None):
    from runtime.engines import SamplingSpec

    return SamplingSpec(
        n=params.samples,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop=stop or [],
        seed=params.seed,
    )


def evaluate_code(engine: EngineLike, problems: Sequence[dict], params: EvalParams, bench: str) -> list[dict]:
    """Self-correction loop over all code problems at once; returns EVAL_RESULTS rows, one per attempt.

    A refinement tree per problem with ``samples`` roots, one child per failed node, depth ``iterations``:
    each root-to-leaf chain is one sample, its node at depth a is attempt a.
    """
    from stages.rollout import refinement_trees

    for p in problems:
        if not p.get("tests"):
            raise ValueError(f"code problem {p['problem_id']!r} has no tests: cannot evaluate it")
    n, k = params.samples, params.iterations
    trees = refinement_trees(
        engine,
        list(problems),
        group_size=n,
        child_group_size=1,
        depth=k,
        spec=_spec(params),
        max_nodes_per_tree=n * k,
        max_nodes_per_batch=len(problems) * n * k,
        feedback_max_chars=params.feedback_max_chars,
        exec_timeout_s=params.test_timeout_s,
        progress_stage="evaluate",
    )
    by_id = {p["problem_id"]: p for p in problems}
    rows = []
    for tree in trees:
        p, nodes = by_id[tree["problem_id"]], tree["nodes"]
        child = {nd["parent_id"]: nd for nd in nodes if nd["parent_id"] >= 0}  # one child per failed node
        for sample_idx, node in enumerate(nd for nd in nodes if nd["parent_id"] == -1):
            while node is not None:
                total, passed = node["tests_total"] or 0, node["tests_passed"] or 0
                ok = total > 0 and passed == total
                feedback = "" if ok else node["exec_result"] or ""
                row = _row(
                    bench,
                    p,
                    sample_idx,
                    node["depth"],
                    ok,
                    passed / max(total, 1),
                    1,
                    0,
                    node["text"],
                    feedback,
                    no_verdict=bool(node["no_verdict"]),
                )
                rows.append(row)
                node = child.get(node["node_id"])
    return rows


def evaluate_math(engine: EngineLike, problems: Sequence[dict], params: EvalParams, bench: str) -> list[dict]:
    """One TIR attempt per sample through the rollout stage's TIR loop; judged by answer equivalence."""
    from maths.reward_fns import math_correct
    from stages.rollout import tir_trajectories

    trajs = tir_trajectories(
        engine,
        list(problems),
        group_size=params.samples,
        max_turns=params.max_turns,
        spec=_spec(params, stop=list(prompts.TIR_STOP)),
        observation_max_chars=params.feedback_max_chars,
        exec_timeout_s=params.test_timeout_s,
        progress_stage="evaluate",
    )
    by_id = {p["problem_id"]: p for p in problems}
    rows = []
    for t in trajs:
        p = by_id[t["problem_id"]]
        ok = math_correct(t["final_answer"], p["answer"])
        calls = sum(turn["tool_call"] != "none" for turn in t["turns"])
        text = "".join(turn["text"] or "" for turn in t["turns"])
        rows.append(_row(bench, p, t["sample_idx"], 1, ok, float(ok), len(t["turns"]), calls, text, ""))
    return rows


def _row(bench, p, sample_idx, attempt, passed, score, turns, calls, completion, feedback, no_verdict=False):
    return {
        "benchmark": bench or p["source"],
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
        "no_verdict": no_verdict,  # the sandbox failed twice on the attempt: counted as not passed
    }


EVALUATORS = {"code": evaluate_code, "math": evaluate_math}


# --- entry -----------------------------------------------------------------------------------------------------
def _engine_for(params: EvalParams, checkpoint: str | None):
    """The engine to evaluate ``checkpoint`` with: the process's live engine when it serves this checkpoint or
    one of the same architecture (its weights are swapped in place, runtime.engines.engine_for), else a new one."""
    from runtime import engines as engine_mod
    from runtime.models import resolve_model

    if not checkpoint:
        raise ValueError("evaluate needs inputs['checkpoint']: a model directory, 'tiny' or 'smollm2'")
    live = engine_mod.live_engine()
    if live is not None and live.backend == params.backend:
        options, seed = dict(live.options), live.seed  # same options: engine_for may reuse it
    else:
        options, seed = (
            ({"kv_cache_gib": params.kv_cache_gib} if params.backend == "vllm" else {}),
            params.seed,
        )
    return engine_mod.engine_for(resolve_model(checkpoint), backend=params.backend, seed=seed, **options)


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
    with live.exclusive():  # the checkpoint's weights stay in the engine for the whole evaluation
        t0 = time.perf_counter()
        eng = engine if engine is not None else _engine_for(params, inputs.get("checkpoint"))
        t_engine = time.perf_counter() - t0

        t1 = time.perf_counter()
        rows: list[dict] = []
        for kind, evaluate in EVALUATORS.items():
            subset = [p for p in problems if p["kind"] == kind]
            if subset:
                progress.report("evaluate", 0, len(problems), f"{len(subset)} {kind} problems")
                rows += evaluate(eng, subset, params, bench)
        progress.report("evaluate", len(problems), len(problems), "done")
        elapsed = time.perf_counter() - t1

    no_verdict = collections.Counter(r["benchmark"] for r in rows if r["no_verdict"])
    ref = write_table(rows, EVAL_RESULTS, out / "eval_results.parquet")
    metrics = summarize(
        rows, kinds=kinds, iterations=params.iterations, bootstrap=params.bootstrap, seed=params.seed
    )
    rate = len(problems) / max(elapsed, 1e-9) * 60.0  # whole evaluation (all benchmarks share the batches)
    for name in sorted({r["benchmark"] for r in rows}):
        metrics[f"eval/{bench_key(name)}/problems_per_min"] = rate
    metrics["timing/evaluate"] = elapsed
    metrics["timing/evaluate_engine"] = t_engine
    notes = [json.dumps({"benchmark": bench or "per source", "problems": len(problems), "rows": ref.rows})]
    for name, count in sorted(no_verdict.items()):
        metrics[f"eval/{bench_key(name)}/sandbox_errors"] = float(count)
        notes.append(
            f"{name}: {count} attempt(s) got no verdict (the sandbox failed on them twice): counted as not passed"
        )
        log.warning(notes[-1])
    return StageOutput(stage="evaluate", tables={"eval_results": ref}, metrics=metrics, notes=notes)
