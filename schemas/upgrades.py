"""Bring a stored table of an older readable schema version up to the current one (``runtime.tableio.read_table``).

Each step is pure Arrow on the stored table, so a run stored by an older turntree reads as if written today:

- trajectories / trees / samples v1 -> v2: ``policy_version`` added (null: not recorded).
- trajectories v2 -> v3: ``no_verdict`` from the old encoding, a ``sandbox_error`` reward component > 0 (the
  component goes; ``False`` for any other scored row, null for an unscored one).
- trees v2 -> v3: each node's ``no_verdict`` from the old encoding, a null reward on a node marked ``pruned``
  (``False`` on a scored node, null on an unscored one).
- eval_results v1 -> v2: ``no_verdict`` null (v1 did not store it).
"""

from __future__ import annotations

from collections.abc import Callable

import pyarrow as pa
import pyarrow.compute as pc

from schemas.tables import ALL, NODE

# The old encoding of "no verdict" in a trajectory's reward components (schema v2 and before)
OLD_SANDBOX_ERROR = "sandbox_error"
# Nullable columns a writer's row may leave out (null): the columns added by a version bump
OPTIONAL_COLUMNS: dict[str, frozenset[str]] = {
    "trajectories": frozenset({"policy_version", "no_verdict"}),
    "trees": frozenset({"policy_version"}),
    "samples": frozenset({"policy_version"}),
    "eval_results": frozenset({"no_verdict"}),
}


def _append_null(table: pa.Table, name: str, column: str) -> pa.Table:
    if column in table.column_names:
        return table
    return table.append_column(column, pa.nulls(table.num_rows, ALL[name].field(column).type))


def _trajectory_verdicts(table: pa.Table) -> pa.Table:
    comps = table["reward_components"].to_pylist()
    flag = [None if c is None else dict(c).get(OLD_SANDBOX_ERROR, 0.0) > 0 for c in comps]
    unscored = table["reward"].is_null().to_pylist()
    no_verdict = [f if not u or f else None for f, u in zip(flag, unscored, strict=True)]
    kept = [None if c is None else [(k, v) for k, v in c if k != OLD_SANDBOX_ERROR] for c in comps]
    i = table.schema.get_field_index("reward_components")
    table = table.set_column(i, "reward_components", pa.array(kept, table.schema.field(i).type))
    return table.drop_columns([c for c in ["no_verdict"] if c in table.column_names]).append_column(
        "no_verdict", pa.array(no_verdict, pa.bool_())
    )


def _node_verdicts(table: pa.Table) -> pa.Table:
    lists = table["nodes"].combine_chunks()
    nodes = lists.flatten()  # the struct values of every tree, in order
    reward, pruned = nodes.field("reward"), nodes.field("pruned")
    no_verdict = pc.if_else(reward.is_null(), pc.if_else(pruned, True, pa.scalar(None, pa.bool_())), False)
    children = {f.name: nodes.field(f.name) for f in nodes.type}
    children["no_verdict"] = no_verdict
    struct = pa.StructArray.from_arrays([children[f.name] for f in NODE], fields=list(NODE))
    offsets = pc.subtract(lists.offsets, lists.offsets[0])
    i = table.schema.get_field_index("nodes")
    nodes_array = pa.ListArray.from_arrays(offsets, struct, mask=lists.is_null())
    return table.set_column(i, pa.field("nodes", pa.list_(NODE)), nodes_array)


def _policy_version(name: str) -> Callable[[pa.Table], pa.Table]:
    return lambda t: _append_null(t, name, "policy_version")


# (table, stored version) -> the step to the next version, and that version
STEPS: dict[tuple[str, str], tuple[Callable[[pa.Table], pa.Table], str]] = {
    ("trajectories", "1"): (_policy_version("trajectories"), "2"),
    ("trajectories", "2"): (_trajectory_verdicts, "3"),
    ("trees", "1"): (_policy_version("trees"), "2"),
    ("trees", "2"): (_node_verdicts, "3"),
    ("samples", "1"): (_policy_version("samples"), "2"),
    ("eval_results", "1"): (lambda t: _append_null(t, "eval_results", "no_verdict"), "2"),
}


def upgrade(name: str, version: str, table: pa.Table) -> pa.Table:
    """``table`` (stored as ``name`` at schema ``version``) in the current version's shape."""
    while (name, version) in STEPS:
        step, version = STEPS[(name, version)]
        table = step(table)
    return table
