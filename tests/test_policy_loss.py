"""The policy loss against hand-computed cases, its registries against their contracts, and properties."""

from __future__ import annotations

import math
import typing

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from maths import policy_loss as pl
from schemas.params import update as P

# Two sequences, 3 positions each (position 0 is prompt). Ratios ρ: seq0 [·, 1.5, 0.5], seq1 [·, 1.1, 5.0];
# seq1's last position is masked out and carries garbage that must not matter.
RATIOS = torch.tensor([[1.0, 1.5, 0.5], [1.0, 1.1, 5.0]])
OLD = torch.log(torch.tensor([[0.5, 0.4, 0.4], [0.5, 0.5, 0.1]]))
LOGP = OLD + torch.log(RATIOS)
ADV = torch.tensor([[0.0, 1.0, 1.0], [0.0, -2.0, 3.0]])
MASK = torch.tensor([[0.0, 1.0, 1.0], [0.0, 1.0, 0.0]])
# Per-token losses by hand (ε = 0.2): −min(ρA, clip(ρ)A)
#   seq0 t1: ρ=1.5, A=1  -> −min(1.5, 1.2) = −1.2 (clipped)
#   seq0 t2: ρ=0.5, A=1  -> −min(0.5, 0.8) = −0.5
#   seq1 t1: ρ=1.1, A=−2 -> −min(−2.2, −2.2) = 2.2
HAND = {
    "token-mean": (-1.2 - 0.5 + 2.2) / 3,  # 0.1667
    "seq-mean-token-mean": ((-1.2 - 0.5) / 2 + 2.2) / 2,  # 0.675
    "seq-mean-token-sum-norm": ((-1.2 - 0.5) / 4 + 2.2 / 4) / 2,  # C = 4 -> 0.0625
}


@pytest.mark.parametrize("agg", sorted(HAND))
def test_loss_matches_hand_computed_case(agg):
    loss, stats = pl.policy_loss(LOGP, OLD, ADV, MASK, agg=agg, norm_tokens=4)
    assert float(loss) == pytest.approx(HAND[agg], abs=1e-6)
    assert stats["tokens"] == 3 and stats["clipped"] == 1


def test_clip_higher_uses_eps_high():
    # ρ = 1.5, A = 1 with ε_high 0.28 -> −1.28 on seq0 t1
    loss, _ = pl.policy_loss(LOGP, OLD, ADV, MASK, eps_low=0.2, eps_high=0.28)
    assert float(loss) == pytest.approx((-1.28 - 0.5 + 2.2) / 3, abs=1e-6)


def test_k3_kl_hand_case_and_beta_term():
    logp, ref = torch.log(torch.tensor([[0.5]])), torch.log(torch.tensor([[0.25]]))
    # r = π_ref/π_θ = 0.5: 0.5 − log 0.5 − 1 = 0.193147
    assert float(pl.kl(logp, ref, "k3")) == pytest.approx(0.5 - math.log(0.5) - 1, abs=1e-6)
    assert float(pl.kl(logp, ref, "k1")) == pytest.approx(math.log(2), abs=1e-6)
    assert float(pl.kl(logp, ref, "k2")) == pytest.approx(0.5 * math.log(2) ** 2, abs=1e-6)
    ref_lp = LOGP - 0.1  # every token: log π_ref − log π_θ = −0.1
    k3 = math.exp(-0.1) + 0.1 - 1
    loss, stats = pl.policy_loss(LOGP, OLD, ADV, MASK, kl_beta=0.5, ref_logp=ref_lp)
    assert float(loss) == pytest.approx(HAND["token-mean"] + 0.5 * k3, abs=1e-6)
    assert stats["kl_ref"] == pytest.approx(3 * k3, abs=1e-6)
    with pytest.raises(ValueError, match="ref_logp"):
        pl.policy_loss(LOGP, OLD, ADV, MASK, kl_beta=0.5)


