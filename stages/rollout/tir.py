"""Tool-integrated reasoning (TIR) rollouts for GRPO / GTPO: G multi-turn trajectories per problem.

Per turn, every unfinished trajectory of the batch (all problems x G samples) is one prompt of one
``engine.generate`` call: its whole context so far as token ids. Generation stops at the end of a fenced
python block (``prompts.TIR_STOP``); the block runs in the sandbox as the next cell of a notebook (earlier
valid cells are re-run first with their output suppressed, so variables persist; a bare last expression is
printed, as a notebook shows it); the output, truncated, comes back as a ```output block whose tokens are
appended to the context (loss mask 0). Token-in, token-out: the next prompt is ``context + completion ids +
observation ids``; nothing is re-tokenised.

A trajectory ends when a turn ends without a tool call (eos: "answer"), at ``max_turns`` ("max_turns"),
when the context is full ("context_limit") or a turn is cut by the per-turn ``max_tokens`` ("max_tokens"). Its final answer is the last
``\\boxed{}`` (math) or the last code block (code) of the whole transcript.

Per turn: tool_call "none" | "valid" (the block parsed) | "invalid" (no closed block, or a syntax error);
exec_status "none" | "ok" | "error" | "timeout" | "memory" | "syntax_error" | "no_code" | "sandbox_error".

Layout of a trajectory as one training sequence (what ``maths.samples`` rebuilds):
``prompt_token_ids + Σ_turns (completion_token_ids [mask 1] + observation_token_ids [mask 0])``.
"""

from __future__ import annotations

import ast
import time
from dataclasses import dataclass, field
from typing import Any

from maths import prompts
from runtime import progress
from runtime.engines import SamplingSpec
from schemas.params.rollout import RolloutParams

_DEFAULTS = RolloutParams()  # the one place rollout defaults are declared

NO_CODE_MESSAGE = "Error: no complete ```python code block found; write code between ```python and ```."


@dataclass
class Trajectory:
    problem: dict
    sample_idx: int
    group_id: str
    prompt_ids: list[int]
    context: list[int]
    turns: list[dict] = field(default_factory=list)
    cells: list[str] = field(default_factory=list)  # code of earlier valid, non-timed-out tool calls
    stop_reason: str | None = None


@dataclass
class TirStats:
    tokens: int = 0
    generate_s: float = 0.0
    sandbox_s: float = 0.0
    tool_calls: int = 0
    valid_calls: int = 0


# --- notebook cells ------------------------------------------------------------------------------------------
def notebook_program(cells: list[str], code: str) -> str:
    """A program that replays ``cells`` silently (errors ignored) and then runs ``code`` as a notebook cell:
    its own line numbers in tracebacks, a bare last expression's repr printed."""
    return (
        "import ast as _tt_ast, contextlib as _tt_cl, io as _tt_io\n"
        f"for _tt_src in {cells!r}:\n"
        "    with _tt_cl.redirect_stdout(_tt_io.StringIO()), _tt_cl.redirect_stderr(_tt_io.StringIO()):\n"
        "        try:\n"
        "            exec(compile(_tt_src, '<previous cell>', 'exec'), globals())\n"
        "        except BaseException:\n"
        "            pass\n"
        f"_tt_tree = _tt_ast.parse({code!r}, '<cell>')\n"
        "_tt_last = None\n"
        "if _tt_tree.body and isinstance(_tt_tree.body[-1], _tt_ast.Expr):\n"
        "    _tt_last = _tt_ast.Expression(_tt_tree.body.pop().value)\n"
        "exec(compile(_tt_tree, '<cell>', 'exec'), globals())\n"
        "if _tt_last is not None:\n"
        "    _tt_value = eval(compile(_tt_last, '<cell>', 'eval'), globals())\n"
        "    if _tt_value is not None:\n"
        "        print(repr(_tt_value))\n"
    )


