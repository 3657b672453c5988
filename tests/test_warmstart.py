"""Warm start: demonstration tokenisation and masking, the SFT loss, and a short fine-tune on the tiny model."""

from __future__ import annotations

import pytest
import torch

from runtime import checkpoint as ckpt
from runtime.tableio import write_table
from schemas.params.update import WarmstartParams
from schemas.tables import PROBLEMS
from stages import warmstart
from stages.data.synthetic import generate


def _problems(tmp_path, rows, name="problems.parquet") -> str:
    write_table([dict(r, split="train") for r in rows], PROBLEMS, tmp_path / name)
    return str(tmp_path / name)


def test_examples_mask_prompt_and_observations(tiny_model):
    tok = ckpt.load_tokenizer(tiny_model)
    arith = generate("tool-arith", count=1, seed=0)[0]
    func = generate("func-synth", count=1, seed=0)[0]
    plain_math = dict(arith, demonstration=None)
    (ids, mask), (fids, fmask) = warmstart.demonstration_examples(tok, [arith, plain_math, func], 4096)[0]
    trained = tok.decode([t for t, m in zip(ids, mask, strict=True) if m])
    assert "```python" in trained and "\\boxed{" in trained and "```output" not in trained
    first = mask.index(1)
    masked_after_prompt = tok.decode([t for t, m in zip(ids[first:], mask[first:], strict=True) if not m])
    assert masked_after_prompt.startswith("```output")  # the observation is the only masked completion part
    assert "def " + func["entry_point"] in tok.decode([t for t, m in zip(fids, fmask, strict=True) if m])


