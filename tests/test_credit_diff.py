"""bench/credit_diff.py's two measures on hand-made tables (the figures in docs/results.md §10 come from them)."""

from __future__ import annotations

import pytest

from bench.credit_diff import same_completions, sign_disagreement, summary


def _sample(source, mask, adv):
    return {"source_id": source, "loss_mask": mask, "advantages": adv}


def test_tied_outcome_groups_and_their_share_of_tokens():
    trajectories = [  # g: one right, one wrong (a signal); h: both wrong (tied); k: both right (tied)
        {"trajectory_id": "a", "group_id": "g", "reward": 1.0},
        {"trajectory_id": "b", "group_id": "g", "reward": 0.0},
        {"trajectory_id": "c", "group_id": "h", "reward": 0.0},
        {"trajectory_id": "d", "group_id": "h", "reward": 0.0},
        {"trajectory_id": "e", "group_id": "k", "reward": 1.0},
    ]
    samples = {
        "a": _sample("a", [0, 1, 1], [0, 1.0, 1.0]),
        "b": _sample("b", [0, 1], [0, -1.0]),
        "c": _sample("c", [1, 1, 0], [0.5, 0.5, 0]),  # tied group, |adv| 0.5 over 2 tokens
        "d": _sample("d", [1], [-1.5]),  # tied group, |adv| 1.5 over 1 token
    }
    got = summary(trajectories, samples)
    assert (got["samples"], got["tokens"], got["tied_samples"]) == (4, 6, 2)
    assert got["tied_token_frac"] == pytest.approx(3 / 6)
    assert got["tied_abs_adv"] == pytest.approx((0.5 + 1.5) / 2)


def test_sign_disagreement_counts_trained_tokens_of_shared_samples():
    a = {"x": _sample("x", [0, 1, 1, 1], [9, 1.0, -1.0, 0.5]), "y": _sample("y", [1], [1.0])}
    b = {"x": _sample("x", [0, 1, 1, 1], [-9, 1.0, 1.0, -0.5]), "z": _sample("z", [1], [1.0])}
    frac, only = sign_disagreement(a, b)
    assert frac == pytest.approx(2 / 3) and only == 2  # the masked-out token does not count; y, z in one run
    turns = [{"turns": [{"completion_token_ids": [1, 2]}]}]
    assert same_completions(turns, turns) and not same_completions(
        turns, [{"turns": [{"completion_token_ids": [1]}]}]
    )
