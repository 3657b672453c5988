"""runtime.engines on real vLLM (CPU) with the tiny model: sampling contract, log-probs, bad prompts, weight sync,
and the transformers backend behind the same interface."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from maths import prompts
from runtime import engines as engine_mod
from runtime.engines import EngineError, SamplingSpec

PROBLEM = {"problem_id": "m", "kind": "math", "prompt": "Compute 2 + 2 with Python."}


@pytest.fixture(scope="module")
def prompt(tiny_engine):
    return prompts.initial_prompt_ids(tiny_engine.tokenizer, PROBLEM)


@pytest.fixture(scope="module")
def hf_model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def hf_logprobs(model, prompt: list[int], completion: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
    return logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None])[:, 0].numpy()


def test_generate_contract_n_samples_logprobs_and_seeds(tiny_engine, prompt):
    spec = SamplingSpec(n=3, temperature=1.0, max_tokens=12, seed=5)
    out = tiny_engine.generate([prompt, prompt[:7]], spec)
    assert [len(o) for o in out] == [3, 3]
    for gens in out:
        for g in gens:
            assert 1 <= len(g.token_ids) <= 12 and len(g.logprobs) == len(g.token_ids)
            assert all(lp <= 0 for lp in g.logprobs)
            assert g.finish_reason in ("stop", "length")
            assert g.text == tiny_engine.decode(g.token_ids)
    assert len({tuple(g.token_ids) for g in out[0]}) > 1  # n samples differ
    again = tiny_engine.generate([prompt, prompt[:7]], spec)
    assert [[g.token_ids for g in o] for o in again] == [[g.token_ids for g in o] for o in out]


def visible_stop(engine, gen) -> tuple[int, str]:
    """(index, text) of the first sampled token that decodes to non-whitespace: a stop string that will hit."""
    for k, t in enumerate(gen.token_ids):
        text = engine.tokenizer.decode([t])
        if text.strip() and t != engine.tokenizer.eos_token_id:
            return k, text
    pytest.skip("sample has no visible token")


def test_stop_string_is_kept_in_ids_and_reported(tiny_engine, prompt):
    spec = SamplingSpec(temperature=1.0, max_tokens=12, seed=11)
    sample = tiny_engine.generate([prompt], spec)[0][0]
    k, stop = visible_stop(tiny_engine, sample)
    g = tiny_engine.generate([prompt], SamplingSpec(temperature=1.0, max_tokens=12, seed=11, stop=[stop]))[0][
        0
    ]
    assert g.finish_reason == "stop" and g.stop_str == stop
    assert g.text.endswith(stop) and len(g.token_ids) <= k + 1
    assert g.token_ids == sample.token_ids[: len(g.token_ids)]


def test_rollout_logprobs_match_transformers(tiny_engine, prompt, hf_model):
    gens = tiny_engine.generate([prompt], SamplingSpec(n=4, temperature=1.0, max_tokens=32, seed=1))[0]
    diffs = np.concatenate(
        [np.abs(np.array(g.logprobs) - hf_logprobs(hf_model, prompt, g.token_ids)) for g in gens]
    )
    print(f"vLLM vs transformers log-probs (tiny, fp32): max {diffs.max():.2e} mean {diffs.mean():.2e}")
    assert diffs.max() < 1e-4
    scored = tiny_engine.score([prompt], [gens[0].token_ids])[0]
    np.testing.assert_allclose(scored, gens[0].logprobs, atol=1e-4)


def test_bad_prompts_empty_raises_overlong_is_recorded(tiny_engine, prompt):
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        tiny_engine.generate([prompt, []], SamplingSpec(max_tokens=4))
    too_long = [prompt[0]] * tiny_engine.max_model_len
    near_end = [prompt[0]] * (tiny_engine.max_model_len - 3)
    out = tiny_engine.generate([too_long, prompt, near_end], SamplingSpec(n=2, max_tokens=16, seed=0))
    assert [g.finish_reason for g in out[0]] == ["context_limit", "context_limit"]
    assert all(g.token_ids == [] for g in out[0])
    assert all(len(g.token_ids) >= 1 for g in out[1])
    assert all(len(g.token_ids) <= 3 for g in out[2])  # clamped to the context, not an error


def test_weight_update_in_place_matches_fresh_engine(tiny_engine, tiny_model, prompt, hf_model, tmp_path):
    greedy = SamplingSpec(temperature=0, max_tokens=16)
    before = tiny_engine.generate([prompt], greedy)[0][0]
    torch.manual_seed(3)
    new_state = {k: v + 0.05 * torch.randn_like(v) for k, v in hf_model.state_dict().items()}
    new_model = type(hf_model)(hf_model.config)
    new_model.load_state_dict(new_state)
    ckpt = tmp_path / "ckpt"
    new_model.save_pretrained(ckpt)
    tiny_engine.tokenizer.save_pretrained(ckpt)
    try:
        secs = tiny_engine.update_weights(new_model.state_dict(), source=str(ckpt))
        assert secs < 30 and tiny_engine.loaded_from == str(ckpt.resolve())
        after = tiny_engine.generate([prompt], greedy)[0][0]
        assert after.token_ids != before.token_ids
        # the updated engine serves the new model: log-probs agree with transformers on the new weights
        np.testing.assert_allclose(after.logprobs, hf_logprobs(new_model, prompt, after.token_ids), atol=1e-4)
        fresh = engine_mod.make_engine(ckpt, backend="vllm", seed=1)
        try:
            assert fresh is not tiny_engine
            ref = fresh.generate([prompt], greedy)[0][0]
        finally:
            fresh.close()
        assert ref.token_ids == after.token_ids
        np.testing.assert_allclose(ref.logprobs, after.logprobs, atol=1e-5)
        # a checkpoint directory goes through the same reload path (tied lm_head filled in)
        tiny_engine.update_weights(tiny_model)
        assert tiny_engine.generate([prompt], greedy)[0][0].token_ids == before.token_ids
        tiny_engine.update_weights(ckpt)
        assert tiny_engine.generate([prompt], greedy)[0][0].token_ids == after.token_ids
    finally:
        tiny_engine.update_weights(tiny_model)
    assert tiny_engine.generate([prompt], greedy)[0][0].token_ids == before.token_ids
    assert engine_mod.live_engine() is tiny_engine


def test_failed_reload_rebuilds_engine_and_raises(tiny_engine, tiny_model, prompt):
    greedy = SamplingSpec(temperature=0, max_tokens=8)
    before = tiny_engine.generate([prompt], greedy)[0][0].token_ids
    bad = {"model.embed_tokens.weight": torch.zeros(7, 3)}  # wrong shape
    with pytest.raises(EngineError, match="could not load the new weights"):
        tiny_engine.update_weights(bad)
    assert tiny_engine.generate([prompt], greedy)[0][0].token_ids == before
    tiny_engine.loaded_from = str(tiny_model.resolve())  # the rebuilt engine serves the original checkpoint


def test_engine_cache_and_unknown_backend(tiny_engine, tiny_model):
    assert engine_mod.make_engine(tiny_model, backend="vllm", seed=0) is tiny_engine
    assert engine_mod.engine_for(tiny_model, backend="vllm", seed=0, prefix_caching=True) is tiny_engine
    with pytest.raises(ValueError, match="unknown engine backend 'tpu'"):
        engine_mod.make_engine(tiny_model, backend="tpu")


def test_transformers_backend_same_interface(tiny_engine, tiny_model, prompt):
    hf = engine_mod.make_engine(tiny_model, backend="transformers", seed=0, batch_size=4)
    try:
        out = hf.generate([prompt, prompt[:9]], SamplingSpec(n=3, temperature=1.0, max_tokens=10, seed=2))
        assert [len(o) for o in out] == [3, 3]
        for gens in out:
            for g in gens:
                assert 1 <= len(g.token_ids) <= 10 and len(g.logprobs) == len(g.token_ids)
        # its log-probs agree with vLLM scoring the same tokens
        g = out[0][0]
        np.testing.assert_allclose(tiny_engine.score([prompt], [g.token_ids])[0], g.logprobs, atol=1e-4)
        # greedy decoding of both backends agrees
        greedy = SamplingSpec(temperature=0, max_tokens=8)
        assert (
            hf.generate([prompt], greedy)[0][0].token_ids
            == tiny_engine.generate([prompt], greedy)[0][0].token_ids
        )
        # a stop string cuts the row right after the stop, like vLLM
        spec = SamplingSpec(temperature=1.0, max_tokens=12, seed=11)
        sample = hf.generate([prompt], spec)[0][0]
        k, stop = visible_stop(hf, sample)
        cut = hf.generate([prompt], SamplingSpec(temperature=1.0, max_tokens=12, seed=11, stop=[stop]))[0][0]
        assert cut.finish_reason == "stop" and cut.stop_str == stop and cut.text.endswith(stop)
        assert cut.token_ids == sample.token_ids[: len(cut.token_ids)] and len(cut.token_ids) <= k + 1
    finally:
        hf.close()
    assert engine_mod.live_engine() is tiny_engine


def test_release_cache_frees_the_kv_pages_and_generation_is_unchanged(tiny_engine, prompt):
    """vLLM on CPU has no sleep mode: release_cache drops the prefix cache and the KV buffer's pages. The
    process gives the memory back (RSS falls by about the buffer), and the next generations — the same
    seeded samples, prefix-cache hits included — come out exactly as before."""
    import psutil

    spec = SamplingSpec(n=2, temperature=1.0, max_tokens=16, seed=3)
    before = tiny_engine.generate([prompt, prompt[:9]], spec)
    rss = psutil.Process().memory_info().rss
    freed = tiny_engine.release_cache()
    fell = rss - psutil.Process().memory_info().rss
    kv_bytes = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _kv_tensors(tiny_engine)
    }
    assert freed >= 0.99 * sum(kv_bytes.values()) > 0
    assert fell >= 0.8 * freed, (fell, freed)
    for _ in range(2):  # the second round hits the prefix cache refilled by the first
        again = tiny_engine.generate([prompt, prompt[:9]], spec)
        assert [[g.token_ids for g in o] for o in again] == [[g.token_ids for g in o] for o in before]
        assert np.allclose(
            [lp for o in again for g in o for lp in g.logprobs],
            [lp for o in before for g in o for lp in g.logprobs],
            atol=1e-5,
        )


def _kv_tensors(engine) -> list:
    return [t for ts in engine.llm.collective_rpc(lambda w: list(w.model_runner.kv_caches)) for t in ts]


def test_bf16_rollout_engine_samples_near_fp32_and_takes_pushed_weights(
    tiny_engine, tiny_model, prompt, hf_model, tmp_path
):
    """rollout.dtype=bfloat16: the rollout stage's engine holds bf16 weights and KV cache; its log-probs are the
    fp32 model's to bf16 precision, and fp32 weights pushed into it (what the update does) serve exactly as a
    fresh bf16 engine of that checkpoint does."""
    from schemas.params.rollout import RolloutParams
    from stages.rollout.shard import build_engine

    greedy = SamplingSpec(temperature=0, max_tokens=16)
    eng = build_engine(RolloutParams(dtype="bfloat16"), str(tiny_model))
    fresh = None
    try:
        assert eng is not tiny_engine and eng.options["dtype"] == "bfloat16"
        assert "bfloat16" in str(eng.llm.llm_engine.vllm_config.model_config.dtype)
        g = eng.generate([prompt], greedy)[0][0]
        gap = float(np.abs(np.asarray(g.logprobs) - hf_logprobs(hf_model, prompt, g.token_ids)).max())
        assert 1e-5 < gap < 0.1, gap  # bf16, not fp32, and close
        torch.manual_seed(4)
        new_model = type(hf_model)(hf_model.config)
        new_model.load_state_dict(
            {k: v + 0.05 * torch.randn_like(v) for k, v in hf_model.state_dict().items()}
        )
        ckpt = tmp_path / "ckpt"
        new_model.save_pretrained(ckpt)
        tiny_engine.tokenizer.save_pretrained(ckpt)
        eng.update_weights(new_model.state_dict(), source=str(ckpt))
        after = eng.generate([prompt], greedy)[0][0]
        fresh = engine_mod.make_engine(ckpt, backend="vllm", seed=0, dtype="bfloat16")
        ref = fresh.generate([prompt], greedy)[0][0]
        assert ref.token_ids == after.token_ids
        np.testing.assert_allclose(ref.logprobs, after.logprobs, atol=1e-5)
    finally:
        for e in (fresh, eng):
            if e is not None:
                e.close()
    assert engine_mod.live_engine() is tiny_engine
