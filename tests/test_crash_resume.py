"""A pipeline process killed with SIGKILL in the middle of a run, then rerun: it resumes without redoing the
completed stages and leaves no corrupt or half-written outputs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flows.runstore import list_runs
from runtime.tableio import read_table
from schemas import tables
from schemas.params.presets import tiny_pipeline
from tests.procs import alive

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[1]


def _config(tiny_model: Path, root: Path) -> dict:
    return tiny_pipeline(
        str(tiny_model),
        str(root),
        "grpo",
        iterations=2,
        eval={"max_problems": 1, "iterations": 1, "max_new_tokens": 8, "bootstrap": 10},
    )


def _run(cfg: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen(
        [str(BIN / "turntree"), "run", "--config", str(cfg)],
        env=env,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )


@pytest.mark.slow
def test_sigkill_mid_run_then_resume(tiny_model, tmp_path):
    root = tmp_path / "runs"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(_config(tiny_model, root)))  # JSON is YAML
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / ".prefect-results"),
    }
    proc = _run(cfg, env)
    deadline = time.monotonic() + 900
    killed_after = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list_runs(str(root)) if root.exists() else []
            stages = runs[0].get("stages", {}) if runs else {}
            if "iter-1/update" in stages:  # iteration 1 is done up to its update: kill before it finishes
                killed_after = sorted(stages)
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.2)
    finally:
        if proc.poll() is None and killed_after is None:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed_after, (
        "the run finished or timed out before it could be killed: " + (proc.stdout.read()[-3000:])
    )
    (manifest,) = list_runs(str(root))
    assert manifest["status"] == "running"  # what a killed process leaves
    first = {k: dict(v["versions"]) for k, v in manifest["stages"].items()}

    again = _run(cfg, env)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-4000:]
    (manifest,) = list_runs(str(root))
    assert manifest["status"] == "completed"
    for key, versions in first.items():  # completed stages were not redone
        assert manifest["stages"][key]["versions"] == versions, key
    assert "iter-2/update" in manifest["stages"]
    base = root / manifest["run_id"]
    assert not list(base.rglob(".tmp-*")), "unfinished outputs of the killed attempt were left behind"
    assert not list(base.rglob("*.tmp"))
    for entry in manifest["stages"].values():
        for version in entry["versions"].values():
            for name, ref in version["output"]["tables"].items():
                if ref["uri"].endswith(".parquet"):
                    read_table(ref["uri"], tables.ALL[name])  # every stored table still reads
    assert "completed)" in out and "Prefect:" in out and "MLflow:" in out  # the run story and its links
    # MLflow: no run is left RUNNING; the stage runs the killed attempt left open were ended KILLED, with why
    from mlflow import MlflowClient

    from flows.tracking import tracking_uri

    client = MlflowClient(tracking_uri(str(root)))
    experiments = [e.experiment_id for e in client.search_experiments()]
    assert client.search_runs(experiments, "attributes.status = 'RUNNING'") == []
    killed = client.search_runs(experiments, "attributes.status = 'KILLED'")
    assert all("later attempt" in r.data.tags["turntree.ended_by"] for r in killed)


@pytest.mark.slow
@pytest.mark.parametrize("kill_when", ["ahead-rollout-committed", "update-1-committed"])
def test_sigkill_in_an_overlapped_iteration_then_resume(tiny_model, tmp_path, kill_when):
    """max_staleness=1: killed while iteration 2's rollout runs beside update 1 (right after either one is
    committed), then rerun: no committed rollout is generated again, no update trains its samples twice (every
    stage committed before the kill keeps its single version), and the run completes."""
    root = tmp_path / "runs"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps({**_config(tiny_model, root), "max_staleness": 1, "iterations": 3}))
    env = {
        **os.environ,
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / ".prefect-results"),
    }
    key = "iter-2/rollout" if kill_when == "ahead-rollout-committed" else "iter-1/update"
    proc = _run(cfg, env)
    deadline, killed_after = time.monotonic() + 900, None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            runs = list_runs(str(root)) if root.exists() else []
            stages = runs[0].get("stages", {}) if runs else {}
            if key in stages:
                os.killpg(proc.pid, signal.SIGKILL)
                killed_after = {k: dict(v["versions"]) for k, v in stages.items()}
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None and killed_after is None:
            os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert killed_after, (
        "the run finished or timed out before it could be killed: " + proc.stdout.read()[-3000:]
    )
    again = _run(cfg, env)
    out, _ = again.communicate(timeout=900)
    assert again.returncode == 0, out[-4000:]
    (manifest,) = list_runs(str(root))
    assert manifest["status"] == "completed"
    for k, versions in killed_after.items():  # nothing committed before the kill was made again
        assert manifest["stages"][k]["versions"] == versions, k
    for it in (1, 2, 3):  # one version of every stage: no rollout lost and redone, no update run twice
        for stage in ("rollout", "update"):
            assert set(manifest["stages"][f"iter-{it}/{stage}"]["versions"]) == {"v1"}, (it, stage)
    rec = manifest["stages"]["iter-2/rollout"]["versions"]["v1"]
    assert rec["inputs"]["policy_version"] == "0"  # generated beside update 1, by the policy before it


def _children() -> dict[int, list[int]]:
    """ppid -> pids of every live process (from /proc)."""
    out: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            fields = stat.rsplit(")", 1)[1].split()
            if fields[0] != "Z":
                out.setdefault(int(fields[1]), []).append(int(d.name))
    return out


def _descendants(pid: int) -> set[int]:
    tree, found, todo = _children(), set(), [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _default_sigint() -> None:
    """A shell starts a background job with SIGINT ignored, and a process inherits that (Python then installs no
    KeyboardInterrupt handler): a suite run as `infra/test.sh &` would hand every command it starts SIGINT ignored,
    unlike a terminal's foreground job, which is what the Ctrl-C test stands for."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _running_with_its_server(proc: subprocess.Popen, root: Path, log: Path) -> set[int]:
    """Wait until the command's run is past its data stage; return the processes it started (its temporary
    Prefect server among them)."""
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline and proc.poll() is None:
        runs = list_runs(str(root)) if root.exists() else []
        if runs and runs[0].get("status") == "running" and "data" in runs[0]["stages"]:
            break
        time.sleep(0.2)
    assert proc.poll() is None, log.read_text()[-3000:]
    started = _descendants(proc.pid)
    assert any("uvicorn" in _cmdline(p) for p in started), [_cmdline(p) for p in started]
    return started


