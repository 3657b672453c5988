"""Rollout stage on real vLLM (CPU, tiny model) and the real sandbox.

The tiny random model never writes code, so the multi-turn structure is driven by ``ScriptedEngine``: it wraps
the real engine, returns fixed completions (token ids of scripted texts) and attaches the real model's
log-probs of exactly those tokens (``engine.score``), so everything downstream — stop handling, notebook
execution in the sandbox, observation tokens, tables, sample layout — runs for real. Free sampling by the real
engine is tested too (stage runs, context overflow, log-prob agreement)."""

from __future__ import annotations

import types
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pytest

from maths import prompts
from runtime.engines import Generation, SamplingSpec
from runtime.tableio import read_table, write_table
from schemas.params.rollout import RolloutParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES
from stages.rollout import run, select_problems, usable_problems
from stages.rollout.tir import notebook_program, tir_trajectories
from stages.rollout.tree import refinement_trees


class ScriptedEngine:
    """Engine stand-in: ``script(prompt_text) -> (completion text, ends with eos)``; ids are the tokenised
    text, log-probs the real engine's. ``stop_str`` is the spec's stop string the text ends with."""

    def __init__(self, engine, script: Callable[[str], tuple[str, bool]]):
        self.engine, self.script = engine, script
        self.tokenizer, self.max_model_len = engine.tokenizer, engine.max_model_len
        self.calls = 0

    def generate(self, prompt_ids, specs):
        specs = [specs] * len(prompt_ids) if isinstance(specs, SamplingSpec) else specs
        out = []
        for p, s in zip(prompt_ids, specs, strict=True):
            text, eos = self.script(self.tokenizer.decode(p))
            ids = prompts.text_ids(self.tokenizer, text) + ([self.tokenizer.eos_token_id] if eos else [])
            lps = self.engine.score([p], [ids])[0]
            stop = next((st for st in s.stop if text.endswith(st)), None)
            out.append([Generation(ids, lps, self.engine.decode(ids), "stop", stop) for _ in range(s.n)])
        self.calls += 1
        return out


MATH = {"problem_id": "m/1", "kind": "math", "prompt": "What is 17 * 23?", "answer": "391"}
TURNS = [
    ("I will compute it.\n```python\nx = 17 * 23\nprint(x)\n```\n", False),  # valid, ok
    ("Check with the variable from before.\n```python\nx + 1\n```\n", False),  # notebook state, bare expr
    ("```python\nprint(undefined_name)\n```output", False),  # runtime error; model opened the output block
    ("```python\nprint(1 +)\n```\n", False),  # syntax error -> invalid
    ("Some prose and an unclosed fence\n```\n", False),  # stop at a fence with no code -> invalid
    ("So the answer is \\boxed{391}.", True),
]


def turn_script(prompt_text: str) -> tuple[str, bool]:
    return TURNS[prompt_text.count("```output\n")]  # the system prompt mentions "```output block"


@pytest.fixture(scope="module")
def tir_rows(tiny_engine):
    eng = ScriptedEngine(tiny_engine, turn_script)
    spec = SamplingSpec(temperature=1.0, max_tokens=64, stop=prompts.TIR_STOP, seed=0)
    return eng, tir_trajectories(eng, [MATH], group_size=2, max_turns=8, spec=spec, group_prefix="it1/")


