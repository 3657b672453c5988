"""Every registry refuses duplicates, names its valid entries on a miss, and holds exactly the names its
parameter's ``Literal`` allows (so a config naming an unknown entry is refused before any work starts)."""

from __future__ import annotations

import pytest

from maths import estimators as advantages
from maths import policy_loss, similarity
from maths import reward_fns as rewards
from runtime import engines
from schemas.algorithms import ALGORITHMS, RolloutKind
from schemas.params import update as U
from schemas.params.rewards import AdvantageParams, ScoreParams
from schemas.params.rollout import RolloutParams
from schemas.registry import Registry, literal_names


def field_names(model, name: str) -> set[str]:
    return literal_names(model.model_fields[name].annotation)


REGISTRIES = {
    "estimators": (advantages.ESTIMATORS, field_names(AdvantageParams, "estimator")),
    "norm_scopes": (advantages.NORM_SCOPES, field_names(AdvantageParams, "norm_scope")),
    "murphy_modes": (advantages.RETURN_MODES, field_names(AdvantageParams, "murphy_mode")),
    "rewards": (rewards.REWARDS, literal_names(ScoreParams.model_fields["reward_weights"].annotation)),
    "similarities": (similarity.SIMILARITIES, field_names(ScoreParams, "similarity")),
    "aggregations": (policy_loss.AGGREGATIONS, literal_names(U.LossAgg)),
    "policy_losses": (policy_loss.POLICY_LOSSES, literal_names(U.PolicyLossName)),
    "kl_estimators": (policy_loss.KL_ESTIMATORS, literal_names(U.KLEstimator)),
    "engine_backends": (engines.BACKENDS, field_names(RolloutParams, "backend")),
}


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_registry_equals_its_literal(name):
    registry, allowed = REGISTRIES[name]
    assert isinstance(registry, Registry)
    assert allowed and set(registry) == allowed


@pytest.mark.parametrize("name", sorted(REGISTRIES))
def test_registry_refuses_duplicates_and_names_valid_entries(name):
    registry, _ = REGISTRIES[name]
    existing = next(iter(registry))
    with pytest.raises(ValueError, match="registered twice"):
        registry.register(existing)(registry[existing])
    with pytest.raises(ValueError, match=r"unknown .*'no-such-entry'; valid: \[") as e:
        registry.lookup("no-such-entry")
    assert all(repr(k) in str(e.value) for k in registry)
    assert registry[existing] is registry.lookup(existing)  # the refused duplicate replaced nothing


def test_algorithm_table_covers_every_estimator_and_rollout_kind():
    estimators = {e for a in ALGORITHMS.values() for e in a.estimators}
    assert estimators == set(advantages.ESTIMATORS)
    assert {a.rollout for a in ALGORITHMS.values()} == literal_names(RolloutKind)
    for algo in ALGORITHMS.values():  # an algorithm's estimators read the table its rollout writes
        assert {advantages.ESTIMATORS[e].table for e in algo.estimators} == {algo.rollout}


def test_unknown_reward_name_in_weights_is_refused_by_the_parameters():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="bleu"):
        ScoreParams.model_validate({"reward_weights": {"bleu": 1.0}})
