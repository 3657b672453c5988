"""Run storage: versioned stage outputs, atomic manifest, no overwrite on rerun."""

from __future__ import annotations

import json
import os

import pytest

from flows.runstore import RunNotFound, RunStore, list_runs
from runtime.tableio import read_table, write_table
from schemas import tables
from schemas.outputs import StageOutput

ROW = {
    "problem_id": "p1",
    "source": "t",
    "kind": "math",
    "prompt": "1+1?",
    "entry_point": None,
    "tests": None,
    "test_format": "none",
    "answer": "2",
    "reference_solution": None,
    "demonstration": None,
    "difficulty": None,
    "split": "train",
    "meta": None,
}


def _fake_stage(store: RunStore, iteration, prompt: str) -> StageOutput:
    scratch = store.scratch_dir("data", iteration)
    ref = write_table([{**ROW, "prompt": prompt}], tables.PROBLEMS, scratch / "problems.parquet")
    out = StageOutput(stage="data", tables={"problems": ref}, metrics={"data/rows": 1})
    return store.commit("data", iteration, scratch, out, inputs={}, params={"p": prompt}, params_field="data")


def test_versions_are_new_dirs_and_old_ones_stay_byte_identical(tmp_path):
    store = RunStore(str(tmp_path), "r1")
    store.create_or_open({"a": 1})
    v1 = _fake_stage(store, None, "first")
    before = open(v1.uri("problems"), "rb").read()
    v2 = _fake_stage(store, None, "second")
    assert v1.uri("problems").endswith("/data/v1/problems.parquet")
    assert v2.uri("problems").endswith("/data/v2/problems.parquet")
    assert open(v1.uri("problems"), "rb").read() == before
    assert read_table(v2.uri("problems"), tables.PROBLEMS)["prompt"][0].as_py() == "second"
    manifest = store.load()
    entry = manifest["stages"]["data"]
    assert entry["current"] == "v2" and set(entry["versions"]) == {"v1", "v2"}
    assert store.current_output("data", None).uri("problems") == v2.uri("problems")
    # no scratch directory is left behind
    assert not [p for p in (tmp_path / "r1" / "data").iterdir() if p.name.startswith(".tmp")]


def test_iteration_layout_and_stage_record(tmp_path):
    store = RunStore(str(tmp_path), "r2")
    store.create_or_open({})
    out = _fake_stage(store, 3, "x")
    assert "/r2/iter-3/data/v1/" in out.uri("problems")
    assert store.stage_record("data", 3)["params"] == {"p": "x"}
    with pytest.raises(KeyError, match="no stage 'iter-1/data'"):
        store.stage_record("data", 1)


def test_reopen_with_other_params_is_refused(tmp_path):
    store = RunStore(str(tmp_path), "r3")
    store.create_or_open({"a": 1})
    assert store.create_or_open({"a": 1})["params"] == {"a": 1}
    with pytest.raises(ValueError, match="different parameters"):
        store.create_or_open({"a": 2})


def test_missing_run_and_bad_ids(tmp_path):
    with pytest.raises(RunNotFound, match="no run 'nope'"):
        RunStore(str(tmp_path), "nope").load()
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="invalid run id"):
            RunStore(str(tmp_path), bad)


def test_manifest_records_provenance_and_list_runs(tmp_path):
    store = RunStore(str(tmp_path), "r4")
    m = store.create_or_open({"algorithm": "gtpo"})
    assert m["git_sha"] and "pyarrow" in m["packages"]
    store.update(status="completed")
    (tmp_path / "not-a-run").mkdir()
    runs = list_runs(str(tmp_path))
    assert [r["run_id"] for r in runs] == ["r4"] and runs[0]["status"] == "completed"
    json.loads((tmp_path / "r4" / "manifest.json").read_text())  # valid JSON on disk


def test_corrupt_manifest_is_a_clear_error(tmp_path):
    store = RunStore(str(tmp_path), "r5")
    store.create_or_open({})
    (tmp_path / "r5" / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="manifest of run 'r5' is corrupt"):
        store.load()


def test_find_completed_prefers_the_current_version_and_needs_the_files(tmp_path):
    store = RunStore(str(tmp_path), "r6")
    store.create_or_open({})
    v1 = _fake_stage(store, 1, "a")
    v2 = _fake_stage(store, 1, "b")
    # the manifest's current version wins for the same inputs, whatever parameters a stage rerun gave it
    assert store.find_completed("data", 1, {}, {"p": "a"}).uri("problems") == v2.uri("problems")
    assert store.find_completed("data", 1, {"x": "y"}, {"p": "a"}) is None
    assert store.find_completed("data", 2, {}, {"p": "a"}) is None
    assert store.find_completed("data", 1, {}, {"p": "a"}, code="other") is None  # other code: recompute
    os.remove(v2.uri("problems"))  # current gone: the newest other version with these parameters
    assert store.find_completed("data", 1, {}, {"p": "a"}).uri("problems") == v1.uri("problems")
    assert store.find_completed("data", 1, {}, {"p": "c"}) is None
    os.remove(v1.uri("problems"))
    assert store.find_completed("data", 1, {}, {"p": "a"}) is None


def test_a_run_recorded_before_a_parameter_existed_resumes_while_it_keeps_its_default(tmp_path):
    """Runs of a study last for days: adding a parameter (with a default) must not orphan them."""
    from schemas.params import PipelineParams

    params = PipelineParams().identity()
    older = json.loads(json.dumps(params))
    del older["update"]["lr"]  # as if `update.lr` had been added after the run was made
    store = RunStore(str(tmp_path), "r")
    store.create_or_open(older)
    assert store.create_or_open(params)["params"] == older  # resumes, the record untouched
    other = PipelineParams(update={"lr": 0.005}).identity()
    with pytest.raises(ValueError, match="different parameters"):
        store.create_or_open(other)
    # the CLI's check before any work (`turntree run`, every cell of `turntree study`) agrees with the store
    from flows.preflight import PreflightError, existing_run

    existing_run(str(tmp_path), "r", params)
    with pytest.raises(PreflightError, match="different parameters"):
        existing_run(str(tmp_path), "r", other)
