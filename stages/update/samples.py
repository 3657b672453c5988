"""Training samples for the update stage: reading and checking the samples table, padding, data order.

load_samples(uri) -> list[Sample]            SamplesError naming the row and field on bad input
minibatches(n, params, update_idx, epoch, groups)  shuffled index lists, a pure function of (seed, update, epoch)
micro_batches(samples, size)                  length-sorted chunks (padding stays small)
collate(samples, device, pad_id)              right-padded (B, Lmax) tensors
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch

from runtime.tableio import read_table
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES


class SamplesError(ValueError):
    """The samples table cannot be trained on (empty, inconsistent lengths, NaN values, ...)."""


# --- samples -----------------------------------------------------------------------------------------------------
@dataclass
class Sample:
    """One training sequence. All tensors (L,): token ids, loss mask (float 0/1), advantages, rollout log-probs;
    ``old_logp`` / ``ref_logp`` are filled by the trainer; ``group``: its problem (a GRPO group's or a MURPHY
    tree's samples share it; ``minibatch_by="problem"``)."""

    sample_id: str
    input_ids: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    rollout_logp: torch.Tensor
    old_logp: torch.Tensor | None = None
    ref_logp: torch.Tensor | None = None
    group: str = ""

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


def load_samples(uri: str) -> list[Sample]:
    """Read and check the samples table; raise SamplesError naming the first bad row and field."""
    try:
        table = read_table(uri, SAMPLES)
    except FileNotFoundError as e:
        raise SamplesError(str(e)) from None
    except ValueError as e:  # SchemaError: wrong table, columns or types
        raise SamplesError(f"samples table {uri} does not match the samples schema: {e}") from None
    if table.num_rows == 0:
        raise SamplesError(f"samples table {uri} is empty: nothing to train on")
    out = []
    for row in table.to_pylist():
        sid = row["sample_id"]
        ids, mask = row["input_ids"], row["loss_mask"]
        adv, lp = row["advantages"], row["rollout_logprobs"]
        n = len(ids)
        if n < 2:
            raise SamplesError(f"sample {sid!r}: input_ids has {n} tokens; need at least 2")
        for name, col in (("loss_mask", mask), ("advantages", adv), ("rollout_logprobs", lp)):
            if len(col) != n:
                raise SamplesError(f"sample {sid!r}: {name} has length {len(col)}, input_ids {n}")
        if any(m not in (0, 1) for m in mask):
            raise SamplesError(f"sample {sid!r}: loss_mask must be 0/1")
        if mask[0]:
            raise SamplesError(
                f"sample {sid!r}: loss_mask[0] is 1; the first token has no context to train on"
            )
        a, r = np.asarray(adv, dtype=np.float32), np.asarray(lp, dtype=np.float32)
        if not np.isfinite(a).all():
            raise SamplesError(
                f"sample {sid!r}: advantages has non-finite values at {np.flatnonzero(~np.isfinite(a))[:5].tolist()}"
            )
        m = np.asarray(mask, dtype=bool)
        if not np.isfinite(r[m]).all() or (r[m] > 1e-4).any():
            raise SamplesError(f"sample {sid!r}: rollout_logprobs must be finite and <= 0 on trained tokens")
        out.append(
            Sample(
                sample_id=sid,
                input_ids=torch.tensor(ids, dtype=torch.long),
                mask=torch.tensor(mask, dtype=torch.float32),
                advantages=torch.from_numpy(a),
                rollout_logp=torch.from_numpy(np.where(m, r, 0.0).astype(np.float32)),
                group=str(row["problem_id"]),
            )
        )
    if sum(float(s.mask.sum()) for s in out) == 0:
        raise SamplesError(f"samples table {uri}: no row has a trained token (loss_mask is all 0)")
    return out


def collate(batch: list[Sample], device: torch.device, pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids / attention_mask / mask / advantages / *_logp, all (B, Lmax)."""
    lmax = max(len(s) for s in batch)

    def pad(get, value, dtype):
        t = torch.full((len(batch), lmax), value, dtype=dtype)
        for i, s in enumerate(batch):
            x = get(s)
            t[i, : x.shape[0]] = x
        return t.to(device)

    out = {
        "input_ids": pad(lambda s: s.input_ids, pad_id, torch.long),
        "attention_mask": pad(lambda s: torch.ones(len(s), dtype=torch.long), 0, torch.long),
        "mask": pad(lambda s: s.mask, 0.0, torch.float32),
        "advantages": pad(lambda s: s.advantages, 0.0, torch.float32),
        "rollout_logp": pad(lambda s: s.rollout_logp, 0.0, torch.float32),
    }
    if batch[0].old_logp is not None:
        out["old_logp"] = pad(lambda s: s.old_logp, 0.0, torch.float32)
    if batch[0].ref_logp is not None:
        out["ref_logp"] = pad(lambda s: s.ref_logp, 0.0, torch.float32)
    return out


def order_seed(seed: int, update_idx: int, epoch: int) -> int:
    """Seed of the data order of one epoch: a pure function of (seed, update index, epoch)."""
    return int.from_bytes(hashlib.sha256(f"{seed}/{update_idx}/{epoch}".encode()).digest()[:8], "little") >> 1


def minibatches(
    n: int, params: UpdateParams, update_idx: int, epoch: int, groups: list[str] | None = None
) -> list[list[int]]:
    """Sample indices of each minibatch of one epoch (shuffled reproducibly). ``minibatch_by="problem"`` (with
    ``groups``, each sample's problem; "" for none): the problems are shuffled, each keeps its samples together
    in their given order, and the concatenation is cut into minibatches of ``minibatch_size`` samples."""
    g = torch.Generator().manual_seed(order_seed(params.seed, update_idx, epoch))
    if params.minibatch_by == "problem" and groups is not None:
        if len(groups) != n:
            raise ValueError(f"minibatches: {len(groups)} groups for {n} samples")
        members: dict[str, list[int]] = {}
        for i, k in enumerate(groups):
            members.setdefault(k or f"\0{i}", []).append(i)  # no problem named: a group of its own
        keys = list(members)
        perm = [i for j in torch.randperm(len(keys), generator=g).tolist() for i in members[keys[j]]]
    else:
        perm = torch.randperm(n, generator=g).tolist()
    return [perm[i : i + params.minibatch_size] for i in range(0, n, params.minibatch_size)]


def micro_batches(samples: list[Sample], size: int) -> list[list[Sample]]:
    """Length-sorted chunks of ``size`` (stable sort: ties keep their shuffled order)."""
    s = sorted(samples, key=len)
    return [s[i : i + size] for i in range(0, len(s), size)]