def test_sft_loss_ignores_masked_tokens():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, requires_grad=True)
    ids = torch.randint(0, 11, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 1, 1, 0, 0]], dtype=torch.float32)
    loss = warmstart.sft_loss(logits, ids, mask, n_tokens=float(mask.sum()))
    loss.backward()
    want = -torch.log_softmax(logits, -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
    assert float(loss) == pytest.approx(float((want * mask[:, 1:]).sum() / 4), abs=1e-6)
    # logits at position t predict token t+1: a masked target means zero gradient at t
    assert torch.all(logits.grad[:, :-1][mask[:, 1:] == 0] == 0) and torch.all(logits.grad[:, -1] == 0)


def test_sft_loss_on_the_kept_logits_is_the_full_loss():
    """The warm start asks the model for the last logits_needed(mask) rows only (from the position before the
    first trained token): same loss and same gradient on those rows as from every row."""
    from maths.policy_loss import logits_needed

    torch.manual_seed(1)
    full = torch.randn(2, 6, 13, requires_grad=True)
    ids = torch.randint(0, 13, (2, 6))
    mask = torch.tensor([[0, 0, 0, 1, 1, 0], [0, 0, 0, 1, 0, 1]], dtype=torch.float32)
    k = logits_needed(mask)
    assert k == 4
    kept = full[:, -k:].detach().requires_grad_()
    a = warmstart.sft_loss(full, ids, mask, n_tokens=4.0)
    b = warmstart.sft_loss(kept, ids, mask, n_tokens=4.0)
    a.backward()
    b.backward()
    assert float(b) == pytest.approx(float(a), abs=1e-6)
    assert torch.allclose(kept.grad, full.grad[:, -k:], atol=1e-7) and torch.all(full.grad[:, :-k] == 0)


def test_warmstart_lowers_the_demonstration_loss(tiny_model, tmp_path):
    rows = generate("tool-arith", count=6, seed=0) + generate("func-synth", count=2, seed=0)
    uri = _problems(tmp_path, rows)
    p = WarmstartParams(enabled=True, steps=6, lr=2e-3, batch_size=4, micro_batch_size=2)
    out = warmstart.run(p, {"problems": uri, "checkpoint": str(tiny_model)}, tmp_path / "ws")
    m = out.metrics
    assert m["actor/sft_examples"] == 8 and m["actor/sft_loss_last"] < m["actor/sft_loss_first"]
    state = ckpt.load_trainer_state(out.uri("checkpoint"))
    assert state["step"] == 0 and "optimizer" not in state  # RL starts with a fresh optimizer
    assert ckpt.load_tokenizer(out.uri("checkpoint")).eos_token == "<|im_end|>"


def test_no_demonstrations_fails_clearly_and_writes_nothing(tiny_model, tmp_path):
    rows = [dict(r, demonstration=None) for r in generate("tool-arith", count=2, seed=0)]
    uri = _problems(tmp_path, rows)
    out = tmp_path / "ws"
    out.mkdir()
    with pytest.raises(warmstart.NoDemonstrationsError, match="no 'train' problem"):
        warmstart.run(WarmstartParams(), {"problems": uri, "checkpoint": str(tiny_model)}, out)
    assert list(out.iterdir()) == []


def test_warm_start_is_cached_across_runs_by_content(tiny_model, tmp_path, monkeypatch):
    """Same model, problems and parameters: the second run copies the cached checkpoint (no training); another
    parameter or a tampered entry trains again; cache off never reads or writes the cache."""
    from runtime import warmstart_cache

    monkeypatch.setenv("TURNTREE_WARMSTART_CACHE", str(tmp_path / "cache"))
    uri = _problems(tmp_path, generate("tool-arith", count=4, seed=0))
    inputs = {"problems": uri, "checkpoint": str(tiny_model)}
    p = WarmstartParams(enabled=True, steps=2, lr=2e-3, batch_size=2, micro_batch_size=2)
    first = warmstart.run(p, inputs, tmp_path / "a")
    trained = []
    monkeypatch.setattr(warmstart, "_train", lambda *a: trained.append(1) or first)
    second = warmstart.run(p, inputs, tmp_path / "b")
    assert first.metrics["warmstart/cache_hit"] == 0 and second.metrics["warmstart/cache_hit"] == 1
    assert not trained and second.tables["checkpoint"].sha256 == first.tables["checkpoint"].sha256
    assert second.metrics["actor/sft_loss_last"] == first.metrics["actor/sft_loss_last"]
    assert ckpt.load_tokenizer(second.uri("checkpoint")).eos_token == "<|im_end|>"
    (entry,) = [d for d in (tmp_path / "cache").iterdir() if not d.name.startswith(".")]
    warmstart.run(p.model_copy(update={"steps": 3}), inputs, tmp_path / "c")  # another key: trains
    assert trained == [1]
    # the same parameters resolving to another dtype on another machine (dtype=auto: bf16 where the CPU has
    # native bf16 matmuls) are another key: an fp32 warm start is never served as a bf16 one, or back
    key = warmstart_cache.cache_key(p, inputs, "code")
    here = warmstart_cache.resolve_device("cpu", "auto")[1]
    with monkeypatch.context() as m:
        m.setattr(
            warmstart_cache,
            "resolve_device",
            lambda d, t: (torch.device("cpu"), None if here else torch.bfloat16),
        )
        assert warmstart_cache.cache_key(p, inputs, "code") != key
    assert warmstart_cache.cache_key(p, inputs, "code") == key
    weights = next((entry / "checkpoint").glob("*.safetensors"))
    weights.unlink()
    weights.write_bytes(b"tampered")  # a hard-linked copy elsewhere must not change: unlink first
    warmstart.run(p, inputs, tmp_path / "d")
    assert trained == [1, 1]  # the tampered entry was not trusted
    entries = len(list((tmp_path / "cache").iterdir()))
    warmstart.run(p.model_copy(update={"cache": False, "steps": 4}), inputs, tmp_path / "e")
    assert trained == [1, 1, 1] and len(list((tmp_path / "cache").iterdir())) == entries
    assert warmstart_cache.cache_root() == tmp_path / "cache"
