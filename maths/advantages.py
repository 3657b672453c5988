"""Credit assignment for GRPO, Dr.GRPO, GTPO and MURPHY (docs/algorithms.md): pure array maths, no I/O.

Array-level functions (plain lists or numpy arrays in, numpy out; other stages and outside checks call them):

    grpo(rewards, group_ids, *, scale_by_std=True) -> adv (N,)
    gtpo(turn_rewards, group_ids, *, gamma=0.9, norm_scope="end_aligned") -> [adv_i (T_i,)] per trajectory
    murphy_returns(parent_ids, rewards, *, mode="max", gamma=1.0) -> returns (K,)
    murphy(tree_ids, parent_ids, rewards, *, mode="max", gamma=1.0) -> adv (K,)
    gtpo_shaping(codes, success, group_ids, *, alpha=0.5, similarity="lexical") -> shaped final rewards (N,)

All are vectorised: segment reductions over dense group codes (``maths.segments``), discounted returns by
turn position, tree returns level by level by depth; no Python loop over trajectories, turns or nodes.

The advantages stage (``stages.advantages``) turns scored rows into training samples through the estimator
registry here (``ESTIMATORS``; add one with ``@register_estimator``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from maths.rewards import gtpo_shaping  # noqa: F401  (re-exported: part of this module's array API)
from maths.segments import (
    EPS,
    check_finite,
    contiguous_runs,
    group_codes,
    runs_zscore,
    segment_starts,
    segment_zscore,
    set_has_signal,
    turn_positions,
)
from schemas.params.rewards import AdvantageParams
from schemas.registry import Registry

log = logging.getLogger(__name__)

NormScope = Literal["end_aligned", "absorbing", "turn_position", "group", "batch"]


# --- GRPO / Dr.GRPO -----------------------------------------------------------------------------------------
def grpo(rewards, group_ids, *, scale_by_std: bool = True, eps: float = EPS) -> np.ndarray:
    """GRPO group z-score (DeepSeekMath, arXiv 2402.03300); ``scale_by_std=False`` is Dr.GRPO (arXiv 2503.20783).

    rewards (N,): outcome reward r_i per trajectory; group_ids (N,): str or int, G trajectories of a prompt
    share one. Returns A (N,) = (r_i − mean_g r) / (std_g r + ε), std with ddof = 1; a one-member group gets 0.
    """
    r = _float_vector(rewards, "rewards")
    ids = np.asarray(group_ids) if isinstance(group_ids, list | tuple) else group_ids
    runs = contiguous_runs(ids)
    if runs is not None:  # rollout order: one contiguous run per group, no scatter needed
        _same_length(r, np.empty(runs[-1]), "rewards", "group_ids")
        check_finite(r, what="rewards")
        return runs_zscore(r, runs, scale_by_std=scale_by_std, eps=eps)
    codes, n_groups = group_codes(ids)
    _same_length(r, codes, "rewards", "group_ids")
    check_finite(r, what="rewards")
    return segment_zscore(r, codes, n_groups, scale_by_std=scale_by_std, eps=eps)


# --- GTPO ---------------------------------------------------------------------------------------------------
def discounted_returns(values: np.ndarray, lengths: np.ndarray, gamma: float) -> np.ndarray:
    """R_ij = r_ij + γ R_i,j+1 within each trajectory, computed backwards one turn position at a time.

    values (M,): flat turn rewards, trajectory after trajectory; lengths (N,): turns per trajectory (≥ 1).
    Returns R (M,). The loop runs over "turns remaining" d = 1 .. max T_i − 1, each step vectorised: the turns
    with d turns after them are ends − 1 − d of the trajectories longer than d.
    """
    out = values.astype(np.float64, copy=True)
    last = np.cumsum(lengths) - 1
    active = np.flatnonzero(lengths > 1)  # trajectories longer than d: shrinks, so the total work is O(M)
    d = 1
    while active.size:
        idx = last[active] - d
        out[idx] += gamma * out[idx + 1]
        d += 1
        active = active[lengths[active] > d]
    return out


def gtpo_flat(
    values: np.ndarray,
    lengths: np.ndarray,
    codes: np.ndarray,
    n_groups: int,
    *,
    gamma: float = 0.9,
    norm_scope: NormScope = "end_aligned",
    eps: float = EPS,
) -> np.ndarray:
    """GTPO advantages on flat arrays: values (M,) turn rewards, lengths (N,), codes (N,) dense group codes.

    Returns A (M,) = (R_ij − mean_S R) / (std_S R + ε) with S chosen by ``norm_scope``. Of the invariants
    (a)-(d) in the table above ``NORM_SCOPES`` the default "end_aligned" keeps all four, "absorbing" (a) and
    (b), "turn_position" (a), "group" and "batch" none.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0, 1], got {gamma}")
    returns = discounted_returns(values, lengths, gamma)
    members, set_codes, n_sets = NORM_SCOPES.lookup(norm_scope)(returns, codes, n_groups, lengths, gamma)
    return segment_zscore(members, set_codes, n_sets, eps=eps)[: returns.size]


