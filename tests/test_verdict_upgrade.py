"""Runs stored before the ``no_verdict`` column (trajectories/trees schema v2, eval_results v1) stay readable and
train exactly as they did: ``tests/fixtures/schema_v2/`` holds tables written by turntree 490d7bd's own score
stage (a program the sandbox failed on twice in each) and a v1 evaluation table."""

from __future__ import annotations

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from runtime.tableio import read_table, write_table
from schemas.params.rewards import AdvantageParams
from schemas.tables import EVAL_RESULTS, SAMPLES, TRAJECTORIES, TREES
from stages import advantages

STORED = Path(__file__).parent / "fixtures" / "schema_v2"


def _stored_version(name: str) -> str:
    return pq.read_schema(STORED / name).metadata[b"schema_version"].decode()


def test_the_fixtures_are_of_the_previous_versions():
    assert [_stored_version(f"{k}_trajectories.parquet") for k in ("rollout", "scored")] == ["2", "2"]
    assert [_stored_version(f"{k}_trees.parquet") for k in ("rollout", "scored")] == ["2", "2"]
    assert _stored_version("eval_results.parquet") == "1"
    assert TRAJECTORIES.metadata[b"schema_version"] == TREES.metadata[b"schema_version"] == b"3"


def test_a_stored_sandbox_error_component_reads_as_no_verdict_and_the_component_goes():
    old = {r["trajectory_id"]: r for r in pq.read_table(STORED / "scored_trajectories.parquet").to_pylist()}
    assert dict(old["x"]["reward_components"])["sandbox_error"] == 1.0  # the old encoding
    new = {
        r["trajectory_id"]: r
        for r in read_table(STORED / "scored_trajectories.parquet", TRAJECTORIES).to_pylist()
    }
    assert {t: r["no_verdict"] for t, r in new.items()} == {
        "a": False,
        "b": False,
        "x": True,
        "d": False,
        "e": False,
    }
    assert all("sandbox_error" not in dict(r["reward_components"]) for r in new.values())
    for t in new:  # nothing else changes
        kept = {k: v for k, v in old[t]["reward_components"] if k != "sandbox_error"}
        assert dict(new[t]["reward_components"]) == kept
        assert {k: v for k, v in new[t].items() if k not in ("no_verdict", "reward_components")} == {
            k: v for k, v in old[t].items() if k != "reward_components"
        }
    unscored = read_table(STORED / "rollout_trajectories.parquet", TRAJECTORIES)
    assert unscored["no_verdict"].to_pylist() == [None] * unscored.num_rows  # not scored: unknown


def test_a_stored_null_reward_pruned_node_reads_as_no_verdict():
    old = pq.read_table(STORED / "scored_trees.parquet").to_pylist()
    assert (old[1]["nodes"][1]["reward"], old[1]["nodes"][1]["pruned"]) == (None, True)  # the old encoding
    new = read_table(STORED / "scored_trees.parquet", TREES).to_pylist()
    assert [[n["no_verdict"] for n in t["nodes"]] for t in new] == [[False, False], [False, True]]
    for o, n in zip(old, new, strict=True):
        assert [{k: v for k, v in d.items() if k != "no_verdict"} for d in n["nodes"]] == o["nodes"]
    unscored = read_table(STORED / "rollout_trees.parquet", TREES).to_pylist()
    assert [n["no_verdict"] for t in unscored for n in t["nodes"]] == [None] * 4


def test_advantages_on_stored_v2_tables_drop_what_they_dropped_before(tmp_path):
    out = advantages.run(
        AdvantageParams(estimator="grpo"),
        {"trajectories": str(STORED / "scored_trajectories.parquet")},
        tmp_path / "t",
    )
    assert {r["sample_id"] for r in read_table(out.uri("samples"), SAMPLES).to_pylist()} == set("abde")
    assert out.metrics["adv/sandbox_error_dropped"] == 1.0
    out = advantages.run(
        AdvantageParams(estimator="murphy"), {"trees": str(STORED / "scored_trees.parquet")}, tmp_path / "m"
    )
    assert {r["sample_id"] for r in read_table(out.uri("samples"), SAMPLES).to_pylist()} == {"T/0", "T/1"}
    assert out.metrics["adv/sandbox_error_trees_dropped"] == 1.0


def test_a_stored_v1_eval_table_reads_with_unknown_verdicts_and_a_written_one_keeps_them(tmp_path):
    old = read_table(STORED / "eval_results.parquet", EVAL_RESULTS)
    assert old["no_verdict"].to_pylist() == [None] * old.num_rows
    rows = old.to_pylist()
    rows[0]["no_verdict"] = True
    write_table(rows, EVAL_RESULTS, tmp_path / "e.parquet")
    assert read_table(tmp_path / "e.parquet", EVAL_RESULTS)["no_verdict"].to_pylist()[0] is True


@pytest.mark.parametrize("name", ["scored_trajectories.parquet", "scored_trees.parquet"])
def test_an_upgraded_table_writes_back_as_the_current_version(tmp_path, name):
    schema = TREES if "trees" in name else TRAJECTORIES
    write_table(read_table(STORED / name, schema), schema, tmp_path / name)
    assert (
        _stored_version(name) == "2" and pq.read_schema(tmp_path / name).metadata[b"schema_version"] == b"3"
    )


def test_every_readable_version_upgrades_to_the_current_one_and_no_step_is_unreadable():
    """READABLE_VERSIONS is hand-kept beside upgrades.STEPS: a version a reader accepts must have a chain of steps
    to the current version (else it is read in an old shape), and a step's source must be readable."""
    from schemas.tables import ALL, READABLE_VERSIONS
    from schemas.upgrades import STEPS

    assert set(READABLE_VERSIONS) == set(ALL)
    for name, versions in READABLE_VERSIONS.items():
        current = ALL[name].metadata[b"schema_version"].decode()
        assert current in versions, name
        for start in versions:
            v, seen = start, set()
            while (name, v) in STEPS and v not in seen:
                seen.add(v)
                v = STEPS[(name, v)][1]
            assert v == current, f"{name} v{start} ends at v{v}, not v{current}"
    for name, v in STEPS:
        assert v in READABLE_VERSIONS[name], (name, v)
