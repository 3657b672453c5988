"""The rollout fanned out over a Ray cluster: ``rollout.workers`` engine actors, each rolling out a shard of the
problems with the same code as the in-process stage (``stages.rollout.shard``), rows gathered in problem order.

    connect(params)                                         # before any work: one-line error when unreachable
    rows, stats, workers = fan_out(params, problems, checkpoint, iteration)

Shards: problems with the same prompt stay together (their samples are told apart by rank, see
``stages.rollout.seeding``), and so does each problem's group of G samples; shards are contiguous runs of the
problem list, as even as that allows (fewer shards than workers when there are fewer distinct prompts). Each
actor builds its engine from the checkpoint path (shared storage on a multi-node cluster) and keeps it between
iterations: the next iteration's checkpoint is pushed into it in place (``runtime.engines.engine_for``), as in
one process. ``release()`` ends the actors. Seeds make the gathered rows the in-process rows for the same seed:
a TIR turn's seed is keyed by its trajectory's global index (each shard is told its problems' positions),
a tree node's by its content (``stages.rollout.seeding``). Statistics are summed, except seconds, which are the slowest shard's (the shards run at once).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time

from maths import prompts
from runtime import rayfan
from schemas.params.rollout import RolloutParams
from stages.rollout.tir import TirStats
from stages.rollout.tree import TreeStats

log = logging.getLogger(__name__)

_ACTORS: dict[tuple, list] = {}  # (cluster, actor resources, engine options) -> live actors


class EngineWorker:
    """A Ray actor holding one engine (built lazily on its first shard, reused after)."""

    def where(self) -> dict:
        return rayfan.where()

    def rollout(self, params: dict, problems: list[dict], checkpoint: str, iteration: int, positions=None):
        from stages.rollout.shard import build_engine, rollout_rows

        p = RolloutParams.model_validate(params)
        t0 = time.perf_counter()
        engine = build_engine(p, checkpoint)
        engine_s = time.perf_counter() - t0
        rows, stats = rollout_rows(engine, problems, p, iteration, progress_stage=None, positions=positions)
        return rows, dataclasses.asdict(stats), {**rayfan.where(), "engine_s": engine_s}


def connect(params: RolloutParams) -> str:
    """Connect to the configured cluster; a new local one gets this machine's CPUs plus the actors' own."""
    extra = params.workers * params.worker_cpus
    return rayfan.connect(params.ray_address, num_cpus=len(os.sched_getaffinity(0)) + extra)


def shard_problems(problems: list[dict], n: int) -> list[list[int]]:
    """Indices of ``problems`` in at most ``n`` contiguous, non-empty shards; equal prompts share a shard."""
    if n < 1:
        raise ValueError(f"rollout.workers must be >= 1, got {n}")
    groups: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        key = (p.get("kind"), prompts.system_text(p), prompts.task_text(p))
        groups.setdefault(key, []).append(i)
    shards: list[list[int]] = []
    left, target = len(problems), 0
    for unit in groups.values():
        if not shards or (len(shards[-1]) >= target and len(shards) < n):
            target = -(-left // (n - len(shards)))  # an even share of what is left over the shards left
            shards.append([])
        shards[-1] += unit
        left -= len(unit)
    return shards


def _actors(params: RolloutParams, cluster: str, n: int) -> list:
    import ray

    key = (
        cluster,
        params.worker_cpus,
        params.worker_gpus,
        params.backend,
        params.tensor_parallel_size,
        params.data_parallel_size,
    )
    live = _ACTORS.get(key, [])
    if len(live) < n:
        for other in [k for k in _ACTORS if k != key]:
            release(other)
        cls = ray.remote(EngineWorker).options(num_cpus=params.worker_cpus, num_gpus=params.worker_gpus)
        live = _ACTORS[key] = live + [cls.remote() for _ in range(n - len(live))]
    return live[:n]


def release(key: tuple | None = None) -> None:
    """End the engine actors (of one configuration, or all)."""
    import ray

    for k in [key] if key is not None else list(_ACTORS):
        for actor in _ACTORS.pop(k, []):
            ray.kill(actor)


def merge_stats(kind: str, parts: list[dict]):
    """One TirStats/TreeStats from the shards' (as dicts): counts summed, seconds the slowest shard's."""
    stats = TirStats() if kind == "trajectories" else TreeStats()
    for part in parts:
        for f in dataclasses.fields(stats):
            have, add = getattr(stats, f.name), part[f.name]
            if f.name == "passed_by_depth":
                for d, (passed, total) in add.items():
                    cur = have.setdefault(int(d), [0, 0])
                    cur[0], cur[1] = cur[0] + passed, cur[1] + total
            elif isinstance(have, list):
                have += add
            elif f.name.endswith("_s"):
                setattr(stats, f.name, max(have, add))
            else:
                setattr(stats, f.name, have + add)
    return stats


def fan_out(
    params: RolloutParams, problems: list[dict], checkpoint: str, iteration: int
) -> tuple[list[dict], TirStats | TreeStats, list[dict]]:
    """(rows in problem order, merged stats, one {pid, node_id, host, engine_s, problems} per shard)."""
    import ray

    cluster = connect(params)
    shards = shard_problems(problems, params.workers)
    actors = _actors(params, cluster, len(shards))
    dumped = params.model_dump()
    calls = [
        actor.rollout.remote(dumped, [problems[i] for i in shard], checkpoint, iteration, shard)
        for actor, shard in zip(actors, shards, strict=True)
    ]
    per_problem = params.group_size if params.kind == "trajectories" else 1
    by_problem: list[list[dict] | None] = [None] * len(problems)
    parts, workers = [], []
    try:
        results = ray.get(calls)
    except Exception:
        release()  # a dead or failed actor is not reused: the next rollout builds fresh ones
        raise
    for shard, (rows, stats, info) in zip(shards, results, strict=True):
        if len(rows) != per_problem * len(shard):
            raise RuntimeError(f"rollout worker {info}: {len(rows)} rows for {len(shard)} problems")
        for j, i in enumerate(shard):
            by_problem[i] = rows[j * per_problem : (j + 1) * per_problem]
        parts.append(stats)
        workers.append({**info, "problems": len(shard)})
    rows = [r for chunk in by_problem for r in chunk or []]
    return rows, merge_stats(params.kind, parts), workers
