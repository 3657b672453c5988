"""Code similarity for GTPO's self-supervised reward shaping (docs/algorithms.md, "(open)" choice).

A similarity is registered by name with ``@register_similarity``. Its contract, shared by every entry:

    fn(codes: list[str] (N,), success: bool (N,), group_codes: int (N,), n_groups, **options)
        -> mean_sim (N,) float64: mean over the successful rows p of the same group of sim(code_i, code_p),
           each sim in [0, 1]; NaN where the group has no successful row.

- ``lexical`` (default, no model): cosine of count vectors over normalised code tokens (comments dropped,
  identifiers/numbers/operators as tokens, unigrams + bigrams). Counts are non-negative, so sim ∈ [0, 1];
  identical token streams give 1. Since sim is linear in the unit-normalised vectors, the mean similarity to
  the successes is one dot product with the group's success centroid: sparse, vectorised, no pair loop.
- ``embedding`` (optional): (1 + cosine) / 2 of mean-pooled hidden states of a local encoder directory given
  as ``embedding_model`` (no model ships with turntree and nothing is downloaded: without one it raises).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import numpy as np

from schemas.registry import Registry

SimilarityFn = Callable[..., np.ndarray]
SIMILARITIES: Registry[SimilarityFn] = Registry("similarity")


register_similarity = SIMILARITIES.register
get_similarity = SIMILARITIES.lookup


_COMMENT = re.compile(r"#[^\n]*")
_TOKEN = re.compile(r"[A-Za-z_]\w*|\d+(?:\.\d+)?|==|!=|<=|>=|\*\*|//|->|[^\s\w]")


def code_tokens(code: str | None) -> list[str]:
    """Normalised tokens of a program: comments and whitespace dropped, identifiers, numbers and operators kept."""
    return _TOKEN.findall(_COMMENT.sub("", code or ""))


def _features(codes: Sequence[str | None]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse unit-normalised bag of unigrams + bigrams: (row, feature, value) triplets, rows sorted."""
    vocab: dict[str, int] = {}
    rows: list[int] = []
    feats: list[int] = []
    for i, code in enumerate(codes):  # tokenising text is per row by nature; the arithmetic below is not
        toks = code_tokens(code)
        grams = toks + [a + "\x00" + b for a, b in zip(toks, toks[1:], strict=False)]
        ids = [vocab.setdefault(g, len(vocab)) for g in grams]
        feats.extend(ids)
        rows.extend([i] * len(ids))
    width = max(len(vocab), 1)
    keys, counts = np.unique(
        np.asarray(rows, np.int64) * width + np.asarray(feats, np.int64), return_counts=True
    )
    row, feat = keys // width, keys % width
    norm = np.sqrt(np.bincount(row, weights=counts.astype(np.float64) ** 2, minlength=len(codes)))
    return row, feat, counts / norm[row]


def _centroid_similarity(row, feat, val, success, group_codes, n_groups) -> np.ndarray:
    """Mean dot product of each row with the successful rows of its group, from sparse unit vectors."""
    n = len(success)
    n_succ = np.bincount(group_codes[success], minlength=n_groups).astype(np.float64)
    width = int(feat.max()) + 1 if feat.size else 1
    keep = success[row]
    ckeys, inv = np.unique(group_codes[row[keep]] * width + feat[keep], return_inverse=True)
    cvals = np.bincount(inv, weights=val[keep], minlength=ckeys.size)
    dots = np.zeros(n)
    if ckeys.size:
        ckey_of = group_codes[row] * width + feat
        pos = np.minimum(np.searchsorted(ckeys, ckey_of), ckeys.size - 1)
        hit = ckeys[pos] == ckey_of
        dots = np.bincount(row[hit], weights=val[hit] * cvals[pos[hit]], minlength=n)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = dots / n_succ[group_codes]
    return np.where(n_succ[group_codes] > 0, np.clip(mean, 0.0, 1.0), np.nan)


@register_similarity("lexical")
def lexical(codes, success, group_codes, n_groups, **options) -> np.ndarray:
    """Token-bag cosine similarity in [0, 1]; needs no model."""
    row, feat, val = _features(codes)
    return _centroid_similarity(row, feat, val, np.asarray(success, bool), np.asarray(group_codes), n_groups)


@register_similarity("embedding")
def embedding(codes, success, group_codes, n_groups, *, embedding_model: str | None = None, **options):
    """(1 + cosine) / 2 of mean-pooled last hidden states of a local transformers model directory."""
    if not embedding_model:
        raise ValueError(
            "similarity 'embedding' needs a local encoder directory (ScoreParams.embedding_model); none is "
            "bundled and nothing is downloaded offline: use similarity 'lexical' or point to a model directory"
        )
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(embedding_model)
    model = AutoModel.from_pretrained(embedding_model).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    vecs = []
    with torch.no_grad():
        for start in range(0, len(codes), 16):
            batch = tok(
                [c or "" for c in codes[start : start + 16]],
                return_tensors="pt",
                padding=True,
                truncation=True,
                max_length=512,
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            vecs.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
    x = torch.nn.functional.normalize(torch.cat(vecs).float(), dim=-1).numpy().astype(np.float64)
    success = np.asarray(success, bool)
    group_codes = np.asarray(group_codes)
    n_succ = np.bincount(group_codes[success], minlength=n_groups).astype(np.float64)
    centroid = np.zeros((n_groups, x.shape[1]))
    np.add.at(centroid, group_codes[success], x[success])
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_cos = np.einsum("nd,nd->n", x, centroid[group_codes]) / n_succ[group_codes]
    return np.where(n_succ[group_codes] > 0, np.clip((1.0 + mean_cos) / 2.0, 0.0, 1.0), np.nan)


def similarity(a: str, b: str, name: str = "lexical", **options) -> float:
    """sim(a, b) in [0, 1] for one pair, through the registry entry ``name``."""
    fn = get_similarity(name)
    return float(fn([a, b], np.array([False, True]), np.array([0, 0]), 1, **options)[0])
