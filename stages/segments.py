"""Vectorised segment arithmetic shared by the reward and advantage code: group ids to dense codes, and the
group z-score of ../shared/ALGORITHMS.md (sample std with ddof = 1, ε = 1e-6, a one-member set gets 0).

Everything works on flat numpy arrays plus a dense "set code" per element; no Python loop runs over elements.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

EPS = 1e-6


def group_codes(group_ids, *, what: str = "group_ids") -> tuple[np.ndarray, int]:
    """Dense int64 codes (N,) in order of first appearance, and the number of distinct ids.

    ``group_ids`` (N,): strings or ints, as a list, numpy array or pyarrow array. Integer numpy input whose
    equal ids sit next to each other (rollout order) takes a sort-free path; anything else is hash-encoded
    by pyarrow (also sort-free). A null or empty-string id is an error naming its row.
    """
    if isinstance(group_ids, np.ndarray) and group_ids.dtype.kind in "iu":
        ids = group_ids.reshape(-1)
        if ids.size == 0:
            return np.zeros(0, np.int64), 0
        change = ids[1:] != ids[:-1]
        starts = np.flatnonzero(change) + 1
        run_keys = ids[np.concatenate(([0], starts))]
        if np.unique(run_keys).size == run_keys.size:  # every id forms one contiguous run
            codes = np.zeros(ids.size, np.int64)
            codes[starts] = 1
            return np.cumsum(codes, out=codes), int(run_keys.size)
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
    rep = np.empty(n_sets)
    rep[codes] = v  # some member of each set (the last one written)
    d = v - rep[codes]
    count = np.bincount(codes, minlength=n_sets).astype(np.float64)
    mean = np.bincount(codes, weights=d, minlength=n_sets) / np.maximum(count, 1.0)
    centred = d - mean[codes]
    if not scale_by_std:
        return np.where(count[codes] > 1, centred, 0.0)
    ss = np.bincount(codes, weights=centred * centred, minlength=n_sets)
    std = np.sqrt(ss / np.maximum(count - 1.0, 1.0))
    return np.where(count[codes] > 1, centred / (std[codes] + eps), 0.0)


def set_has_signal(adv: np.ndarray, codes: np.ndarray, n_sets: int) -> np.ndarray:
    """(n_sets,) bool: whether any member of the set has a non-zero advantage."""
    return np.bincount(codes, weights=(adv != 0).astype(np.float64), minlength=n_sets) > 0


def segment_starts(lengths: np.ndarray) -> np.ndarray:
    """(K + 1,) int64 offsets of K consecutive segments with the given lengths."""
    out = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def turn_positions(lengths: np.ndarray) -> np.ndarray:
    """(M,) 0-based position of each flat element within its segment, for segments of the given lengths."""
    offsets = segment_starts(lengths)
    return np.arange(offsets[-1]) - np.repeat(offsets[:-1], lengths)
