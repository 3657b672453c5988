"""Data stage: normalise problem sets (HumanEval, MBPP, GSM8K, MATH-style sets, synthetic families, local files,
hub sets) into one ``problems.parquet`` with a reproducible train/eval split.

    from stages.data import prepare, run, DataError
    prepare(["humaneval", "synthetic:tool-arith"], Path("out"))  # -> StageOutput, writes out/problems.parquet

CLI: ``turntree data prepare SOURCE [SOURCE …] --out DIR [--format …] [--skip-bad]``; a DataError's message is
one line, printed before exiting with status 2. See ``stages.data.sources`` for the sources and
``stages.data.formats`` for the record formats.
"""

from stages.data.formats import FORMATS, last_boxed, normalise_answer
from stages.data.prepare import assign_split, dedup, normalise_prompt, prepare, run
from stages.data.sources import ALIASES, DataError, load_source

__all__ = [
    "ALIASES",
    "FORMATS",
    "DataError",
    "assign_split",
    "dedup",
    "last_boxed",
    "load_source",
    "normalise_answer",
    "normalise_prompt",
    "prepare",
    "run",
]
