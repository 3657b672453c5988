"""Advantages stage: read scored trajectories or trees, call the registered estimator
(``maths.estimators.ESTIMATORS``) on flat arrays, drop zero-signal groups / pruned nodes, write
samples.parquet (and trees.parquet with ``ret`` and ``pruned`` for MURPHY), and compute the adv/* metrics.
Rows, and trees with a node, that the score stage marked ``no_verdict`` (the sandbox failed twice on the
program) are dropped before any group statistic, so the rest of their group trains exactly as if they had never
been sampled.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from maths.columns import field, list_parts, numbers, with_fields
from maths.estimators import Estimator, NodeBatch, TrajectoryBatch, get_estimator, prune, sibling_sets
from maths.samples import node_samples, trajectory_samples
from maths.segments import group_codes, set_has_signal, set_outcomes_differ, turn_positions
from runtime.tableio import read_table, write_table
from schemas.outputs import StageOutput
from schemas.params.rewards import AdvantageParams
from schemas.tables import SAMPLES, TRAJECTORIES, TREES

log = logging.getLogger(__name__)


def adv_metrics(adv: np.ndarray) -> dict[str, float]:
    """adv/mean|std|min|max over the kept units (0 when none is kept)."""
    if adv.size == 0:
        return {"adv/mean": 0.0, "adv/std": 0.0, "adv/min": 0.0, "adv/max": 0.0}
    return {
        "adv/mean": float(adv.mean()),
        "adv/std": float(adv.std()),
        "adv/min": float(adv.min()),
        "adv/max": float(adv.max()),
    }


def _first_null(col: pa.Array) -> int | None:
    if not col.null_count:
        return None
    return int(np.flatnonzero(col.is_null().to_numpy(zero_copy_only=False))[0])


def _params_note(params: AdvantageParams) -> str:
    return "advantage params: " + ", ".join(f"{k}={v}" for k, v in params.model_dump().items())


def no_verdict(column: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """bool per row of a ``no_verdict`` column: True where the sandbox gave no verdict (null: not scored)."""
    return numbers(pc.fill_null(column, False), bool)


def run_trajectories(est: Estimator, params: AdvantageParams, uri: str, out: Path) -> StageOutput:
    table = read_table(uri, TRAJECTORIES)
    if table.num_rows == 0:
        raise ValueError(f"{uri}: no trajectories to compute advantages for")
    unjudged = no_verdict(table["no_verdict"])
    if unjudged.all():
        raise ValueError(
            f"{uri}: no trajectory has a verdict (the sandbox failed twice on each): nothing to train"
        )
    table = table.filter(pa.array(~unjudged))  # out before any group statistic: the rest are as if alone
    ids = table["trajectory_id"].to_pylist()
    rewards_col = table["reward"].combine_chunks()
    if (row := _first_null(rewards_col)) is not None:
        raise ValueError(f"trajectory {ids[row]!r} (row {row}) has no reward: run the score stage first")
    lengths = np.diff(list_parts(table["turns"])[0])
    if (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"trajectory {ids[row]!r} (row {row}) has no turns: nothing to train on")
    _, turns = list_parts(table["turns"])
    turn_reward = field(turns, "turn_reward")
    if turn_reward.null_count and est.unit == "turn":
        m = _first_null(turn_reward)
        row = int(np.searchsorted(np.cumsum(lengths), m, side="right"))
        raise ValueError(
            f"trajectory {ids[row]!r} (row {row}) has a turn without turn_reward: run score first"
        )
    codes, n_groups = group_codes(table["group_id"], what="group_id")
    rewards = numbers(rewards_col, np.float64)
    bad = ~np.isfinite(rewards)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raise ValueError(
            f"trajectory {ids[row]!r} (row {row}) has reward {rewards[row]}: rewards must be finite"
        )
    batch = TrajectoryBatch(
        rewards=rewards,
        lengths=lengths,
        codes=codes,
        n_groups=n_groups,
        turn_rewards=None if turn_reward.null_count else numbers(turn_reward, np.float64),
    )
    turn_adv = est.fn(batch, params)

    traj_of_turn = np.repeat(np.arange(table.num_rows), lengths)
    signal = set_has_signal(turn_adv, codes[traj_of_turn], n_groups)
    if params.signal_from == "outcomes":  # a group whose outcomes tie teaches nothing about the answer
        signal &= set_outcomes_differ(rewards, codes, n_groups)
    keep = np.ones(table.num_rows, bool) if params.keep_zero_signal else signal[codes]
    zero = int((~signal).sum())
    kept = table.filter(pa.array(keep))
    kept_turns = np.repeat(keep, lengths)
    tokens = trajectory_samples(kept, turn_adv[kept_turns])
    samples = pa.table(
        {
            "sample_id": kept["trajectory_id"],
            "source_id": kept["trajectory_id"],
            "problem_id": kept["problem_id"],
            "group_id": kept["group_id"],
            **tokens,
            "algo": pa.array([est.name] * kept.num_rows, pa.string()),
            "policy_version": kept["policy_version"],
        }
    )
    ref = write_table(samples, SAMPLES, out / "samples.parquet")

    unit_adv = turn_adv[kept_turns] if est.unit == "turn" else turn_adv[np.cumsum(lengths) - lengths][keep]
    metrics = {
        **adv_metrics(unit_adv),
        "adv/groups": float(n_groups),
        "adv/zero_signal_groups": float(zero),
        "adv/zero_signal_frac": zero / n_groups,
        "adv/samples": float(kept.num_rows),
        "adv/sandbox_error_dropped": float(unjudged.sum()),
        "adv/trained_tokens": float(pc.sum(pc.list_flatten(tokens["loss_mask"])).as_py() or 0),
    }
    if est.unit == "turn":
        pos = turn_positions(lengths)[kept_turns]
        sums = np.bincount(pos, weights=unit_adv)
        counts = np.bincount(pos)
        for j in np.flatnonzero(counts):
            metrics[f"adv/turn_{j + 1}/mean"] = float(sums[j] / counts[j])
    note = f"{est.name}: {zero} of {n_groups} groups had no signal" + (
        " (kept)" if params.keep_zero_signal else " and were dropped"
    )
    log.info(note)
    notes = [note, _params_note(params)]
    if unjudged.any():
        notes.append(
            f"{int(unjudged.sum())} trajectories without a verdict (no_verdict) dropped before grouping"
        )
    return StageOutput(stage="advantages", tables={"samples": ref}, metrics=metrics, notes=notes)


def no_verdict_trees(trees: pa.Table) -> np.ndarray:
    """(T,) bool: trees with a node the score stage marked ``no_verdict`` (the sandbox failed twice on it)."""
    t_off, nodes = list_parts(trees["nodes"])
    marked = no_verdict(field(nodes, "no_verdict"))
    tree_of = np.repeat(np.arange(trees.num_rows), np.diff(t_off))
    return np.bincount(tree_of, weights=marked, minlength=trees.num_rows) > 0


def run_trees(est: Estimator, params: AdvantageParams, uri: str, out: Path) -> StageOutput:
    all_trees = read_table(uri, TREES)
    dropped = no_verdict_trees(all_trees)
    if dropped.size and dropped.all():
        raise ValueError(f"{uri}: every tree has a node without a verdict (no_verdict): nothing to train")
    trees = all_trees.filter(pa.array(~dropped))  # whole trees: sibling sets and returns never cross trees
    t_off, nodes = list_parts(trees["nodes"])
    counts = np.diff(t_off)
    tree_ids = trees["tree_id"].to_pylist()
    tree_of = np.repeat(np.arange(trees.num_rows), counts)
    node_id = numbers(field(nodes, "node_id"), np.int64)
    local_parent = numbers(field(nodes, "parent_id"), np.int64)

    def label(i: int) -> str:
        return f"tree {tree_ids[tree_of[i]]!r} node {int(node_id[i])}"

    if len(nodes) == 0:
        raise ValueError(f"{uri}: no tree nodes to compute advantages for")
    bad = np.flatnonzero(node_id != turn_positions(counts))
    if bad.size:
        raise ValueError(f"{label(int(bad[0]))}: node_id must equal its position in the tree's nodes list")
    bad = np.flatnonzero((local_parent < -1) | (local_parent >= counts[tree_of]))
    if bad.size:
        i = int(bad[0])
        raise ValueError(f"{label(i)}: parent {int(local_parent[i])} is missing from its tree")
    reward_col = field(nodes, "reward")
    if (i := _first_null(reward_col)) is not None:
        raise ValueError(f"{label(i)} has no reward: run the score stage first")
    rewards = numbers(reward_col, np.float64)
    if not np.isfinite(rewards).all():
        raise ValueError(f"{label(int(np.flatnonzero(~np.isfinite(rewards))[0]))} has a non-finite reward")
    parents = np.where(local_parent >= 0, t_off[:-1][tree_of] + local_parent, -1)
    try:
        sets, n_sets = sibling_sets(tree_of, parents, trees.num_rows)
        ret, adv = est.fn(NodeBatch(parents=parents, rewards=rewards, sets=sets, n_sets=n_sets), params)
    except ValueError as e:  # name the tree and node instead of a flat position
        msg = str(e)
        if msg.startswith("node "):
            pos = int(msg.split()[1].rstrip(":"))
            msg = f"{label(pos)}{msg[msg.index(':') :]}"
        raise ValueError(msg) from None
    pruned, why = prune(
        ret,
        adv,
        sets,
        n_sets,
        inter_keep=params.inter_keep,
        intra_keep=params.intra_keep,
        keep_zero_signal=params.keep_zero_signal,
    )
    all_counts = np.diff(list_parts(all_trees["nodes"])[0])
    kept_node = np.repeat(~dropped, all_counts)  # dropped trees: every node pruned, no return
    all_ret = np.zeros(kept_node.size, np.float32)
    all_ret[kept_node] = ret
    all_pruned = np.ones(kept_node.size, bool)
    all_pruned[kept_node] = pruned
    new_nodes = with_fields(
        all_trees["nodes"], {"ret": pa.array(all_ret, mask=~kept_node), "pruned": all_pruned}
    )
    trees_ref = write_table(
        all_trees.set_column(all_trees.schema.get_field_index("nodes"), "nodes", new_nodes),
        TREES,
        out / "trees.parquet",
    )

    keep = np.flatnonzero(~pruned)
    kept_nodes = nodes.take(pa.array(keep))
    tokens = node_samples(kept_nodes, adv[keep], lambda i: label(int(keep[i])))
    tree_col = pa.array([tree_ids[t] for t in tree_of[keep]], pa.string())
    problem_ids = trees["problem_id"].to_pylist()
    versions = trees["policy_version"].to_pylist()
    source = pc.binary_join_element_wise(tree_col, pa.array(node_id[keep].astype(str)), "/")
    group = pc.binary_join_element_wise(tree_col, pa.array(local_parent[keep].astype(str)), "/")
    samples = pa.table(
        {
            "sample_id": source,
            "source_id": source,
            "problem_id": pa.array([problem_ids[t] for t in tree_of[keep]], pa.string()),
            "group_id": group,
            **tokens,
            "algo": pa.array([est.name] * keep.size, pa.string()),
            "policy_version": pa.array([versions[t] for t in tree_of[keep]], pa.int32()),
        }
    )
    ref = write_table(samples, SAMPLES, out / "samples.parquet")
    signal = set_has_signal(adv, sets, n_sets)
    metrics = {
        **adv_metrics(adv[keep]),
        "adv/groups": float(n_sets),
        "adv/zero_signal_groups": float((~signal).sum()),
        "adv/zero_signal_frac": float((~signal).mean()),
        "adv/pruned_nodes": float(pruned.sum()),
        "adv/pruned_zero_signal": float(why["zero_signal"]),
        "adv/pruned_inter": float(why["inter"]),
        "adv/pruned_intra": float(why["intra"]),
        "adv/ret/mean": float(ret.mean()),
        "adv/sandbox_error_trees_dropped": float(dropped.sum()),
        "adv/samples": float(keep.size),
        "adv/trained_tokens": float(pc.sum(pc.list_flatten(tokens["loss_mask"])).as_py() or 0),
    }
    note = (
        f"murphy: pruned {int(pruned.sum())} of {pruned.size} nodes (zero signal {why['zero_signal']}, "
        f"InterP {why['inter']}, IntraP {why['intra']})"
    )
    log.info(note)
    notes = [note, _params_note(params)]
    if dropped.any():
        notes.append(f"{int(dropped.sum())} trees with a no_verdict node were left out (all nodes pruned)")
    return StageOutput(
        stage="advantages", tables={"samples": ref, "trees": trees_ref}, metrics=metrics, notes=notes
    )


RUNNERS = {"trajectories": run_trajectories, "trees": run_trees}


def run(params: AdvantageParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Scored trajectories (grpo, dr_grpo, gtpo) or trees (murphy) -> samples.parquet (+ trees.parquet with
    ``ret`` and ``pruned`` for murphy). Zero-signal groups are dropped unless ``keep_zero_signal``."""
    est = get_estimator(params.estimator)
    if est.table not in inputs:
        raise ValueError(f"estimator {est.name!r} reads {est.table!r}; inputs has {sorted(inputs)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    return RUNNERS[est.table](est, params, inputs[est.table], out)
