"""Prefix-trie packing of a micro-batch (``update.shared_prefix``) and minibatches by problem
(``update.minibatch_by``): the trie by hand and as a property, the tree-packed update equal to the plain one on
MURPHY-shaped samples, the minibatch order."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime import checkpoint as ckpt
from runtime.tableio import write_table
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES
from stages import update
from stages.update.batches import minibatches
from stages.update.prefix import PrefixTrie
from tests.test_update import _params_close


def test_prefix_trie_by_hand():
    """[1 2 3], [1 2 4], [1 5], [1 2 3 6]: six nodes; shared prefixes once; the ancestry mask by hand."""
    t = PrefixTrie([[1, 2, 3], [1, 2, 4], [1, 5], [1, 2, 3, 6]])
    assert t.tokens == [1, 2, 3, 4, 5, 6]
    assert t.parents == [-1, 0, 1, 1, 0, 2]
    assert t.depth == [0, 1, 2, 2, 1, 3]
    assert t.node_of == [[0, 1, 2], [0, 1, 3], [0, 4], [0, 1, 2, 5]]
    want = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 0, 1, 0, 0],  # 4 sees 1 2 and itself, not its sibling 3
            [1, 0, 0, 0, 1, 0],
            [1, 1, 1, 0, 0, 1],
        ],
        dtype=torch.bool,
    )
    assert torch.equal(t.ancestry_mask(torch.device("cpu")), want)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=8), min_size=1, max_size=6))
def test_prefix_trie_holds_every_row_and_each_prefix_once(rows):
    """Every row reads back along its path (token, position, parent chain); the nodes are exactly the distinct
    prefixes; a node's mask row is its ancestry (itself included), so it is causal along every path."""
    t = PrefixTrie(rows)
    prefixes = {tuple(r[: k + 1]) for r in rows for k in range(len(r))}
    assert len(t) == len(prefixes)
    mask = t.ancestry_mask(torch.device("cpu"))
    for row, path in zip(rows, t.node_of, strict=True):
        assert [t.tokens[k] for k in path] == row
        assert [t.depth[k] for k in path] == list(range(len(row)))
        assert [t.parents[k] for k in path] == [-1, *path[:-1]]
        for k, node in enumerate(path):
            assert mask[node].nonzero().flatten().tolist() == sorted(path[: k + 1])


def tree_rows(
    model_dir: Path, trees: int = 2, roots: int = 2, children: int = 2, seed: int = 7
) -> list[dict]:
    """MURPHY-shaped node samples: per tree a prompt P (8-10 tokens); root r = P + c_r (c_r trained); child
    = P + c_r + feedback (4 tokens) + c (c trained): its prompt is its parent's whole sequence and more."""
    rng = random.Random(seed)
    vocab = ckpt.load_model(model_dir).config.vocab_size

    def toks(a: int, b: int) -> list[int]:
        return [rng.randrange(10, vocab) for _ in range(rng.randint(a, b))]

    rows = []

    def add(tree: int, name: str, prompt: list[int], comp: list[int], adv: float) -> None:
        mask = [0] * len(prompt) + [1] * len(comp)
        rows.append(
            {
                "sample_id": f"t{tree}-{name}", "source_id": f"t{tree}", "problem_id": f"p{tree}",
                "group_id": f"t{tree}-{name[:-1]}", "input_ids": prompt + comp, "loss_mask": mask,
                "advantages": [adv * m for m in mask], "rollout_logprobs": [-2.0 * m for m in mask],
                "algo": "murphy",
            }
        )  # fmt: skip

    for k in range(trees):
        prompt = toks(8, 10)
        for r in range(roots):
            comp = toks(4, 9)
            add(k, f"r{r}", prompt, comp, 1.0 if r % 2 else -1.0)
            ctx = prompt + comp + toks(4, 4)
            for c in range(children):
                add(k, f"r{r}c{c}", ctx, toks(3, 8), 0.5 if c % 2 else -0.5)
    return rows


