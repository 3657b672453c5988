"""Reward functions: small, pure, registered by name and combined by weights (docs/algorithms.md).

A reward function takes the rows it judges and the score parameters and returns one value per row, or None
where it does not apply (a math reward on a code row):

    fn(rows: list[dict], params: ScoreParams) -> list[float | None]

Row keys they read: ``kind`` ("code" | "math"), ``final_answer``, ``answer`` (reference), ``tests_passed``,
``tests_total`` (from the sandbox's TestReport or the rollout's stored counts) and ``turns`` (list of dicts with
``tool_call`` and ``exec_status``). ``combine`` adds the weighted components that apply into the outcome
reward. Register another with ``@register_reward("name")`` and give it a weight in ``ScoreParams.reward_weights``.

Also here: ``math_correct`` (answer equivalence through ``math_verify`` with a numeric fast path),
``format_penalties`` (GTPO r_fmt per turn, vectorised), and ``gtpo_shaping`` (GTPO self-supervised shaping).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

from maths.segments import group_codes, turn_positions
from maths.similarity import get_similarity
from maths.step_rewards import step_rewards
from schemas.params.rewards import ScoreParams
from schemas.registry import Registry

RewardFn = Callable[[Sequence[Mapping], ScoreParams], list[float | None]]
REWARDS: Registry[RewardFn] = Registry("reward function")
register_reward = REWARDS.register
get_reward = REWARDS.lookup


# --- answer equivalence -------------------------------------------------------------------------------------
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_STRIP = re.compile(r"\\[!,;: ]|\\\$|\$|\\%|%|,|\s|^####|\\text\{\s*\}")


def _as_number(text: str) -> float | None:
    """A plain number, a/b fraction or \\frac{a}{b} as a float; None for anything else."""
    s = _STRIP.sub("", text).rstrip(".")
    m = re.fullmatch(r"\\d?frac\{([^{}]+)\}\{([^{}]+)\}", s)
    if m:
        s = f"{m.group(1)}/{m.group(2)}"
    num, _, den = s.partition("/")
    if not _NUMBER.fullmatch(num) or (den and not _NUMBER.fullmatch(den)):
        return None
    try:
        return float(Fraction(num) / Fraction(den)) if den else float(num)
    except (ValueError, ZeroDivisionError):
        return None


def _mv_parse(text: str):
    from math_verify import parse

    limit = 5 if threading.current_thread() is threading.main_thread() else None  # math_verify uses SIGALRM
    for candidate in (f"${text}$", text):
        try:
            parsed = parse(candidate, parsing_timeout=limit)
        except Exception:  # noqa: BLE001 - a parse failure means "not equivalent", never a crash
            parsed = []
        if parsed:
            return parsed
    return []


def math_correct(pred: str | None, ref: str | None, *, rel_tol: float = 1e-6) -> bool:
    """Whether a final answer equals the reference: numbers within ``rel_tol`` (commas, $, % and a/b fractions
    allowed), else symbolic equivalence of the LaTeX/plain forms through ``math_verify``."""
    if pred is None or ref is None or not str(pred).strip() or not str(ref).strip():
        return False
    pred, ref = str(pred).strip(), str(ref).strip()
    a, b = _as_number(pred), _as_number(ref)
    if a is not None and b is not None:
        return math.isclose(a, b, rel_tol=rel_tol, abs_tol=rel_tol)
    gold, guess = _mv_parse(ref), _mv_parse(pred)
    if not gold or not guess:
        return _STRIP.sub("", pred) == _STRIP.sub("", ref)
    from math_verify import verify

    limit = 5 if threading.current_thread() is threading.main_thread() else None
    try:
        return bool(verify(gold, guess, timeout_seconds=limit))
    except Exception:  # noqa: BLE001
        return False


# --- registered reward functions ----------------------------------------------------------------------------
def _code_counts(row: Mapping) -> tuple[int, int]:
    return int(row.get("tests_passed") or 0), int(row.get("tests_total") or 0)


@register_reward("tests_fraction")
def tests_fraction(rows: Sequence[Mapping], params: ScoreParams) -> list[float | None]:
    """Code: fraction of the problem's tests the final program passes."""
    out: list[float | None] = []
    for row in rows:
        passed, total = _code_counts(row)
        out.append(None if row["kind"] != "code" else (passed / total if total else 0.0))
    return out


