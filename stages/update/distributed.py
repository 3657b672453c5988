"""Multi-process updates for the update stage: torchrun + DDP or FSDP2, with no distribution layer of our own.

``UpdateParams.nproc = N > 1`` makes ``stages.update.run`` call ``launch``: it runs
``python -m torch.distributed.run --standalone --nproc-per-node N -m stages.update SAMPLES CKPT OUT ...`` as a
subprocess and returns the StageOutput that rank 0 wrote. Every rank runs the same ``stages.update.run``; inside
a torchrun world (``WORLD_SIZE`` > 1) it trains in the process group that ``world`` opens. What differs from
one process, all of it here:

- ``world``: ``init_process_group`` (nccl on CUDA, gloo on CPU), one device per rank (``cuda:LOCAL_RANK``),
  ``destroy_process_group`` at the end.
- ``wrap``: ``DistributedDataParallel`` (``distributed="ddp"``) or FSDP2 ``fully_shard`` on each decoder layer
  and then the model (``distributed="fsdp2"``; works on CPU/gloo too).
- ``rank_micro_batches``: every rank reads the whole samples table, so every rank knows every global
  minibatch (the same as one process: a function of seed, update index, epoch) and takes ``mb[rank::world]``.
  The loss normalisers are the *global* minibatch's (token count, sequence count), computed locally; DDP and
  FSDP2 average gradients over ranks, so each rank's loss is multiplied by the world size: the summed gradient
  then equals the one-process gradient of the whole minibatch. All ranks run the same number of forward /
  backward passes (collectives must match): a rank with fewer samples runs padding passes whose loss is × 0.
- ``all_reduce_sums`` / ``all_gather_dict``: step statistics are summed over ranks; π_old / π_ref log-probs
  are computed on each rank's share of the samples and gathered to every rank.
- ``full_model`` / ``optimizer_state``: the checkpoint holds a full (unsharded) state dict, written by rank 0
  only (atomically, ``runtime.checkpoint.save_checkpoint``); FSDP2 gathers it with
  ``torch.distributed.checkpoint.state_dict``. Optimizer state is stored in plain ``optimizer.state_dict()``
  form (integer parameter ids), so checkpoints move freely between 1 process, DDP and FSDP2.

Several nodes (``nnodes`` > 1): every node runs the stage (``python -m stages.update ...`` with its own
``node_rank``; or ``stages.update.run``); ``launch`` then runs ``torchrun --nnodes N --node-rank R
--rdzv-backend c10d --rdzv-endpoint HOST:PORT --rdzv-id ID`` instead of ``--standalone``, node 0's agent
hosting the rendezvous store. c10d numbers the nodes by host name and pid, not by ``--node-rank``, so each
rank renumbers itself ``node_rank * nproc + local_rank`` (``global_rank``): rank 0, which writes the checkpoint
and the StageOutput, is node 0's first process, and node 0's ``out`` holds the checkpoint; another node returns a
StageOutput without tables and writes nothing. The samples and the start checkpoint must be readable at the
same paths on every node (a shared file system). Under a Kubeflow ``PyTorchJob`` (infra/k8s/) each pod runs
``python -m stages.update`` as one rank with the operator's ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``: no torchrun.

A failing rank writes its error (type, message) next to the result file; ``launch`` re-raises it in the
parent as the same class (``SamplesError``, ``CheckpointError``, ...), or as ``DistributedUpdateError`` with
the tail of torchrun's log. Nothing is written to ``out`` unless the update succeeded.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from runtime.checkpoint import CheckpointError
from schemas.outputs import StageOutput
from schemas.params.update import UpdateParams
from stages.update.batches import SamplesError

T = TypeVar("T")
REPO = Path(__file__).resolve().parents[2]
# Set by ``launch`` for its ranks: this node's UpdateParams.node_rank (torchrun's c10d rendezvous numbers the
# nodes by host name and pid and ignores --node-rank; ``world`` renumbers the ranks from it).
NODE_RANK_ENV = "TURNTREE_NODE_RANK"


class DistributedUpdateError(RuntimeError):
    """A rank of a multi-process update failed for a reason that is not one of the stage's own errors."""


# Errors a rank re-raised in the parent as the same class (anything else: DistributedUpdateError).
RANK_ERRORS: dict[str, type[BaseException]] = {
    cls.__name__: cls
    for cls in (SamplesError, CheckpointError, KeyError, ValueError, FloatingPointError, FileNotFoundError)
}


# --- the world ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class World:
    """This process's place in the torchrun world (size 1: a plain single-process update)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    kind: str = "ddp"  # "ddp" | "fsdp2"

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def device(self, device: torch.device) -> torch.device:
        """The device this rank trains on (its own GPU on CUDA)."""
        return torch.device("cuda", self.local_rank) if self.distributed and device.type == "cuda" else device


def in_torchrun() -> bool:
    """True inside a torchrun world of more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def global_rank() -> int:
    """This process's rank: ``node_rank * nproc + local_rank`` under ``launch`` (so rank 0, the writer of the
    checkpoint and the result, is node 0's first process, whatever order the c10d rendezvous gave the nodes);
    torchrun's ``RANK`` otherwise. Renumbering is safe only where every rank is a client of the agents' store
    (``TORCHELASTIC_USE_AGENT_STORE``): then no rank hosts anything by its number."""
    rank = int(os.environ.get("RANK", "0"))
    node = os.environ.get(NODE_RANK_ENV)
    if node is None or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return rank
    return int(node) * int(os.environ["LOCAL_WORLD_SIZE"]) + int(os.environ.get("LOCAL_RANK", "0"))


