"""What turn-level (GTPO) and feedback-tree (MURPHY) credit assignment cost over GRPO, outside generation.

    .venv/bin/python bench/bench_credit.py [--model tiny|smollm2|DIR] [--problems 4] [--group 4]
        [--max-new-tokens 64] [--repeat 2] [--pack] [--dtype auto|float32|bfloat16]

One iteration of each algorithm through the real stages (``flows.runner.run_stage``: run store, MLflow child
runs, the update in its own process), on the same synthetic func-synth problems (code with tests: trees need tests to grade nodes):

  1. GRPO vs GTPO on the SAME sampled completions: one trajectory rollout, then for each algorithm score →
     advantages → update on that table, --repeat times each (interleaved, best kept). The two differ only in
     what the credit assignment adds (turn rewards and returns, per-token advantages), so the ratio is exactly
     the overhead the papers call negligible.
  2. MURPHY vs GRPO per sampled completion: a tree rollout of the same problems with the same G (roots per
     tree); a tree samples more completions (retries under failed nodes), so its cost outside generation —
     rollout wall minus generate calls and sandbox, plus score, advantages, update — is divided by the number
     of completions it sampled (nodes) and compared with GRPO's per completion (turns), and per trained token.
     Beside it, the tokens per completion that an update must run at least (each problem's samples as one
     prefix trie: a tree's nodes carry their parents' attempts and the feedback as context, GRPO's do not).

``--pack`` runs every algorithm's update with ``shared_prefix=true`` and ``minibatch_by=problem`` (a group's
prompt, a tree's shared ancestry once per micro-batch: ``stages.update.prefix``); ``--dtype`` is the update's
(auto: bf16 on a CPU with native bf16 matmuls).

Target (issue 15): ≤ 1.05× outside generation. Printed with the load average, since this machine is shared.
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)

STAGES = ("score", "advantages", "update")


def params_for(model: str, root: str, algo: str, a) -> object:
    from schemas.params import PipelineParams
    from schemas.params.presets import tiny_pipeline

    body = tiny_pipeline(
        model,
        root,
        algo,
        run_id=f"credit-{algo}",
        iterations=1,
        data={"sources": ["synthetic:func-synth"], "synthetic_count": max(16, a.problems)},
        rollout={
            "group_size": a.group,
            "problems_per_iteration": a.problems,
            "max_new_tokens": a.max_new_tokens,
            "max_turns": 2,
            "tree_depth": 2,
        },
        advantages={"keep_zero_signal": True},  # same rows reach the update whatever the rewards
        update={
            "minibatch_size": 8,
            "micro_batch_size": 4,
            "dtype": a.dtype,
            **({"shared_prefix": True, "minibatch_by": "problem"} if a.pack else {}),
        },
    )
    return PipelineParams.model_validate(body)


class Run:
    """One run id in the bench's run root, driven stage by stage."""

    def __init__(self, params):
        from flows.runner import RunContext
        from flows.runstore import RunStore
        from flows.tracking import Tracker

        self.p = params
        RunStore(params.run_root, params.run_id).create_or_open(
            params.model_dump(mode="json", exclude={"run_id"})
        )
        tracker = Tracker(params.run_root)
        parent = tracker.start_parent(
            params.run_id, params.model_dump(mode="json"), {"algo": params.algorithm}
        )
        self.ctx = RunContext(
            root=params.run_root, run_id=params.run_id, algo=params.algorithm, mlflow_parent=parent
        )

    def stage(self, name: str, inputs: dict[str, str], it: int | None = 1):
        from flows.runner import params_field, run_stage

        return run_stage(name, getattr(self.p, params_field(name)), inputs, self.ctx, it)


def credit(run: Run, table: str, rolled: str, problems: str, checkpoint: str) -> dict[str, float]:
    """score → advantages → update of ``run`` on the rollout table ``rolled``: seconds per stage, trained tokens."""
    sc = run.stage("score", {table: rolled, "problems": problems})
    adv = run.stage("advantages", {table: sc.uri(table)})
    upd = run.stage("update", {"samples": adv.uri("samples"), "checkpoint": checkpoint})
    out = {s: o.metrics[f"timing/{s}"] for s, o in zip(STAGES, (sc, adv, upd), strict=True)}
    out["trained_tokens"] = upd.metrics.get("actor/trained_tokens", float("nan"))
    out["samples"] = float(adv.tables["samples"].rows)
    out["tokens"], out["unique_tokens"] = sample_tokens(adv.uri("samples"))
    return out


def sample_tokens(uri: str) -> tuple[float, float]:
    """(tokens of every training sequence, tokens of each problem's prefix trie): what a plain update runs
    through the model vs the least any update must (every distinct prefix of a group's or a tree's samples
    once; a node's feedback and ancestry are context it cannot skip)."""
    from runtime.tableio import read_table
    from schemas.tables import SAMPLES
    from stages.update.prefix import PrefixTrie

    rows = read_table(uri, SAMPLES).select(["problem_id", "input_ids"]).to_pylist()
    by: dict[str, list[list[int]]] = {}
    for r in rows:
        by.setdefault(r["problem_id"], []).append(r["input_ids"])
    return float(sum(len(r["input_ids"]) for r in rows)), float(sum(len(PrefixTrie(v)) for v in by.values()))