@register_reward("tests_all_pass")
def tests_all_pass(rows: Sequence[Mapping], params: ScoreParams) -> list[float | None]:
    """Code: 1 if the final program passes every test, else 0."""
    out: list[float | None] = []
    for row in rows:
        passed, total = _code_counts(row)
        out.append(None if row["kind"] != "code" else float(total > 0 and passed == total))
    return out


@register_reward("math_answer")
def math_answer(rows: Sequence[Mapping], params: ScoreParams) -> list[float | None]:
    """Math: 1 if the final answer is equivalent to the reference answer, else 0."""
    return [
        None
        if row["kind"] != "math"
        else float(math_correct(row.get("final_answer"), row.get("answer"), rel_tol=params.math_rel_tol))
        for row in rows
    ]


def last_number(text: str) -> str | None:
    """The last plain number in ``text`` (thousands separators allowed), or None."""
    found = _LAST_NUMBER.findall(text or "")
    return found[-1].replace(",", "") if found else None


_LAST_NUMBER = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d+)?|[+-]?\d+(?:\.\d+)?")


def lenient_answer(text: str) -> str | None:
    """The \\boxed{} answer when there is one, else the text's last number."""
    from maths.prompts import extract_boxed

    boxed = extract_boxed(text or "")
    return boxed if boxed is not None else last_number(text)


@register_reward("math_answer_lenient")
def math_answer_lenient(rows: Sequence[Mapping], params: ScoreParams) -> list[float | None]:
    """Math, for models that do not box their answers yet (small ones, early in training): 1 if the boxed
    answer — or, without one, the last number of the trajectory's last turn (``last_text``) — equals the
    reference, else 0."""
    out: list[float | None] = []
    for row in rows:
        if row["kind"] != "math":
            out.append(None)
            continue
        pred = row.get("final_answer") or lenient_answer(row.get("last_text") or "")
        out.append(float(math_correct(pred, row.get("answer"), rel_tol=params.math_rel_tol)))
    return out


@register_reward("format")
def format_reward(rows: Sequence[Mapping], params: ScoreParams) -> list[float | None]:
    """GTPO r_fmt summed over a trajectory's turns (≤ 0); None for a row without turns."""
    out: list[float | None] = []
    for row in rows:
        turns = row.get("turns") or []
        if not turns:
            out.append(None)
            continue
        pen = format_penalties(
            np.array([t["tool_call"] for t in turns]),
            np.array([t["exec_status"] for t in turns]),
            np.array([len(turns)]),
            penalty=params.format_penalty,
            stack=params.stack_penalties,
        )
        out.append(float(pen.sum()))
    return out


def outcome_weights(params: ScoreParams) -> dict[str, float]:
    """Weights of the outcome reward r_i: ``params.reward_weights``, or by default the code component chosen by
    ``code_reward`` plus ``math_answer``, each with weight 1 (only one applies to a row)."""
    if params.reward_weights is not None:
        return dict(params.reward_weights)
    code = {"fraction": "tests_fraction", "binary": "tests_all_pass"}[params.code_reward]
    return {code: 1.0, "math_answer": 1.0}


def combine(
    rows: Sequence[Mapping], params: ScoreParams, weights: Mapping[str, float] | None = None
) -> tuple[np.ndarray, list[dict[str, float]]]:
    """Weighted sum of the registered components that apply to each row.

    Returns total (N,) float64 and, per row, {component: value} of the components that applied. A row that no
    weighted component applies to is an error naming it.
    """
    weights = outcome_weights(params) if weights is None else weights
    values = {name: get_reward(name)(rows, params) for name in weights}
    total = np.zeros(len(rows))
    components: list[dict[str, float]] = [{} for _ in rows]
    for name, w in weights.items():
        for i, v in enumerate(values[name]):
            if v is not None:
                total[i] += w * v
                components[i][name] = float(v)
    for i, comp in enumerate(components):
        if not comp:
            row = rows[i]
            raise ValueError(
                f"row {i} ({row.get('trajectory_id', row.get('problem_id', '?'))!r}, kind {row.get('kind')!r}): "
                f"none of the reward components {sorted(weights)} applies to it"
            )
    return total, components


