"""Prompt text, prompt token ids and answer parsing shared by rollout, evaluation and warm start.

One layout everywhere (rollout writes it, warm start trains on it, the advantage stage rebuilds it):

    prompt_ids            initial_prompt_ids(tok, problem): system + task, chat template, generation prompt
    completion_1          generated ids (loss mask 1), e.g. "…```python\\ncode\\n```\\n"
    observation_1         observation_ids(tok, format_observation(output, …))  (loss mask 0)
    completion_2          generated ids (loss mask 1), …, the last one ends with the eos token (<|im_end|>)

A TIR turn stops at the end of a fenced python block (``TIR_STOP``); the observation continues the same
assistant message with a ```output block. Nothing is ever re-tokenised: turn k's prompt is the previous
context's ids + the new observation's ids.

A MURPHY child prompt (``feedback_prompt_ids``) = the task prompt + the parent attempt's completion ids + a
user turn carrying the test feedback + a new generation prompt (only the last attempt, not the whole chain).

Problems are dicts with the columns of ``schemas.tables.PROBLEMS`` (kind "code" | "math", prompt, entry_point).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

MATH_TIR_SYSTEM = (
    "You are a careful math assistant with a Python interpreter. Think step by step. To compute something, "
    "write Python code in a ```python block and end the block with ```; the code runs and its printed output "
    "is shown to you in an ```output block. Read the output, then continue. Variables persist between "
    "blocks. When you know the answer, write it as \\boxed{answer}."
)
CODE_SYSTEM = (
    "You are an expert Python programmer. Write the requested function in a single ```python block, "
    "complete and self-contained, with any imports it needs."
)
FEEDBACK_INSTRUCTION = (
    "Your program did not pass all the tests. Here is the feedback from running it:\n\n{feedback}\n\n"
    "Fix the program and write the complete corrected function in a single ```python block."
)

# Generation stops right after a closed code block (the model then reads the output) or when the model itself
# opens an output block. Stop strings are kept in the generated ids (include_stop_str_in_output).
TIR_STOP: list[str] = ["```output", "\n```\n"]
# A code answer (MURPHY attempt) may stop at the end of its code block: what follows is never graded.
CODE_STOP: list[str] = ["\n```\n"]

_CODE_LANGS = {"python", "py", "python3", ""}
_OUTPUT_OPEN = "```output"
_PLACEHOLDER = "\u2063TURNTREE-PLACEHOLDER\u2063"


# --- messages ---------------------------------------------------------------------------------------------
def _looks_like_code(text: str) -> bool:
    head = text.lstrip()
    return head.startswith(("def ", "import ", "from ", "class ", "@")) or "\ndef " in text


def task_text(problem: dict) -> str:
    """The user message of a problem: its prompt, a HumanEval-style signature fenced as code."""
    prompt = (problem.get("prompt") or "").strip("\n")
    if not prompt.strip():
        raise ValueError(f"problem {problem.get('problem_id', '?')!r}: field 'prompt' is empty")
    if problem.get("kind") != "code":
        return prompt
    entry = problem.get("entry_point")
    if _looks_like_code(prompt):
        text = f"Complete the following Python function:\n```python\n{prompt}\n```"
    else:
        text = prompt
    if entry and entry not in prompt:
        text += f"\nThe function must be named `{entry}`."
    return text


def system_text(problem: dict) -> str:
    """The kind's system prompt, or the problem's own: a string ``"system"`` in its ``meta`` JSON object (a data
    set written for another prompt, e.g. a model too small for tool use; rollout, warm start and evaluation all
    render through here)."""
    kind = problem.get("kind")
    if kind not in SYSTEMS:
        raise ValueError(
            f"problem {problem.get('problem_id', '?')!r}: kind {kind!r} not in {sorted(SYSTEMS)}"
        )
    own = _meta(problem).get("system")
    if own is not None:
        if not isinstance(own, str) or not own.strip():
            raise ValueError(
                f"problem {problem.get('problem_id', '?')!r}: meta.system must be a non-empty string"
            )
        return own
    return SYSTEMS[kind]


def _meta(problem: dict) -> dict:
    raw = problem.get("meta")
    if not raw:
        return {}
    try:
        meta = json.loads(raw) if isinstance(raw, str) else raw
    except ValueError:
        return {}  # meta is free-form source extras; only a JSON object can carry a system prompt
    return meta if isinstance(meta, dict) else {}


SYSTEMS: dict[str, str] = {"math": MATH_TIR_SYSTEM, "code": CODE_SYSTEM}


def messages(problem: dict) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": system_text(problem)},
        {"role": "user", "content": task_text(problem)},
    ]


def _ids(encoded) -> list[int]:
    """apply_chat_template may return a list or (transformers 5) a BatchEncoding."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    return [int(t) for t in encoded]