def test_tir_transcript_decodes_exactly_and_records_turns(tir_rows, tiny_engine):
    eng, rows = tir_rows
    tok = tiny_engine.tokenizer
    assert len(rows) == 2 and eng.calls == len(TURNS)  # both samples batched in one call per turn
    row = rows[0]
    assert row["group_id"] == "it1/m/1" and row["trajectory_id"] == "it1/m/1/0"
    turns = row["turns"]
    assert [t["tool_call"] for t in turns] == ["valid", "valid", "valid", "invalid", "invalid", "none"]
    assert [t["exec_status"] for t in turns] == ["ok", "ok", "error", "syntax_error", "no_code", "none"]
    assert row["stop_reason"] == "answer" and row["final_answer"] == "391"
    assert turns[0]["exec_output"] == "```output\n391\n```\n"
    assert turns[1]["exec_output"] == "```output\n392\n```\n"  # x survived; bare expression printed
    assert turns[2]["exec_output"].startswith("\n") and "NameError" in turns[2]["exec_output"]
    assert "SyntaxError" in turns[3]["exec_output"] and "no complete" in turns[4]["exec_output"]
    assert turns[-1]["observation_token_ids"] == []
    # the stored ids decode back to the exact transcript
    ids = list(row["prompt_token_ids"])
    expected = tok.decode(row["prompt_token_ids"])
    for (text, eos), t in zip(TURNS, turns, strict=True):
        ids += t["completion_token_ids"] + t["observation_token_ids"]
        expected += text + ("<|im_end|>" if eos else "") + (t["exec_output"] or "")
        assert len(t["completion_logprobs"]) == len(t["completion_token_ids"])
    assert tok.decode(ids) == expected
    assert expected.startswith(tok.decode(prompts.initial_prompt_ids(tok, MATH)))


def test_tir_loss_mask_zero_exactly_on_prompt_and_observations(tir_rows, tiny_engine):
    from maths.samples import trajectory_samples

    _, rows = tir_rows
    table = pa.Table.from_pylist(rows, schema=TRAJECTORIES)
    n_turns = sum(len(r["turns"]) for r in rows)
    cols = trajectory_samples(table, np.ones(n_turns))
    row = rows[0]
    mask = np.array(cols["loss_mask"][0].as_py())
    lp = np.array(cols["rollout_logprobs"][0].as_py())
    expected_mask = [0] * len(row["prompt_token_ids"])
    expected_lp = [0.0] * len(row["prompt_token_ids"])
    for t in row["turns"]:
        expected_mask += [1] * len(t["completion_token_ids"]) + [0] * len(t["observation_token_ids"])
        expected_lp += t["completion_logprobs"] + [0.0] * len(t["observation_token_ids"])
    assert mask.tolist() == expected_mask
    np.testing.assert_allclose(lp, expected_lp, rtol=1e-6)
    ids = np.array(cols["input_ids"][0].as_py())
    trained = tiny_engine.tokenizer.decode(ids[mask == 1].tolist())
    assert trained == "".join(text for text, _ in TURNS) + "<|im_end|>"


def test_tir_rows_write_valid_table(tir_rows, tmp_path):
    _, rows = tir_rows
    ref = write_table(rows, TRAJECTORIES, tmp_path / "t.parquet")
    back = read_table(ref.uri, TRAJECTORIES).to_pylist()
    assert back[0]["turns"][0]["completion_token_ids"] == rows[0]["turns"][0]["completion_token_ids"]
    assert back[0]["reward"] is None and back[0]["turns"][0]["turn_reward"] is None


def test_tir_context_overflow_is_recorded_not_raised(tiny_engine):
    tok = tiny_engine.tokenizer
    limit = len(prompts.initial_prompt_ids(tok, MATH)) + 6
    spec = SamplingSpec(temperature=1.0, max_tokens=64, stop=prompts.TIR_STOP, seed=1)
    rows = tir_trajectories(
        tiny_engine, [MATH], group_size=3, max_turns=3, spec=spec, max_context_tokens=limit
    )
    for r in rows:
        total = len(r["prompt_token_ids"]) + sum(
            len(t["completion_token_ids"]) + len(t["observation_token_ids"]) for t in r["turns"]
        )
        assert r["stop_reason"] in ("context_limit", "answer")
        if r["stop_reason"] == "context_limit":
            assert total >= limit
    # a prompt already past the engine's context: an empty recorded turn, not an exception
    huge = {**MATH, "prompt": "x " * (tiny_engine.max_model_len + 10)}
    rows = tir_trajectories(tiny_engine, [huge], group_size=1, max_turns=2, spec=spec)
    assert rows[0]["stop_reason"] == "context_limit"


def test_notebook_program_replays_cells_silently(tmp_path):
    from runtime.sandbox import execute

    prog = notebook_program(["a = 2\nprint('hidden')", "raise ValueError('old')"], "b = a * 21\nb")
    res = execute(prog)
    assert res.stdout == "42\n" and res.returncode == 0


