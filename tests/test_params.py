"""The composed pipeline parameters: algorithm-implied modes, defaults in one place, a renderable form."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from schemas.params import PipelineParams


def test_algorithm_sets_rollout_kind_and_estimator():
    assert (
        PipelineParams(algorithm="murphy").rollout.kind,
        PipelineParams(algorithm="murphy").advantages.estimator,
    ) == ("trees", "murphy")
    assert PipelineParams(algorithm="gtpo").advantages.estimator == "gtpo"
    assert PipelineParams(algorithm="grpo").advantages.estimator == "grpo"
    dr = PipelineParams.model_validate({"algorithm": "grpo", "advantages": {"estimator": "dr_grpo"}})
    assert dr.advantages.estimator == "dr_grpo" and dr.rollout.kind == "trajectories"
    with pytest.raises(ValidationError, match="needs algorithm 'murphy'"):
        PipelineParams.model_validate({"algorithm": "gtpo", "advantages": {"estimator": "murphy"}})


def test_pipeline_evaluates_its_own_heldout_problems_unless_told_otherwise():
    assert PipelineParams().eval.benchmark == "heldout"
    assert PipelineParams.model_validate({"eval": {"max_problems": 3}}).eval.benchmark == "heldout"
    assert PipelineParams.model_validate({"eval": {"benchmark": "gsm8k"}}).eval.benchmark == "gsm8k"


def test_unknown_keys_and_out_of_bounds_values_are_refused():
    with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
        PipelineParams.model_validate({"rollout": {"group_sz": 3}})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        PipelineParams.model_validate({"iterations": 0})


def test_json_schema_documents_every_field():
    """Prefect renders the flow's parameter form from this schema: every leaf field has a description."""
    schema = PipelineParams.model_json_schema()
    missing = []
    for name, model in schema["$defs"].items():
        for field, spec in model.get("properties", {}).items():
            if "description" not in spec:
                missing.append(f"{name}.{field}")
    assert not missing, f"fields without a description: {missing}"
    assert schema["properties"]["algorithm"]["enum"] == ["grpo", "gtpo", "murphy"]


def test_shipped_configs_are_valid_pipeline_parameters():
    """configs/*.yaml (the main job and the learning recipes) load as they are, with no unknown key."""
    from pathlib import Path

    from flows.config import load_config

    configs = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
    assert {c.name for c in configs} >= {"default.yaml", "gtpo-tool-arith.yaml", "grpo-tool-arith.yaml"}
    for c in configs:
        p = PipelineParams.model_validate(load_config(str(c), []))
        assert p.model == "smollm2" and p.warmstart.enabled, c.name
    default = PipelineParams.model_validate(load_config(str(configs[0].parent / "default.yaml"), []))
    assert default.algorithm == "gtpo" and default.iterations >= 3 and default.rollout.group_size == 8
