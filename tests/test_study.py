"""`turntree study` end to end on the tiny model (configs/studies/smoke.yaml: GRPO and GTPO × 2 seeds × 1
iteration, one shared warm start) under a real ephemeral Prefect server with MLflow on SQLite: the cells' runs,
what they share, the report and its numbers, the MLflow and Prefect links, and a rerun that resumes (reuses
every stage); plus the study file's one-line refusals (no Prefect)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from flows.cli import main
from flows.runstore import RunStore

REPO = Path(__file__).resolve().parents[1]
SMOKE = REPO / "configs" / "studies" / "smoke.yaml"
CELLS = ["smoke-grpo-s0", "smoke-gtpo-s0", "smoke-grpo-s1", "smoke-gtpo-s1"]  # seed by seed


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


@pytest.fixture(scope="module")
def study(harness, tiny_model, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("report")
    argv = ["study", "--config", str(SMOKE), "--set", f"base.model={tiny_model}", "--root", str(root)]
    argv += ["--out", str(out)]
    assert main(argv) == 0
    return argv, root, out


def _versions(root: Path) -> dict[str, dict[str, str]]:
    return {c: {k: e["current"] for k, e in RunStore(str(root), c).load()["stages"].items()} for c in CELLS}


def test_cells_share_warm_start_problems_and_compute(study):
    _, root, out = study
    res = json.loads((out / "results.json").read_text())
    cells = {c["run_id"]: c for c in res["cells"]}
    assert list(cells) == CELLS
    for rid, c in cells.items():
        assert c["status"] == "completed", rid
        assert (
            c["planned_completions_per_iteration"] == 4 and c["sampled_completions"] == 4
        )  # 2 problems × G=2
        assert c["trained_tokens"] > 0 and c["generated_tokens"] > 0 and len(c["reward"]) == 1
        p = RunStore(str(root), rid).load()["params"]
        seed = int(rid[-1])
        assert (p["rollout"]["seed"], p["update"]["seed"]) == (seed, seed)  # the cell's RL seed ...
        assert (p["data"]["seed"], p["warmstart"]["seed"], p["eval"]["seed"]) == (0, 0, 0)  # ... nothing else
    stores = [RunStore(str(root), c) for c in CELLS]
    problems = {s.current_output("data", None).tables["problems"].sha256 for s in stores}
    warm = [s.current_output("warmstart", 0) for s in stores]
    assert len(problems) == 1 and len({w.tables["checkpoint"].sha256 for w in warm}) == 1
    assert sorted(w.metrics["warmstart/cache_hit"] for w in warm) == [0.0, 1.0, 1.0, 1.0]  # trained once
    md = (out / "report.md").read_text()
    assert "the same in all 4 cells" in md and "trained 1×, reused from the cache 3×" in md
    assert "identical in every cell" in md  # the starting policy's evaluation
    png = (out / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_paired_comparisons_pooled_and_per_seed(study):
    _, _, out = study
    rows = json.loads((out / "results.json").read_text())["comparisons"]
    pairs = [(r["a"], r["b"], r["scope"]) for r in rows]
    for a, b in (("warm start", "grpo"), ("warm start", "gtpo"), ("grpo", "gtpo")):
        assert [(x, y, s) for x, y, s in pairs if (x, y) == (a, b)] == [
            (a, b, "pooled"), (a, b, "seed 0"), (a, b, "seed 1"), (a, b, "across seeds")
        ]  # fmt: skip
    for r in rows:
        if r["scope"] == "across seeds":  # the two seeds' Δs as the sample: their mean, a t interval, no p
            seed_rows = [
                x for x in rows if (x["a"], x["b"]) == (r["a"], r["b"]) and x["scope"].startswith("seed")
            ]
            assert r["diff"] == pytest.approx(sum(x["diff"] for x in seed_rows) / 2)
            assert r["pairs"] == 2 and r["p_value"] is None and r["ci_low"] <= r["diff"] <= r["ci_high"]
            continue
        n = 4 if r["scope"] == "pooled" else 2  # 2 held-out problems × seeds
        assert r["pairs"] == n and r["wins"] + r["losses"] <= n and 0 < r["p_value"] <= 1
        assert r["ci_low"] <= r["diff"] <= r["ci_high"]
    md = (out / "report.md").read_text()
    assert "| gtpo − grpo | pooled 0, 1 | 4 |" in md and "p (exact sign test)" in md
    assert "| | across seeds (t) | 2 seeds |" in md


def test_mlflow_study_run_holds_the_cells(study):
    from mlflow import MlflowClient

    _, root, out = study
    uri = f"sqlite:///{root}/mlflow.db"
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("turntree")
    runs = client.search_runs([exp.experiment_id], "tags.stage = 'study'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    parent = runs[0].info.run_id
    assert {a.path for a in client.list_artifacts(parent, "report")} >= {
        "report/report.md", "report/learning_curves.png", "report/results.json", "report/heldout.jsonl"
    }  # fmt: skip
    assert "heldout/gtpo/final_mean" in runs[0].data.metrics
    for rid in CELLS:
        cell = client.get_run(RunStore(str(root), rid).load()["mlflow_run_id"])
        assert cell.data.tags["mlflow.parentRunId"] == parent and cell.data.tags["turntree.cell"] == rid


def test_cells_are_subflows_of_the_study_flow(study):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        studies = client.read_flow_runs(
            flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=["study-smoke"]))
        )
        cells = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=CELLS)))
        parents = {client.read_task_run(c.parent_task_run_id).flow_run_id for c in cells}
    assert sorted({c.name for c in cells}) == sorted(CELLS) and parents <= {r.id for r in studies}


def test_rerun_resumes_every_cell(study):
    argv, root, out = study
    before = _versions(root)
    assert main(argv) == 0
    assert _versions(root) == before  # every stage reused, nothing recomputed
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    exp = client.get_experiment_by_name("turntree")
    assert len(client.search_runs([exp.experiment_id], "tags.stage = 'study'")) == 1  # the same study run


def test_report_only_reports_the_cells_as_they_stand_and_runs_none(study, tmp_path, capsys):
    argv, root, out = study
    capsys.readouterr()
    assert main([*argv[:-2], "--out", str(tmp_path / "now"), "--report-only"]) == 0
    text = capsys.readouterr().out
    assert "(4 of 4 cells completed)" in text and (tmp_path / "now" / "report.md").is_file()
    assert (tmp_path / "now" / "report.md").read_text().split("## Reproduce")[0] == (
        (out / "report.md").read_text().split("## Reproduce")[0]
    )
    empty = tmp_path / "empty"
    assert (
        main(
            [
                "study",
                "--config",
                str(SMOKE),
                "--root",
                str(empty),
                "--out",
                str(tmp_path / "e"),
                "--report-only",
            ]
        )
        == 0
    )
    assert "(0 of 4 cells completed)" in capsys.readouterr().out and not empty.exists()


def test_cells_run_concurrently_in_processes_of_their_own(harness, tiny_model, tmp_path):
    """concurrency 2: two cells at once, each in a process of its own (Prefect's process pool); two iterations
    with ``prune_weights``: each completed cell's superseded update checkpoint loses its weights, the final one
    keeps them, and the run still verifies."""
    root = tmp_path / "runs"
    argv = ["study", "--config", str(SMOKE), "--set", f"base.model={tiny_model}", "--set", "methods=[grpo]"]
    argv += ["--set", "concurrency=2", "--set", "base.iterations=2", "--set", "prune_weights=true"]
    argv += ["--root", str(root), "--out", str(tmp_path / "report")]
    assert main(argv) == 0
    for c in ("smoke-grpo-s0", "smoke-grpo-s1"):
        store = RunStore(str(root), c)
        first, last = (Path(store.current_output("update", k).uri("checkpoint")) for k in (1, 2))
        assert (first / "WEIGHTS_PRUNED.json").is_file() and not (first / "model.safetensors").exists()
        assert (last / "model.safetensors").is_file() and main(["verify", c, "--root", str(root)]) == 0
    # rerun after a code change that makes iteration 2's rollout (which reads iteration 1's pruned weights) stale:
    # the completed cells are kept as they stand, not driven into a failure
    for c in ("smoke-grpo-s0", "smoke-grpo-s1"):
        store = RunStore(str(root), c)
        m = store.load()
        entry = m["stages"]["iter-2/rollout"]
        entry["versions"][entry["current"]]["code"] = "an older rollout"
        store.save(m)
    before = {c: RunStore(str(root), c).load()["stages"] for c in ("smoke-grpo-s0", "smoke-grpo-s1")}
    assert main(argv) == 0
    for c, stages in before.items():
        after = RunStore(str(root), c).load()
        assert after["status"] == "completed" and after["stages"] == stages
    made = {
        c: RunStore(str(root), c).load()["stages"]["iter-1/update"]["current"]
        for c in ("smoke-grpo-s0", "smoke-grpo-s1")
    }
    assert made == {"smoke-grpo-s0": "v1", "smoke-grpo-s1": "v1"}
    pids = {RunStore(str(root), c).load()["driver"]["pid"] for c in made}
    assert len(pids) == 2  # two worker processes
    # ... talking to the study's Prefect server: each cell's pipeline is a subflow there
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [client.read_flow_run(RunStore(str(root), c).load()["prefect_flow_run_id"]) for c in made]
    assert all(r.parent_task_run_id for r in runs), runs


# --- refusals: one line, exit 2, before Prefect -----------------------------------------------------------
@pytest.mark.parametrize(
    "sets, message",
    [
        (["methods=[grpo, ppo]"], "methods.1.algorithm: Input should be 'grpo', 'gtpo' or 'murphy'"),
        (["colour=red"], "colour: unknown parameter"),
        (["methods=[{name: g, algorithm: gtpo, set: {advantages.scope: x}}]"], "cell smoke-g-s0: advantages.scope"),
        (["base.rollout.seed=3"], "base sets rollout.seed"),
        (["methods=[grpo, {name: big, algorithm: grpo, set: {rollout.group_size: 4}}]"],
         "cells plan different compute: smoke-grpo-s0 4 completions per iteration, smoke-big-s0 8"),
        (["methods=[grpo, {name: m, algorithm: murphy, set: {rollout.group_size: 8, rollout.tree_depth: 2}}]"],
         "grows to 72 nodes, over rollout.max_nodes_per_tree=64"),
        (["methods=[grpo, {name: g, algorithm: gtpo, set: {data.synthetic_count: 9}}]"],
         "differ in data.synthetic_count (8 vs 9)"),
    ],
)  # fmt: skip
def test_bad_study_is_one_line_exit_2(sets, message, tmp_path, capsys):
    argv = [
        "study",
        "--config",
        str(SMOKE),
        *[x for s in sets for x in ("--set", s)],
        "--root",
        str(tmp_path),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())  # no run directory, no Prefect


def test_changed_study_is_refused_for_existing_cells(tmp_path, capsys):
    RunStore(str(tmp_path), "smoke-grpo-s0").create_or_open({"algorithm": "grpo", "iterations": 7})
    assert main(["study", "--config", str(SMOKE), "--root", str(tmp_path)]) == 2
    assert "study cell smoke-grpo-s0: its run exists with other parameters" in capsys.readouterr().err


def test_methods_set_by_name_pick_the_files_own_variants(tmp_path, capsys):
    """`--set 'methods=[gtpo-discounted]'` runs that variant of the file with its overrides (was refused: a bare
    name had to be an algorithm); a name that is neither is still one line."""
    from flows import preflight

    d5 = str(REPO / "configs" / "studies" / "tool-arith-d5.yaml")
    _, _, cells = preflight.study_file(d5, ["methods=[grpo, gtpo-discounted]", "seeds=[1]"], str(tmp_path))
    assert [c.run_id for c in cells] == ["tool-arith-d5-grpo-s1", "tool-arith-d5-gtpo-discounted-s1"]
    scopes = [(c.params.algorithm, c.params.advantages.norm_scope) for c in cells]
    assert scopes[1] == ("gtpo", "end_aligned_discounted") and scopes[0][1] != "end_aligned_discounted"
    assert main(["study", "--config", d5, "--set", "methods=[gtpo-nope]", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "methods.0.algorithm" in err and err.count("\n") == 1


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "studies").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_study_file_plans(path, tmp_path):
    """Each study file docs/results.md runs from passes every check made before a cell starts: its parameters,
    shared inputs, compute matching and MURPHY's tree budget (no Prefect, nothing run)."""
    from flows import preflight

    study, name, cells = preflight.study_file(str(path), [], str(tmp_path))
    assert name == path.stem and len(cells) == len(study.methods) * len(study.seeds) * max(
        1, np.prod([len(v) for v in study.grid.values()])
    )
