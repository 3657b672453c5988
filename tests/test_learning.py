"""Learning tests: a few RL iterations through the real stages must raise the reward, and must not unlearn a
task the policy already solves (issue 12, item 3).

Task (``stages.data.synthetic.secret``): every problem's answer is the same secret digit that no prompt reveals,
so the policy can only find it through the reward. ``secret-tool`` (GRPO, Dr.GRPO, GTPO; multi-turn TIR)
pays 1 only for a trajectory that makes a valid tool call in its first turn *and* boxes the secret (score
parameters ``SECRET_TOOL_SCORE``: a format violation costs 1; reward in {-1, 0, 1}); ``secret-code``
(MURPHY; refinement trees) pays the fraction of its one hidden test, ``assert secret() == <digit>``.

Policies: the tiny random Qwen2 after a short warm start (``stages.warmstart``) on demonstrations that are
(a) a mixture: half make the tool call, a share ``P_RIGHT`` box the right digit ("noisy": right sometimes, RL
has something to learn) or (b) the reference demonstrations ("solved": right almost always).

Loop (as ``flows.pipeline.drive``): rollout → score → advantages → update, the update pushing its weights into
the live vLLM engine the next rollout uses (``runtime.engines.engine_for``); the session ``tiny_engine`` is
restored to the tiny model's weights afterwards. Everything is seeded (``SEED``, 0 unless
``TURNTREE_LEARNING_SEED`` says otherwise, to re-measure the margins).

Measurement: the rollout + score stages on 32 problems × 4 samples = 128 completions at temperature 1 with a
fixed sampling seed (roots only for trees: ``tree_depth=1``); the mean reward of those.

Margins (measured with seeds 0, 1, 2 at LR = 2e-4; see the commit that set them):
- ``GAIN``: after ``LEARN_ITERS`` iterations the mean reward exceeds its start by at least this much. The
  standard error of a 128-sample mean is at most σ/sqrt(128) with σ <= 1 (tool task, reward in [-1, 1]) or
  0.5 (code task, [0, 1]), so a difference of two measurements has SE <= 0.125 / 0.0625: the margins are
  >= 3.2 / 4 SE above zero, and the measured gains (tool +0.55..+0.80, code +0.45..+0.6) are above them.
- ``KEEP``: from the solved policy (>= 0.9), the mean reward measured after *each* of ``KEEP_ITERS``
  iterations stays at least this (correct estimators measured >= 0.89). This is what catches GTPO pushing
  the policy away from the tool-call turn that made it right: with ``norm_scope="group"`` the first turn of
  an all-successful group has return γ·1 < 1 and is z-scored negative, so one update breaks the tool call
  (the code fence of the demonstrated call turns into "````python", an invalid call) and the reward falls
  to about 0; it partly recovers later, which is why every iteration is measured, not only the last.
  Measured with the old default scope "group": seed 0 0.969 -> 0.039 -> 0.398 -> 0.914 and seed 2
  0.953 -> 0.930 -> -0.789 -> -0.680 (caught), but seed 1 only 0.969 -> 0.961 -> 0.961 -> 0.953 (not caught,
  0.945 after 5 iterations): the break is a token-level accident of the push, so it depends on the seed.
  ``test_the_keep_test_catches_the_group_scope_regression`` runs the old scope on seed 0 and requires the
  fall, so the guard itself is tested. The default ``end_aligned`` keeps 0.969 -> 0.984 -> 0.969 -> 0.891.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from runtime.tableio import write_table
from schemas.params import AdvantageParams, RolloutParams, ScoreParams, UpdateParams, WarmstartParams
from schemas.tables import PROBLEMS
from stages import advantages, rollout, score, update, warmstart
from stages.data.synthetic import generate, secret

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("TURNTREE_LEARNING_SEED", "0"))
LEARN_ITERS, KEEP_ITERS = 5, 3
GAIN = {"secret-tool": 0.4, "secret-code": 0.25}
KEEP = {"secret-tool": 0.5, "secret-code": 0.75}
# noisy warm start: share of demonstrations with the right digit (half of them make the tool call); the code
# task's start is lower so that its reward, in [0, 1], has room to rise
P_RIGHT = {"secret-tool": 0.5, "secret-code": 0.25}
# far above the default 1e-6, but not more: with a fresh AdamW (sign-like first steps) 5e-4 already random-walks
# a solved policy off its optimum in 3 iterations (GRPO, seed 2: 0.95 -> 0.16), while 2e-4 learns as fast
LR = 2e-4
N_PROBLEMS = 32
MEASURE_ITERATION = 10_000  # a rollout "iteration" no training iteration uses: its own problems and seeds

# (estimator, norm_scope or None for the default); the explicit turn_position GTPO is the sane baseline
CASES = [("grpo", None), ("dr_grpo", None), ("gtpo", None), ("gtpo", "turn_position"), ("murphy", None)]
IDS = [e if s is None else f"{e}-{s}" for e, s in CASES]


def family(estimator: str) -> str:
    return "secret-code" if estimator == "murphy" else "secret-tool"


class Lab:
    """Problems, warm-started policies and measurements, built once per module and shared by the tests."""

    def __init__(self, root: Path, base: Path):
        self.root, self.base = root, base
        self._cache: dict = {}

    def problems(self, fam: str) -> str:
        uri = self.root / f"{fam}.parquet"
        if not uri.exists():
            rows = generate(fam, count=N_PROBLEMS, seed=0)
            write_table([dict(r, split="train") for r in rows], PROBLEMS, uri)
        return str(uri)

    def policy(self, fam: str, mix: str) -> tuple[str, float]:
        """(checkpoint, measured mean reward) of the warm start on ``mix`` demonstrations."""
        if (fam, mix) not in self._cache:
            rng = random.Random(f"{SEED}:{fam}:{mix}")
            rows = generate(fam, count=N_PROBLEMS, seed=0)
            demos = [
                secret.noisy_demonstration(
                    r,
                    tool=mix == "solved" or rng.random() < 0.5,
                    right=mix == "solved" or rng.random() < P_RIGHT[fam],
                )
                for r in rows
            ]
            uri = self.root / f"ws-{fam}-{mix}.parquet"
            write_table(
                [dict(r, split="train", demonstration=d) for r, d in zip(rows, demos, strict=True)],
                PROBLEMS,
                uri,
            )
            steps = 100 if mix == "solved" else 50  # solved: until it samples the reference ~always
            # fp32: the starting policies are those the margins and the guard's break were measured from (a
            # bf16 warm start gives other ones); the RL updates run at the default dtype (bf16 on a CPU with
            # native bf16 matmuls)
            params = WarmstartParams(
                enabled=True,
                steps=steps,
                lr=3e-3,
                batch_size=8,
                micro_batch_size=8,
                seed=SEED,
                dtype="float32",
            )
            out = warmstart.run(
                params, {"problems": str(uri), "checkpoint": str(self.base)}, self.root / f"ws-{fam}-{mix}"
            )
            ckpt = out.uri("checkpoint")
            self._cache[fam, mix] = ckpt, self.measure(fam, ckpt, f"start-{mix}")
        return self._cache[fam, mix]

    def rollout_params(self, fam: str, **kw) -> RolloutParams:
        body = {
            "mode": "tree" if fam == "secret-code" else "tir",
            "max_new_tokens": 32,
            "max_turns": 3,
            "max_context_tokens": 512,
            "temperature": 1.0,
            "seed": SEED,
            **kw,
        }
        return RolloutParams(**body)

    def score_params(self, fam: str) -> ScoreParams:
        return ScoreParams(**(secret.SECRET_TOOL_SCORE if fam == "secret-tool" else {}))

    def roll_and_score(
        self, fam: str, ckpt: str, iteration: int, rp: RolloutParams, out: Path, version: int | None = None
    ):
        table = "trees" if fam == "secret-code" else "trajectories"
        inputs = {"problems": self.problems(fam), "checkpoint": ckpt, "iteration": str(iteration)}
        if version is not None:
            inputs["policy_version"] = str(version)
        rolled = rollout.run(rp, inputs, out / "rollout")
        scored = score.run(
            self.score_params(fam), {table: rolled.uri(table), "problems": inputs["problems"]}, out / "score"
        )
        return table, scored

    def measure(self, fam: str, ckpt: str, tag: str) -> float:
        rp = self.rollout_params(fam, group_size=4, problems_per_iteration=N_PROBLEMS, tree_depth=1)
        _, scored = self.roll_and_score(fam, ckpt, MEASURE_ITERATION, rp, self.root / f"measure-{tag}")
        return scored.metrics["reward/mean"]

    def train(
        self,
        estimator: str,
        scope: str | None,
        ckpt: str,
        iterations: int,
        tag: str,
        measure_each=False,
        staleness: int = 0,
        adv_kw: dict | None = None,
        **update_kw,
    ) -> tuple[str, list[float]]:
        """``iterations`` RL iterations from ``ckpt``: the last checkpoint and, with ``measure_each``, the
        mean reward measured after each iteration. ``update_kw``: update parameters other than the defaults
        (``dtype`` auto: bf16 on a CPU with native bf16 matmuls, else fp32). ``staleness`` k: as the
        asynchronous pipeline (max_staleness=k) does, each rollout uses the checkpoint k updates behind the one
        its samples then train (the first ones: the starting policy), recorded as their policy version."""
        rewards = []
        fam = family(estimator)
        rp = self.rollout_params(
            fam, group_size=8, child_group_size=4, problems_per_iteration=8, tree_depth=2
        )
        adv_params = AdvantageParams(
            estimator=estimator, **({"norm_scope": scope} if scope else {}), **(adv_kw or {})
        )
        upd_params = UpdateParams(
            **{"lr": LR, "minibatch_size": 16, "micro_batch_size": 16, "seed": SEED, **update_kw},
            max_staleness=staleness,
        )
        ckpts = [ckpt]  # policy version v: ckpts[v]
        for k in range(1, iterations + 1):
            out = self.root / tag / f"iter-{k}"
            behind = max(0, len(ckpts) - 1 - staleness)
            table, scored = self.roll_and_score(fam, ckpts[behind], k, rp, out, version=behind)
            adv = advantages.run(adv_params, {table: scored.uri(table)}, out / "advantages")
            if adv.tables["samples"].rows:  # else every group tied: nothing to learn (drive() skips too)
                inputs = {
                    "samples": adv.uri("samples"),
                    "checkpoint": ckpt,
                    "policy_version": str(len(ckpts) - 1),
                }
                upd = update.run(upd_params, inputs, out / "update")
                ckpt = upd.uri("checkpoint")
                ckpts.append(ckpt)
            if measure_each:
                rewards.append(self.measure(family(estimator), ckpt, f"{tag}-iter-{k}"))
        return ckpt, rewards


@pytest.fixture(scope="module")
def lab(tiny_model, tiny_engine, tmp_path_factory):
    from runtime.engines import make_engine

    make_engine(tiny_model, backend="vllm", seed=0)  # the session engine is the live one: rollouts reuse it
    yield Lab(tmp_path_factory.mktemp("learning"), Path(tiny_model))
    tiny_engine.update_weights(str(tiny_model))  # the updates pushed their weights into it: restore


def _report(name: str, estimator: str, scope: str | None, start: float, *after: float) -> str:
    trajectory = " -> ".join(f"{r:.3f}" for r in (start, *after))
    line = f"{name}[{estimator}{'-' + scope if scope else ''}] seed {SEED}: mean reward {trajectory}"
    print(line)
    return line


@pytest.mark.parametrize("estimator,scope", CASES, ids=IDS)
def test_rl_raises_the_reward(lab, estimator, scope):
    fam = family(estimator)
    ckpt, start = lab.policy(fam, "noisy")
    final, _ = lab.train(estimator, scope, ckpt, LEARN_ITERS, f"learn-{estimator}-{scope}")
    end = lab.measure(fam, final, f"learn-{estimator}-{scope}")
    line = _report("learn", estimator, scope, start, end)
    assert end - start >= GAIN[fam], f"{line}: gain below the margin {GAIN[fam]}"


@pytest.mark.parametrize("estimator", ["grpo", "gtpo"])
def test_rl_raises_the_reward_from_one_version_stale_samples(lab, estimator):
    """The asynchronous pipeline's k = 1: every rollout after the first is one update behind the policy its
    samples train (importance-weighted, decoupled PPO); it must still learn."""
    fam = family(estimator)
    ckpt, start = lab.policy(fam, "noisy")
    end, _ = lab.train(estimator, None, ckpt, LEARN_ITERS, f"learn-stale-{estimator}", staleness=1)
    after = lab.measure(fam, end, f"learn-stale-{estimator}")
    _report("learn-stale", estimator, None, start, after)
    assert after - start >= GAIN[fam], f"{estimator} with 1-stale samples: {start:.3f} -> {after:.3f}"


def test_gtpo_trained_on_outcome_signal_only_learns(lab):
    """GTPO with ``signal_from=outcomes`` (groups whose outcomes tie train nothing) still learns."""
    fam = family("gtpo")
    ckpt, start = lab.policy(fam, "noisy")
    kw = {"signal_from": "outcomes"}
    final, _ = lab.train("gtpo", None, ckpt, LEARN_ITERS, "learn-gtpo-outcomes", adv_kw=kw)
    end = lab.measure(fam, final, "learn-gtpo-outcomes")
    line = _report("learn", "gtpo", "signal_from_outcomes", start, end)
    assert end - start >= GAIN[fam], f"{line}: gain below the margin {GAIN[fam]}"


def test_murphy_learns_with_its_trees_packed(lab):
    """MURPHY with the tree-packed update (``shared_prefix``: a micro-batch's shared ancestry runs once;
    ``minibatch_by="problem"``: a tree's nodes stay in one minibatch, which changes what each optimizer step
    sees) learns as the plain update does."""
    fam = "secret-code"
    ckpt, start = lab.policy(fam, "noisy")
    packed = {"shared_prefix": True, "minibatch_by": "problem", "micro_batch_size": 4}
    final, _ = lab.train("murphy", None, ckpt, LEARN_ITERS, "learn-murphy-packed", **packed)
    end = lab.measure(fam, final, "learn-murphy-packed")
    line = _report("learn", "murphy", "packed", start, end)
    assert end - start >= GAIN[fam], f"{line}: gain below the margin {GAIN[fam]}"


@pytest.mark.parametrize("estimator,scope", CASES, ids=IDS)
def test_solved_task_stays_solved(lab, estimator, scope):
    fam = family(estimator)
    ckpt, start = lab.policy(fam, "solved")
    assert start >= 0.9, f"the warm start should solve the task, measured {start:.3f}"
    _, after = lab.train(estimator, scope, ckpt, KEEP_ITERS, f"keep-{estimator}-{scope}", measure_each=True)
    line = _report("keep", estimator, scope, start, *after)
    assert min(after) >= KEEP[fam], f"{line}: fell below {KEEP[fam]}"


@pytest.mark.skipif(SEED != 0, reason="the regression's break depends on the seed; measured on seed 0")
def test_the_keep_test_catches_the_group_scope_regression(lab):
    """The old GTPO default (``norm_scope="group"``) pushes a solved policy off its tool call on seed 0: the
    keep test above would fail for it. Guards the guard. The break was measured with fp32 updates (under bf16
    autocast the same seed happens to keep the policy at ~0.93), so this test pins them."""
    ckpt, start = lab.policy("secret-tool", "solved")
    _, after = lab.train(
        "gtpo", "group", ckpt, KEEP_ITERS, "keep-gtpo-group", measure_each=True, dtype="float32"
    )
    line = _report("keep", "gtpo", "group", start, *after)
    assert min(after) < KEEP["secret-tool"], f"{line}: the group scope no longer breaks the solved policy"
