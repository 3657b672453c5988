"""Run storage on an S3 API, and the pipeline against real backends: PostgreSQL behind a real ``prefect server``
and a real ``mlflow server``, run storage and MLflow artifacts in a bucket. The S3 API is moto's server mode,
standing in for S3 (AWS, MinIO, Ceph); PostgreSQL is Debian's package, installed by ``.ci/run``."""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from flows.runstore import RunStore, list_runs
from runtime.tableio import read_table, write_table
from schemas import tables
from schemas.outputs import StageOutput, TableRef
from schemas.params.presets import tiny_pipeline
from tests.backends import (
    free_port,
    postgres_bin,
    postgres_cluster,
    s3_client,
    s3_env,
    s3_server,
    start_mlflow_server,
)
from tests.serving import banner, start_serve
from tests.test_runstore import ROW

REPO = Path(__file__).resolve().parents[1]
BUCKET = "turntree-ci"


@pytest.fixture(scope="module")
def s3():
    with s3_server(BUCKET) as endpoint:
        yield endpoint


@pytest.fixture
def s3_env_set(s3, monkeypatch, tmp_path):
    for k, v in s3_env(s3).items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("TURNTREE_REMOTE_CACHE", str(tmp_path / "mirror"))
    monkeypatch.setenv("TURNTREE_LOCK_DIR", str(tmp_path / "locks"))
    return s3


def _keys(endpoint: str, prefix: str) -> dict[str, int]:
    pages = s3_client(endpoint).get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _get(endpoint: str, key: str) -> bytes:
    return s3_client(endpoint).get_object(Bucket=BUCKET, Key=key)["Body"].read()


def test_run_store_on_s3_records_uris_verifies_and_mirrors_checkpoints(s3_env_set, tmp_path):
    from flows.remote import localize, mirror_path

    store = RunStore(f"s3://{BUCKET}/unit", "r1")
    store.create_or_open({"a": 1})
    scratch = store.scratch_dir("update", 1)
    ref = write_table([ROW], tables.PROBLEMS, scratch / "problems.parquet")
    (scratch / "checkpoint").mkdir()
    (scratch / "checkpoint" / "config.json").write_text('{"x": 1}')
    (scratch / "checkpoint" / "tok").mkdir()
    (scratch / "checkpoint" / "tok" / "vocab.json").write_text("{}")
    from flows.integrity import content_sha256

    ckpt = TableRef(
        uri=str(scratch / "checkpoint"), sha256=content_sha256(str(scratch / "checkpoint")), rows=0
    )
    out = StageOutput(stage="update", tables={"problems": ref, "checkpoint": ckpt}, metrics={})
    done = store.commit("update", 1, scratch, out, inputs={}, params={"p": 1}, params_field="update")
    uri = done.uri("problems")
    assert uri == f"s3://{BUCKET}/unit/r1/iter-1/update/v1/problems.parquet"
    keys = _keys(s3_env_set, "unit/r1/")
    assert "unit/r1/manifest.json" in keys and "unit/r1/iter-1/update/v1/checkpoint/config.json" in keys
    assert not [k for k in keys if ".tmp" in k]  # no temporary objects left behind
    body = _get(s3_env_set, "unit/r1/iter-1/update/v1/problems.parquet")
    assert hashlib.sha256(body).hexdigest() == ref.sha256 == done.tables["problems"].sha256
    assert read_table(uri, tables.PROBLEMS)["prompt"][0].as_py() == ROW["prompt"]
    assert store.find_completed("update", 1, {}, {"p": 1}) is not None and store.verify() == []
    assert [m["run_id"] for m in list_runs(f"s3://{BUCKET}/unit")] == ["r1"]
    # the uploaded checkpoint stays on this machine (the mirror); a machine without it downloads it once
    mirror = mirror_path(done.uri("checkpoint"))
    assert (mirror / "config.json").read_text() == '{"x": 1}' and not scratch.exists()
    import shutil

    shutil.rmtree(mirror)
    local = localize({"checkpoint": done.uri("checkpoint"), "problems": uri}, lambda u: ckpt.sha256)
    assert local == {"checkpoint": str(mirror), "problems": uri}
    assert (mirror / "config.json").is_file() and (mirror / "tok" / "vocab.json").is_file()
    # `turntree compare` of a run on S3 evaluates this machine's (downloaded, checked) copy of its checkpoint
    from flows.compare import _target

    shutil.rmtree(mirror)
    store.update(final_checkpoint=done.uri("checkpoint"), mlflow_run_id="m1")
    assert _target(store.root, "r1") == (str(mirror), "m1") and (mirror / "tok" / "vocab.json").is_file()
    # reuse checks a remote checkpoint as it will be read: through the mirror, fetched again when it differs
    (mirror / "config.json").write_text("tampered")
    assert store.find_completed("update", 1, {}, {"p": 1}) is not None
    assert (mirror / "config.json").read_text() == '{"x": 1}'
    # a changed object is caught by sha256, never reused
    s3_client(s3_env_set).put_object(
        Bucket=BUCKET, Key="unit/r1/iter-1/update/v1/problems.parquet", Body=body[:-1] + b"x"
    )
    assert store.find_completed("update", 1, {}, {"p": 1}) is None
    bad = store.verify()
    assert len(bad) == 1 and bad[0].startswith(f"{uri}: sha256 differs")


