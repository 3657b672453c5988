"""The transformers ``generate`` backend of ``runtime.engines`` (machines where vLLM cannot run).

Same interface and semantics as the vLLM backend: each prompt is expanded ``n`` times, batched with left
padding (``batch_size`` sequences per ``generate`` call, option), sampled with temperature / top-p (greedy at
temperature 0), and post-processed per sequence: cut after the first eos or stop string (kept, as vLLM keeps
them with ``include_stop_str_in_output``) or at the prompt's ``max_tokens``. Log-probs are of the raw logits
(``output_logits``), i.e. before temperature, like vLLM's default ``raw_logprobs``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runtime.engines.base import Engine, Generation, SamplingSpec


class TransformersEngine(Engine):
    """Options: batch_size (16 sequences per generate call), dtype ("float32" on CPU, "bfloat16" on CUDA),
    max_model_len (default: the config's max_position_embeddings)."""

    def __post_init__(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.backend = "transformers"
        super().__post_init__()
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = self.options.get("dtype") or ("bfloat16" if self.device == "cuda" else "float32")
        self.model = AutoModelForCausalLM.from_pretrained(self.model_dir, dtype=getattr(torch, dtype))
        self.model.to(self.device).eval()
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        self._generator_seed = self.seed

    def _generate(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[list[Generation]]:
        rows = [(i, j) for i, s in enumerate(specs) for j in range(s.n)]
        # sort by (spec, prompt length) so a batch shares sampling settings and pads little
        rows.sort(key=lambda r: (_spec_key(specs[r[0]]), len(prompts[r[0]])))
        out: list[list[Generation | None]] = [[None] * s.n for s in specs]
        bs = int(self.options.get("batch_size", 16))
        start = 0
        while start < len(rows):
            key = _spec_key(specs[rows[start][0]])
            end = start
            while end < len(rows) and end - start < bs and _spec_key(specs[rows[end][0]]) == key:
                end += 1
            batch = rows[start:end]
            gens = self._generate_batch([prompts[i] for i, _ in batch], [specs[i] for i, _ in batch])
            for (i, j), g in zip(batch, gens, strict=True):
                out[i][j] = g
            start = end
        return out  # type: ignore[return-value]

    def _generate_batch(self, prompts: list[list[int]], specs: list[SamplingSpec]) -> list[Generation]:
        import torch

        spec = specs[0]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        sample = spec.temperature > 0
        kw: dict[str, Any] = dict(
            max_new_tokens=max(s.max_tokens for s in specs),
            do_sample=sample,
            output_logits=True,
            return_dict_in_generate=True,
            pad_token_id=self.pad_id,
            eos_token_id=self.tokenizer.eos_token_id,
        )
        if sample:
            kw.update(temperature=spec.temperature, top_p=spec.top_p, top_k=0)
        else:
            kw.update(temperature=None, top_p=None, top_k=None)
        if spec.stop:
            kw.update(stop_strings=list(spec.stop), tokenizer=self.tokenizer)
        if spec.seed is not None:
            torch.manual_seed(spec.seed + len(prompts[0]))
        with torch.no_grad():
            res = self.model.generate(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **kw
            )
        new = res.sequences[:, width:].tolist()
        logps = torch.stack(res.logits, dim=1).float().log_softmax(-1)  # (B, T, V)
        return [self._finish(new[r], logps[r], specs[r]) for r in range(len(prompts))]

    def _finish(self, ids: list[int], logp, spec: SamplingSpec) -> Generation:
        """Cut one generated row after eos / the first stop string / max_tokens."""
        eos = self.tokenizer.eos_token_id
        cut, reason, stop_str = min(len(ids), spec.max_tokens), "length", None
        if eos in ids[:cut]:
            cut, reason = ids.index(eos) + 1, "stop"
        if spec.stop:
            k = _first_stop(self.tokenizer, ids[:cut], spec.stop)
            if k is not None:
                cut, reason, stop_str = k[0], "stop", k[1]
        ids = ids[:cut]
        lps = [float(logp[t, tok]) for t, tok in enumerate(ids)]
        return Generation(ids, lps, self.decode(ids), reason, stop_str)

    def _score(self, prompts: list[list[int]], completions: list[list[int]]) -> list[list[float]]:
        import torch

        out = []
        with torch.no_grad():
            for p, c in zip(prompts, completions, strict=True):
                ids = torch.tensor([p + c], device=self.device)
                logp = self.model(ids).logits[0, len(p) - 1 : -1].float().log_softmax(-1)
                out.append([float(logp[k, t]) for k, t in enumerate(c)])
        return out

    def _push_weights(self, items: list[tuple[str, Any]], checkpoint: Path | None) -> None:
        import torch

        params = dict(self.model.named_parameters())
        missing = [n for n, _ in items if n not in params and n != "lm_head.weight"]
        if missing:
            raise ValueError(f"weights for unknown parameters: {missing[:5]}")
        with torch.no_grad():
            for name, t in items:
                if name in params:
                    params[name].copy_(t.to(params[name].dtype))

    def close(self) -> None:
        self.model = None
        super().close()


def _spec_key(s: SamplingSpec) -> tuple:
    return (s.temperature, s.top_p, tuple(s.stop), s.seed)


def _first_stop(tokenizer, ids: list[int], stops) -> tuple[int, str] | None:
    """Smallest k such that decode(ids[:k]) contains a stop string, with that string; None if none does."""
    text = tokenizer.decode(ids, skip_special_tokens=False)
    hits = [(text.find(s) + len(s), s) for s in stops if s in text]
    if not hits:
        return None
    end, stop = min(hits)
    lo, hi = 1, len(ids)
    while lo < hi:  # decoded length grows with k (byte-level BPE)
        mid = (lo + hi) // 2
        if len(tokenizer.decode(ids[:mid], skip_special_tokens=False)) >= end:
            hi = mid
        else:
            lo = mid + 1
    return lo, stop
