"""One-shot GPU check of the update and the learning loop (issue 24), run once on a lent H200 by
``bench/gpu_check.sh``; ``--cpu-smoke`` runs the same code paths at toy sizes on CPU (gloo).

    bash bench/gpu_check.sh                  # on the GPU machine: results in $OUT/gpu_check.json + gpu_check.log
    bash bench/gpu_check.sh --cpu-smoke      # here: tiny shapes, device cpu, gloo (a few minutes on 2 cores)
    .venv/bin/python bench/gpu_check.py simenv DIR   # here: a venv of only the GPU image's packages (+ .whl/ ones)
    bash bench/gpu_check.sh --sections s2    # any subset of s1,s2,s3

Each section runs in a child process of its own with a time limit (a crash, an OOM or a hang loses that section
only); the child writes its results as it goes and the parent merges them into ``gpu_check.json`` after every
section. Sections:

s1  update throughput: ``stages.update.Trainer.update`` (the update stage's own trainer, bf16 autocast over fp32
    master weights) on synthetic RL-shaped samples (1024-2048 tokens, untrained prompt and tool-output spans,
    ±1 advantages), for a SmolLM2-135M-shaped and a ~1.07B Llama-shaped model, both random-initialised here (no
    weights travel: the 64 MiB cap is below even SmolLM2's 94 MiB GGUF). Per shape: tokens/s, model FLOP/s as
    MFU against the H200's dense bf16 peak (989 TFLOP/s spec; the 8192^3 GEMM measured in the same run is also
    given), peak memory, and a plain HF forward+backward of the same model and micro-batch shape as a ceiling
    reference (what transformers alone reaches, without the update's loss code).
    FLOPs (useful model FLOPs only, no recompute, no padding): training pass per sample of L tokens with P prompt
    tokens: 6·N_body·L + 6·V·h·(L−P+1) [LM head only where logits are kept] + 6·n_layers·h·L² [causal
    attention, QKᵀ and AV]; the π_old pass (no-grad forward of every minibatch but the first): a third of that.
s2  ``update.distributed=ddp`` and ``fsdp2`` under torchrun with one process, through ``stages.update.distributed.
    launch`` (torchrun --standalone --nproc-per-node 1 -m stages.update …), NCCL on CUDA. With one process the
    stage itself would not wrap the model (``World.distributed`` is ``size > 1``), so each rank is given a
    one-rank world whose ``distributed`` is True (a sitecustomize hook: process group opened, DDP / FSDP2 wrap,
    all collectives): the rest is the stage's own code. Compared with the one-process update of the same samples
    (losses per optimizer step, grad norms, and the final weights).
s3  one learning-recipe cell without Prefect/MLflow: the stages called in ``flows.pipeline.drive``'s order (data →
    warm start → evaluate → [rollout → score → advantages → update → evaluate] × k), transformers rollout backend
    on CUDA, update on CUDA; a ~10M random Qwen2 with turntree's tiny tokenizer, a warm start on tool-arith
    demonstrations, then GTPO iterations while the time budget lasts. Reward, held-out accuracy and stage times
    per iteration; and the transformers engine's generate with one seed for a batch vs one seed per request
    (what the TIR loop sends), to measure how much the per-request seeds cost that backend.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

H200_BF16_PEAK = 989e12  # dense bf16 FLOP/s, datasheet (SXM)

# --- model shapes -------------------------------------------------------------------------------------------------
SMOLLM2 = dict(  # HuggingFaceTB/SmolLM2-135M-Instruct's shape (random weights)
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
    num_key_value_heads=3, tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip
LLAMA_1B = dict(  # Llama-3.2-1B's body with SmolLM2's vocabulary: 1.07B parameters
    vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
    num_key_value_heads=8, tie_word_embeddings=True, max_position_embeddings=8192,
)  # fmt: skip
TOY = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, tie_word_embeddings=True, max_position_embeddings=1024,
)  # fmt: skip

GPU_CONFIG = {
    "device": "cuda",
    "budget_s": 330,
    "s1": {
        "timeout_s": 120,
        "gemm_n": 8192,
        "shapes": {
            "smollm2-135m": {"arch": SMOLLM2, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                             "minibatch": 64, "micro": 16, "reps": 2},
            "llama-1.07b": {"arch": LLAMA_1B, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                            "minibatch": 64, "micro": 8, "reps": 2},
            # the same model and samples with gradient checkpointing (what tests/test_update_gpu.py runs), twice
            # the micro-batch: the memory it saves and the recompute it costs (last: a timeout loses only this)
            "llama-1.07b-gc": {"arch": LLAMA_1B, "samples": 128, "len": [1024, 2048], "prompt": [128, 384],
                               "minibatch": 64, "micro": 16, "reps": 1, "gc": True, "no_baseline": True},
        },
        "baseline_len": 1536,
    },
    "s2": {"timeout_s": 100, "arch": SMOLLM2, "samples": 16, "len": [512, 1024], "prompt": [64, 256],
           "minibatch": 8, "micro": 4, "lr": 1e-4},
    "s3": {
        "timeout_min_s": 60, "timeout_max_s": 150,
        "model": {"hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 6, "num_attention_heads": 6,
                  "num_key_value_heads": 2},
        "data": {"synthetic_count": 3000, "synthetic_difficulty": 1, "eval_fraction": 0.02},
        "warmstart": {"steps": 400, "batch_size": 32, "micro_batch_size": 32, "lr": 2e-3, "warmup_steps": 20},
        "rollout": {"group_size": 8, "problems_per_iteration": 4, "max_new_tokens": 64, "max_turns": 2},
        "update": {"lr": 1e-4, "minibatch_size": 32, "micro_batch_size": 32},
        "eval": {"max_problems": 16, "max_new_tokens": 64, "max_turns": 2, "bootstrap": 200},
        "iterations": 4,
        "seed_bench": {"prompts": 8, "max_tokens": 48},
    },
}  # fmt: skip

CPU_CONFIG = {
    "device": "cpu",
    "budget_s": 1500,
    "s1": {
        "timeout_s": 300,
        "gemm_n": 256,
        "shapes": {
            "toy": {"arch": TOY, "samples": 8, "len": [48, 96], "prompt": [8, 24], "minibatch": 4, "micro": 2,
                    "reps": 1},
            "toy-gc": {"arch": TOY, "samples": 8, "len": [48, 96], "prompt": [8, 24], "minibatch": 4, "micro": 4,
                       "reps": 1, "gc": True, "no_baseline": True},
        },
        "baseline_len": 64,
    },
    "s2": {"timeout_s": 400, "arch": TOY, "samples": 6, "len": [32, 64], "prompt": [8, 16], "minibatch": 4,
           "micro": 2, "lr": 1e-3},
    "s3": {
        "timeout_min_s": 60, "timeout_max_s": 700,
        "model": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2},
        "data": {"synthetic_count": 40, "synthetic_difficulty": 1, "eval_fraction": 0.2},
        "warmstart": {"steps": 80, "batch_size": 8, "micro_batch_size": 8, "lr": 3e-3, "warmup_steps": 0},
        "rollout": {"group_size": 2, "problems_per_iteration": 2, "max_new_tokens": 48, "max_turns": 2},
        "advantages": {"keep_zero_signal": True},  # the smoke's toy policy rarely earns a reward: train anyway
        "update": {"lr": 1e-4, "minibatch_size": 4, "micro_batch_size": 4},
        "eval": {"max_problems": 4, "max_new_tokens": 48, "max_turns": 2, "bootstrap": 50},
        "iterations": 2,
        "seed_bench": {"prompts": 3, "max_tokens": 8},
    },
}  # fmt: skip

SECTIONS = ("s1", "s2", "s3")


# --- small helpers ------------------------------------------------------------------------------------------------
T0 = time.perf_counter()


def note(msg: str) -> None:
    """A progress line in the section's log (gpu_check.log)."""
    print(f"[{time.strftime('%H:%M:%S')} +{time.perf_counter() - T0:6.1f}s] {msg}", flush=True)


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def err_text(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:2000]


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