CODE = {
    "problem_id": "c/1",
    "kind": "code",
    "prompt": "Write a function add(a, b) that returns the sum of a and b.",
    "entry_point": "add",
    "tests": ["assert add(1, 2) == 3", "assert add(-1, 1) == 0"],
    "test_format": "asserts",
}
WRONG = "```python\ndef add(a, b):\n    return a - b\n```\n"
RIGHT = "```python\ndef add(a, b):\n    return a + b\n```\n"


def repair_script(prompt_text: str) -> tuple[str, bool]:
    return (RIGHT if "Tests passed" in prompt_text else WRONG), False


def test_tree_structure_depths_and_feedback_prompts(tiny_engine, tmp_path):
    eng = ScriptedEngine(tiny_engine, repair_script)
    spec = SamplingSpec(temperature=1.0, max_tokens=64, stop=prompts.CODE_STOP, seed=0)
    rows = refinement_trees(
        eng, [CODE], group_size=2, child_group_size=3, depth=3, spec=spec,
        max_nodes_per_tree=64, max_nodes_per_batch=64, id_prefix="it2/",
    )  # fmt: skip
    (tree,) = rows
    nodes = tree["nodes"]
    assert tree["tree_id"] == "it2/c/1" and not tree["truncated"]
    assert [(n["node_id"], n["parent_id"], n["depth"]) for n in nodes] == [
        (0, -1, 1), (1, -1, 1), (2, 0, 2), (3, 0, 2), (4, 0, 2), (5, 1, 2), (6, 1, 2), (7, 1, 2),
    ]  # fmt: skip
    assert [(n["tests_passed"], n["tests_total"]) for n in nodes] == [(0, 2)] * 2 + [(2, 2)] * 6
    root_prompt = prompts.initial_prompt_ids(tiny_engine.tokenizer, CODE)
    for n in nodes:
        assert n["pruned"] is False and n["reward"] is None and n["ret"] is None
        assert "Tests passed" in n["exec_result"]
        if n["parent_id"] == -1:
            assert n["prompt_token_ids"] == root_prompt
        else:
            parent = nodes[n["parent_id"]]
            expected = prompts.feedback_prompt_ids(
                tiny_engine.tokenizer, CODE, parent["completion_token_ids"], parent["exec_result"]
            )
            assert n["prompt_token_ids"] == expected
            assert expected[: len(root_prompt) + len(parent["completion_token_ids"])] == (
                root_prompt + parent["completion_token_ids"]
            )  # token-in, token-out: the child's context extends the parent's
            assert "returned -1" in tiny_engine.tokenizer.decode(n["prompt_token_ids"])
    assert read_table(write_table(rows, TREES, tmp_path / "trees.parquet").uri, TREES).num_rows == 1


def test_tree_node_budget_truncates_with_a_note(tiny_engine):
    from stages.rollout.tree import TreeStats

    eng = ScriptedEngine(tiny_engine, repair_script)
    spec = SamplingSpec(temperature=1.0, max_tokens=64, stop=prompts.CODE_STOP, seed=0)
    stats = TreeStats()
    (tree,) = refinement_trees(
        eng, [CODE], group_size=2, child_group_size=2, depth=2, spec=spec,
        max_nodes_per_tree=3, max_nodes_per_batch=100, stats=stats,
    )  # fmt: skip
    assert len(tree["nodes"]) == 3 and tree["truncated"]
    assert any("max_nodes budget" in n for n in stats.notes)
    assert stats.passed_by_depth == {1: [0, 2], 2: [1, 1]}


def problem_rows() -> list[dict]:
    base = {k: None for k in PROBLEMS.names}
    rows = []
    for i in range(4):
        rows.append(
            {**base, **MATH, "problem_id": f"m/{i}", "source": "t", "test_format": "none", "split": "train"}
        )
        rows.append({**base, **CODE, "problem_id": f"c/{i}", "source": "t", "split": "train"})
    rows.append(
        {**base, **MATH, "problem_id": "m/eval", "source": "t", "test_format": "none", "split": "eval"}
    )
    rows.append({**base, **CODE, "problem_id": "c/notests", "source": "t", "tests": [], "split": "train"})
    rows.append({**base, **MATH, "problem_id": "m/empty", "prompt": " ", "source": "t", "split": "train", "test_format": "none"})  # fmt: skip
    return rows


