"""Where two runs' credit assignments part, iteration by iteration (issue 22's GTPO vs GRPO question).

    .venv/bin/python bench/credit_diff.py --root RUN_ROOT RUN_A RUN_B [--iterations 8]

Two cells of a study share a warm start and a seed, so their first rollout samples the same completions; after
that their policies differ. For each iteration this prints, per run, what its advantages stage trained on —
samples kept, trained tokens, how many of them come from groups whose outcome rewards r_i all tie (every
answer wrong, or every one right: an outcome-only estimator such as GRPO drops those groups; turn-level format
penalties can give them a signal), their share of the trained tokens and their mean absolute advantage — and, while both runs still sampled the same completions,
the fraction of trained tokens whose advantage has a different sign in the two runs.
Reads only the run store (the stages' current outputs); writes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from flows.runstore import RunStore  # noqa: E402
from runtime.tableio import read_table  # noqa: E402
from schemas.tables import SAMPLES, TRAJECTORIES  # noqa: E402


def _tables(store: RunStore, it: int) -> tuple[list[dict], dict[str, dict]] | None:
    score, adv = store.current_output("score", it), store.current_output("advantages", it)
    if score is None or adv is None:
        return None
    cols = ["trajectory_id", "group_id", "reward", "turns", "no_verdict"]
    trajectories = read_table(score.uri("trajectories"), TRAJECTORIES).select(cols).to_pylist()
    samples = {r["sample_id"]: r for r in read_table(adv.uri("samples"), SAMPLES).to_pylist()}
    return trajectories, samples


def summary(trajectories: list[dict], samples: dict[str, dict]) -> dict[str, float]:
    outcomes: dict[str, set] = {}
    for r in trajectories:
        if r.get("no_verdict"):  # no verdict: not an outcome (left out of the group's statistics too)
            continue
        outcomes.setdefault(r["group_id"], set()).add(r["reward"])
    group = {r["trajectory_id"]: r["group_id"] for r in trajectories}
    tokens = tied_tokens = 0
    tied_adv: list[float] = []
    for s in samples.values():
        mask = np.asarray(s["loss_mask"]) == 1
        tokens += int(mask.sum())
        if len(outcomes.get(group.get(s["source_id"]), {0, 1})) == 1:
            tied_tokens += int(mask.sum())
            tied_adv.append(float(np.abs(np.asarray(s["advantages"])[mask]).mean()))
    return {
        "samples": len(samples),
        "tokens": tokens,
        "tied_samples": len(tied_adv),
        "tied_token_frac": tied_tokens / max(tokens, 1),
        "tied_abs_adv": float(np.mean(tied_adv)) if tied_adv else 0.0,
    }


def sign_disagreement(a: dict[str, dict], b: dict[str, dict]) -> tuple[float, int]:
    """Fraction of trained tokens (of samples both runs kept) whose advantages differ in sign; and how many
    samples one run trained and the other dropped."""
    differ = total = 0
    for sid in a.keys() & b.keys():
        mask = np.asarray(a[sid]["loss_mask"]) == 1
        x, y = np.asarray(a[sid]["advantages"])[mask], np.asarray(b[sid]["advantages"])[mask]
        differ += int((np.sign(x) != np.sign(y)).sum())
        total += int(mask.sum())
    return differ / max(total, 1), len(a.keys() ^ b.keys())


def same_completions(x: list[dict], y: list[dict]) -> bool:
    ids = lambda rows: [[t["completion_token_ids"] for t in r["turns"]] for r in rows]  # noqa: E731
    return ids(x) == ids(y)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="the run store both runs live in")
    ap.add_argument("runs", nargs=2, metavar="RUN")
    ap.add_argument("--iterations", type=int, default=8)
    args = ap.parse_args(argv)
    stores = [RunStore(args.root, r) for r in args.runs]
    a_name, b_name = args.runs
    print(f"A = {a_name}, B = {b_name}")
    print(
        "| iter | same completions | samples A / B | trained tokens A / B | samples of tied-outcome groups A / B "
        "| their share of tokens A / B | their mean abs advantage A / B | token sign disagreement |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for it in range(1, args.iterations + 1):
        got = [_tables(s, it) for s in stores]
        if any(g is None for g in got):
            break
        (ta, sa), (tb, sb) = got
        x, y = summary(ta, sa), summary(tb, sb)
        same = same_completions(ta, tb)
        signs = "-"
        if same:
            frac, only = sign_disagreement(sa, sb)
            signs = f"{frac:.3f} ({only} samples in one run only)"
        print(
            f"| {it} | {'yes' if same else 'no'} | {x['samples']} / {y['samples']} | {x['tokens']} / {y['tokens']} "
            f"| {x['tied_samples']} / {y['tied_samples']} "
            f"| {x['tied_token_frac']:.2f} / {y['tied_token_frac']:.2f} "
            f"| {x['tied_abs_adv']:.2f} / {y['tied_abs_adv']:.2f} | {signs} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
