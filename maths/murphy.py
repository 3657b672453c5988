"""MURPHY tree credit (arXiv 2511.07833): returns propagated from the leaves up (MaRS / MeRS, ``RETURN_MODES``),
normalised among siblings, and InterP / IntraP pruning. Pure array maths.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from maths.segments import (
    EPS,
    check_finite,
    group_codes,
    segment_starts,
    segment_zscore,
    set_has_signal,
)
from maths.vectors import float_vector, int_vector, same_length
from schemas.registry import Registry


# --- MURPHY -------------------------------------------------------------------------------------------------
def node_depths(parent_ids: np.ndarray) -> np.ndarray:
    """(K,) depth of each node (0 at a root), resolved level by level; a missing parent or a cycle is an error
    naming the row. parent_ids (K,): position of the parent or −1."""
    p = parent_ids
    n = p.size
    bad = (p < -1) | (p >= n)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(f"node {row}: parent {int(p[row])} is missing (valid parents: -1 or 0..{n - 1})")
    depth = np.where(p < 0, 0, -1)
    safe_parent = np.where(p < 0, 0, p)
    unknown = np.flatnonzero(depth < 0)
    while unknown.size:
        ready = depth[safe_parent[unknown]] >= 0
        if not ready.any():
            raise ValueError(f"node {int(unknown.min())}: its ancestors form a cycle (no path to a root)")
        newly = unknown[ready]
        depth[newly] = depth[safe_parent[newly]] + 1
        unknown = unknown[~ready]
    return depth


def tree_returns(parents: np.ndarray, r: np.ndarray, mode: str, gamma: float) -> np.ndarray:
    step = RETURN_MODES.lookup(mode)
    if mode == "mean":
        bad = (r < 0.0) | (r > 1.0)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"node {row}: reward {r[row]} is outside [0, 1], which MeRS needs")
    depth = node_depths(parents)
    out = r.astype(np.float64, copy=True)
    for d in range(int(depth.max(initial=0)), 0, -1):  # deepest children first; roots (d = 0) have no parent
        children = np.flatnonzero(depth == d)
        step(out, r, parents[children], out[children], gamma)
    return out


def _max_step(out, r, parent, child_ret, gamma):
    """MaRS: R(n) = max(r(n), γ · max_c R(c)) (the spec's MaRS is γ = 1)."""
    np.maximum.at(out, parent, gamma * child_ret)


def _mean_step(out, r, parent, child_ret, gamma):
    """MeRS, bounded: R(n) = r(n) + (1 − r(n)) · γ · mean_c R(c), rewards in [0, 1].

    The spec's R(n) = r(n) + γ · mean_c R(c) lets a partly failing attempt outrank a direct success: with
    r(n) = 0.5 and repairs that all pass, R(n) = 1.5 > 1, so a sibling that passed at once gets the negative
    advantage. Here the children's mean fills only the share of the tests that n failed, so R(n) ≤ 1 with
    equality only when n passed or (γ = 1) every repair below it did; a passed node is a leaf (R = 1 whatever
    its children). With binary rewards (r ∈ {0, 1}) this is the spec's formula."""
    total = np.zeros_like(out)
    count = np.zeros_like(out)
    np.add.at(total, parent, child_ret)
    np.add.at(count, parent, 1.0)
    out[parent] = r[parent] + (1.0 - r[parent]) * gamma * total[parent] / count[parent]


def max_tree_nodes(group_size: int, child_group_size: int, depth: int) -> int:
    """Nodes of a MURPHY tree in which every attempt fails (the most it can grow): G roots, G' children per
    failed node, S levels: G · (1 + G' + … + G'^(S−1)). A tree that passes early has fewer
    (``stages.rollout.tree``: a passed node is a leaf)."""
    if min(group_size, child_group_size, depth) < 1:
        raise ValueError(f"max_tree_nodes needs G, G', S >= 1, got {group_size}, {child_group_size}, {depth}")
    return group_size * sum(child_group_size**d for d in range(depth))


RETURN_MODES: Registry[Callable] = Registry("mode", {"max": _max_step, "mean": _mean_step}.items())


def murphy_returns(parent_ids, rewards, *, mode: str = "max", gamma: float = 1.0) -> np.ndarray:
    """MURPHY tree returns (arXiv 2511.07833): MaRS (``mode="max"``) or MeRS (``"mean"``), leaves up.

    parent_ids (K,): position of each node's parent, −1 at a root; rewards (K,): r(n), in [0, 1] for MeRS.
    Returns R (K,). With rewards in [0, 1] both modes keep R(n) in [0, 1] and give a node that passed (r = 1)
    R = 1, so it is never ranked below a sibling that failed and was repaired (MeRS is bounded for this, see
    ``_mean_step``); a sibling set that all passed ties and carries no signal.
    """
    parents = int_vector(parent_ids, "parent_ids")
    r = float_vector(rewards, "rewards")
    same_length(r, parents, "rewards", "parent_ids")
    check_finite(r, what="rewards")
    return tree_returns(parents, r, mode, gamma)


def sibling_sets(tree_codes: np.ndarray, parents: np.ndarray, n_trees: int) -> tuple[np.ndarray, int]:
    """Dense sibling-set codes (K,): children of one parent share a set; the roots of one tree share one.

    A parent in another tree than its child is an error naming the row."""
    k = parents.size
    has_parent = parents >= 0
    cross = has_parent & (tree_codes[np.where(has_parent, parents, 0)] != tree_codes)
    if cross.any():
        row = int(np.flatnonzero(cross)[0])
        raise ValueError(f"node {row}: its parent {int(parents[row])} belongs to another tree")
    raw = np.where(has_parent, parents, k + tree_codes)  # ids in [0, k + n_trees): dense them without hashing
    present = np.zeros(k + n_trees, bool)
    present[raw] = True
    dense = np.cumsum(present) - 1
    return dense[raw], int(present.sum())


def murphy(
    tree_ids, parent_ids, rewards, *, mode: str = "max", gamma: float = 1.0, eps: float = EPS
) -> np.ndarray:
    """MURPHY per-node advantages: A(n) = (R(n) − mean_sib R) / (std_sib R + ε), siblings = same tree and parent.

    tree_ids (K,); parent_ids (K,): global positions (across trees) or −1; rewards (K,). Returns A (K,).
    """
    parents = int_vector(parent_ids, "parent_ids")
    tree_codes, n_trees = group_codes(tree_ids, what="tree_ids")
    same_length(parents, tree_codes, "parent_ids", "tree_ids")
    returns = murphy_returns(parents, rewards, mode=mode, gamma=gamma)
    sets, n_sets = sibling_sets(tree_codes, parents, n_trees)
    return segment_zscore(returns, sets, n_sets, eps=eps)


# --- pruning (MURPHY InterP / IntraP) -----------------------------------------------------------------------
def prune(
    ret: np.ndarray,
    adv: np.ndarray,
    sets: np.ndarray,
    n_sets: int,
    *,
    inter_keep: int | None = None,
    intra_keep: int | None = None,
    keep_zero_signal: bool = False,
) -> tuple[np.ndarray, dict[str, int]]:
    """Which nodes to leave out of training (K,) bool, and how many each rule removed.

    Zero signal: a sibling set whose returns all tie (all advantages 0) is dropped unless ``keep_zero_signal``.
    InterP (our definition, the papers give none): of the remaining sets keep the ``inter_keep`` with the
    highest return std (ties: earlier set first). IntraP: inside a set keep ``intra_keep`` nodes, the lowest
    ⌈k/2⌉ and highest ⌊k/2⌋ returns, so the spread survives. Advantages stay those of the full sibling set.
    """
    size = np.bincount(sets, minlength=n_sets)
    dropped = np.zeros(n_sets, bool) if keep_zero_signal else ~set_has_signal(adv, sets, n_sets)
    counts = {"zero_signal": int(size[dropped].sum()), "inter": 0, "intra": 0}
    if inter_keep is not None:
        std = np.sqrt(
            np.maximum(
                np.bincount(
                    sets, weights=segment_zscore(ret, sets, n_sets, scale_by_std=False) ** 2, minlength=n_sets
                )
                / np.maximum(size - 1, 1),
                0.0,
            )
        )
        alive = np.flatnonzero(~dropped & (size > 0))
        ranked = alive[np.lexsort((alive, -std[alive]))]
        cut = ranked[inter_keep:]
        counts["inter"] = int(size[cut].sum())
        dropped[cut] = True
    pruned = dropped[sets]
    if intra_keep is not None:
        order = np.lexsort((ret, sets))
        rank = np.empty(sets.size, np.int64)
        rank[order] = np.arange(sets.size) - segment_starts(size)[sets[order]]
        low, high = (intra_keep + 1) // 2, intra_keep // 2
        cut = ~pruned & (rank >= low) & (rank < size[sets] - high)
        counts["intra"] = int(cut.sum())
        pruned |= cut
    return pruned, counts
