"""Asynchronous pipeline (``max_staleness``) against the synchronous one, on the main job.

    .venv/bin/python bench/bench_async.py [--config configs/default.yaml] [--iterations 3] [--seeds 0]
                                          [--root runs-bench] [--set KEY=VALUE ...]

Runs the real ``turntree run`` (subprocesses, the CLI a user runs) once per configuration and seed, each on a
fresh run id, after one run that fills the warm-start cache (so no configuration pays for the warm start):

- ``sync-1``: today's pipeline, the update on 1 thread (the default);
- ``sync-2``: the synchronous pipeline with the update on both cores (``update.cpu_threads=2``);
- ``async-1``: ``max_staleness=1``, the next rollout beside the update (1 thread each);
- ``async-2``: ``max_staleness=1`` with the update on both cores (it shares them with the rollout beside it).

Printed per configuration: wall time after the warm start, CPU use of the process tree (user + system over wall,
100% = one core), sampled completions per second, held-out accuracy at the last iteration; then the wall-time
ratio of ``async-1`` to the best synchronous configuration and the paired held-out difference (pooled over
seeds, problems × seeds, with its bootstrap CI and exact sign-test p) against ``sync-1``, whose samples follow the
same seeds. Timings depend on what else runs: the load average before and after each run is printed beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = {
    "sync-1": [],
    "sync-2": ["update.cpu_threads=2"],
    "async-1": ["max_staleness=1"],
    "async-2": ["max_staleness=1", "update.cpu_threads=2"],
}


def turntree(args: list[str], log: Path) -> tuple[float, float]:
    """Run ``turntree run ARGS``; (wall seconds, CPU seconds of the process tree)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.call(
            [str(REPO / ".venv" / "bin" / "turntree"), "run", *args], stdout=f, stderr=f, cwd=REPO
        )
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if rc != 0:
        raise SystemExit(f"turntree run {' '.join(args)} failed (exit {rc}); see {log}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu


def summary(root: Path, run_id: str, iterations: int) -> dict:
    from flows.runstore import RunStore
    from runtime.tableio import read_table
    from schemas import tables

    store = RunStore(str(root), run_id)
    manifest = store.load()
    stages = manifest["stages"]
    warm = sum(
        e["versions"][e["current"]]["output"]["metrics"].get("timing/warmstart", 0.0)
        for key, e in stages.items()
        if key == "warmstart"
    )
    completions = sum(
        store.current_output("rollout", k).tables["trajectories"].rows
        for k in range(1, iterations + 1)
        if f"iter-{k}/rollout" in stages
    )
    evals = read_table(store.current_output("evaluate", iterations).uri("eval_results"), tables.EVAL_RESULTS)
    per_problem = {}
    for row in evals.to_pylist():
        if row["attempt"] == 1:
            per_problem[row["problem_id"]] = per_problem.get(row["problem_id"], False) or row["passed"]
    return {"warmstart_s": warm, "completions": completions, "correct": per_problem}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/default.yaml")
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--seeds", default="0", help="comma-separated rollout seeds")
    ap.add_argument("--root", default="runs-bench")
    ap.add_argument("--set", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--only", default="", help="comma-separated configurations (default: all)")
    a = ap.parse_args()
    root = (REPO / a.root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = ["--config", a.config, "--root", str(root), "--set", f"iterations={a.iterations}"]
    base += [x for s in a.set for x in ("--set", s)]
    seeds = [int(s) for s in a.seeds.split(",")]
    names = [n for n in CONFIGS if not a.only or n in a.only.split(",")]

    print(f"warm-start cache: priming ({a.config})", flush=True)
    turntree(
        [*base, "--set", "iterations=1", "--set", f"run_id=bench-async-prime-{stamp}"], logs / "prime.log"
    )

    from maths.paired import paired_comparison  # the study's: bootstrap CI over problems + exact sign test

    rows, correct = {}, {}
    for name in names:
        for seed in seeds:
            run_id = f"bench-async-{name}-s{seed}-{stamp}"
            load0 = os.getloadavg()[0]
            sets = [x for s in CONFIGS[name] for x in ("--set", s)]
            wall, cpu = turntree([*base, *sets, "--set", f"rollout.seed={seed}", "--set", f"run_id={run_id}"],
                                 logs / f"{run_id}.log")  # fmt: skip
            s = summary(root, run_id, a.iterations)
            wall -= s["warmstart_s"]
            acc = sum(s["correct"].values()) / max(len(s["correct"]), 1)
            rows.setdefault(name, []).append(
                {
                    "wall_s": wall,
                    "cpu_pct": 100 * cpu / max(wall, 1e-9),
                    "completions_per_s": s["completions"] / wall,
                    "heldout": acc,
                    "load": (load0, os.getloadavg()[0]),
                }  # fmt: skip
            )
            correct.setdefault(name, {}).update({(seed, p): c for p, c in s["correct"].items()})
            r = rows[name][-1]
            print(
                f"{name:8s} seed {seed}: {r['wall_s']:7.1f} s after the warm start, CPU {r['cpu_pct']:4.0f}%, "
                f"{r['completions_per_s']:.2f} completions/s, held-out {acc:.3f} "
                f"(load {r['load'][0]:.1f} -> {r['load'][1]:.1f})",
                flush=True,
            )
    mean = {n: sum(r["wall_s"] for r in rs) / len(rs) for n, rs in rows.items()}
    sync = {n: w for n, w in mean.items() if n.startswith("sync")}
    best = min(sync, key=sync.get) if sync else None
    for name in [n for n in mean if n.startswith("async") and best]:
        print(f"\n{name} / best synchronous ({best}): wall time x{mean[name] / sync[best]:.2f}")
        base_name = next((n for n in ("sync-1", best) if n in correct), None)
        problems = sorted({p for _, p in correct[base_name]})

        def grid(name: str, problems: list = problems) -> list[list[float]]:
            return [[float(correct[name][seed, p]) for p in problems] for seed in seeds]

        diff = paired_comparison(grid(base_name), grid(name))
        print(f"held-out {name} - {base_name} (problems x seeds): {json.dumps(diff)}")
    print(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
