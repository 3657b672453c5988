"""Generic Arrow column helpers: flat views of nested list<struct> columns (offsets + values), one struct field,
numpy views, and rebuilding a list<struct> column with some fields replaced. No I/O."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def list_parts(col: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, pa.Array]:
    """(offsets (n + 1,) int64 starting at 0, flat values) of a list column, slicing respected."""
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    offsets = arr.offsets.to_numpy().astype(np.int64)
    return offsets - offsets[0], arr.flatten()


def field(struct_values: pa.Array, name: str) -> pa.Array:
    return pc.struct_field(struct_values, name)


def numbers(arr: pa.Array, dtype) -> np.ndarray:
    return arr.to_numpy(zero_copy_only=False).astype(dtype, copy=False)


def with_fields(
    list_col: pa.Array | pa.ChunkedArray, updates: dict[str, pa.Array | np.ndarray]
) -> pa.ListArray:
    """The list<struct> column with the named struct fields replaced (same offsets, same field types)."""
    offsets, values = list_parts(list_col)
    struct_type = values.type
    arrays = []
    for f in struct_type:
        new = updates.get(f.name)
        arrays.append(field(values, f.name) if new is None else pa.array(new, type=f.type))
    struct = pa.StructArray.from_arrays(arrays, fields=list(struct_type))
    return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), struct)