# A scope maps (returns (M,), codes (N,), n_groups, lengths (N,), gamma) to the normalisation sets' members:
# (members (M + P,), set codes (M + P,), n_sets). The first M members are the turns themselves, in order; a
# scope may append P virtual members that count in a set's mean and std but get no advantage of their own.
#
# Invariants (tests/test_advantage_invariants.py checks each ✓ and shows each ✗ with a counterexample):
#   (a) every trajectory of a group has the same turn rewards -> advantage 0 on every turn;
#   (b) γ = 1, outcome-only reward (turn rewards 0 but the last) -> every turn gets its trajectory's GRPO
#       advantage, whatever the turn counts;
#   (c) the only success of a group (turn rewards 0, …, 0, 1) gets no negative turn, whatever the others
#       carry: format penalties (≤ 0 per turn) and a shaped final reward below 1;
#   (d) outcome-only reward, any γ > 0 -> GRPO advantage on every turn (up to ε / γ^d): the discount alone
#       never ranks one success above another (no preference for short successes over tool-using ones).
#
#   scope           (a)  (b)  (c)  (d)
#   end_aligned      ✓    ✓    ✓    ✓    default
#   absorbing        ✓    ✓    ✗¹   ✗
#   turn_position    ✓    ✗²   ✗¹   ✗
#   group            ✗    ✗    ✗    ✗    (a) if returns are constant along trajectories, (b) if T = 1
#   batch            ✗    ✗    ✗    ✗
#   ¹ holds when no failure has a positive (shaped) reward; ² holds when all turn counts are equal.
def _scope_group(returns, codes, n_groups, lengths, gamma):
    return returns, np.repeat(codes, lengths), n_groups


def _scope_turn_position(returns, codes, n_groups, lengths, gamma):
    return returns, *_slot_codes(np.repeat(codes, lengths), turn_positions(lengths), n_groups, lengths)


def _scope_batch(returns, codes, n_groups, lengths, gamma):
    return returns, np.zeros(returns.size, np.int64), 1


def _scope_absorbing(returns, codes, n_groups, lengths, gamma):
    """Per turn position j over all G trajectories of the group; one that has ended (T_i ≤ j) stays in its
    absorbing final state and counts with its last return R_i,T_i at every later position."""
    last = returns[np.cumsum(lengths) - 1]
    return _padded_slots(
        returns, codes, n_groups, lengths, turn_positions(lengths), lambda pad: np.repeat(last, pad)
    )


def _scope_end_aligned(returns, codes, n_groups, lengths, gamma):
    """Per number of turns left, d = T_i − j (0 at the last turn), over all G trajectories of the group.

    The group's trajectories are aligned at their last turn; one with fewer turns than d + 1 counts as if it
    had first waited k = d + 1 − T_i idle turns with reward 0, i.e. with value γ^k R_i1. With L_g the group's
    longest trajectory and d = 0 .. L_g − 1:
        S_gd = { R_i,T_i−d if d < T_i, else γ^(d+1−T_i) R_i1 : i in group g },  A_ij = z-score of R_ij in S_gd
    Why this set: every member of S_gd lies d discounts before its trajectory's outcome, so the discount
    weighs all members alike. An outcome-only reward gives S_gd = γ^d · {r_i}, hence the GRPO advantage at
    every turn for any γ > 0 (invariants (b), (d)); adding a constant c to every outcome shifts S_gd by γ^d c
    and changes nothing. Forward alignment (``absorbing``, ``turn_position``) instead sets the early,
    discounted return of a long trajectory against the final return of a short one: an all-success group
    with mixed turn counts then gives the tool-call turns of the longer successes negative advantages, the
    bias measured with ``group``. Every trajectory is in every set of its group, so no set shrinks to one
    member (a one-trajectory group gets 0, as in GRPO). Format penalties count where they happened: one at
    turn k lowers R_ij, j ≤ k, by γ^(k−j) · 0.1 against the others' returns at the same distance from the end.
    """
    first = returns[np.cumsum(lengths) - lengths]
    left = np.repeat(lengths, lengths) - 1 - turn_positions(lengths)
    return _padded_slots(
        returns, codes, n_groups, lengths, left, lambda pad: _idle_returns(first, pad, gamma)
    )


