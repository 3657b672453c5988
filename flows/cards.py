"""Model cards: the one logged beside every checkpoint (which run, stage, data and algorithm made it) and the one a
registered model version carries (held-out accuracy before -> after with its CI, the key hyperparameters, the
data, the commit), and the registered model's name: one per algorithm and base model."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from flows.runstore import RunStore

if TYPE_CHECKING:
    from schemas.params import PipelineParams

RunContext = (
    Any  # flows.runner.RunContext (which imports this module): root, run_id, algo, git_sha, flow_run_id
)


def registered_name(p: PipelineParams) -> str:
    """``turntree-<algorithm>-<base model>``: versions of one name share an algorithm and a base model."""
    base = p.model.rstrip("/").rsplit("/", 1)[-1].lower()
    return f"turntree-{p.algorithm}-{re.sub(r'[^a-z0-9]+', '-', base).strip('-') or 'model'}"


def model_card(ctx: RunContext, stage: str, iteration: int, checkpoint: str) -> str:
    """A checkpoint's card: which run, data, algorithm and stage made it, and where its weights are."""
    params = RunStore(ctx.root, ctx.run_id).load().get("params", {})
    made_by = (
        "supervised warm start"
        if stage == "warmstart"
        else f"{ctx.algo.upper()} update, iteration {iteration}"
    )
    return "\n".join(
        [
            f"# turntree checkpoint: run `{ctx.run_id}`, {made_by}",
            "",
            f"- base model: `{params.get('model', '?')}`",
            f"- algorithm: **{ctx.algo}** (estimator `{params.get('advantages', {}).get('estimator', '?')}`)",
            f"- data: {', '.join(params.get('data', {}).get('sources', []) or ['?'])}",
            f"- weights (Hugging Face format): `{checkpoint}`",
            f"- git commit: `{ctx.git_sha}`; Prefect flow run: `{ctx.flow_run_id}`",
            "",
            "Load with `transformers.AutoModelForCausalLM.from_pretrained(<weights>)`, or evaluate with "
            f"`turntree eval --checkpoint {checkpoint}`.",
        ]
    )


def registry_card(ctx: RunContext, p: PipelineParams, manifest: dict[str, Any], checkpoint: str) -> str:
    """The registered version's description: what it scores before -> after RL, how it was trained, on what."""
    from flows.console import before_after, iteration_metrics

    held = (
        before_after(iteration_metrics(manifest), ci=True)
        or "held-out accuracy: not evaluated before and after"
    )
    r, u, d = p.rollout, p.update, p.data
    hyper = {
        "algorithm": f"{p.algorithm} ({p.advantages.estimator}, norm scope {p.advantages.norm_scope})",
        "iterations": p.iterations,
        "problems x G per iteration": f"{r.problems_per_iteration} x {r.group_size}",
        "max turns / new tokens": f"{r.max_turns} / {r.max_new_tokens}",
        "learning rate (warmup)": f"{u.lr:g} ({u.warmup_steps} steps)",
        "clip (low, high) / KL beta": f"{u.clip_eps_low:g}, {u.clip_eps_high:g} / {u.kl_beta:g}",
        "max staleness": p.max_staleness,
        "warm start": f"{p.warmstart.steps} steps" if p.warmstart.enabled else "none",
    }
    return "\n".join(
        [
            f"turntree run `{ctx.run_id}`: {p.algorithm.upper()} on `{p.model}`",
            "",
            held,
            "",
            *(f"- {k}: {v}" for k, v in hyper.items()),
            f"- data: {', '.join(d.sources)} (seed {d.seed}, held-out fraction {d.eval_fraction:g})",
            f"- weights: `{checkpoint}`",
            f"- git commit: `{ctx.git_sha}`; Prefect flow run: `{ctx.flow_run_id}`",
        ]
    )
