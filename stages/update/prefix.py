"""Shared-prefix forward (``UpdateParams.shared_prefix``): samples that start with the same tokens — the G
samples of a GRPO group (one prompt), the nodes of a MURPHY tree (a child's prompt is its parent's prompt and
completion plus a feedback turn) — run those tokens through the model once per micro-batch. The gradient flows
back into the one pass, so the loss and its gradient are those of the plain padded forward (to float rounding;
tests/test_update.py). Two ways:

- ``packed_logprobs`` (the micro-batch's ``PrefixTrie`` has ≤ ``PACK_MAX`` nodes): one row holding every
  distinct prefix once — each token at its own position, under a 4-D mask that lets it see its ancestors only
  (a tree mask; no padding at all) — and logits only for the nodes the loss reads. Cost: T trie nodes instead
  of B·Lmax positions (the bench's GRPO shape: ~520 vs ~1,200; a MURPHY sibling set: its shared ancestry once).
- ``forward_shared`` (larger tries): the rows' common prefix once with a KV cache repeated per row, the rests
  right-padded.

Micro-batches are formed by prompt first (``micro_key``), then length, so that a micro-batch holds one group's
samples (``minibatch_by="problem"`` keeps a group's or tree's samples in one minibatch). One process only (a
DDP/FSDP2 world takes the plain forward: two forwards before one backward are not what their hooks expect).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import torch

# Below this many shared tokens the second call's overhead is not worth it: the plain forward runs.
MIN_SHARED = 8
# Packed rows up to this many trie nodes: the dense T×T mask and attention stay small beside T positions' matmuls.
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


def shared_logprobs(
    model: torch.nn.Module,
    b: dict[str, torch.Tensor],
    keep: int,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(B, L) log-probs and detached entropies of a micro-batch's trained tokens by the way that fits (module
    docstring): its prefix trie packed, or its common prefix as a repeated KV cache; None when its samples share
    fewer than ``MIN_SHARED`` tokens (the caller runs the plain forward). ``keep``: ``logits_needed(mask)``."""
    from maths.policy_loss import selected_logprobs

    trie = micro_batch_trie(b)
    if int(b["attention_mask"].sum()) - len(trie) >= MIN_SHARED and len(trie) <= PACK_MAX:
        return packed_logprobs(model, b, trie, autocast)
    n = shared_len(b)
    if n >= MIN_SHARED:
        return selected_logprobs(forward_shared(model, b, n, keep, autocast), b["input_ids"], b["mask"])
    return None


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


class PrefixTrie:
    """The rows of a micro-batch with every common token prefix once: node k is one token (``tokens[k]``) at
    position ``depth[k]`` whose context is the path of ``parents`` up to the root (−1). ``node_of[i][t]``: the
    node of row i's token t. Rows that share a prompt (a GRPO group) share its nodes; a MURPHY child, whose
    prompt is its parent's prompt and completion plus a feedback turn, shares its whole ancestry. Node ids grow
    along every path (a parent is created before its children)."""

    def __init__(self, rows: list[list[int]]):
        index: dict[tuple[int, int], int] = {}
        self.tokens: list[int] = []
        self.parents: list[int] = []
        self.depth: list[int] = []
        self.node_of: list[list[int]] = []
        for row in rows:
            cur, path = -1, []
            for t, tok in enumerate(row):
                nxt = index.get((cur, tok))
                if nxt is None:
                    nxt = index[cur, tok] = len(self.tokens)
                    self.tokens.append(tok)
                    self.parents.append(cur)
                    self.depth.append(t)
                path.append(nxt)
                cur = nxt
            self.node_of.append(path)

    def __len__(self) -> int:
        return len(self.tokens)

    def ancestry_mask(self, device: torch.device) -> torch.Tensor:
        """(T, T) bool: node a may attend to node b iff b is a or one of a's ancestors (a tree mask, causal
        along every path)."""
        n = len(self.tokens)
        allowed = torch.zeros(n, n, dtype=torch.bool)
        for a, p in enumerate(self.parents):
            if p >= 0:
                allowed[a, : p + 1] = allowed[p, : p + 1]
            allowed[a, a] = True
        return allowed.to(device)


def micro_batch_trie(b: dict[str, torch.Tensor]) -> PrefixTrie:
    """The prefix trie of a collated micro-batch's rows (padding left out)."""
    lengths = b["attention_mask"].sum(1).tolist()
    ids = b["input_ids"].tolist()
    return PrefixTrie([row[:n] for row, n in zip(ids, lengths, strict=True)])


def packed_logprobs(
    model: torch.nn.Module,
    b: dict[str, torch.Tensor],
    trie: PrefixTrie,
    autocast: Callable[[], AbstractContextManager],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log-probs and detached entropies of the trained tokens (0 elsewhere), like
    ``selected_logprobs`` on the plain forward, from one packed row: the micro-batch's prefix trie, each node
    at its own position, under its ancestry mask, and logits only for the nodes the loss reads (a node shared
    by rows whose next tokens differ gives each row its own log-prob; their gradients add up in it)."""
    from maths.policy_loss import row_logprobs

    ids, mask = b["input_ids"], b["mask"]
    dev = ids.device
    allowed = trie.ancestry_mask(dev)
    if getattr(model.config, "_attn_implementation", "sdpa") == "sdpa":
        attn = allowed[None, None]
    else:  # eager and others add the mask to the scores
        dtype = next(model.parameters()).dtype
        attn = torch.zeros(allowed.shape, dtype=dtype, device=dev).masked_fill_(
            ~allowed, torch.finfo(dtype).min
        )[None, None]
    bi, ti = (mask != 0).nonzero(as_tuple=True)
    keep = torch.tensor(
        [trie.node_of[i][t - 1] for i, t in zip(bi.tolist(), ti.tolist(), strict=True)],
        dtype=torch.long,
        device=dev,
    )  # the node whose logit predicts (bi, ti)
    with autocast():
        logits = model(
            input_ids=torch.tensor(trie.tokens, device=dev)[None],
            position_ids=torch.tensor(trie.depth, device=dev)[None],
            attention_mask=attn,
            use_cache=False,
            logits_to_keep=keep,
        ).logits
    lp_sel, ent_sel = row_logprobs(logits, ids[bi, ti])
    lp = torch.zeros(ids.shape, dtype=lp_sel.dtype, device=dev).index_put((bi, ti), lp_sel)
    ent = torch.zeros(ids.shape, dtype=ent_sel.dtype, device=dev).index_put((bi, ti), ent_sel)
    return lp, ent
