"""Credit assignment for GRPO, Dr.GRPO, GTPO and MURPHY (docs/algorithms.md): pure array maths, no I/O.

Array-level functions (plain lists or numpy arrays in, numpy out; other stages and outside checks call them):

    grpo(rewards, group_ids, *, scale_by_std=True) -> adv (N,)
    gtpo(turn_rewards, group_ids, *, gamma=0.9, norm_scope="end_aligned") -> [adv_i (T_i,)] per trajectory
    murphy_returns(parent_ids, rewards, *, mode="max", gamma=1.0) -> returns (K,)
    murphy(tree_ids, parent_ids, rewards, *, mode="max", gamma=1.0) -> adv (K,)
    gtpo_shaping(codes, success, group_ids, *, alpha=0.5, similarity="lexical") -> shaped final rewards (N,)

All are vectorised: segment reductions over dense group codes (``maths.segments``), discounted returns by
turn position, tree returns level by level by depth; no Python loop over trajectories, turns or nodes.

GTPO lives in ``maths.gtpo``, MURPHY in ``maths.murphy``; their array functions are re-exported here. The
advantages stage (``stages.advantages``) turns scored rows into training samples through the estimator
registry here (``ESTIMATORS``; add one with ``@register_estimator``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np

from maths.gtpo import NORM_SCOPES, NormScope, discounted_returns, gtpo, gtpo_flat  # noqa: F401
from maths.murphy import (  # noqa: F401
    RETURN_MODES,
    murphy,
    murphy_returns,
    node_depths,
    prune,
    sibling_sets,
    tree_returns,
)
from maths.reward_fns import gtpo_shaping  # noqa: F401  (re-exported: part of this module's array API)
from maths.segments import (
    EPS,
    check_finite,
    contiguous_runs,
    group_codes,
    runs_zscore,
    segment_zscore,
)
from maths.vectors import float_vector, same_length
from schemas.params.rewards import AdvantageParams
from schemas.registry import Registry

log = logging.getLogger(__name__)



# --- GRPO / Dr.GRPO -----------------------------------------------------------------------------------------
def grpo(rewards, group_ids, *, scale_by_std: bool = True, eps: float = EPS) -> np.ndarray:
    """GRPO group z-score (DeepSeekMath, arXiv 2402.03300); ``scale_by_std=False`` is Dr.GRPO (arXiv 2503.20783).

    rewards (N,): outcome reward r_i per trajectory; group_ids (N,): str or int, G trajectories of a prompt
    share one. Returns A (N,) = (r_i − mean_g r) / (std_g r + ε), std with ddof = 1; a one-member group gets 0.
    """
    r = float_vector(rewards, "rewards")
    ids = np.asarray(group_ids) if isinstance(group_ids, list | tuple) else group_ids
    runs = contiguous_runs(ids)
    if runs is not None:  # rollout order: one contiguous run per group, no scatter needed
        same_length(r, np.empty(runs[-1]), "rewards", "group_ids")
        check_finite(r, what="rewards")
        return runs_zscore(r, runs, scale_by_std=scale_by_std, eps=eps)
    codes, n_groups = group_codes(ids)
    same_length(r, codes, "rewards", "group_ids")
    check_finite(r, what="rewards")
    return segment_zscore(r, codes, n_groups, scale_by_std=scale_by_std, eps=eps)


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
    ret = tree_returns(b.parents, b.rewards, p.murphy_mode, p.murphy_gamma)
    return ret, segment_zscore(ret, b.sets, b.n_sets, eps=p.eps)
