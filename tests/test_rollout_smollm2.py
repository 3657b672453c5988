"""Slow: the rollout on SmolLM2-135M-Instruct in real vLLM (CPU).

1. A scripted TIR trajectory (three tool turns, then an answer) forced through SmolLM2 — ids as the tokenizer
   gives them, log-probs from SmolLM2 scoring those ids — whose stored ids decode to the exact transcript.
2. Free sampling: TIR trajectories sampled by SmolLM2; every turn's rollout log-probs recomputed by the
   transformers model on the same context (prompt + earlier completions + observations) agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maths import prompts
from runtime.engines import SamplingSpec, make_engine
from stages.rollout.tir import tir_trajectories
from tests.test_rollout import ScriptedEngine

pytestmark = pytest.mark.slow

PROBLEM = {"problem_id": "arith/1", "kind": "math", "prompt": "What is (123 * 45) - 17?", "answer": "5518"}
SCRIPT = [
    ("Let me compute the product first.\n```python\np = 123 * 45\nprint(p)\n```\n", False),
    ("Now subtract 17.\n```python\np - 17\n```\n", False),
    ("Double-check:\n```python\nassert p - 17 == 5518\nprint('ok')\n```\n", False),
    ("The result is \\boxed{5518}.", True),
]


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_model):
    engine = make_engine(smollm2_model, backend="vllm", seed=0)
    yield engine
    engine.close()


def test_scripted_tir_on_smollm2_decodes_to_exact_transcript(smollm2_engine):
    tok = smollm2_engine.tokenizer
    eng = ScriptedEngine(smollm2_engine, lambda text: SCRIPT[text.count("```output\n")])
    spec = SamplingSpec(temperature=1.0, max_tokens=128, stop=prompts.TIR_STOP, seed=0)
    (row,) = tir_trajectories(eng, [PROBLEM], group_size=1, max_turns=6, spec=spec)
    turns = row["turns"]
    assert [t["tool_call"] for t in turns] == ["valid", "valid", "valid", "none"]
    assert [t["exec_output"] for t in turns[:3]] == [
        "```output\n5535\n```\n",
        "```output\n5518\n```\n",
        "```output\nok\n```\n",
    ]
    ids, expected = list(row["prompt_token_ids"]), tok.decode(row["prompt_token_ids"])
    for (text, eos), t in zip(SCRIPT, turns, strict=True):
        ids += t["completion_token_ids"] + t["observation_token_ids"]
        expected += text + ("<|im_end|>" if eos else "") + (t["exec_output"] or "")
        assert all(np.isfinite(t["completion_logprobs"])) and max(t["completion_logprobs"]) <= 0
    assert tok.decode(ids) == expected
    assert row["final_answer"] == "5518" and row["stop_reason"] == "answer"


def test_sampled_tir_logprobs_match_transformers(smollm2_engine, smollm2_model):
    from transformers import AutoModelForCausalLM

    spec = SamplingSpec(temperature=1.0, max_tokens=96, stop=prompts.TIR_STOP, seed=3)
    rows = tir_trajectories(smollm2_engine, [PROBLEM], group_size=3, max_turns=2, spec=spec)
    model = AutoModelForCausalLM.from_pretrained(smollm2_model, dtype=torch.float32).eval()
    diffs = []
    with torch.no_grad():
        for r in rows:
            context = list(r["prompt_token_ids"])
            for t in r["turns"]:
                comp = t["completion_token_ids"]
                if comp:
                    logits = model(torch.tensor([context + comp])).logits[0, len(context) - 1 : -1]
                    ref = logits.log_softmax(-1).gather(-1, torch.tensor(comp)[:, None])[:, 0].numpy()
                    diffs.append(np.abs(ref - np.array(t["completion_logprobs"])))
                context += comp + t["observation_token_ids"]
    d = np.concatenate(diffs)
    print(
        f"SmolLM2 vLLM vs transformers log-probs over {d.size} tokens: max {d.max():.2e} mean {d.mean():.2e}"
    )
    assert d.size > 50 and d.max() < 1e-3
