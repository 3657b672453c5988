"""Warm-start stage (optional, before iteration 1): supervised fine-tuning on tool-using demonstrations.

    run(params: WarmstartParams, {"problems": uri, "checkpoint": dir}, out)
        -> StageOutput(tables={"checkpoint": <out>/checkpoint}, metrics=actor/sft_*, timing/warmstart)

A small model does not know the turn format (reason, write a ```python block, read the ```output block,
answer); a short SFT on reference transcripts teaches it before RL, as ReTool-style cold starts do.

Examples come from ``maths.prompts.demonstration_ids`` (the one tokenisation shared with the rollout): the
initial chat prompt (loss mask 0), then the demonstration's completions (mask 1) and ```output observations
(mask 0), closed by eos (mask 1). Synthetic tool-arith problems carry a ``demonstration``; a code problem
without one (func-synth, MBPP, …) uses its ``reference_solution`` as a single python block. Problems with
neither are skipped; none at all is an error (nothing written).

The loss is the token-mean negative log-likelihood over mask-1 tokens of each minibatch (gradient
accumulation over length-sorted micro-batches), AdamW with linear warmup, gradient clipping. The checkpoint's
``trainer_state.pt`` has step 0 and no optimizer state, so the RL update starts with a fresh optimizer.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

import torch

from maths.policy_loss import aggregate, logits_needed, selected_logprobs
from runtime import checkpoint as ckpt
from runtime import progress, warmstart_cache
from runtime.devices import PeakMemory, resolve_device
from runtime.tableio import read_table
from schemas.outputs import StageOutput
from schemas.params.update import WarmstartParams
from schemas.tables import PROBLEMS

STAGE = "warmstart"


class NoDemonstrationsError(ValueError):
    """The problems table has no usable demonstration for the warm start."""


def demonstration_examples(tokenizer, problems: list[dict], max_len: int) -> tuple[list[tuple], list[str]]:
    """[(input_ids (L,), loss_mask (L,))] of every problem with a demonstration, and notes on skipped ones.

    The single place warm start tokenises: ``maths.prompts.demonstration_ids`` (rollout layout).
    """
    from maths.prompts import demonstration_ids

    examples, skipped_long = [], 0
    for p in problems:
        ids, mask = demonstration_ids(tokenizer, p)
        if not ids or not any(mask):
            continue
        if len(ids) > max_len:
            skipped_long += 1
            continue
        examples.append((ids, mask))
    notes = [f"{skipped_long} demonstration(s) longer than {max_len} tokens skipped"] if skipped_long else []
    return examples, notes


def sft_loss(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, n_tokens: float
) -> torch.Tensor:
    """Σ −log π(token) over mask-1 tokens / ``n_tokens`` (the minibatch's trained-token count).
    logits (B, K, V) of the last K positions (K ≥ ``logits_needed(mask)``; the model's ``logits_to_keep``);
    input_ids, mask (B, L). The log-softmax is the update's chunked selective one (never a full fp32 (B, L, V))."""
    lp, _ = selected_logprobs(logits, input_ids, mask)
    return aggregate(-lp, mask, "token-mean", n_tokens=n_tokens)


def _collate(batch: list[tuple], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Right-padded (input_ids, attention_mask, loss mask), each (B, Lmax)."""
    lmax = max(len(ids) for ids, _ in batch)
    ids = torch.zeros(len(batch), lmax, dtype=torch.long)
    attn = torch.zeros(len(batch), lmax, dtype=torch.long)
    mask = torch.zeros(len(batch), lmax, dtype=torch.float32)
    for i, (x, m) in enumerate(batch):
        ids[i, : len(x)], attn[i, : len(x)], mask[i, : len(x)] = torch.tensor(x), 1, torch.tensor(m)
    return ids.to(device), attn.to(device), mask.to(device)


def run(params: WarmstartParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Fine-tune the checkpoint on the problems' demonstrations; write the new checkpoint.

    With ``params.cache`` the result is also kept in a cache keyed by the content of the starting checkpoint
    and of the problems table, the parameters and this module's code, and a later run with the same key copies
    it instead of training again (``warmstart/cache_hit`` = 1)."""
    for key in ("problems", "checkpoint"):
        if key not in inputs:
            raise KeyError(f"warmstart stage needs input {key!r}; got {sorted(inputs)}")
    if params.cache:
        return warmstart_cache.cached_run(params, inputs, Path(out), _train, Path(__file__).read_text())
    return _train(params, inputs, Path(out))


def _train(params: WarmstartParams, inputs: dict[str, str], out: Path) -> StageOutput:
    t0 = time.perf_counter()
    source = ckpt.check_checkpoint(inputs["checkpoint"])
    problems = read_table(inputs["problems"], PROBLEMS).to_pylist()
    if params.split != "any":
        problems = [p for p in problems if p["split"] == params.split]
    tokenizer = ckpt.load_tokenizer(source)
    device, amp_dtype = resolve_device(params.device, params.dtype)
    model = ckpt.load_model(source, device=device)
    max_len = int(getattr(model.config, "max_position_embeddings", 2048) or 2048)
    examples, notes = demonstration_examples(tokenizer, problems, max_len)
    if not examples:
        raise NoDemonstrationsError(
            f"{inputs['problems']}: no {params.split!r} problem has a demonstration or a code reference_solution"
        )
    rng = random.Random(params.seed)
    if params.max_examples:
        examples = rng.sample(examples, min(params.max_examples, len(examples)))

    opt = torch.optim.AdamW(model.parameters(), lr=params.lr, weight_decay=0.0)
    warm = params.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if warm == 0 else min(1.0, (s + 1) / warm))
    autocast = (
        torch.autocast(device.type, dtype=amp_dtype)
        if amp_dtype
        else torch.autocast(device.type, enabled=False)
    )
    stream: list[tuple] = []
    losses, tokens_seen = [], 0
    t1 = time.perf_counter()
    with PeakMemory(device) as mem:
        for _ in range(params.steps):
            batch = []
            while len(batch) < params.batch_size:
                if not stream:
                    stream = rng.sample(examples, len(examples))  # a fresh shuffled epoch
                batch.append(stream.pop())
            n_tokens = float(sum(sum(m) for _, m in batch))
            opt.zero_grad(set_to_none=True)
            step_loss = 0.0
            batch.sort(key=lambda e: len(e[0]))
            for i in range(0, len(batch), params.micro_batch_size):
                ids, attn, mask = _collate(batch[i : i + params.micro_batch_size], device)
                with autocast:  # logits only from the first trained position on
                    logits = model(
                        input_ids=ids,
                        attention_mask=attn,
                        use_cache=False,
                        logits_to_keep=logits_needed(mask),
                    ).logits
                loss = sft_loss(logits, ids, mask, n_tokens)
                loss.backward()
                step_loss += float(loss.detach())
                tokens_seen += int(attn.sum())
            torch.nn.utils.clip_grad_norm_(model.parameters(), params.max_grad_norm)
            opt.step()
            sched.step()
            losses.append(step_loss)
            progress.report("warmstart", len(losses), params.steps, f"SFT loss {step_loss:.3f}")
    t_train = time.perf_counter() - t1
    state = {"step": 0, "update_idx": 0, "lineage": str(source), "lora_base": None, "rng": ckpt.capture_rng()}
    state["warmstart"] = {"steps": params.steps, "examples": len(examples), "final_loss": losses[-1]}
    ref = ckpt.save_checkpoint(Path(out) / "checkpoint", model, tokenizer_from=source, trainer_state=state)
    metrics = {
        "actor/sft_loss_first": losses[0],
        "actor/sft_loss_last": losses[-1],
        "actor/sft_examples": float(len(examples)),
        "actor/tokens_per_s": tokens_seen / max(t_train, 1e-9),
        "actor/peak_mem_mb": mem.peak_mb,
        "timing/warmstart": time.perf_counter() - t0,
    }
    notes.append(
        f"SFT on {len(examples)} demonstrations, {params.steps} steps, loss {losses[0]:.3f} -> {losses[-1]:.3f}"
    )
    return StageOutput(stage=STAGE, tables={"checkpoint": ref}, metrics=metrics, notes=notes)