def syntax_error_text(code: str) -> str | None:
    """Python's own one-paragraph message for a syntax error in ``code``, or None when it parses."""
    try:
        ast.parse(code, "<cell>")
    except SyntaxError as e:
        line = (e.text or "").rstrip("\n")
        caret = " " * max(0, (e.offset or 1) - 1) + "^" if line else ""
        return f'  File "<cell>", line {e.lineno}\n    {line}\n    {caret}\nSyntaxError: {e.msg}'.replace(
            "\n    \n", "\n"
        )
    except (ValueError, RecursionError) as e:  # null bytes, absurd nesting
        return f"SyntaxError: {e}"
    return None


def _status(result) -> tuple[str, str]:
    """(exec_status, output text) of an ExecutionResult."""
    out = (result.stdout or "") + (result.stderr or "")
    if result.error:
        return "sandbox_error", f"sandbox error: {result.error}"
    if result.timed_out:
        return "timeout", out + "\nTimeoutError: the cell ran past its time limit"
    if result.memory_exceeded:
        return "memory", out + "\nMemoryError: the cell ran out of memory"
    return ("ok" if result.returncode == 0 else "error"), out


# --- the loop ---------------------------------------------------------------------------------------------------
def _turn(gen, turn_idx: int) -> dict:
    return {
        "turn_idx": turn_idx,
        "completion_token_ids": gen.token_ids,
        "completion_logprobs": gen.logprobs,
        "observation_token_ids": [],
        "text": gen.text,
        "code": None,
        "tool_call": "none",
        "exec_status": "none",
        "exec_output": None,
        "turn_reward": None,
    }


def _final_answer(traj: Trajectory, tokenizer) -> str | None:
    text = "".join(t["text"] or "" for t in traj.turns)
    if traj.problem.get("kind") == "code":
        return prompts.extract_code(text)
    return prompts.extract_boxed(text)


def run_turns(
    engine,
    trajs: list[Trajectory],
    *,
    max_turns: int,
    spec: SamplingSpec,
    max_context_tokens: int,
    observation_max_chars: int,
    exec_timeout_s: float,
    stats: TirStats,
    progress_stage: str | None = None,
) -> None:
    """Advance every trajectory to its end, one batched generate call and one sandbox batch per turn
    (``progress_stage``: report each finished turn to ``runtime.progress`` under that name)."""
    from runtime.sandbox import execute_many

    tok = engine.tokenizer
    stop = list(spec.stop) or list(prompts.TIR_STOP)
    for turn_idx in range(max_turns):
        live = [t for t in trajs if t.stop_reason is None]
        for t in live:
            if max_context_tokens - len(t.context) <= 0:
                t.stop_reason = "context_limit"
        live = [t for t in live if t.stop_reason is None]
        if not live:
            break
        if progress_stage:
            progress.report(
                progress_stage, turn_idx, max_turns, f"turn {turn_idx + 1}: {len(live)} generating"
            )
        specs = [
            SamplingSpec(
                n=1,
                temperature=spec.temperature,
                top_p=spec.top_p,
                max_tokens=min(spec.max_tokens, max_context_tokens - len(t.context)),
                stop=stop,
                seed=None if spec.seed is None else spec.seed + 7919 * turn_idx + 131 * k,
            )
            for k, t in enumerate(live)
        ]
        t0 = time.perf_counter()
        gens = [g[0] for g in engine.generate([t.context for t in live], specs)]
        stats.generate_s += time.perf_counter() - t0
        jobs: list[tuple[Trajectory, dict, str, bool]] = []  # (traj, turn, code, opened)
        for t, gen in zip(live, gens, strict=True):
            turn = _turn(gen, turn_idx)
            t.turns.append(turn)
            t.context = t.context + gen.token_ids
            stats.tokens += len(gen.token_ids)
            if gen.finish_reason == "context_limit":
                t.stop_reason = "context_limit"
                continue
            if gen.stop_str not in stop:  # eos, or cut by max_tokens
                full = len(t.context) >= max_context_tokens
                t.stop_reason = (
                    "answer" if gen.finish_reason == "stop" else ("context_limit" if full else "max_tokens")
                )
                continue
            opened = gen.stop_str == "```output"
            code = prompts.extract_code(gen.text)
            stats.tool_calls += 1
            turn["code"] = code
            if code is None:
                turn.update(tool_call="invalid", exec_status="no_code")
                _observe(t, turn, tok, NO_CODE_MESSAGE, observation_max_chars, opened)
                continue
            err = syntax_error_text(code)
            if err is not None:
                turn.update(tool_call="invalid", exec_status="syntax_error")
                _observe(t, turn, tok, err, observation_max_chars, opened)
                continue
            turn["tool_call"] = "valid"
            stats.valid_calls += 1
            jobs.append((t, turn, code, opened))
        if jobs:
            t0 = time.perf_counter()
            results = execute_many(
                [notebook_program(t.cells, code) for t, _, code, _ in jobs], timeout_s=exec_timeout_s
            )
            stats.sandbox_s += time.perf_counter() - t0
            for (t, turn, code, opened), res in zip(jobs, results, strict=True):
                status, output = _status(res)
                turn["exec_status"] = status
                if status != "timeout":
                    t.cells.append(code)
                _observe(t, turn, tok, output, observation_max_chars, opened)
    for t in trajs:
        if t.stop_reason is None:
            t.stop_reason = "max_turns"
    if progress_stage:
        progress.report(progress_stage, max_turns, max_turns, f"{len(trajs)} trajectories")


