"""MURPHY feedback-conditioned refinement trees: G attempts per problem, G' repairs per failed attempt.

Depth 1: the task prompt, sampled G times (one request with n = G, so the prompt is prefilled once). Every
node's program (its last code block) runs against the problem's tests in the sandbox pool; the node keeps
``tests_passed``, ``tests_total`` and ``exec_result`` (``runtime.sandbox.feedback_text``). A failed node at
depth d < S gets G' children whose prompt is ``prompts.feedback_prompt_ids`` = task prompt + the node's
completion ids + a feedback turn; passed nodes are leaves. All nodes of one depth across all trees are one
``engine.generate`` call and one ``run_tests_many`` batch. Children share their parent's prompt prefix, which
vLLM's prefix cache serves without recomputing.

Budgets: ``max_nodes_per_tree`` and ``max_nodes_per_batch``; a failed node whose children would exceed either
gets none, its tree is marked ``truncated``, and one log line (and stage note) says so.

Node sample layout (what ``maths.samples`` rebuilds): ``prompt_token_ids`` [mask 0] +
``completion_token_ids`` [mask 1].
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from maths import prompts
from runtime import progress
from runtime.engines import SamplingSpec
from schemas.params.rollout import RolloutParams

_DEFAULTS = RolloutParams()  # the one place rollout defaults are declared

log = logging.getLogger(__name__)

NO_CODE_FEEDBACK = "No complete ```python code block was found in your answer, so no test could run."


@dataclass
class TreeStats:
    tokens: int = 0
    generate_s: float = 0.0
    sandbox_s: float = 0.0
    nodes: int = 0
    with_code: int = 0
    passed_by_depth: dict[int, list[int]] = field(default_factory=dict)  # depth -> [passed, total]
    notes: list[str] = field(default_factory=list)


@dataclass
class Tree:
    problem: dict
    tree_id: str
    nodes: list[dict] = field(default_factory=list)
    truncated: bool = False


def _node(tree: Tree, parent_id: int, depth: int, prompt_ids: list[int], gen) -> dict:
    node = {
        "node_id": len(tree.nodes),
        "parent_id": parent_id,
        "depth": depth,
        "prompt_token_ids": prompt_ids,
        "completion_token_ids": gen.token_ids,
        "completion_logprobs": gen.logprobs,
        "text": gen.text,
        "code": prompts.extract_code(gen.text),
        "exec_result": None,
        "tests_passed": None,
        "tests_total": None,
        "reward": None,
        "ret": None,
        "pruned": False,
        "no_verdict": None,
    }
    tree.nodes.append(node)
    return node


def _grade(nodes: list[tuple[Tree, dict]], timeout_s: float, max_chars: int, stats: TreeStats) -> None:
    """Run every node's program against its problem's tests (one sandbox batch); fill the test fields."""
    from runtime.sandbox import feedback_text, run_tests_many

    t0 = time.perf_counter()
    reports = run_tests_many(
        [n["code"] or "" for _, n in nodes],
        [list(t.problem["tests"]) for t, _ in nodes],
        entry_points=[t.problem.get("entry_point") for t, _ in nodes],
        timeout_s=timeout_s,
        retries=1,
    )
    stats.sandbox_s += time.perf_counter() - t0
    for (_, n), rep in zip(nodes, reports, strict=True):
        n["no_verdict"] = bool(rep.sandbox_failed)
        if rep.sandbox_failed:  # failed twice, no verdict on the program: left null (score re-runs it)
            n["tests_passed"], n["tests_total"] = None, None
        else:
            n["tests_passed"], n["tests_total"] = int(rep.passed), int(rep.total)
        fb = feedback_text(rep, max_chars=max_chars)
        n["exec_result"] = fb if n["code"] else f"{NO_CODE_FEEDBACK}\n{fb}"
        counts = stats.passed_by_depth.setdefault(n["depth"], [0, 0])
        counts[0] += int(rep.all_passed)
        counts[1] += 1


def _passed(node: dict) -> bool:
    return bool(node["tests_total"]) and node["tests_passed"] == node["tests_total"]


def refinement_trees(
    engine,
    problems: list[dict],
    *,
    group_size: int,
    child_group_size: int | None,
    depth: int,
    spec: SamplingSpec,
    max_nodes_per_tree: int,
    max_nodes_per_batch: int,
    max_context_tokens: int | None = None,
    feedback_max_chars: int = 1500,
    exec_timeout_s: float = _DEFAULTS.exec_timeout_s,
    id_prefix: str = "",
    stats: TreeStats | None = None,
    progress_stage: str | None = None,
) -> list[dict]:
    """Rows of ``schemas.tables.TREES`` (reward / ret None, pruned False), one tree per problem
    (``progress_stage``: report each finished depth to ``runtime.progress`` under that name).

    Problems must be code problems with tests (``stages.rollout.usable_problems`` filters the others).
    """
    stats = stats if stats is not None else TreeStats()
    tok = engine.tokenizer
    limit = max_context_tokens or getattr(engine, "max_model_len", None) or 1 << 30
    g_child = child_group_size or group_size
    trees = [Tree(p, f"{id_prefix}{p['problem_id']}") for p in problems]
    # (tree, parent_id, prompt ids, n) requests of the current depth
    requests: list[tuple[Tree, int, list[int], int]] = []
    for t in trees:
        n = min(group_size, max_nodes_per_tree, max(0, max_nodes_per_batch - len(requests) * group_size))
        if n < group_size:
            _truncate(t, f"tree {t.tree_id}: node budget allows {n} of {group_size} roots", stats)
        if n:
            requests.append((t, -1, prompts.initial_prompt_ids(tok, t.problem), n))
    total_nodes = 0
    for d in range(1, depth + 1):
        if not requests:
            break
        if progress_stage:
            progress.report(progress_stage, d - 1, depth, f"depth {d}: {sum(r[3] for r in requests)} nodes")
        specs = [
            SamplingSpec(
                n=n,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=max(1, min(spec.max_tokens, limit - len(ids))),
                stop=list(spec.stop),
                seed=None if spec.seed is None else spec.seed + 7919 * d + 131 * k,
            )
            for k, (_, _, ids, n) in enumerate(requests)
        ]
        t0 = time.perf_counter()
        outs = engine.generate([ids for _, _, ids, _ in requests], specs)
        stats.generate_s += time.perf_counter() - t0
        new: list[tuple[Tree, dict]] = []
        for (t, parent, ids, _), gens in zip(requests, outs, strict=True):
            for g in gens:
                new.append((t, _node(t, parent, d, ids, g)))
                stats.tokens += len(g.token_ids)
        total_nodes += len(new)
        stats.nodes += len(new)
        stats.with_code += sum(n["code"] is not None for _, n in new)
        _grade(new, exec_timeout_s, feedback_max_chars, stats)
        requests = []
        if d == depth:
            break
        for t, n in new:
            if _passed(n):
                continue
            room_tree = max_nodes_per_tree - len(t.nodes) - sum(r[3] for r in requests if r[0] is t)
            room_batch = max_nodes_per_batch - total_nodes - sum(r[3] for r in requests)
            k = min(g_child, room_tree, room_batch)
            if k < g_child:
                _truncate(
                    t, f"tree {t.tree_id}: node budget cut node {n['node_id']}'s children to {k}", stats
                )
            if k <= 0:
                continue
            child_prompt = prompts.feedback_prompt_ids(
                tok, t.problem, n["completion_token_ids"], n["exec_result"]
            )
            requests.append((t, n["node_id"], child_prompt, k))
    if progress_stage:
        progress.report(progress_stage, depth, depth, f"{total_nodes} nodes")
    return [_row(t) for t in trees]


def _truncate(t: Tree, message: str, stats: TreeStats) -> None:
    if not t.truncated:
        log.warning("max_nodes budget: %s", message)
        stats.notes.append(f"max_nodes budget: {message}")
    t.truncated = True


def _row(t: Tree) -> dict[str, Any]:
    return {
        "tree_id": t.tree_id,
        "problem_id": t.problem["problem_id"],
        "nodes": t.nodes,
        "truncated": t.truncated,
    }
