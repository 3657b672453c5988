"""Benchmark: our vectorised advantage estimators against the two ways verl computes GRPO advantages.

Run:  OMP_NUM_THREADS=1 .venv/bin/python bench/bench_advantages.py [--n 1000000] [--group 8] [--repeat 3]

On the same inputs in one run (1,000,000 trajectories in groups of --group; 1,000,000 GTPO turns; 1,000,000
MURPHY tree nodes):
  - ours:    maths.estimators.grpo (segment reductions over dense group codes, no sort for grouped rows)
  - dict:    a per-group Python loop over a dict of scores, torch mean/std per group (verl's first form)
  - scatter: torch over a group index: unique(return_inverse), scatter_add for sums / counts / squared
             deviations, gather back (verl's vectorised form)
Both baselines are written here from that description. Target: ours ≥ 2× scatter. Also printed: GTPO and
MURPHY cost relative to our GRPO (the papers claim negligible overhead). Best of --repeat runs each.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maths.estimators import grpo, gtpo, gtpo_flat, murphy  # noqa: E402
from maths.segments import group_codes  # noqa: E402

EPS = 1e-6


def grpo_dict_loop(rewards: np.ndarray, ids) -> np.ndarray:
    """Per-group Python loop over a dict of score lists (verl's first form)."""
    scores = torch.as_tensor(rewards)
    id2score = defaultdict(list)
    for i in range(len(ids)):
        id2score[ids[i]].append(scores[i])
    id2mean, id2std = {}, {}
    for key, vals in id2score.items():
        if len(vals) == 1:
            id2mean[key], id2std[key] = (
                torch.tensor(0.0, dtype=scores.dtype),
                torch.tensor(1.0, dtype=scores.dtype),
            )
        else:
            t = torch.stack(vals)
            id2mean[key], id2std[key] = t.mean(), t.std()
    out = scores.clone()
    for i in range(len(ids)):
        if len(id2score[ids[i]]) == 1:
            out[i] = 0.0
        else:
            out[i] = (scores[i] - id2mean[ids[i]]) / (id2std[ids[i]] + EPS)
    return out.numpy()


def grpo_scatter(rewards: np.ndarray, ids) -> np.ndarray:
    """torch scatter/gather over a group index from unique(return_inverse) (verl's vectorised form)."""
    if isinstance(ids, np.ndarray) and ids.dtype.kind in "iu":
        _, inv = torch.unique(torch.from_numpy(ids), return_inverse=True)
    else:  # strings cannot be tensors: index them first
        inv = torch.from_numpy(np.unique(np.asarray(ids), return_inverse=True)[1])
    scores = torch.as_tensor(rewards)
    n_groups = int(inv.max()) + 1
    count = torch.zeros(n_groups, dtype=scores.dtype).scatter_add_(0, inv, torch.ones_like(scores))
    mean = torch.zeros(n_groups, dtype=scores.dtype).scatter_add_(0, inv, scores) / count
    dev = scores - mean[inv]
    var = torch.zeros(n_groups, dtype=scores.dtype).scatter_add_(0, inv, dev * dev) / (count - 1).clamp(min=1)
    adv = dev / (var.sqrt()[inv] + EPS)
    return torch.where(count[inv] > 1, adv, torch.zeros_like(adv)).numpy()


def best(fn, repeat: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=1_000_000, help="trajectories / turns / nodes")
    ap.add_argument("--group", type=int, default=8, help="group size G")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-dict", action="store_true", help="skip the slow dict-loop baseline")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    n, g = args.n, args.group
    rewards = rng.integers(0, 5, n) / 4.0  # fractions of 4 tests: ties within groups happen, as in practice
    int_ids = np.repeat(np.arange(n // g + 1), g)[:n]
    str_ids = np.array([f"problem-{i}" for i in int_ids], dtype=object)
    print(f"GRPO on {n:,} trajectories, groups of {g} ({n // g:,} groups), best of {args.repeat}")

    # GTPO / MURPHY first: the dict-loop baseline leaves the allocator in a state that slows later numpy work
    codes, n_groups = group_codes(int_ids)
    t_core, _ = best(lambda: grpo(rewards, codes), args.repeat)

    # GTPO: n turns over trajectories of 1-7 turns (mean 4), same group size
    lengths = rng.integers(1, 8, n // 2)  # more than enough; cut where the turns reach n
    lengths = lengths[: np.searchsorted(np.cumsum(lengths), n) + 1]
    lengths[-1] -= lengths.sum() - n  # shortens the last trajectory (the sum reached n)
    lengths = lengths[lengths > 0]
    t_codes = np.repeat(np.arange(lengths.size // g + 1), g)[: lengths.size]
    turn_r = np.where(rng.random(n) < 0.2, -0.1, 0.0)
    turn_r[np.cumsum(lengths) - 1] += rng.integers(0, 2, lengths.size)
    nt = int(t_codes.max()) + 1
    t_gtpo, _ = best(lambda: gtpo_flat(turn_r, lengths, t_codes, nt, gamma=0.9), args.repeat)
    t_gtpo_pos, _ = best(
        lambda: gtpo_flat(turn_r, lengths, t_codes, nt, norm_scope="turn_position"), args.repeat
    )
    ragged = np.split(turn_r, np.cumsum(lengths)[:-1])
    t_gtpo_list, _ = best(lambda: gtpo(ragged, t_codes), 1)

    # MURPHY: trees of G roots; each failed node gets G children, up to depth 3, until n nodes
    level_parent = np.full(n // (g * 4) + 1, -1)
    tree_of_level = np.arange(level_parent.size)
    base = 0
    parents_np, trees_np = np.zeros(0, np.int64), np.zeros(0, np.int64)
    for _depth in range(3):
        kids_parent = np.repeat(level_parent, g)
        kids_tree = np.repeat(tree_of_level, g)
        parents_np = np.concatenate([parents_np, kids_parent])
        trees_np = np.concatenate([trees_np, kids_tree])
        kid_pos = np.arange(base, base + kids_parent.size)
        fail = rng.random(kid_pos.size) < 0.5
        level_parent, tree_of_level = kid_pos[fail], kids_tree[fail]
        base += kids_parent.size
    parents_np, trees_np = parents_np[:n], trees_np[:n]  # a parent always precedes its children
    total = parents_np.size
    r = np.where(rng.random(total) < 0.3, 1.0, rng.integers(0, 4, total) / 4.0)
    t_murphy, _ = best(lambda: murphy(trees_np, parents_np, r), args.repeat)
    t_murphy_mean, _ = best(lambda: murphy(trees_np, parents_np, r, mode="mean"), args.repeat)

    rows = []
    for label, ids in (("int ids", int_ids), ("str ids", str_ids)):
        t_ours, a_ours = best(lambda ids=ids: grpo(rewards, ids), args.repeat)
        t_scat, a_scat = best(lambda ids=ids: grpo_scatter(rewards, ids), args.repeat)
        np.testing.assert_allclose(a_ours, a_scat, atol=1e-6)
        if args.skip_dict:
            t_dict = float("nan")
        else:
            t_dict, a_dict = best(lambda ids=ids: grpo_dict_loop(rewards, ids), 1)
            np.testing.assert_allclose(a_ours, a_dict, atol=1e-6)
        rows.append((label, t_ours, t_scat, t_dict))
        print(
            f"  {label}: ours {t_ours * 1e3:8.1f} ms | scatter {t_scat * 1e3:8.1f} ms ({t_scat / t_ours:5.1f}x)"
            f" | dict loop {t_dict * 1e3:9.1f} ms ({t_dict / t_ours:6.1f}x)"
        )

    ours_int = t_core
    print(
        f"GTPO on {n:,} turns ({lengths.size:,} trajectories): group {t_gtpo * 1e3:.1f} ms "
        f"({t_gtpo / ours_int:.2f}x our GRPO), turn_position {t_gtpo_pos * 1e3:.1f} ms "
        f"({t_gtpo_pos / ours_int:.2f}x); list-of-lists API incl. flattening {t_gtpo_list * 1e3:.1f} ms"
    )
    print(
        f"MURPHY on {total:,} nodes: MaRS {t_murphy * 1e3:.1f} ms ({t_murphy / ours_int:.2f}x our GRPO), "
        f"MeRS {t_murphy_mean * 1e3:.1f} ms ({t_murphy_mean / ours_int:.2f}x)"
    )
    print(
        f"our GRPO reference for the ratios above (int ids, same run, before the baselines): {t_core * 1e3:.1f} ms"
    )
    worst = min(scat / ours for _, ours, scat, _ in rows)
    print(f"target ours >= 2x scatter: {'MET' if worst >= 2 else 'NOT MET'} (worst {worst:.1f}x)")


if __name__ == "__main__":
    main()
