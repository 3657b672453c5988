"""Shared-prefix forward (``UpdateParams.shared_prefix``): the G samples of a GRPO group start with the same
prompt; a micro-batch of them runs that prompt through the model once. The gradient flows back into the one
prompt pass, so the loss and its gradient are those of the plain padded forward (to float rounding;
tests/test_update.py). Two ways, by packed length T = P + Σ(Lᵢ − P):

- ``packed_logprobs`` (T ≤ ``PACK_MAX``): one row of T tokens — the prompt once, then each sample's rest —
  with position ids that restart after the prompt for every sample and a 4-D mask under which a sample's
  tokens see the prompt and their own earlier tokens only (a tree mask; no padding at all), and logits only for
  the positions the loss reads. Cost: T positions instead of B·Lmax (the bench's GRPO shape: ~520 vs ~1,200).
- ``forward_shared`` (longer): the prompt once with a KV cache repeated per row, the rests right-padded.

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
# Packed rows up to this length: its dense T×T mask and attention stay small beside the T positions' matmuls.
PACK_MAX = 1024


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


def packed_length(b: dict[str, torch.Tensor], prefix: int) -> int:
    """T of ``packed_logprobs``: the prefix once plus every row's tokens after it."""
    return prefix + int((b["attention_mask"].sum(1) - prefix).sum())


def packed_logprobs(
    model: torch.nn.Module,
    b: dict[str, torch.Tensor],
    prefix: int,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log-probs and detached entropies of the trained tokens (0 elsewhere), like
    ``selected_logprobs`` on the plain forward, from one packed row (module docstring)."""
    from maths.policy_loss import row_logprobs

    ids, mask = b["input_ids"], b["mask"]
    dev = ids.device
    lengths = b["attention_mask"].sum(1).tolist()
    parts, pos, seg, starts, off = (
        [ids[0, :prefix]],
        [torch.arange(prefix)],
        [torch.full((prefix,), -1)],
        [],
        prefix,
    )
    for i, n in enumerate(lengths):
        parts.append(ids[i, prefix:n])
        pos.append(torch.arange(prefix, n))
        seg.append(torch.full((n - prefix,), i))
        starts.append(off)
        off += n - prefix
    seg_t = torch.cat(seg).to(dev)
    allowed = torch.ones(off, off, dtype=torch.bool, device=dev).tril_()
    allowed &= (seg_t[None, :] == -1) | (seg_t[None, :] == seg_t[:, None])
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        attn = allowed[None, None]
    else:  # eager and others add the mask to the scores
        dtype = next(model.parameters()).dtype
        attn = torch.zeros(off, off, dtype=dtype, device=dev).masked_fill_(~allowed, torch.finfo(dtype).min)[
            None, None
        ]
    bi, ti = (mask != 0).nonzero(as_tuple=True)
    keep = (
        torch.tensor(starts, device=dev)[bi] + ti - 1 - prefix
    )  # the packed position whose logit predicts (bi, ti)
    with autocast():
        logits = model(
            input_ids=torch.cat(parts)[None],
            position_ids=torch.cat(pos).to(dev)[None],
            attention_mask=attn,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
    lp_sel, ent_sel = row_logprobs(logits, ids[bi, ti])
    lp = torch.zeros(ids.shape, dtype=lp_sel.dtype, device=dev).index_put((bi, ti), lp_sel)
    ent = torch.zeros(ids.shape, dtype=ent_sel.dtype, device=dev).index_put((bi, ti), ent_sel)
    return lp, ent