def test_approx_kl_to_old_policy_is_k3_with_ratio_new_over_old():
    """approx_kl estimates KL(π_old || π_θ) on tokens sampled from π_old: Σ ρ − 1 − log ρ, ρ = π_θ/π_old."""
    _, stats = pl.policy_loss(LOGP, OLD, ADV, MASK)
    hand = sum(r - 1 - math.log(r) for r in (1.5, 0.5, 1.1))  # the three trained tokens
    assert stats["approx_kl"] == pytest.approx(hand, abs=1e-6)
    # A near-certain token (π_old 0.999) collapsing to π_θ = 1e-4: ≈ 8.2 nats, not π_old/π_θ ≈ 1e4 (the reverse
    # ratio, which turned a few collapsed tokens into a logged approx_kl of 8432 after a warm start).
    old, new = torch.log(torch.tensor([[1.0, 0.999]])), torch.log(torch.tensor([[1.0, 1e-4]]))
    _, stats = pl.policy_loss(new, old, torch.ones(1, 2), MASK[:1, :2])
    assert stats["approx_kl"] == pytest.approx(1e-4 - 1 - math.log(1e-4 / 0.999), rel=1e-4)


def test_tis_weights_cap_and_scale_loss():
    rollout = OLD.clone()
    rollout[0, 1] = OLD[0, 1] - math.log(5.0)  # π_old/π_rollout = 5 -> capped at 2
    rollout[0, 2] = OLD[0, 2] + math.log(2.0)  # 0.5
    loss, stats = pl.policy_loss(LOGP, OLD, ADV, MASK, rollout_logp=rollout, tis_cap=2.0)
    assert float(loss) == pytest.approx((-1.2 * 2 - 0.5 * 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["tis_weight"] == pytest.approx(2 + 0.5 + 1, abs=1e-6)


def test_masked_tokens_get_zero_gradient():
    for agg in pl.AGGREGATIONS:
        logp = LOGP.clone().requires_grad_(True)
        ref = LOGP.detach() - 0.3
        loss, _ = pl.policy_loss(logp, OLD, ADV, MASK, agg=agg, kl_beta=0.1, ref_logp=ref)
        loss.backward()
        assert torch.all(logp.grad[MASK == 0] == 0), agg
        assert torch.all(logp.grad[MASK == 1] != 0), agg


def test_registries_match_param_choices():
    assert set(typing.get_args(P.LossAgg)) == set(pl.AGGREGATIONS)
    assert set(typing.get_args(P.PolicyLossName)) == set(pl.POLICY_LOSSES)
    assert set(typing.get_args(P.KLEstimator)) == set(pl.KL_ESTIMATORS)
    for name, fn in pl.AGGREGATIONS.items():
        out = fn(LOGP, MASK, n_tokens=None, n_seqs=None, norm_tokens=4.0)
        assert out.shape == (), name
    for name, fn in pl.POLICY_LOSSES.items():
        loss, clipped = fn(LOGP, OLD, ADV, eps_low=0.2, eps_high=0.2)
        assert loss.shape == LOGP.shape and clipped.dtype == torch.bool, name
    for name, fn in pl.KL_ESTIMATORS.items():
        assert fn(LOGP, OLD).shape == LOGP.shape, name
    with pytest.raises(ValueError, match="valid"):
        pl.aggregate(LOGP, MASK, "nope")


def test_token_logprobs_and_entropy_against_log_softmax():
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 5, 7), torch.randint(0, 7, (2, 5))
    lp = pl.token_logprobs(logits, ids)
    ref = torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert torch.allclose(lp[:, 1:], ref, atol=1e-6) and torch.all(lp[:, 0] == 0)
    p = torch.softmax(logits, -1)[:, :-1]
    assert torch.allclose(pl.token_entropy(logits)[:, 1:], -(p * p.log()).sum(-1), atol=1e-5)


@pytest.mark.parametrize("chunk", [1, 3, 1024])
def test_selected_logprobs_equal_the_full_log_softmax_values_and_gradients(chunk):
    """The chunked selective log-softmax gives token_logprobs / token_entropy on the masked positions (0
    elsewhere) and the same gradient of the logits, also from only the last K logit rows."""
    torch.manual_seed(1)
    b, length, v = 3, 9, 50
    logits = (3 * torch.randn(b, length, v)).requires_grad_(True)
    ids = torch.randint(0, v, (b, length))
    mask = torch.zeros(b, length)
    mask[0, 4:] = 1
    mask[1, 6:8] = 1
    mask[2, 5] = mask[2, 8] = 1
    w = torch.randn(b, length)
    ref = pl.token_logprobs(logits, ids) * mask
    (ref * w).sum().backward()
    g_ref, logits.grad = logits.grad.clone(), None
    k = pl.logits_needed(mask)
    assert k == length - 4 + 1
    kept = logits[:, -k:]
    lp, ent = pl.selected_logprobs(kept, ids, mask, chunk=chunk)
    assert torch.allclose(lp, ref, atol=1e-6, rtol=0) and torch.all(lp[mask == 0] == 0)
    assert torch.allclose(ent, pl.token_entropy(logits.detach()) * mask, atol=1e-5, rtol=0)
    assert not ent.requires_grad
    (lp * w).sum().backward()
    assert torch.allclose(logits.grad, g_ref, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="precedes"):
        pl.selected_logprobs(logits[:, -2:].detach(), ids, mask)


def test_row_logprobs_of_kept_rows_equal_the_full_log_softmax():
    """row_logprobs (every row used, as a packed forward keeps only the rows the loss reads): the log-prob of
    each row's target, its entropy, and the gradient of the full log-softmax."""
    torch.manual_seed(2)
    logits = (3 * torch.randn(1, 7, 40)).requires_grad_(True)
    targets = torch.randint(0, 40, (7,))
    w = torch.randn(7)
    ref = torch.log_softmax(logits[0], -1).gather(-1, targets[:, None]).squeeze(-1)
    (ref * w).sum().backward()
    g_ref, logits.grad = logits.grad.clone(), None
    lp, ent = pl.row_logprobs(logits, targets, chunk=3)
    assert torch.allclose(lp, ref, atol=1e-6, rtol=0)
    p = torch.softmax(logits[0].detach(), -1)
    assert torch.allclose(ent, -(p * p.log()).sum(-1), atol=1e-5, rtol=0) and not ent.requires_grad
    (lp * w).sum().backward()
    assert torch.allclose(logits.grad, g_ref, atol=1e-6, rtol=0)


floats = st.floats(-3, 3, allow_nan=False, width=32)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 6).flatmap(
        lambda b: st.tuples(
            st.just(b),
            st.lists(floats, min_size=b * 4, max_size=b * 4),
            st.lists(st.integers(0, 1), min_size=b * 4, max_size=b * 4),
            st.integers(1, b - 1),
        )
    ),
    st.sampled_from(sorted(pl.AGGREGATIONS)),
)
def test_micro_batches_add_up_to_the_minibatch(case, agg):
    """Gradient accumulation: the micro-batch shares with minibatch normalisers sum to the full aggregate."""
    b, vals, mask, split = case
    v, m = torch.tensor(vals).view(b, 4), torch.tensor(mask, dtype=torch.float32).view(b, 4)
    full = pl.aggregate(v, m, agg, norm_tokens=8)
    norm = {"n_tokens": float(m.sum()), "n_seqs": float(b), "norm_tokens": 8}
    parts = pl.aggregate(v[:split], m[:split], agg, **norm) + pl.aggregate(v[split:], m[split:], agg, **norm)
    assert float(parts) == pytest.approx(float(full), abs=1e-5)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(floats, floats), min_size=1, max_size=20))
