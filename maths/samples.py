"""The layout of training samples (``SAMPLES``): vectorised assembly from scored trajectories and tree nodes.
(Generic column helpers — flat views of nested columns, replacing struct fields — are in ``maths.columns``.)

A sample is a concatenation of segments taken from a pool of token ids: for a trajectory
[prompt, completion_1, observation_1, completion_2, …], for a tree node [prompt, completion]. Only completion
segments are trained (loss mask 1, their advantage, their rollout log-probs); everything else carries 0.
The assembly gathers every token through one index array: no Python loop over samples, turns or tokens.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from maths.columns import field, list_parts, numbers
from maths.segments import segment_starts, turn_positions


def assemble(
    seg_counts: np.ndarray,
    seg_start: np.ndarray,
    seg_len: np.ndarray,
    seg_train: np.ndarray,
    seg_adv: np.ndarray,
    pool_ids: np.ndarray,
    pool_lp: np.ndarray,
) -> dict[str, pa.ListArray]:
    """Concatenate segments into samples.

    seg_counts (B,): segments per sample; seg_start/seg_len/seg_train/seg_adv (S,): where each segment starts in
    the pool, its length, whether it is trained and its advantage, ordered sample by sample; pool_ids and
    pool_lp (P,): token ids and rollout log-probs. Returns input_ids, loss_mask, advantages, rollout_logprobs
    as list arrays of B rows.
    """
    seg_of_tok = np.repeat(np.arange(seg_len.size), seg_len)
    tok_off = segment_starts(seg_len)
    src = seg_start[seg_of_tok] + np.arange(tok_off[-1]) - tok_off[:-1][seg_of_tok]
    mask = seg_train[seg_of_tok]
    sample_off = tok_off[segment_starts(seg_counts)].astype(np.int32)
    offsets = pa.array(sample_off)

    def lists(values: np.ndarray, typ) -> pa.ListArray:
        return pa.ListArray.from_arrays(offsets, pa.array(values, type=typ))

    return {
        "input_ids": lists(pool_ids[src].astype(np.int32), pa.int32()),
        "loss_mask": lists(mask.astype(np.int8), pa.int8()),
        "advantages": lists(np.where(mask, seg_adv[seg_of_tok], 0.0).astype(np.float32), pa.float32()),
        "rollout_logprobs": lists(np.where(mask, pool_lp[src], 0.0).astype(np.float32), pa.float32()),
    }


def _checked_logprobs(ids_off, lp_off, what: str, labels) -> None:
    bad = np.flatnonzero(np.diff(ids_off) != np.diff(lp_off))
    if bad.size:
        i = int(bad[0])
        raise ValueError(
            f"{what} {labels(i)}: {int(ids_off[i + 1] - ids_off[i])} completion tokens but "
            f"{int(lp_off[i + 1] - lp_off[i])} rollout log-probs"
        )


def turn_lengths(table: pa.Table) -> np.ndarray:
    """(N,) number of turns of each trajectory."""
    offsets, _ = list_parts(table["turns"])
    return np.diff(offsets)


def trajectory_samples(table: pa.Table, turn_adv: np.ndarray) -> dict[str, pa.ListArray]:
    """Token columns of the samples of TRAJECTORIES rows: prompt, then per turn completion + observation.

    turn_adv (M,): advantage of each flat turn (trajectory after trajectory)."""
    n = table.num_rows
    p_off, p_vals = list_parts(table["prompt_token_ids"])
    t_off, turns = list_parts(table["turns"])
    lengths = np.diff(t_off)
    c_off, c_vals = list_parts(field(turns, "completion_token_ids"))
    l_off, l_vals = list_parts(field(turns, "completion_logprobs"))
    o_off, o_vals = list_parts(field(turns, "observation_token_ids"))
    traj = np.repeat(np.arange(n), lengths)
    pos = turn_positions(lengths)
    ids = table["trajectory_id"].to_pylist() if n else []
    _checked_logprobs(c_off, l_off, "trajectory", lambda m: f"{ids[traj[m]]!r} turn {int(pos[m])}")

    n_p, n_c = p_off[-1], c_off[-1]
    pool_ids = np.concatenate(
        [numbers(p_vals, np.int64), numbers(c_vals, np.int64), numbers(o_vals, np.int64)]
    )
    pool_lp = np.concatenate([np.zeros(n_p), numbers(l_vals, np.float64), np.zeros(o_off[-1])])

    seg_counts = 1 + 2 * lengths
    base = segment_starts(seg_counts)[:-1]
    s = int(seg_counts.sum())
    seg_start, seg_len = np.zeros(s, np.int64), np.zeros(s, np.int64)
    seg_train, seg_adv = np.zeros(s, bool), np.zeros(s)
    seg_start[base], seg_len[base] = p_off[:-1], np.diff(p_off)
    comp = base[traj] + 1 + 2 * pos
    seg_start[comp], seg_len[comp] = n_p + c_off[:-1], np.diff(c_off)
    seg_train[comp], seg_adv[comp] = True, turn_adv
    seg_start[comp + 1], seg_len[comp + 1] = n_p + n_c + o_off[:-1], np.diff(o_off)
    return assemble(seg_counts, seg_start, seg_len, seg_train, seg_adv, pool_ids, pool_lp)


def node_samples(nodes: pa.Array, node_adv: np.ndarray, labels) -> dict[str, pa.ListArray]:
    """Token columns of the samples of flat tree nodes (NODE structs): the node's prompt, then its completion.

    node_adv (K,); labels(i) names node i in an error."""
    p_off, p_vals = list_parts(field(nodes, "prompt_token_ids"))
    c_off, c_vals = list_parts(field(nodes, "completion_token_ids"))
    l_off, l_vals = list_parts(field(nodes, "completion_logprobs"))
    _checked_logprobs(c_off, l_off, "node", labels)
    k = len(nodes)
    n_p = p_off[-1]
    pool_ids = np.concatenate([numbers(p_vals, np.int64), numbers(c_vals, np.int64)])
    pool_lp = np.concatenate([np.zeros(n_p), numbers(l_vals, np.float64)])
    seg_start = np.stack([p_off[:-1], n_p + c_off[:-1]], axis=1).reshape(-1)
    seg_len = np.stack([np.diff(p_off), np.diff(c_off)], axis=1).reshape(-1)
    seg_train = np.tile([False, True], k)
    seg_adv = np.stack([np.zeros(k), node_adv], axis=1).reshape(-1)
    return assemble(np.full(k, 2), seg_start, seg_len, seg_train, seg_adv, pool_ids, pool_lp)
