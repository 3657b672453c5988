"""`turntree serve` (local Prefect server + MLflow UI on 127.0.0.1) and `turntree deploy` (register
infra/prefect.yaml's deployments to a process work pool)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def use_installed_checkout() -> dict[str, str]:
    """Prefect pull step (infra/prefect.yaml): work in the checkout this worker's turntree is imported from,
    so a deployment made on one machine runs on any worker that has turntree installed."""
    os.chdir(REPO)
    return {"directory": str(REPO)}


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll ``url`` until it answers 200 (True), ``proc`` exits or ``timeout`` passes (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return True
        except OSError:
            pass
        time.sleep(0.5)
    return False


def prefect_server_env(port: int, env: dict | None = None) -> dict[str, str]:
    """The environment of a Prefect server turntree starts on 127.0.0.1:``port``: its API answers cross-origin
    requests from its own UI's origin only (Prefect's default is ``*``: any web page the user opens could drive
    it), and state-changing requests need a CSRF token (the UI and Prefect's clients fetch one)."""
    own = f"http://127.0.0.1:{port},http://localhost:{port}"
    return {
        **(os.environ if env is None else env),
        "PREFECT_SERVER_API_CORS_ALLOWED_ORIGINS": own,
        "PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED": "true",
        "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "true",
    }


def start_prefect_server(port: int, log_file=None, env: dict | None = None) -> subprocess.Popen:
    """`prefect server start` on 127.0.0.1:``port``, its SQLite writes begun IMMEDIATE (flows/prefect_sqlite.py:
    without that, a UI action collided with a worker's poll and was answered 503)."""
    prefect = [sys.executable, "-m", "flows.prefect_sqlite"]
    return subprocess.Popen(
        [*prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        stdout=log_file or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=prefect_server_env(port, env),
    )


def start_mlflow_ui(tracking_uri: str, port: int, log_file=None) -> subprocess.Popen:
    # the store's URI goes in the environment, not on the command line (any user can read a process's
    # arguments; a database URI may hold a password)
    env = {
        **os.environ,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_BACKEND_STORE_URI": tracking_uri,
    }
    return subprocess.Popen(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        stdout=log_file or subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env=env,
    )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def mlflow_store(root: str) -> str | None:
    """The store `turntree serve` starts an MLflow UI on, or None when ``MLFLOW_TRACKING_URI`` names a tracking
    server (it has its own UI; ``mlflow server`` cannot take it as a backend store)."""
    from flows.tracking import tracking_uri

    uri = tracking_uri(root)
    return None if uri.startswith(("http://", "https://")) else uri


def log_dir(root: str) -> Path:
    """Where `turntree serve` writes the servers' logs: ``<root>/logs``, or for a remote root (no local
    directory of its own) ``~/.cache/turntree/logs``; created."""
    d = Path(root) / "logs" if "://" not in root else Path.home() / ".cache" / "turntree" / "logs"
    d.mkdir(parents=True, exist_ok=True)
    return d


def serve(root: str, prefect_port: int, mlflow_port: int) -> int:
    """Both servers, logging to ``<root>/logs/{prefect,mlflow}-server.log``; the Prefect UI calls the API on
    ``prefect_port`` (not Prefect's default 4200). With a tracking server configured, only Prefect."""
    uri = mlflow_store(root)
    if uri is None:
        return serve_prefect_only(root, prefect_port)
    logs = log_dir(root)
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api}
    files = [open(logs / "prefect-server.log", "a"), open(logs / "mlflow-server.log", "a")]  # noqa: SIM115
    # Ctrl-C or a TERM stops both servers (they run in their own sessions): even when started in the
    # background, where the shell hands us SIGINT ignored
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    procs = [start_prefect_server(prefect_port, files[0], env), start_mlflow_ui(uri, mlflow_port, files[1])]
    try:
        ok_p = wait_healthy(f"http://127.0.0.1:{prefect_port}/api/health", procs[0], 90)
        ok_m = wait_healthy(f"http://127.0.0.1:{mlflow_port}/health", procs[1], 90)
        if not (ok_p and ok_m):
            which = "prefect" if not ok_p else "mlflow"
            print(
                f"turntree: error: could not start {which} (is the port in use? see {logs}/{which}-server.log)",
                file=sys.stderr,
            )
            return 1
        print(
            f"Prefect UI: http://127.0.0.1:{prefect_port}   (export PREFECT_API_URL="
            f"http://127.0.0.1:{prefect_port}/api to send runs there)"
        )
        print(
            f"MLflow UI:  http://127.0.0.1:{mlflow_port}   (tracking URI {uri}; export "
            f"TURNTREE_MLFLOW_UI=http://127.0.0.1:{mlflow_port} for run links)"
        )
        from flows.tracking import EVAL_EXPERIMENT, UI_MODE, Tracker

        for label, name in (("training runs", "turntree"), ("evaluations", EVAL_EXPERIMENT)):
            exp = Tracker(root, name).experiment_id
            print(f"  {label}: http://127.0.0.1:{mlflow_port}/#/experiments/{exp}?{UI_MODE}")
        print(f"Server logs: {logs}/prefect-server.log, {logs}/mlflow-server.log")
        print("Ctrl-C stops both.")
        while all(p.poll() is None for p in procs):
            time.sleep(1)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            stop(p)
        for f in files:
            f.close()


def serve_prefect_only(root: str, prefect_port: int) -> int:
    """`turntree serve` beside a tracking server (``MLFLOW_TRACKING_URI``): the Prefect server alone."""
    from flows.uris import without_userinfo

    logs = log_dir(root)
    api = f"http://127.0.0.1:{prefect_port}/api"
    env = {**os.environ, "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api}
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    with open(logs / "prefect-server.log", "a") as log:
        proc = start_prefect_server(prefect_port, log, env)
        try:
            if not wait_healthy(f"{api}/health", proc, 90):
                print(
                    f"turntree: error: could not start prefect (see {logs}/prefect-server.log)",
                    file=sys.stderr,
                )
                return 1
            print(
                f"Prefect UI: http://127.0.0.1:{prefect_port}   (export PREFECT_API_URL={api} to send runs there)"
            )
            print(
                f"MLflow UI:  {without_userinfo(os.environ['MLFLOW_TRACKING_URI'])}   (the tracking server in "
                "MLFLOW_TRACKING_URI)"
            )
            print("Ctrl-C stops the Prefect server.")
            while proc.poll() is None:
                time.sleep(1)
            return 1
        except KeyboardInterrupt:
            return 0
        finally:
            stop(proc)


STEP_ENTRYPOINT = "flows/step.py:stage_step"


PIPELINE_ENTRYPOINT = "flows/pipeline.py:pipeline"
MAIN_JOB = REPO / "configs" / "default.yaml"


def main_job_params() -> dict:
    """The main job's parameters (configs/default.yaml), as the pipeline deployment's defaults."""
    import yaml

    return yaml.safe_load(MAIN_JOB.read_text())


def deploy(pools: list[str], prefect_file: str) -> int:
    """Create each process work pool if missing (an existing pool of any type, e.g. Kubernetes, is kept), then
    `prefect deploy --all` with the repo as working dir: every deployment to the first pool, and the stage step
    (``step-<pool>``, where ``dispatch`` sends stages) to each further pool."""
    if not os.environ.get("PREFECT_API_URL"):
        print(
            "turntree: error: PREFECT_API_URL is not set: start a server (`turntree serve`) and export "
            "PREFECT_API_URL=http://127.0.0.1:4200/api",
            file=sys.stderr,
        )
        return 2
    import tempfile

    import yaml

    prefect = str(BIN / "prefect")
    config = yaml.safe_load(Path(prefect_file).read_text())
    for d in config["deployments"]:  # Quick run of the pipeline runs the main job (`make run`'s config)
        if d["entrypoint"] == PIPELINE_ENTRYPOINT:
            d.setdefault("parameters", {}).setdefault("params", main_job_params())
    steps_only = {
        **config,
        "deployments": [d for d in config["deployments"] if d["entrypoint"] == STEP_ENTRYPOINT],
    }
    with tempfile.TemporaryDirectory(prefix="turntree-deploy-") as tmp:
        step_file, main_file = Path(tmp) / "prefect.yaml", Path(tmp) / "main" / "prefect.yaml"
        step_file.write_text(yaml.safe_dump(steps_only, sort_keys=False))
        main_file.parent.mkdir()
        main_file.write_text(yaml.safe_dump(config, sort_keys=False))
        for i, pool in enumerate(dict.fromkeys(pools)):
            # TURNTREE_REPO: where the flow runs find the repository (the images' /opt/turntree when deploying
            # from a checkout elsewhere to a Kubernetes pool); default: this checkout.
            env = {
                **os.environ,
                "TURNTREE_REPO": os.environ.get("TURNTREE_REPO") or str(REPO),
                "TURNTREE_POOL": pool,
            }
            inspect = subprocess.run(
                [prefect, "work-pool", "inspect", pool], capture_output=True, text=True, env=env
            )
            if inspect.returncode != 0:
                subprocess.run(
                    [prefect, "work-pool", "create", pool, "--type", "process"], check=True, env=env
                )
            file = str(main_file) if i == 0 else str(step_file)
            res = subprocess.run(
                [prefect, "--no-prompt", "deploy", "--all", "--prefect-file", file], cwd=REPO, env=env
            )
            if res.returncode != 0:
                return res.returncode
            what = "deployments" if i == 0 else "the stage step"
            print(
                f"{what} registered to work pool {pool!r}; start a worker with "
                f"`PREFECT_API_URL={env.get('PREFECT_API_URL', '$PREFECT_API_URL')} {prefect} worker start --pool {pool}`"
            )
    return 0
