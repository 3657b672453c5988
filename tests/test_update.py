"""The update stage on the tiny model: direction of the update, clipping, bad input, resume fidelity, sync."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from maths.policy_loss import token_logprobs
from runtime import checkpoint as ckpt
from runtime.engines import live
from runtime.tableio import write_table
from schemas.params.update import UpdateParams
from schemas.tables import SAMPLES, TRAJECTORIES
from stages import update
from stages.update.batches import SamplesError, minibatches


def sample_rows(model_dir: Path, n: int = 6, seed: int = 0, adv=None) -> list[dict]:
    """n random sequences (prompt 4-8 tokens, completion 6-14) with the model's own log-probs as the rollout's;
    advantages +1 / −1 alternating unless given."""
    model = ckpt.load_model(model_dir).eval()
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        p, c = rng.randint(4, 8), rng.randint(6, 14)
        ids = [rng.randrange(10, model.config.vocab_size) for _ in range(p + c)]
        with torch.no_grad():
            lp = token_logprobs(model(input_ids=torch.tensor([ids])).logits, torch.tensor([ids]))[0]
        mask = [0] * p + [1] * c
        a = adv[i] if adv else (1.0 if i % 2 == 0 else -1.0)
        rows.append(
            {
                "sample_id": f"s{i}",
                "source_id": f"t{i}",
                "problem_id": f"p{i // 2}",
                "group_id": f"g{i // 2}",
                "input_ids": ids,
                "loss_mask": mask,
                "advantages": [a * m for m in mask],
                "rollout_logprobs": [float(x) * m for x, m in zip(lp, mask, strict=True)],
                "algo": "grpo",
            }
        )
    return rows


def seq_logprob(model, row) -> float:
    ids = torch.tensor([row["input_ids"]])
    with torch.no_grad():
        lp = token_logprobs(model(input_ids=ids).logits, ids)[0]
    return float((lp * torch.tensor(row["loss_mask"], dtype=torch.float32)).sum())


@pytest.fixture(scope="module")
def samples(tiny_model, tmp_path_factory) -> tuple[str, list[dict]]:
    rows = sample_rows(tiny_model)
    uri = tmp_path_factory.mktemp("samples") / "samples.parquet"
    write_table(rows, SAMPLES, uri)
    return str(uri), rows


# fp32: these tests compare log-probs and parameters to fp32 rounding (dtype=auto is bf16 on a CPU with native
# bf16 matmuls; test_bf16_update_* covers that path)
FAST = {"lr": 1e-3, "minibatch_size": 6, "micro_batch_size": 3, "dtype": "float32"}


def test_update_raises_positive_and_lowers_negative_sequences(tiny_model, samples, tmp_path):
    uri, rows = samples
    out = update.run(UpdateParams(**FAST), {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path)
    before, after = ckpt.load_model(tiny_model).eval(), ckpt.load_model(out.uri("checkpoint")).eval()
    for r in rows:
        delta = seq_logprob(after, r) - seq_logprob(before, r)
        assert (delta > 0) == (r["advantages"][-1] > 0), (r["sample_id"], delta)
    m = out.metrics
    for k in ("actor/loss", "actor/clip_frac", "actor/approx_kl", "actor/entropy", "actor/grad_norm"):
        assert k in m and m[k] == m[k]
    assert m["actor/tokens_per_s"] > 0 and m["actor/peak_mem_mb"] > 0
    assert m["actor/logprob_gap_max"] < 1e-4  # rollout log-probs were the model's own
    assert m["actor/clip_frac"] == 0.0  # one minibatch, one epoch: ρ = 1 throughout
    assert "kl_ref" not in str(m)  # β = 0: no reference model


def test_clip_fraction_zero_on_first_minibatch_then_clipping(tiny_model, samples):
    uri, _ = samples
    trainer = update.Trainer(
        tiny_model, UpdateParams(lr=5e-3, minibatch_size=2, micro_batch_size=1, ppo_epochs=3, target_kl=None)
    )
    m = trainer.update(update.load_samples(uri))
    assert trainer.history[0]["clip_frac"] == 0.0
    assert trainer.history[0]["approx_kl"] < 1e-6
    assert max(h["clip_frac"] for h in trainer.history[1:]) > 0  # later steps move off π_old
    assert m["actor/steps"] == 9 and trainer.step == 9


def test_kl_to_reference_loads_reference_only_when_beta_positive(tiny_model, samples, tmp_path):
    uri, _ = samples
    p = UpdateParams(**FAST, kl_beta=0.1, ppo_epochs=2)
    with pytest.raises(KeyError, match="ref_checkpoint"):
        update.run(p, {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path / "a")
    assert not (tmp_path / "a" / "checkpoint").exists()
    out = update.run(
        p, {"samples": uri, "checkpoint": str(tiny_model), "ref_checkpoint": str(tiny_model)}, tmp_path / "b"
    )
    assert out.metrics["actor/kl_ref"] > 0  # the second epoch has moved away from the reference


def _write_raw(rows, schema, uri):
    write_table(rows, schema, uri)
    return str(uri)


def test_bad_samples_tables_fail_clearly_and_write_nothing(tiny_model, samples, tmp_path):
    _, rows = samples
    nan_rows = [dict(r) for r in rows]
    nan_rows[2] = dict(nan_rows[2], advantages=[float("nan")] * len(nan_rows[2]["advantages"]))
    short = [dict(rows[0], loss_mask=rows[0]["loss_mask"][:-1])]
    cases = {
        "empty": (_write_raw([], SAMPLES, tmp_path / "empty.parquet"), "empty"),
        "wrong table": (_write_raw([], TRAJECTORIES, tmp_path / "traj.parquet"), "expected 'samples'"),
        "nan": (_write_raw(nan_rows, SAMPLES, tmp_path / "nan.parquet"), "'s2'.*advantages"),
        "length": (_write_raw(short, SAMPLES, tmp_path / "short.parquet"), "'s0'.*loss_mask has length"),
        "missing": (str(tmp_path / "nope.parquet"), "no samples table"),
    }
    bad_schema = pa.table({"sample_id": ["x"]}).replace_schema_metadata(SAMPLES.metadata)
    import pyarrow.parquet as pq

    pq.write_table(bad_schema, tmp_path / "cols.parquet")
    cases["columns"] = (str(tmp_path / "cols.parquet"), "missing columns")
    for name, (uri, msg) in cases.items():
        out = tmp_path / f"out-{name.replace(' ', '_')}"
        out.mkdir()
        with pytest.raises(SamplesError, match=msg):
            update.run(UpdateParams(), {"samples": uri, "checkpoint": str(tiny_model)}, out)
        assert list(out.iterdir()) == [], name


def test_resume_equals_uninterrupted_run(tiny_model, samples, tmp_path):
    """Two stage runs through stored checkpoints == one trainer doing both updates in memory."""
    uri, rows = samples
    uri2 = _write_raw(sample_rows(tiny_model, n=5, seed=1), SAMPLES, tmp_path / "s2.parquet")
    p = UpdateParams(
        lr=1e-3, warmup_steps=3, minibatch_size=2, micro_batch_size=2, ppo_epochs=2, seed=7, target_kl=None
    )
    one = update.Trainer(tiny_model, p)
    one.update(update.load_samples(uri))
    one.update(update.load_samples(uri2))
    a = update.run(p, {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path / "it1")
    b = update.run(p, {"samples": uri2, "checkpoint": a.uri("checkpoint")}, tmp_path / "it2")
    resumed = update.Trainer(b.uri("checkpoint"), p)
    assert resumed.step == one.step == 2 * 3 + 2 * 3 and resumed.update_idx == 2
    for (name, x), y in zip(one.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(x, y), name
    so, sr = one.optimizer.state_dict(), resumed.optimizer.state_dict()
    for k in so["state"]:
        for field in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(torch.as_tensor(so["state"][k][field]), torch.as_tensor(sr["state"][k][field]))
    assert one.optimizer.param_groups[0]["lr"] == resumed.optimizer.param_groups[0]["lr"]
    # data order is a pure function of (seed, update index, epoch)
    assert minibatches(6, p, 1, 0) == minibatches(6, p, 1, 0) != minibatches(6, p, 2, 0)


def test_weight_sync_pushes_into_a_live_engine(tiny_model, samples, tmp_path, monkeypatch):
    """With a live engine of the same architecture the new weights go in, labelled with the checkpoint."""
    uri, _ = samples
    pushed = {}

    class FakeEngine:
        model_dir = Path(tiny_model)

        def release_cache(self):  # before training: the update needs the memory, not the KV cache
            pushed["released_before_push"] = "weights" not in pushed
            return 123 << 20

        def update_weights(self, weights, source=None):
            pushed.update(weights=weights, source=source)
            return 0.0

    monkeypatch.setattr(live, "ENGINES", [FakeEngine()])  # the process's live-engine registry
    out = update.run(UpdateParams(**FAST), {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path)
    assert pushed["source"] == out.uri("checkpoint") and "timing/weight_sync" in out.metrics
    assert pushed["released_before_push"] and out.metrics["memory/engine_cache_released_mb"] == 123
    saved = ckpt.load_model(out.uri("checkpoint")).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in pushed["weights"].items() if k in saved)


# --- updates that cannot blow up (issue 12) ------------------------------------------------------------------------
def _kl_to_old(model, rows) -> float:
    """Token mean over trained tokens of KL(π_old || π_new) (k3, ρ = π_new/π_old); π_old = the rows' log-probs."""
    model.eval()
    num = den = 0.0
    for r in rows:
        ids, m = torch.tensor([r["input_ids"]]), torch.tensor(r["loss_mask"], dtype=torch.float32)
        with torch.no_grad():
            d = token_logprobs(model(input_ids=ids).logits, ids)[0] - torch.tensor(r["rollout_logprobs"])
        num, den = num + float(((d.exp() - 1 - d) * m).sum()), den + float(m.sum())
    return num / den