def build_checkpoint(out: Path, arch: dict, device: str, *, seed: int = 0) -> Path:
    """A randomly initialised Llama of shape ``arch`` saved in bf16 (the update loads fp32 master weights from
    it) with a stub tokenizer file (the update never tokenises; ``check_checkpoint`` wants one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(**arch, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    with torch.device(device):
        model = LlamaForCausalLM(cfg)
    model.to(torch.bfloat16).save_pretrained(out)
    (out / "tokenizer_config.json").write_text(
        json.dumps({"model_max_length": arch["max_position_embeddings"]})
    )
    del model
    free(device)
    return out


def sample_rows(
    n: int, vocab: int, lens: list[int], prompts: list[int], seed: int, group: int = 8
) -> list[dict]:
    """Samples-table rows shaped like RL samples: a prompt shared by each group of ``group`` (untrained), a
    completion (trained) with an untrained tool-output span inside, ±1 advantages, rollout log-probs."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        if i % group == 0:
            prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(*prompts))]
        length = max(rng.randint(*lens), len(prompt) + 8)
        ids = prompt + [rng.randrange(10, vocab) for _ in range(length - len(prompt))]
        mask = [0] * len(prompt) + [1] * (length - len(prompt))
        g0 = len(prompt) + (length - len(prompt)) // 3
        gap = rng.randint(0, max(0, (length - len(prompt)) // 8))
        for t in range(g0, min(g0 + gap, length - 1)):
            mask[t] = 0
        a = 1.0 if (i // 2) % 2 == 0 else -1.0
        rows.append(
            {
                "sample_id": f"s{seed}-{i}",
                "source_id": f"t{seed}-{i}",
                "problem_id": f"p{seed}-{i // group}",
                "group_id": f"g{seed}-{i // group}",
                "input_ids": ids,
                "loss_mask": mask,
                "advantages": [a * m for m in mask],
                "rollout_logprobs": [-3.0 * m for m in mask],
                "algo": "grpo",
            }
        )
    return rows


def write_samples(path: Path, rows: list[dict]) -> str:
    from runtime.tableio import write_table
    from schemas.tables import SAMPLES

    write_table(rows, SAMPLES, path)
    return str(path)


def flop_model(cfg) -> dict:
    """Per-token parameter counts for the FLOP formula (module docstring)."""
    h, n_layers = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    body = n_layers * (2 * h * h + 2 * h * kv + 3 * h * cfg.intermediate_size)
    return {"n_body": body, "n_head": cfg.vocab_size * h, "n_layers": n_layers, "hidden": h}


def train_flops(fm: dict, length: int, prompt: int) -> float:
    kept = max(length - prompt + 1, 1)
    return (
        6.0 * fm["n_body"] * length
        + 6.0 * fm["n_head"] * kept
        + 6.0 * fm["n_layers"] * fm["hidden"] * length**2
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


# --- s2: DDP / FSDP2 under torchrun, one process ------------------------------------------------------------------------
HOOK = """\
import os
if os.environ.get("GPU_CHECK_FORCE_WORLD") == "1" and "LOCAL_RANK" in os.environ:
    import importlib.util, sys
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_hook_module", os.environ["GPU_CHECK_SCRIPT"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.force_distributed_world()
    except Exception as e:
        sys.stderr.write("gpu_check hook failed: %r\\n" % (e,))
        raise
"""


def force_distributed_world() -> None:
    """In a torchrun rank of a one-process world: make ``stages.update.distributed.world`` open the process group
    (nccl on CUDA, gloo on CPU) and return a World whose ``distributed`` is True, so the stage wraps the model in
    DDP / FSDP2 and runs every collective, as it would with more processes."""
    import contextlib

    import torch
    import torch.distributed as dist

    from stages.update import distributed as ddist

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return  # several processes: the stage's own world already does this

    class ForcedWorld(ddist.World):
        @property
        def distributed(self) -> bool:
            return True

    @contextlib.contextmanager
    def world(params, device):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            yield ForcedWorld(
                rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, kind=params.distributed
            )
        finally:
            dist.destroy_process_group()

    ddist.world = world


def section_s2(cfg: dict, res: dict, save) -> None:
    from safetensors.torch import load_file

    from schemas.params.update import UpdateParams
    from stages import update
    from stages.update import distributed as ddist

    dev, sc = cfg["device"], cfg["s2"]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-s2-"))
    try:
        t0 = time.perf_counter()
        base_ckpt = build_checkpoint(tmp / "base", sc["arch"], dev, seed=1)
        rows = sample_rows(sc["samples"], sc["arch"]["vocab_size"], sc["len"], sc["prompt"], seed=7, group=4)
        inputs = {"samples": write_samples(tmp / "samples.parquet", rows), "checkpoint": str(base_ckpt)}
        res["setup_s"] = time.perf_counter() - t0
        base = dict(
            device=dev, dtype="bfloat16", lr=sc["lr"], minibatch_size=sc["minibatch"], micro_batch_size=sc["micro"],
            target_kl=None, seed=3, cpu_threads=1,
        )  # fmt: skip
        outs = {}
        t0 = time.perf_counter()
        outs["single"] = update.run(UpdateParams(**base), inputs, tmp / "single")
        res["single"] = summarize_update(outs["single"], tmp / "single", time.perf_counter() - t0)
        save()
        free(dev)
        hook = tmp / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(hook), str(REPO), os.environ.get("PYTHONPATH")])
        )
        os.environ["GPU_CHECK_FORCE_WORLD"] = "1"
        os.environ["GPU_CHECK_SCRIPT"] = str(Path(__file__).resolve())
        os.environ.setdefault("NCCL_DEBUG", "WARN")
        single_w = load_file(str(tmp / "single" / "checkpoint" / "model.safetensors"))
        base_w = load_file(str(base_ckpt / "model.safetensors"))
        for kind in ("ddp", "fsdp2"):
            r = res.setdefault(kind, {})
            try:
                p = UpdateParams(**base, nproc=1, distributed=kind)
                r["torchrun"] = " ".join(ddist.torchrun_command(p)[1:]) + " -m stages.update ..."
                note(f"s2: {kind} under torchrun")
                t0 = time.perf_counter()
                out = ddist.launch(p, inputs, tmp / kind)
                r.update(summarize_update(out, tmp / kind, time.perf_counter() - t0))
                r["wrapped"] = any(f"processes ({kind})" in n for n in out.notes)
                w = load_file(str(Path(out.uri("checkpoint")) / "model.safetensors"))
                r["compare"] = compare_updates(res["single"], r, base_w, single_w, w)
            except Exception as e:  # noqa: BLE001
                r["error"] = err_text(e)
                r["traceback"] = traceback.format_exc()[-4000:]
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize_update(out, outdir: Path, wall: float) -> dict:
    steps = [json.loads(x) for x in (outdir / "steps.jsonl").read_text().splitlines() if x.strip()]
    keep = ("actor/loss", "actor/grad_norm", "actor/approx_kl", "actor/entropy", "actor/clip_frac",
            "actor/trained_tokens", "actor/steps", "actor/tokens_per_s", "actor/peak_mem_mb", "timing/update")  # fmt: skip
    return {
        "wall_s": wall,
        "metrics": {k: out.metrics[k] for k in keep if k in out.metrics},
        "steps": [
            {k: s[k] for k in ("step", "loss", "grad_norm", "approx_kl", "entropy", "tokens")} for s in steps
        ],
        "notes": out.notes,
    }


def compare_updates(single: dict, multi: dict, base_w: dict, single_w: dict, multi_w: dict) -> dict:
    """Per-step losses and grad norms, and the weights: max |Δ|, and ‖w_multi − w_single‖ / ‖w_single − w_base‖."""
    import torch

    steps = []
    ok = len(single["steps"]) == len(multi["steps"]) and len(single["steps"]) > 0
    for a, b in zip(single["steps"], multi["steps"], strict=False):
        d_loss = abs(a["loss"] - b["loss"])
        d_gn = abs(a["grad_norm"] - b["grad_norm"]) / max(abs(a["grad_norm"]), 1e-12)
        steps.append({"step": a["step"], "loss_single": a["loss"], "loss_multi": b["loss"], "abs_diff_loss": d_loss,
                      "rel_diff_grad_norm": d_gn})  # fmt: skip
        ok &= d_loss <= 1e-2 * abs(a["loss"]) + 1e-3 and d_gn <= 2e-2
    num = den = 0.0
    max_abs = 0.0
    for k, ws in single_w.items():
        if k not in multi_w:
            ok = False
            continue
        diff = (multi_w[k].float() - ws.float()).double()
        num += float((diff**2).sum())
        den += float(((ws.float() - base_w[k].float()).double() ** 2).sum()) if k in base_w else 0.0
        max_abs = max(max_abs, float(diff.abs().max()))
    rel = (num**0.5) / max(den**0.5, 1e-30)
    ok &= rel <= 0.1
    return {
        "steps": steps,
        "weights_max_abs_diff": max_abs,
        "weights_rel_l2_diff_vs_update": rel,
        "update_l2": den**0.5,
        "match_bf16_tolerance": bool(ok),
        "tolerance": "per step |Δloss| <= 1e-2·|loss| + 1e-3 and grad-norm rel diff <= 2e-2; "
        "||w_multi − w_single|| <= 0.1·||w_single − w_base||",
        "torch": torch.__version__,
    }


# --- s3: learning-recipe cell ------------------------------------------------------------------------------------------
def build_policy(out: Path, tok_dir: Path, shape: dict, seed: int = 0) -> tuple[Path, int]:
    """A random Qwen2 of ``shape`` with turntree's tiny tokenizer (``runtime.models.prepare_tiny``'s)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from runtime import checkpoint as ckpt
    from runtime.models import ENDOFTEXT, IM_END

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tok), **shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    ckpt.copy_tokenizer_files(tok_dir, out)
    return out, sum(p.numel() for p in model.parameters())


def section_s3(cfg: dict, res: dict, save) -> None:
    from runtime.models import prepare_tiny
    from schemas.params import (
        AdvantageParams,
        DataParams,
        EvalParams,
        PipelineParams,
        RolloutParams,
        ScoreParams,
        UpdateParams,
        WarmstartParams,
    )  # fmt: skip
    from stages import advantages, evaluate, rollout, score, update, warmstart
    from stages import data as data_stage

    t_start = time.perf_counter()
    dev, sc = cfg["device"], cfg["s3"]
    deadline = t_start + float(cfg["s3_timeout_s"]) - (25 if dev == "cuda" else 60)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-s3-"))
    res["iterations"] = []
    timings = res.setdefault("setup", {})

    def timed(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[key] = time.perf_counter() - t0
        return out

    try:
        res["sandbox"] = sandbox_mode()
        note(f"s3: sandbox {res['sandbox']}")
        tiny = timed("tokenizer_s", lambda: prepare_tiny(tmp / "tiny"))
        policy, res["n_params"] = timed(
            "build_policy_s", lambda: build_policy(tmp / "policy", tiny, sc["model"])
        )
        pp = PipelineParams(  # the pipeline's own wiring of the algorithm into the stage parameters
            algorithm="gtpo",
            model=str(policy),
            data=DataParams(sources=["synthetic:tool-arith"], **sc["data"]),
            warmstart=WarmstartParams(
                enabled=True, cache=False, device=dev, dtype="bfloat16", **sc["warmstart"]
            ),
            rollout=RolloutParams(backend="transformers", temperature=1.0, **sc["rollout"]),
            score=ScoreParams(),
            advantages=AdvantageParams(**sc.get("advantages", {})),
            update=UpdateParams(device=dev, dtype="bfloat16", **sc["update"]),
            eval=EvalParams(benchmark="heldout", backend="transformers", **sc["eval"]),
        )
        res["params"] = pp.model_dump(mode="json", exclude={"dispatch"})
        save()
        data = timed("data_s", lambda: data_stage.run(pp.data, {}, tmp / "data"))
        problems = data.uri("problems")
        ws = timed("warmstart_s", lambda: warmstart.run(pp.warmstart, {"problems": problems, "checkpoint": str(policy)},
                                                         tmp / "warmstart"))  # fmt: skip
        res["warmstart"] = {k: v for k, v in ws.metrics.items()}
        checkpoint = ws.uri("checkpoint")
        save()

        def heldout(k: int, ckpt: str) -> dict:
            t0 = time.perf_counter()
            ev = evaluate.run(pp.eval, {"checkpoint": ckpt, "problems": problems}, tmp / f"eval-{k}")
            m = dict(ev.metrics)
            acc = {k2: v for k2, v in m.items() if re.fullmatch(r"eval/[^/]+/accuracy", k2)}
            return {"wall_s": time.perf_counter() - t0, "accuracy": acc, "metrics": m}

        note(f"s3: warm start done {timings}; evaluating iteration 0")
        res["iterations"].append({"iteration": 0, "evaluate": heldout(0, checkpoint)})
        note(f"s3: iteration 0 held-out {res['iterations'][0]['evaluate']['accuracy']}")
        save()
        table = "trajectories"
        # before iteration 1: a rollout of G x P trajectories next to an evaluation of max_problems, plus it
        ev0 = res["iterations"][0]["evaluate"]["wall_s"]
        last_iter_s = ev0 * (
            1 + pp.rollout.group_size * pp.rollout.problems_per_iteration / pp.eval.max_problems
        )
        for k in range(1, int(sc["iterations"]) + 1):
            now = time.perf_counter()
            if now + last_iter_s > deadline:
                res["stopped"] = f"time budget: iteration {k} would end after the section's deadline"
                break
            it: dict = {"iteration": k}
            res["iterations"].append(it)
            d = tmp / f"iter-{k}"
            t0 = time.perf_counter()
            ro = rollout.run(pp.rollout, {"problems": problems, "checkpoint": checkpoint, "iteration": str(k)},
                             d / "rollout")  # fmt: skip
            it["rollout_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scd = score.run(pp.score, {table: ro.uri(table), "problems": problems}, d / "score")
            it["score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            adv = advantages.run(pp.advantages, {table: scd.uri(table)}, d / "advantages")
            it["advantages_s"] = time.perf_counter() - t0
            it["samples"] = adv.tables["samples"].rows
            if adv.tables["samples"].rows:
                t0 = time.perf_counter()
                upd = update.run(
                    pp.update, {"samples": adv.uri("samples"), "checkpoint": checkpoint}, d / "update"
                )
                it["update_s"] = time.perf_counter() - t0
                checkpoint = upd.uri("checkpoint")
                it["update"] = {
                    k2: v for k2, v in upd.metrics.items() if k2.startswith(("actor/", "timing/"))
                }
            else:
                it["update_s"] = 0.0
                it["update"] = "skipped: every group tied"
            it["rollout"] = {k2: v for k2, v in ro.metrics.items() if k2.startswith(("rollout/", "timing/"))}
            it["reward"] = {k2: v for k2, v in scd.metrics.items() if k2.startswith("reward/")}
            save()
            note(
                f"s3: iteration {k}: rollout {it['rollout_s']:.1f} s, reward {it['reward'].get('reward/mean')}, "
                f"update {it['update_s']:.1f} s; evaluating"
            )
            it["evaluate"] = heldout(k, checkpoint)
            last_iter_s = time.perf_counter() - now
            it["iteration_s"] = last_iter_s
            save()
        try:
            res["seed_batching"] = seed_batching(sc["seed_bench"], problems)
        except Exception as e:  # noqa: BLE001
            res["seed_batching"] = {"error": err_text(e)}
        res["wall_s"] = time.perf_counter() - t_start
        save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sandbox_mode() -> dict:
    """The sandbox's isolation here: bwrap when its trial run works, else the fallback (rlimits + uid +
    seccomp), asked for by name (the stage refuses to fall back silently)."""
    from runtime.sandbox import isolation

    try:
        return {"mode": isolation.detect_mode()}
    except isolation.SandboxUnavailable as e:
        os.environ["TURNTREE_SANDBOX_MODE"] = "fallback"
        isolation.detect_mode.cache_clear()
        return {"mode": isolation.detect_mode(), "bwrap_unavailable": str(e)[:500]}


def seed_batching(sb: dict, problems_uri: str) -> dict:
    """The live transformers engine: ``n`` prompts in one generate call with one seed (one batch) vs one seed
    per request (as the TIR loop sends them: the engine batches only equal sampling specs)."""
    from maths import prompts
    from runtime.engines import SamplingSpec, live_engine
    from runtime.tableio import read_table
    from schemas.tables import PROBLEMS

    engine = live_engine()
    if engine is None:
        return {"error": "no live engine"}
    rows = [p for p in read_table(problems_uri, PROBLEMS).to_pylist() if p["split"] == "eval"][
        : sb["prompts"]
    ]
    ids = [prompts.initial_prompt_ids(engine.tokenizer, p) for p in rows]
    out = {"backend": engine.backend, "prompts": len(ids), "max_tokens": sb["max_tokens"]}
    for name, seeds in (("one_seed", [1] * len(ids)), ("seed_per_request", list(range(1, len(ids) + 1)))):
        specs = [SamplingSpec(n=1, temperature=1.0, max_tokens=sb["max_tokens"], stop=list(prompts.TIR_STOP), seed=s)
                 for s in seeds]  # fmt: skip
        t0 = time.perf_counter()
        gens = engine.generate(ids, specs)
        dt = time.perf_counter() - t0
        tokens = sum(len(g[0].token_ids) for g in gens)
        out[name] = {"s": dt, "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9)}
    out["speedup_one_seed"] = out["seed_per_request"]["s"] / max(out["one_seed"]["s"], 1e-9)
    return out


SECTION_FNS = {"s1": section_s1, "s2": section_s2, "s3": section_s3}


# --- a section in a child process ---------------------------------------------------------------------------------------
def run_section_child(name: str, cfg: dict, result: Path) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("turntree").setLevel(logging.INFO)
    res: dict = {"section": name, "status": "running"}

    def save():
        write_json(result, res)

    save()
    t0 = time.perf_counter()
    try:
        SECTION_FNS[name](cfg, res, save)
        res["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - recorded, then the child exits non-zero
        res["status"] = "error"
        res["error"] = err_text(e)
        res["traceback"] = traceback.format_exc()[-6000:]
    res["section_s"] = time.perf_counter() - t0
    save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if res["status"] == "ok" else 1)  # skip teardown (NCCL / engine threads)


# --- the parent ----------------------------------------------------------------------------------------------------------
def run_all(args) -> int:
    cfg = json.loads(json.dumps(CPU_CONFIG if args.cpu_smoke else GPU_CONFIG))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path, json_path = out / "gpu_check.log", out / "gpu_check.json"
    budget = float(args.budget_s or cfg["budget_s"])
    t_start = time.perf_counter()
    results: dict = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": sys.version.split()[0],
        "budget_s": budget,
        "sections": {},
    }
    write_json(json_path, results)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "TQDM_DISABLE": "1"}.items():  # fmt: skip
        env.setdefault(k, v)
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    with log_path.open("a") as log:
        for name in wanted:
            left = budget - (time.perf_counter() - t_start)
            if name == "s3":
                timeout = min(cfg["s3"]["timeout_max_s"], left - 5)
                if timeout < cfg["s3"]["timeout_min_s"]:
                    results["sections"][name] = {
                        "status": "skipped",
                        "why": f"{left:.0f} s left of the budget",
                    }
                    write_json(json_path, results)
                    continue
                cfg["s3_timeout_s"] = timeout
            else:
                timeout = min(cfg[name]["timeout_s"], max(left - 5, 10))
            result = out / f"section_{name}.json"
            log.write(f"\n===== {name} (timeout {timeout:.0f} s) {time.strftime('%H:%M:%S')} =====\n")
            log.flush()
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {name}: start (timeout {timeout:.0f} s)", flush=True
            )
            t0 = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "section", name, "--cfg", json.dumps(cfg),
                   "--result", str(result)]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)  # fmt: skip
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(
                    proc.pid, signal.SIGTERM
                )  # the section's own process group (its torchrun ranks too)
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
            try:
                sec = json.loads(result.read_text())
                result.unlink()
            except (OSError, json.JSONDecodeError) as e:
                sec = {"status": "error", "error": f"no result file ({e})"}
            if timed_out:
                sec["status"] = "timeout"
                sec["error"] = f"killed after {timeout:.0f} s (partial results kept)"
            sec["rc"] = rc
            sec["wall_s"] = time.perf_counter() - t0
            results["sections"][name] = sec
            results["elapsed_s"] = time.perf_counter() - t_start
            write_json(json_path, results)
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {name}: {sec['status']} in {sec['wall_s']:.0f} s",
                flush=True,
            )
            if sec["status"] != "ok":
                log.flush()
                tail = log_path.read_text(errors="replace")[-1500:]
                print(f"--- {name} log tail ---\n{tail}\n--- end ---", flush=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    write_json(json_path, results)
    print(summary(results), flush=True)
    return 0 if all(s.get("status") == "ok" for s in results["sections"].values()) else 1


def _f(x, fmt="{:.3g}"):
    return "-" if x is None else (fmt.format(x) if isinstance(x, int | float) else str(x))


def summary(results: dict) -> str:
    lines = [f"=== gpu_check ({results['mode']}), {results.get('elapsed_s', 0):.0f} s ==="]
    s1 = results["sections"].get("s1")
    if s1:
        env = s1.get("env", {})
        lines.append(f"env: {env.get('device_name')} torch {env.get('torch')} cuda {env.get('cuda')} "
                     f"transformers {env.get('transformers')} pydantic {env.get('pydantic')} python {env.get('python')}")  # fmt: skip
        lines.append(
            f"s1 [{s1.get('status')}] bf16 GEMM {_f(s1.get('gemm_tflops'), '{:.0f}')} TFLOP/s measured"
        )
        for name, r in (s1.get("shapes") or {}).items():
            b = r.get("best")
            if b:
                hf = r.get("hf_fwd_bwd_baseline") or {}
                lines.append(
                    f"  {name}: {r.get('n_params', 0) / 1e6:.0f}M params, {b['tokens']} tokens/update, "
                    f"train {b['tokens_per_s_train']:.0f} tok/s MFU {100 * b['mfu_train']:.1f}% | whole update "
                    f"{b['tokens_per_s_update']:.0f} tok/s MFU {100 * b['mfu_update']:.1f}% (pi_old {b['pi_old_s']:.2f} s, "
                    f"train {b['train_s']:.2f} s) | peak {b['max_memory_allocated_mb'] or b['peak_mem_train_mb']:.0f} MB"
                    f" | HF fwd+bwd ref MFU {_f(100 * hf['mfu'] if 'mfu' in hf else None, '{:.1f}')}%"
                )
            if r.get("error"):
                lines.append(f"  {name}: ERROR {r['error'][:300]}")
        if s1.get("error"):
            lines.append(f"  ERROR {s1['error'][:300]}")
    s2 = results["sections"].get("s2")
    if s2:
        lines.append(f"s2 [{s2.get('status')}] single loss/step: "
                     + ", ".join(f"{x['loss']:.5f}" for x in (s2.get("single") or {}).get("steps", [])))  # fmt: skip
        for kind in ("ddp", "fsdp2"):
            r = s2.get(kind) or {}
            c = r.get("compare") or {}
            if c:
                lines.append(
                    f"  {kind}: wrapped={r.get('wrapped')} match={c['match_bf16_tolerance']} losses "
                    + ", ".join(f"{x['loss_multi']:.5f}" for x in c["steps"])
                    + f" | weights rel-L2 {c['weights_rel_l2_diff_vs_update']:.2e} max|Δ| {c['weights_max_abs_diff']:.2e}"
                    + f" | {r.get('wall_s', 0):.0f} s"
                )
            elif r.get("error"):
                lines.append(f"  {kind}: ERROR {r['error'][:400]}")
        if s2.get("error"):
            lines.append(f"  ERROR {s2['error'][:300]}")
    s3 = results["sections"].get("s3")
    if s3 and s3.get("status") != "skipped":
        st = s3.get("setup", {})
        ws = s3.get("warmstart", {})
        lines.append(f"s3 [{s3.get('status')}] {_f(s3.get('n_params', 0) / 1e6, '{:.1f}')}M-param policy; "
                     f"setup {', '.join(f'{k} {v:.1f}' for k, v in st.items())}; "
                     f"warm start loss {_f(ws.get('actor/sft_loss_first'))} -> {_f(ws.get('actor/sft_loss_last', ws.get('actor/sft_loss')))}")  # fmt: skip
        lines.append(
            "  iter reward correct tools  held-out        rollout_s (tok/s)  score_s adv_s update_s eval_s"
        )
        for it in s3.get("iterations", []):
            ev = it.get("evaluate") or {}
            acc = next(iter((ev.get("accuracy") or {}).values()), None)
            rw = it.get("reward") or {}
            ro = it.get("rollout") or {}
            lines.append(
                f"  {it['iteration']:>4} {_f(rw.get('reward/mean'), '{:.3f}'):>6} {_f(rw.get('reward/correct_frac'), '{:.2f}'):>7} "
                f"{_f(ro.get('rollout/tool_calls_per_trajectory'), '{:.2f}'):>5}  {_f(acc, '{:.3f}'):>8}  "
                f"{_f(it.get('rollout_s'), '{:.1f}'):>9} ({_f(ro.get('rollout/tokens_per_s'), '{:.0f}')}) "
                f"{_f(it.get('score_s'), '{:.1f}'):>7} {_f(it.get('advantages_s'), '{:.1f}'):>5} "
                f"{_f(it.get('update_s'), '{:.1f}'):>8} {_f(ev.get('wall_s'), '{:.1f}'):>6}"
            )
        sb = s3.get("seed_batching") or {}
        if "speedup_one_seed" in sb:
            lines.append(f"  transformers engine, {sb['prompts']} prompts: one seed {sb['one_seed']['tokens_per_s']:.0f} tok/s vs "
                         f"seed per request {sb['seed_per_request']['tokens_per_s']:.0f} tok/s (x{sb['speedup_one_seed']:.1f} time)")  # fmt: skip
        if s3.get("stopped"):
            lines.append(f"  {s3['stopped']}")
        if s3.get("error"):
            lines.append(f"  ERROR {s3['error'][:400]}")
    for name, s in results["sections"].items():
        if s.get("status") in ("skipped", "timeout"):
            lines.append(f"{name}: {s['status']} ({s.get('why') or s.get('error')})")
    return "\n".join(lines)


# --- a venv with the GPU image's packages only (CPU smoke) ----------------------------------------------------------------
H200_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
# here only because this machine's newer versions need them (huggingface-hub 2.x; the GPU image has 1.33)
SIM_EXTRAS = "httpx2 httpcore2 truststore"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_simenv(target: Path) -> None:
    """A venv at ``target`` whose site-packages links only the distributions of this interpreter that the GPU
    image has (KINDS.md's list), plus the wheels carried in ``.whl/`` (linked from here, same versions)."""
    import importlib.metadata as md
    import sysconfig
    import venv

    carried = {_norm(p.name.split("-")[0]) for p in (REPO / ".whl").glob("*.whl")}
    allowed = {_norm(n) for n in H200_PACKAGES.split()} | carried | {_norm(n) for n in SIM_EXTRAS.split()}
    if target.exists():
        shutil.rmtree(target)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    here = Path(sysconfig.get_path("purelib"))
    linked, found = set(), set()
    for dist in md.distributions(path=[str(here)]):
        name = _norm(dist.metadata["Name"])
        if name not in allowed:
            continue
        found.add(name)
        tops = {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            if top in linked or top == "__pycache__" or top.endswith(".pth"):
                continue
            src = here / top
            if src.exists():
                (site / top).symlink_to(src)
                linked.add(top)
    print(f"simenv {target}: {len(found)} distributions linked; carried: {sorted(carried)}")
    print(f"  not on this machine: {sorted(allowed - found)[:20]} ...")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    sec = sub.add_parser("section", help="(internal) one section in this process")
    sec.add_argument("name", choices=SECTIONS)
    sec.add_argument("--cfg", required=True)
    sec.add_argument("--result", type=Path, required=True)
    sim = sub.add_parser("simenv", help="build a venv holding only the GPU image's packages")
    sim.add_argument("target", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (gloo)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default: 330 on GPU)")
    args = ap.parse_args()
    if args.cmd == "section":
        return run_section_child(args.name, json.loads(args.cfg), args.result)
    if args.cmd == "simenv":
        make_simenv(args.target)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
