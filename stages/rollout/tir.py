"""Tool-integrated reasoning (TIR) rollouts for GRPO / GTPO: G multi-turn trajectories per problem.

Every trajectory's context so far (token ids) is one request of the engine's stream
(``runtime.engines.GenerationStream``): on vLLM, requests join the running batch step by step, so a
trajectory whose tool result is back starts its next turn at once while the others keep generating, and tool
calls run in the sandbox pool (threads) while the engine steps; engines that generate in rounds (transformers)
go turn by turn (``barrier``). Each turn's seed depends only on (seed, trajectory = problem position x G +
sample, turn) (``turn_seed``), so the trajectories do not depend on the scheduling. Generation stops at the end of a fenced
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
from concurrent.futures import FIRST_COMPLETED, Future, wait
from dataclasses import dataclass, field
from typing import Any

from maths import prompts
from runtime import progress
from runtime.engines import GenerationStream, SamplingSpec
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
    """``generate_s``: seconds inside engine steps; ``sandbox_s``: seconds spent only waiting for the sandbox
    (nothing to generate meanwhile); ``wall_s``: the whole loop; ``timeline``: (trajectory index, turn,
    "generate" | "execute", start, end) per turn and tool call, ``time.perf_counter`` seconds."""

    tokens: int = 0
    generate_s: float = 0.0
    sandbox_s: float = 0.0
    tool_calls: int = 0
    valid_calls: int = 0
    wall_s: float = 0.0
    timeline: list[tuple[int, int, str, float, float]] = field(default_factory=list)

    def overlap_s(self) -> float:
        """Seconds during which a tool call ran while another trajectory was generating."""
        gen = _union([(a, b) for _, _, k, a, b in self.timeline if k == "generate"])
        exe = _union([(a, b) for _, _, k, a, b in self.timeline if k == "execute"])
        return sum(max(0.0, min(b, d) - max(a, c)) for a, b in gen for c, d in exe)


def _union(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    out: list[tuple[float, float]] = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


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


def turn_seed(base: int | None, index: int, turn_idx: int) -> int | None:
    """The sampling seed of one turn of trajectory ``index`` (problem position x G + sample): a function of
    (base, problem, sample, turn) only, so a trajectory samples the same tokens whatever else shares the batch,
    in whatever order turns reach the engine. (First turns keep the seeds of the old turn-by-turn loop, which
    the learning tests' margins were measured with.)"""
    return None if base is None else base + 7919 * turn_idx + 132 * index


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
    barrier: bool = False,
    indices: list[int] | None = None,
) -> None:
    """Advance every trajectory to its end (``progress_stage``: report progress to ``runtime.progress``).

    Continuous (the default on an engine whose stream is continuous, i.e. vLLM): a finished turn's tool call
    goes to the sandbox pool at once, and the trajectory's next turn joins the running batch as soon as its
    observation is back, while the other trajectories keep generating. ``barrier`` (and engines that generate
    in rounds): one generation round per turn, then that turn's sandbox calls, then the next turn. Seeds are
    per (trajectory, turn) (``turn_seed``), so both give the same trajectories."""
    from runtime.sandbox import default_pool

    if not 0 < exec_timeout_s <= 3600:
        raise ValueError(f"exec_timeout_s must be in (0, 3600], got {exec_timeout_s}")
    pool = default_pool()
    tok = engine.tokenizer
    stop = list(spec.stop) or list(prompts.TIR_STOP)
    stream = engine.stream() if hasattr(engine, "stream") else GenerationStream(engine)
    barrier = barrier or not stream.continuous
    ready = list(range(len(trajs)))  # trajectories whose next turn may start
    held: list[tuple[int, dict, str, bool]] = []  # valid tool calls to submit (barrier: once the turn ends)
    running: dict[Future, tuple[int, dict, str, bool, float]] = {}
    started: dict[int, float] = {}
    report = _Reporter(progress_stage, len(trajs))
    t_wall = time.perf_counter()
    try:
        while True:
            if ready and (not barrier or not (stream.pending or running or held)):
                for i in ready:
                    _start_turn(
                        stream,
                        trajs[i],
                        i,
                        i if indices is None else indices[i],
                        spec,
                        stop,
                        max_turns,
                        max_context_tokens,
                        started,
                    )
                    if trajs[i].stop_reason is not None:
                        report.done(stream.pending, len(running))
                ready = []
            if held and (not barrier or not stream.pending):
                for i, turn, code, opened in held:
                    fut = pool.submit_execute(
                        notebook_program(trajs[i].cells, code), timeout_s=exec_timeout_s
                    )
                    running[fut] = (i, turn, code, opened, time.perf_counter())
                held = []
            if not (stream.pending or running):
                break
            if stream.pending:
                t0 = time.perf_counter()
                finished = stream.step()
                stats.generate_s += time.perf_counter() - t0
                for i, gens in finished:
                    t = trajs[i]
                    stats.timeline.append((i, len(t.turns), "generate", started.pop(i), time.perf_counter()))
                    job = _end_turn(t, gens[0], stop, max_context_tokens, tok, observation_max_chars, stats)
                    if job is not None:
                        held.append((i, *job))
                    elif t.stop_reason is None:
                        ready.append(i)
                    else:
                        report.done(stream.pending, len(running) + len(held))
            else:
                t0 = time.perf_counter()
                wait(running, return_when=FIRST_COMPLETED)
                stats.sandbox_s += time.perf_counter() - t0
            for fut in [f for f in running if f.done()]:
                i, turn, code, opened, t0 = running.pop(fut)
                t = trajs[i]
                stats.timeline.append((i, turn["turn_idx"], "execute", t0, time.perf_counter()))
                status, output = _status(fut.result())
                turn["exec_status"] = status
                if status != "timeout":
                    t.cells.append(code)
                _observe(t, turn, tok, output, observation_max_chars, opened)
                ready.append(i)
    finally:
        stream.close()
    stats.wall_s += time.perf_counter() - t_wall
    report.done(0, 0, final=True)


