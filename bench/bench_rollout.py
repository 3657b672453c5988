"""Rollout throughput: vLLM vs the transformers backend on one TIR workload, and MURPHY trees with vLLM's
prefix caching on vs off — each pair measured in the same run, reported as a ratio.

    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python bench/bench_rollout.py \\
        [--model smollm2|tiny|DIR] [--problems 4] [--group 4] [--max-new-tokens 128] [--skip-hf] [--json OUT]

Workloads (deterministic): TIR = ``synthetic:tool-arith`` problems, G samples, up to ``--turns`` turns;
trees = ``synthetic:func-synth`` problems, G roots, G' = G children per failed node, depth ``--depth``.
tokens/s = generated tokens / seconds inside ``engine.generate`` (the sandbox time is reported apart).
Sampling is seeded, but the two backends sample different tokens, so token counts differ a little.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)

from maths import prompts  # noqa: E402
from runtime.engines import SamplingSpec, make_engine  # noqa: E402
from stages.rollout.tir import TirStats, tir_trajectories  # noqa: E402
from stages.rollout.tree import TreeStats, refinement_trees  # noqa: E402


def tir_workload(engine, problems, args) -> dict:
    stats = TirStats()
    spec = SamplingSpec(temperature=1.0, max_tokens=args.max_new_tokens, stop=prompts.TIR_STOP, seed=0)
    t0 = time.perf_counter()
    rows = tir_trajectories(
        engine, problems, group_size=args.group, max_turns=args.turns, spec=spec, stats=stats
    )
    wall = time.perf_counter() - t0
    return {
        "trajectories": len(rows),
        "tokens": stats.tokens,
        "generate_s": round(stats.generate_s, 2),
        "sandbox_s": round(stats.sandbox_s, 2),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(stats.tokens / stats.generate_s, 1),
        "tool_calls": stats.tool_calls,
    }


def tree_workload(engine, problems, args) -> dict:
    stats = TreeStats()
    spec = SamplingSpec(temperature=1.0, max_tokens=args.max_new_tokens, stop=prompts.CODE_STOP, seed=0)
    t0 = time.perf_counter()
    refinement_trees(
        engine, problems, group_size=args.group, child_group_size=args.group, depth=args.depth, spec=spec,
        max_nodes_per_tree=256, max_nodes_per_batch=4096, stats=stats,
    )  # fmt: skip
    wall = time.perf_counter() - t0
    return {
        "nodes": stats.nodes,
        "tokens": stats.tokens,
        "generate_s": round(stats.generate_s, 2),
        "sandbox_s": round(stats.sandbox_s, 2),
        "wall_s": round(wall, 2),
        "tokens_per_s": round(stats.tokens / stats.generate_s, 1),
        "pass_by_depth": {d: f"{p}/{t}" for d, (p, t) in stats.passed_by_depth.items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=4)
    ap.add_argument("--group", type=int, default=4)
    ap.add_argument("--turns", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--skip-hf", action="store_true", help="skip the transformers backend")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from runtime.models import resolve_model
    from stages.data.synthetic import generate

    model = resolve_model(args.model)
    math = generate("tool-arith", count=args.problems, seed=0, difficulty=1)
    code = generate("func-synth", count=args.problems, seed=0, difficulty=1)
    res: dict = {"model": str(model), "args": vars(args) | {"json": str(args.json)}}

    t0 = time.perf_counter()
    vllm = make_engine(model, backend="vllm", seed=0, prefix_caching=True)
    res["vllm_build_s"] = round(time.perf_counter() - t0, 1)
    vllm.generate(
        [prompts.initial_prompt_ids(vllm.tokenizer, math[0])], SamplingSpec(max_tokens=4)
    )  # warm-up
    res["tir_vllm"] = tir_workload(vllm, math, args)
    print("tir vllm", res["tir_vllm"], flush=True)
    res["tree_vllm_prefix_on"] = tree_workload(vllm, code, args)
    print("tree prefix on", res["tree_vllm_prefix_on"], flush=True)
    vllm.close()

    t0 = time.perf_counter()
    off = make_engine(model, backend="vllm", seed=0, prefix_caching=False)
    res["vllm_build_s_2"] = round(time.perf_counter() - t0, 1)
    off.generate([prompts.initial_prompt_ids(off.tokenizer, math[0])], SamplingSpec(max_tokens=4))
    res["tree_vllm_prefix_off"] = tree_workload(off, code, args)
    print("tree prefix off", res["tree_vllm_prefix_off"], flush=True)
    off.close()
    res["ratio_prefix_on_vs_off_tokens_per_s"] = round(
        res["tree_vllm_prefix_on"]["tokens_per_s"] / res["tree_vllm_prefix_off"]["tokens_per_s"], 2
    )

    if not args.skip_hf:
        hf = make_engine(model, backend="transformers", seed=0, batch_size=args.problems * args.group)
        res["tir_transformers"] = tir_workload(hf, math, args)
        print("tir transformers", res["tir_transformers"], flush=True)
        hf.close()
        res["ratio_vllm_vs_transformers_tokens_per_s"] = round(
            res["tir_vllm"]["tokens_per_s"] / res["tir_transformers"]["tokens_per_s"], 2
        )
    print(json.dumps(res, indent=2))
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
