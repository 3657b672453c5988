"""maths.prompts: prompt ids, parsing, observations, feedback prompts, demonstrations (tiny tokenizer)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from maths import prompts

MATH = {"problem_id": "m1", "kind": "math", "prompt": "What is 17 * 23?", "answer": "391"}
CODE = {
    "problem_id": "c1",
    "kind": "code",
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "entry_point": "add",
    "reference_solution": "def add(a, b):\n    return a + b",
}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def test_initial_prompt_ids_is_chat_template_with_generation_prompt(tok):
    ids = prompts.initial_prompt_ids(tok, MATH)
    assert all(isinstance(t, int) for t in ids)
    text = tok.decode(ids)
    assert "What is 17 * 23?" in text and "\\boxed{" in text
    assert text.rstrip().endswith("assistant")
    code_text = tok.decode(prompts.initial_prompt_ids(tok, CODE))
    assert "```python\ndef add(a, b):" in code_text


def test_empty_prompt_and_unknown_kind_are_named_errors(tok):
    with pytest.raises(ValueError, match="'m2'.*prompt"):
        prompts.initial_prompt_ids(tok, {**MATH, "problem_id": "m2", "prompt": "  \n"})
    with pytest.raises(ValueError, match="kind 'poem'"):
        prompts.initial_prompt_ids(tok, {**MATH, "kind": "poem"})


def test_extract_code_pairs_fences_and_skips_output_blocks():
    text = "Let me compute.\n```python\nx = 2\nprint(x)\n```\n```output\n2\n```\nNow\n```py\ny = 3\n```\n"
    assert prompts.code_blocks(text) == ["x = 2\nprint(x)", "y = 3"]
    assert prompts.extract_code(text) == "y = 3"
    assert prompts.extract_code("```python\nunclosed") is None
    assert prompts.extract_code("no code") is None
    assert prompts.code_blocks("```bash\nls\n```") == []


def test_extract_boxed_balanced_braces_and_last_one():
    assert prompts.extract_boxed("so \\boxed{3} then \\boxed{\\frac{1}{2}}.") == "\\frac{1}{2}"
    assert prompts.extract_boxed("\\boxed{ 42 }") == "42"
    assert prompts.extract_boxed("\\boxed{12") is None
    assert prompts.extract_boxed("nothing") is None


def test_format_observation_and_truncation():
    assert prompts.format_observation("4\n") == "```output\n4\n```\n"
    assert prompts.format_observation("4", opened=True) == "\n4\n```\n"
    long = prompts.format_observation("x" * 5000, max_chars=200)
    assert len(long) < 260 and "chars truncated" in long


@given(st.text(max_size=400), st.integers(min_value=40, max_value=300))
def test_truncate_middle_bounded_and_identity_when_short(text, n):
    out = prompts.truncate_middle(text, n)
    assert len(out) <= max(n, len(text) if len(text) <= n else n)
    if len(text) <= n:
        assert out == text


def test_feedback_prompt_extends_task_prompt_token_in_token_out(tok):
    base = prompts.initial_prompt_ids(tok, CODE)
    attempt_ids = prompts.text_ids(tok, "```python\ndef add(a, b):\n    return a - b\n```") + [
        tok.eos_token_id
    ]
    child = prompts.feedback_prompt_ids(tok, CODE, attempt_ids, "tests passed 0/1")
    assert child[: len(base)] == base
    assert child[len(base) : len(attempt_ids) - 1 + len(base)] == attempt_ids[:-1]
    text = tok.decode(child)
    assert "return a - b" in text and "tests passed 0/1" in text and text.rstrip().endswith("assistant")
    # the same prompt from the attempt's text
    assert prompts.feedback_prompt_ids(tok, CODE, tok.decode(attempt_ids[:-1]), "tests passed 0/1") == child


def test_demonstration_layout_masks_observations(tok):
    demo = "I compute.\n```python\nprint(17*23)\n```\n```output\n391\n```\nSo \\boxed{391}."
    ids, mask = prompts.demonstration_ids(tok, {**MATH, "demonstration": demo})
    assert len(ids) == len(mask)
    transcript = prompts.demonstration_transcript({**MATH, "demonstration": demo})
    assert [k for k, _ in transcript] == ["completion", "observation", "completion"]
    n_prompt = len(prompts.initial_prompt_ids(tok, MATH))
    assert set(mask[:n_prompt]) == {0}
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "391\n```" not in trained and "print(17*23)" in trained and trained.endswith("<|im_end|>")
    assert tok.decode(ids[n_prompt:]) == demo + "<|im_end|>"
    code_ids, code_mask = prompts.demonstration_ids(tok, CODE)
    assert "return a + b" in tok.decode(code_ids) and sum(code_mask) > 0
    assert prompts.demonstration_ids(tok, MATH) == ([], [])


def test_a_problem_may_bring_its_own_system_prompt(tok):
    own = {**MATH, "meta": '{"system": "Reply with the number only."}'}
    text = tok.decode(prompts.initial_prompt_ids(tok, own))
    assert "Reply with the number only." in text and "Python interpreter" not in text
    assert prompts.system_text({**MATH, "meta": '{"source_row": 3}'}) == prompts.MATH_TIR_SYSTEM
    assert prompts.system_text({**MATH, "meta": "free text, not JSON"}) == prompts.MATH_TIR_SYSTEM
    with pytest.raises(ValueError, match="meta.system must be a non-empty string"):
        prompts.system_text({**MATH, "meta": '{"system": ""}'})
