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
import time
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


# --- one writer per run across machines: conditional writes (If-None-Match / If-Match) ------------------
# "Another machine" is another process with its own local lock directory (TURNTREE_LOCK_DIR): the file lock of
# a remote root is per machine, so only what is in the bucket can keep the two apart.
_HOLDER = """
import sys, time
from flows.locks import held_token, run_lock
with run_lock(sys.argv[1], "r1"):
    print(held_token(sys.argv[1], "r1"), flush=True)
    time.sleep(120)
"""


def _other_machine(s3_env_set: str, tmp_path: Path, root: str, ttl: str) -> subprocess.Popen:
    env = {
        **os.environ,
        **s3_env(s3_env_set),
        "PYTHONPATH": str(REPO),
        "TURNTREE_LOCK_DIR": str(tmp_path / "other-machine-locks"),
        "TURNTREE_REMOTE_LOCK_TTL": ttl,
    }
    return subprocess.Popen(
        [sys.executable, "-c", _HOLDER, root], env=env, stdout=subprocess.PIPE, text=True, cwd=REPO
    )


def test_the_run_lock_of_an_s3_root_holds_across_machines(s3_env_set, tmp_path):
    """A writer on another machine holds the run: this one is refused naming it (its local lock file is
    elsewhere, so only the lease in the bucket can say so); a stage step with the holder's token may write from
    here, a forged token may not; once the holder dies without releasing, its lease lapses and is taken over."""
    from flows.locks import NotAuthorised, RunLocked, authorised, held_token, run_lock

    root = f"s3://{BUCKET}/leases"
    holder = _other_machine(s3_env_set, tmp_path, root, ttl="3")
    try:
        token = holder.stdout.readline().strip()
        assert len(token) == 32, token
        with pytest.raises(RunLocked, match=f"process {holder.pid} on "):
            with run_lock(root, "r1"):
                pass
        with run_lock(root, "r2"):  # another run is not blocked
            pass
        with authorised(root, "r1", token):  # a step the holder dispatched here
            pass
        with pytest.raises(NotAuthorised, match=f"process {holder.pid}"):
            with authorised(root, "r1", "f" * 32):
                pass
        time.sleep(
            2.5
        )  # the holder renews its lease (every ttl/3): still refused after its first ttl is over
        with pytest.raises(RunLocked):
            with run_lock(root, "r1"):
                pass
    finally:
        holder.kill()  # dies holding it: no release
        holder.wait()
    from flows.locks import read_lease

    deadline = time.monotonic() + 30
    while not read_lease(root, "r1")["expired"]:
        assert time.monotonic() < deadline, read_lease(root, "r1")
        time.sleep(0.5)
    with run_lock(root, "r1"):  # taken over once it lapsed
        mine = held_token(root, "r1")
        assert read_lease(root, "r1")["token"] == mine != token
        with pytest.raises(NotAuthorised):  # the dead holder's steps write nothing any more
            with authorised(root, "r1", token):
                pass
    assert read_lease(root, "r1")["released"]


def test_a_writer_that_lost_its_lease_writes_nothing(s3_env_set, monkeypatch):
    """The lease is taken over (its holder paused past its ttl, or the store says so): the next manifest write
    and the next version claim of the former holder are refused."""
    from flows.locks import RunLocked, run_lock

    monkeypatch.setenv("TURNTREE_REMOTE_LOCK_TTL", "1.5")
    root = f"s3://{BUCKET}/lost"
    store = RunStore(root, "r1")
    with run_lock(root, "r1"):
        store.create_or_open({"a": 1})
        # another machine takes the lease over (as after this process paused past its ttl)
        s3_client(s3_env_set).put_object(
            Bucket=BUCKET, Key="lost/.locks/r1.lock", Body=b'{"host": "b", "pid": 1}'
        )
        time.sleep(1.2)  # its next renewal (every ttl/3) finds the lease changed
        with pytest.raises(RunLocked, match="no longer holds the run's lease .another process took it over"):
            store.update(status="running")
        with pytest.raises(RunLocked, match="no longer holds the run's lease"):
            _commit_one(store, "late")
    assert RunStore(root, "r1").load()["status"] == "created"
    assert not _keys(s3_env_set, "lost/r1/data/")


def _commit_one(store: RunStore, prompt: str) -> StageOutput:
    scratch = store.scratch_dir("data", None)
    ref = write_table([{**ROW, "prompt": prompt}], tables.PROBLEMS, scratch / "problems.parquet")
    out = StageOutput(stage="data", tables={"problems": ref}, metrics={})
    return store.commit("data", None, scratch, out, inputs={}, params={"p": prompt}, params_field="data")


