"""The UIs in a real browser (Debian's chromium, driven by Playwright): `turntree serve`, deploy, start the
tiny pipeline from the Prefect UI's deployment page with Quick run, watch it complete through a worker, then find
its metrics and its registered model in the MLflow UI; its completions page (sorted by a click); a stage rerun
with its version in both UIs; a run whose update was skipped: its warning and Skipped node in Prefect, and no
new version in the registry. Screenshots go to ``$TURNTREE_TEST_ARTIFACTS`` (default
``test-artifacts/browser``)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests.serving import banner, start_serve

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("TURNTREE_TEST_ARTIFACTS", REPO / "test-artifacts")) / "browser"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (.ci/run installs it)"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, data: dict | None = None) -> dict:
    headers = {"Content-Type": "application/json"}
    if data is not None and "/api/2.0/" not in url:  # a POST to `turntree serve`'s Prefect API: CSRF token
        base = url.split("/api/", 1)[0]
        with urllib.request.urlopen(f"{base}/api/csrf-token?client=turntree-test", timeout=30) as r:
            token = json.loads(r.read())["token"]
        headers |= {"Prefect-Csrf-Token": token, "Prefect-Csrf-Client": "turntree-test"}
    req = urllib.request.Request(
        url, data=json.dumps(data).encode() if data is not None else None, headers=headers
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def _wait_for_flow_runs(api: str, timeout_s: float) -> list[dict]:
    """The flow runs on the server once at least one exists (after a short settle for a duplicate), else []."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        runs = _get(f"{api}/flow_runs/filter", {"limit": 10})
        if runs:
            time.sleep(2)  # a double-submitted Quick run would show up as a second run: let it
            return _get(f"{api}/flow_runs/filter", {"limit": 10})
        time.sleep(1)
    return []


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def test_quick_run_from_the_prefect_ui_shows_up_in_mlflow(tiny_model, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    from schemas.params.presets import tiny_pipeline

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    root = tmp_path / "runs"
    pp, mp = _free_port(), _free_port()
    api = f"http://127.0.0.1:{pp}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_API_URL": api,
        "TURNTREE_MLFLOW_UI": f"http://127.0.0.1:{mp}",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # the deployment a user would make for a quick look: infra/prefect.yaml's pipeline with tiny parameters
    spec = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
    pipe = next(d for d in spec["deployments"] if d["name"] == "pipeline")
    pipe.pop("schedules", None)
    # two iterations, the second's rollout overlapping the first's update (max_staleness 1): the graph shows both
    tiny = tiny_pipeline(str(tiny_model), str(root), iterations=2, max_staleness=1)
    spec["deployments"] = [{**pipe, "name": "pipeline-tiny", "parameters": {"params": tiny}}]
    prefect_file = tmp_path / "prefect.yaml"
    prefect_file.write_text(yaml.safe_dump(spec))

    serve = start_serve(root, pp, mp, env)
    worker = None
    try:
        banner(serve)
        dep = subprocess.run(
            [str(BIN / "turntree"), "deploy", "--pool", "tt-ui", "--prefect-file", str(prefect_file)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert dep.returncode == 0, dep.stdout[-3000:] + dep.stderr[-3000:]
        worker = subprocess.Popen(
            [str(BIN / "prefect"), "worker", "start", "--pool", "tt-ui"],
            env=env,
            stdout=open(tmp_path / "worker.log", "w"),  # noqa: SIM115
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=tmp_path,
        )
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1500, "height": 1000})
            # Prefect: the deployments list -> the tiny pipeline -> Run -> Quick run
            page.goto(f"http://127.0.0.1:{pp}/deployments", timeout=120_000)
            page.get_by_text("pipeline-tiny").first.click(timeout=60_000)
            run_button = page.get_by_role("button", name="Run", exact=True)
            run_button.wait_for(timeout=60_000)
            page.screenshot(path=ARTIFACTS / "prefect-deployment.png")
            run_button.click()
            page.get_by_text("Quick run", exact=True).click(timeout=30_000)
            # the UI posts the flow run asynchronously: wait for it to exist rather than a fixed pause. (CI once
            # saw none: Prefect had answered the POST 503, "database is locked"; see flows/prefect_sqlite.py)
            runs = _wait_for_flow_runs(api, timeout_s=120)
            page.screenshot(path=ARTIFACTS / "prefect-quick-run.png")
            assert len(runs) == 1, runs
            flow_run = runs[0]
            deadline = time.monotonic() + 900
            while time.monotonic() < deadline:
                flow_run = _get(f"{api}/flow_runs/{flow_run['id']}")
                if flow_run["state_type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED"):
                    break
                time.sleep(5)
            page.goto(f"http://127.0.0.1:{pp}/runs/flow-run/{flow_run['id']}", timeout=60_000)
            page.wait_for_timeout(3000)
            page.screenshot(path=ARTIFACTS / "prefect-flow-run.png", full_page=True)
            assert flow_run["state_type"] == "COMPLETED", (tmp_path / "worker.log").read_text()[-4000:]
            run_id = flow_run["name"]
            assert run_id.startswith("gtpo-") and "algorithm:gtpo" in flow_run["tags"]
            expect(page.get_by_text(run_id).first).to_be_visible(timeout=30_000)
            # the overlapping task runs (the screenshot's graph draws them): rollout 2 ran while update 1 trained; its
            # data edge comes from the data stage and the checkpoint it sampled with
            tasks = {
                t["name"]: t
                for t in _get(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [flow_run["id"]]}}})
            }
            roll2, upd1 = tasks["rollout[iter=2]"], tasks["update[iter=1]"]
            assert roll2["start_time"] < upd1["end_time"] and upd1["start_time"] < roll2["end_time"]
            assert {i["id"] for i in roll2["task_inputs"]["upstream"]} & {tasks["data[iter=None]"]["id"]}

            # MLflow: the run's page shows its metrics; the model registry its registered checkpoint
            manifest = json.loads((root / run_id / "manifest.json").read_text())
            exp = _get(
                f"http://127.0.0.1:{mp}/api/2.0/mlflow/experiments/get-by-name?experiment_name=turntree"
            )
            exp_id = exp["experiment"]["experiment_id"]
            ml = "workflowType=machine_learning"  # the UI's model-training view, as our links ask for
            page.goto(f"http://127.0.0.1:{mp}/#/experiments/{exp_id}?{ml}", timeout=60_000)
            expect(page.get_by_text(run_id).first).to_be_visible(timeout=60_000)  # the runs table
            page.screenshot(path=ARTIFACTS / "mlflow-experiment.png")
            page.goto(f"http://127.0.0.1:{mp}/#/experiments/{exp_id}/runs/{manifest['mlflow_run_id']}?{ml}")
            expect(page.get_by_text("reward/mean").first).to_be_visible(timeout=60_000)
            page.screenshot(path=ARTIFACTS / "mlflow-run.png", full_page=True)
            name, version = manifest["registered_model"].rsplit("/", 1)
            page.goto(f"http://127.0.0.1:{mp}/#/models/{name}?{ml}", timeout=60_000)
            expect(page.get_by_text(f"Version {version}").first).to_be_visible(timeout=60_000)
            page.screenshot(path=ARTIFACTS / "mlflow-registered-model.png", full_page=True)
            assert name == f"turntree-gtpo-{Path(str(tiny_model)).name}" and version == "1"
            _completions_view(page, mp, exp_id, manifest["mlflow_run_id"])
            _rerun_in_both_uis(page, env, root, run_id, pp, mp, exp_id)
            _warning_and_registry(page, env, tiny, tmp_path, pp, mp, name)
            browser.close()
    finally:
        if worker is not None:
            _stop(worker)
        _stop(serve)


