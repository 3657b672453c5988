"""Update stage: token-level PPO-clip on the training samples, then a new checkpoint and a weight sync.

    run(params: UpdateParams, {"samples": uri, "checkpoint": dir, "ref_checkpoint": dir (when kl_beta > 0)}, out)
        -> StageOutput(tables={"checkpoint": <out>/checkpoint}, metrics=actor/*, timing/*)

What one call does (the loss is ``maths.policy_loss``, ALGORITHMS.md "Policy loss"):
1. Reads and checks ``samples`` (schemas.tables.SAMPLES): non-empty, equal per-row lengths, finite advantages
   and log-probs, a 0/1 loss mask with at least one trained token. Bad input: ``SamplesError``, nothing written.
2. Loads the policy (fp32 master weights) and, when ``trainer_state.pt`` is present, its optimizer, scheduler,
   RNG state and step counters, so consecutive calls equal one uninterrupted run (resume fidelity).
3. log π_old (``old_logprobs``): "recompute" (default) takes the first minibatch's from its own forward pass
   (no step has happened yet, so it is exact) and computes the others' in one no-grad pass before the first
   step; "rollout" uses the rollout engine's log-probs (no pass). Logs the gap to the rollout engine's
   log-probs (``actor/logprob_gap_*``). Log-probs come from a chunked selective log-softmax
   (``maths.policy_loss.selected_logprobs``): logits only from the first trained position on, fp32 over
   (chunk, V) at a time, only on trained tokens. With kl_beta > 0 the reference model is loaded (only then)
   and its log-probs computed once.
4. ``ppo_epochs`` passes; each shuffles the samples with a generator seeded by (seed, update index, epoch),
   cuts minibatches of ``minibatch_size`` (one optimizer step each) and, inside a minibatch, sorts by length
   into micro-batches of ``micro_batch_size`` (gradient accumulation; padding stays small). The aggregation
   normalisers are the minibatch's, so accumulation gives the same gradient as one big batch.
5. AdamW, linear warmup over the global step (it restarts with the optimizer: a checkpoint without optimizer
   state, such as the warm start's, starts at step 0 of the schedule), gradient clipping. Early stop
   (``target_kl``): once a minibatch's KL to π_old (k3, measured in its forward pass) exceeds ``target_kl``,
   it and the rest of the update's minibatches get no step. Per-minibatch records (KL, clip fraction,
   entropy, grad norm, lr at each global step): ``Trainer.steps`` (the stage returns only the aggregates).
   ``dtype=auto``: bf16 autocast over fp32 master weights on CUDA and on a CPU with native bf16 matmuls
   (``runtime.devices.cpu_native_bf16``: its bf16 GEMM runs ~4× its fp32 one), else fp32; optional gradient
   checkpointing. ``shared_prefix``: a micro-batch's shared prompt / ancestry runs once (``prefix``). LoRA
   (``lora_rank``) via peft: the checkpoint holds the merged model (what rollout and evaluation load) and the
   adapter in ``lora/`` on top of ``lora_base``.
6. Writes ``<out>/checkpoint`` atomically, then pushes the weights into the process's live rollout engine
   (``runtime.engines.live_engine()``) when there is one of the same architecture (``timing/weight_sync``).
   When no engine is live (a single-stage rerun, or a fresh process) nothing is pushed: the next rollout loads
   the new checkpoint from disk.

CPU threads (``cpu_threads``, 0: every core): the update runs with that many torch threads (restored after).
In a process whose thread count vLLM's CPU worker pinned (it makes ``torch.set_num_threads`` a no-op), it runs
instead as one ``python -m stages.update`` subprocess with ``OMP_NUM_THREADS`` set, and the live engine then
loads the new checkpoint from disk.

Multi-process (``nproc`` > 1, ``stages.update.distributed``): ``run`` launches ``torchrun --standalone
--nproc-per-node N -m stages.update ...`` as a subprocess; every rank runs this same ``run`` and ``Trainer``
with its model under DDP or FSDP2 (``distributed``), takes its share of each global minibatch (the same
minibatches as one process) with the global minibatch's normalisers, and rank 0 writes the full checkpoint.
The parent then returns rank 0's StageOutput and loads the new checkpoint into its live engine. Several
nodes (``nnodes``, ``node_rank``, ``rdzv_endpoint``): a c10d rendezvous instead of ``--standalone``; node 0's
first process writes the checkpoint (2 loopback "nodes" on CPU give the 1-process update:
tests/test_update_multinode.py). On CPU/gloo,
2 processes give the 1-process parameters to ~1e-6 with DDP, FSDP2 and LoRA+DDP (tests/test_update_distributed.py).
Supported: DDP (CPU and CUDA, LoRA too), FSDP2 (CPU and CUDA, full fine-tune; its optimizer state is stored
in the plain one-process form, so checkpoints move between process counts). Not supported or not tested:
LoRA under FSDP2 (refused), a sharded reference model (each rank holds a
full copy when kl_beta > 0), FSDP2 mixed-precision policies (bf16 is autocast over fp32 shards); the CUDA
paths (nccl, one GPU per rank) have not run on a GPU here. ``shared_prefix`` (one process): micro-batches by
prompt, each packed into one row — the group's prompt once, a tree attention mask, no padding
(``stages.update.prefix``). Not done: packing of samples without a common prompt (needs varlen attention
kernels; length-sorted padded micro-batches instead).

Run on its own: ``python -m stages.update SAMPLES CHECKPOINT OUT [--params JSON]`` (``{"nproc": 2}``: two
processes), or under your own launcher: ``torchrun --nproc-per-node 2 -m stages.update ...``.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from runtime import checkpoint as ckpt
from runtime.devices import resolve_device
from runtime.engines.base import EngineError, same_architecture
from runtime.engines.live import exclusive, live_engine
from runtime.memory import trim_heap
from schemas.outputs import StageOutput
from schemas.params.update import UpdateParams
from stages.update import distributed as ddist
from stages.update.batches import Sample, load_samples, within_staleness
from stages.update.trainer import Trainer

STAGE = "update"
log = logging.getLogger("turntree.update")


# --- weight sync ---------------------------------------------------------------------------------------------------
def sync_live_engine(weights: torch.nn.Module | Path, checkpoint_dir: Path) -> tuple[float | None, str]:
    """Push new weights into the process's live rollout engine; (seconds or None, note).

    ``weights``: the trained model (in-memory push) or a checkpoint directory the engine loads (after a
    multi-process update, whose model lived in the torchrun subprocess). The live-engine registry
    (``runtime.engines.live``) imports no backend library. The
    weights go in only when the engine's model has the same architecture as the new checkpoint
    (``runtime.engines.same_architecture``); they are labelled with ``checkpoint_dir`` so the next rollout on
    that checkpoint reuses the engine instead of reloading.
    """
    engine = live_engine()
    if engine is None:
        return None, "no live rollout engine: the next rollout loads the new checkpoint"
    try:
        same = same_architecture(Path(engine.model_dir), checkpoint_dir)
    except Exception as e:  # noqa: BLE001 - an unreadable engine config means: do not push
        return None, f"live engine not checked ({type(e).__name__}: {e}): not synced"
    if not same:
        return None, f"live engine serves {engine.model_dir}, another architecture: not synced"
    with (
        exclusive()
    ):  # a rollout running beside this update (max_staleness ≥ 1) finishes on its weights first
        t0 = time.perf_counter()
        if isinstance(weights, torch.nn.Module):
            engine.update_weights(weights.state_dict(), source=str(checkpoint_dir))
        else:
            engine.update_weights(str(weights), source=str(checkpoint_dir))
    return time.perf_counter() - t0, "pushed the new weights into the live rollout engine"


# --- stage entry point -------------------------------------------------------------------------------------------------
STEPS_FILE = "steps.jsonl"  # beside the checkpoint: Trainer.steps of this update, one JSON record per line


def run(params: UpdateParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """One policy update: samples + checkpoint -> new checkpoint (see module docstring).

    ``params.nproc > 1`` (outside a torchrun world): the update runs under torchrun in a subprocess
    (``stages.update.distributed.launch``); so does a CPU update whose threads this process cannot raise to
    ``cpu_threads``. The live engine, if any, then loads the new checkpoint from disk.
    """
    for key in ("samples", "checkpoint"):
        if key not in inputs:
            raise KeyError(f"update stage needs input {key!r}; got {sorted(inputs)}")
    if params.kl_beta > 0 and not inputs.get("ref_checkpoint"):
        raise KeyError("kl_beta > 0 needs inputs['ref_checkpoint'] (the reference policy, usually the base)")
    t0 = time.perf_counter()
    samples = load_samples(inputs["samples"])  # before anything heavy: bad input fails fast, writes nothing
    samples, stale = within_staleness(samples, inputs.get("policy_version"), params.max_staleness)
    released = release_engine_cache()
    device, _ = resolve_device(params.device, params.dtype)
    threads, before = None, torch.get_num_threads()
    if device.type == "cpu" and params.world_size == 1 and not ddist.in_torchrun():
        threads = ddist.wanted_threads(params)
        if not ddist.threads_pinned(threads):
            threads = None  # this process runs them
    if (params.world_size > 1 or threads is not None) and not ddist.in_torchrun():
        result = ddist.launch(params, inputs, Path(out), threads=threads)
        if not result.tables:  # node_rank > 0: node 0 holds the checkpoint and syncs its engine
            return result
        ckpt_dir = Path(result.uri("checkpoint"))
        sync_s, note = sync_live_engine(ckpt_dir, ckpt_dir)
        if sync_s is not None:
            result.metrics["timing/weight_sync"] = sync_s
        result.metrics["timing/update_stage"] = time.perf_counter() - t0
        result.notes.insert(0, note)
        if threads is not None:
            result.notes.insert(
                1, f"this process's threads are pinned: the update ran in a subprocess, {threads} threads"
            )
    else:
        try:
            result = _run_here(params, inputs, Path(out), samples, device, t0)
        finally:
            torch.set_num_threads(before)
            trim_heap()  # the trainer's model, gradients and optimizer state go back to the system
    if released:
        result.metrics["memory/engine_cache_released_mb"] = released / 2**20
    result.metrics.update(stale.metrics)
    result.notes += stale.notes
    return result


def release_engine_cache() -> int:
    """Free the live rollout engine's KV cache for the length of the update (bytes; 0 when there is no idle
    engine). The update never generates, and on CPU nothing else gives that memory back: vLLM's sleep mode
    is CUDA-only."""
    engine = live_engine()
    if engine is None:
        return 0
    with exclusive(wait=False) as idle:
        if not idle:  # a rollout generates beside this update (max_staleness ≥ 1): its cache stays
            return 0
        try:
            return engine.release_cache()
        except EngineError as e:  # a stream in flight: leave the engine as it is
            log.warning("live engine's cache not released: %s", e)
            return 0


def _run_here(
    params: UpdateParams,
    inputs: dict[str, str],
    out: Path,
    samples: list[Sample],
    device: torch.device,
    t0: float,
) -> StageOutput:
    """The update in this process (one process, or one torchrun rank)."""
    with ddist.world(params, device) as world:
        trainer = Trainer(inputs["checkpoint"], params, world)
        ref_model = None
        if params.kl_beta > 0:
            ref_model = ckpt.load_model(inputs["ref_checkpoint"], device=trainer.device).eval()
            ref_model.requires_grad_(False)
        metrics = trainer.update(samples, ref_model)
        del ref_model
        t1 = time.perf_counter()
        ref, plain = trainer.save(Path(out) / "checkpoint")
        metrics["timing/save_checkpoint"] = time.perf_counter() - t1
        if world.main:  # one record per optimizer step, on the global step (MLflow logs them as curves)
            lines = [json.dumps(r, sort_keys=True) for r in trainer.steps]
            (Path(out) / STEPS_FILE).write_text("\n".join(lines) + "\n" if lines else "")
    sync_s, note = None, "torchrun rank: the launching process syncs the live engine"
    if not world.distributed:
        sync_s, note = sync_live_engine(plain, Path(ref.uri))
    if sync_s is not None:
        metrics["timing/weight_sync"] = sync_s
    metrics["timing/update_stage"] = time.perf_counter() - t0
    notes = [
        note,
        f"{len(samples)} samples, {params.ppo_epochs} epoch(s), global step {trainer.step}, "
        f"device {trainer.device}"
        + (f" ({torch.get_num_threads()} threads)" if trainer.device.type == "cpu" else "")
        + f", {'bf16 autocast' if trainer.amp_dtype else 'fp32'}"
        + (f", LoRA r={params.lora_rank}" if params.lora_rank else "")
        + (f", {world.size} processes ({world.kind})" if world.distributed else ""),
    ]
    if metrics.get("actor/early_stopped"):
        notes.append(
            f"early stop: KL to π_old {trainer.steps[-1]['approx_kl']:.3g} > target_kl {params.target_kl:g} "
            f"before step {int(metrics['actor/early_stop_step'])} of {int(metrics['actor/steps_planned'])}"
        )
    return StageOutput(stage=STAGE, tables={"checkpoint": ref}, metrics=metrics, notes=notes)


def main(argv: list[str] | None = None) -> None:
    """CLI; also what each torchrun rank runs. ``--result FILE``: rank 0 writes the StageOutput JSON there and
    a failing rank writes its error next to it (``stages.update.distributed.write_error``)."""
    import argparse
    import os

    ap = argparse.ArgumentParser(description="turntree update stage")
    ap.add_argument("samples")
    ap.add_argument("checkpoint")
    ap.add_argument("out", type=Path)
    ap.add_argument("--ref-checkpoint")
    ap.add_argument("--policy-version", help="the version of CHECKPOINT (staleness of the samples)")
    ap.add_argument("--params", default="{}", help="UpdateParams as JSON")
    ap.add_argument("--result", type=Path, help="write the StageOutput JSON here (rank 0)")
    a = ap.parse_args(argv)
    inputs = {"samples": a.samples, "checkpoint": a.checkpoint}
    if a.ref_checkpoint:
        inputs["ref_checkpoint"] = a.ref_checkpoint
    if a.policy_version is not None:
        inputs["policy_version"] = a.policy_version
    rank = ddist.global_rank()
    try:
        result = run(UpdateParams.model_validate_json(a.params), inputs, a.out)
    except BaseException as e:
        if a.result is not None:
            ddist.write_error(a.result, rank, e)
        raise
    if rank == 0:
        text = result.model_dump_json(indent=2)
        if a.result is not None:
            tmp = a.result.with_name(a.result.name + ".tmp")
            tmp.write_text(text)
            os.replace(tmp, a.result)
        print(text)
    if ddist.in_torchrun():
        # The update is done and its output written. Skip the interpreter's teardown: on CPU/gloo a rank now and
        # then aborted in C++ static destructors after a successful update ("terminate called without an active
        # exception", SIGABRT), which made torchrun report a failed update.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
