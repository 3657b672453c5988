"""Row builders for small hand-made problems / trajectories / trees tables (score and advantages tests)."""

from __future__ import annotations

from collections.abc import Sequence


def problem(pid: str, kind: str = "math", *, answer=None, tests=None, entry_point=None) -> dict:
    return {
        "problem_id": pid,
        "source": "synthetic:test",
        "kind": kind,
        "prompt": f"task {pid}",
        "entry_point": entry_point,
        "tests": tests,
        "test_format": "asserts" if tests else "none",
        "answer": answer,
        "reference_solution": None,
        "demonstration": None,
        "difficulty": None,
        "split": "train",
        "meta": None,
    }


def turn(
    comp: Sequence[int],
    obs: Sequence[int] = (),
    *,
    lp: Sequence[float] | None = None,
    tool_call: str = "valid",
    exec_status: str = "ok",
    code: str | None = None,
    turn_reward: float | None = None,
    idx: int = 0,
) -> dict:
    return {
        "turn_idx": idx,
        "completion_token_ids": list(comp),
        "completion_logprobs": list(lp) if lp is not None else [-0.5] * len(comp),
        "observation_token_ids": list(obs),
        "text": None,
        "code": code,
        "tool_call": tool_call,
        "exec_status": exec_status,
        "exec_output": None,
        "turn_reward": turn_reward,
    }


def trajectory(
    tid: str,
    pid: str,
    gid: str,
    turns: list[dict],
    *,
    prompt: Sequence[int] = (1, 2),
    final_answer: str | None = None,
    reward: float | None = None,
    idx: int = 0,
) -> dict:
    for j, t in enumerate(turns):
        t["turn_idx"] = j
    return {
        "trajectory_id": tid,
        "problem_id": pid,
        "group_id": gid,
        "sample_idx": idx,
        "prompt_token_ids": list(prompt),
        "turns": turns,
        "final_answer": final_answer,
        "stop_reason": "answer",
        "correct": None,
        "reward": reward,
        "reward_components": None,
    }


def node(
    node_id: int,
    parent_id: int,
    *,
    depth: int = 1,
    prompt: Sequence[int] = (1,),
    comp: Sequence[int] = (7, 8),
    passed: int | None = None,
    total: int | None = None,
    reward: float | None = None,
    code: str | None = None,
) -> dict:
    return {
        "node_id": node_id,
        "parent_id": parent_id,
        "depth": depth,
        "prompt_token_ids": list(prompt),
        "completion_token_ids": list(comp),
        "completion_logprobs": [-0.25] * len(comp),
        "text": None,
        "code": code,
        "exec_result": None,
        "tests_passed": passed,
        "tests_total": total,
        "reward": reward,
        "ret": None,
        "pruned": False,
    }


def tree(tree_id: str, pid: str, nodes: list[dict]) -> dict:
    return {"tree_id": tree_id, "problem_id": pid, "nodes": nodes, "truncated": False}
