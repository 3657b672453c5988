"""Rollout stage: sample the policy with execution feedback — TIR trajectories (GRPO/GTPO) or MURPHY trees.

    run(RolloutParams(kind="trajectories"), {"problems": ".../problems.parquet", "checkpoint": DIR, "iteration": "1"}, out)
        -> StageOutput(tables={"trajectories": ref})      # kind "trees": {"trees": ref}

Steps: read the problems table, take ``problems_per_iteration`` train problems chosen reproducibly from
(seed, iteration), drop the ones this rollout kind cannot use (empty prompt, unknown problem kind, trees without tests:
each named in a note, never a crash), get an engine (the process's live one when it serves this checkpoint or
one of the same architecture — weights pushed in place — else a new one, ``runtime.engines.engine_for``), roll
out (``tir.tir_trajectories`` / ``tree.refinement_trees``, through ``shard.rollout_rows``), write ``trajectories.parquet`` / ``trees.parquet``
through ``runtime.tableio`` with reward fields left null.

``rollout.workers`` > 1: the problems are split into shards rolled out by that many engine actors on a Ray
cluster (``fanout``), each running the same ``shard.rollout_rows``; the rows come back in problem order and
with per-request seeding (``seeding``) they are the rows this process would write for the same seed.

Metrics: rollout/tokens, rollout/tokens_per_s (generated tokens per second of generate calls),
rollout/sandbox_s, rollout/turns_mean, rollout/tool_valid_rate (TIR: valid tool calls / tool calls; tree:
nodes with a code block / nodes), rollout/pass_rate_depth_<d> (tree), rollout/problems,
rollout/problems_skipped, rollout/nodes (tree), response lengths, truncation and stop reasons
(``health.length_metrics``), timing/rollout, timing/rollout_engine (the slowest actor's with
workers), rollout/ray_workers (distinct Ray worker processes; workers > 1 only, each named in a note).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from maths import prompts
from runtime.engines import live
from schemas.outputs import StageOutput
from schemas.params.rollout import RolloutParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES
from stages.rollout.health import length_metrics
from stages.rollout.shard import build_engine, rollout_rows
from stages.rollout.tir import tir_trajectories
from stages.rollout.tree import refinement_trees

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


def run(params: RolloutParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Roll out one iteration's problems with the checkpoint; see the module docstring."""
    from runtime.tableio import read_table, write_table

    for key in ("problems", "checkpoint"):
        if key not in inputs:
            raise KeyError(f"rollout stage needs input {key!r}; got {sorted(inputs)}")
    if params.workers > 1:  # the cluster first: an unreachable address fails before any work
        from stages.rollout.fanout import connect

        connect(params)
    t_start = time.perf_counter()
    iteration = int(inputs.get("iteration", "0"))
    problems = read_table(inputs["problems"], PROBLEMS).to_pylist()
    chosen = select_problems(problems, params.problems_per_iteration, params.seed, iteration)
    usable, notes = usable_problems(chosen, params.kind)
    if not usable:
        raise ValueError(f"rollout: none of the {len(chosen)} selected problems is usable: {notes}")
    workers: list[dict] = []
    if params.workers > 1:
        from stages.rollout.fanout import fan_out

        rows, stats, workers = fan_out(params, usable, inputs["checkpoint"], iteration)
        t_engine = max(w["engine_s"] for w in workers)
        notes += [
            f"rollout shard {k}: {w['problems']} problems on Ray worker pid {w['pid']} node {w['node_id']} "
            f"({w['host']})"
            for k, w in enumerate(workers)
        ]
    else:
        with live.exclusive():  # the engine's weights stay this checkpoint's for the whole rollout
            t0 = time.perf_counter()
            engine = build_engine(params, inputs["checkpoint"])
            t_engine = time.perf_counter() - t0
            rows, stats = rollout_rows(engine, usable, params, iteration)
    version = int(inputs["policy_version"]) if "policy_version" in inputs else None  # None: not recorded
    for r in rows:
        r["policy_version"] = version
    out = Path(out)
    if params.kind == "trajectories":
        name, ref = "trajectories", write_table(rows, TRAJECTORIES, out / "trajectories.parquet")
        turns = [len(r["turns"]) for r in rows]
        metrics = {
            "rollout/turns_mean": float(np.mean(turns)) if turns else 0.0,
            "rollout/tool_valid_rate": stats.valid_calls / stats.tool_calls if stats.tool_calls else 0.0,
            "rollout/tool_calls_per_trajectory": stats.tool_calls / len(rows) if rows else 0.0,
        }
    else:
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
    metrics.update(length_metrics(rows, params.kind, params.max_new_tokens))
    if workers:
        metrics["rollout/ray_workers"] = float(len({(w["node_id"], w["pid"]) for w in workers}))
    return StageOutput(stage="rollout", tables={name: ref}, metrics=metrics, notes=notes)