def _render(tokenizer, msgs: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def text_ids(tokenizer, text: str) -> list[int]:
    """Token ids of a text fragment, no BOS/EOS added (special-token strings such as <|im_end|> map to them)."""
    return [int(t) for t in tokenizer.encode(text, add_special_tokens=False)]


# --- prompts as token ids -----------------------------------------------------------------------------------
def initial_prompt_ids(tokenizer, problem: dict) -> list[int]:
    """Chat-template ids of system + task with the assistant generation prompt. Shape: (P,)."""
    return _ids(tokenizer.apply_chat_template(messages(problem), tokenize=True, add_generation_prompt=True))


def feedback_suffix_ids(tokenizer, problem: dict, feedback: str) -> list[int]:
    """Ids that close an assistant attempt and open the next one: eos + user(feedback) + generation prompt.

    Found by rendering the chat template with a placeholder attempt and taking the text after it.
    """
    msgs = messages(problem) + [
        {"role": "assistant", "content": _PLACEHOLDER},
        {"role": "user", "content": FEEDBACK_INSTRUCTION.format(feedback=feedback.strip())},
    ]
    rendered = _render(tokenizer, msgs)
    if _PLACEHOLDER not in rendered:
        raise ValueError("the chat template dropped the assistant message; cannot build a feedback prompt")
    return text_ids(tokenizer, rendered.split(_PLACEHOLDER, 1)[1])


def feedback_prompt_ids(tokenizer, problem: dict, attempt: str | Sequence[int], feedback: str) -> list[int]:
    """MURPHY child prompt / self-correction prompt: task prompt + attempt + feedback turn. Shape: (P',).

    ``attempt`` is the parent's completion token ids as generated (preferred: token-in, token-out) or its text
    (tokenised without special tokens). A trailing eos in the attempt is dropped: the suffix supplies it.
    """
    ids = text_ids(tokenizer, attempt) if isinstance(attempt, str) else [int(t) for t in attempt]
    eos = tokenizer.eos_token_id
    if ids and ids[-1] == eos:
        ids = ids[:-1]
    return initial_prompt_ids(tokenizer, problem) + ids + feedback_suffix_ids(tokenizer, problem, feedback)


# --- parsing --------------------------------------------------------------------------------------------------
def code_blocks(text: str) -> list[str]:
    """All closed ```python / ```py / bare ``` blocks in order (fences paired left to right); ```output
    blocks and other languages are not code."""
    blocks, pos = [], 0
    while (start := text.find("```", pos)) != -1:
        newline = text.find("\n", start)
        if newline == -1:
            break
        lang = text[start + 3 : newline].strip().lower()
        close = text.find("```", newline + 1)
        if close == -1:
            break
        if lang in _CODE_LANGS:
            blocks.append(text[newline + 1 : close].rstrip("\n"))
        pos = close + 3
    return blocks


def extract_code(text: str) -> str | None:
    """The last closed code block of a completion, or None."""
    blocks = code_blocks(text)
    return blocks[-1] if blocks else None


def extract_boxed(text: str) -> str | None:
    """Content of the last \\boxed{…} (balanced braces), stripped, or None."""
    start = text.rfind("\\boxed{")
    while start != -1:
        i, depth = start + len("\\boxed{"), 1
        for j in range(i, len(text)):
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            if depth == 0:
                return text[i:j].strip()
        start = text.rfind("\\boxed{", 0, start)  # unbalanced: try an earlier one
    return None


def truncate_middle(text: str, max_chars: int) -> str:
    """Keep head and tail of a long text with a marker naming how much was cut."""
    if len(text) <= max_chars:
        return text
    marker = "\n...[{} chars truncated]...\n"
    keep = max(0, max_chars - len(marker.format(len(text))))
    head, tail = text[: keep // 2], text[len(text) - (keep - keep // 2) :]
    return head + marker.format(len(text) - len(head) - len(tail)) + tail


def format_observation(output: str, max_chars: int = 1500, *, opened: bool = False) -> str:
    """The text fed back after a tool call: a ```output block with the (truncated) execution output.

    ``opened``: the model already wrote "```output" itself (it was a stop string), so only the body follows.
    """
    body = truncate_middle(output.rstrip("\n"), max_chars)
    block = f"\n{body}\n```\n" if body else "\n```\n"
    return block if opened else _OUTPUT_OPEN + block


def observation_ids(tokenizer, output: str, max_chars: int = 1500, *, opened: bool = False) -> list[int]:
    return text_ids(tokenizer, format_observation(output, max_chars, opened=opened))


# --- warm-start demonstrations ---------------------------------------------------------------------------------
def demonstration_transcript(problem: dict) -> list[tuple[str, str]]:
    """A problem's reference tool-using answer as [(kind, text)], kind "completion" | "observation".

    ``problem["demonstration"]`` is the assistant text in the rollout format: completions with ```output
    blocks between them (each block, from "```output" to its closing "```\\n", is an observation). Without a
    demonstration, a code problem's ``reference_solution`` becomes one completion in a python block. Returns
    [] when there is neither.
    """
    demo = problem.get("demonstration")
    if not demo:
        ref = problem.get("reference_solution")
        if problem.get("kind") == "code" and ref:
            return [("completion", f"```python\n{ref.strip(chr(10))}\n```")]
        return []
    parts: list[tuple[str, str]] = []
    pos = 0
    for m in re.finditer(r"```output\n.*?```\n?", demo, re.DOTALL):
        if m.start() > pos:
            parts.append(("completion", demo[pos : m.start()]))
        parts.append(("observation", m.group(0)))
        pos = m.end()
    if pos < len(demo):
        parts.append(("completion", demo[pos:]))
    return parts


def demonstration_ids(tokenizer, problem: dict) -> tuple[list[int], list[int]]:
    """(input_ids (L,), loss_mask (L,)) of a demonstration in the rollout layout: prompt 0, completion 1,
    observation 0, and an eos (mask 1) closing the answer. Empty lists when the problem has no demonstration."""
    transcript = demonstration_transcript(problem)
    if not transcript:
        return [], []
    ids = initial_prompt_ids(tokenizer, problem)
    mask = [0] * len(ids)
    for kind, text in transcript:
        seg = text_ids(tokenizer, text)
        ids += seg
        mask += [1 if kind == "completion" else 0] * len(seg)
    ids.append(tokenizer.eos_token_id)
    mask.append(1)
    return ids, mask
