"""Sandbox batches as Ray tasks: a batch of programs split into contiguous chunks, each chunk one Ray task
that runs it through ``runtime.sandbox.execute_many`` / ``run_tests_many`` on its worker's own pool, so every
program still runs under that node's bubblewrap isolation (uid slot, namespaces, limits), never in the Ray
worker's interpreter. Results come back in input order, the same records as in-process.

    batches = RayBatches(address=None, chunks=None, num_cpus=1)   # address: see runtime.rayfan.connect
    results = execute_many(codes, pool=batches)                   # or batches.execute_many(codes, ...)
    results.workers                                               # [{pid, node_id, host}] of each chunk's task
"""

from __future__ import annotations

from collections.abc import Sequence

from runtime import rayfan
from runtime.sandbox.pool import default_pool
from runtime.sandbox.records import ExecutionResult, TestReport


class Batched(list):
    """Results in input order, plus ``workers``: where each chunk ran."""

    workers: list[dict]


def _chunk(kind: str, jobs: list[tuple], kw: dict) -> tuple[list, dict]:
    """Runs in a Ray worker: the chunk through this node's sandbox pool (what ``execute_many`` /
    ``run_tests_many`` do in one process), results in order."""
    pool = default_pool()
    if kind == "execute":
        futures = [pool.submit_execute(code, stdin=stdin, **kw) for code, stdin in jobs]
    else:
        futures = [pool.submit_run_tests(p, t, entry_point=e, **kw) for p, t, e in jobs]
    return [f.result() for f in futures], rayfan.where()


class RayBatches:
    """Where ``execute_many`` / ``run_tests_many`` send a batch when given as their ``pool``.

    ``chunks``: tasks per batch (default: the cluster's CPUs / ``num_cpus``); ``num_cpus``: Ray CPUs per task
    (each task's sandbox pool runs ``TURNTREE_SANDBOX_WORKERS`` or its node's CPUs programs at once)."""

    batches_on_ray = True

    def __init__(self, address: str | None = None, *, chunks: int | None = None, num_cpus: float = 1) -> None:
        if chunks is not None and chunks < 1:
            raise ValueError(f"sandbox Ray batches need chunks >= 1, got {chunks}")
        if num_cpus <= 0:
            raise ValueError(f"sandbox Ray batches need num_cpus > 0, got {num_cpus}")
        self.address, self.chunks, self.num_cpus = address, chunks, num_cpus

    def _run(self, kind: str, jobs: list[tuple], kw: dict) -> Batched:
        import ray

        rayfan.connect(self.address)
        if not jobs:
            out = Batched()
            out.workers = []
            return out
        n = self.chunks or max(1, int(ray.cluster_resources().get("CPU", 1) // self.num_cpus))
        n = min(n, len(jobs))
        size = -(-len(jobs) // n)
        task = ray.remote(_chunk).options(num_cpus=self.num_cpus, max_retries=0)
        refs = [task.remote(kind, jobs[i : i + size], kw) for i in range(0, len(jobs), size)]
        out = Batched()
        out.workers = []
        for results, where in ray.get(refs):
            out += results
            out.workers.append(where)
        return out

    def execute_many(
        self, codes: Sequence[str], *, stdins: Sequence[str | None], timeout_s: float, memory_mb: int
    ) -> list[ExecutionResult]:
        jobs = list(zip(codes, stdins, strict=True))
        return self._run("execute", jobs, {"timeout_s": timeout_s, "memory_mb": memory_mb})

    def run_tests_many(
        self,
        programs: Sequence[str],
        tests: Sequence[list[str]],
        *,
        entry_points: Sequence[str | None],
        timeout_s: float,
        memory_mb: int,
    ) -> list[TestReport]:
        jobs = [(p, list(t), e) for p, t, e in zip(programs, tests, entry_points, strict=True)]
        return self._run("tests", jobs, {"timeout_s": timeout_s, "memory_mb": memory_mb})