def test_remote_root_needs_a_reachable_tracking_server_before_any_work(
    s3_env_set, tmp_path, monkeypatch, capsys
):
    from flows.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    root = f"s3://{BUCKET}/refused"
    argv = ["run", "--root", root, "--set", "model=tiny", "--set", "data.sources=['synthetic:tool-arith']"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "MLFLOW_TRACKING_URI is not set" in err and root in err
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{free_port()}")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "is not reachable" in err
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    # nothing was written: no local run dir or SQLite file, no lock, nothing in the bucket
    assert list(work.iterdir()) == [] and not (tmp_path / "locks").exists()
    assert _keys(s3_env_set, "refused/") == {}
    # a bucket that is not there is named as such (the tracking server being fine)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/elsewhere.db")
    assert main(["run", "--root", "s3://no-such-bucket/runs", *argv[3:]]) == 2
    assert "bucket 'no-such-bucket' does not exist" in capsys.readouterr().err


def _psql(url: str, query: str) -> list[tuple]:
    import psycopg2

    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute(query)
        return cur.fetchall()


def _cli(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "flows.cli", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout)


@pytest.mark.scaleout
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_pipeline_on_postgres_backed_servers_and_s3(tiny_model, tmp_path):
    """One tiny-model pipeline run with Prefect and MLflow servers on PostgreSQL, run storage and MLflow
    artifacts in a bucket; then an evaluate rerun as from another machine and `turntree verify` on the bucket."""
    if postgres_bin() is None:
        pytest.skip("PostgreSQL binaries not installed (/usr/lib/postgresql/*/bin; .ci/run installs them)")
    from flows.serve import start_prefect_server, stop, wait_healthy

    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    root, run_id = f"s3://{BUCKET}/runs", "stack"
    with postgres_cluster(("prefect", "mlflow")) as pg, s3_server(BUCKET) as endpoint:
        pport, mport = free_port(), free_port()
        env = {
            **os.environ,
            **s3_env(endpoint),
            "PYTHONPATH": str(REPO),
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_API_URL": f"http://127.0.0.1:{pport}/api",
            "PREFECT_API_DATABASE_CONNECTION_URL": pg.replace("postgresql://", "postgresql+asyncpg://")
            + "/prefect",
            "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}",
            "TURNTREE_REMOTE_CACHE": str(home / "mirror"),
            "TURNTREE_LOCK_DIR": str(home / "locks"),
        }
        logs = {name: open(tmp_path / f"{name}.log", "w") for name in ("prefect", "mlflow")}  # noqa: SIM115
        # SQLAlchemy 2.1 maps plain postgresql:// to psycopg 3: name the driver that is installed
        mlflow_db = pg.replace("postgresql://", "postgresql+psycopg2://") + "/mlflow"
        servers = [
            start_prefect_server(pport, logs["prefect"], env),
            start_mlflow_server(mlflow_db, f"s3://{BUCKET}/mlflow", mport, env, logs["mlflow"]),
        ]
        try:
            for proc, url, name in zip(
                servers,
                (f"{env['PREFECT_API_URL']}/health", f"{env['MLFLOW_TRACKING_URI']}/health"),
                logs,
                strict=True,
            ):
                assert wait_healthy(url, proc, 240), (tmp_path / f"{name}.log").read_text()[-3000:]
            config = tmp_path / "tiny.yaml"
            config.write_text(yaml.safe_dump(tiny_pipeline(str(tiny_model), root, run_id=run_id)))
            res = _cli(["run", "--config", str(config)], env, work, 1200)
            assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
            _check_run(endpoint, pg, env, run_id)
            _check_rerun_and_verify(endpoint, pg, env, work, root, run_id)
            _check_serve_beside_the_tracking_server(env, work, root)
        finally:
            for proc in servers:
                stop(proc)
            for f in logs.values():
                f.close()
    # tracking followed the server: no SQLite file or local run directory anywhere on this side
    local_dbs = [p for p in tmp_path.rglob("*") if p.suffix in (".db", ".sqlite") or p.name == "mlflow.db"]
    assert local_dbs == [] and not (work / "runs").exists(), local_dbs


def _check_run(endpoint: str, pg: str, env: dict[str, str], run_id: str) -> None:
    keys = _keys(endpoint, f"runs/{run_id}/")
    manifest = json.loads(_get(endpoint, f"runs/{run_id}/manifest.json"))
    assert manifest["status"] == "completed" and manifest["tracking_uri"] == env["MLFLOW_TRACKING_URI"]
    assert manifest["final_checkpoint"].startswith(f"s3://{BUCKET}/runs/{run_id}/iter-1/update/v1/")
    assert manifest["registered_model"] == "turntree-gtpo/1"  # its source: the checkpoint's URI
    sources = _psql(pg + "/mlflow", "SELECT name, version, source FROM model_versions")
    assert sources == [("turntree-gtpo", 1, manifest["final_checkpoint"])], sources
    parquet = 0
    for key, entry in manifest["stages"].items():
        for version, record in entry["versions"].items():
            for ref in record["output"]["tables"].values():
                assert ref["uri"].startswith(f"s3://{BUCKET}/runs/{run_id}/{key}/{version}/"), ref
                obj = ref["uri"].removeprefix(f"s3://{BUCKET}/")
                if ref["uri"].endswith(".parquet"):  # each table: in the bucket, with its recorded bytes
                    body = _get(endpoint, obj)
                    assert hashlib.sha256(body).hexdigest() == ref["sha256"], ref["uri"]
                    assert pq.read_table(io.BytesIO(body)).num_rows == ref["rows"]
                    parquet += 1
                else:  # a checkpoint directory
                    assert any(k.startswith(obj + "/") for k in keys), ref["uri"]
    stages = set(manifest["stages"])
    assert {"data", "iter-0/evaluate", "iter-1/rollout", "iter-1/score", "iter-1/update"} <= stages
    assert parquet >= 6
    # Prefect: the flow run is in PostgreSQL, completed, and is the one the manifest names
    prefect_db = pg + "/prefect"
    flow_runs = _psql(prefect_db, "SELECT id::text, name, state_type FROM flow_run")
    assert (manifest["prefect_flow_run_id"], run_id, "COMPLETED") in flow_runs, flow_runs
    # MLflow: the parent and one child per stage invocation in PostgreSQL, artifacts in the bucket
    mlflow_db = pg + "/mlflow"
    runs = {r[0]: r[1:] for r in _psql(mlflow_db, "SELECT run_uuid, name, status, artifact_uri FROM runs")}
    parent = manifest["mlflow_run_id"]
    assert runs[parent][:2] == (run_id, "FINISHED"), runs
    children = _psql(
        mlflow_db, f"SELECT run_uuid FROM tags WHERE key='mlflow.parentRunId' AND value='{parent}'"
    )
    versions = sum(len(e["versions"]) for e in manifest["stages"].values())
    assert len(children) == versions, (children, versions)
    exp = _psql(mlflow_db, "SELECT experiment_id, artifact_location FROM experiments WHERE name='turntree'")
    assert exp and exp[0][1].startswith("mlflow-artifacts:/"), (
        exp
    )  # served by the server, stored in the bucket
    art = f"mlflow/{exp[0][0]}/{parent}/artifacts/"
    config = json.loads(_get(endpoint, art + "config.json"))
    assert config["run_root"] == f"s3://{BUCKET}/runs" and config["run_id"] == run_id
    assert json.loads(_get(endpoint, art + "manifest.json"))["run_id"] == run_id
    child_keys = [k for c in children for k in _keys(endpoint, f"mlflow/{exp[0][0]}/{c[0]}/artifacts/")]
    assert any(k.endswith("stage_output.json") for k in child_keys)
    assert any("/samples/" in k for k in child_keys)  # sample tables logged from the remote Parquet
    assert any(k.endswith("model/checkpoint.json") for k in child_keys)


def _check_rerun_and_verify(endpoint: str, pg: str, env: dict, work: Path, root: str, run_id: str) -> None:
    """``turntree stage evaluate --iter 1`` as on another machine (an empty mirror): the trained checkpoint is
    downloaded from the bucket, checked, loaded and evaluated; then ``turntree verify`` on the bucket."""
    fresh = {**env, "TURNTREE_REMOTE_CACHE": str(work.parent / "other-machine")}
    res = _cli(["stage", "evaluate", "--run", run_id, "--iter", "1", "--root", root], fresh, work, 600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    manifest = json.loads(_get(endpoint, f"runs/{run_id}/manifest.json"))
    entry = manifest["stages"]["iter-1/evaluate"]
    assert entry["current"] == "v2" and entry["versions"]["v2"]["inputs"] == entry["versions"]["v1"]["inputs"]
    assert entry["versions"]["v2"]["inputs"]["checkpoint"] == manifest["final_checkpoint"]  # an s3:// URI
    rerun = entry["versions"]["v2"]["output"]["tables"]
    assert rerun and all(
        r["uri"].startswith(f"s3://{BUCKET}/runs/{run_id}/iter-1/evaluate/v2/") for r in rerun.values()
    )
    assert _keys(endpoint, f"runs/{run_id}/iter-1/evaluate/v1/")  # the first version is still there
    downloaded = list((work.parent / "other-machine").rglob("iter-1/update/v1/checkpoint/config.json"))
    assert len(downloaded) == 1, "the checkpoint was not fetched into the second machine's mirror"
    flows = _psql(pg + "/prefect", "SELECT flow.name FROM flow JOIN flow_run ON flow.id = flow_run.flow_id")
    assert ("turntree-stage",) in flows
    res = _cli(["verify", run_id, "--root", root], env, work, 300)
    assert res.returncode == 0 and "every stored output matches" in res.stdout, res.stdout + res.stderr
    key = f"runs/{run_id}/iter-1/advantages/v1/samples.parquet"
    s3_client(endpoint).put_object(Bucket=BUCKET, Key=key, Body=_get(endpoint, key)[:-8])
    res = _cli(["verify", run_id, "--root", root], env, work, 300)
    assert res.returncode == 1 and f"s3://{BUCKET}/{key}" in res.stdout, res.stdout + res.stderr


def _check_serve_beside_the_tracking_server(env: dict, work: Path, root: str) -> None:
    """`turntree serve` with MLFLOW_TRACKING_URI set starts Prefect only and points at the tracking server."""
    import signal

    pport, mport = free_port(), free_port()
    proc = start_serve(root, pport, mport, env, cwd=work)
    try:
        out = banner(proc)
        assert f"MLflow UI:  {env['MLFLOW_TRACKING_URI']}" in out and f"127.0.0.1:{pport}" in out, out
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", mport)) != 0  # no MLflow server of its own
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