def test_select_and_filter_problems():
    rows = problem_rows()
    a = select_problems(rows, 5, seed=0, iteration=1)
    assert a == select_problems(rows, 5, seed=0, iteration=1) and len(a) == 5
    assert a != select_problems(rows, 5, seed=0, iteration=2)
    assert all(p["split"] == "train" for p in select_problems(rows, 100, 0, 1))
    keep, notes = usable_problems(rows, "trees")
    ids = {p["problem_id"] for p in keep}
    assert "c/notests" not in ids and "m/empty" not in ids
    assert any("'c/notests'" in n and "tests" in n for n in notes)
    assert any("'m/empty'" in n and "prompt" in n for n in notes)


@pytest.mark.parametrize("kind", ["trajectories", "trees"])
def test_stage_run_writes_valid_table(kind, tiny_engine, tiny_model, tmp_path):
    src = write_table(problem_rows(), PROBLEMS, tmp_path / "problems.parquet")
    params = RolloutParams(
        kind=kind, group_size=2, child_group_size=2, max_turns=2, tree_depth=2, problems_per_iteration=20,
        max_new_tokens=12, temperature=1.0,
    )  # fmt: skip
    out = run(
        params, {"problems": src.uri, "checkpoint": str(tiny_model), "iteration": "1"}, tmp_path / "out"
    )
    name, schema = ("trajectories", TRAJECTORIES) if kind == "trajectories" else ("trees", TREES)
    table = read_table(out.uri(name), schema)
    m = out.metrics
    assert m["rollout/tokens"] > 0 and m["rollout/tokens_per_s"] > 0 and m["timing/rollout"] > 0
    assert m["timing/rollout_engine"] < 5  # the live session engine was reused, not rebuilt
    if kind == "trajectories":
        assert (
            table.num_rows == 2 * 9
        )  # 4 math + 4 code + 1 with no tests (fine in TIR); empty prompt skipped
        assert m["rollout/problems_skipped"] == 1 and 1 <= m["rollout/turns_mean"] <= 2
    else:
        assert table.num_rows == 4 and m["rollout/problems_skipped"] == 6  # math, no tests, empty prompt
        assert {"rollout/pass_rate_depth_1", "rollout/pass_rate_depth_2"} <= set(m)
        assert any("notests" in n for n in out.notes)
        nodes = [n for t in table.to_pylist() for n in t["nodes"]]
        assert {n["depth"] for n in nodes} == {1, 2}
        assert all(n["tests_total"] == 2 for n in nodes)


def test_tree_grading_leaves_counts_null_when_the_sandbox_failed(monkeypatch):
    """A node whose run failed in the sandbox itself keeps no test counts (the score stage re-runs it and marks
    it a sandbox error if it fails again), while a real verdict is stored."""
    import runtime.sandbox as sandbox
    from runtime.sandbox.records import ExecutionResult, TestReport
    from stages.rollout import tree as tree_mod

    broken = ExecutionResult("", "", None, False, False, False, 0.0, error="worker died")
    reports = [TestReport(0, 2, execution=broken), TestReport(1, 2)]
    monkeypatch.setattr(sandbox, "run_tests_many", lambda *a, **k: reports)
    problem = {"tests": ["assert f() == 1", "assert f() == 2"], "entry_point": "f"}
    t = types.SimpleNamespace(problem=problem)
    nodes = [(t, {"code": "def f(): return 1", "depth": 1}), (t, {"code": "def f(): return 1", "depth": 1})]
    tree_mod._grade(nodes, 1.0, 500, tree_mod.TreeStats())
    assert (nodes[0][1]["tests_passed"], nodes[0][1]["tests_total"]) == (None, None)
    assert (nodes[1][1]["tests_passed"], nodes[1][1]["tests_total"]) == (1, 2)
