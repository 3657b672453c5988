"""Rollout length and truncation statistics (the RL health view), on hand-made rows."""

from __future__ import annotations

import pytest

from stages.rollout.health import length_metrics
from tests.scored_tables import node, trajectory, tree, turn


def test_trajectory_lengths_truncation_and_stop_reasons():
    a = trajectory("a", "p", "g", [turn([1, 2, 3, 4]), turn([5])])  # first turn hit the 4-token limit
    b = trajectory("b", "p", "g", [turn([6, 7])])
    b["stop_reason"] = "max_turns"
    m = length_metrics([a, b], "trajectories", max_new_tokens=4)
    assert m["rollout/response_tokens_mean"] == pytest.approx(7 / 3)
    assert m["rollout/response_tokens_max"] == 4.0
    assert m["rollout/trajectory_tokens_mean"] == pytest.approx(3.5)
    assert m["rollout/truncated_turn_frac"] == pytest.approx(1 / 3)
    assert m["rollout/stop_answer_frac"] == 0.5 and m["rollout/stop_max_turns_frac"] == 0.5
    assert m["rollout/stop_context_limit_frac"] == 0.0


def test_tree_nodes_and_empty_rollouts():
    t = tree("t", "p", [node(0, -1, comp=(1, 2)), node(1, 0, depth=2, comp=(3,))])
    m = length_metrics([t], "trees", max_new_tokens=2)
    assert m["rollout/response_tokens_mean"] == 1.5 and m["rollout/truncated_turn_frac"] == 0.5
    assert not any(k.startswith("rollout/stop_") for k in m)
    assert length_metrics([], "trajectories", 8) == {}
