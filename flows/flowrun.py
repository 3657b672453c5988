"""The pipeline's flow run in Prefect: its name (the one a user typed, else the turntree run id) and its tags
(algorithm, model, run id: filterable in the UI)."""

from __future__ import annotations

import logging

from flows.runner import RunContext, default_run_id
from schemas.params import PipelineParams

log = logging.getLogger("turntree.pipeline")


def run_name() -> str:
    """The flow run's name: the name a user typed in the run form, else the turntree run id (so Prefect's and
    turntree's names of a run agree; the run id is always a tag, ``run:<id>``)."""
    from prefect.runtime import flow_run

    p = flow_run.parameters.get("params")
    p = p if isinstance(p, PipelineParams) else PipelineParams.model_validate(p or {})
    given = flow_run.name
    return given if given and not generated_name(given) else p.run_id or default_run_id(p)


def generated_name(name: str) -> bool:
    """Prefect's own name for a flow run nobody named: adjective-animal (coolname's two-word slugs)."""
    import re
    from importlib import resources

    parts = name.split("-")
    if len(parts) != 2 or not re.fullmatch(r"[a-z]+-[a-z]+", name):
        return False
    data = resources.files("coolname") / "data"
    animals = {
        w.strip()
        for f in data.iterdir()
        if f.name.startswith("animal") and f.name.endswith(".txt")
        for w in f.read_text().splitlines()
    }
    return parts[1] in animals


def tag_flow_run(ctx: RunContext, params: PipelineParams) -> None:
    """Tag the flow run with the algorithm, the model and the run id (filterable in the Prefect UI)."""
    from prefect.client.orchestration import get_client

    if ctx.flow_run_id == "none":
        return
    model = params.model.rstrip("/").rsplit("/", 1)[-1]
    tags = [f"algorithm:{params.algorithm}", f"model:{model}", f"run:{ctx.run_id}"]
    try:
        with get_client(sync_client=True) as client:
            current = client.read_flow_run(ctx.flow_run_id).tags or []
            client.update_flow_run(ctx.flow_run_id, tags=sorted({*current, *tags}))
    except Exception as e:  # tags are a convenience: never fail a run over them
        log.warning("could not tag flow run %s: %s", ctx.flow_run_id, e)
