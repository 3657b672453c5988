"""The algorithm table: what each ``PipelineParams.algorithm`` means for the rest of the pipeline.

One row per algorithm: the rollout kind it needs (the name of the table the rollout writes, used everywhere for
"which kind of rollout": ``trajectories`` = multi-turn tool-integrated trajectories, ``trees`` = MURPHY
feedback trees) and the advantage estimators it accepts, the first being the one it picks when the configured
estimator does not fit. Adding an algorithm is one row here (and its estimator in ``maths.estimators``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RolloutKind = Literal["trajectories", "trees"]
AlgorithmName = Literal["grpo", "gtpo", "murphy"]


@dataclass(frozen=True)
class Algorithm:
    name: str
    rollout: RolloutKind
    estimators: tuple[str, ...]  # accepted estimators; the first is the default
    description: str

    @property
    def default_estimator(self) -> str:
        return self.estimators[0]


ALGORITHMS: dict[str, Algorithm] = {
    a.name: a
    for a in (
        Algorithm("grpo", "trajectories", ("grpo", "dr_grpo"), "outcome reward, group z-score"),
        Algorithm("gtpo", "trajectories", ("gtpo",), "turn-level rewards and returns on TIR trajectories"),
        Algorithm("murphy", "trees", ("murphy",), "feedback trees with credit propagated to the roots"),
    )
}


def estimator_for(algorithm: str, configured: str) -> str:
    """The estimator a run of ``algorithm`` uses when ``configured`` was asked for: ``configured`` if the
    algorithm accepts it, else the algorithm's default (``AdvantageParams.estimator`` defaults to ``grpo``,
    so e.g. ``algorithm=murphy`` alone must pick ``murphy``). Asking for an estimator that reads trees from an
    algorithm that builds trajectories is an error: there is nothing to run it on."""
    algo = ALGORITHMS[algorithm]
    if configured in algo.estimators:
        return configured
    owner = next((a for a in ALGORITHMS.values() if configured in a.estimators), None)
    if owner is not None and owner.rollout == "trees" and algo.rollout != "trees":
        raise ValueError(
            f"advantages.estimator {configured!r} needs algorithm {owner.name!r}, got {algorithm!r}"
        )
    return algo.default_estimator