def _observe(t: Trajectory, turn: dict, tok, output: str, max_chars: int, opened: bool) -> None:
    """Append the observation to the turn (text and ids) and to the context."""
    text = prompts.format_observation(output, max_chars, opened=opened)
    ids = prompts.text_ids(tok, text)
    turn["exec_output"] = text
    turn["observation_token_ids"] = ids
    t.context = t.context + ids


def tir_trajectories(
    engine,
    problems: list[dict],
    *,
    group_size: int,
    max_turns: int,
    spec: SamplingSpec,
    max_context_tokens: int | None = None,
    observation_max_chars: int = _DEFAULTS.observation_max_chars,
    exec_timeout_s: float = _DEFAULTS.exec_timeout_s,
    group_prefix: str = "",
    stats: TirStats | None = None,
    progress_stage: str | None = None,
) -> list[dict]:
    """Rows of ``schemas.tables.TRAJECTORIES`` (reward fields None): ``group_size`` trajectories per problem.

    ``engine``: anything with ``.tokenizer`` and ``.generate(prompts, specs)`` (runtime.engines.Engine).
    ``spec``: sampling settings of every turn (``spec.n`` is ignored: ``group_size`` samples are drawn;
    ``spec.stop`` defaults to ``prompts.TIR_STOP``). ``group_id`` = ``group_prefix + problem_id``,
    ``trajectory_id`` = ``group_id/sample_idx``. Problems whose prompt cannot be built (empty prompt,
    unknown kind) raise ValueError naming them: filter them first (``stages.rollout.usable_problems``).
    """
    stats = stats if stats is not None else TirStats()
    limit = max_context_tokens or getattr(engine, "max_model_len", None) or 1 << 30
    trajs = []
    for p in problems:
        prompt = prompts.initial_prompt_ids(engine.tokenizer, p)
        gid = f"{group_prefix}{p['problem_id']}"
        trajs += [Trajectory(p, i, gid, prompt, list(prompt)) for i in range(group_size)]
    run_turns(
        engine,
        trajs,
        max_turns=max_turns,
        spec=spec,
        max_context_tokens=limit,
        observation_max_chars=observation_max_chars,
        exec_timeout_s=exec_timeout_s,
        stats=stats,
        progress_stage=progress_stage,
    )
    return [_row(t, engine.tokenizer) for t in trajs]


def _row(t: Trajectory, tok) -> dict[str, Any]:
    return {
        "trajectory_id": f"{t.group_id}/{t.sample_idx}",
        "problem_id": t.problem["problem_id"],
        "group_id": t.group_id,
        "sample_idx": t.sample_idx,
        "prompt_token_ids": t.prompt_ids,
        "turns": t.turns,
        "final_answer": _final_answer(t, tok),
        "stop_reason": t.stop_reason or "error",
        "correct": None,
        "reward": None,
        "reward_components": None,
    }
