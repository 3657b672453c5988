"""The pipeline flow end to end on the tiny model under a real (ephemeral) Prefect server, with MLflow on
SQLite: stage outputs, MLflow runs read back, cached reruns, single-stage reruns and resume after a failure."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from flows.runstore import RunStore
from runtime.tableio import read_table
from schemas import tables
from schemas.params import PipelineParams
from schemas.params.presets import tiny_pipeline

STAGES = ("rollout", "score", "advantages", "update", "evaluate")


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):
        yield


def tiny_params(tiny_model: Path, root: Path, algorithm: str = "gtpo", **extra) -> PipelineParams:
    return PipelineParams.model_validate(tiny_pipeline(str(tiny_model), str(root), algorithm, **extra))


def tree_hashes(base: Path, skip: str | None = None) -> dict[str, str]:
    out = {}
    for f in sorted(base.rglob("*")):
        rel = str(f.relative_to(base))
        if f.is_file() and rel != "manifest.json" and not (skip and rel.startswith(skip)):
            out[rel] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def gtpo_run(harness, tiny_model, tmp_path_factory):
    from flows.pipeline import pipeline

    root = tmp_path_factory.mktemp("runs")
    params = tiny_params(tiny_model, root)
    result = pipeline(params)
    return params, result


def test_pipeline_writes_every_stage(gtpo_run):
    params, result = gtpo_run
    store = RunStore(params.run_root, result["run_id"])
    manifest = store.load()
    assert manifest["status"] == "completed"
    assert manifest["stages"]["data"]["current"] == "v1"
    for stage in STAGES:
        assert manifest["stages"][f"iter-1/{stage}"]["current"] == "v1", stage
    out = {s: store.current_output(s, 1) for s in STAGES}
    traj = read_table(out["score"].uri("trajectories"), tables.TRAJECTORIES)
    assert traj.num_rows == 4 and traj["reward"].null_count == 0
    samples = read_table(out["advantages"].uri("samples"), tables.SAMPLES)
    assert samples.num_rows == 4
    ckpt = Path(out["update"].uri("checkpoint"))
    assert (ckpt / "config.json").is_file() and result["checkpoint"] == str(ckpt)
    # the update pushed its weights into the live rollout engine, which now names the committed checkpoint
    # (not the stage's scratch dir), so evaluation reused it without reloading
    from runtime.engines import live_engine

    assert "timing/weight_sync" in out["update"].metrics
    assert (
        out["update"].metrics["memory/engine_cache_released_mb"] > 0
    )  # the engine's KV pages, for the update
    assert live_engine().loaded_from == str(ckpt.resolve())
    evals = read_table(out["evaluate"].uri("eval_results"), tables.EVAL_RESULTS)
    assert evals.num_rows >= 2
    assert any(k.startswith("eval/") for k in out["evaluate"].metrics)


def _runs(uri: str, filter_string: str = "") -> list:
    """Every run of the turntree experiment in the store at ``uri`` (no global tracking URI is set)."""
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("turntree")
    return client.search_runs([exp.experiment_id], filter_string=filter_string, max_results=1000)


def test_mlflow_parent_and_child_runs(gtpo_run):
    import mlflow

    params, result = gtpo_run
    runs = _runs(result["tracking_uri"])
    parent = next(r for r in runs if r.info.run_id == result["mlflow_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["algo"] == "gtpo" and parent.data.tags["git_sha"]
    assert parent.data.tags["prefect.flow_run_id"] != "none"
    assert parent.data.params["rollout.group_size"] == "2"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert {c.data.tags["stage"] for c in children} >= {"data", *STAGES}
    score = next(c for c in children if c.data.tags["stage"] == "score")
    assert "score.shaping_alpha" in score.data.params
    client = mlflow.MlflowClient(result["tracking_uri"])
    hist = client.get_metric_history(parent.info.run_id, "timing/rollout")
    assert [m.step for m in hist] == [1]
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.json", "manifest.json"} <= arts
    data_child = next(c for c in children if c.data.tags["stage"] == "data")
    assert data_child.inputs.dataset_inputs, "problems dataset logged with log_input"


def test_run_tells_its_story_in_prefect_and_mlflow(gtpo_run):
    """Prefect: the flow run is named after the run and tagged; stages are joined by data edges. MLflow: the
    experiment opens on runs; the parent has the commit, a description, per-step curves, both splits as
    datasets and the registered final checkpoint; checkpoints carry a model card; transcripts have turns."""
    import json

    import mlflow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    params, result = gtpo_run
    manifest = RunStore(params.run_root, result["run_id"]).load()
    assert (
        manifest["stages"]["iter-0/evaluate"]["current"] == "v1"
    )  # the starting policy, for before -> after
    with get_client(sync_client=True) as client:
        fr = client.read_flow_run(manifest["prefect_flow_run_id"])
        assert fr.name == result["run_id"]
        assert {"algorithm:gtpo", f"run:{result['run_id']}"} <= set(fr.tags)
        tasks = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
    by_name = {t.name: t for t in tasks}
    upstream = {str(i.id) for i in by_name["score[iter=1]"].task_inputs["upstream"]}
    assert str(by_name["rollout[iter=1]"].id) in upstream

    client = mlflow.MlflowClient(result["tracking_uri"])
    exp = client.get_experiment_by_name("turntree")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    parent = client.get_run(result["mlflow_run_id"])
    assert parent.data.tags["mlflow.source.git.commit"] == parent.data.tags["git_sha"]
    assert "gtpo" in parent.data.tags["mlflow.note.content"]
    steps = client.get_metric_history(parent.info.run_id, "train/loss")
    assert steps and [m.step for m in steps] == sorted(m.step for m in steps)
    contexts = {
        (d.dataset.name, t.value)
        for d in parent.inputs.dataset_inputs
        for t in d.tags
        if t.key == "mlflow.data.context"
    }
    assert {("problems-train", "training"), ("problems-eval", "evaluation")} <= contexts
    name, version = manifest["registered_model"].rsplit("/", 1)
    assert name == f"turntree-gtpo-{Path(params.model).name.lower()}"  # one name per algorithm and base model
    mv = client.get_model_version(name, version)
    assert mv.source == result["checkpoint"] and mv.run_id == parent.info.run_id
    # the version's card: held-out before -> after with CIs, hyperparameters, data; the run's Source is the repo
    assert re.search(r"starting policy \S+ .*\[[\d.]+, [\d.]+\] -> iteration 1 ", mv.description), (
        mv.description
    )
    assert "- learning rate (warmup): " in mv.description and "synthetic:tool-arith" in mv.description
    assert parent.data.tags["mlflow.source.type"] == "PROJECT"
    assert parent.data.tags["mlflow.source.name"].endswith("(flows/pipeline.py)")
    children = _runs(result["tracking_uri"], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    update = next(c for c in children if c.data.tags["stage"] == "update")
    card = Path(client.download_artifacts(update.info.run_id, "model/README.md")).read_text()
    assert result["run_id"] in card and "GTPO update" in card and "synthetic:tool-arith" in card
    score = next(c for c in children if c.data.tags["stage"] == "score")
    table = json.loads(
        Path(client.download_artifacts(score.info.run_id, "transcripts/trajectories.json")).read_text()
    )
    assert {"turn", "text", "code", "observation", "turn_reward"} <= set(table["columns"]) and table["data"]
    # the completions viewer on the parent: every turn of every trajectory, with prompt, reference, advantage
    viewer = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "completions/iter-1.json")).read_text()
    )
    scored = RunStore(params.run_root, result["run_id"]).current_output("score", 1).uri("trajectories")
    turns = read_table(scored, tables.TRAJECTORIES)
    assert len(viewer["data"]) == sum(len(t) for t in turns.column("turns").to_pylist())
    assert {"prompt", "reference", "turn_reward", "advantage", "reward", "stop_reason"} <= set(
        viewer["columns"]
    )
    assert (
        "<table>"
        in Path(client.download_artifacts(parent.info.run_id, "completions/iter-1.html")).read_text()
    )
    # the RL health chart and MLflow's system metrics on the parent
    assert Path(client.download_artifacts(parent.info.run_id, "health.png")).read_bytes()[:4] == b"\x89PNG"
    assert any(k.startswith("system/cpu") for k in parent.data.metrics), sorted(parent.data.metrics)[:20]


def test_rerun_with_same_params_skips_completed_stages(gtpo_run):
    from flows.pipeline import pipeline

    params, result = gtpo_run
    base = Path(params.run_root) / result["run_id"]
    before = tree_hashes(base)
    again = pipeline(params)
    assert again["run_id"] == result["run_id"] and again["checkpoint"] == result["checkpoint"]
    manifest = RunStore(params.run_root, result["run_id"]).load()
    assert all(set(e["versions"]) == {"v1"} for e in manifest["stages"].values())
    assert tree_hashes(base) == before


def test_single_stage_rerun_leaves_other_outputs_byte_identical(gtpo_run):

    from flows.stage import stage_flow

    params, result = gtpo_run
    base = Path(params.run_root) / result["run_id"]
    before = tree_hashes(base)
    res = stage_flow(result["run_id"], "score", 1, {"shaping_alpha": 0.25}, params.run_root)
    assert res["version"] == "v2"
    after = tree_hashes(base)
    assert {k: v for k, v in after.items() if not k.startswith("iter-1/score/v2/")} == before
    record = RunStore(params.run_root, result["run_id"]).stage_record("score", 1)
    assert record["params"]["shaping_alpha"] == 0.25
    runs = _runs(result["tracking_uri"], "tags.stage = 'score'")
    assert sum(r.data.tags.get("mlflow.parentRunId") == result["mlflow_run_id"] for r in runs) == 2


def test_failed_stage_then_resume_without_redoing(harness, tiny_model, tmp_path, monkeypatch):
    import stages.advantages as adv_module
    from flows.pipeline import pipeline

    params = tiny_params(tiny_model, tmp_path, eval={"max_problems": 1})
    real_run = adv_module.run

    def boom(*a, **k):
        raise RuntimeError("injected failure in advantages")

    monkeypatch.setattr(adv_module, "run", boom)
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    from flows.runner import default_run_id

    store = RunStore(str(tmp_path), default_run_id(params))
    m = store.load()
    assert m["status"] == "failed" and "iter-1/advantages" not in m["stages"]
    rollout_uri = store.current_output("rollout", 1).uri("trajectories")
    rollout_bytes = Path(rollout_uri).read_bytes()
    monkeypatch.setattr(adv_module, "run", real_run)
    result = pipeline(params)
    m = store.load()
    assert m["status"] == "completed"
    assert set(m["stages"]["iter-1/rollout"]["versions"]) == {"v1"}  # not redone
    assert set(m["stages"]["iter-1/advantages"]["versions"]) == {"v1"}
    assert Path(rollout_uri).read_bytes() == rollout_bytes
    assert Path(result["checkpoint"]).is_dir()
    assert not list(Path(store.base).rglob(".tmp-*")), "failed stage left its scratch dir behind"


def test_murphy_pipeline_writes_trees_and_samples(harness, tiny_model, tmp_path):
    from flows.pipeline import pipeline

    params = tiny_params(tiny_model, tmp_path, algorithm="murphy", eval={"max_problems": 1})
    result = pipeline(params)
    store = RunStore(str(tmp_path), result["run_id"])
    trees = read_table(store.current_output("advantages", 1).uri("trees"), tables.TREES)
    assert trees.num_rows == 2
    nodes = trees["nodes"][0].as_py()
    assert sum(n["parent_id"] == -1 for n in nodes) == 2  # G roots
    assert all(n["ret"] is not None for n in nodes)
    samples = read_table(store.current_output("advantages", 1).uri("samples"), tables.SAMPLES)
    assert samples.num_rows > 0 and set(samples["algo"].to_pylist()) == {"murphy"}


def test_evaluate_flow_and_comparison_report(gtpo_run, tiny_model, tmp_path):
    import mlflow

    from flows.compare import compare_flow
    from flows.evaluate import evaluate_flow
    from schemas.params import EvalParams

    params, result = gtpo_run
    ev = EvalParams(
        benchmark="synthetic:func-synth", max_problems=2, iterations=2, max_new_tokens=8, bootstrap=10
    )
    first = evaluate_flow(str(tiny_model), ev, params.run_root)
    assert "eval/synthetic-func-synth/pass_at_1_attempt2" in first["metrics"]
    assert read_table(first["eval_results"], tables.EVAL_RESULTS).num_rows >= 2
    again = evaluate_flow(str(tiny_model), ev, params.run_root)  # stored result reused, not recomputed
    assert again["run_id"] == first["run_id"] and again["eval_results"] == first["eval_results"]
    run = mlflow.MlflowClient(first["tracking_uri"]).get_run(first["mlflow_run_id"])
    assert run.data.tags["stage"] == "evaluate" and run.info.status == "FINISHED"

    out = compare_flow(
        {"base": str(tiny_model), "gtpo": result["run_id"]}, ev, params.run_root, str(tmp_path / "rep")
    )
    report = Path(out["report"]).read_text()
    assert "| base" in report and "| gtpo" in report
    for name in ("pass_vs_iteration", "reward_curves"):
        png = Path(out["files"][name])
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_verify_judges_current_versions_and_its_repairs_make_it_green(harness, tiny_model, tmp_path, capsys):
    """A corrupt table: red with a repair command; the repair (or the pipeline's recompute) writes a new current
    version and `verify` turns green, reporting the superseded corrupt version without failing on it."""
    from flows.cli import main
    from flows.pipeline import pipeline

    params = tiny_params(tiny_model, tmp_path, eval={"max_problems": 1})
    result = pipeline(params)
    root, run = params.run_root, result["run_id"]
    verify = ["verify", run, "--root", root]
    store = RunStore(root, run)

    def truncate(stage: str) -> str:
        uri = next(iter(store.current_output(stage, 1).tables.values())).uri
        Path(uri).write_bytes(Path(uri).read_bytes()[:100])
        return uri

    # 1. the printed repair makes it green
    score_v1 = truncate("score")
    assert main(verify) == 1
    (line,) = capsys.readouterr().out.splitlines()
    repair = line.split("repair: ")[1].rstrip(")").split()
    assert repair[:2] == ["turntree", "stage"]
    assert main(repair[1:]) == 0
    capsys.readouterr()
    assert main(verify) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"run {run}: every current output matches its manifest"
    assert len(out) == 2 and out[1].startswith(f"note: {score_v1}") and "superseded by v2" in out[1]

    # 2. a rerun of the pipeline recomputes a corrupt stage, and verify turns green too
    adv_v1 = truncate("advantages")
    capsys.readouterr()
    assert main(verify) == 1
    pipeline(params)
    assert RunStore(root, run).load()["stages"]["iter-1/advantages"]["current"] == "v2"
    capsys.readouterr()
    assert main(verify) == 0
    notes = capsys.readouterr().out.splitlines()[1:]
    assert any(score_v1 in n for n in notes) and any(adv_v1 in n for n in notes)


def test_asynchronous_pipeline_overlaps_the_next_rollout_with_the_update(harness, tiny_model, tmp_path):
    """max_staleness=1: the rollout of iteration k+1 runs (a Prefect task run of its own) while update k trains,
    on the checkpoint update k started from; its rows record that policy version; update k+1 trains them as
    1 version stale. The k=0 run's rollouts record versions 0 and 1, each on-policy."""
    from prefect.client.orchestration import get_client

    from flows.pipeline import pipeline

    roots = {k: tmp_path / f"k{k}" for k in (0, 1)}
    results = {}
    for k, root in roots.items():
        params = tiny_params(tiny_model, root, iterations=3, max_staleness=k, eval={"max_problems": 1})
        results[k] = (params, pipeline(params))

    def look(k: int):
        params, result = results[k]
        store = RunStore(params.run_root, result["run_id"])
        manifest = store.load()
        rec = {key: e["versions"][e["current"]] for key, e in manifest["stages"].items()}
        versions = {
            it: set(read_table(store.current_output("rollout", it).uri("trajectories"), tables.TRAJECTORIES)
                    ["policy_version"].to_pylist())
            for it in (1, 2, 3)
        }  # fmt: skip
        return rec, versions, result

    rec, versions, _ = look(0)
    assert versions == {1: {0}, 2: {1}, 3: {2}}
    assert (
        rec["iter-2/rollout"]["inputs"]["checkpoint"]
        == rec["iter-1/update"]["output"]["tables"]["checkpoint"]["uri"]
    )
    assert rec["iter-2/update"]["output"]["metrics"]["actor/stale_fraction"] == 0.0

    rec, versions, result = look(1)
    assert versions == {1: {0}, 2: {0}, 3: {1}}  # each generated before the update it overlapped
    ckpt1 = rec["iter-1/update"]["output"]["tables"]["checkpoint"]["uri"]
    assert rec["iter-2/rollout"]["inputs"]["checkpoint"] == rec["iter-1/rollout"]["inputs"]["checkpoint"]
    assert rec["iter-3/rollout"]["inputs"]["checkpoint"] == ckpt1
    assert rec["iter-2/update"]["inputs"]["policy_version"] == "1"
    metrics = rec["iter-2/update"]["output"]["metrics"]
    assert metrics["actor/stale_fraction"] == 1.0 and metrics["actor/staleness_max"] == 1.0
    assert metrics["actor/dropped_stale"] == 0.0
    # the Prefect task runs: rollout[iter=2] started before update[iter=1] ended
    with get_client(sync_client=True) as client:
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        flow_run_id = RunStore(results[1][0].run_root, result["run_id"]).load()["prefect_flow_run_id"]
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    by_name = {r.name: r for r in runs}
    roll2, upd1 = by_name["rollout[iter=2]"], by_name["update[iter=1]"]
    assert roll2.start_time < upd1.end_time and upd1.start_time < roll2.end_time


def test_chained_reruns_build_on_each_other_and_the_next_run_keeps_them(
    harness, tiny_model, tmp_path, capsys
):
    """Issue 26 item 1: `stage score --set …` then `stage advantages --set …` used to build advantages v2 from
    score v1, and a later `run` rebuilt advantages with the run's γ, losing the γ rerun without a word."""
    from flows.cli import main
    from flows.pipeline import pipeline

    params = tiny_params(tiny_model, tmp_path, eval={"max_problems": 1})
    run = pipeline(params)["run_id"]
    root = params.run_root
    stage = ["stage", "--run", run, "--iter", "1", "--root", root]
    assert main([stage[0], "score", *stage[1:], "--set", "score.shaping_alpha=0.3"]) == 0  # run's spelling
    assert main([stage[0], "score", *stage[1:], "--set", "reward_weights.math_answer=2"]) == 0  # nested, 2nd
    assert main([stage[0], "advantages", *stage[1:], "--set", "gamma=0.5"]) == 0
    store = RunStore(root, run)
    score = store.stage_record("score", 1)
    assert score["params"]["shaping_alpha"] == 0.3  # v3 kept v2's override: a rerun of the current version
    assert score["params"]["reward_weights"] == {"math_answer": 2.0}
    adv = store.stage_record("advantages", 1)
    assert "/iter-1/score/v3/" in adv["inputs"]["trajectories"] and adv["params"]["gamma"] == 0.5
    assert adv["overrides"] == {"gamma": 0.5} and adv["rebased_inputs"]
    assert store.stale_stages() == {"iter-1/update": "reads iter-1/advantages v1, superseded by v2"}
    capsys.readouterr()
    assert main(["runs", run, "--root", root]) == 0
    view = capsys.readouterr().out
    assert "iter-1/advantages" in view and "v1 v2*" in view and "rerun with gamma=0.5" in view
    assert "STALE: reads iter-1/advantages v1, superseded by v2" in view

    pipeline(params)  # the next run keeps both reruns and recomputes only what was stale
    manifest = RunStore(root, run).load()["stages"]
    assert manifest["iter-1/score"]["current"] == "v3" and manifest["iter-1/advantages"]["current"] == "v2"
    update = manifest["iter-1/update"]
    assert update["current"] == "v2" and "/advantages/v2/" in update["versions"]["v2"]["inputs"]["samples"]
    assert RunStore(root, run).stale_stages() == {}
    # --pin reads an input stage's older version instead of its current one; a bad pin is one line, exit 2
    assert main([stage[0], "advantages", *stage[1:], "--pin", "iter-1/score=v1"]) == 0
    pinned = RunStore(root, run).stage_record("advantages", 1)
    assert "/iter-1/score/v1/" in pinned["inputs"]["trajectories"]
    assert "trajectories: iter-1/score v3 -> v1 (pinned)" in pinned["rebased_inputs"]
    capsys.readouterr()
    assert main([stage[0], "advantages", *stage[1:], "--pin", "iter-1/score=v9"]) == 2
    assert "iter-1/score has no version v9 (it has v1, v2, v3)" in capsys.readouterr().err
    assert main([stage[0], "advantages", *stage[1:], "--pin", "iter-1/update=v1"]) == 2
    assert "iter-1/update: not an input of this stage" in capsys.readouterr().err


def test_a_checkpoint_no_update_produced_is_never_registered(tmp_path, tiny_model):
    """Issue 26 item 3: a run whose every group tied (each update skipped) registered the untrained base."""
    from flows.pipeline import register_final
    from flows.runner import RunContext

    class Registry:  # records what would be registered (the real one is exercised by the pipeline tests)
        calls: list = []

        def register(self, *args, **kw):
            self.calls.append(args)
            return "1"

    params = tiny_params(tiny_model, tmp_path)
    store = RunStore(str(tmp_path), "r")
    store.create_or_open(params.identity())
    ctx = RunContext(root=str(tmp_path), run_id="r", algo="gtpo", git_sha="x")
    register_final(store, ctx, Registry(), str(tiny_model), params)
    assert Registry.calls == [] and "registered_model" not in store.load()


def test_compare_paired_reads_two_stored_evaluations(gtpo_run, capsys):
    """`turntree compare --paired RUN:ITER RUN:ITER` (was docs/paired.py): paired CI and exact McNemar p."""
    import json

    from flows.cli import main

    params, result = gtpo_run
    rid, root = result["run_id"], params.run_root
    capsys.readouterr()
    assert main(["compare", "--paired", f"{rid}:0", f"{rid}:1", "--root", root]) == 0
    out = capsys.readouterr().out.strip()
    assert re.fullmatch(
        rf"{rid}:1 - {rid}:0: [-+]\d\.\d{{3}} \[[-+]\d\.\d{{3}}, [-+]\d\.\d{{3}}\] \(paired bootstrap 95%\), \d+ gained / "
        rf"\d+ lost of \d+ problems, exact McNemar p = \S+; {rid}:0 scored \d\.\d{{3}}",
        out,
    ), out
    assert main(["compare", "--paired", f"{rid}:0", f"{rid}:1", "--root", root, "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["ci_low"] <= r["diff"] <= r["ci_high"] and 0 <= r["p_value"] <= 1
    assert main(["compare", "--paired", f"{rid}:0", f"{rid}:7", "--root", root]) == 2
    assert "has no evaluation at iteration 7" in capsys.readouterr().err

    # a `turntree eval` run (its one evaluation has no iteration) pairs by its id: here one holding a copy of
    # iteration 1's table, so it pairs with iteration 1 at +0.000 and with iteration 0 as iteration 1 does
    from runtime.tableio import write_table
    from schemas.outputs import StageOutput

    ev = RunStore(root, "an-eval")
    ev.create_or_open({"kind": "eval"})
    scratch = ev.scratch_dir("evaluate", None)
    rows = read_table(RunStore(root, rid).current_output("evaluate", 1).uri("eval_results"), tables.EVAL_RESULTS)
    ref = write_table(rows, tables.EVAL_RESULTS, scratch / "eval_results.parquet")
    ev.commit("evaluate", None, scratch, StageOutput(stage="evaluate", tables={"eval_results": ref}),
              inputs={}, params={}, params_field="eval")  # fmt: skip
    capsys.readouterr()
    assert main(["compare", "--paired", f"{rid}:1", "an-eval", "--root", root, "--json"]) == 0
    same = json.loads(capsys.readouterr().out)
    assert same["diff"] == 0 and same["wins"] == same["losses"] == 0
    assert main(["compare", "--paired", f"{rid}:0", "an-eval", "--root", root, "--json"]) == 0
    assert {k: v for k, v in json.loads(capsys.readouterr().out).items() if k not in ("a", "b")} == {
        k: v for k, v in r.items() if k not in ("a", "b")
    }
    assert main(["compare", "--paired", rid, "an-eval", "--root", root]) == 2  # a training run needs :ITER
    assert f"run {rid!r} has no evaluation (RUN:ITER" in capsys.readouterr().err

    # lists pair up in order and pool as a study does: (0 vs 1) and (the copy of 1 vs 1, all ties) give half of
    # the one pair's difference, its gains and losses, and the two seeds' own deltas (Δ and 0)
    assert main(["compare", "--paired", f"{rid}:0,an-eval", f"{rid}:1,{rid}:1", "--root", root, "--json"]) == 0
    pooled = json.loads(capsys.readouterr().out)
    assert pooled["diff"] == pytest.approx(r["diff"] / 2) and (pooled["wins"], pooled["losses"]) == (r["wins"], r["losses"])
    assert pooled["seeds"] == 2 and pooled["p_value"] == r["p_value"]
    assert pooled["across_seeds"]["diff"] == pytest.approx(r["diff"] / 2)
    assert main(["compare", "--paired", f"{rid}:0,an-eval", f"{rid}:1,{rid}:1", "--root", root]) == 0
    assert "x 2 seeds" in capsys.readouterr().out
    assert main(["compare", "--paired", f"{rid}:0,an-eval", f"{rid}:1", "--root", root]) == 2
    assert "pair up in order, none empty: 2 evaluation(s) against 1" in capsys.readouterr().err
