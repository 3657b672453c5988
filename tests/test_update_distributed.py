"""Multi-process update on CPU (gloo, 2 processes under torchrun) on the tiny model: the same parameters as one
process on the same samples, with DDP and with FSDP2; a failing rank gives a clear error and writes nothing."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from runtime import checkpoint as ckpt
from runtime.engines import live
from runtime.tableio import write_table
from schemas.outputs import StageOutput
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES
from stages import update
from stages.update import distributed as ddist
from stages.update.batches import SamplesError
from tests.test_update import sample_rows

# 7 samples, minibatches of 4 then 3: rank shares of 2/2 and 2/1 — the 3-sample minibatch gives rank 1 one
# sample and so one padding pass; 2 epochs, 4 optimizer steps. Prompt/completion lengths differ per sample,
# so a per-rank token mean (instead of the global minibatch's) would give a different update.
LORA = {"lora_rank": 4}  # with lr 1e-3 as above: a fresh adapter drawn from seed on every process
PARAMS = {
    "lr": 1e-3,
    "minibatch_size": 4,
    "micro_batch_size": 1,
    "ppo_epochs": 2,
    "warmup_steps": 2,
    "seed": 3,
    "target_kl": None,  # lr 1e-3 on the random tiny model passes KL 0.1 near the end: keep all 4 steps
    "dtype": "float32",  # compared to fp32 rounding (auto is bf16 on a CPU with native bf16 matmuls)
}


@pytest.fixture(scope="module")
def samples(tiny_model, tmp_path_factory) -> str:
    rows = sample_rows(tiny_model, n=7, seed=5, adv=[1.0, -1.0, 0.5, -0.25, 2.0, -1.5, 1.0])
    uri = tmp_path_factory.mktemp("dist-samples") / "samples.parquet"
    write_table(rows, SAMPLES, uri)
    return str(uri)


@pytest.fixture(scope="module")
def single(tiny_model, samples, tmp_path_factory) -> dict[str, tuple[str, StageOutput]]:
    """One-process updates: from the base model (no trainer state), and from that update's checkpoint
    (optimizer moments, scheduler and update index to resume). {kind: (start checkpoint, output)}."""
    first = update.run(
        UpdateParams(**PARAMS),
        {"samples": samples, "checkpoint": str(tiny_model)},
        tmp_path_factory.mktemp("s1"),
    )
    resumed = update.run(
        UpdateParams(**PARAMS),
        {"samples": samples, "checkpoint": first.uri("checkpoint")},
        tmp_path_factory.mktemp("s2"),
    )
    lora = None
    if importlib.util.find_spec("peft") is not None:  # the lora extra; without it only the LoRA case skips
        lora = update.run(
            UpdateParams(**PARAMS, **LORA),
            {"samples": samples, "checkpoint": str(tiny_model)},
            tmp_path_factory.mktemp("s3"),
        )
    return {
        "ddp": (str(tiny_model), first),
        "fsdp2": (first.uri("checkpoint"), resumed),
        "ddp-lora": (str(tiny_model), lora),
    }


def _assert_same_update(single, multi, start):
    base = ckpt.load_model(start).state_dict()
    one = ckpt.load_model(single.uri("checkpoint")).state_dict()
    two = ckpt.load_model(multi.uri("checkpoint")).state_dict()
    moved = max(float((one[k] - base[k]).abs().max()) for k in base)
    assert moved > 1e-3  # the update did something worth comparing
    for k in one:
        assert torch.allclose(one[k], two[k], atol=2e-5, rtol=0), (k, float((one[k] - two[k]).abs().max()))
    for k in ("actor/loss", "actor/approx_kl", "actor/entropy", "actor/grad_norm", "actor/trained_tokens"):
        assert multi.metrics[k] == pytest.approx(single.metrics[k], rel=1e-4, abs=1e-6), k
    assert multi.metrics["actor/global_step"] == single.metrics["actor/global_step"]


@pytest.mark.parametrize("kind", ["ddp", "fsdp2", pytest.param("ddp-lora", marks=pytest.mark.slow)])
def test_two_processes_give_the_one_process_update(kind, samples, single, tmp_path, monkeypatch):
    """DDP from the base model; FSDP2 resuming a one-process checkpoint (its optimizer state is loaded
    into the sharded optimizer); LoRA under DDP. Afterwards the parent pushes the new checkpoint into its
    live engine."""
    start, single = single[kind]
    if single is None:
        pytest.skip("peft not installed (extra 'lora')")
    pushed = {}

    class FakeEngine:
        model_dir = Path(start)

        def release_cache(self):  # the launching process frees its engine's cache before the workers train
            pushed["released"] = True
            return 0

        def update_weights(self, weights, source=None):
            pushed.update(weights=weights, source=source)
            return 0.0

    monkeypatch.setattr(live, "ENGINES", [FakeEngine()])  # the process's live-engine registry
    extra = LORA if kind.endswith("lora") else {}
    p = UpdateParams(**PARAMS, **extra, nproc=2, distributed=kind.removesuffix("-lora"))
    multi = update.run(p, {"samples": samples, "checkpoint": start}, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint", "steps.jsonl"]
    records = [json.loads(line) for line in (tmp_path / "steps.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == sorted(r["step"] for r in records) and records  # rank 0's, once
    assert any(f"2 processes ({p.distributed})" in n for n in multi.notes), multi.notes
    _assert_same_update(single, multi, start)
    assert pushed == {"released": True, "weights": multi.uri("checkpoint"), "source": multi.uri("checkpoint")}
    assert "timing/weight_sync" in multi.metrics
    # the stored optimizer state is the plain one-process form: the moments match too
    so = ckpt.load_trainer_state(single.uri("checkpoint"))["optimizer"]
    sm = ckpt.load_trainer_state(multi.uri("checkpoint"))["optimizer"]
    assert sorted(so["state"]) == sorted(sm["state"])
    for i in so["state"]:
        assert torch.allclose(so["state"][i]["exp_avg"], sm["state"][i]["exp_avg"], atol=1e-6, rtol=0)


def test_failing_rank_gives_a_clear_error_and_writes_nothing(tiny_model, samples, tmp_path):
    rows = sample_rows(tiny_model, n=2, seed=1)
    rows[1]["advantages"] = [float("nan")] * len(rows[1]["advantages"])
    bad = tmp_path / "bad.parquet"
    write_table(rows, SAMPLES, bad)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SamplesError, match=r"'s1'.*advantages") as e:
        update.run(UpdateParams(nproc=2), {"samples": str(bad), "checkpoint": str(tiny_model)}, out)
    assert "rank" not in str(e.value)  # the parent read the table: no process was launched
    # a checkpoint without weights fails in the ranks (the parent does not load it): the rank's own error
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in tiny_model.iterdir():
        if f.is_file() and not f.name.endswith(".safetensors"):
            (broken / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ckpt.CheckpointError, match=r"no weights.*\(rank \d of 2\)"):
        update.run(UpdateParams(nproc=2), {"samples": samples, "checkpoint": str(broken)}, out)
    assert list(out.iterdir()) == []


def test_rank_micro_batches_share_and_pad():
    """Ranks take items[rank::world], length-sorted, padded with None to the same number of passes."""
    items = ["aaa", "b", "cc", "dddd", "e"]
    w0, w1 = ddist.World(rank=0, size=2), ddist.World(rank=1, size=2)
    assert ddist.rank_micro_batches(items, 2, w0) == [["e", "cc"], ["aaa"]]
    assert ddist.rank_micro_batches(items, 2, w1) == [["b", "dddd"], None]
    assert ddist.rank_micro_batches(items, 2, ddist.World()) == [["b", "e"], ["cc", "aaa"], ["dddd"]]
    assert ddist.rank_micro_batches(["x"], 1, w1) == [None]


def test_lora_with_fsdp2_is_refused():
    with pytest.raises(ValueError, match="fsdp2"):
        UpdateParams(lora_rank=4, nproc=2, distributed="fsdp2")


def test_rank_error_prefers_the_stage_error_and_falls_back_to_the_log(tmp_path):
    result, log = tmp_path / "stage_output.json", tmp_path / "torchrun.log"
    log.write_text("... Traceback: something deep\n")
    err = ddist._rank_error(result, log, 2, 1)
    assert (
        isinstance(err, ddist.DistributedUpdateError) and "exited with 1" in str(err) and "deep" in str(err)
    )
    ddist.write_error(result, 0, RuntimeError("stopped by torchrun"))
    ddist.write_error(result, 1, ckpt.CheckpointError("checkpoint /x has no config.json"))
    err = ddist._rank_error(result, log, 2, 1)
    assert (
        isinstance(err, ckpt.CheckpointError) and str(err) == "checkpoint /x has no config.json (rank 1 of 2)"
    )
    ddist.error_file(result, 1).unlink()
    err = ddist._rank_error(result, log, 2, 1)
    assert isinstance(err, ddist.DistributedUpdateError) and "rank 0 of 2 failed: RuntimeError" in str(err)


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_two_gpus_give_the_one_gpu_update(kind, tiny_model, samples, tmp_path):
    """nccl, one GPU per rank, fp32 (so the comparison can be tight)."""
    p = {**PARAMS, "device": "cuda", "dtype": "float32"}
    inputs = {"samples": samples, "checkpoint": str(tiny_model)}
    one = update.run(UpdateParams(**p), inputs, tmp_path / "one")
    two = update.run(UpdateParams(**p, nproc=2, distributed=kind), inputs, tmp_path / "two")
    _assert_same_update(one, two, str(tiny_model))