def test_k3_is_nonnegative_and_zero_at_equality(pairs):
    a, b = (torch.tensor(x) for x in zip(*pairs, strict=True))
    assert torch.all(pl.kl(a, b, "k3") >= -1e-6)
    assert torch.all(pl.kl(a, a, "k3").abs() < 1e-6)


# --- the asynchronous pipeline's stale samples (decoupled PPO with a truncated behaviour -> proximal weight) ----
def _stale_case():
    # row 0 on-policy, row 1 stale; two trained tokens each
    logp = torch.tensor([[-1.0, -2.0], [-0.5, -1.5]])
    old = torch.tensor([[-1.2, -2.0], [-0.7, -1.0]])  # π_prox: the policy before this update
    roll = torch.tensor([[-1.2, -2.1], [-1.0, -3.0]])  # π_behav: what generated the tokens
    adv = torch.tensor([[1.0, 1.0], [-1.0, 2.0]])
    mask = torch.ones(2, 2)
    return logp, old, roll, adv, mask


def test_no_stale_row_is_exactly_the_synchronous_loss():
    logp, old, roll, adv, mask = _stale_case()
    plain, st0 = pl.policy_loss(logp, old, adv, mask, rollout_logp=roll)
    for stale in (None, torch.tensor([False, False])):
        loss, st = pl.policy_loss(logp, old, adv, mask, rollout_logp=roll, stale=stale, stale_cap=2.0)
        assert torch.equal(loss, plain) and st == st0


