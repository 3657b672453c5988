"""Checkpoints: a Hugging Face ``save_pretrained`` directory (model + tokenizer) plus ``trainer_state.pt``.

Layout of a checkpoint written by the update / warm-start stages::

    config.json, generation_config.json, model.safetensors   the policy (LoRA: the adapter merged in)
    tokenizer.json, tokenizer_config.json, chat_template.jinja, ...   copied byte for byte from the input
    trainer_state.pt    {"step", "update_idx", "optimizer", "scheduler", "rng", "lineage", "lora_base", ...}
    lora/               (LoRA only) the unmerged peft adapter, trained on top of ``lora_base``

A checkpoint is written into a temporary sibling directory and renamed into place, so a crash never leaves a
half-written checkpoint under the final name. Loading checks the directory first and raises
``CheckpointError`` naming what is missing or unreadable (never a bare traceback from deep in transformers).
``trainer_state.pt`` is loaded with ``weights_only=True`` (no arbitrary pickles).
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch

from runtime.tableio import sha256_file
from schemas.outputs import TableRef

TRAINER_STATE = "trainer_state.pt"
LORA_DIR = "lora"
WEIGHTS_PRUNED = "WEIGHTS_PRUNED.json"  # left by `turntree prune --weights` in place of the weights (flows.prune)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")
# Files the model's own save_pretrained writes (or that describe another model): not copied from the input.
_NOT_COPIED = {"config.json", "generation_config.json", TRAINER_STATE, "turntree-model.json"}


class CheckpointError(RuntimeError):
    """A checkpoint directory is missing, incomplete or unreadable."""


def _weight_files(path: Path) -> list[Path]:
    return [p for pat in WEIGHT_PATTERNS for p in path.glob(pat)]


def check_checkpoint(path: str | os.PathLike) -> Path:
    """Return the checkpoint directory as a Path, or raise CheckpointError naming what is wrong."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(
            f"checkpoint {p} is not a directory (expected a save_pretrained model directory)"
        )
    if not (p / "config.json").is_file():
        raise CheckpointError(f"checkpoint {p} has no config.json: not a model directory")
    refuse_pruned_weights(p)
    if not _weight_files(p):
        raise CheckpointError(f"checkpoint {p} has no weights (*.safetensors / pytorch_model*.bin)")
    if not any((p / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise CheckpointError(f"checkpoint {p} has no tokenizer files")
    return p


def refuse_pruned_weights(p: Path) -> None:
    """CheckpointError (bad input, one line) when ``turntree prune --weights`` removed this checkpoint's weights."""
    if (p / WEIGHTS_PRUNED).is_file():
        raise CheckpointError(
            f"checkpoint {p}: its weights were removed by `turntree prune --weights` (its evaluations and tables "
            "are kept); use the run's final checkpoint or its warm start"
        )


def load_model(path: str | os.PathLike, *, device: str | torch.device = "cpu") -> torch.nn.Module:
    """The causal LM of a checkpoint in float32 (master weights), on ``device``, in train mode."""
    from transformers import AutoModelForCausalLM

    p = check_checkpoint(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32)
    except Exception as e:  # safetensors / json / config errors all mean the same thing to the caller
        raise CheckpointError(f"checkpoint {p}: cannot load the model ({type(e).__name__}: {e})") from e
    model.config.use_cache = False
    return model.to(device).train()


def load_tokenizer(path: str | os.PathLike):
    from transformers import AutoTokenizer

    p = check_checkpoint(path)
    try:
        return AutoTokenizer.from_pretrained(p)
    except Exception as e:
        raise CheckpointError(f"checkpoint {p}: cannot load the tokenizer ({type(e).__name__}: {e})") from e


def load_trainer_state(path: str | os.PathLike) -> dict[str, Any] | None:
    """The checkpoint's trainer state, or None when it has none (a prepared base model)."""
    f = Path(path) / TRAINER_STATE
    if not f.exists():
        return None
    try:
        state = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(
            f"{f} is unreadable ({type(e).__name__}: {e}); the checkpoint is corrupt"
        ) from e
    if not isinstance(state, dict) or "step" not in state:
        raise CheckpointError(f"{f} is not a turntree trainer state (no 'step' entry)")
    return state


# --- RNG state ---------------------------------------------------------------------------------------------------
def capture_rng() -> dict[str, Any]:
    """Torch CPU / CUDA and Python RNG state (what dropout and any sampling in the trainer draw from)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- writing ---------------------------------------------------------------------------------------------------
def directory_sha256(path: str | os.PathLike) -> str:
    """sha256 over the sorted (relative path, file sha256) pairs of every file under ``path``."""
    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root).as_posix()}\t{sha256_file(f)}\n".encode())
    return h.hexdigest()


def directory_ref(path: str | os.PathLike) -> TableRef:
    return TableRef(uri=os.fspath(path), sha256=directory_sha256(path), rows=0)


def copy_tokenizer_files(src: str | os.PathLike, dst: Path) -> None:
    """Copy every non-weight, non-config file of ``src`` (tokenizer, chat template) to ``dst`` byte for byte."""
    src = Path(src)
    weights = set(_weight_files(src))
    for f in src.iterdir():
        if f.is_file() and f not in weights and f.name not in _NOT_COPIED:
            shutil.copy2(f, dst / f.name)


def save_checkpoint(
    final: str | os.PathLike,
    model: torch.nn.Module,
    *,
    tokenizer_from: str | os.PathLike,
    trainer_state: dict[str, Any] | None = None,
    adapter: torch.nn.Module | None = None,
) -> TableRef:
    """Write ``model`` (+ tokenizer files of ``tokenizer_from``, trainer state, LoRA adapter) atomically.

    ``model`` is a plain transformers model (with LoRA: the merged copy); ``adapter`` the peft model whose
    adapter goes to ``lora/``. Returns the directory's TableRef (rows=0).
    """
    final = Path(final).absolute()
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        tmp.mkdir()
        model.save_pretrained(tmp)
        copy_tokenizer_files(tokenizer_from, tmp)
        if adapter is not None:
            adapter.save_pretrained(tmp / LORA_DIR)
        if trainer_state is not None:
            torch.save(trainer_state, tmp / TRAINER_STATE)
        for f in tmp.rglob("*"):
            if f.is_file():
                fd = os.open(f, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if final.exists():  # a rerun into the same directory: move the old one aside, then drop it
            old = final.parent / f".{final.name}.{uuid.uuid4().hex[:8]}.old"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory_ref(final)
