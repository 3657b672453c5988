"""runtime.tableio: schema round-trips (hypothesis, all tables), crash safety of the atomic writer, validation
errors, and refusal of unknown schema versions."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.tableio import SchemaError, read_table, write_table
from schemas.tables import ALL, PROBLEMS, TRAJECTORIES, TREES

REPO = Path(__file__).resolve().parents[1]


def value_strategy(t: pa.DataType) -> st.SearchStrategy:
    """Python values fitting an Arrow type (nulls decided by the field, not here)."""
    if pa.types.is_string(t):
        return st.text(max_size=12)
    if pa.types.is_int8(t):
        return st.integers(-128, 127)
    if pa.types.is_int32(t):
        return st.integers(-(2**31), 2**31 - 1)
    if pa.types.is_float32(t):
        return st.floats(width=32, allow_nan=False)
    if pa.types.is_boolean(t):
        return st.booleans()
    if pa.types.is_map(t):
        # Arrow maps come back as lists of (key, value) pairs; keys unique
        return st.dictionaries(value_strategy(t.key_type), value_strategy(t.item_type), max_size=3).map(
            lambda d: list(d.items())
        )
    if pa.types.is_list(t):
        return st.lists(field_strategy(t.value_field), max_size=3)
    if pa.types.is_struct(t):
        return st.fixed_dictionaries({f.name: field_strategy(f) for f in t})
    raise NotImplementedError(f"no strategy for {t}")


def field_strategy(f: pa.Field) -> st.SearchStrategy:
    s = value_strategy(f.type)
    return st.one_of(st.none(), s) if f.nullable else s


def rows_strategy(schema: pa.Schema) -> st.SearchStrategy:
    return st.lists(st.fixed_dictionaries({f.name: field_strategy(f) for f in schema}), max_size=4)


@pytest.mark.parametrize("name", sorted(ALL))
def test_round_trip_every_table(name, tmp_path_factory):
    schema = ALL[name]
    out = tmp_path_factory.mktemp(name) / f"{name}.parquet"

    @settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(rows_strategy(schema))
    def check(rows):
        ref = write_table(rows, schema, out)
        assert ref.rows == len(rows)
        back = read_table(out, schema)
        assert back.schema.equals(schema, check_metadata=True)
        assert back.to_pylist() == rows

    check()


def _trajectory_row(**turn_overrides) -> dict:
    turn = {
        "turn_idx": 0,
        "completion_token_ids": [1, 2, 3],
        "completion_logprobs": [-0.5, -0.25, -1.0],
        "observation_token_ids": [],
        "text": "x",
        "code": None,
        "tool_call": "none",
        "exec_status": "none",
        "exec_output": None,
        "turn_reward": None,
    }
    turn.update(turn_overrides)
    return {
        "trajectory_id": "t0",
        "problem_id": "p0",
        "group_id": "g0",
        "sample_idx": 0,
        "prompt_token_ids": [5, 6],
        "turns": [turn],
        "final_answer": None,
        "stop_reason": "answer",
        "correct": None,
        "reward": None,
        "reward_components": None,
        "policy_version": 0,
        "no_verdict": None,
    }


def test_nested_values_survive_exactly(tmp_path):
    """Hand-built tree: node structs with parent ids, -1 at the root, float32 log-probs as stored."""
    node = {
        "node_id": 0,
        "parent_id": -1,
        "depth": 1,
        "prompt_token_ids": [1, 2],
        "completion_token_ids": [3],
        "completion_logprobs": [-0.125],
        "text": None,
        "code": "def f(): pass",
        "exec_result": None,
        "tests_passed": 1,
        "tests_total": 2,
        "reward": 0.5,
        "ret": None,
        "pruned": False,
        "no_verdict": False,
    }
    child = dict(node, node_id=1, parent_id=0, depth=2, pruned=True, no_verdict=None)
    rows = [{"tree_id": "tr", "problem_id": "p", "nodes": [node, child], "truncated": False}]
    write_table(rows, TREES, tmp_path / "trees.parquet")
    back = read_table(tmp_path / "trees.parquet", TREES).to_pylist()
    assert [n["parent_id"] for n in back[0]["nodes"]] == [-1, 0]
    assert back[0]["nodes"][1]["pruned"] is True
    assert back == [dict(rows[0], policy_version=None)]  # left out: an added column, written as null


# --- validation ---------------------------------------------------------------------------------------------
def test_missing_column_is_named(tmp_path):
    row = _trajectory_row()
    del row["stop_reason"]
    with pytest.raises(SchemaError, match="stop_reason"):
        write_table([row], TRAJECTORIES, tmp_path / "t.parquet")


def test_extra_column_is_named(tmp_path):
    row = dict(_trajectory_row(), surprise=1)
    with pytest.raises(SchemaError, match="surprise"):
        write_table([row], TRAJECTORIES, tmp_path / "t.parquet")


def test_wrongly_typed_column_is_named(tmp_path):
    row = {f.name: None for f in PROBLEMS}
    row.update(problem_id="p", source="s", kind="math", prompt="1+1?", test_format="none", split="eval")
    table = pa.Table.from_pylist([row], schema=PROBLEMS)
    table = table.set_column(PROBLEMS.get_field_index("tests"), "tests", pa.array([3.5]))
    with pytest.raises(SchemaError, match="column 'tests' has type double"):
        write_table(table, PROBLEMS, tmp_path / "p.parquet")


def test_null_inside_non_null_nested_field_is_named(tmp_path):
    row = _trajectory_row(completion_token_ids=None)
    with pytest.raises(SchemaError, match=r"turns\[\]\.completion_token_ids"):
        write_table([row], TRAJECTORIES, tmp_path / "t.parquet")
    assert not (tmp_path / "t.parquet").exists()


def test_reader_refuses_unknown_schema_version(tmp_path):
    path = tmp_path / "t.parquet"
    write_table([_trajectory_row()], TRAJECTORIES, path)
    table = pq.read_table(path)
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"999"
    pq.write_table(table.replace_schema_metadata(meta), path)
    with pytest.raises(
        SchemaError, match=r"schema_version '999' is not readable.*readable: \['1', '2', '3'\]"
    ):
        read_table(path, TRAJECTORIES)


def test_reader_refuses_another_table(tmp_path):
    path = tmp_path / "t.parquet"
    write_table([_trajectory_row()], TRAJECTORIES, path)
    with pytest.raises(SchemaError, match="holds table 'trajectories', expected 'problems'"):
        read_table(path, PROBLEMS)


# --- crash safety -------------------------------------------------------------------------------------------
# The child writes a new table whose Parquet writer stalls half-way (after flushing half the bytes to the temp
# file), announces it, and waits to be SIGKILLed: the kill lands mid-write every time.
_STALLING_WRITER = textwrap.dedent(
    """
    import io, sys, time
    from pathlib import Path
    import pyarrow.parquet as pq
    import runtime.tableio as tio
    from schemas.tables import TRAJECTORIES

    real_write = pq.write_table

    def stalling_write(table, sink, **kw):
        buf = io.BytesIO()
        real_write(table, buf, **kw)
        data = buf.getvalue()
        sink.write(data[: len(data) // 2])
        sink.flush()
        Path(sys.argv[2]).write_text("stalled")
        time.sleep(600)

    tio.pq.write_table = stalling_write
    row = {"trajectory_id": "new", "problem_id": "p", "group_id": "g", "sample_idx": 1,
           "prompt_token_ids": list(range(5000)), "turns": [], "final_answer": None, "stop_reason": "answer",
           "correct": None, "reward": None, "reward_components": None}
    tio.write_table([row] * 50, TRAJECTORIES, sys.argv[1])
    """
)


def _kill_mid_write(target: Path) -> None:
    ready = target.parent / "ready"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", _STALLING_WRITER, str(target), str(ready)], env=env)
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert proc.poll() is None, "writer exited before stalling"
            assert time.monotonic() < deadline, "writer never reached the middle of its write"
            time.sleep(0.05)
        tmp_files = [p for p in target.parent.iterdir() if p.name.endswith(".tmp")]
        assert tmp_files, "the writer should be writing to a temporary file"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def test_writer_killed_mid_write_leaves_old_file_intact(tmp_path):
    target = tmp_path / "trajectories.parquet"
    old = [_trajectory_row()]
    write_table(old, TRAJECTORIES, target)
    before = target.read_bytes()
    _kill_mid_write(target)
    assert target.read_bytes() == before
    assert read_table(target, TRAJECTORIES).to_pylist() == old
    leftovers = [p.name for p in tmp_path.iterdir() if p.name not in ("trajectories.parquet", "ready")]
    assert all(n.startswith(".") and n.endswith(".tmp") for n in leftovers), leftovers


def test_writer_killed_mid_write_leaves_no_file_under_final_name(tmp_path):
    target = tmp_path / "trajectories.parquet"
    _kill_mid_write(target)
    assert not target.exists()
    with pytest.raises(FileNotFoundError):
        read_table(target, TRAJECTORIES)


def test_a_version_1_rollout_table_reads_with_null_policy_versions(tmp_path):
    """Runs stored before the asynchronous pipeline (trajectories/trees/samples schema_version 1, no
    ``policy_version``) stay readable: the added column comes back as nulls."""
    path = tmp_path / "t.parquet"
    write_table([_trajectory_row()], TRAJECTORIES, path)
    table = pq.read_table(path).drop_columns(["policy_version", "no_verdict"])
    meta = dict(table.schema.metadata)
    meta[b"schema_version"] = b"1"
    pq.write_table(table.replace_schema_metadata(meta), path)
    back = read_table(path, TRAJECTORIES)
    assert back.schema.metadata[b"schema_version"] == b"3"
    assert back["policy_version"].to_pylist() == [None]
    assert back.drop_columns(["policy_version", "no_verdict"]).to_pylist() == table.to_pylist()
