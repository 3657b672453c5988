"""`turntree data prepare|list` and `turntree model prepare`: dataset and model preparation from the command line."""

from __future__ import annotations

import argparse
from pathlib import Path

from flows.config import UserError, build


def cmd_data_prepare(a: argparse.Namespace) -> int:
    from schemas.params import DataParams
    from stages.data import DataError, prepare

    given = {"format": a.format, "seed": a.seed, "eval_fraction": a.eval_fraction}
    p = build(DataParams, {"sources": a.sources, **{k: v for k, v in given.items() if v is not None}})
    try:
        out = prepare(
            p.sources,
            Path(a.out),
            format=p.format,
            skip_bad=a.skip_bad,
            seed=p.seed,
            eval_fraction=p.eval_fraction,
        )
    except (DataError, FileNotFoundError) as e:
        raise UserError(str(e)) from None
    ref = out.tables["problems"]
    print(f"wrote {ref.rows} problems to {ref.uri}")
    for k, v in sorted(out.metrics.items()):
        print(f"  {k}: {v:g}")
    return 0


def cmd_model_prepare(a: argparse.Namespace) -> int:
    import time

    from runtime.models import prepare

    t = time.perf_counter()
    try:
        path = prepare(a.name, Path(a.out))
    except (KeyError, ValueError, FileNotFoundError) as e:
        raise UserError(str(e).strip("'\"")) from None
    print(f"model {a.name} ready at {path} ({time.perf_counter() - t:.1f}s)")
    return 0


def cmd_data_list(a: argparse.Namespace) -> int:
    """Every named benchmark (``schemas.benchmarks``) with its row count, kind, evaluation split and licence, and the
    synthetic families."""
    from schemas.benchmarks import BENCHMARKS, SYNTHETIC_FAMILIES
    from stages.data import DataError, load_source

    print(f"{'name':<21} {'rows':>6}  {'kind':<5} {'evaluates':<13} licence")
    for b in BENCHMARKS.values():
        try:
            rows = str(len(load_source(b.name).rows))
        except (DataError, FileNotFoundError, ImportError) as e:
            rows = f"- ({e})"
        print(f"{b.name:<21} {rows:>6}  {b.kind:<5} {b.evaluate_as or b.name:<13} {b.licence}")
    for family in SYNTHETIC_FAMILIES:
        print(
            f"{'synthetic:' + family:<14} {'any':>6}  {'code' if family == 'func-synth' else 'math':<5} "
            f"{'generated':<11} generated (data.synthetic_count, data.synthetic_difficulty)"
        )
    return 0
