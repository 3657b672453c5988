"""The real backends the stack test runs against, each started on a free loopback port and stopped after:

- a throwaway PostgreSQL cluster (Debian's ``postgresql`` package, installed by ``.ci/run``): ``initdb`` into a
  temporary directory and ``pg_ctl start``, as the ``postgres`` user when we are root (postgres refuses root);
- moto's S3 server mode, **standing in for S3** (any S3 API: AWS, MinIO, Ceph);
- ``prefect server start`` on PostgreSQL and ``mlflow server`` on PostgreSQL with its artifacts in the bucket.
"""

from __future__ import annotations

import glob
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path

BIN = Path(sys.executable).parent
AWS = {
    "AWS_ACCESS_KEY_ID": "turntree-test",
    "AWS_SECRET_ACCESS_KEY": "turntree-test",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def postgres_bin() -> Path | None:
    """The newest PostgreSQL server binaries of Debian's layout, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(p.split("/")[4]))
    return Path(found[-1]).parent if found else None


def _as_db_user() -> list[str]:
    if os.getuid() != 0:
        return []
    runuser = shutil.which("runuser")
    if not runuser:
        raise RuntimeError("running as root and runuser is missing: cannot start PostgreSQL as 'postgres'")
    return [runuser, "-u", "postgres", "--"]


@contextmanager
def postgres_cluster(databases: tuple[str, ...]):
    """A fresh cluster on 127.0.0.1:<free port> (trust auth, user ``postgres``) with ``databases`` created;
    yields ``postgresql://postgres@127.0.0.1:<port>``; stopped and removed afterwards."""
    pgbin = postgres_bin()
    if pgbin is None:
        raise FileNotFoundError("no /usr/lib/postgresql/*/bin/pg_ctl")
    # under /tmp, not $TMPDIR: when we are root, the postgres user must be able to reach the directory
    base = Path(tempfile.mkdtemp(prefix="turntree-pg-", dir="/tmp" if os.getuid() == 0 else None))
    data, log = base / "data", base / "server.log"
    if os.getuid() == 0:
        shutil.chown(base, "postgres", "postgres")
    as_user = _as_db_user()
    port = free_port()

    def run(*cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        res = subprocess.run([*as_user, *cmd], capture_output=True, text=True, timeout=timeout)
        if res.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {res.stdout[-2000:]}{res.stderr[-2000:]}")
        return res

    run(str(pgbin / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync")
    opts = f"-c listen_addresses=127.0.0.1 -c port={port} -c unix_socket_directories={base} -c fsync=off"
    try:
        run(str(pgbin / "pg_ctl"), "-D", str(data), "-l", str(log), "-o", opts, "-w", "-t", "60", "start")
        for db in databases:
            run(str(pgbin / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", db)
        yield f"postgresql://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run(
            [*as_user, str(pgbin / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(base, ignore_errors=True)


@contextmanager
def s3_server(bucket: str):
    """moto's S3 server mode on 127.0.0.1:<free port> with ``bucket``; yields the endpoint URL.

    In a process of its own: moto's server is a Flask app, and Flask's module-level proxies (``current_app``
    …) raise on attribute access outside an app context; vLLM's kernel registration scans every module in
    ``sys.modules`` with ``hasattr`` when it builds an engine, so a pytest process that had imported the
    server could no longer build a vLLM engine."""
    import time
    import urllib.request

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.2)
        s3_client(endpoint).create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def _boto_creds() -> dict[str, str]:
    return {
        "aws_access_key_id": AWS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": AWS["AWS_SECRET_ACCESS_KEY"],
        "region_name": AWS["AWS_DEFAULT_REGION"],
    }


def s3_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, **_boto_creds())


def s3_env(endpoint: str) -> dict[str, str]:
    """What every client of the store needs: pyarrow and boto3 read AWS_ENDPOINT_URL, MLflow's S3 artifact
    store MLFLOW_S3_ENDPOINT_URL."""
    return {**AWS, "AWS_ENDPOINT_URL": endpoint, "MLFLOW_S3_ENDPOINT_URL": endpoint}


def start_mlflow_server(
    backend: str, artifacts: str, port: int, env: dict[str, str], log
) -> subprocess.Popen:
    # the store in the environment, as infra/ passes it (never a database URI on a command line)
    cmd = [str(BIN / "mlflow"), "server", "--artifacts-destination", artifacts]
    cmd += ["--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    return subprocess.Popen(
        cmd,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_BACKEND_STORE_URI": backend},
    )
