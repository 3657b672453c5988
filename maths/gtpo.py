"""GTPO turn-level advantages (arXiv 2511.14846): discounted returns per turn, normalised over the set a
``norm_scope`` names (``NORM_SCOPES``; the invariants each scope keeps are tabled above it). Pure array maths.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import numpy as np

from maths.segments import (
    EPS,
    group_codes,
    segment_starts,
    segment_zscore,
    turn_positions,
)
from maths.vectors import same_length
from schemas.registry import Registry

NormScope = Literal["end_aligned", "end_aligned_discounted", "absorbing", "turn_position", "group", "batch"]


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
    if norm_scope in GROUP_SCALED:
        return _group_scaled(members, set_codes, n_sets, np.repeat(codes, lengths), n_groups, eps)
    return segment_zscore(members, set_codes, n_sets, eps=eps)[: returns.size]


def _group_scaled(members, set_codes, n_sets, turn_group, n_groups, eps):
    """(R_ij − mean S) / (scale_g + ε): centred on the turn's set as usual, but one scale per group, the largest
    std of its sets. With an outcome-only reward every set is S_gd = γ^d · {r_i}, so scale_g = std {r_i} and
    A_ij = γ^d · the GRPO advantage: an earlier turn's advantage shrinks by γ per turn left (the discount acts,
    unlike under ``end_aligned``, where it cancels inside each set's z-score)."""
    centred = segment_zscore(members, set_codes, n_sets, scale_by_std=False)
    count = np.bincount(set_codes, minlength=n_sets).astype(np.float64)
    std = np.sqrt(
        np.bincount(set_codes, weights=centred * centred, minlength=n_sets) / np.maximum(count - 1, 1)
    )
    m = turn_group.size
    scale = np.zeros(n_groups)
    np.maximum.at(scale, turn_group, std[set_codes[:m]])  # every set holds a real turn (the longest one's)
    return centred[:m] / (scale[turn_group] + eps)


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
#   end_aligned_discounted ✓ ✓ ✓    ✗    end_aligned's sets, one scale per group: A = γ^d · GRPO (outcome-only)
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


GROUP_SCALED = {"end_aligned_discounted"}  # centred per set, scaled per group (``_group_scaled``)
NORM_SCOPES: Registry[Callable] = Registry(
    "norm_scope",
    {
        "end_aligned": _scope_end_aligned,
        "end_aligned_discounted": _scope_end_aligned,
        "absorbing": _scope_absorbing,
        "turn_position": _scope_turn_position,
        "group": _scope_group,
        "batch": _scope_batch,
    }.items(),
)


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
    same_length(lengths, codes, "turn_rewards", "group_ids")
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