# --- GTPO turn rewards --------------------------------------------------------------------------------------
def format_penalties(
    tool_call: np.ndarray,
    exec_status: np.ndarray,
    lengths: np.ndarray,
    *,
    penalty: float = -0.1,
    stack: bool = False,
    invalid: np.ndarray | None = None,
) -> np.ndarray:
    """GTPO r_fmt per turn (M,): ``penalty`` for an invalid tool call (flagged invalid, or a syntax error when
    run) and ``penalty`` for a first turn without any tool call; at most one per turn unless ``stack``.

    tool_call (M,) "none" | "valid" | "invalid"; exec_status (M,); lengths (N,) turns per trajectory.
    """
    if invalid is None:
        invalid = invalid_calls(tool_call, exec_status)
    missing_first = (turn_positions(lengths) == 0) & (tool_call == "none")
    count = invalid.astype(np.int64) + missing_first
    if not stack:
        count = np.minimum(count, 1)
    return penalty * count


def invalid_calls(tool_call: np.ndarray, exec_status: np.ndarray) -> np.ndarray:
    """(M,) bool: turns whose tool call is flagged invalid or raised a syntax error when run."""
    return (tool_call == "invalid") | (exec_status == "syntax_error")


def turn_rewards(final_reward: np.ndarray, penalties: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """GTPO r_ij (M,) = r_acc_ij + r_fmt_ij: the (possibly shaped) final reward on each trajectory's last turn.

    final_reward (N,); penalties (M,); lengths (N,)."""
    out = penalties.astype(np.float64, copy=True)
    last = np.cumsum(lengths) - 1
    out[last] += final_reward
    return out


def gtpo_shaping(
    codes: Sequence[str | None],
    success,
    group_ids,
    *,
    alpha: float = 0.5,
    similarity: str = "lexical",
    similarity_options: Mapping | None = None,
) -> np.ndarray:
    """GTPO self-supervised shaping: shaped final accuracy rewards (N,).

    codes (N,): concatenated code blocks of each trajectory; success (N,) bool; group_ids (N,). A success gets
    1; a failure whose group has successes P gets α · mean_{p∈P} sim(code_i, code_p) (< 1 since α < 1, sim ≤ 1);
    a failure without a successful sibling gets 0.
    """
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha must be in [0, 1) so a shaped failure earns less than a success, got {alpha}"
        )
    ok = np.asarray(success, dtype=bool).reshape(-1)
    codes_list = list(codes)
    gcodes, n_groups = group_codes(group_ids)
    if not (len(codes_list) == ok.size == gcodes.size):
        raise ValueError(
            f"codes ({len(codes_list)}), success ({ok.size}) and group_ids ({gcodes.size}) differ in length"
        )
    if ok.size == 0:
        raise ValueError("codes is empty: no groups to shape")
    return _shape(codes_list, ok, gcodes, n_groups, alpha, similarity, similarity_options)


def _shape(codes, ok, gcodes, n_groups, alpha, similarity, similarity_options) -> np.ndarray:
    mean_sim = get_similarity(similarity)(codes, ok, gcodes, n_groups, **dict(similarity_options or {}))
    shaped = np.where(np.isnan(mean_sim), 0.0, alpha * np.nan_to_num(mean_sim))
    return np.where(ok, 1.0, shaped)


# --- the whole reward of a batch of trajectories ----------------------------------------------------------------
@dataclass
class TrajectoryRewards:
    """Everything the score stage writes for N trajectories of M turns in all.

    outcome (N,): weighted components r_i before gating; correct (N,): success (all tests pass / right answer);
    reward (N,): the GRPO r_i (0 where a turn made an invalid call and ``format_gate``); format_error (N,);
    penalties (M,): GTPO r_fmt; shaped (N,) bool: failures whose final reward was shaped; final (N,): the
    (shaped) final accuracy reward on the last turn; turn_reward (M,): GTPO r_ij = r_acc + r_fmt;
    components: per row {component: value} plus ``outcome``, ``format`` and, when shaped, ``shaped``.
    """

    outcome: np.ndarray
    correct: np.ndarray
    reward: np.ndarray
    format_error: np.ndarray
    penalties: np.ndarray
    shaped: np.ndarray
    final: np.ndarray
    turn_reward: np.ndarray
    components: list[dict[str, float]]


