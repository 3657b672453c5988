"""Rollout stage: sample the policy with execution feedback — TIR trajectories (GRPO/GTPO) or MURPHY trees.

    run(RolloutParams(kind="trajectories"), {"problems": ".../problems.parquet", "checkpoint": DIR, "iteration": "1"}, out)
        -> StageOutput(tables={"trajectories": ref})      # kind "trees": {"trees": ref}

Steps: read the problems table, take ``problems_per_iteration`` train problems chosen reproducibly from
(seed, iteration), drop the ones this rollout kind cannot use (empty prompt, unknown problem kind, trees without tests:
each named in a note, never a crash), get an engine (the process's live one when it serves this checkpoint or
one of the same architecture — weights pushed in place — else a new one, ``runtime.engines.engine_for``), roll
out (``tir.tir_trajectories`` / ``tree.refinement_trees``), write ``trajectories.parquet`` / ``trees.parquet``
through ``runtime.tableio`` with reward fields left null.

Metrics: rollout/tokens, rollout/tokens_per_s (generated tokens per second of generate calls),
rollout/sandbox_s, rollout/turns_mean, rollout/tool_valid_rate (TIR: valid tool calls / tool calls; tree:
nodes with a code block / nodes), rollout/pass_rate_depth_<d> (tree), rollout/problems,
rollout/problems_skipped, rollout/nodes (tree), timing/rollout, timing/rollout_engine.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from maths import prompts
from runtime.engines import SamplingSpec
from schemas.outputs import StageOutput
from schemas.params.rollout import RolloutParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES
from stages.rollout.tir import TirStats, tir_trajectories
from stages.rollout.tree import TreeStats, refinement_trees

log = logging.getLogger(__name__)

__all__ = ["run", "select_problems", "usable_problems", "tir_trajectories", "refinement_trees"]


def select_problems(problems: list[dict], k: int, seed: int, iteration: int) -> list[dict]:
    """``k`` train problems (all when fewer), the same for the same (seed, iteration)."""
    train = [p for p in problems if p.get("split") == "train"]
    if not train:
        raise ValueError(
            f"the problems table has no 'train' rows (splits: {sorted({p.get('split') for p in problems})})"
        )
    rng = np.random.default_rng([seed, iteration])
    idx = rng.choice(len(train), size=min(k, len(train)), replace=False)
    return [train[i] for i in sorted(idx)]


def usable_problems(problems: list[dict], kind: str) -> tuple[list[dict], list[str]]:
    """(problems this rollout kind can roll out, one note per skipped problem naming it and why)."""
    keep, notes = [], []
    for p in problems:
        pid = p.get("problem_id", "?")
        why = None
        try:
            prompts.task_text(p)
            prompts.system_text(p)
        except ValueError as e:
            why = str(e)
        if why is None and kind == "trees" and not p.get("tests"):
            why = f"problem {pid!r}: trees need tests, field 'tests' is empty"
        if why is None:
            keep.append(p)
        else:
            notes.append(f"skipped {why}")
            log.warning("rollout: skipped %s", why)
    return keep, notes


def _engine(params: RolloutParams, checkpoint: str):
    from runtime.engines import engine_for
    from runtime.models import resolve_model

    options = {"prefix_caching": params.prefix_caching}
    if params.backend == "vllm":
        options["kv_cache_gib"] = params.kv_cache_gib
    return engine_for(resolve_model(checkpoint), backend=params.backend, seed=params.seed, **options)


def _spec(params: RolloutParams, stop: list[str], iteration: int) -> SamplingSpec:
    return SamplingSpec(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop=stop,
        seed=params.seed * 1_000_003 + iteration * 10_007,
    )


def run(params: RolloutParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Roll out one iteration's problems with the checkpoint; see the module docstring."""
    from runtime.tableio import read_table, write_table

    for key in ("problems", "checkpoint"):
        if key not in inputs:
            raise KeyError(f"rollout stage needs input {key!r}; got {sorted(inputs)}")
    t_start = time.perf_counter()
    iteration = int(inputs.get("iteration", "0"))
    problems = read_table(inputs["problems"], PROBLEMS).to_pylist()
    chosen = select_problems(problems, params.problems_per_iteration, params.seed, iteration)
    usable, notes = usable_problems(chosen, params.kind)
    if not usable:
        raise ValueError(f"rollout: none of the {len(chosen)} selected problems is usable: {notes}")
    t0 = time.perf_counter()
    engine = _engine(params, inputs["checkpoint"])
    t_engine = time.perf_counter() - t0
    limit = min(params.max_context_tokens, engine.max_model_len)
    prefix = f"it{iteration}/"
    out = Path(out)
    if params.kind == "trajectories":
        stats = TirStats()
        rows = tir_trajectories(
            engine,
            usable,
            group_size=params.group_size,
            max_turns=params.max_turns,
            spec=_spec(params, list(prompts.TIR_STOP), iteration),
            max_context_tokens=limit,
            observation_max_chars=params.observation_max_chars,
            exec_timeout_s=params.exec_timeout_s,
            group_prefix=prefix,
            stats=stats,
            progress_stage="rollout",
        )
        name, ref = "trajectories", write_table(rows, TRAJECTORIES, out / "trajectories.parquet")
        turns = [len(r["turns"]) for r in rows]
        metrics = {
            "rollout/turns_mean": float(np.mean(turns)) if turns else 0.0,
            "rollout/tool_valid_rate": stats.valid_calls / stats.tool_calls if stats.tool_calls else 0.0,
            "rollout/tool_calls_per_trajectory": stats.tool_calls / len(rows) if rows else 0.0,
        }
    else:
        stats = TreeStats()
        rows = refinement_trees(
            engine,
            usable,
            group_size=params.group_size,
            child_group_size=params.child_group_size,
            depth=params.tree_depth,
            spec=_spec(params, list(prompts.CODE_STOP) if params.stop_after_code else [], iteration),
            max_nodes_per_tree=params.max_nodes_per_tree,
            max_nodes_per_batch=params.max_nodes_per_batch,
            max_context_tokens=limit,
            feedback_max_chars=params.observation_max_chars,
            exec_timeout_s=params.exec_timeout_s,
            id_prefix=prefix,
            stats=stats,
            progress_stage="rollout",
        )
        notes += stats.notes
        name, ref = "trees", write_table(rows, TREES, out / "trees.parquet")
        metrics = {
            "rollout/nodes": float(stats.nodes),
            "rollout/turns_mean": float(
                np.mean([max((n["depth"] for n in r["nodes"]), default=0) for r in rows])
            ),
            "rollout/tool_valid_rate": stats.with_code / stats.nodes if stats.nodes else 0.0,
            "rollout/trees_truncated": float(sum(r["truncated"] for r in rows)),
        }
        for d, (passed, total) in sorted(stats.passed_by_depth.items()):
            metrics[f"rollout/pass_rate_depth_{d}"] = passed / total if total else 0.0
    metrics.update(
        {
            "rollout/tokens": float(stats.tokens),
            "rollout/tokens_per_s": stats.tokens / stats.generate_s if stats.generate_s else 0.0,
            "rollout/generate_s": stats.generate_s,
            "rollout/sandbox_s": stats.sandbox_s,
            "rollout/problems": float(len(usable)),
            "rollout/problems_skipped": float(len(chosen) - len(usable)),
            "timing/rollout_engine": t_engine,
            "timing/rollout": time.perf_counter() - t_start,
        }
    )
    return StageOutput(stage="rollout", tables={name: ref}, metrics=metrics, notes=notes)