def test_manifest_writes_are_conditional_so_no_writer_undoes_another(s3_env_set, monkeypatch):
    """Two writers of one run on different machines: a manifest saved from a stale read is refused (If-Match),
    a create that finds the manifest made meanwhile opens it instead of replacing it (If-None-Match: *), and
    two read-modify-writes that race both land."""
    root = f"s3://{BUCKET}/cas"
    a, b = RunStore(root, "r1"), RunStore(root, "r1")
    # create: b creates the run and commits a stage while a still believes there is no manifest
    real_exists, seen = RunStore.exists, []

    def a_looks_first(self):
        if self is a and not seen:
            seen.append(1)
            b.create_or_open({"x": 1})
            _commit_one(b, "from-b")
            return False
        return real_exists(self)

    monkeypatch.setattr(RunStore, "exists", a_looks_first)
    assert a.create_or_open({"x": 1})["stages"]["data"]["current"] == "v1"  # opened, not replaced
    monkeypatch.setattr(RunStore, "exists", real_exists)
    assert "data" in RunStore(root, "r1").load()["stages"]
    # update: a's read is stale once b has written; saving it is refused, and nothing of b's is lost
    from flows.runstore import ManifestChanged

    manifest = a.load()
    b.update(status="running")
    manifest["status"] = "stale"
    with pytest.raises(ManifestChanged, match="another writer changed"):
        a.save(manifest)
    assert RunStore(root, "r1").load()["status"] == "running"
    # two updates that interleave (b writes between a's read and a's write) both land
    real_write, raced = RunStore._write, []

    def b_writes_in_between(self, m, etag):
        if self is a and not raced:
            raced.append(1)
            b.update(from_b=True)
        return real_write(self, m, etag)

    monkeypatch.setattr(RunStore, "_write", b_writes_in_between)
    a.update(from_a=True)
    final = RunStore(root, "r1").load()
    assert raced and final["from_a"] is True and final["from_b"] is True and final["status"] == "running"


def test_two_writers_never_upload_into_the_same_version(s3_env_set, monkeypatch):
    """a lists the stage's versions (none yet) and picks v1; b commits v1 before a uploads anything. a's claim
    of v1 fails (If-None-Match: *), so it takes v2: both versions, each with its own bytes and record."""
    root = f"s3://{BUCKET}/claims"
    a, b = RunStore(root, "r1"), RunStore(root, "r1")
    a.create_or_open({})
    real_next, raced = RunStore.next_version, []

    def b_commits_in_between(self, stage, iteration):
        version = real_next(self, stage, iteration)
        if self is a and not raced:
            raced.append(1)
            _commit_one(b, "from-b")
        return version

    monkeypatch.setattr(RunStore, "next_version", b_commits_in_between)
    out_a = _commit_one(a, "from-a")
    entry = RunStore(root, "r1").load()["stages"]["data"]
    assert set(entry["versions"]) == {"v1", "v2"} and entry["current"] == "v2"
    assert out_a.uri("problems").endswith("/data/v2/problems.parquet")
    for version, prompt in (("v1", "from-b"), ("v2", "from-a")):
        ref = entry["versions"][version]["output"]["tables"]["problems"]
        assert entry["versions"][version]["params"] == {"p": prompt}
        assert read_table(ref["uri"], tables.PROBLEMS)["prompt"][0].as_py() == prompt
        body = _get(s3_env_set, ref["uri"].removeprefix(f"s3://{BUCKET}/"))
        assert hashlib.sha256(body).hexdigest() == ref["sha256"]
    assert RunStore(root, "r1").verify() == []


def test_a_store_that_ignores_conditional_writes_is_refused(s3_env_set, monkeypatch):
    """The run-root check probes the store: a second If-None-Match: * PUT of one key must fail. A store that
    lets it through (an S3-compatible server without conditional writes) is named, and the probe is removed."""
    from flows import remote

    root = f"s3://{BUCKET}/probe"
    assert remote.check_root(root) is None
    real_put = remote.put_object
    monkeypatch.setattr(remote, "put_object", lambda uri, data, **kw: real_put(uri, data))  # headers dropped
    why = remote.check_root(root)
    assert why and "ignores conditional writes" in why
    assert _keys(s3_env_set, "probe/") == {}


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
    name = "turntree-gtpo-" + Path(manifest["params"]["model"]).name.lower()  # the tiny model's directory
    assert manifest["registered_model"] == f"{name}/1"  # its source: the checkpoint's URI
    sources = _psql(pg + "/mlflow", "SELECT name, version, source FROM model_versions")
    assert sources == [(name, 1, manifest["final_checkpoint"])], sources
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
    assert res.returncode == 0 and "every current output matches" in res.stdout, res.stdout + res.stderr
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