def _start_turn(
    stream, t: Trajectory, i: int, index: int, spec, stop, max_turns: int, limit: int, started
) -> None:
    """Add ``t``'s next turn to the stream, or end it (``max_turns``, ``context_limit``)."""
    if len(t.turns) >= max_turns:
        t.stop_reason = "max_turns"
        return
    room = limit - len(t.context)
    if room <= 0:
        t.stop_reason = "context_limit"
        return
    seed = turn_seed(spec.seed, index, len(t.turns))
    turn_spec = SamplingSpec(
        n=1, temperature=spec.temperature, top_p=spec.top_p, max_tokens=min(spec.max_tokens, room),
        stop=stop, seed=seed,
    )  # fmt: skip
    started[i] = time.perf_counter()
    stream.add(i, t.context, turn_spec)


def _end_turn(t: Trajectory, gen, stop, limit: int, tok, max_chars: int, stats: TirStats):
    """Record a generated turn; returns (turn, code, opened) when it made a valid tool call to execute, else
    None (the trajectory ended, or an invalid call was answered at once)."""
    turn = _turn(gen, len(t.turns))
    t.turns.append(turn)
    t.context = t.context + gen.token_ids
    stats.tokens += len(gen.token_ids)
    if gen.finish_reason == "context_limit":
        t.stop_reason = "context_limit"
        return None
    if gen.stop_str not in stop:  # eos, or cut by max_tokens
        full = len(t.context) >= limit
        t.stop_reason = (
            "answer" if gen.finish_reason == "stop" else ("context_limit" if full else "max_tokens")
        )
        return None
    opened = gen.stop_str == "```output"
    code = prompts.extract_code(gen.text)
    stats.tool_calls += 1
    turn["code"] = code
    if code is None:
        turn.update(tool_call="invalid", exec_status="no_code")
        _observe(t, turn, tok, NO_CODE_MESSAGE, max_chars, opened)
        return None
    err = syntax_error_text(code)
    if err is not None:
        turn.update(tool_call="invalid", exec_status="syntax_error")
        _observe(t, turn, tok, err, max_chars, opened)
        return None
    turn["tool_call"] = "valid"
    stats.valid_calls += 1
    return turn, code, opened


class _Reporter:
    """Progress in finished trajectories, at most every 2 s (a hook may be a Prefect API call)."""

    def __init__(self, stage: str | None, total: int) -> None:
        self.stage, self.total, self.finished, self.last = stage, total, 0, 0.0

    def done(self, generating: int, executing: int, final: bool = False) -> None:
        self.finished = self.total if final else self.finished + 1
        now = time.perf_counter()
        if self.stage and (final or now - self.last >= 2.0):
            self.last = now
            message = f"{self.finished}/{self.total} trajectories done"
            if not final:
                message += f", {generating} generating, {executing} in the sandbox"
            progress.report(self.stage, self.finished, self.total, message)


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
    barrier: bool = False,
    positions: list[int] | None = None,
) -> list[dict]:
    """Rows of ``schemas.tables.TRAJECTORIES`` (reward fields None): ``group_size`` trajectories per problem.

    ``engine``: anything with ``.tokenizer`` and ``.generate(prompts, specs)`` (runtime.engines.Engine; its
    ``.stream()`` when it has one). ``barrier``: turn by turn even on a continuous engine (benchmarks, tests).
    ``spec``: sampling settings of every turn (``spec.n`` is ignored: ``group_size`` samples are drawn;
    ``spec.stop`` defaults to ``prompts.TIR_STOP``). ``group_id`` = ``group_prefix + problem_id``,
    ``trajectory_id`` = ``group_id/sample_idx``. Problems whose prompt cannot be built (empty prompt,
    unknown kind) raise ValueError naming them: filter them first (``stages.rollout.usable_problems``).
    ``positions``: each problem's place in the stage's whole problem list, when this call rolls out one shard
    of it (``stages.rollout.fanout``): seeds follow a trajectory's global index (place x G + sample), so a
    shard samples exactly what the whole batch would have.
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
        barrier=barrier,
        indices=None
        if positions is None
        else [q * group_size + k for q in positions for k in range(group_size)],
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