@pytest.mark.slow
def test_second_writer_is_refused_and_sigterm_stops_the_prefect_server(tiny_model, tmp_path):
    """Two `turntree run` with one run id: the second exits 2 naming the first's pid; SIGTERM to the first stops
    the temporary Prefect server (uvicorn) it started, marks the run failed and releases the lock."""
    from flows.locks import run_lock

    root = tmp_path / "runs"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(json.dumps(_config(tiny_model, root)))
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PREFECT_HOME": str(tmp_path / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(root / ".prefect-results"),
    }
    argv = [sys.executable, "-m", "flows.cli", "run", "--config", str(cfg)]
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(argv, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    try:
        started = _running_with_its_server(first, root, tmp_path / "first.log")

        second = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr[-3000:]
        assert f"process {first.pid}" in second.stderr and second.stderr.count("\n") == 1, second.stderr

        first.send_signal(signal.SIGTERM)  # the process only, not its group: it must stop what it started
        assert first.wait(timeout=120) == 143, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in started):
        time.sleep(0.2)
    left = [_cmdline(p) for p in started if alive(p)]
    log = (tmp_path / "first.log").read_text()[-3000:]
    assert not left, f"processes the run started are still running: {left}\n{log}"
    (manifest,) = list_runs(str(root))
    assert manifest["status"] == "failed"
    assert not list((root / manifest["run_id"]).rglob(".tmp-*"))
    with run_lock(str(root), manifest["run_id"]):  # released
        pass


@pytest.mark.slow
@pytest.mark.parametrize("command, sig", [("study", signal.SIGTERM), ("run", signal.SIGINT)])
def test_a_signal_to_the_whole_process_group_ends_the_command_promptly(command, sig, tiny_model, tmp_path):
    """`kill -- -PGID` (a scheduler ending a job) or Ctrl-C in a terminal signals every process of the group at
    once. The temporary Prefect server lives in a session of its own (flows.prefect_local), so it is still there
    while the run reports its crash: the command ends in seconds (a study used to retry against a dead server for
    minutes), marks its run failed and leaves no process behind."""
    from flows.locks import run_lock

    root = tmp_path / "runs"
    if command == "study":
        smoke = REPO / "configs" / "studies" / "smoke.yaml"
        argv = [
            "study",
            "--config",
            str(smoke),
            "--set",
            f"base.model={tiny_model}",
            "--set",
            "methods=[grpo]",
        ]
        argv += ["--set", "seeds=[0]", "--root", str(root), "--out", str(tmp_path / "report")]
    else:
        cfg = tmp_path / "cfg.yaml"
        cfg.write_text(json.dumps(_config(tiny_model, root)))
        argv = ["run", "--config", str(cfg)]
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_LOCAL_STORAGE_PATH=str(root / ".prefect-results")
    )
    with open(tmp_path / "out.log", "w") as log:
        proc = subprocess.Popen(
            [str(BIN / "turntree"), *argv],
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # a group of its own, as a terminal's foreground job has
            preexec_fn=_default_sigint,  # and SIGINT not ignored, even when this suite runs in the background
        )
    try:
        started = _running_with_its_server(proc, root, tmp_path / "out.log")
        t0 = time.monotonic()
        os.killpg(proc.pid, sig)
        try:
            code = proc.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{command} still running 90 s after a group {sig.name}")
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    log = (tmp_path / "out.log").read_text()[-3000:]
    assert code == 128 + sig and took < 45, (code, took, log)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and any(alive(p) for p in started):
        time.sleep(0.2)
    assert not [_cmdline(p) for p in started if alive(p)], log
    (manifest,) = list_runs(str(root))
    assert manifest["status"] == "failed", log
    with run_lock(str(root), manifest["run_id"]):  # released
        pass