def test_stale_rows_are_weighted_by_the_truncated_behaviour_ratio_hand_computed():
    logp, old, roll, adv, mask = _stale_case()
    loss, st = pl.policy_loss(
        logp, old, adv, mask, rollout_logp=roll, stale=torch.tensor([False, True]), stale_cap=2.0
    )

    def ppo(lp, o, a, eps=0.2):
        r = math.exp(lp - o)
        return max(-a * r, -a * min(max(r, 1 - eps), 1 + eps))

    # row 1's weights: exp(-0.7 - -1.0) = 1.3499 (under the cap), exp(-1.0 - -3.0) = 7.389 -> capped at 2
    w = [1.0, 1.0, math.exp(0.3), 2.0]
    terms = [ppo(-1.0, -1.2, 1.0), ppo(-2.0, -2.0, 1.0), ppo(-0.5, -0.7, -1.0), ppo(-1.5, -1.0, 2.0)]
    expected = sum(wi * t for wi, t in zip(w, terms, strict=True)) / 4  # token-mean
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert st["stale_tokens"] == 2 and st["stale_is_capped"] == 1
    assert st["stale_is_weight"] == pytest.approx(math.exp(0.3) + 2.0, rel=1e-6)
    assert st["stale_is_max"] == pytest.approx(math.exp(2.0), rel=1e-6)
    rec = pl.stale_step_record(st)
    assert rec["stale_is_weight"] == pytest.approx((math.exp(0.3) + 2.0) / 2, rel=1e-6)
    assert rec["stale_is_capped"] == 0.5 and pl.stale_step_record({"tokens": 4.0}) == {}


@settings(max_examples=40, deadline=None)
@given(st.floats(0.05, 1.0), st.lists(st.booleans(), min_size=3, max_size=3))
def test_stale_weights_never_exceed_the_cap_and_leave_fresh_rows_alone(cap, flags):
    g = torch.Generator().manual_seed(0)
    logp, old, roll = (-torch.rand(3, 4, generator=g) * 3 for _ in range(3))
    adv, mask = torch.randn(3, 4, generator=g), torch.ones(3, 4)
    stale = torch.tensor(flags)
    per_tok = lambda **kw: pl.policy_loss(logp, old, adv, mask, agg="token-mean", rollout_logp=roll, **kw)[0]  # noqa: E731
    fresh_only = per_tok(stale=torch.zeros(3, dtype=torch.bool))
    weighted = per_tok(stale=stale, stale_cap=cap)
    if not stale.any():
        assert torch.equal(weighted, fresh_only)
    raw = torch.exp(old - roll)
    w = torch.where(stale[:, None], raw.clamp(max=cap), torch.ones_like(raw))
    assert float(w.max()) <= max(cap, 1.0) + 1e-6
    pg, _ = pl.ppo_clip(logp, old, adv, eps_low=0.2, eps_high=0.2)
    assert weighted.item() == pytest.approx(float((pg * w).mean()), rel=1e-5, abs=1e-7)
