"""Input checks shared by the estimators: flat float / integer vectors and equal lengths, each failure a
one-line error naming the argument."""

from __future__ import annotations

import numpy as np


def float_vector(x, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence, got shape {arr.shape}")
    return arr


def int_vector(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer positions, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def same_length(a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{an} has {a.shape[0]} rows but {bn} has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"{an} is empty: no groups to normalise over")