@pytest.fixture(scope="module")
def near_deterministic(tiny_model, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The tiny model after a short high-lr SFT on 16 sequences (a warm start: completion entropy ~0.3 nats,
    mean log-prob of its own completions ~ −0.1), and samples of those sequences with its own log-probs and
    advantages +1/−1 alternating."""
    torch.manual_seed(0)
    model = ckpt.load_model(tiny_model)
    rng = random.Random(0)
    seqs = []
    for _ in range(16):
        p, c = rng.randint(4, 8), rng.randint(10, 20)
        seqs.append(([rng.randrange(10, model.config.vocab_size) for _ in range(p + c)], p))
    lmax = max(len(s) for s, _ in seqs)
    ids = torch.tensor([s + [0] * (lmax - len(s)) for s, _ in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (lmax - len(s)) for s, _ in seqs])
    mask = torch.tensor([[0] * p + [1] * (len(s) - p) + [0] * (lmax - len(s)) for s, p in seqs]).float()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        lp = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids)
        (-(lp * mask).sum() / mask.sum()).backward()
        opt.step()
    out = tmp_path_factory.mktemp("near-det") / "ckpt"
    ckpt.save_checkpoint(out, model.eval(), tokenizer_from=tiny_model)
    rows = []
    for i, (s, p) in enumerate(seqs):
        x = torch.tensor([s])
        with torch.no_grad():
            lp = token_logprobs(model(input_ids=x).logits, x)[0].tolist()
        m = [0] * p + [1] * (len(s) - p)
        a = 1.0 if i % 2 == 0 else -1.0
        rows.append(
            {
                "sample_id": f"d{i}",
                "source_id": f"d{i}",
                "problem_id": f"q{i // 2}",
                "group_id": f"q{i // 2}",
                "input_ids": s,
                "loss_mask": m,
                "advantages": [a * k for k in m],
                "rollout_logprobs": [v * k for v, k in zip(lp, m, strict=True)],
                "algo": "gtpo",
            }
        )
    return out, rows


def test_target_kl_bounds_the_update_of_a_near_deterministic_policy(near_deterministic, tmp_path):
    """After a warm start (fresh AdamW: its first steps move every weight by ~lr however small the gradient),
    4 PPO epochs erode the saturated logit margins until tokens flip: KL(π_old || π_new) ends ≥ 0.4 nats/token.
    target_kl = 0.1 skips every step once a minibatch's KL exceeds it; the policy ends within 2 × target_kl."""
    start, rows = near_deterministic
    uri = _write_raw(rows, SAMPLES, tmp_path / "samples.parquet")
    base = {"lr": 5e-4, "ppo_epochs": 4, "minibatch_size": 4, "micro_batch_size": 4}
    free = update.Trainer(start, UpdateParams(**base, target_kl=None))
    m = free.update(update.load_samples(uri))
    assert free.steps[0]["entropy"] < 0.5  # near-deterministic before the update
    assert m["actor/steps"] == 16 and m["actor/early_stopped"] == 0.0 and "actor/early_stop_step" not in m
    assert _kl_to_old(free.model, rows) > 0.4  # the setting reproduces the blow-up
    assert m["actor/approx_kl_max"] > 0.4

    bounded = update.Trainer(start, UpdateParams(**base, target_kl=0.1))
    m = bounded.update(update.load_samples(uri))
    assert m["actor/early_stopped"] == 1.0 and m["actor/steps"] < m["actor/steps_planned"] == 16
    assert m["actor/early_stop_step"] == m["actor/steps"] == m["actor/global_step"] == bounded.step
    assert _kl_to_old(bounded.model, rows) < 2 * 0.1
    # per-minibatch records: the last one is the minibatch whose KL stopped the update (no step taken)
    steps = bounded.steps
    assert len(steps) == m["actor/steps"] + 1 and [s["early_stop"] for s in steps] == [0.0] * (
        len(steps) - 1
    ) + [1.0]
    assert steps[-1]["approx_kl"] > 0.1 >= max(s["approx_kl"] for s in steps[:-1])
    assert [s["step"] for s in steps] == list(range(len(steps)))
    for key in ("approx_kl", "clip_frac", "entropy", "grad_norm", "lr", "epoch", "update_idx"):
        assert all(math.isfinite(s[key]) for s in steps), key

    out = update.run(UpdateParams(**base), {"samples": uri, "checkpoint": str(start)}, tmp_path / "stage")
    assert out.metrics["actor/steps"] == m["actor/steps"]  # the default target_kl is 0.1
    assert any(n.startswith("early stop: KL to π_old") for n in out.notes), out.notes


def _params_close(a: torch.nn.Module, b: torch.nn.Module, atol: float) -> float:
    worst = max(
        float((x - y).abs().max())
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    assert worst < atol, worst
    return worst


def test_fast_path_gives_the_legacy_update(tiny_model, samples):
    """Selective chunked log-softmax + the first minibatch's π_old from its own forward == the old path (full
    log-softmax, a separate π_old pass) over several minibatches and epochs: same parameters to fp32 noise,
    same statistics; the π_old pass skips the first minibatch's samples."""
    uri, _ = samples
    p = UpdateParams(lr=1e-3, minibatch_size=2, micro_batch_size=2, ppo_epochs=2, seed=4, target_kl=None)
    from bench.legacy_update import LegacyTrainer

    new, old = update.Trainer(tiny_model, p), LegacyTrainer(tiny_model, p)
    mn, mo = new.update(update.load_samples(uri)), old.update(update.load_samples(uri))
    base = ckpt.load_model(tiny_model)
    assert _params_close(new.model, base, 1.0) > 1e-3  # it moved
    _params_close(new.model, old.model, 2e-6)
    for k in ("actor/loss", "actor/approx_kl", "actor/entropy", "actor/clip_frac", "actor/logprob_gap_max"):
        assert mn[k] == pytest.approx(mo[k], rel=1e-4, abs=1e-6), k
    assert new.history[0]["approx_kl"] == 0.0  # π_old of the first minibatch is its own forward's


def test_rollout_logprobs_stand_in_for_pi_old(tiny_model, samples):
    """old_logprobs='rollout': no π_old pass; with the rollout log-probs the model's own (as here) and one
    minibatch, the update is the recomputed one."""
    uri, _ = samples
    p = dict(FAST, target_kl=None)
    a = update.Trainer(tiny_model, UpdateParams(**p, old_logprobs="rollout"))
    b = update.Trainer(tiny_model, UpdateParams(**p))
    ma, mb = a.update(update.load_samples(uri)), b.update(update.load_samples(uri))
    assert ma["timing/old_logprobs"] < 0.05 and "actor/logprob_gap_max" not in ma
    _params_close(a.model, b.model, 1e-5)
    assert ma["actor/loss"] == pytest.approx(mb["actor/loss"], abs=1e-5)


def test_pinned_threads_run_the_update_in_a_subprocess(tiny_model, samples, tmp_path, monkeypatch):
    """When torch.set_num_threads is refused (what vLLM's CPU worker does), the update runs in a subprocess
    with cpu_threads threads and gives the same checkpoint, bit for bit, as this process with those threads."""
    uri, _ = samples
    p = UpdateParams(**FAST, cpu_threads=2)
    here = update.run(p, {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path / "here")
    assert any("2 threads" in n for n in here.notes), here.notes
    before = torch.get_num_threads()
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    if before == 2:
        monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    child = update.run(p, {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path / "child")
    assert any("2 threads" in n for n in child.notes) and any("subprocess" in n for n in child.notes), (
        child.notes
    )
    x, y = ckpt.load_model(here.uri("checkpoint")), ckpt.load_model(child.uri("checkpoint"))
    for (name, u), v in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
        assert torch.equal(u, v), name


def group_rows(model_dir: Path, groups: int = 3, g: int = 4, seed: int = 5) -> list[dict]:
    """GRPO-shaped samples: ``groups`` prompts (9-12 tokens) × ``g`` completions (3-12 tokens, one with an
    untrained tool-output gap), advantages ±1 within a group."""
    rng = random.Random(seed)
    vocab = ckpt.load_model(model_dir).config.vocab_size
    rows = []
    for k in range(groups):
        prompt = [rng.randrange(10, vocab) for _ in range(rng.randint(9, 12))]
        for j in range(g):
            comp = [rng.randrange(10, vocab) for _ in range(rng.randint(3, 12))]
            mask = [0] * len(prompt) + [1] * len(comp)
            if j == 1 and len(comp) > 6:
                mask[len(prompt) + 3 : len(prompt) + 5] = [0, 0]
            a = 1.0 if j % 2 == 0 else -1.0
            rows.append(
                {
                    "sample_id": f"s{k}-{j}", "source_id": f"t{k}-{j}", "problem_id": f"p{k}", "group_id": f"g{k}",
                    "input_ids": prompt + comp, "loss_mask": mask, "advantages": [a * m for m in mask],
                    "rollout_logprobs": [-2.0 * m for m in mask], "algo": "grpo",
                }
            )  # fmt: skip
    return rows


@pytest.mark.parametrize("way", ["packed", "cache"])
def test_shared_prefix_gives_the_plain_update(tiny_model, tmp_path, monkeypatch, way):
    """shared_prefix: each group's prompt runs once per micro-batch (packed with a tree mask, or as a KV cache
    repeated per row); over two minibatches and two epochs (so the no-grad π_old pass takes that path too) the
    parameters and the statistics are those of the plain padded forward, to fp32 rounding."""
    from stages.update import prefix

    uri = write_table(group_rows(tiny_model), SAMPLES, tmp_path / "groups.parquet").uri
    calls = []
    if way == "cache":
        monkeypatch.setattr(prefix, "PACK_MAX", 0)
    name = {"packed": "packed_logprobs", "cache": "forward_shared"}[way]
    real = getattr(prefix, name)

    def shared(b, n) -> int:  # tokens that ran once instead of once per row
        return n if isinstance(n, int) else int(b["attention_mask"].sum()) - len(n)

    monkeypatch.setattr(prefix, name, lambda m, b, n, *a: calls.append(shared(b, n)) or real(m, b, n, *a))
    p = dict(
        lr=1e-3, minibatch_size=8, micro_batch_size=4, ppo_epochs=2, seed=1, target_kl=None, dtype="float32"
    )
    a = update.Trainer(tiny_model, UpdateParams(**p, shared_prefix=True))
    b = update.Trainer(tiny_model, UpdateParams(**p))
    ma = a.update(update.load_samples(uri))
    assert calls and min(calls) >= 8  # the prompts (9-12 tokens) ran once per micro-batch, not once per row
    mb = b.update(update.load_samples(uri))
    assert _params_close(a.model, ckpt.load_model(tiny_model), 1.0) > 1e-3  # it moved
    _params_close(a.model, b.model, 1e-5)  # Adam's lr·m/√v step turns fp32 gradient noise into ~1e-6 here
    for k in ("actor/loss", "actor/approx_kl", "actor/entropy", "actor/clip_frac", "actor/logprob_gap_max"):
        assert ma[k] == pytest.approx(mb[k], rel=1e-4, abs=1e-6), k


def test_shared_prefix_length_stops_before_the_first_trained_logit():
    """The shared part ends before the position whose logit predicts a row's first trained token, and at the
    shortest row's last token; one row or no common start: nothing shared."""
    from stages.update.prefix import shared_len

    ids = torch.tensor([[5, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 0]])
    b = {
        "input_ids": ids,
        "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]]),
        "mask": torch.zeros(2, 6),
    }
    b["mask"][0, 4:], b["mask"][1, 4:5] = 1, 1
    assert shared_len(b) == 3  # common 4 tokens, but token 4 is trained: its logit comes from position 3
    b["mask"][:, :] = 0
    b["mask"][:, 5:] = 1
    b["mask"][1, 5] = 0
    b["mask"][1, 4] = 1
    assert shared_len(b) == 3
    b["input_ids"] = torch.tensor([[4, 6, 7, 8, 9, 1], [5, 6, 7, 8, 2, 0]])
    assert shared_len(b) == 0
    assert shared_len({k: v[:1] for k, v in b.items()}) == 0


@pytest.mark.parametrize(
    "flags,native",
    [
        ("fpu avx512f avx512_bf16 avx512_vnni", True),
        ("fpu amx_bf16 amx_tile", True),
        ("fpu avx2 avx512f", False),
    ],
)
def test_auto_dtype_is_bf16_on_a_cpu_with_native_bf16(tmp_path, monkeypatch, flags, native):
    """dtype=auto picks bf16 autocast on a CPU whose flags name native bf16 matmuls, fp32 on one that would
    emulate them (slower than fp32); an explicit dtype always wins; no /proc/cpuinfo: fp32."""
    from runtime import devices

    info = tmp_path / "cpuinfo"
    info.write_text(f"processor\t: 0\nmodel name\t: some cpu\nflags\t\t: {flags}\n\nprocessor\t: 1\n")
    assert devices.cpu_native_bf16.__wrapped__(str(info)) is native
    assert devices.cpu_native_bf16.__wrapped__(str(tmp_path / "missing")) is False
    monkeypatch.setattr(devices, "cpu_native_bf16", lambda: native)
    assert devices.resolve_device("cpu", "auto") == (torch.device("cpu"), torch.bfloat16 if native else None)
    assert devices.resolve_device("cpu", "float32")[1] is None
    assert devices.resolve_device("cpu", "bfloat16")[1] is torch.bfloat16


def test_bf16_update_moves_each_sequence_as_fp32_does(tiny_model, samples, tmp_path):
    """bf16 autocast over fp32 master weights: the update raises the positive sequences and lowers the negative
    ones as the fp32 update does, its first π_old is the fp32 one to bf16 precision, and what is saved is
    fp32 weights that differ from fp32 training's by a fraction of the step."""
    uri, rows = samples
    p = dict(FAST, target_kl=None)
    lp32 = update.Trainer(tiny_model, UpdateParams(**p)).logprobs
    t16 = update.Trainer(tiny_model, UpdateParams(**{**p, "dtype": "bfloat16"}))
    assert t16.amp_dtype is torch.bfloat16
    s = update.load_samples(uri)
    a, b = t16.logprobs(t16.model, s), lp32(t16.model, s)
    gap = max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))
    assert 0 < gap < 0.05, gap  # bf16 did run (not fp32), and to its precision
    out = update.run(
        UpdateParams(**{**p, "dtype": "bfloat16"}),
        {"samples": uri, "checkpoint": str(tiny_model)},
        tmp_path / "b",
    )
    ref = update.run(UpdateParams(**p), {"samples": uri, "checkpoint": str(tiny_model)}, tmp_path / "f")
    assert any("bf16 autocast" in n for n in out.notes), out.notes
    before = ckpt.load_model(tiny_model).eval()
    after, after32 = (
        ckpt.load_model(out.uri("checkpoint")).eval(),
        ckpt.load_model(ref.uri("checkpoint")).eval(),
    )
    assert next(after.parameters()).dtype == torch.float32
    for r in rows:
        delta = seq_logprob(after, r) - seq_logprob(before, r)
        assert (delta > 0) == (r["advantages"][-1] > 0), (r["sample_id"], delta)

    def dist(x, y):
        return (
            sum(
                float((u - v).pow(2).sum())
                for u, v in zip(x.state_dict().values(), y.state_dict().values(), strict=True)
            )
            ** 0.5
        )

    assert dist(after, after32) < 0.5 * dist(after32, before), (dist(after, after32), dist(after32, before))


def test_within_staleness_marks_and_drops_by_policy_version():
    from stages.update.batches import Sample, SamplesError, within_staleness

    def sample(version):
        one = torch.ones(3)
        return Sample(f"s{version}", torch.arange(3), one, one, -one, version=version)

    samples = [sample(v) for v in (3, 2, 1, None)]
    kept, stale = within_staleness(samples, "3", max_staleness=1)
    assert [s.version for s in kept] == [3, 2, None]  # version 1 is 2 updates behind: dropped
    assert [s.stale for s in kept] == [False, True, False]  # unrecorded: on-policy
    assert stale.metrics["actor/dropped_stale"] == 1 and stale.metrics["actor/staleness_max"] == 2
    assert "1 sample(s) more than 1 versions stale" in stale.notes[0]
    kept, stale = within_staleness(
        [sample(v) for v in (3, 2, 1)], None, 0
    )  # no checkpoint version: on-policy
    assert len(kept) == 3 and not any(s.stale for s in kept) and stale.metrics == {}
    with pytest.raises(SamplesError, match="nothing to train on"):
        within_staleness([sample(0)], 2, max_staleness=1)
    with pytest.raises(SamplesError, match="newer than the checkpoint"):
        within_staleness([sample(5)], 2, max_staleness=1)
