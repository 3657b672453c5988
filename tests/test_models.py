"""Offline models: the tiny random Qwen2 and SmolLM2-135M-Instruct load in transformers and in vLLM and
generate; conventions (ChatML, <|im_end|> eos, no BOS) hold; preparation is atomic and cached."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from runtime import models
from runtime.models import MARKER, ModelPrepError, prepare, resolve_model

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _chat_ids(tok) -> list[int]:
    enc = tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True)
    return list(enc["input_ids"] if hasattr(enc, "keys") else enc)


# --- tiny ---------------------------------------------------------------------------------------------------
def test_tiny_model_conventions(tiny_model):
    from transformers import AutoConfig, AutoTokenizer

    info = json.loads((tiny_model / MARKER).read_text())
    assert info["model"] == "tiny" and 2_000 <= info["vocab_size"] <= 4_096
    assert json.loads((tiny_model / "tokenizer_config.json").read_text())["tokenizer_class"] == (
        "PreTrainedTokenizerFast"
    )
    cfg = AutoConfig.from_pretrained(tiny_model)
    assert (cfg.model_type, cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        "qwen2",
        128,
        4,
        2,
    )
    assert cfg.hidden_size // cfg.num_attention_heads == 32 and cfg.tie_word_embeddings
    tok = AutoTokenizer.from_pretrained(tiny_model)
    assert tok.eos_token == "<|im_end|>" and cfg.eos_token_id == tok.eos_token_id
    text = tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = tok("def f(x):\n    return x")["input_ids"]
    assert tok.decode(ids) == "def f(x):\n    return x"  # byte-level BPE, no BOS/EOS added
    assert _chat_ids(tok)[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert len(tok("    return self._value")["input_ids"]) < 10  # merges learnt from Python sources


def test_tiny_model_generates_in_transformers(tiny_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.dtype == torch.float32
    ids = torch.tensor([_chat_ids(tok)])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False)
    assert out.shape[1] > ids.shape[1] and int(out.max()) < len(tok)


def test_tiny_model_generates_in_vllm(tiny_model, tiny_engine):
    from runtime.engines import SamplingSpec

    tok = tiny_engine.tokenizer
    prompt = _chat_ids(tok)
    (gens,) = tiny_engine.generate([prompt], SamplingSpec(n=2, temperature=1.0, max_tokens=8, seed=0))
    assert len(gens) == 2
    for g in gens:
        assert 1 <= len(g.token_ids) <= 8 and len(g.logprobs) == len(g.token_ids)
        assert all(math.isfinite(lp) and lp <= 0 for lp in g.logprobs)
        assert all(0 <= t < len(tok) for t in g.token_ids)


def test_prepare_is_cached_and_resolvable(tiny_model):
    marker = (tiny_model / MARKER).stat().st_mtime_ns
    assert models.prepare_tiny(tiny_model) == tiny_model
    assert (tiny_model / MARKER).stat().st_mtime_ns == marker
    assert resolve_model(str(tiny_model)) == tiny_model
    if tiny_model == models.cache_dir() / "tiny":
        assert resolve_model("tiny") == tiny_model
    with pytest.raises(ModelPrepError, match=r"'gpt5' is neither one of \['smollm2', 'tiny'\]"):
        resolve_model("gpt5")
    with pytest.raises(ModelPrepError, match=r"unknown model 'gpt5'; choose one of \['smollm2', 'tiny'\]"):
        prepare("gpt5", Path("/nonexistent"))


def test_crashed_build_leaves_nothing_under_the_final_name(tmp_path):
    def crashing_build(tmp: Path) -> dict:
        (tmp / "config.json").write_text("{}")
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        models._build_atomically(tmp_path / "m", "tiny", crashing_build)
    assert list(tmp_path.iterdir()) == []

    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(ModelPrepError, match="exists but is not a prepared tiny model"):
        models._build_atomically(tmp_path / "half", "tiny", crashing_build)


# --- SmolLM2 --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_smollm2_conversion_passes_its_checks(smollm2_model):
    info = json.loads((smollm2_model / MARKER).read_text())
    assert info["dtype"] == "float32" and 130e6 < info["parameters"] < 140e6
    models.check_smollm2(smollm2_model)


@pytest.mark.slow
def test_smollm2_check_fails_loudly_on_a_wrong_conversion(smollm2_model, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    bad.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2_model / name, bad / name)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_parameters"]["rope_theta"] = 10000.0
    (bad / "config.json").write_text(json.dumps(cfg))
    tcfg = json.loads((bad / "tokenizer_config.json").read_text())
    tcfg["eos_token"] = "<|endoftext|>"
    (bad / "tokenizer_config.json").write_text(json.dumps(tcfg))
    with pytest.raises(ModelPrepError, match=r"rope_theta is 10000.0, expected 100000; tokenizer eos is"):
        models.check_smollm2(bad)


@pytest.mark.slow
def test_smollm2_answers_in_transformers_and_vllm(smollm2_model):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from runtime.engines import SamplingSpec, make_engine

    tok = AutoTokenizer.from_pretrained(smollm2_model)
    ids = _chat_ids(tok)
    assert (
        ids[0] == tok.convert_tokens_to_ids("<|im_start|>") and tok("Hi")["input_ids"][0] != tok.bos_token_id
    )
    model = AutoModelForCausalLM.from_pretrained(smollm2_model)
    t = torch.tensor([ids])
    out = model.generate(t, attention_mask=torch.ones_like(t), max_new_tokens=12, do_sample=False)
    hf_text = tok.decode(out[0, len(ids) :], skip_special_tokens=True)
    assert "Paris" in hf_text
    del model

    engine = make_engine(smollm2_model, backend="vllm", seed=0)
    (gens,) = engine.generate([ids], SamplingSpec(n=1, temperature=0.0, max_tokens=12))
    assert "Paris" in gens[0].text
    assert gens[0].token_ids == out[0, len(ids) :].tolist()[: len(gens[0].token_ids)]