def is_correct(row: Mapping, components: Mapping[str, float], params: ScoreParams) -> bool:
    """Success of a trajectory: all tests pass (code) / the final answer is right (math)."""
    if row["kind"] == "code":
        return bool(row.get("tests_total") and row.get("tests_passed") == row["tests_total"])
    for name in ("math_answer", "math_answer_lenient"):  # the answer reward the run scores with
        if name in components:
            return components[name] == 1.0
    return math_correct(row.get("final_answer"), row.get("answer"), rel_tol=params.math_rel_tol)


def trajectory_rewards(
    rows: Sequence[Mapping],
    tool_call: np.ndarray,
    exec_status: np.ndarray,
    lengths: np.ndarray,
    group_ids,
    params: ScoreParams,
) -> TrajectoryRewards:
    """Outcome, correctness, format penalties, shaping and turn rewards of N trajectories, in one pass.

    rows (N,): dicts with ``kind``, ``final_answer``, ``answer``, ``tests_passed``/``tests_total`` (code) and
    ``code`` (the trajectory's code blocks joined, for shaping); tool_call, exec_status (M,) per turn;
    lengths (N,); group_ids (N,). The invalid-call mask and the group codes are computed once here.
    """
    n = len(rows)
    outcome, components = combine(rows, params)
    correct = np.array([is_correct(r, c, params) for r, c in zip(rows, components, strict=True)], dtype=bool)
    invalid = invalid_calls(tool_call, exec_status)
    penalties = format_penalties(
        tool_call, exec_status, lengths, penalty=params.format_penalty, stack=params.stack_penalties,
        invalid=invalid,
    )  # fmt: skip
    traj_of_turn = np.repeat(np.arange(n), lengths)
    format_error = np.bincount(traj_of_turn, weights=invalid, minlength=n) > 0
    final = outcome.copy()
    shaped = np.zeros(n, bool)
    if params.shaping and n:
        gcodes, n_groups = group_codes(group_ids, what="group_id")
        value = _shape(
            [r["code"] for r in rows], correct, gcodes, n_groups, params.shaping_alpha, params.similarity,
            {"embedding_model": params.embedding_model},
        )  # fmt: skip
        has_success = (np.bincount(gcodes, weights=correct, minlength=n_groups) > 0)[gcodes]
        shaped = ~correct & has_success
        final = np.where(shaped, np.maximum(outcome, value), outcome)
    steps = np.zeros_like(penalties, dtype=np.float64)
    if params.step_reward > 0:  # verified steps: rows carry "steps", their turns "exec_output"
        turns = [t for r in rows for t in r["turns"]]
        steps = step_rewards(
            [r.get("steps") or [] for r in rows],
            [t.get("exec_output") for t in turns],
            [t["exec_status"] for t in turns],
            lengths,
            params.step_reward,
        )
    turn_reward = turn_rewards(final, penalties + steps, lengths)
    reward = np.where(format_error & params.format_gate, 0.0, outcome)
    fmt_total = np.bincount(traj_of_turn, weights=penalties, minlength=n)
    for i, c in enumerate(components):
        c["outcome"], c["format"] = float(outcome[i]), float(fmt_total[i])
        if shaped[i]:
            c["shaped"] = float(final[i])
    if params.step_reward > 0:
        for i, v in enumerate(np.bincount(traj_of_turn, weights=steps, minlength=n)):
            components[i]["steps"] = float(v)
    return TrajectoryRewards(
        outcome, correct, reward, format_error, penalties, shaped, final, turn_reward, components
    )


NODE_REWARDS: Registry[Callable[[np.ndarray], np.ndarray]] = Registry(
    "code reward",
    {"fraction": lambda frac: frac, "binary": lambda frac: (frac == 1.0).astype(np.float64)}.items(),
)


def node_rewards(passed: np.ndarray, total: np.ndarray, code_reward: str) -> tuple[np.ndarray, np.ndarray]:
    """MURPHY r(n) (K,) from test counts: fraction passed or all-pass (``code_reward``); a node without tests
    gets 0. Returns (reward, fraction passed)."""
    frac = np.where(total <= 0, 0.0, passed / np.maximum(total, 1))
    return NODE_REWARDS.lookup(code_reward)(frac), frac