def _turntree(args: list[str], env: dict[str, str]) -> str:
    res = subprocess.run([str(BIN / "turntree"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _completions_view(page, mp: int, exp_id: str, parent: str) -> None:
    """The run's Artifacts: completions/iter-1.html, every turn; a click on a header sorts the table."""
    from playwright.sync_api import expect

    page.goto(f"http://127.0.0.1:{mp}/#/experiments/{exp_id}/runs/{parent}/artifacts", timeout=60_000)
    page.get_by_text("completions", exact=True).first.click(timeout=60_000)
    page.get_by_text("iter-1.html", exact=True).first.click(timeout=60_000)
    frame = page.frame_locator("iframe").first
    expect(frame.get_by_text("click a column header to sort").first).to_be_visible(timeout=60_000)
    header = frame.get_by_role("columnheader", name="problem_id", exact=True)
    header.click()
    page.wait_for_timeout(500)
    page.screenshot(path=ARTIFACTS / "mlflow-completions.png", full_page=True)
    ids = frame.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert ids and ids == sorted(ids), ids  # sorted by the clicked column
    # the RL health chart beside it (held-out with its CI band, reward, zero-signal fraction, lengths)
    page.get_by_text("health.png", exact=True).first.click(timeout=60_000)
    expect(page.locator("img").last).to_be_visible(timeout=60_000)
    page.wait_for_timeout(1000)
    page.screenshot(path=ARTIFACTS / "mlflow-health.png", full_page=True)


def _rerun_in_both_uis(page, env, root: Path, run_id: str, pp: int, mp: int, exp_id: str) -> None:
    """`turntree stage score --set …`: the Prefect flow run named `<run>/iter-1/score v2`, the MLflow child
    `iter-1/score v2` with its version and overrides as tags."""
    from playwright.sync_api import expect

    out = _turntree(
        ["stage", "score", "--run", run_id, "--iter", "1", "--root", str(root), "--set", "shaping_alpha=0.3"],
        env,
    )
    assert out.startswith(f"run {run_id}: iter-1/score rerun as v2"), out
    page.goto(f"http://127.0.0.1:{pp}/runs", timeout=60_000)
    expect(page.get_by_text(f"{run_id}/iter-1/score v2").first).to_be_visible(timeout=60_000)
    page.screenshot(path=ARTIFACTS / "prefect-rerun.png", full_page=True)
    found = _get(
        f"http://127.0.0.1:{mp}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [exp_id], "filter": "tags.`turntree.version` = 'v2' and tags.stage = 'score'"},
    )
    (child,) = found["runs"]
    page.goto(f"http://127.0.0.1:{mp}/#/experiments/{exp_id}/runs/{child['info']['run_id']}", timeout=60_000)
    expect(page.get_by_text("iter-1/score v2").first).to_be_visible(timeout=60_000)
    expect(page.get_by_text("turntree.overrides").first).to_be_visible(timeout=60_000)
    page.screenshot(path=ARTIFACTS / "mlflow-rerun.png", full_page=True)


def _warning_and_registry(page, env, tiny: dict, tmp_path: Path, pp: int, mp: int, name: str) -> None:
    """A run whose every group tied: the update is skipped; Prefect shows the warning in the flow run's logs and a
    Skipped node, and the registry gets no version of an untrained model."""
    from playwright.sync_api import expect

    config = tmp_path / "tied.yaml"
    config.write_text(
        yaml.safe_dump({**tiny, "advantages": {"keep_zero_signal": False}, "run_id": "tied-run"})
    )
    _turntree(["run", "--config", str(config)], env)
    manifest = json.loads((Path(tiny["run_root"]) / "tied-run" / "manifest.json").read_text())
    assert "registered_model" not in manifest
    page.goto(f"http://127.0.0.1:{pp}/runs/flow-run/{manifest['prefect_flow_run_id']}", timeout=60_000)
    expect(page.get_by_text("update skipped").first).to_be_visible(timeout=60_000)  # the Logs tab
    page.screenshot(path=ARTIFACTS / "prefect-warning.png", full_page=True)
    versions = _get(f"http://127.0.0.1:{mp}/api/2.0/mlflow/model-versions/search?filter=name%3D%27{name}%27")
    assert [v["version"] for v in versions["model_versions"]] == ["1"]  # still only the trained one
    page.goto(f"http://127.0.0.1:{mp}/#/models/{name}", timeout=60_000)
    expect(page.get_by_text("Version 1").first).to_be_visible(timeout=60_000)
    page.screenshot(path=ARTIFACTS / "mlflow-registry-no-untrained.png", full_page=True)
