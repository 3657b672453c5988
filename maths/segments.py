"""Vectorised segment arithmetic shared by the reward and advantage code: group ids to dense codes, and the
group z-score of docs/algorithms.md (sample std with ddof = 1, ε = 1e-6, a one-member set gets 0).

Everything works on flat numpy arrays plus a dense "set code" per element; no Python loop runs over elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EPS = 1e-6


def contiguous_runs(group_ids) -> np.ndarray | None:
    """(G + 1,) run boundaries when each distinct id of a numpy array occupies one contiguous run (the order
    rollouts write groups in), else None. Costs one pass of comparisons plus a check on the G run keys."""
    if not isinstance(group_ids, np.ndarray) or group_ids.ndim != 1 or group_ids.dtype.kind not in "iuUSO":
        return None
    ids = group_ids
    if ids.size == 0:
        return None
    starts = np.flatnonzero(ids[1:] != ids[:-1]) + 1
    keys = ids[np.concatenate(([0], starts))]
    if ids.dtype.kind in "iu":
        unique = bool(np.all(keys[1:] > keys[:-1])) or np.unique(keys).size == keys.size
    else:
        key_set = set(keys.tolist())
        if None in key_set or "" in key_set:
            return None  # let group_codes name the bad row
        unique = len(key_set) == keys.size
    if not unique:
        return None
    return np.concatenate(([0], starts, [ids.size])).astype(np.int64)


def group_codes(group_ids, *, what: str = "group_ids") -> tuple[np.ndarray, int]:
    """Dense int64 codes (N,) in order of first appearance, and the number of distinct ids.

    ``group_ids`` (N,): strings or ints, as a list, numpy array or pyarrow array. A numpy array whose equal ids
    sit next to each other (rollout order) takes a sort-free run path; anything else is hash-encoded by
    pyarrow (also sort-free). A null or empty-string id is an error naming its row.
    """
    if isinstance(group_ids, np.ndarray) and group_ids.size == 0:
        return np.zeros(0, np.int64), 0
    runs = contiguous_runs(group_ids)
    if runs is not None:
        return np.repeat(np.arange(runs.size - 1), np.diff(runs)), runs.size - 1
    if isinstance(group_ids, pa.ChunkedArray):
        arr = group_ids.combine_chunks()
    elif isinstance(group_ids, pa.Array):
        arr = group_ids
    else:
        try:
            arr = pa.array(
                group_ids
                if not isinstance(group_ids, np.ndarray) or group_ids.dtype != object
                else group_ids.tolist()
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"{what}: ids must all be strings or all ints ({e})") from None
    if arr.null_count:
        row = int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"{what}[{row}] is missing (null): every row needs a group")
    if pa.types.is_string(arr.type) or pa.types.is_large_string(arr.type):
        empty = pc.equal(pc.utf8_length(arr), 0).to_numpy(zero_copy_only=False)
        if empty.any():
            raise ValueError(
                f"{what}[{int(np.flatnonzero(empty)[0])}] is an empty string: every row needs a group"
            )
    enc = pc.dictionary_encode(arr)
    return enc.indices.to_numpy(zero_copy_only=False).astype(np.int64, copy=False), len(enc.dictionary)


def check_finite(values: np.ndarray, *, what: str, ids: Sequence | np.ndarray | None = None) -> None:
    """Raise ValueError naming the first row whose value is NaN or infinite."""
    bad = ~np.isfinite(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        label = f" ({ids[row]!r})" if ids is not None else ""
        raise ValueError(f"{what}[{row}]{label} is {values[row]}: rewards must be finite numbers")


def segment_zscore(
    values: np.ndarray, codes: np.ndarray, n_sets: int, *, scale_by_std: bool = True, eps: float = EPS
) -> np.ndarray:
    """(v − mean_S v) / (std_S v + ε) per normalisation set S (Dr.GRPO: no division).

    values (N,) float64; codes (N,) int64 in [0, n_sets): the set of each element. std is the sample std
    (ddof = 1); a set with one member, or whose values all tie, gets exactly 0. Each value is first shifted by a
    member of its own set, so tied sets cancel exactly and large offsets do not cost precision.
    """
    v = np.asarray(values, np.float64)
    if v.size == 0:
        return np.zeros(0)
    step = np.diff(codes)
    if step.size == 0 or (step.min() >= 0 and step.max() <= 1):  # sets stored as runs in code order
        bounds = np.concatenate(([0], np.flatnonzero(step) + 1, [v.size]))
        return runs_zscore(v, bounds, scale_by_std=scale_by_std, eps=eps)
    rep = np.empty(n_sets)
    rep[codes] = v  # some member of each set (the last one written)
    d = v - rep[codes]
    count = np.bincount(codes, minlength=n_sets).astype(np.float64)
    mean = np.bincount(codes, weights=d, minlength=n_sets) / np.maximum(count, 1.0)
    centred = d - mean[codes]
    if not scale_by_std:
        return centred  # a one-member set has d = 0 exactly
    ss = np.bincount(codes, weights=centred * centred, minlength=n_sets)
    std = np.sqrt(ss / np.maximum(count - 1.0, 1.0))
    return centred / (std[codes] + eps)


def runs_zscore(
    values: np.ndarray, bounds: np.ndarray, *, scale_by_std: bool = True, eps: float = EPS
) -> np.ndarray:
    """``segment_zscore`` for sets stored as contiguous runs: values (N,), bounds (G + 1,) run boundaries.

    Same arithmetic (shift by the run's first member, ddof = 1, one member -> 0) with reduceat and repeat
    instead of scatter/gather: the fast path for rollout-ordered groups."""
    v = np.asarray(values, np.float64)
    counts = np.diff(bounds)
    starts = bounds[:-1]
    d = v - np.repeat(v[starts], counts)
    mean = np.add.reduceat(d, starts) / counts
    centred = d - np.repeat(mean, counts)
    if not scale_by_std:
        return centred
    std = np.sqrt(np.add.reduceat(centred * centred, starts) / np.maximum(counts - 1, 1))
    return centred / np.repeat(std + eps, counts)


def set_has_signal(adv: np.ndarray, codes: np.ndarray, n_sets: int) -> np.ndarray:
    """(n_sets,) bool: whether any member of the set has a non-zero advantage."""
    return np.bincount(codes, weights=(adv != 0).astype(np.float64), minlength=n_sets) > 0


def set_outcomes_differ(values: np.ndarray, codes: np.ndarray, n_sets: int) -> np.ndarray:
    """(n_sets,) bool: whether the set's members do not all share one value (a set of one never differs)."""
    high = np.full(n_sets, -np.inf)
    low = np.full(n_sets, np.inf)
    np.maximum.at(high, codes, values)
    np.minimum.at(low, codes, values)
    return high > low


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    """(K + 1,) int64 offsets of K consecutive segments with the given lengths."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def turn_positions(lengths: np.ndarray) -> np.ndarray:
    """(M,) 0-based position of each flat element within its segment, for segments of the given lengths."""
    offsets = segment_starts(lengths)
    return np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
