"""GPU check s1: update throughput (``bench/gpu_check.py`` says what it measures)."""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

from gpu_common import (
    H200_BF16_PEAK,
    build_checkpoint,
    err_text,
    flop_model,
    free,
    note,
    sample_rows,
    sync,
    train_flops,
    write_samples,
)


# --- s1: update throughput ------------------------------------------------------------------------------------------
def section_s1(cfg: dict, res: dict, save) -> None:
    import torch
    import transformers

    dev = cfg["device"]
    res["env"] = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "transformers": transformers.__version__,
        "device_name": torch.cuda.get_device_name(0) if dev == "cuda" else "cpu",
        "capability": list(torch.cuda.get_device_capability(0)) if dev == "cuda" else None,
        "gpu_mem_gib": torch.cuda.get_device_properties(0).total_memory / 2**30 if dev == "cuda" else None,
        "sdpa_backends": {
            k: getattr(torch.backends.cuda, f"{k}_sdp_enabled")()
            for k in ("flash", "mem_efficient", "math", "cudnn")
            if hasattr(torch.backends.cuda, f"{k}_sdp_enabled")
        },
    }
    try:
        import pydantic

        res["env"]["pydantic"] = pydantic.VERSION
    except Exception as e:  # noqa: BLE001
        res["env"]["pydantic"] = err_text(e)
    save()
    s1 = cfg["s1"]
    try:
        res["gemm_tflops"] = gemm_tflops(dev, s1["gemm_n"])
    except Exception as e:  # noqa: BLE001
        res["gemm_error"] = err_text(e)
    save()
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-s1-"))
    built: dict[str, Path] = {}  # arch -> its checkpoint (the gc variant reuses the 1B one)
    try:
        for name, sc in s1["shapes"].items():
            r = res.setdefault("shapes", {}).setdefault(name, {})
            try:
                key = json.dumps(sc["arch"], sort_keys=True)
                if key not in built:
                    for old in built.values():  # one checkpoint on disk at a time
                        shutil.rmtree(old, ignore_errors=True)
                    built.clear()
                    t0 = time.perf_counter()
                    built[key] = build_checkpoint(tmp / name / "base", sc["arch"], dev)
                    r["build_s"] = time.perf_counter() - t0
                    note(f"s1 {name}: checkpoint built in {r['build_s']:.1f} s")
                bench_shape(
                    name, sc, dev, tmp, built[key], r, s1["baseline_len"], res.get("gemm_tflops"), save
                )
            except Exception as e:  # noqa: BLE001
                r["error"] = err_text(e)
                r["traceback"] = traceback.format_exc()[-4000:]
                note(f"s1 {name}: {r['error']}")
            finally:
                free(dev)
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def gemm_tflops(dev: str, n: int) -> float:
    import torch

    dtype = torch.bfloat16
    a, b = torch.randn(n, n, dtype=dtype, device=dev), torch.randn(n, n, dtype=dtype, device=dev)
    for _ in range(3):
        a @ b
    sync(dev)
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def bench_shape(name, sc, dev, tmp, ckpt, r, baseline_len, gemm, save) -> None:
    import torch

    from schemas.params.update import UpdateParams
    from stages.update import Trainer, load_samples
    from stages.update.batches import minibatches

    (tmp / name).mkdir(parents=True, exist_ok=True)
    p = UpdateParams(
        device=dev, dtype="bfloat16", lr=1e-6, target_kl=None, minibatch_size=sc["minibatch"],
        micro_batch_size=sc["micro"], gradient_checkpointing=sc.get("gc", False),
    )  # fmt: skip
    r["params"] = {
        k: getattr(p, k) for k in ("minibatch_size", "micro_batch_size", "gradient_checkpointing", "dtype")
    }
    r["samples"], r["len"], r["prompt"] = sc["samples"], sc["len"], sc["prompt"]
    t0 = time.perf_counter()
    trainer = Trainer(ckpt, p)
    r["load_s"] = time.perf_counter() - t0
    cfg = trainer.model.config
    fm = flop_model(cfg)
    r["n_params"] = sum(q.numel() for q in trainer.model.parameters())
    r["n_body"], r["n_lm_head"] = fm["n_body"], fm["n_head"]
    vocab = cfg.vocab_size
    warm = load_samples(write_samples(tmp / name / "warm.parquet",
                                      sample_rows(sc["micro"] * 2, vocab, sc["len"], sc["prompt"], seed=99)))  # fmt: skip
    t0 = time.perf_counter()
    trainer.update(warm)  # allocator, kernels, autocast
    sync(dev)
    r["warmup_s"] = time.perf_counter() - t0
    save()
    reps = []
    for rep in range(sc["reps"]):
        rows = sample_rows(sc["samples"], vocab, sc["len"], sc["prompt"], seed=rep)
        samples = load_samples(write_samples(tmp / name / f"rep{rep}.parquet", rows))
        first = set(minibatches(len(samples), p, trainer.update_idx, 0, [s.group for s in samples])[0])
        prompts = [int((s.mask > 0).nonzero()[0]) for s in samples]
        f_train = sum(train_flops(fm, len(s), pl) for s, pl in zip(samples, prompts, strict=True))
        f_old = sum(
            train_flops(fm, len(s), pl) / 3 for i, (s, pl) in enumerate(zip(samples, prompts, strict=True))
            if i not in first
        )  # fmt: skip
        if dev == "cuda":
            torch.cuda.reset_peak_memory_stats()
        sync(dev)
        t0 = time.perf_counter()
        m = trainer.update(samples)
        sync(dev)
        wall = time.perf_counter() - t0
        tokens = sum(len(s) for s in samples)
        t_old = m["timing/old_logprobs"]
        t_train = tokens / m["actor/tokens_per_s"]  # the trainer's own training-loop time
        peak = gemm * 1e12 if gemm else None
        rec = {
            "wall_s": wall,
            "tokens": tokens,
            "trained_tokens": m["actor/trained_tokens"],
            "pi_old_s": t_old,
            "train_s": t_train,
            "optimizer_steps": m["actor/steps"],
            "tokens_per_s_train": m["actor/tokens_per_s"],
            "tokens_per_s_update": tokens / wall,
            "model_tflops_train": f_train / t_train / 1e12,
            "model_tflops_update": (f_train + f_old) / wall / 1e12,
            "mfu_train": f_train / t_train / H200_BF16_PEAK,
            "mfu_update": (f_train + f_old) / wall / H200_BF16_PEAK,
            "mfu_pi_old_pass": (f_old / t_old / H200_BF16_PEAK) if t_old > 0 and f_old else None,
            "frac_of_measured_gemm_train": (f_train / t_train / peak) if peak else None,
            "peak_mem_train_mb": m["actor/peak_mem_mb"],
            "max_memory_allocated_mb": torch.cuda.max_memory_allocated() / 2**20 if dev == "cuda" else None,
            "max_memory_reserved_mb": torch.cuda.max_memory_reserved() / 2**20 if dev == "cuda" else None,
            "loss": m["actor/loss"],
            "grad_norm": m["actor/grad_norm"],
        }
        reps.append(rec)
        note(f"s1 {name} rep {rep}: {tokens / wall:.0f} tok/s, MFU train {100 * rec['mfu_train']:.1f}%")
        r["reps"] = reps
        r["best"] = max(reps, key=lambda x: x["tokens_per_s_update"])
        save()
    trainer.optimizer.zero_grad(set_to_none=True)
    if not sc.get("no_baseline"):
        try:
            r["hf_fwd_bwd_baseline"] = hf_baseline(trainer.model, sc["micro"], baseline_len, fm, dev)
        except Exception as e:  # noqa: BLE001
            r["hf_fwd_bwd_baseline"] = {"error": err_text(e)}
    del trainer
    free(dev)


def hf_baseline(model, micro: int, length: int, fm: dict, dev: str, steps: int = 3) -> dict:
    """Plain transformers forward + backward (HF's own shifted-CE loss) of the same model on a (micro, length)
    batch of random tokens under the same bf16 autocast: what the model code alone reaches."""
    import torch

    model.train()
    ids = torch.randint(10, model.config.vocab_size, (micro, length), device=dev)
    ac = torch.autocast(device_type=dev, dtype=torch.bfloat16)

    def step():
        with ac:
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    sync(dev)
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync(dev)
    dt = (time.perf_counter() - t) / steps
    f = micro * train_flops(fm, length, 1)
    return {"micro": micro, "len": length, "step_s": dt, "tokens_per_s": micro * length / dt,
            "mfu": f / dt / H200_BF16_PEAK}  # fmt: skip
