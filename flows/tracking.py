"""MLflow tracking for pipeline runs: one parent run per pipeline run, one child run per stage invocation.

Uses ``MlflowClient`` with explicit run ids (no fluent active-run stack, which is thread-local and would tangle
with Prefect's task threads). Tracking URI: ``MLFLOW_TRACKING_URI`` when set, else a SQLite file under a local
run root (``<root>/mlflow.db``) with artifacts beside it. A remote run root (``s3://…``) has no local place for
that file: it needs ``MLFLOW_TRACKING_URI`` (a tracking server), and without one ``tracking_uri`` refuses
(``flows.preflight`` says so before any work starts) instead of tracking into a file on whichever machine ran it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from flows.locks import pid_alive
from flows.uris import redact, redact_all, without_userinfo

log = logging.getLogger("turntree.tracking")
EXPERIMENT = "turntree"  # training runs
EVAL_EXPERIMENT = "turntree-evaluation"  # `turntree eval` and `turntree compare`
KIND_TAG = "mlflow.experimentKind"
# the MLflow UI (3.x) opens in its GenAI mode unless a link asks for the model-training one (runs, models)
UI_MODE = "workflowType=machine_learning"
TRANSCRIPT_ROWS = 50  # trajectories / trees per logged transcript table
# tiny tables (sample rows) are logged with log_table; these columns hold token arrays nobody reads there
_HEAVY = ("token_ids", "logprobs", "input_ids", "loss_mask", "advantages", "turns", "nodes")


class TrackingNotConfigured(ValueError):
    """A remote run root without a tracking server to go with it."""


def tracking_uri(run_root: str) -> str:
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    if "://" in run_root and not run_root.startswith("file://"):
        raise TrackingNotConfigured(
            f"run_root {run_root} is remote but MLFLOW_TRACKING_URI is not set: point it at your MLflow tracking "
            "server (e.g. export MLFLOW_TRACKING_URI=http://mlflow:5000); a remote run is not tracked in a local file"
        )
    root = Path(run_root.removeprefix("file://"))
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root.resolve()}/mlflow.db"


def ui_base() -> str:
    """Where the MLflow UI is, when known: TURNTREE_MLFLOW_UI, else a tracking server (MLFLOW_TRACKING_URI
    http(s)://…, which serves its UI too); "" otherwise."""
    ui = os.environ.get("TURNTREE_MLFLOW_UI", "")
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    # a link is printed and recorded (Prefect's run summary): never with the credentials of the URI it came from
    return without_userinfo(ui or (uri if uri.startswith(("http://", "https://")) else "")).rstrip("/")


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"a": {"b": 1}} -> {"a.b": "1"} (MLflow params are flat strings, at most 6000 chars)."""
    out: dict[str, str] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = (json.dumps(v) if isinstance(v, list | tuple) else str(v))[:6000]
    return out


class Tracker:
    """Thin wrapper over MlflowClient bound to one tracking URI and experiment. What it logs (parameters, tags,
    dicts, texts) has the credentials of any URI in it redacted (``flows.uris``); ``uri`` is the tracking URI
    as it may be recorded or shown (its password redacted), ``store_uri`` the one the client uses."""

    def __init__(self, run_root: str, experiment: str = EXPERIMENT):
        from mlflow import MlflowClient

        self.store_uri = tracking_uri(run_root)
        self.uri = redact(self.store_uri)
        # no mlflow.set_tracking_uri: it exports MLFLOW_TRACKING_URI, which would then override the next run
        # root's store in this process (and in every child process)
        self.client = MlflowClient(self.store_uri)
        exp = self.client.get_experiment_by_name(experiment)
        if exp is None:
            art = None
            if self.store_uri.startswith("sqlite:///"):
                art = Path(self.store_uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
            self.experiment_id = self.client.create_experiment(experiment, artifact_location=art)
        else:
            self.experiment_id = exp.experiment_id
        if exp is None or KIND_TAG not in exp.tags:  # open on the runs table, not the GenAI traces view
            self.client.set_experiment_tag(self.experiment_id, KIND_TAG, "custom_model_development")

    # --- runs -----------------------------------------------------------------------------------------
    def start_parent(self, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        run = self.client.create_run(self.experiment_id, run_name=name, tags=redact_all(tags))
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def start_child(self, parent_id: str, name: str, params: dict[str, Any], tags: dict[str, str]) -> str:
        """A run nested under ``parent_id``, in the parent's experiment (training or evaluation)."""
        experiment = self.client.get_run(parent_id).info.experiment_id
        tags = {**writer_tags(), **tags, "mlflow.parentRunId": parent_id}
        run = self.client.create_run(experiment, run_name=name, tags=redact_all(tags))
        self.log_params(run.info.run_id, params)
        return run.info.run_id

    def set_tags(self, run_id: str, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in redact_all(tags).items()])

    def rename(self, run_id: str, name: str) -> None:
        self.client.update_run(run_id, name=name)

    def end(self, run_id: str, status: str = "FINISHED") -> None:
        self.client.set_terminated(run_id, status=status)

    def end_stale(self, experiment_id: str, filter_string: str, why: str) -> list[str]:
        """End as KILLED the runs of ``experiment_id`` matching ``filter_string`` that are still RUNNING and whose
        writer is gone (a SIGKILLed process never closes its MLflow runs), with ``why`` in their
        ``turntree.ended_by`` tag; their ids. Gone: the run's ``writer_tags`` name this host and a process that no
        longer exists. A run written on another host (a dispatched stage on a worker), or without those tags,
        is left as it is: it may be live."""
        running = f"{filter_string} and attributes.status = 'RUNNING'"
        found = self.client.search_runs([experiment_id], filter_string=running, max_results=1000)
        gone = [run.info.run_id for run in found if _writer_gone(run.data.tags)]
        for run_id in gone:
            self.set_tags(run_id, {"turntree.ended_by": why})
            self.client.set_terminated(run_id, status="KILLED")
        return gone

    def experiment_url(self) -> str:
        """The experiment's runs in the MLflow UI's Model training view."""
        base = ui_base() or "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}?{UI_MODE}"

    def run_url(self, run_id: str) -> str:
        """The run's page in the MLflow UI: ``ui_base()``, else the one `turntree serve` starts."""
        base = ui_base() or "http://127.0.0.1:5000"
        return f"{base.rstrip('/')}/#/experiments/{self.experiment_id}/runs/{run_id}?{UI_MODE}"

    # --- logging --------------------------------------------------------------------------------------
    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        flat = flatten(redact_all(params))
        items = [Param(k, v) for k, v in sorted(flat.items())]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items()) if _finite(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_dict(self, run_id: str, data: dict[str, Any], name: str) -> None:
        self.client.log_dict(run_id, redact_all(data), name)

    def log_text(self, run_id: str, text: str, name: str) -> None:
        self.client.log_text(run_id, redact(text), name)

    def log_artifact(self, run_id: str, path: str, artifact_path: str | None = None) -> None:
        self.client.log_artifact(run_id, path, artifact_path)

    def log_sample_table(self, run_id: str, uri: str, name: str, rows: int = 20) -> None:
        """First ``rows`` rows of a stored table, token arrays left out, as an MLflow table artifact."""
        import pyarrow.parquet as pq

        table = pq.read_table(uri).slice(0, rows)
        keep = [c for c in table.column_names if not any(h in c for h in _HEAVY)]
        df = table.select(keep).to_pandas()
        for col in df.columns:
            if df[col].dtype == object:
                df[col] = df[col].map(
                    lambda v: v if isinstance(v, str | type(None)) else json.dumps(v, default=str)
                )
        self.client.log_table(run_id, df, f"samples/{name}.json")

    def log_bytes(self, run_id: str, data: bytes, name: str) -> None:
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / Path(name).name
            path.write_bytes(data)
            parent = str(Path(name).parent)
            self.client.log_artifact(run_id, str(path), None if parent == "." else parent)

    @contextlib.contextmanager
    def system_metrics(self, run_id: str, every_s: float = 10.0) -> Iterator[None]:
        """MLflow system metrics (CPU, memory, disk, network; GPU when present) of this process's machine on the
        run while the block runs, every ``every_s`` seconds (the System metrics tab)."""
        try:
            from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

            monitor = SystemMetricsMonitor(
                run_id, sampling_interval=every_s, resume_logging=True, tracking_uri=self.store_uri
            )
            monitor.start()
        except Exception as e:  # psutil missing, or the store refuses: the run goes on without them
            log.warning("MLflow system metrics are off: %s", e)
            monitor = None
        try:
            yield
        finally:
            if monitor is not None:
                with contextlib.suppress(Exception):
                    monitor.finish()
                    # and a last sample: MLflow's loop publishes only after a full interval, so a run shorter
                    # than one (or the tail of a longer one) would otherwise leave nothing
                    monitor.collect_metrics()
                    monitor.publish_metrics(monitor.aggregate_metrics())
                    monitor.mlflow_logger.flush()

    def log_rows(self, run_id: str, rows: list[dict[str, Any]], name: str) -> None:
        """``rows`` (dicts of one set of keys) as an MLflow table artifact."""
        import pandas as pd

        self.client.log_table(run_id, pd.DataFrame(rows), name)

    def artifact_url(self, run_id: str, path: str) -> str:
        """An artifact's page in the MLflow UI."""
        base = (ui_base() or "http://127.0.0.1:5000").rstrip("/")
        return f"{base}/#/experiments/{self.experiment_id}/runs/{run_id}/artifacts/{path}"

    def log_dataset(self, run_id: str, uri: str, name: str, context: str, split: str | None = None) -> None:
        """The table at ``uri`` (only its rows of ``split``, when given) as an MLflow dataset input."""
        import warnings

        import mlflow.data
        import pyarrow.parquet as pq
        from mlflow.entities import DatasetInput, InputTag

        df = pq.read_table(uri).to_pandas()
        if split is not None:
            df = df[df["split"] == split].reset_index(drop=True)
        with (
            warnings.catch_warnings()
        ):  # MLflow registers its local-file source twice and warns it is ambiguous
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            ds = mlflow.data.from_pandas(df, source=uri, name=name)
        tag = InputTag(key="mlflow.data.context", value=context)
        self.client.log_inputs(run_id, datasets=[DatasetInput(dataset=ds._to_mlflow_entity(), tags=[tag])])

    def log_transcripts(self, run_id: str, uri: str, name: str, rows: int = TRANSCRIPT_ROWS) -> None:
        """The first ``rows`` trajectories turn by turn (text, code, observation, turn reward) or trees node
        by node (attempt, feedback, tests, reward), as an MLflow table to read in the UI."""
        import pandas as pd
        import pyarrow.parquet as pq

        records = []
        for row in pq.read_table(uri).slice(0, rows).to_pylist():
            if "turns" in row:
                for t in row["turns"]:
                    records.append(
                        {
                            "trajectory_id": row["trajectory_id"],
                            "turn": t["turn_idx"],
                            "text": t.get("text"),
                            "code": t.get("code"),
                            "tool_call": t.get("tool_call"),
                            "exec_status": t.get("exec_status"),
                            "observation": t.get("exec_output"),
                            "turn_reward": t.get("turn_reward"),
                            "reward": row.get("reward"),
                            "correct": row.get("correct"),
                        }
                    )
            elif "nodes" in row:
                for n in row["nodes"]:
                    records.append(
                        {
                            "tree_id": row["tree_id"],
                            "node_id": n["node_id"],
                            "parent_id": n["parent_id"],
                            "depth": n["depth"],
                            "text": n.get("text"),
                            "code": n.get("code"),
                            "feedback": n.get("exec_result"),
                            "tests": f"{n.get('tests_passed')}/{n.get('tests_total')}",
                            "reward": n.get("reward"),
                            "return": n.get("ret"),
                        }
                    )
        if records:
            self.client.log_table(run_id, pd.DataFrame(records), f"transcripts/{name}.json")

    def log_steps(self, run_id: str, records: list[dict[str, Any]], prefix: str = "train/") -> None:
        """Per-optimizer-step records (``step``: the global step) as metrics on that step."""
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [
            Metric(f"{prefix}{k}", float(v), now, int(r["step"]))
            for r in records
            for k, v in sorted(r.items())
            if k != "step" and _finite(v)
        ]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def log_model_card(self, run_id: str, checkpoint: str, card: str, stored_at: str | None = None) -> None:
        """A checkpoint as a model artifact: its card, its config and where its weights are stored
        (``stored_at``: the URI, when ``checkpoint`` is a local copy of a remote one)."""
        self.log_text(run_id, card, "model/README.md")
        files = sorted(p.name for p in Path(checkpoint).iterdir()) if Path(checkpoint).is_dir() else []
        self.log_dict(
            run_id, {"checkpoint": stored_at or checkpoint, "files": files}, "model/checkpoint.json"
        )
        config = Path(checkpoint) / "config.json"
        if config.is_file():
            self.log_artifact(run_id, str(config), "model")

    def register(self, name: str, source: str, run_id: str, description: str, tags: dict[str, str]) -> str:
        """A new version of registered model ``name`` (created if missing) whose source is ``source``."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.create_registered_model(name, description="turntree policies (see each version)")
        except MlflowException as e:
            if "already exists" not in str(e).lower() and "RESOURCE_ALREADY_EXISTS" not in str(e):
                raise
        version = self.client.create_model_version(
            name, source=source, run_id=run_id, description=description, tags=tags
        )
        return str(version.version)


def writer_tags() -> dict[str, str]:
    """Which process writes a run (``end_stale`` ends a RUNNING run only when that process is gone)."""
    return {"turntree.host": socket.gethostname(), "turntree.pid": str(os.getpid())}


def _writer_gone(tags: dict[str, str]) -> bool:
    pid = tags.get("turntree.pid", "")
    return tags.get("turntree.host") == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid))


def _finite(v: Any) -> bool:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return False
    return f == f and f not in (float("inf"), float("-inf"))
