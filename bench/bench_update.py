"""Benchmark of the update stage: tokens/s, peak memory, (GPU) MFU, and weight-sync time.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_update.py [--model smollm2|tiny|DIR] [--seqs 8] [--len 256]
        [--steps 1] [--sync]

One real batch (``--seqs`` sequences of ``--len`` tokens, the second half of each a completion with ±1
advantages) through ``stages.update.Trainer.update`` (1 epoch, micro-batches of 4). Runs fp32 first (the
in-run baseline), then bf16 autocast on the same device, and prints the ratio. On CUDA it also prints MFU
(6·N·tokens/s over the bf16 dense peak given by --peak-tflops). ``--sync`` builds the rollout engine
(``runtime.engines.make_engine``) on the model and times ``update_weights`` with the trained state dict.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from runtime.env import apply_defaults  # noqa: E402

apply_defaults(offline=True)

import torch  # noqa: E402

from schemas.params.update import UpdateParams  # noqa: E402
from stages.update import Trainer  # noqa: E402
from stages.update.samples import Sample  # noqa: E402


def batch(vocab: int, seqs: int, length: int, seed: int = 0) -> list[Sample]:
    rng = random.Random(seed)
    out = []
    for i in range(seqs):
        ids = torch.tensor([rng.randrange(10, vocab) for _ in range(length)])
        mask = torch.zeros(length)
        mask[length // 2 :] = 1
        adv = mask * (1.0 if i % 2 == 0 else -1.0)
        out.append(Sample(f"s{i}", ids, mask, adv, torch.full((length,), -5.0) * mask))
    return out


def measure(model_dir: Path, dtype: str, args) -> tuple[dict, Trainer]:
    p = UpdateParams(
        lr=1e-6,
        minibatch_size=args.seqs,
        micro_batch_size=min(4, args.seqs),
        dtype=dtype,
        gradient_checkpointing=args.gradient_checkpointing,
    )
    trainer = Trainer(model_dir, p)
    vocab = trainer.model.config.vocab_size
    trainer.update(batch(vocab, args.seqs, args.len, seed=99))  # warm-up (allocator, kernels)
    best = None
    for s in range(args.steps):
        m = trainer.update(batch(vocab, args.seqs, args.len, seed=s))
        if best is None or m["actor/tokens_per_s"] > best["actor/tokens_per_s"]:
            best = m
    return best, trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--len", type=int, default=256)
    ap.add_argument("--steps", type=int, default=1, help="measured updates per dtype (best is reported)")
    ap.add_argument("--sync", action="store_true", help="also time the weight sync into a vLLM engine")
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument(
        "--peak-tflops", type=float, default=989.0, help="bf16 dense peak for MFU (H100 SXM: 989)"
    )
    args = ap.parse_args()
    from runtime.models import resolve_model

    model_dir = resolve_model(args.model)
    n_params = None
    results = {}
    for dtype in ("float32", "bfloat16"):
        try:
            m, trainer = measure(model_dir, dtype, args)
        except Exception as e:  # noqa: BLE001 - bf16 autocast may be unsupported on some CPUs
            print(f"{dtype}: failed ({type(e).__name__}: {e})")
            continue
        n_params = sum(p.numel() for p in trainer.model.parameters())
        results[dtype] = m
        line = (
            f"{dtype:9s} device={trainer.device.type} tokens/s={m['actor/tokens_per_s']:.1f} "
            f"peak_mem_mb={m['actor/peak_mem_mb']:.0f} update_s={m['timing/update']:.2f}"
        )
        if trainer.device.type == "cuda":
            mfu = 6 * n_params * m["actor/tokens_per_s"] / (args.peak_tflops * 1e12)
            line += f" MFU={100 * mfu:.2f}%"
        print(line, flush=True)
    if len(results) == 2:
        r = results["bfloat16"]["actor/tokens_per_s"] / results["float32"]["actor/tokens_per_s"]
        print(f"ratio bf16/fp32 tokens/s = {r:.2f}")
    print(f"model={model_dir} params={n_params} batch={args.seqs}x{args.len}")
    if args.sync:
        from runtime.engines import make_engine
        from stages.update import sync_live_engine

        t0 = time.perf_counter()
        engine = make_engine(model_dir, backend="vllm", seed=0)
        print(f"engine built in {time.perf_counter() - t0:.1f} s")
        with tempfile.TemporaryDirectory() as d:
            ref, plain = trainer.save(Path(d) / "checkpoint")
            for _ in range(3):
                secs, note = sync_live_engine(plain, Path(ref.uri))
                print(f"weight_sync_s={secs:.3f} ({note})")
        engine.close()


if __name__ == "__main__":
    main()