@contextmanager
def world(params: UpdateParams, device: torch.device) -> Iterator[World]:
    """Open the process group when this process is one rank of a torchrun world; close it afterwards."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        yield World(kind=params.distributed)
        return
    rank, local = global_rank(), int(os.environ.get("LOCAL_RANK", "0"))
    os.environ["RANK"] = str(rank)
    if device.type == "cuda":
        if local >= torch.cuda.device_count():
            raise ValueError(
                f"nproc={size} ranks per node but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch.cuda.set_device(local)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend)
    try:
        yield World(rank=rank, size=size, local_rank=local, kind=params.distributed)
    finally:
        dist.destroy_process_group()


# --- the model ---------------------------------------------------------------------------------------------------
def wrap(model: torch.nn.Module, w: World, device: torch.device) -> torch.nn.Module:
    """The module to train through: DDP wrapper, the FSDP2-sharded model itself, or ``model`` (one process)."""
    if not w.distributed:
        return model
    if w.kind == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        layer_classes = set(getattr(model, "_no_split_modules", None) or [])
        for m in model.modules():
            if type(m).__name__ in layer_classes:
                fully_shard(m)
        fully_shard(model)
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    # Buffers (rotary tables) are constant: no broadcast, so forward passes outside training need no peers.
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def grad_sync(train_model: torch.nn.Module, w: World, sync: bool):
    """Context for one backward of an accumulation: gradients are reduced over ranks only when ``sync``."""
    if not w.distributed:
        return nullcontext()
    if w.kind == "fsdp2":
        train_model.set_requires_gradient_sync(sync)
        return nullcontext()
    return nullcontext() if sync else train_model.no_sync()


def full_model(model: torch.nn.Module, w: World) -> torch.nn.Module | None:
    """A plain, unsharded copy of an FSDP2 model on rank 0 (None elsewhere); collective: every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not w.main:
        return None
    plain = AutoModelForCausalLM.from_config(model.config, dtype=torch.float32)
    plain.load_state_dict(sd)
    return plain


# --- optimizer state (stored as plain optimizer.state_dict(): integer parameter ids) ---------------------------------
def _trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]


def optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, w: World) -> dict | None:
    """``optimizer.state_dict()`` form on rank 0 (None on other FSDP2 ranks); collective under FSDP2."""
    if w.kind != "fsdp2" or not w.distributed:
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    sd = get_optimizer_state_dict(
        model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    if not w.main:
        return None
    ids = {n: i for i, n in enumerate(_trainable_names(model))}
    return {
        "state": {ids[n]: s for n, s in sd["state"].items()},
        "param_groups": [dict(g, params=[ids[n] for n in g["params"]]) for g in sd["param_groups"]],
    }


def load_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, state: dict, w: World
) -> None:
    """Load a plain ``optimizer.state_dict()`` (every rank holds the full one) into a possibly sharded optimizer."""
    if w.kind != "fsdp2" or not w.distributed:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    names = _trainable_names(model)
    if len(state["state"]) > len(names) or any(int(i) >= len(names) for i in state["state"]):
        raise ValueError(
            f"optimizer state has {len(state['state'])} entries, the model {len(names)} parameters"
        )
    fqn = {
        "state": {names[int(i)]: s for i, s in state["state"].items()},
        "param_groups": [dict(g, params=[names[int(i)] for i in g["params"]]) for g in state["param_groups"]],
    }
    set_optimizer_state_dict(model, optimizer, fqn, options=StateDictOptions(full_state_dict=True))


# --- data and statistics -----------------------------------------------------------------------------------------------
def rank_micro_batches(
    items: list[T], size: int, w: World, key: Callable[[T], int] = len
) -> list[list[T] | None]:
    """This rank's share ``items[rank::world]``, sorted by ``key`` and cut into chunks of ``size``, padded with
    None to the largest rank's chunk count (every rank runs the same number of passes). One process: all
    items, length-sorted (stable: ties keep their order)."""
    shards = [sorted(items[r :: w.size], key=key) for r in range(w.size)]
    n = max(math.ceil(len(s) / size) for s in shards)
    mine = shards[w.rank]
    chunks: list[list[T] | None] = [mine[i : i + size] for i in range(0, len(mine), size)]
    return chunks + [None] * (n - len(chunks))


def all_reduce_sums(values: dict[str, float], w: World, device: torch.device) -> dict[str, float]:
    """Sum each entry over ranks (float64); every rank must pass the same keys."""
    if not w.distributed:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return dict(zip(keys, t.tolist(), strict=True))


