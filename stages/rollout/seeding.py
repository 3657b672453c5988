"""Per-request sampling seeds for MURPHY trees: the same request gets the same seed whichever batch it is sent in.

TIR trajectories need no help: their turns go through the engine's stream with a seed per (trajectory, turn)
(``stages.rollout.tir.turn_seed``, keyed by the trajectory's global index; a Ray shard is told where its
problems sit), so this wrapper's ``generate`` is never on their path. The tree loop
(``tree.refinement_trees``) still generates depth by depth and gives request k of a generate call the seed
``spec.seed + 7919 * turn + 131 * k``, and the vLLM backend adds the request's place in the call once more:
a request's seed depends on how many others are in its batch before it. That is reproducible in one process,
but a tree rolled out in a shard (``stages.rollout.fanout``) sits at other places of other batches and
would sample differently. ``RequestSeeded`` wraps an engine so that every seeded request instead gets

    seed = H(base, the request's prompt token ids, its rank among identical prompts of the call)

(``base`` from the run's seed and iteration). A node's prompt is its whole context (problem, ancestors'
attempts and feedback), so the seed follows the node, not the batch; the G roots of a problem share
their prompt and are told apart by their rank, which is their sample index in any split that keeps a
problem's group (and every problem with the same prompt) in one shard. The engine's own ``+ place`` is taken
back out for the vLLM backend (``runtime.engines.vllm``), so the seed vLLM uses is exactly ``H(...)``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import replace

from runtime.engines import SamplingSpec

_OFFSET = 1 << 20  # room for the engine's own place offset to be subtracted without going negative


def request_seeds(base: int, prompts: Sequence[Sequence[int]]) -> list[int]:
    """``H(base, prompt, rank among identical prompts so far)`` for each prompt, in [2**20, 2**20 + 2**48)."""
    ranks: dict[bytes, int] = {}
    seeds = []
    for p in prompts:
        key = hashlib.blake2b(",".join(map(str, p)).encode(), digest_size=16).digest()
        rank = ranks[key] = ranks.get(key, -1) + 1
        h = hashlib.blake2b(key + f"|{base}|{rank}".encode(), digest_size=6).digest()
        seeds.append(_OFFSET + int.from_bytes(h, "big"))
    return seeds


class RequestSeeded:
    """``engine`` with per-request seeds (module docstring); everything else is the engine's own."""

    def __init__(self, engine, base: int) -> None:
        self.engine = engine
        self.base = int(base)

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    def generate(self, prompts: Sequence[Sequence[int]], spec: SamplingSpec | Sequence[SamplingSpec]):
        specs = [spec] * len(prompts) if isinstance(spec, SamplingSpec) else list(spec)
        if len(specs) != len(prompts):
            raise ValueError(f"{len(specs)} sampling specs for {len(prompts)} prompts")
        seeds = request_seeds(self.base, prompts)
        shifts_place = getattr(self.engine, "backend", None) == "vllm"
        place, out = 0, []
        for p, s, seed in zip(prompts, specs, seeds, strict=True):
            # the place the engine will give this request: prompts with no room are dropped before generating
            # (runtime.engines.base.Engine.generate), and vLLM seeds request i with spec.seed + i
            generated = len(p) < self.engine.max_model_len
            offset = place if (shifts_place and generated) else 0
            out.append(s if s.seed is None else replace(s, seed=seed - offset))
            place += generated
        return self.engine.generate(prompts, out)