def best(rows: list[dict[str, float]]) -> dict[str, float]:
    return {k: min(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument(
        "--pack", action="store_true", help="shared_prefix + minibatch_by=problem in every update"
    )
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    a = ap.parse_args()
    from runtime.models import resolve_model

    root = tempfile.mkdtemp(prefix="bench-credit-")
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # checkpoints: GBs per run
    ckpt = str(resolve_model(a.model))
    load0 = os.getloadavg()[0]

    runs = {algo: Run(params_for(ckpt, root, algo, a)) for algo in ("grpo", "gtpo", "murphy")}
    data = runs["grpo"].stage("data", {}, None)
    problems = data.uri("problems")
    roll = runs["grpo"].stage("rollout", {"problems": problems, "checkpoint": ckpt, "iteration": "1"})
    completions = roll.metrics["rollout/turns_mean"] * roll.tables["trajectories"].rows
    same: dict[str, list[dict[str, float]]] = {"grpo": [], "gtpo": []}
    for _ in range(a.repeat):  # interleaved, so load drifts hit both
        for algo in same:
            same[algo].append(credit(runs[algo], "trajectories", roll.uri("trajectories"), problems, ckpt))
    g, t = best(same["grpo"]), best(same["gtpo"])

    m = runs["murphy"]
    trees = m.stage("rollout", {"problems": problems, "checkpoint": ckpt, "iteration": "1"})
    mu = best([credit(m, "trees", trees.uri("trees"), problems, ckpt) for _ in range(a.repeat)])
    nodes = trees.metrics["rollout/nodes"]

    def outside(r, cost):  # rollout seconds that are neither generation nor the sandbox
        return (
            r.metrics["timing/rollout"]
            - r.metrics["rollout/generate_s"]
            - r.metrics["rollout/sandbox_s"]
            - cost
        )

    g_roll = outside(roll, roll.metrics.get("timing/rollout_engine", 0.0))
    m_roll = outside(trees, trees.metrics.get("timing/rollout_engine", 0.0))
    g_tot, t_tot, m_tot = (sum(x[s] for s in STAGES) for x in (g, t, mu))

    print(
        f"model={a.model} problems={a.problems} G={a.group} max_new_tokens={a.max_new_tokens} "
        f"repeat={a.repeat} pack={a.pack} dtype={a.dtype}; load average {load0:.2f} at start, {os.getloadavg()[0]:.2f} at end"
    )
    print(
        f"\n1. same {completions:.0f} completions ({roll.tables['trajectories'].rows} trajectories), "
        f"best of {a.repeat}, seconds:"
    )
    print(f"   {'stage':<12}{'grpo':>9}{'gtpo':>9}{'ratio':>8}")
    for s in STAGES:
        print(f"   {s:<12}{g[s]:>9.3f}{t[s]:>9.3f}{t[s] / g[s]:>8.3f}")
    print(
        f"   {'total':<12}{g_tot:>9.3f}{t_tot:>9.3f}{t_tot / g_tot:>8.3f}   <- GTPO/GRPO outside generation"
    )
    print(
        f"   (advantages alone: GTPO adds {t['advantages'] - g['advantages']:+.3f}s; trained tokens "
        f"{g['trained_tokens']:.0f} vs {t['trained_tokens']:.0f})"
    )
    g_pc = (g_roll + g_tot) / completions
    m_pc = (m_roll + m_tot) / nodes
    g_pt, m_pt = g_tot / g["trained_tokens"], m_tot / mu["trained_tokens"]
    print(
        f"\n2. MURPHY trees: {nodes:.0f} completions ({trees.tables['trees'].rows} trees) vs GRPO {completions:.0f}"
    )
    print(
        f"   outside generation per completion: grpo {1e3 * g_pc:.1f} ms, murphy {1e3 * m_pc:.1f} ms, "
        f"ratio {m_pc / g_pc:.3f}"
    )
    print(
        f"   score+advantages+update per trained token: grpo {1e3 * g_pt:.3f} ms, murphy {1e3 * m_pt:.3f} ms, "
        f"ratio {m_pt / g_pt:.3f}"
    )
    for s in STAGES:
        print(f"   {s:<12} grpo {g[s]:>8.3f}s   murphy {mu[s]:>8.3f}s")
    print(
        f"   samples trained: grpo {g['samples']:.0f} ({g['trained_tokens']:.0f} tokens), "
        f"murphy {mu['samples']:.0f} ({mu['trained_tokens']:.0f} tokens)"
    )
    print(f"   rollout bookkeeping (not generate/sandbox/engine): grpo {g_roll:.2f}s, murphy {m_roll:.2f}s")
    g_u, m_u = g["unique_tokens"] / completions, mu["unique_tokens"] / nodes
    print(
        f"   tokens per completion, every sequence whole: grpo {g['tokens'] / completions:.0f}, murphy "
        f"{mu['tokens'] / nodes:.0f}; each problem's distinct prefixes once (the least an update runs): grpo "
        f"{g_u:.0f}, murphy {m_u:.0f}, ratio {m_u / g_u:.3f}"
    )


if __name__ == "__main__":
    main()
