"""The engine interface shared by every backend: sampling spec, generations, the ``Engine`` base class, and
loading checkpoint weights. No backend library is imported here.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runtime.engines import live

log = logging.getLogger(__name__)

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


class GenerationStream:
    """Requests in, finished generations out, so a caller can add a request whenever its prompt is ready
    (a rollout adds a trajectory's next turn as soon as its tool result is back)::

        with engine.stream() as s:
            s.add(key, prompt_ids, spec)           # any hashable key; spec.seed is used as given
            while s.pending:
                for key, gens in s.step():         # the requests that finished in this step
                    ...                            # gens: spec.n Generations, as generate() returns them

    ``continuous`` False (this base form, e.g. the transformers backend): ``step`` generates every request
    added since the last step in one ``engine.generate`` call (rounds: callers gain nothing by adding
    requests one by one). True (vLLM): ``step`` is one scheduler step; requests join the running batch.
    A prompt that leaves no room in the context finishes at the next step with an empty ``context_limit``
    generation; an empty prompt raises ValueError in ``add``. ``close`` drops unfinished requests.
    """

    continuous = False

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._queue: list[tuple[Any, list[int], SamplingSpec]] = []

    def add(self, key: Any, prompt: Sequence[int], spec: SamplingSpec) -> None:
        # generate() clamps it to the context: any object with a generate() method can sit behind this
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt of request {key!r} is empty: every prompt needs at least one token id")
        self._queue.append((key, ids, spec))

    @property
    def pending(self) -> int:
        """Requests added and not yet returned by ``step``."""
        return len(self._queue)

    def step(self) -> list[tuple[Any, list[Generation]]]:
        batch, self._queue = self._queue, []
        if not batch:
            return []
        outs = self.engine.generate([ids for _, ids, _ in batch], [s for _, _, s in batch])
        return [(key, gens) for (key, _, _), gens in zip(batch, outs, strict=True)]

    def close(self) -> None:
        self._queue = []

    def __enter__(self) -> GenerationStream:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


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
            ids, admitted = self.admit(p, s, i)
            if admitted is None:
                out[i] = [Generation([], [], "", "context_limit") for _ in range(s.n)]
                continue
            todo.append((i, ids, admitted))
        if todo:
            results = self._generate([ids for _, ids, _ in todo], [s for _, _, s in todo])
            for (i, _, _), gens in zip(todo, results, strict=True):
                out[i] = gens
        return out  # type: ignore[return-value]

    def admit(
        self, prompt: Sequence[int], spec: SamplingSpec, i: int = 0
    ) -> tuple[list[int], SamplingSpec | None]:
        """(token ids, the spec with ``max_tokens`` clamped to the room left in the context) for one prompt;
        spec None when the prompt leaves no room (its generations are empty, ``context_limit``).
        Raises ValueError for an empty prompt (``i`` names it)."""
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty: every prompt needs at least one token id")
        room = self.max_model_len - len(ids)
        if room <= 0:
            log.warning(
                "prompt %d has %d tokens >= context %d: not generated", i, len(ids), self.max_model_len
            )
            return ids, None
        return ids, (spec if spec.max_tokens <= room else _replace(spec, max_tokens=room))

    def stream(self) -> GenerationStream:
        """A request-level session on this engine (see ``GenerationStream``); this base form generates in
        rounds, one ``generate`` call per ``step``; the vLLM backend steps its scheduler instead."""
        return GenerationStream(self)

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
        live.touch(self)
        return time.perf_counter() - t0

    def release_cache(self) -> int:
        """Free what the engine only needs while it generates (its KV cache), keeping the engine and its
        weights; the next generation works as before. Bytes freed (0: nothing to free, the default)."""
        return 0

    def _generate(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Generation]]:
        raise NotImplementedError

    def _push_weights(self, items: list[tuple[str, Any]], checkpoint: Path | None) -> None:
        raise NotImplementedError

    def close(self) -> None:
        live.forget(self)


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

    from runtime.checkpoint import refuse_pruned_weights

    refuse_pruned_weights(Path(ckpt))
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
