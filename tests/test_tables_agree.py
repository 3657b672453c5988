"""The one-table rule (issue 25): stages and benchmarks are each defined once, and everything that lists them
derives from that table; these fail when a stage or a benchmark is added in one place only."""

from __future__ import annotations

import importlib
import inspect
from typing import get_args

import pytest
from pydantic import BaseModel

from flows.cli import main
from schemas.benchmarks import BENCHMARKS, benchmark_names
from schemas.params import EvalParams, PipelineParams
from schemas.params.pipeline import StageName
from stages import PIPELINE_STAGES, STAGES


@pytest.mark.parametrize("name", PIPELINE_STAGES)
def test_each_pipeline_stage_is_complete(name):
    """A row in stages.STAGES needs: its module with run(), its parameters' field in PipelineParams (a model),
    its name in StageName (the Prefect form's choice), and a call in the pipeline's loop."""
    from flows import pipeline

    spec = STAGES[name]
    assert callable(importlib.import_module(spec.module).run)
    field = PipelineParams.model_fields[spec.params]
    assert issubclass(field.annotation, BaseModel)
    assert spec.params_model is field.annotation  # the row carries its model
    assert name in get_args(StageName)
    assert f'"{name}"' in inspect.getsource(pipeline.drive), f"flows.pipeline.drive never calls {name!r}"


def test_derived_lists_follow_the_stage_table(capsys):
    from flows.console import TIMED

    assert get_args(StageName) == PIPELINE_STAGES  # same stages, same order
    assert TIMED == tuple(s for s in PIPELINE_STAGES if s != "data")
    with pytest.raises(SystemExit):
        main(["stage", "--help"])
    assert " | ".join(PIPELINE_STAGES) in " ".join(capsys.readouterr().out.split())


def test_every_params_section_has_a_stage_row():
    """A new section of PipelineParams without a row in stages.STAGES is a stage added in one place only;
    ``dispatch`` says where stages run (local, Ray, pods), not a step of its own."""
    sections = {k for k, f in PipelineParams.model_fields.items() if inspect.isclass(f.annotation)}
    sections = {k for k in sections if issubclass(PipelineParams.model_fields[k].annotation, BaseModel)}
    assert sections - {s.params for s in STAGES.values()} == {"dispatch"}


@pytest.mark.parametrize("name", benchmark_names(listed_only=False))
def test_every_benchmark_loads_and_is_evaluable_by_name(name):
    from stages.data import ALIASES, load_source
    from stages.evaluate import _source_for

    assert name in ALIASES
    source, _ = _source_for(EvalParams(benchmark=name))
    assert load_source(source).rows, name
    assert name in EvalParams.model_fields["benchmark"].description
    assert name in PipelineParams.model_fields["data"].annotation.model_fields["sources"].description


def test_data_list_names_every_benchmark_with_its_rows(capsys):
    assert main(["data", "list"]) == 0
    lines = {line.split()[0]: line.split() for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(BENCHMARKS) <= set(lines)
    assert lines["gsm8k:test"][1] == "1319" and lines["mbpp"][1] == "974" and lines["humaneval"][1] == "164"
    assert {"synthetic:tool-arith", "synthetic:func-synth"} <= set(lines)