def _idle_returns(start: np.ndarray, pad: np.ndarray, gamma: float) -> np.ndarray:
    """(Σ pad,) γ^k · start_i for k = 1 .. pad_i, trajectory after trajectory, by repeated multiplication: the
    rounding of ``discounted_returns`` on a trajectory with k more zero-reward turns, so ties stay exact."""
    offsets = segment_starts(pad)
    out = np.empty(offsets[-1])
    cur = start.astype(np.float64, copy=True)
    active = np.flatnonzero(pad > 0)
    k = 0
    while active.size:
        cur[active] = gamma * cur[active]
        out[offsets[active] + k] = cur[active]
        k += 1
        active = active[pad[active] > k]
    return out


def _padded_slots(returns, codes, n_groups, lengths, slot, pad_value):
    """Members of per-(group, slot) sets in which every trajectory of a group is present at every slot
    0 .. L_g − 1 (L_g: the group's longest trajectory): the M turns at their ``slot`` (M,), then one virtual
    member per trajectory i and slot T_i − 1 + k, k = 1 .. L_g − T_i; ``pad_value(pad)`` gives their values,
    trajectory after trajectory, from pad (N,) = L_g − T_i. Memory O(M + N · max T)."""
    longest = np.zeros(n_groups, np.int64)
    np.maximum.at(longest, codes, lengths)
    pad = longest[codes] - lengths
    owner = np.repeat(np.arange(lengths.size), pad)
    k = turn_positions(pad) + 1
    members = np.concatenate([returns, pad_value(pad)])
    group = np.concatenate([np.repeat(codes, lengths), codes[owner]])
    return (members, *_slot_codes(group, np.concatenate([slot, lengths[owner] - 1 + k]), n_groups, lengths))


def _slot_codes(group, slot, n_groups, lengths):
    width = int(lengths.max()) if lengths.size else 1
    codes = group * width + slot
    if n_groups * width > 4 * codes.size:  # a few very long trajectories: densify instead of a huge table
        return group_codes(codes)
    return codes, n_groups * width


NORM_SCOPES: Registry[Callable] = Registry("norm_scope", {
    "end_aligned": _scope_end_aligned,
    "absorbing": _scope_absorbing,
    "turn_position": _scope_turn_position,
    "group": _scope_group,
    "batch": _scope_batch,
}.items())


def gtpo(
    turn_rewards, group_ids, *, gamma: float = 0.9, norm_scope: NormScope = "end_aligned", eps: float = EPS
):
    """GTPO turn-level advantages (arXiv 2511.14846).

    turn_rewards: N sequences, r_i (T_i,) per trajectory; group_ids (N,). Returns a list of N float64 arrays,
    A_i (T_i,): discounted returns R_ij = Σ_{k≥j} γ^(k−j) r_ik z-scored over the set S given by ``norm_scope``:
    "end_aligned" (default: the group's returns the same number of turns before their trajectory's end, every
    trajectory present), "absorbing" (same position j, an ended trajectory counts with its last return),
    "turn_position" (turns at the same position j), "group" (all turns of the group), "batch".
    Invariants: (a) identical turn rewards -> 0; (b) γ = 1, outcome-only -> GRPO; (c) a lone success gets no
    negative turn; (d) outcome-only -> GRPO for any γ. "end_aligned" keeps all four, "absorbing" (a), (b),
    "turn_position" (a), "group" and "batch" none (table above ``NORM_SCOPES``).
    """
    seqs = [np.asarray(t, np.float64).reshape(-1) for t in turn_rewards]
    lengths = np.fromiter((s.size for s in seqs), np.int64, count=len(seqs))
    codes, n_groups = group_codes(group_ids)
    _same_length(lengths, codes, "turn_rewards", "group_ids")
    if (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"turn_rewards[{row}] is empty: a trajectory needs at least one turn")
    flat = np.concatenate(seqs) if seqs else np.zeros(0)
    bad = ~np.isfinite(flat)
    if bad.any():
        pos = int(np.flatnonzero(bad)[0])
        row = int(np.searchsorted(segment_starts(lengths), pos, side="right") - 1)
        raise ValueError(
            f"turn_rewards[{row}] has a non-finite reward {flat[pos]}: rewards must be finite numbers"
        )
    adv = gtpo_flat(flat, lengths, codes, n_groups, gamma=gamma, norm_scope=norm_scope, eps=eps)
    return np.split(adv, segment_starts(lengths)[1:-1])


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


def _returns(parents: np.ndarray, r: np.ndarray, mode: str, gamma: float) -> np.ndarray:
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


RETURN_MODES: Registry[Callable] = Registry("mode", {"max": _max_step, "mean": _mean_step}.items())


