"""GPU check s2's hook: in a torchrun rank of a one-process world, the update stage's world made distributed
(loaded by file path from a ``sitecustomize`` the section writes, so it imports nothing of the bench at the top)."""

from __future__ import annotations

import os


def force_distributed_world() -> None:
    """In a torchrun rank of a one-process world: make ``stages.update.distributed.world`` open the process group
    (nccl on CUDA, gloo on CPU) and return a World whose ``distributed`` is True, so the stage wraps the model in
    DDP / FSDP2 and runs every collective, as it would with more processes."""
    import contextlib

    import torch
    import torch.distributed as dist

    from stages.update import distributed as ddist

    if int(os.environ.get("WORLD_SIZE", "1")) != 1:
        return  # several processes: the stage's own world already does this

    class ForcedWorld(ddist.World):
        @property
        def distributed(self) -> bool:
            return True

    @contextlib.contextmanager
    def world(params, device):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if device.type == "cuda":
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        try:
            yield ForcedWorld(
                rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local, kind=params.distributed
            )
        finally:
            dist.destroy_process_group()

    ddist.world = world
