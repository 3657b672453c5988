"""A rerun of the tiny pipeline reuses only what still matches the manifest: a truncated stage output is
recomputed, an altered one is refused by `turntree stage` with the command that repairs it and the repaired
version (`turntree stage advantages` → v3) is what the next rerun trains on, an edited module that a stage
imports invalidates that stage, and new weights in a `model=DIR` directory invalidate the rollout, mtimes kept.

One pipeline run plus four partial reruns under one ephemeral Prefect server (~2-3 min on 2 cores)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from flows import integrity
from flows.cli import main
from flows.runstore import RunStore
from runtime.tableio import read_table, write_table
from schemas import tables
from schemas.params import PipelineParams
from schemas.params.presets import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


def _versions(store: RunStore) -> dict[str, tuple[set[str], str]]:
    return {k: (set(e["versions"]), e["current"]) for k, e in store.load()["stages"].items()}


def _new(before: dict, after: dict) -> set[str]:
    """Stage keys that gained a version."""
    return {k for k in after if after[k][0] != before.get(k, (set(), ""))[0]}


@pytest.mark.slow
def test_reuse_is_verified_and_follows_the_manifest(tiny_model, tmp_path, monkeypatch, capsys):
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    model = tmp_path / "model"
    shutil.copytree(tiny_model, model)
    root = tmp_path / "runs"
    params = PipelineParams.model_validate(
        tiny_pipeline(str(model), str(root), eval={"max_problems": 1, "iterations": 1, "bootstrap": 10})
    )
    all_after_rollout = {"iter-1/score", "iter-1/advantages", "iter-1/update", "iter-1/evaluate"}
    with prefect_test_harness(server_startup_timeout=180):
        result = pipeline(params)
        rid = result["run_id"]
        store = RunStore(str(root), rid)
        v0 = _versions(store)

        # 1. a truncated score output: recomputed (and what depends on it), not reused, status completed
        traj = Path(store.current_output("score", 1).uri("trajectories"))
        traj.write_bytes(traj.read_bytes()[:100])
        pipeline(params)
        v1 = _versions(store)
        assert _new(v0, v1) == all_after_rollout
        assert v1["iter-1/score"][1] == "v2" and store.load()["status"] == "completed"

        # 2. a valid but altered samples table: `verify` names it, `stage update` refuses to read it and names
        # the repair; `stage advantages` writes v3, which the next pipeline rerun trains on
        samples_uri = store.current_output("advantages", 1).uri("samples")
        rows = read_table(samples_uri, tables.SAMPLES).to_pylist()
        for r in rows:
            r["advantages"] = [5.0] * len(r["advantages"])
        write_table(rows, tables.SAMPLES, samples_uri)
        capsys.readouterr()
        assert main(["verify", rid, "--root", str(root)]) == 1
        assert samples_uri in capsys.readouterr().out
        assert main(["stage", "update", "--run", rid, "--root", str(root)]) == 2
        err = capsys.readouterr().err
        assert samples_uri in err and f"turntree stage advantages --run {rid} --iter 1" in err
        assert main(["stage", "advantages", "--run", rid, "--root", str(root)]) == 0
        repaired = store.current_output("advantages", 1).uri("samples")
        assert "/advantages/v3/" in repaired
        v1 = _versions(store)
        pipeline(params)
        v2 = _versions(store)
        assert _new(v1, v2) == {"iter-1/update", "iter-1/evaluate"}  # advantages v3 reused, not redone
        assert store.stage_record("update", 1)["inputs"]["samples"] == repaired

        # 3. an edit of a module the evaluate stage imports (not the stage's own file): evaluate reruns, alone
        for pkg in integrity.PACKAGES:
            shutil.copytree(
                REPO / pkg, tmp_path / "src" / pkg, ignore=shutil.ignore_patterns("*.gz", "__pycache__")
            )
        monkeypatch.setattr(integrity, "REPO", tmp_path / "src")
        with open(tmp_path / "src" / "maths" / "eval_metrics.py", "a") as f:
            f.write("\n# an edit\n")
        pipeline(params)
        v3 = _versions(store)
        assert _new(v2, v3) == {"iter-0/evaluate", "iter-1/evaluate"}  # the starting policy's too

        # 4. new weights written into the model directory, mtimes restored: the rollout and all after it rerun
        weights = next(model.glob("*.safetensors"))
        st = weights.stat()
        from safetensors.torch import load_file, save_file

        tensors = load_file(weights)
        name = next(iter(tensors))
        tensors[name] = tensors[name] + 0.5
        save_file(tensors, weights, metadata={"format": "pt"})
        os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
        pipeline(params)
        v4 = _versions(store)
        assert _new(v3, v4) == {"iter-0/evaluate", "iter-1/rollout", *all_after_rollout}
        assert not _new(v3, v4) & {"data"}
