"""Rollout throughput: the rollout stage's TIR loop vs bare vLLM on the same requests, the continuous loop vs the
turn-by-turn (barrier) one — and, on request, MURPHY trees with prefix caching on vs off and the transformers
backend. Each pair is measured in the same run and reported as a ratio, with the load average beside it.

    OMP_NUM_THREADS=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 .venv/bin/python bench/bench_rollout.py \\
        [--model smollm2|tiny|DIR] [--problems 8] [--group 8] [--turns 3] [--max-new-tokens 256] \\
        [--difficulty 2] [--trees] [--hf] [--json OUT]

The default shape is the main job's (configs/default.yaml): synthetic tool-arith difficulty 2, 8 problems x G 8,
up to 3 turns of up to 256 tokens, temperature 1, the rollout stage's context limit, sandbox and observation
limits. A model that has been warm-started (e.g. a cached warm-start checkpoint directory) makes tool calls; a raw
one mostly answers at once.

- rollout (continuous / barrier): ``tir_trajectories`` as the rollout stage runs it; tokens/s = generated tokens /
  wall seconds of the whole loop (generation, sandbox and bookkeeping: what the stage costs).
- bare vLLM, same requests: every request the continuous rollout sent (each turn's context, its max_tokens and
  its seed) added to the engine at once and stepped to the end: the same tokens (per-request seeds), no
  dependencies between turns, no sandbox — what the engine does with that work in one batch.
- bare vLLM, first turns: ``engine.generate`` on the initial prompts x G, same sampling: one plain batch.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)

from maths import prompts  # noqa: E402
from runtime.engines import SamplingSpec, make_engine  # noqa: E402
from schemas.params.rollout import RolloutParams  # noqa: E402
from stages.rollout.tir import TirStats, tir_trajectories, turn_seed  # noqa: E402
from stages.rollout.tree import TreeStats, refinement_trees  # noqa: E402

DEFAULTS = RolloutParams()


def load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def tir_spec(args) -> SamplingSpec:
    return SamplingSpec(temperature=1.0, max_tokens=args.max_new_tokens, stop=prompts.TIR_STOP, seed=0)


def tir_workload(engine, problems, args, barrier: bool) -> tuple[dict, list[dict]]:
    stats = TirStats()
    rows = tir_trajectories(
        engine, problems, group_size=args.group, max_turns=args.turns, spec=tir_spec(args), stats=stats,
        max_context_tokens=min(DEFAULTS.max_context_tokens, engine.max_model_len), barrier=barrier,
    )  # fmt: skip
    turns = sum(len(r["turns"]) for r in rows)
    return {
        "trajectories": len(rows),
        "turns": turns,
        "tool_calls": stats.tool_calls,
        "valid_calls": stats.valid_calls,
        "tokens": stats.tokens,
        "wall_s": round(stats.wall_s, 2),
        "tokens_per_s": round(stats.tokens / stats.wall_s, 1),
        "engine_step_s": round(stats.generate_s, 2),
        "sandbox_only_wait_s": round(stats.sandbox_s, 2),
        "sandbox_overlapping_generation_s": round(stats.overlap_s(), 2),
        "load": load(),
    }, rows


def ids(rows) -> list:
    return [(r["trajectory_id"], [(t["completion_token_ids"], t["observation_token_ids"]) for t in r["turns"]])
            for r in rows]  # fmt: skip


def replay_requests(rows, args, limit: int) -> list[tuple[list[int], SamplingSpec]]:
    """Every turn request of ``rows`` as the rollout sent it: (context, spec with its seed)."""
    spec, out = tir_spec(args), []
    for index, r in enumerate(rows):
        ctx = list(r["prompt_token_ids"])
        for t in r["turns"]:
            seed = turn_seed(spec.seed, index, t["turn_idx"])
            max_tokens = min(spec.max_tokens, limit - len(ctx))
            out.append((ctx, SamplingSpec(temperature=1.0, max_tokens=max_tokens, stop=spec.stop, seed=seed)))
            ctx = ctx + t["completion_token_ids"] + t["observation_token_ids"]
    return out


def bare_replay(engine, requests) -> dict:
    tokens, t0 = 0, time.perf_counter()
    with engine.stream() as s:
        for k, (ctx, spec) in enumerate(requests):
            s.add(k, ctx, spec)
        while s.pending:
            tokens += sum(len(g[0].token_ids) for _, g in s.step())
    wall = time.perf_counter() - t0
    return {"requests": len(requests), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "load": load()}  # fmt: skip


def bare_first_turns(engine, problems, args) -> dict:
    ids = [prompts.initial_prompt_ids(engine.tokenizer, p) for p in problems for _ in range(args.group)]
    t0 = time.perf_counter()
    outs = engine.generate(ids, tir_spec(args))
    wall = time.perf_counter() - t0
    tokens = sum(len(o[0].token_ids) for o in outs)
    return {"prompts": len(ids), "tokens": tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(tokens / wall, 1), "load": load()}  # fmt: skip


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


def show(name: str, res: dict) -> None:
    print(f"{name:<28} {json.dumps(res)}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problems", type=int, default=DEFAULTS.problems_per_iteration)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--turns", type=int, default=DEFAULTS.max_turns)
    ap.add_argument("--max-new-tokens", type=int, default=DEFAULTS.max_new_tokens)
    ap.add_argument("--difficulty", type=int, default=2)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--trees", action="store_true", help="also: MURPHY trees, prefix caching on vs off")
    ap.add_argument("--hf", action="store_true", help="also: the TIR workload on the transformers backend")
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()

    from runtime.models import resolve_model
    from stages.data.synthetic import generate

    model = resolve_model(args.model)
    math = generate("tool-arith", count=args.problems, seed=0, difficulty=args.difficulty)
    res: dict = {"model": str(model), "args": vars(args) | {"json": str(args.json)}, "load_start": load()}
    print(f"model {model}; load average {res['load_start']} on {os.cpu_count()} CPUs", flush=True)

    t0 = time.perf_counter()
    vllm = make_engine(model, backend="vllm", seed=0, prefix_caching=True)
    res["vllm_build_s"] = round(time.perf_counter() - t0, 1)
    vllm.generate(
        [prompts.initial_prompt_ids(vllm.tokenizer, math[0])], SamplingSpec(max_tokens=4)
    )  # warm-up
    res["tir_barrier"], b_rows = tir_workload(vllm, math, args, barrier=True)
    show("rollout, barrier", res["tir_barrier"])
    res["tir_continuous"], rows = tir_workload(vllm, math, args, barrier=False)
    show("rollout, continuous", res["tir_continuous"])
    res["same_tokens_continuous_vs_barrier"] = ids(rows) == ids(b_rows)
    limit = min(DEFAULTS.max_context_tokens, vllm.max_model_len)
    res["bare_same_requests"] = bare_replay(vllm, replay_requests(rows, args, limit))
    show("bare vLLM, same requests", res["bare_same_requests"])
    res["bare_first_turns"] = bare_first_turns(vllm, math, args)
    show("bare vLLM, first turns", res["bare_first_turns"])
    cont = res["tir_continuous"]["tokens_per_s"]
    res["ratio_rollout_vs_bare_same_requests"] = round(cont / res["bare_same_requests"]["tokens_per_s"], 3)
    res["ratio_rollout_vs_bare_first_turns"] = round(cont / res["bare_first_turns"]["tokens_per_s"], 3)
    res["ratio_continuous_vs_barrier"] = round(cont / res["tir_barrier"]["tokens_per_s"], 3)

    if args.trees:
        code = generate("func-synth", count=args.problems, seed=0, difficulty=1)
        res["tree_vllm_prefix_on"] = tree_workload(vllm, code, args)
        show("trees, prefix cache on", res["tree_vllm_prefix_on"])
    vllm.close()
    if args.trees:
        off = make_engine(model, backend="vllm", seed=0, prefix_caching=False)
        off.generate([prompts.initial_prompt_ids(off.tokenizer, math[0])], SamplingSpec(max_tokens=4))
        res["tree_vllm_prefix_off"] = tree_workload(off, code, args)
        show("trees, prefix cache off", res["tree_vllm_prefix_off"])
        off.close()
        res["ratio_prefix_on_vs_off_tokens_per_s"] = round(
            res["tree_vllm_prefix_on"]["tokens_per_s"] / res["tree_vllm_prefix_off"]["tokens_per_s"], 2
        )
    if args.hf:
        hf = make_engine(model, backend="transformers", seed=0, batch_size=args.problems * args.group)
        res["tir_transformers"], _ = tir_workload(hf, math, args, barrier=True)
        show("rollout, transformers", res["tir_transformers"])
        hf.close()
        res["ratio_vllm_vs_transformers_tokens_per_s"] = round(
            cont / res["tir_transformers"]["tokens_per_s"], 2
        )
    res["load_end"] = load()
    print(json.dumps(res, indent=2))
    print(
        f"rollout tokens/s / bare vLLM tokens/s (same requests): {res['ratio_rollout_vs_bare_same_requests']:.3f}"
        f"  (vs bare first turns: {res['ratio_rollout_vs_bare_first_turns']:.3f}); continuous / barrier: "
        f"{res['ratio_continuous_vs_barrier']:.3f} (same tokens: {res['same_tokens_continuous_vs_barrier']}); load average {res['load_start']} -> {res['load_end']}"
    )
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
