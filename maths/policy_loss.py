"""The token-level policy loss of ALGORITHMS.md ("Policy loss"), as registries of pure tensor functions.

    ρ_t  = π_θ(t | ·) / π_old(t | ·)
    L    = − agg_t [ min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t) ] + β · agg_t KL_t
    KL_t = π_ref/π_θ − log(π_ref/π_θ) − 1                      (k3; k1 and k2 are registered too)

Three registries, each keyed by the name a parameter carries (``schemas.params.update``):

- ``AGGREGATIONS``: how per-token values (B, L) become one scalar. Each takes the *minibatch* normalisers
  (its token count and sequence count), so the micro-batches of one optimizer step add up exactly to the
  minibatch's aggregate under gradient accumulation; by default they are the micro-batch's own counts.
  ``token-mean`` (default, DAPO): Σ_bt v·m / N_tokens. ``seq-mean-token-mean`` (GRPO paper): mean over
  sequences of each sequence's token mean. ``seq-mean-token-sum-norm`` (Dr.GRPO, arXiv 2503.20783): mean over
  sequences of Σ_t v·m / C with a constant C (``loss_norm_tokens``).
- ``POLICY_LOSSES``: per-token surrogate losses. ``ppo-clip``: the clipped surrogate with ε_low / ε_high
  (DAPO clip-higher when ε_high > ε_low).
- ``KL_ESTIMATORS``: per-token KL(π_θ || π_ref) estimates from log-probs (Schulman, "Approximating KL").

TIS (truncated importance sampling, Yao et al. 2025, "Your efficient RL framework secretly brings you
off-policy RL training"): the rollout engine's log-probs differ from the trainer's; each token's policy loss
is weighted by w_t = min(π_old/π_rollout, C), detached.

Shapes: B sequences, L positions. ``logp``/``old_logp``/``ref_logp``/``rollout_logp``: (B, L) log-probs of
the token at each position; ``advantages``: (B, L); ``mask``: (B, L) float, 1 on trained (completion) tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from schemas.registry import Registry

LOG_RATIO_CLAMP = 20.0  # |log ρ| beyond this is numerically meaningless; clamp before exp

AggFn = Callable[..., torch.Tensor]
AGGREGATIONS: Registry[AggFn] = Registry("loss aggregation")
POLICY_LOSSES: Registry[Callable[..., tuple[torch.Tensor, torch.Tensor]]] = Registry("policy loss")
KL_ESTIMATORS: Registry[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = Registry("KL estimator")


# --- aggregation ----------------------------------------------------------------------------------------------
@AGGREGATIONS.register("token-mean")
def token_mean(
    values: torch.Tensor, mask: torch.Tensor, *, n_tokens: float | None = None, **_: Any
) -> torch.Tensor:
    """Σ_bt v·m / N. ``n_tokens``: trained tokens of the whole minibatch (default: this batch's)."""
    n = mask.sum() if n_tokens is None else n_tokens
    return (values * mask).sum() / max(float(n), 1.0)


@AGGREGATIONS.register("seq-mean-token-mean")
def seq_mean_token_mean(
    values: torch.Tensor, mask: torch.Tensor, *, n_seqs: float | None = None, **_: Any
) -> torch.Tensor:
    """Σ_b [Σ_t v·m / Σ_t m] / S. ``n_seqs``: sequences of the whole minibatch (default: this batch's).
    A sequence without trained tokens contributes 0 (and counts in S)."""
    per_seq = (values * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    s = values.shape[0] if n_seqs is None else n_seqs
    return per_seq.sum() / max(float(s), 1.0)


@AGGREGATIONS.register("seq-mean-token-sum-norm")
def seq_mean_token_sum_norm(
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    n_seqs: float | None = None,
    norm_tokens: float = 2048.0,
    **_: Any,
) -> torch.Tensor:
    """Σ_b [Σ_t v·m / C] / S with the constant C = ``norm_tokens`` (Dr.GRPO: no length bias)."""
    s = values.shape[0] if n_seqs is None else n_seqs
    return (values * mask).sum() / float(norm_tokens) / max(float(s), 1.0)


def aggregate(
    values: torch.Tensor,
    mask: torch.Tensor,
    mode: str,
    *,
    n_tokens: float | None = None,
    n_seqs: float | None = None,
    norm_tokens: float = 2048.0,
) -> torch.Tensor:
    """Aggregate (B, L) ``values`` over ``mask`` with the named mode (see module docstring)."""
    fn = AGGREGATIONS.lookup(mode)
    return fn(values, mask, n_tokens=n_tokens, n_seqs=n_seqs, norm_tokens=norm_tokens)


# --- KL estimators: per-token estimates of KL(π_θ || π_ref) ------------------------------------------------------
@KL_ESTIMATORS.register("k1")
def kl_k1(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """log π_θ − log π_ref (unbiased, can be negative)."""
    return logp - ref_logp


@KL_ESTIMATORS.register("k2")
def kl_k2(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """½ (log π_θ − log π_ref)²."""
    return 0.5 * (logp - ref_logp) ** 2


@KL_ESTIMATORS.register("k3")
def kl_k3(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """π_ref/π_θ − log(π_ref/π_θ) − 1 (unbiased, ≥ 0)."""
    d = (ref_logp - logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d) - d - 1.0


def kl(logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k3") -> torch.Tensor:
    return KL_ESTIMATORS.lookup(estimator)(logp, ref_logp)


# --- policy losses: (loss (B, L), clipped (B, L) bool) --------------------------------------------------------------
@POLICY_LOSSES.register("ppo-clip")
def ppo_clip(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A) and where the clipped branch is the active one."""
    ratio = torch.exp((logp - old_logp).clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def tis_weights(old_logp: torch.Tensor, rollout_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """(B, L) detached min(π_old/π_rollout, C)."""
    d = (old_logp - rollout_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP)
    return torch.exp(d).clamp(max=cap)


STALE_SUMS = {
    "stale_tokens": 0.0,
    "stale_is_weight": 0.0,
    "stale_is_capped": 0.0,
}  # summed over micro-batches


def stale_step_record(st: dict[str, float]) -> dict[str, float]:
    """One optimizer step's importance-weight statistics of its stale tokens (asynchronous pipeline): their
    count, mean weight, fraction capped, largest ratio; {} when the step had none."""
    if not st.get("stale_tokens"):
        return {}
    n = st["stale_tokens"]
    return {
        "stale_tokens": n,
        "stale_is_weight": st["stale_is_weight"] / n,
        "stale_is_capped": st["stale_is_capped"] / n,
        "stale_is_max": st.get("stale_is_max", 0.0),
    }


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss: str = "ppo-clip",
    agg: str = "token-mean",
    eps_low: float = 0.2,
    eps_high: float = 0.2,
    kl_beta: float = 0.0,
    kl_estimator: str = "k3",
    ref_logp: torch.Tensor | None = None,
    rollout_logp: torch.Tensor | None = None,
    tis_cap: float | None = None,
    stale: torch.Tensor | None = None,
    stale_cap: float = 2.0,
    n_tokens: float | None = None,
    n_seqs: float | None = None,
    norm_tokens: float = 2048.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The full loss of one (micro-)batch: scalar and token-summed statistics.

    ``n_tokens`` / ``n_seqs``: normalisers of the minibatch this micro-batch belongs to (see ``aggregate``).
    Returned stats are *sums over trained tokens* (so micro-batches add up): ``tokens``, ``clipped``,
    ``approx_kl`` (KL(π_old || π_θ), k3 estimate ρ − 1 − log ρ with ρ = π_θ/π_old: ≥ 0, unbiased on tokens
    sampled from π_old, and linear — not exponential — in a token's log-prob drop), ``kl_ref`` (when a reference
    is given), ``tis_weight``; with ``stale`` rows (B,) bool (an asynchronous pipeline's samples generated by an
    older policy than π_old): ``stale_tokens``, ``stale_is_weight`` (sum of their importance weights),
    ``stale_is_capped`` (tokens whose ratio exceeded ``stale_cap``) and ``stale_is_max`` (the largest ratio;
    a max, not a sum). With no stale row the loss is exactly the synchronous one.
    """
    if kl_beta > 0 and ref_logp is None:
        raise ValueError("kl_beta > 0 needs the reference log-probs (ref_logp)")
    norm = {"n_tokens": n_tokens, "n_seqs": n_seqs, "norm_tokens": norm_tokens}
    pg, clipped = POLICY_LOSSES.lookup(loss)(logp, old_logp, advantages, eps_low=eps_low, eps_high=eps_high)
    stats: dict[str, float] = {}
    if tis_cap is not None:
        if rollout_logp is None:
            raise ValueError("tis_cap is set but no rollout log-probs were given")
        w = tis_weights(old_logp, rollout_logp, tis_cap)
        pg = pg * w
        stats["tis_weight"] = float((w * mask).sum())
    elif stale is not None and bool(stale.any()):
        # decoupled PPO (asynchronous pipeline): a stale sample's tokens came from an older behaviour policy
        # (rollout_logp); the clip above is around the proximal policy π_old, and the behaviour → proximal
        # shift is corrected by the truncated importance weight min(π_old/π_behav, C). On-policy rows keep 1.
        if rollout_logp is None:
            raise ValueError("stale samples need their rollout (behaviour) log-probs")
        raw = torch.exp((old_logp - rollout_logp).detach().clamp(-LOG_RATIO_CLAMP, LOG_RATIO_CLAMP))
        rows = stale[:, None].to(mask.dtype) * mask
        w = torch.where(stale[:, None], raw.clamp(max=stale_cap), torch.ones_like(raw))
        pg = pg * w
        stats["stale_tokens"] = float(rows.sum())
        stats["stale_is_weight"] = float((w * rows).sum())
        stats["stale_is_capped"] = float(((raw > stale_cap).to(mask.dtype) * rows).sum())
        stats["stale_is_max"] = float((raw * rows).max())
    total = aggregate(pg, mask, agg, **norm)
    with torch.no_grad():
        m = mask.detach()
        stats["tokens"] = float(m.sum())
        stats["clipped"] = float((clipped.to(m.dtype) * m).sum())
        # k3 of KL(π_old || π_θ) on tokens sampled from π_old: ρ − 1 − log ρ with ρ = π_θ/π_old. (The reverse
        # ratio π_old/π_θ is not an estimate of either KL here: exp of a collapsed token's log-prob drop.)
        stats["approx_kl"] = float((kl_k3(old_logp, logp.detach()) * m).sum())
    if ref_logp is not None:
        kl_t = kl(logp, ref_logp, kl_estimator)
        stats["kl_ref"] = float((kl_t.detach() * mask).sum())
        if kl_beta > 0:
            total = total + kl_beta * aggregate(kl_t, mask, agg, **norm)
    return total, stats


# --- log-probs and entropy from logits ---------------------------------------------------------------------------------
LOGPROB_CHUNK = (
    1024  # positions per chunk of the selective log-softmax: a (chunk, V) fp32 temporary at a time
)


class _SelectedLogprobs(torch.autograd.Function):
    """log-prob of one target per selected row of (R, V) logits, and the row's entropy, chunk by chunk.

    Forward: per chunk of selected rows, fp32 logsumexp, the target's logit minus it, and the entropy
    lse − Σ p·x; nothing (R, V)-sized is kept but the logits themselves. Backward: ∂lp/∂x = onehot − softmax,
    recomputed per chunk into the one (R, V) gradient (rows not selected get 0). Entropy has no gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, rows: torch.Tensor, targets: torch.Tensor, chunk: int):
        flat = logits.reshape(-1, logits.shape[-1])
        lp = torch.empty(rows.shape[0], dtype=torch.float32, device=logits.device)
        lse = torch.empty_like(lp)
        ent = torch.empty_like(lp)
        for a in range(0, rows.shape[0], chunk):
            x = flat.index_select(0, rows[a : a + chunk]).float()
            z = torch.logsumexp(x, dim=-1)
            lse[a : a + chunk] = z
            lp[a : a + chunk] = x.gather(-1, targets[a : a + chunk, None]).squeeze(-1) - z
            x_lse = x.sub_(z[:, None])  # x − lse = log p, in place
            ent[a : a + chunk] = -(x_lse.exp() * x_lse).sum(-1)
        ctx.save_for_backward(logits, rows, targets, lse)
        ctx.chunk = chunk
        ctx.mark_non_differentiable(ent)
        return lp, ent

    @staticmethod
    def backward(ctx, grad_lp: torch.Tensor, _grad_ent: torch.Tensor):
        logits, rows, targets, lse = ctx.saved_tensors
        flat = logits.reshape(-1, logits.shape[-1])
        grad = torch.zeros_like(flat)
        for a in range(0, rows.shape[0], ctx.chunk):
            r, g = rows[a : a + ctx.chunk], grad_lp[a : a + ctx.chunk]
            p = flat.index_select(0, r).float().sub_(lse[a : a + ctx.chunk, None]).exp_()
            d = p.mul_(-g[:, None])
            d.scatter_add_(-1, targets[a : a + ctx.chunk, None], g[:, None])
            grad.index_copy_(0, r, d.to(grad.dtype))
        return grad.view_as(logits), None, None, None


def selected_logprobs(
    logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, *, chunk: int = LOGPROB_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) log-probs and (B, L) entropies (detached) of the positions where ``mask`` is non-zero; 0 elsewhere.

    ``logits``: (B, K, V) for the *last* K positions of (B, L) ``input_ids`` (K ≤ L: a model called with
    ``logits_to_keep=K``; logit row j predicts token L − K + j + 1). Position t needs logit row t − 1, so
    every masked position must have t ≥ L − K + 1 (``logits_needed``). Equal to ``token_logprobs`` /
    ``token_entropy`` on the masked positions (tests/test_policy_loss.py), without materialising an fp32
    log-softmax of the whole (B, L, V) — only (chunk, V) at a time, and only for the rows the loss uses.
    """
    b, length = input_ids.shape
    k = logits.shape[1]
    bi, ti = (mask != 0).nonzero(as_tuple=True)
    if bool((ti < length - k + 1).any()):
        raise ValueError(f"selected_logprobs: a masked position precedes the {k} kept logit rows")
    rows = bi * k + (ti - 1 - (length - k))
    lp_sel, ent_sel = _SelectedLogprobs.apply(logits, rows, input_ids[bi, ti], chunk)
    lp = torch.zeros(b, length, dtype=lp_sel.dtype, device=logits.device).index_put((bi, ti), lp_sel)
    ent = torch.zeros(b, length, dtype=ent_sel.dtype, device=logits.device).index_put((bi, ti), ent_sel)
    return lp, ent


def row_logprobs(
    logits: torch.Tensor, targets: torch.Tensor, *, chunk: int = LOGPROB_CHUNK
) -> tuple[torch.Tensor, torch.Tensor]:
    """(R,) log-probs of ``targets`` (R,) and (R,) detached entropies from (…, R, V) logits whose every row is
    used (a packed forward that kept only the rows the loss needs): the chunked log-softmax of
    ``selected_logprobs``."""
    rows = torch.arange(targets.shape[0], device=logits.device)
    return _SelectedLogprobs.apply(logits, rows, targets, chunk)


def logits_needed(mask: torch.Tensor) -> int:
    """How many trailing logit rows ``selected_logprobs`` needs for ``mask`` (B, L): L − first masked t + 1."""
    cols = (mask != 0).any(0).nonzero()
    return 1 if cols.numel() == 0 else int(mask.shape[1] - int(cols[0]) + 1)


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """(B, L) log π(input_ids[:, t] | input_ids[:, <t]) from (B, L, V) logits; position 0 gets 0.

    Computed as logit − logsumexp in fp32, without materialising the full log-softmax.
    """
    logits = logits[:, :-1].float()
    target = input_ids[:, 1:].unsqueeze(-1)
    lp = logits.gather(-1, target).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    return torch.nn.functional.pad(lp, (1, 0), value=0.0)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """(B, L) entropy of the next-token distribution that predicted each position; position 0 gets 0."""
    lg = logits[:, :-1].float()
    logz = torch.logsumexp(lg, dim=-1, keepdim=True)
    p = torch.exp(lg - logz)
    ent = logz.squeeze(-1) - (p * lg).sum(-1)
    return torch.nn.functional.pad(ent, (1, 0), value=0.0)
