"""Continuous TIR rollouts on real vLLM (tiny model) and the real sandbox: a trajectory's next turn is generated
while another trajectory's tool call is still running in the sandbox, and the trajectories are exactly the
turn-by-turn (barrier) loop's for the same seeds.

The tiny random model never writes code, so each trajectory's first turn is a scripted tool call (the slow
problem's sleeps in the sandbox); every later turn is sampled for real by vLLM through the engine's stream."""

from __future__ import annotations

import numpy as np
import pytest

from maths import prompts
from runtime.engines import Generation, SamplingSpec
from stages.rollout.tir import TirStats, tir_trajectories, turn_seed

SLEEP_S = 3.0
SLOW = {
    "problem_id": "slow/1",
    "kind": "math",
    "prompt": "Wait a little, then compute 6 * 7.",
    "answer": "42",
}
QUICK = {"problem_id": "quick/1", "kind": "math", "prompt": "What is 2 + 2?", "answer": "4"}
SLOW_CALL = f"```python\nimport time\ntime.sleep({SLEEP_S})\nprint(6 * 7)\n```\n"
QUICK_CALL = "```python\nprint(2 + 2)\n```\n"


class HalfScripted:
    """The real engine's stream, except that a first turn (no ```output block in the prompt yet) is a
    scripted tool call returned at the next step. Records every real engine step: (start, end, requests in
    flight)."""

    def __init__(self, engine):
        self.engine, self.tokenizer, self.max_model_len = engine, engine.tokenizer, engine.max_model_len
        self.steps: list[tuple[float, float, int]] = []

    def stream(self):
        return _Stream(self)


class _Stream:
    continuous = True

    def __init__(self, owner: HalfScripted):
        self.owner, self.real, self.scripted = owner, owner.engine.stream(), []

    def add(self, key, prompt, spec: SamplingSpec):
        text = self.owner.tokenizer.decode(prompt)
        if "```output\n" in text:  # a later turn: sampled for real
            self.real.add(key, prompt, spec)
            return
        call = SLOW_CALL if "Wait a little" in text else QUICK_CALL
        ids = prompts.text_ids(self.owner.tokenizer, call)
        stop = next(s for s in spec.stop if call.endswith(s))
        self.scripted.append((key, [Generation(ids, [-1.0] * len(ids), call, "stop", stop)]))

    @property
    def pending(self) -> int:
        return self.real.pending + len(self.scripted)

    def step(self):
        import time

        out, self.scripted = self.scripted, []
        if self.real.pending:
            in_flight, t0 = self.real.pending, time.perf_counter()
            out += self.real.step()
            self.owner.steps.append((t0, time.perf_counter(), in_flight))
        return out

    def close(self):
        self.real.close()


def rollout(engine, barrier: bool):
    eng, stats = HalfScripted(engine), TirStats()
    spec = SamplingSpec(temperature=1.0, max_tokens=48, stop=prompts.TIR_STOP, seed=7)
    rows = tir_trajectories(
        eng, [QUICK, SLOW], group_size=3, max_turns=2, spec=spec, stats=stats, barrier=barrier
    )
    return rows, stats, eng.steps


def without_logprobs(rows):
    return [{**r, "turns": [{**t, "completion_logprobs": None} for t in r["turns"]]} for r in rows]


@pytest.fixture(scope="module")
def both(tiny_engine):
    return rollout(tiny_engine, barrier=True), rollout(tiny_engine, barrier=False)


def test_generation_runs_while_a_tool_call_sleeps(both):
    (_, b_stats, b_steps), (rows, stats, steps) = both
    slow_calls = [
        (a, b) for i, _, kind, a, b in stats.timeline if kind == "execute" and i >= 3
    ]  # SLOW is the second problem
    assert len(slow_calls) == 3 and all(b - a >= SLEEP_S for a, b in slow_calls)
    # continuous: real engine steps (other trajectories' second turns) ran inside a sleeping call's span
    inside = [s for s in steps if s[2] > 0 and any(a <= s[0] and s[1] <= b for a, b in slow_calls)]
    assert inside, f"no engine step during the sleeping tool calls {slow_calls}; steps {steps[:5]}"
    assert stats.overlap_s() > 0
    # barrier: every second turn waits for the slowest tool call, so no step overlaps any call
    b_calls = [(a, b) for _, _, kind, a, b in b_stats.timeline if kind == "execute"]
    assert b_steps and all(s[0] >= max(b for _, b in b_calls) for s in b_steps)
    assert b_stats.overlap_s() == 0
    print(f"wall: barrier {b_stats.wall_s:.2f} s, continuous {stats.wall_s:.2f} s")


def test_continuous_trajectories_equal_the_barrier_loops(both):
    (b_rows, _, _), (rows, stats, _) = both
    assert without_logprobs(rows) == without_logprobs(b_rows)
    for r, b in zip(rows, b_rows, strict=True):
        for t, u in zip(r["turns"], b["turns"], strict=True):
            np.testing.assert_allclose(t["completion_logprobs"], u["completion_logprobs"], atol=1e-4)
    # the structure is the scripted one: a valid tool call that ran, then a sampled turn
    for r in rows:
        first, second = r["turns"]
        assert (first["tool_call"], first["exec_status"]) == ("valid", "ok")
        answer = "42" if r["problem_id"] == "slow/1" else "4"
        assert first["exec_output"] == f"```output\n{answer}\n```\n"
        assert len(second["completion_token_ids"]) >= 1
    assert stats.tool_calls == stats.valid_calls == 6 and stats.tokens > 6 * 5
    # samples of one problem differ (their seeds do), and the seed is a function of (trajectory, turn)
    quick = [r["turns"][1]["completion_token_ids"] for r in rows if r["problem_id"] == "quick/1"]
    assert len({tuple(q) for q in quick}) == 3
    assert len({turn_seed(7, i, k) for i in range(6) for k in range(2)}) == 12


def test_stream_requests_added_mid_flight_sample_as_alone(tiny_engine):
    """vLLM's stream: a request added while others decode samples exactly what it samples alone (its own
    seed); a prompt past the context ends at once; generate() refuses to run under an open stream."""
    from runtime.engines import EngineError

    p = prompts.initial_prompt_ids(tiny_engine.tokenizer, QUICK)
    specs = [SamplingSpec(temperature=1.0, max_tokens=16 + 4 * k, seed=100 + k) for k in range(3)]
    alone = [tiny_engine.generate([p], s)[0][0] for s in specs]  # generate() seeds prompt i with seed + i
    got, steps = {}, 0
    with tiny_engine.stream() as s:
        assert s.continuous
        s.add("a", p, specs[0])
        s.add("long", [p[0]] * tiny_engine.max_model_len, specs[0])
        while s.pending:
            got.update(s.step())
            steps += 1
            if steps == 3:
                s.add("b", p, specs[1])
                with pytest.raises(EngineError, match="in flight"):
                    tiny_engine.generate([p], specs[0])
            if steps == 6:
                s.add("c", p, specs[2])
    assert [got[k][0].token_ids for k in "abc"] == [g.token_ids for g in alone]
    for k, g in zip("abc", alone, strict=True):
        np.testing.assert_allclose(got[k][0].logprobs, g.logprobs, atol=1e-4)
    assert got["long"][0].finish_reason == "context_limit" and got["long"][0].token_ids == []
    with tiny_engine.stream() as s:  # closing drops what is still in flight: the engine is free again
        s.add("x", p, specs[2])
        s.step()
    assert tiny_engine.generate([p], specs[0])[0][0].token_ids == alone[0].token_ids
