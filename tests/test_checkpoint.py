"""Checkpoints: round trip, atomic writes, clear errors for missing or corrupt ones, LoRA continuation."""

from __future__ import annotations

import importlib.util
import shutil

import pytest
import torch

from runtime import checkpoint as ckpt
from runtime.tableio import write_table
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES
from stages import update
from tests.test_update import sample_rows, seq_logprob


@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """One update of the tiny model: (samples uri, StageOutput, rows)."""
    d = tmp_path_factory.mktemp("ckpt")
    rows = sample_rows(tiny_model, n=4)
    write_table(rows, SAMPLES, d / "samples.parquet")
    p = UpdateParams(lr=1e-3, minibatch_size=2, micro_batch_size=2)
    out = update.run(p, {"samples": str(d / "samples.parquet"), "checkpoint": str(tiny_model)}, d / "u")
    return str(d / "samples.parquet"), out, rows


def test_round_trip(tiny_model, trained):
    _, out, _ = trained
    path = ckpt.check_checkpoint(out.uri("checkpoint"))
    assert (
        out.tables["checkpoint"].sha256 == ckpt.directory_sha256(path) and out.tables["checkpoint"].rows == 0
    )
    for f in ("tokenizer.json", "tokenizer_config.json"):  # tokenizer copied byte for byte
        assert (path / f).read_bytes() == (tiny_model / f).read_bytes()
    state = ckpt.load_trainer_state(path)
    assert state["step"] == 2 and state["update_idx"] == 1 and state["optimizer"]["state"]
    tok = ckpt.load_tokenizer(path)
    assert tok.eos_token == "<|im_end|>"
    # the stored weights are those the trainer ended with: reload == continue from the same checkpoint
    t = update.Trainer(path, UpdateParams())
    reloaded = ckpt.load_model(path)
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, t.model.state_dict()[k]), k
    assert not list(path.parent.glob(".*tmp"))  # no temp dirs left behind


def test_missing_and_corrupt_checkpoints_fail_clearly(tiny_model, trained, tmp_path):
    samples_uri, out, _ = trained
    with pytest.raises(ckpt.CheckpointError, match="does not exist"):
        ckpt.load_model(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="no config.json"):
        update.Trainer(empty, UpdateParams())

    bad = tmp_path / "bad"
    shutil.copytree(out.uri("checkpoint"), bad)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    dest = tmp_path / "out"
    dest.mkdir()
    with pytest.raises(ckpt.CheckpointError, match="cannot load the model"):
        update.run(UpdateParams(), {"samples": samples_uri, "checkpoint": str(bad)}, dest)
    assert list(dest.iterdir()) == []

    bad_state = tmp_path / "bad_state"
    shutil.copytree(out.uri("checkpoint"), bad_state)
    (bad_state / ckpt.TRAINER_STATE).write_bytes(b"not a torch file")
    with pytest.raises(ckpt.CheckpointError, match="corrupt"):
        update.Trainer(bad_state, UpdateParams())

    no_weights = tmp_path / "no_weights"
    shutil.copytree(out.uri("checkpoint"), no_weights)
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no weights"):
        ckpt.check_checkpoint(no_weights)


def test_failed_write_leaves_nothing_under_the_final_name(tiny_model, tmp_path):
    model = ckpt.load_model(tiny_model)
    with pytest.raises(FileNotFoundError):
        ckpt.save_checkpoint(tmp_path / "c", model, tokenizer_from=tmp_path / "no-such-dir")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft not installed (extra 'lora')")
def test_lora_update_merges_and_continues_its_adapter(tiny_model, trained, tmp_path):
    samples_uri, _, rows = trained
    p = UpdateParams(lr=1e-2, minibatch_size=2, micro_batch_size=2, lora_rank=4)
    a = update.run(p, {"samples": samples_uri, "checkpoint": str(tiny_model)}, tmp_path / "a")
    path = ckpt.check_checkpoint(a.uri("checkpoint"))
    assert (path / ckpt.LORA_DIR / "adapter_config.json").is_file()
    merged = ckpt.load_model(path).eval()  # a plain model: what the rollout engine loads
    base = ckpt.load_model(tiny_model).eval()
    assert rows[0]["advantages"][-1] > 0 and seq_logprob(merged, rows[0]) > seq_logprob(base, rows[0])
    # the next update continues the same adapter (on the same base) with its optimizer state
    t = update.Trainer(path, p)
    assert t.lora_base == str(tiny_model.absolute()) and t.step == 2
    assert t.optimizer.state_dict()["state"]  # Adam moments restored
    ids = torch.tensor([rows[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(t.model.eval()(input_ids=ids).logits, merged(input_ids=ids).logits, atol=1e-4)
    with pytest.raises(ckpt.CheckpointError, match="LoRA"):
        update.Trainer(path, UpdateParams())
