"""Shared-prefix forward (``UpdateParams.shared_prefix``): the G samples of a GRPO group start with the same
prompt; a micro-batch of them runs that prompt through the model once and its completions against the prompt's
key/value cache, repeated per row. The gradient flows back through the cache into the one prompt pass, so the
loss and its gradient are those of the plain padded forward (to float rounding; tests/test_update.py), at the
cost of ``P + B·(L − P)`` token positions instead of ``B·L``. With the tool-arith system prompt (~95 tokens)
and GRPO completions of ~50 tokens, that is about half the update's compute.

Micro-batches are formed by prompt first (``micro_key``), then length, so that a micro-batch holds one group's
samples. One process only (a DDP/FSDP2 world takes the plain forward: two forwards before one backward are not
what their hooks expect).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

# Below this many shared tokens the second call's overhead is not worth it: the plain forward runs.
MIN_SHARED = 8


def micro_key(sample) -> tuple[tuple[int, ...], int]:
    """Sort key of a sample within a minibatch: its tokens before the first trained one, then its length."""
    nz = sample.mask.nonzero()
    first = int(nz[0]) if nz.numel() else len(sample)
    return tuple(sample.input_ids[:first].tolist()), len(sample)


def shared_len(b: dict[str, torch.Tensor]) -> int:
    """Tokens every row of a collated micro-batch shares at its start and that no trained position needs a
    logit from: ≤ the common prefix, ≤ (first trained position − 1) and ≤ (length − 1) of every row."""
    ids, mask = b["input_ids"], b["mask"]
    if ids.shape[0] < 2:
        return 0
    same = (ids == ids[:1]).all(0).long().cumprod(0)
    common = int(same.sum())
    trained = mask != 0
    first = torch.where(
        trained.any(1),
        trained.int().argmax(1),
        torch.full_like(trained[:, 0], ids.shape[1], dtype=torch.long),
    )
    cap = min(int(first.min()) - 1, int(b["attention_mask"].sum(1).min()) - 1)
    return max(0, min(common, cap))


def forward_shared(
    model: torch.nn.Module,
    b: dict[str, torch.Tensor],
    prefix: int,
    keep: int,
    autocast: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """(B, keep, V) logits of the last ``keep`` positions (``keep`` ≤ L − ``prefix``), the first ``prefix``
    tokens run once (batch 1) and their cache repeated for the B rows."""
    ids = b["input_ids"]
    n = ids.shape[0]
    if keep > ids.shape[1] - prefix:
        raise ValueError(
            f"forward_shared: {keep} logit rows requested, only {ids.shape[1] - prefix} after the prefix"
        )
    with autocast():
        head = model(input_ids=ids[:1, :prefix], use_cache=True)
        cache = head.past_key_values
        cache.batch_repeat_interleave(n)
        return model(
            input_ids=ids[:, prefix:],
            attention_mask=b["attention_mask"],
            past_key_values=cache,
            use_cache=True,
            logits_to_keep=keep,
        ).logits
