"""Checks the CLI runs before any work starts (before Prefect, MLflow or a model is loaded, before a run
directory exists): each bad input is one ``PreflightError`` line, which the CLI prints with exit status 2.

Light imports only (no prefect, torch, mlflow), so a refusal costs well under a second.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_WEIGHTS = ("*.safetensors", "*.bin", "*.pt", "*.gguf")
_MAX_PROBE_BYTES = 64 << 20  # read source files up to this size to see that they hold records


class PreflightError(ValueError):
    """Bad input, found before any work started."""


def is_remote(root: str) -> bool:
    return "://" in root and not root.startswith("file://")


def run_root(root: str) -> None:
    """A local run root must be a directory this user can write (or be creatable under one); a remote one
    (``s3://bucket/prefix``) needs a reachable tracking server, an existing bucket and conditional writes. Either
    way a configured tracking server must answer, and the root carries no credentials (``root_credentials``)."""
    root_credentials(root)
    tracking(root)
    if is_remote(root):
        from flows.remote import check_root

        why = check_root(root)
        if why:
            raise PreflightError(f"run_root {root}: {why}")
        return
    p = Path(root.removeprefix("file://")).expanduser().absolute()
    probe = p
    while not probe.exists():
        probe = probe.parent
    if probe != p and not probe.is_dir():
        raise PreflightError(f"run_root {root}: {probe} is a file, not a directory")
    if p.exists() and not p.is_dir():
        raise PreflightError(f"run_root {root} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PreflightError(f"run_root {root} is not writable ({probe} does not allow this user to write)")


def root_credentials(root: str) -> None:
    """A run root with credentials in it (``s3://KEY:SECRET@bucket/…``) is refused, without repeating them: they
    would be recorded wherever the root is (the manifest, MLflow, Prefect's parameters)."""
    from flows.uris import credentials_error

    why = credentials_error(root)
    if why:
        raise PreflightError(why)


def tracking(root: str) -> None:
    """Where MLflow tracking goes must be usable: a remote root needs ``MLFLOW_TRACKING_URI`` (no quiet local
    file), and an http(s) tracking server must answer its health check."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri:
        if is_remote(root):
            from flows.tracking import TrackingNotConfigured, tracking_uri

            try:
                tracking_uri(root)
            except TrackingNotConfigured as e:
                raise PreflightError(str(e)) from None
        return
    if uri.startswith(("http://", "https://")):
        import ssl
        import urllib.error
        import urllib.request

        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=10):
                pass
        except urllib.error.HTTPError:
            pass  # it answered (behind a proxy or auth, /health may not be 200): MLflow will say more
        except OSError as e:
            why = getattr(e, "reason", e)
            if not isinstance(why, ssl.SSLError):  # a private CA that MLflow is told about but urllib is not
                raise PreflightError(
                    f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is not reachable: {why}"
                ) from None


def run_id(value: str | None) -> None:
    if value is not None and not _RUN_ID.match(value):
        raise PreflightError(
            f"invalid run id {value!r}: use letters, digits, '.', '_' and '-' (not starting with '.' or '-')"
        )


def model(spec: str, what: str = "model") -> None:
    """A prepared model name or a directory with config.json and weights."""
    from runtime.models import PREPARERS

    if spec in PREPARERS:
        return
    p = Path(spec).expanduser()
    if not p.exists():
        raise PreflightError(
            f"{what} {spec} does not exist (use {' or '.join(sorted(PREPARERS))} or a model dir)"
        )
    if not p.is_dir():
        raise PreflightError(f"{what} {spec} is a file, not a model directory")
    if not (p / "config.json").is_file():
        raise PreflightError(f"{what} {spec} is not a model directory (no config.json)")
    if (p / "WEIGHTS_PRUNED.json").is_file():  # runtime.checkpoint.WEIGHTS_PRUNED (not imported: torch)
        raise PreflightError(
            f"{what} {spec}: its weights were removed by `turntree prune --weights`; use the run's final checkpoint"
        )
    if not any(next(p.glob(g), None) for g in _WEIGHTS):
        raise PreflightError(f"{what} {spec} has no weights (no *.safetensors / *.bin file)")


def benchmark(params: Any) -> None:
    """``turntree eval`` / ``compare``: the benchmark names a known set, a synthetic family or a file (the
    evaluation's own resolution, ``stages.evaluate._source_for``, run before any work)."""
    if params.benchmark == "heldout":
        return
    from stages.evaluate import _source_for

    try:
        source, _ = _source_for(params)
    except (ValueError, FileNotFoundError) as e:
        raise PreflightError(str(e)) from None
    if source.startswith("synthetic:"):
        sources([source])


def sources(specs: list[str]) -> None:
    """Every data source resolves: a named set whose file is there, a known synthetic family, hf:<name>, or a
    non-empty file of records."""
    from stages.data.sources import ALIASES, DataError, alias_path, read_records
    from stages.data.synthetic import FAMILIES

    if not specs:
        raise PreflightError("data.sources is empty: name at least one source")
    for spec in specs:
        try:
            if spec in ALIASES:
                alias_path(ALIASES[spec], spec)
            elif spec.startswith("synthetic:"):
                family = spec.split(":", 1)[1]
                if family not in FAMILIES:
                    raise DataError(f"unknown synthetic family {family!r}; choose one of {sorted(FAMILIES)}")
            elif spec.startswith("hf:"):
                if len(spec) <= 3:
                    raise DataError("hub source 'hf:' names no dataset: use hf:<name>[:<split>]")
            else:
                p = Path(spec).expanduser()
                if not p.is_file():
                    raise DataError(
                        f"unknown data source {spec!r}: not a file, a known set ({', '.join(sorted(ALIASES))}), "
                        "synthetic:<family> or hf:<name>"
                    )
                if p.stat().st_size == 0:
                    raise DataError(f"data source {spec} is an empty file")
                if p.stat().st_size <= _MAX_PROBE_BYTES and not read_records(p)[0]:
                    raise DataError(f"data source {spec} holds no records")
        except DataError as e:
            raise PreflightError(str(e)) from None


def pipeline(params: Any) -> str:
    """Everything a ``turntree run`` needs, checked before Prefect starts (``params``: PipelineParams); returns
    the run id."""
    from flows.runner import default_run_id

    root_credentials(params.run_root)  # first: every later message may name the root
    ray_cluster(params)
    run_root(params.run_root)
    run_id(params.run_id)
    model(params.model)
    sources(list(params.data.sources))
    rid = params.run_id or default_run_id(params)
    dispatch(params)
    existing_run(params.run_root, rid, params.identity())
    return rid


def study_file(path: str, sets: list[str], root: str) -> tuple[Any, str, list[Any]]:
    """``turntree study``: the study file (with ``--set`` overrides) and its cells (``stages.study.plan.load``),
    then each cell as a run (``study``); returns (StudyParams, name, cells). ``--set methods=[…]`` may name the
    file's own variants (``stages.study.plan.named_methods``)."""
    from flows.config import load_config
    from stages.study.plan import StudyError, load, named_methods

    try:
        data = named_methods(load_config(path, sets), load_config(path, []))
        found = load(data, Path(path).stem, root)
    except StudyError as e:
        raise PreflightError(f"study {path}: {e}") from None
    study(found[2])
    return found


def study(cells: list[Any]) -> None:
    """``turntree study``: every cell (``stages.study.plan.Cell``) passes a run's checks, and a cell whose run
    exists was made with the same parameters (else the study file changed under it)."""
    done: set[tuple] = set()

    def once(key: tuple, check, *args) -> None:  # cells share most of their inputs: check each once
        if key not in done:
            done.add(key)
            check(*args)

    for c in cells:
        p = c.params
        once(("root", p.run_root), run_root, p.run_root)
        once(("model", p.model), model, p.model)
        once(("sources", *p.data.sources), sources, list(p.data.sources))
        once(("ray", p.rollout.workers, p.rollout.ray_address, p.score.sandbox_ray), ray_cluster, p)
        once(("dispatch", p.run_root, p.dispatch.model_dump_json()), dispatch, p)
        try:
            existing_run(p.run_root, c.run_id, p.identity())
        except PreflightError:
            raise PreflightError(
                f"study cell {c.run_id}: its run exists with other parameters (the study file changed since it "
                "ran); give the study another name: (a new set of runs), or remove that run"
            ) from None


def ray_cluster(params: Any) -> None:
    """With ``rollout.workers`` > 1 or ``score.sandbox_ray``: Ray is installed and a configured cluster address
    (``rollout.ray_address`` or RAY_ADDRESS) answers (``runtime.rayfan``; no Ray import here)."""
    import importlib.util

    from runtime.rayfan import RayUnavailable, probe

    if params.rollout.workers <= 1 and not params.score.sandbox_ray:
        return
    if importlib.util.find_spec("ray") is None:
        raise PreflightError(
            "rollout.workers > 1 / score.sandbox_ray need Ray: install turntree's 'ray' extra"
        )
    address = params.rollout.ray_address or os.environ.get("RAY_ADDRESS")
    if address:
        try:
            probe(address)
        except RayUnavailable as e:
            raise PreflightError(str(e)) from None


def existing_run(root: str, rid: str, params: dict[str, Any]) -> None:
    """A run id that exists must have been made with the same parameters."""
    from flows.runstore import RunStore, same_run

    store = RunStore(root, rid)
    if store.exists() and not same_run(store.load().get("params"), params):
        raise PreflightError(
            f"run {rid!r} exists with different parameters; pick another run id (--set run_id=…) or rerun "
            "single stages with `turntree stage`"
        )


def stage(root: str, rid: str, name: str, record: dict[str, Any], overrides: dict[str, Any]) -> None:
    """``turntree stage``: the ``--set`` overrides must validate for the stage, and the stored inputs it will
    read must still be what their stages committed (else: the file and the command that rewrites it)."""
    from flows.integrity import IntegrityError
    from flows.runner import check_inputs, stage_params
    from flows.runstore import RunStore, parse_key

    tracking(root)
    stage_params(name, record["params"], overrides)  # the stage flow's own check, before Prefect starts
    store = RunStore(root, rid)
    inputs = store.current_inputs(record["inputs"])[0]  # what the rerun will read
    try:
        check_inputs(store, inputs)
    except IntegrityError as e:
        raise PreflightError(str(e)) from None
    items = store.load().get("pruned", [])
    for uri in {u for u in inputs.values() if isinstance(u, str)} & {p["uri"] for p in items if p.get("kind") == "weights"}:
        raise PreflightError(
            f"the checkpoint this {name} reads ({uri}) had its weights removed (turntree prune --weights); "
            "only a run's warm start and final checkpoint keep theirs"
        )
    pruned = {p["uri"]: p["stage"] for p in items if p.get("kind", "optimizer") == "optimizer"}
    if name == "update" and inputs.get("checkpoint") in pruned:  # flows/prune.py: AdamW cannot continue
        k = parse_key(pruned[inputs["checkpoint"]])[1]
        raise PreflightError(
            f"the checkpoint this update continues ({inputs['checkpoint']}) had its optimizer state pruned "
            f"(turntree prune); rerun that update first: turntree stage update --run {rid} --iter {k}"
        )


def compare_entries(root: str, entries: list[str]) -> dict[str, str]:
    """NAME=TARGET pairs, each TARGET a run with a final checkpoint, a prepared model name or a model dir."""
    from flows.runstore import RunStore

    out: dict[str, str] = {}
    for item in entries:
        name, sep, target = item.partition("=")
        if not sep or not name or not target:
            raise PreflightError(f"compare expects NAME=CHECKPOINT_OR_RUN_ID, got {item!r}")
        if _RUN_ID.match(target) and RunStore(root, target).exists():
            m = RunStore(root, target).load()
            if not m.get("final_checkpoint"):
                raise PreflightError(
                    f"compare entry {name}: run {target!r} has no final checkpoint (status {m.get('status')!r})"
                )
        else:
            from runtime.models import PREPARERS

            looks_like_path = "/" in target or Path(target).exists()
            if target not in PREPARERS and not looks_like_path:
                raise PreflightError(
                    f"compare entry {name}: no run {target!r} under {root} (`turntree runs` lists them)"
                )
            model(target, f"compare entry {name}:")
        out[name] = target
    return out


def dispatch(params: Any) -> None:
    """``dispatch``: the stages it puts on work pools need a Prefect server the workers reach, a run root they
    see at the same path, and on each pool its stage-step deployment (``turntree deploy --pool <pool>``)."""
    from stages import PIPELINE_STAGES

    pools = params.dispatch.used_pools(PIPELINE_STAGES)
    if not pools:
        return
    if not is_remote(params.run_root) and not Path(params.run_root.removeprefix("file://")).is_absolute():
        raise PreflightError(
            f"dispatch: run_root {params.run_root!r} is relative; give a path the workers see too (--root /abs/path)"
        )
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    if not url:
        raise PreflightError(
            "dispatch needs a Prefect server the workers poll: start one (`turntree serve`) and export "
            "PREFECT_API_URL=http://HOST:4200/api"
        )
    import urllib.request

    try:
        with urllib.request.urlopen(f"{url.rstrip('/')}/health", timeout=10):
            pass
    except OSError as e:
        raise PreflightError(f"dispatch: the Prefect server at {url} does not answer ({e})") from None
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        for pool in pools:
            try:
                client.read_work_pool(pool)
            except ObjectNotFound:
                have = ", ".join(sorted(p.name for p in client.read_work_pools())) or "none"
                raise PreflightError(
                    f"dispatch: no work pool {pool!r} on the Prefect server at {url} (pools: {have}); create "
                    f"it and register the stage step with `turntree deploy --pool {pool}`"
                ) from None
            try:
                client.read_deployment_by_name(params.dispatch.deployment(pool))
            except ObjectNotFound:
                raise PreflightError(
                    f"dispatch: work pool {pool!r} has no stage-step deployment "
                    f"{params.dispatch.deployment(pool)!r}; register it with `turntree deploy --pool {pool}`"
                ) from None
