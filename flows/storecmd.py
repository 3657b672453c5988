"""`turntree runs|verify|prune`: reading and tidying the run store from the command line (no Prefect, no model)."""

from __future__ import annotations

import argparse


def cmd_runs(a: argparse.Namespace) -> int:
    from flows.console import runs_table, stage_versions
    from flows.runstore import RunStore, list_runs

    if a.run:  # one run: every stage's versions, the current one, a rerun's overrides, staleness
        print(stage_versions(RunStore(a.root, a.run)))
        return 0
    runs = list_runs(a.root)
    print(runs_table(runs) if runs else f"no runs under {a.root}")
    return 0


def cmd_verify(a: argparse.Namespace) -> int:
    from flows.runstore import RunStore

    store = RunStore(a.root, a.run)
    bad = store.verify()  # every current output against its recorded sha256 and size
    old = store.superseded_problems()  # superseded versions: reported, not fatal
    print("\n".join(bad) or f"run {a.run}: every current output matches its manifest")
    for line in old:
        print(f"note: {line}")
    return 1 if bad else 0


def cmd_prune(a: argparse.Namespace) -> int:
    from flows.prune import prune_run

    for run in a.run:
        print(prune_run(a.root, run, dry_run=a.dry_run, final=a.final, weights=a.weights).summary(a.dry_run))
    return 0