def murphy_returns(parent_ids, rewards, *, mode: str = "max", gamma: float = 1.0) -> np.ndarray:
    """MURPHY tree returns (arXiv 2511.07833): MaRS (``mode="max"``) or MeRS (``"mean"``), leaves up.

    parent_ids (K,): position of each node's parent, −1 at a root; rewards (K,): r(n), in [0, 1] for MeRS.
    Returns R (K,). With rewards in [0, 1] both modes keep R(n) in [0, 1] and give a node that passed (r = 1)
    R = 1, so it is never ranked below a sibling that failed and was repaired (MeRS is bounded for this, see
    ``_mean_step``); a sibling set that all passed ties and carries no signal.
    """
    parents = _int_vector(parent_ids, "parent_ids")
    r = _float_vector(rewards, "rewards")
    _same_length(r, parents, "rewards", "parent_ids")
    check_finite(r, what="rewards")
    return _returns(parents, r, mode, gamma)


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
    parents = _int_vector(parent_ids, "parent_ids")
    tree_codes, n_trees = group_codes(tree_ids, what="tree_ids")
    _same_length(parents, tree_codes, "parent_ids", "tree_ids")
    returns = murphy_returns(parents, rewards, mode=mode, gamma=gamma)
    sets, n_sets = sibling_sets(tree_codes, parents, n_trees)
    return segment_zscore(returns, sets, n_sets, eps=eps)


# --- small helpers ------------------------------------------------------------------------------------------
def _float_vector(x, what: str) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what}: expected numbers ({e})") from None
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence, got shape {arr.shape}")
    return arr


def _int_vector(x, what: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{what}: expected a flat sequence, got shape {arr.shape}")
    if arr.size and arr.dtype.kind not in "iu":
        raise ValueError(f"{what}: expected integer positions, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def _same_length(a: np.ndarray, b: np.ndarray, an: str, bn: str) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{an} has {a.shape[0]} rows but {bn} has {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError(f"{an} is empty: no groups to normalise over")


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


# --- estimator registry -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Estimator:
    """An advantage estimator: ``fn(batch, params)`` on the flat batch of the table it reads.

    table "trajectories": fn(TrajectoryBatch, params) -> per-turn advantages (M,);
    table "trees": fn(NodeBatch, params) -> (returns (K,), advantages (K,)).
    ``unit`` is what the adv/* metrics average over.
    """

    name: str
    table: Literal["trajectories", "trees"]
    unit: Literal["trajectory", "turn", "node"]
    fn: Callable


ESTIMATORS: Registry[Estimator] = Registry("advantage estimator")


def register_estimator(name: str, *, table: str, unit: str) -> Callable[[Callable], Callable]:
    def deco(fn: Callable) -> Callable:
        ESTIMATORS[name] = Estimator(name, table, unit, fn)  # type: ignore[arg-type]
        return fn

    return deco


def get_estimator(name: str) -> Estimator:
    return ESTIMATORS.lookup(name)


@dataclass
class TrajectoryBatch:
    """Flat view of scored trajectories. rewards (N,) r_i; lengths (N,) T_i; codes (N,) dense group codes;
    turn_rewards (M,) r_ij flat, trajectory after trajectory (None when the table has none)."""

    rewards: np.ndarray
    lengths: np.ndarray
    codes: np.ndarray
    n_groups: int
    turn_rewards: np.ndarray | None


@dataclass
class NodeBatch:
    """Flat view of scored tree nodes. parents (K,) global positions or −1; rewards (K,) r(n); sets (K,) dense
    sibling-set codes."""

    parents: np.ndarray
    rewards: np.ndarray
    sets: np.ndarray
    n_sets: int


@register_estimator("grpo", table="trajectories", unit="trajectory")
def _grpo_estimator(b: TrajectoryBatch, p: AdvantageParams) -> np.ndarray:
    return np.repeat(segment_zscore(b.rewards, b.codes, b.n_groups, eps=p.eps), b.lengths)


@register_estimator("dr_grpo", table="trajectories", unit="trajectory")
def _dr_grpo_estimator(b: TrajectoryBatch, p: AdvantageParams) -> np.ndarray:
    return np.repeat(segment_zscore(b.rewards, b.codes, b.n_groups, scale_by_std=False), b.lengths)


@register_estimator("gtpo", table="trajectories", unit="turn")
def _gtpo_estimator(b: TrajectoryBatch, p: AdvantageParams) -> np.ndarray:
    if b.turn_rewards is None:
        raise ValueError("gtpo needs turn_reward on every turn: run the score stage first")
    return gtpo_flat(
        b.turn_rewards, b.lengths, b.codes, b.n_groups, gamma=p.gamma, norm_scope=p.norm_scope, eps=p.eps
    )


@register_estimator("murphy", table="trees", unit="node")
def _murphy_estimator(b: NodeBatch, p: AdvantageParams) -> tuple[np.ndarray, np.ndarray]:
    ret = _returns(b.parents, b.rewards, p.murphy_mode, p.murphy_gamma)
    return ret, segment_zscore(ret, b.sets, b.n_sets, eps=p.eps)
