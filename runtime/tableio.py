"""Validated, atomic Parquet I/O for the tables in ``schemas.tables``.

``write_table`` checks a table against its schema (columns, types, non-null fields, nested ones included),
writes it to a temporary name beside the target and renames it into place, so a crash never leaves a
half-written file under the final name (on an object store, ``s3://…``, the one upload is that guarantee: an
object appears only once it is complete). ``read_table`` refuses a file whose ``schema_version`` this code
cannot read. Paths may be local or any URI pyarrow's filesystems understand (``s3://…``).
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.outputs import TableRef
from schemas.tables import READABLE_VERSIONS
from schemas.upgrades import OPTIONAL_COLUMNS, upgrade


class SchemaError(ValueError):
    """A table does not match its schema, or its stored schema_version is unknown."""


def resolve(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """Filesystem and path for a local path or a URI."""
    s = os.fspath(uri)
    if "://" in s:
        return pafs.FileSystem.from_uri(s)
    return pafs.LocalFileSystem(), str(Path(s).absolute())


def _table_name(schema: pa.Schema) -> str:
    return (schema.metadata or {}).get(b"table", b"?").decode()


def _check_nulls(name: str, col: pa.ChunkedArray | pa.Array, field: pa.Field, path: str) -> None:
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if not field.nullable and arr.null_count:
        raise SchemaError(f"table {name!r}: column {path!r} must not be null ({arr.null_count} null values)")
    t = field.type
    if pa.types.is_list(t) or pa.types.is_large_list(t):
        _check_nulls(name, arr.flatten(), t.value_field, path + "[]")
    elif pa.types.is_struct(t):
        for i, sub in enumerate(t):
            _check_nulls(name, arr.field(i), sub, f"{path}.{sub.name}")


def validate(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Return ``table`` cast to ``schema`` (with its metadata) or raise SchemaError naming the problem."""
    name = _table_name(schema)
    have, want = set(table.column_names), set(schema.names)
    if have != want:
        parts = []
        if want - have:
            parts.append(f"missing columns {sorted(want - have)}")
        if have - want:
            parts.append(f"unexpected columns {sorted(have - want)}")
        raise SchemaError(f"table {name!r}: " + "; ".join(parts))
    table = table.select(schema.names)
    cols = []
    for field in schema:
        col = table.column(field.name)
        if not col.type.equals(field.type):
            try:
                col = col.cast(field.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
                raise SchemaError(
                    f"table {name!r}: column {field.name!r} has type {col.type}, expected {field.type}: {e}"
                ) from None
        _check_nulls(name, col, field, field.name)
        cols.append(col)
    return pa.Table.from_arrays(cols, schema=schema)


def to_table(rows: Iterable[Mapping] | pa.Table, schema: pa.Schema) -> pa.Table:
    """Build a validated table from row dicts (or validate an existing table). A row may leave out a column
    added by a version bump (``schemas.upgrades.OPTIONAL_COLUMNS``): it is written as null."""
    if isinstance(rows, pa.Table):
        return validate(rows, schema)
    rows = list(rows)
    name = _table_name(schema)
    optional = OPTIONAL_COLUMNS.get(name, frozenset())
    for i, r in enumerate(rows):
        missing = [f for f in schema.names if f not in r and f not in optional]  # an added column: null
        extra = [k for k in r if k not in schema.names]
        if missing or extra:
            raise SchemaError(
                f"table {name!r}: row {i} has missing fields {missing} / unexpected fields {extra}"
            )
    try:
        table = pa.Table.from_pylist(rows, schema=schema)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as e:
        raise SchemaError(f"table {name!r}: rows do not fit the schema: {e}") from None
    return validate(table, schema)


def sha256_file(uri: str | os.PathLike) -> str:
    fs, path = resolve(uri)
    h = hashlib.sha256()
    with fs.open_input_stream(path) as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def write_table(rows: Iterable[Mapping] | pa.Table, schema: pa.Schema, uri: str | os.PathLike) -> TableRef:
    """Validate and atomically write a Parquet file; returns its TableRef (uri, sha256, rows)."""
    table = to_table(rows, schema)
    fs, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    fs.create_dir(parent, recursive=True)
    if not isinstance(fs, pafs.LocalFileSystem):  # an object store shows an object only once it is complete
        buf = pa.BufferOutputStream()  # encoded first: a failure while encoding uploads nothing
        pq.write_table(table, buf)
        with fs.open_output_stream(path) as f:
            f.write(buf.getvalue())
        return TableRef(uri=os.fspath(uri), sha256=sha256_file(uri), rows=table.num_rows)
    tmp = f"{parent}/.{path.rsplit('/', 1)[1]}.{uuid.uuid4().hex}.tmp"
    try:
        with fs.open_output_stream(tmp) as f:
            pq.write_table(table, f)
            f.flush()
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except (OSError, FileNotFoundError):
            pass
        raise
    return TableRef(uri=os.fspath(uri), sha256=sha256_file(uri), rows=table.num_rows)


def read_table(uri: str | os.PathLike, schema: pa.Schema) -> pa.Table:
    """Read a Parquet file written for ``schema``; refuse an unknown table name or schema_version."""
    name = _table_name(schema)
    fs, path = resolve(uri)
    info = fs.get_file_info(path)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"no {name} table at {uri}")
    with fs.open_input_file(path) as f:
        stored = pq.read_schema(f)
        meta = stored.metadata or {}
        stored_name = meta.get(b"table", b"").decode()
        version = meta.get(b"schema_version", b"").decode()
        if stored_name != name:
            raise SchemaError(f"{uri} holds table {stored_name or '(unnamed)'!r}, expected {name!r}")
        readable = READABLE_VERSIONS.get(name, set())
        if version not in readable:
            raise SchemaError(
                f"{uri}: {name} schema_version {version or '(none)'!r} is not readable by this turntree "
                f"(readable: {sorted(readable)}); upgrade turntree or re-run the stage that wrote it"
            )
        table = pq.read_table(f)
    table = upgrade(name, version, table)  # an older readable version in today's shape (schemas.upgrades)
    return validate(table.replace_schema_metadata(None), schema)
