"""LoRA for the update stage via ``peft`` (optional dependency: the ``lora`` extra, ``peft>=0.13``).

A LoRA checkpoint holds two things: the merged model (base + adapter), which the rollout engine and the
evaluation load like any checkpoint, and the unmerged adapter in ``lora/`` together with ``lora_base`` (the
directory of the base weights) in ``trainer_state.pt``, so the next update continues the same adapter and its
optimizer state. The base directory must stay where it was (it is normally the prepared model or the
warm-start checkpoint of the run).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch

from runtime import checkpoint as ckpt


def _peft():
    try:
        import peft
    except ImportError as e:
        raise RuntimeError(
            "lora_rank is set but peft is not installed: pip install 'peft>=0.13' (extra 'lora')"
        ) from e
    return peft


def load_lora_policy(
    source: Path, state: dict[str, Any] | None, params, device
) -> tuple[torch.nn.Module, str]:
    """(peft model with a trainable adapter, base directory). Continues ``source``'s adapter when it has one,
    else puts a fresh adapter (B = 0: the policy starts equal to ``source``; A drawn from ``params.seed``) on
    top of ``source``."""
    peft = _peft()
    base_dir = state.get("lora_base") if state else None
    if base_dir:
        adapter_dir = Path(source) / ckpt.LORA_DIR
        if not adapter_dir.is_dir():
            raise ckpt.CheckpointError(
                f"checkpoint {source} names a LoRA base but has no {ckpt.LORA_DIR}/ adapter"
            )
        try:
            base = ckpt.load_model(base_dir, device=device)
        except ckpt.CheckpointError as e:
            raise ckpt.CheckpointError(f"LoRA base of {source} is not loadable: {e}") from e
        model = peft.PeftModel.from_pretrained(base, adapter_dir, is_trainable=True)
    else:
        base_dir = str(Path(source).absolute())
        base = ckpt.load_model(source, device="cpu")
        cfg = peft.LoraConfig(
            r=params.lora_rank,
            lora_alpha=params.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(params.lora_target_modules),
            task_type="CAUSAL_LM",
        )
        # The fresh adapter's random A matrices are a function of params.seed, not of whatever drew from
        # the process's RNG before (a torchrun rank and the launching process must start alike).
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(params.seed)
            model = peft.get_peft_model(base, cfg)
    return model.to(device).train(), str(base_dir)


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapter merged in (the trained peft model is left untouched)."""
    return copy.deepcopy(model).merge_and_unload()
