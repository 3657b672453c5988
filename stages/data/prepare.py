"""The data stage: sources -> deduplicated, split ``problems.parquet`` (``schemas.tables.PROBLEMS``).

    prepare(["humaneval", "synthetic:tool-arith"], Path("out")) -> StageOutput  # writes out/problems.parquet

Steps: load every source (``stages.data.sources``), reject malformed records (``DataError`` listing ids and
fields) or, with ``skip_bad``, skip and count them (``data/skipped``); drop problems whose normalised prompt
(case-folded, whitespace collapsed) was already seen (``data/duplicates``); keep the first ``max_problems``;
then assign ``split``: problems are ordered by sha256(f"{seed}:{problem_id}") and the first
round(n * eval_fraction) are "eval", the rest "train" — reproducible by seed and independent of source order.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from runtime.tableio import SchemaError, write_table
from schemas.outputs import StageOutput
from schemas.params.data import DataParams
from schemas.tables import PROBLEMS
from stages.data.formats import FORMATS
from stages.data.sources import DataError, Loaded, load_source

MAX_LISTED = 5  # malformed records named in an error message


def normalise_prompt(prompt: str) -> str:
    return re.sub(r"\s+", " ", prompt).strip().casefold()


def dedup(rows: list[dict]) -> tuple[list[dict], int]:
    """Keep the first row of each normalised prompt; returns (rows, number dropped). Raises on a reused id."""
    seen_prompts: set[str] = set()
    ids: dict[str, str] = {}
    kept = []
    for row in rows:
        key = normalise_prompt(row["prompt"])
        if key in seen_prompts:
            continue
        if row["problem_id"] in ids:
            raise DataError(
                f"problem_id {row['problem_id']!r} is used by two different problems "
                f"(sources {ids[row['problem_id']]!r} and {row['source']!r}); give the records unique ids"
            )
        seen_prompts.add(key)
        ids[row["problem_id"]] = row["source"]
        kept.append(row)
    return kept, len(rows) - len(kept)


def assign_split(rows: list[dict], seed: int, eval_fraction: float) -> None:
    """Set row["split"] in place: the round(n * eval_fraction) rows first in seeded-hash order are "eval"."""
    order = sorted(
        range(len(rows)), key=lambda i: hashlib.sha256(f"{seed}:{rows[i]['problem_id']}".encode()).digest()
    )
    n_eval = round(len(rows) * eval_fraction)
    for rank, i in enumerate(order):
        rows[i]["split"] = "eval" if rank < n_eval else "train"


def _rows_per_source(sources: list[str], loaded: list[Loaded]) -> dict[str, float]:
    """``data/rows/<source>`` metrics; names reduced to what MLflow accepts (a path to its file name)."""
    out: dict[str, float] = {}
    for spec, item in zip(sources, loaded, strict=True):
        name = Path(spec).name if Path(spec).suffix else spec
        key = "data/rows/" + re.sub(r"[^\w\-./ ]", "_", name)
        out[key] = out.get(key, 0.0) + len(item.rows)
    return out


def _bad_message(loaded: list[Loaded]) -> str:
    bad = [b for item in loaded for b in item.bad]
    listed = "; ".join(bad[:MAX_LISTED]) + (
        f"; … {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
    )
    return f"{len(bad)} malformed record(s): {listed}; fix them or pass --skip-bad to skip them".replace(
        "\n", " "
    )


def prepare(
    sources: list[str],
    out: Path,
    *,
    format: str = "auto",
    skip_bad: bool = False,
    seed: int = 0,
    eval_fraction: float = 0.2,
    synthetic_count: int = 64,
    synthetic_difficulty: int = 1,
    max_problems: int | None = None,
) -> StageOutput:
    """Normalise ``sources`` into ``out/problems.parquet``; raises DataError (one line) on bad input."""
    t0 = time.perf_counter()
    if not sources:
        raise DataError("no sources given")
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown format {format!r}; choose auto or one of {sorted(FORMATS)}")
    if not 0.0 <= eval_fraction < 1.0:
        raise DataError(f"eval_fraction must be in [0, 1), got {eval_fraction}")
    loaded = [
        load_source(s, fmt=format, seed=seed, count=synthetic_count, difficulty=synthetic_difficulty)
        for s in sources
    ]
    skipped = sum(len(item.bad) for item in loaded)
    if skipped and not skip_bad:
        raise DataError(_bad_message(loaded))
    rows, duplicates = dedup([row for item in loaded for row in item.rows])
    if max_problems is not None:
        rows = rows[:max_problems]
    if not rows:
        raise DataError(f"sources {sources} yielded no problems ({skipped} malformed records skipped)")
    assign_split(rows, seed, eval_fraction)
    try:
        ref = write_table(rows, PROBLEMS, Path(out) / "problems.parquet")
    except SchemaError as e:
        raise DataError(f"records do not fit the problems schema: {e}".replace("\n", " ")) from None
    n_eval = sum(r["split"] == "eval" for r in rows)
    metrics = {
        "data/problems": float(len(rows)),
        "data/train": float(len(rows) - n_eval),
        "data/eval": float(n_eval),
        "data/code": float(sum(r["kind"] == "code" for r in rows)),
        "data/math": float(sum(r["kind"] == "math" for r in rows)),
        "data/skipped": float(skipped),
        "data/duplicates": float(duplicates),
        **_rows_per_source(sources, loaded),
        "timing/data": time.perf_counter() - t0,
    }
    notes = [f"{item.label}: {len(item.rows)} rows, {len(item.bad)} malformed" for item in loaded]
    notes += [f"skipped {b}" for item in loaded for b in item.bad[:MAX_LISTED]]
    return StageOutput(stage="data", tables={"problems": ref}, metrics=metrics, notes=notes)


def run(params: DataParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Stage entry point: ``prepare`` with the validated parameters (``inputs`` is unused: data has none)."""
    return prepare(
        params.sources,
        out,
        format=params.format,
        skip_bad=params.skip_bad,
        seed=params.seed,
        eval_fraction=params.eval_fraction,
        synthetic_count=params.synthetic_count,
        synthetic_difficulty=params.synthetic_difficulty,
        max_problems=params.max_problems,
    )
