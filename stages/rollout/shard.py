"""One rollout over a list of problems on one engine: what the stage runs in its own process, and what every
Ray engine actor of ``stages.rollout.fanout`` runs on its shard (same code, so the same rows).

    engine = build_engine(params, checkpoint)
    rows, stats = rollout_rows(engine, problems, params, iteration)
"""

from __future__ import annotations

from maths import prompts
from runtime.engines import SamplingSpec
from schemas.params.rollout import RolloutParams
from stages.rollout.seeding import RequestSeeded
from stages.rollout.tir import TirStats, tir_trajectories
from stages.rollout.tree import TreeStats, refinement_trees


def build_engine(params: RolloutParams, checkpoint: str):
    """This process's engine for ``checkpoint`` (reused, or weights pushed into a live one of the same
    architecture: ``runtime.engines.engine_for``); ``dtype`` when not auto, and tensor/data-parallel sizes when
    above 1, go to the engine."""
    from runtime.engines import engine_for
    from runtime.models import resolve_model

    options: dict = {"prefix_caching": params.prefix_caching}
    if params.dtype != "auto":
        options["dtype"] = params.dtype
    if params.backend == "vllm":
        options["kv_cache_gib"] = params.kv_cache_gib
        if params.tensor_parallel_size > 1:
            options["tensor_parallel_size"] = params.tensor_parallel_size
        if params.data_parallel_size > 1:
            options["data_parallel_size"] = params.data_parallel_size
    return engine_for(resolve_model(checkpoint), backend=params.backend, seed=params.seed, **options)


def base_seed(params: RolloutParams, iteration: int) -> int:
    return params.seed * 1_000_003 + iteration * 10_007


def sampling_spec(params: RolloutParams, stop: list[str], iteration: int) -> SamplingSpec:
    return SamplingSpec(
        n=1,
        temperature=params.temperature,
        top_p=params.top_p,
        max_tokens=params.max_new_tokens,
        stop=stop,
        seed=base_seed(params, iteration),
    )


def rollout_rows(
    engine,
    problems: list[dict],
    params: RolloutParams,
    iteration: int,
    progress_stage: str | None = "rollout",
    positions: list[int] | None = None,
) -> tuple[list[dict], TirStats | TreeStats]:
    """Rows of the rollout table (``params.kind``) for ``problems`` and the loop's statistics.
    ``positions``: where ``problems`` sit in the stage's problem list (a Ray shard's problems)."""
    limit = min(params.max_context_tokens, engine.max_model_len)
    if params.request_seeding:
        engine = RequestSeeded(engine, base_seed(params, iteration))
    prefix = f"it{iteration}/"
    if params.kind == "trajectories":
        stats = TirStats()
        rows = tir_trajectories(
            engine,
            problems,
            group_size=params.group_size,
            max_turns=params.max_turns,
            spec=sampling_spec(params, list(prompts.TIR_STOP), iteration),
            max_context_tokens=limit,
            observation_max_chars=params.observation_max_chars,
            exec_timeout_s=params.exec_timeout_s,
            group_prefix=prefix,
            stats=stats,
            progress_stage=progress_stage,
            positions=positions,
        )
        return rows, stats
    stats = TreeStats()
    rows = refinement_trees(
        engine,
        problems,
        group_size=params.group_size,
        child_group_size=params.child_group_size,
        depth=params.tree_depth,
        spec=sampling_spec(params, list(prompts.CODE_STOP) if params.stop_after_code else [], iteration),
        max_nodes_per_tree=params.max_nodes_per_tree,
        max_nodes_per_batch=params.max_nodes_per_batch,
        max_context_tokens=limit,
        feedback_max_chars=params.observation_max_chars,
        exec_timeout_s=params.exec_timeout_s,
        id_prefix=prefix,
        stats=stats,
        progress_stage=progress_stage,
    )
    return rows, stats