def test_tree_packing_gives_the_plain_update_and_runs_the_ancestry_once(tiny_model, tmp_path, monkeypatch):
    """MURPHY nodes, minibatches by problem: with shared_prefix each micro-batch runs as one prefix trie, so a
    child's ancestry (its parent's prompt and completion) runs once with the parent, not once per node — more
    than the rows' common prompt is shared — and over two minibatches and two epochs the parameters and
    statistics are the plain padded forward's, to fp32 rounding."""
    from stages.update import prefix

    uri = write_table(tree_rows(tiny_model), SAMPLES, tmp_path / "trees.parquet").uri
    calls = []
    real = prefix.packed_logprobs

    def spy(m, b, trie, *a):
        ids, n = b["input_ids"], int(b["attention_mask"].sum(1).min())
        common = int((ids[:, :n] == ids[:1, :n]).all(0).long().cumprod(0).sum())  # the rows' common prefix
        calls.append((int(b["attention_mask"].sum()), len(trie), common * (b["input_ids"].shape[0] - 1)))
        return real(m, b, trie, *a)

    monkeypatch.setattr(prefix, "packed_logprobs", spy)
    p = dict(
        lr=1e-3, minibatch_size=6, micro_batch_size=3, ppo_epochs=2, seed=2, target_kl=None, dtype="float32",
        minibatch_by="problem",
    )  # fmt: skip
    a = update.Trainer(tiny_model, UpdateParams(**p, shared_prefix=True))
    ma = a.update(update.load_samples(uri))
    b = update.Trainer(tiny_model, UpdateParams(**p))
    mb = b.update(update.load_samples(uri))
    assert calls
    assert sum(n - t for n, t, _ in calls) > sum(c for *_, c in calls)  # ancestry shared, not just the prompt
    assert _params_close(a.model, ckpt.load_model(tiny_model), 1.0) > 1e-3  # it moved
    _params_close(a.model, b.model, 1e-5)
    for k in ("actor/loss", "actor/approx_kl", "actor/entropy", "actor/clip_frac", "actor/logprob_gap_max"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k


def test_minibatches_by_problem_keep_a_problem_together():
    """minibatch_by="problem": a permutation of all samples, each problem's samples contiguous and in their
    order, problems shuffled reproducibly (a function of seed, update, epoch); sample: the old order."""
    groups = [f"p{i % 4}" for i in range(12)]  # 4 problems × 3 samples, interleaved
    p = UpdateParams(minibatch_size=3, micro_batch_size=3, minibatch_by="problem", seed=1)
    mbs = minibatches(12, p, 0, 0, groups)
    assert sorted(i for m in mbs for i in m) == list(range(12))
    assert all(len({groups[i] for i in m}) == 1 and m == sorted(m) for m in mbs)
    assert mbs == minibatches(12, p, 0, 0, groups)
    assert any(minibatches(12, p, u, 0, groups) != mbs for u in range(1, 5))
    plain = p.model_copy(update={"minibatch_by": "sample"})
    assert minibatches(12, plain, 0, 0, groups) == minibatches(12, plain, 0, 0)
    nameless = minibatches(12, p, 0, 0, [""] * 12)  # no problem named: each sample its own group
    assert (
        nameless
        == minibatches(12, p, 0, 0, [f"q{i}" for i in range(12)])
        != [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    )
    with pytest.raises(ValueError, match="11 groups for 12 samples"):
        minibatches(12, p, 0, 0, groups[:11])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 5), min_size=1, max_size=30), st.integers(1, 7), st.integers(0, 3))
def test_minibatches_by_problem_partition_the_samples(labels, size, epoch):
    groups = [f"g{x}" for x in labels]
    p = UpdateParams(minibatch_size=size, micro_batch_size=1, minibatch_by="problem")
    mbs = minibatches(len(groups), p, 3, epoch, groups)
    flat = [i for m in mbs for i in m]
    assert sorted(flat) == list(range(len(groups))) and all(len(m) == size for m in mbs[:-1])
    seen: list[str] = []
    for i in flat:  # each problem's samples form one run in the order
        if not seen or seen[-1] != groups[i]:
            assert groups[i] not in seen
            seen.append(groups[i])