def all_gather_dict(part: dict[Any, Any], w: World) -> dict[Any, Any]:
    """Union of every rank's dict (keys disjoint), on every rank."""
    if not w.distributed:
        return part
    parts: list[dict | None] = [None] * w.size
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in (p or {}).items()}


def broadcast(obj: T, w: World) -> T:
    """Rank 0's ``obj`` on every rank."""
    if not w.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- the launcher (parent process) ---------------------------------------------------------------------------------------
def error_file(result: Path, rank: int) -> Path:
    return result.with_name(f"error.rank{rank}.json")


def write_error(result: Path, rank: int, exc: BaseException) -> None:
    """What a failing rank leaves for the parent: its exception's class name and message."""
    msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
    error_file(result, rank).write_text(json.dumps({"type": type(exc).__name__, "message": str(msg)}))


def torchrun_command(params: UpdateParams) -> list[str]:
    """torchrun's own arguments for this node: ``--standalone`` on one node; otherwise a c10d rendezvous at
    ``rdzv_endpoint`` that node 0's agent hosts (``is_host``: on one machine every agent would match the
    endpoint's host name otherwise)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={params.nproc}"]
    if params.nnodes == 1:
        return cmd + ["--standalone"]
    return cmd + [
        f"--nnodes={params.nnodes}", f"--node-rank={params.node_rank}", "--rdzv-backend=c10d",
        f"--rdzv-endpoint={params.rdzv_endpoint}", f"--rdzv-id={params.rdzv_id}",
        f"--rdzv-conf=is_host={'true' if params.node_rank == 0 else 'false'}",
    ]  # fmt: skip


CHILD_ENV = "TURNTREE_UPDATE_CHILD"  # set in a launched update process: it never launches another


def wanted_threads(params: UpdateParams) -> int:
    """Torch threads of a CPU update: ``cpu_threads``, or every core this process may run on."""
    if params.cpu_threads:
        return params.cpu_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def threads_pinned(want: int) -> bool:
    """Set torch's thread count to ``want`` in this process; True when that is refused (vLLM's CPU worker
    replaces ``torch.set_num_threads`` with a no-op once it has bound its threads) and no launched update
    process is already this one."""
    torch.set_num_threads(want)
    return torch.get_num_threads() != want and not os.environ.get(CHILD_ENV)


def launch(
    params: UpdateParams, inputs: dict[str, str], out: Path, threads: int | None = None
) -> StageOutput:
    """Run this node's share of the update in a subprocess; rank 0's StageOutput on node 0: under torchrun
    (``torchrun_command``), or, with ``threads``, as one plain process with that many OpenMP threads.

    On node ``node_rank > 0`` rank 0 runs elsewhere: a successful update returns a StageOutput without
    tables (node 0's ``out`` holds the checkpoint; nothing is written to this node's ``out``)."""
    with tempfile.TemporaryDirectory(prefix="turntree-update-") as tmp:
        result, log = Path(tmp) / "stage_output.json", Path(tmp) / "torchrun.log"
        cmd = [
            *(torchrun_command(params) if threads is None else [sys.executable]),
            "-m", "stages.update", str(inputs["samples"]), str(inputs["checkpoint"]), str(out),
            "--params", params.model_dump_json(), "--result", str(result),
        ]  # fmt: skip
        if inputs.get("ref_checkpoint"):
            cmd += ["--ref-checkpoint", str(inputs["ref_checkpoint"])]
        if inputs.get("policy_version") is not None:
            cmd += ["--policy-version", str(inputs["policy_version"])]
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **{NODE_RANK_ENV: str(params.node_rank)},
        )
        env[CHILD_ENV] = "1"
        if threads is not None:
            env["OMP_NUM_THREADS"] = str(threads)
        with log.open("w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=env, check=False)
        if proc.returncode == 0 and params.node_rank > 0:
            return StageOutput(
                stage="update",
                notes=[f"node {params.node_rank} of {params.nnodes}: node 0 wrote the checkpoint"],
            )
        if proc.returncode != 0 or not result.is_file():
            raise _rank_error(result, log, params.world_size, proc.returncode)
        return StageOutput.model_validate_json(result.read_text())


def _rank_error(result: Path, log: Path, nproc: int, rc: int) -> BaseException:
    """The failing rank's own error, re-created in the parent (a rank that torchrun stopped because a peer
    failed reports less than the peer: the stage's own error types come first); else a DistributedUpdateError
    with the tail of torchrun's log."""
    errors = [
        (rank, json.loads(error_file(result, rank).read_text()))
        for rank in range(nproc)
        if error_file(result, rank).is_file()
    ]
    errors.sort(key=lambda e: (e[1]["type"] not in RANK_ERRORS, e[0]))
    if errors:
        rank, err = errors[0]
        cls = RANK_ERRORS.get(err["type"])
        if cls is not None:
            return cls(f"{err['message']} (rank {rank} of {nproc})")
        return DistributedUpdateError(f"rank {rank} of {nproc} failed: {err['type']}: {err['message']}")
    tail = log.read_text(errors="replace")[-3000:] if log.is_file() else ""
    return DistributedUpdateError(f"update subprocess ({nproc} process(es)) exited with {rc}:\n{tail}")
