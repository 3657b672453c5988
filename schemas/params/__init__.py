"""Pydantic parameter models, one module per stage, composed into ``PipelineParams``.

Every field has a description and bounds or ``Literal`` choices so Prefect renders a validated form.
Defaults live here and nowhere else.
"""

from schemas.params.data import DataParams
from schemas.params.evaluate import EvalParams
from schemas.params.pipeline import DispatchParams, PipelineParams, StageName
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.params.rollout import RolloutParams
from schemas.params.study import StudyMethod, StudyParams
from schemas.params.update import UpdateParams, WarmstartParams

__all__ = [
    "AdvantageParams",
    "DataParams",
    "DispatchParams",
    "EvalParams",
    "PipelineParams",
    "RolloutParams",
    "ScoreParams",
    "StageName",
    "StudyMethod",
    "StudyParams",
    "UpdateParams",
    "WarmstartParams",
]
