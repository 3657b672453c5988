"""Benchmark of the update stage: tokens/s before vs after issue 15, as a fraction of the machine's matmul peak.

    .venv/bin/python bench/bench_update.py [--model smollm2|tiny|DIR] [--seqs 16] [--group 1] [--steps 1]
        [--variants ...] [--dtype float32] [--sync]

The workload: ``--seqs`` sequences shaped like the default tool-arith run (prompt 60-200 tokens, completion
40-300, a tool-output gap of 0-40 untrained tokens inside the completion, ±1 advantages; ``--group G``: each
run of G sequences shares one prompt, as a GRPO group does), the default
UpdateParams (1 epoch, minibatches of 8, micro-batches of 4). Each variant runs in a fresh subprocess (so its
peak RSS is its own) through ``stages.update.Trainer.update`` after a warm-up update:

    legacy-1t   the path before: full-vocabulary fp32 log-softmax, a separate π_old pass over every sample,
                one thread (what the pipeline's process had: OMP_NUM_THREADS=1 beside vLLM)
    new-1t      chunked selective log-softmax, logits only from the first trained position, the first
                minibatch's π_old from its own forward; one thread
    new         the same with every core (what ``stages.update.run`` now does, in a subprocess if vLLM pinned
                the process's threads)
    rollout     ``new`` with old_logprobs="rollout" (no π_old pass)
    packed      ``new`` with shared_prefix=true: a micro-batch packed as its prefix trie in one row, shared
                prompts once (it only gains when samples share prompts: ``--group G``, GRPO's shape)
    bf16-1t     ``new-1t`` under bf16 autocast over fp32 master weights (what ``dtype=auto`` picks on a CPU
                with native bf16 matmuls, avx512_bf16 / amx_bf16; the pipeline's default is one thread)
    bf16        the same with every core

It first measures matmul throughput in the variant's dtype (the GEMM shapes of the model's MLP, 1 thread and all) and prints each
variant's update tokens/s (π_old pass included), training FLOP/s (6·N·tokens over the whole update) as a
fraction of that peak at its thread count, peak RSS (process lifetime maximum, model load included), and the
ratio to ``legacy-1t``. ``--sync`` times ``update_weights`` into a vLLM engine built on the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)

import torch  # noqa: E402

from bench.legacy_update import LegacyTrainer  # noqa: E402
from schemas.params.update import UpdateParams  # noqa: E402
from stages.update import Trainer  # noqa: E402
from stages.update.batches import Sample  # noqa: E402

VARIANTS = {
    "legacy-1t": {"legacy": True, "threads": 1, "old_logprobs": "recompute"},
    "new-1t": {"legacy": False, "threads": 1, "old_logprobs": "recompute"},
    "new": {"legacy": False, "threads": 0, "old_logprobs": "recompute"},
    "rollout": {"legacy": False, "threads": 0, "old_logprobs": "rollout"},
    "packed": {"legacy": False, "threads": 0, "old_logprobs": "recompute", "shared_prefix": True},
    "bf16-1t": {"legacy": False, "threads": 1, "old_logprobs": "recompute", "dtype": "bfloat16"},
    "bf16": {"legacy": False, "threads": 0, "old_logprobs": "recompute", "dtype": "bfloat16"},
}


def batch(vocab: int, seqs: int, seed: int = 0, group: int = 1) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(seqs):
        if i % group == 0:
            prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(60, 200))]
        p, c, gap = len(prompt), rng.randint(40, 300), rng.randint(0, 40)
        n = p + c
        ids = torch.tensor(prompt + [rng.randrange(10, vocab) for _ in range(c)])
        mask = torch.zeros(n)
        mask[p:] = 1
        g0 = p + c // 3
        mask[g0 : min(g0 + gap, n - 1)] = 0  # a tool result inside the completion: not trained
        adv = mask * (1.0 if i % 2 == 0 else -1.0)
        out.append(Sample(f"s{i}", ids, mask, adv, torch.full((n,), -5.0) * mask))
    return out


def matmul_gflops(
    hidden: int, inter: int, tokens: int = 2048, reps: int = 20, dtype: torch.dtype = torch.float32
) -> float:
    """GEMM throughput at this process's thread count on the (tokens × hidden) @ (hidden × inter) shape."""
    a, b = torch.randn(tokens, hidden, dtype=dtype), torch.randn(hidden, inter, dtype=dtype)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * tokens * hidden * inter * reps / (time.perf_counter() - t) / 1e9


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: every 2-D weight but the input embedding, plus the
    LM head (which is the embedding itself when tied)."""
    cfg = model.config
    n = sum(p.numel() for name, p in model.named_parameters() if p.dim() == 2 and "embed_tokens" not in name)
    if getattr(cfg, "tie_word_embeddings", False):
        n += cfg.vocab_size * cfg.hidden_size
    return n


def one(args) -> dict:
    """One variant in this process; returns its figures."""
    v = VARIANTS[args.one]
    threads = v["threads"] or len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    from runtime.models import resolve_model

    p = UpdateParams(
        lr=1e-6, dtype=v.get("dtype", args.dtype), old_logprobs=v["old_logprobs"], target_kl=None,
        shared_prefix=v.get("shared_prefix", False),
    )  # fmt: skip
    trainer = (LegacyTrainer if v["legacy"] else Trainer)(resolve_model(args.model), p)
    cfg = trainer.model.config
    peak = matmul_gflops(cfg.hidden_size, cfg.intermediate_size, dtype=getattr(torch, p.dtype))
    trainer.update(batch(cfg.vocab_size, min(args.seqs, 8), 99, args.group))  # warm-up (allocator, kernels)
    best = None
    for s in range(args.steps):
        samples = batch(cfg.vocab_size, args.seqs, s, args.group)
        t = time.perf_counter()
        m = trainer.update(samples)
        m["wall_s"] = time.perf_counter() - t
        m["tokens"] = sum(len(x) for x in samples)
        if best is None or m["wall_s"] < best["wall_s"]:
            best = m
    n = matmul_params(trainer.model)
    best.update(
        threads=threads,
        matmul_gflops=peak,
        dtype=p.dtype,
        n_matmul_params=n,
        train_gflops=6 * n * best["tokens"] / best["wall_s"] / 1e9,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        trainer=trainer,
    )
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--group", type=int, default=1, help="sequences per shared prompt (GRPO's G)")
    ap.add_argument(
        "--steps", type=int, default=1, help="measured updates per variant (the fastest is reported)"
    )
    ap.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="of the variants that do not name one",
    )
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--sync", action="store_true", help="also time the weight sync into a vLLM engine")
    ap.add_argument("--one", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        m = one(args)
        trainer = m.pop("trainer")
        print("RESULT " + json.dumps(m), flush=True)
        if args.sync:
            sync(trainer, args)
        return
    results = {}
    for name in args.variants:
        cmd = [sys.executable, __file__, "--one", name, "--model", args.model, "--seqs", str(args.seqs)]
        cmd += ["--steps", str(args.steps), "--dtype", args.dtype, "--group", str(args.group)]
        cmd += ["--sync"] if args.sync else []
        env = dict(os.environ, OMP_NUM_THREADS=str(VARIANTS[name]["threads"] or len(os.sched_getaffinity(0))))
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode != 0 or not lines:
            print(f"{name}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        m = results[name] = json.loads(lines[-1].removeprefix("RESULT "))
        print(
            f"{name:10s} threads={m['threads']} update_s={m['wall_s']:.1f} (pi_old {m['timing/old_logprobs']:.1f}) "
            f"tokens/s={m['actor/update_tokens_per_s']:.1f} train_GFLOP/s={m['train_gflops']:.1f} "
            f"= {100 * m['train_gflops'] / m['matmul_gflops']:.0f}% of {m['dtype']} matmul {m['matmul_gflops']:.0f} GFLOP/s "
            f"peak_rss_mb={m['peak_rss_mb']:.0f} train_peak_mb={m['actor/peak_mem_mb']:.0f}",
            flush=True,
        )
        for x in proc.stdout.splitlines():
            if x.startswith("weight_sync") or x.startswith("engine"):
                print("   ", x)
    base = results.get("legacy-1t")
    if base:
        for name, m in results.items():
            if name != "legacy-1t":
                r = m["actor/update_tokens_per_s"] / base["actor/update_tokens_per_s"]
                mem = m["peak_rss_mb"] / base["peak_rss_mb"]
                print(f"ratio {name}/legacy-1t: tokens/s x{r:.2f}, peak RSS x{mem:.2f}")
    any_m = next(iter(results.values()), None)
    if any_m:
        print(
            f"model={args.model} matmul_params={any_m['n_matmul_params']} seqs={args.seqs} group={args.group} "
            f"tokens={any_m['tokens']} trained_tokens={any_m['actor/trained_tokens']:.0f} dtype={args.dtype}"
        )


def sync(trainer: Trainer, args) -> None:
    import tempfile

    from runtime.engines import make_engine
    from stages.update import sync_live_engine

    t0 = time.perf_counter()
    engine = make_engine(trainer.source, backend="vllm", seed=0)
    print(f"engine built in {time.perf_counter() - t0:.1f} s")
    with tempfile.TemporaryDirectory() as d:
        ref, plain = trainer.save(Path(d) / "checkpoint")
        for _ in range(3):
            secs, note = sync_live_engine(plain, Path(ref.uri))
            print(f"weight_sync_s={secs:.3f} ({note})")
    engine.close()


if __name__ == "__main__":
    main()
