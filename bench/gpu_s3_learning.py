"""GPU check s3: one learning-recipe cell without Prefect/MLflow (``bench/gpu_check.py``)."""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from pathlib import Path

from gpu_common import err_text, note


# --- s3: learning-recipe cell ------------------------------------------------------------------------------------------
def build_policy(out: Path, tok_dir: Path, shape: dict, seed: int = 0) -> tuple[Path, int]:
    """A random Qwen2 of ``shape`` with turntree's tiny tokenizer (``runtime.models.prepare_tiny``'s)."""
    import torch
    from transformers import AutoTokenizer, GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    from runtime import checkpoint as ckpt
    from runtime.models import ENDOFTEXT, IM_END

    tok = AutoTokenizer.from_pretrained(tok_dir)
    eos, pad = tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)
    config = Qwen2Config(
        vocab_size=len(tok), **shape, max_position_embeddings=4096, tie_word_embeddings=True, bos_token_id=None,
        eos_token_id=eos, pad_token_id=pad,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config).to(torch.float32).eval()
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad, bos_token_id=None)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    ckpt.copy_tokenizer_files(tok_dir, out)
    return out, sum(p.numel() for p in model.parameters())


def section_s3(cfg: dict, res: dict, save) -> None:
    from runtime.models import prepare_tiny
    from schemas.params import (
        AdvantageParams,
        DataParams,
        EvalParams,
        PipelineParams,
        RolloutParams,
        ScoreParams,
        UpdateParams,
        WarmstartParams,
    )  # fmt: skip
    from stages import advantages, evaluate, rollout, score, update, warmstart
    from stages import data as data_stage

    t_start = time.perf_counter()
    dev, sc = cfg["device"], cfg["s3"]
    deadline = t_start + float(cfg["s3_timeout_s"]) - (25 if dev == "cuda" else 60)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-s3-"))
    res["iterations"] = []
    timings = res.setdefault("setup", {})

    def timed(key: str, fn):
        t0 = time.perf_counter()
        out = fn()
        timings[key] = time.perf_counter() - t0
        return out

    try:
        res["sandbox"] = sandbox_mode()
        note(f"s3: sandbox {res['sandbox']}")
        tiny = timed("tokenizer_s", lambda: prepare_tiny(tmp / "tiny"))
        policy, res["n_params"] = timed(
            "build_policy_s", lambda: build_policy(tmp / "policy", tiny, sc["model"])
        )
        pp = PipelineParams(  # the pipeline's own wiring of the algorithm into the stage parameters
            algorithm="gtpo",
            model=str(policy),
            data=DataParams(sources=["synthetic:tool-arith"], **sc["data"]),
            warmstart=WarmstartParams(
                enabled=True, cache=False, device=dev, dtype="bfloat16", **sc["warmstart"]
            ),
            rollout=RolloutParams(backend="transformers", temperature=1.0, **sc["rollout"]),
            score=ScoreParams(),
            advantages=AdvantageParams(**sc.get("advantages", {})),
            update=UpdateParams(device=dev, dtype="bfloat16", **sc["update"]),
            eval=EvalParams(benchmark="heldout", backend="transformers", **sc["eval"]),
        )
        res["params"] = pp.model_dump(mode="json", exclude={"dispatch"})
        save()
        data = timed("data_s", lambda: data_stage.run(pp.data, {}, tmp / "data"))
        problems = data.uri("problems")
        ws = timed("warmstart_s", lambda: warmstart.run(pp.warmstart, {"problems": problems, "checkpoint": str(policy)},
                                                         tmp / "warmstart"))  # fmt: skip
        res["warmstart"] = {k: v for k, v in ws.metrics.items()}
        checkpoint = ws.uri("checkpoint")
        save()

        def heldout(k: int, ckpt: str) -> dict:
            t0 = time.perf_counter()
            ev = evaluate.run(pp.eval, {"checkpoint": ckpt, "problems": problems}, tmp / f"eval-{k}")
            m = dict(ev.metrics)
            acc = {k2: v for k2, v in m.items() if re.fullmatch(r"eval/[^/]+/accuracy", k2)}
            return {"wall_s": time.perf_counter() - t0, "accuracy": acc, "metrics": m}

        note(f"s3: warm start done {timings}; evaluating iteration 0")
        res["iterations"].append({"iteration": 0, "evaluate": heldout(0, checkpoint)})
        note(f"s3: iteration 0 held-out {res['iterations'][0]['evaluate']['accuracy']}")
        save()
        table = "trajectories"
        # before iteration 1: a rollout of G x P trajectories next to an evaluation of max_problems, plus it
        ev0 = res["iterations"][0]["evaluate"]["wall_s"]
        last_iter_s = ev0 * (
            1 + pp.rollout.group_size * pp.rollout.problems_per_iteration / pp.eval.max_problems
        )
        for k in range(1, int(sc["iterations"]) + 1):
            now = time.perf_counter()
            if now + last_iter_s > deadline:
                res["stopped"] = f"time budget: iteration {k} would end after the section's deadline"
                break
            it: dict = {"iteration": k}
            res["iterations"].append(it)
            d = tmp / f"iter-{k}"
            t0 = time.perf_counter()
            ro = rollout.run(pp.rollout, {"problems": problems, "checkpoint": checkpoint, "iteration": str(k)},
                             d / "rollout")  # fmt: skip
            it["rollout_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            scd = score.run(pp.score, {table: ro.uri(table), "problems": problems}, d / "score")
            it["score_s"] = time.perf_counter() - t0
            t0 = time.perf_counter()
            adv = advantages.run(pp.advantages, {table: scd.uri(table)}, d / "advantages")
            it["advantages_s"] = time.perf_counter() - t0
            it["samples"] = adv.tables["samples"].rows
            if adv.tables["samples"].rows:
                t0 = time.perf_counter()
                upd = update.run(
                    pp.update, {"samples": adv.uri("samples"), "checkpoint": checkpoint}, d / "update"
                )
                it["update_s"] = time.perf_counter() - t0
                checkpoint = upd.uri("checkpoint")
                it["update"] = {
                    k2: v for k2, v in upd.metrics.items() if k2.startswith(("actor/", "timing/"))
                }
            else:
                it["update_s"] = 0.0
                it["update"] = "skipped: every group tied"
            it["rollout"] = {k2: v for k2, v in ro.metrics.items() if k2.startswith(("rollout/", "timing/"))}
            it["reward"] = {k2: v for k2, v in scd.metrics.items() if k2.startswith("reward/")}
            save()
            note(
                f"s3: iteration {k}: rollout {it['rollout_s']:.1f} s, reward {it['reward'].get('reward/mean')}, "
                f"update {it['update_s']:.1f} s; evaluating"
            )
            it["evaluate"] = heldout(k, checkpoint)
            last_iter_s = time.perf_counter() - now
            it["iteration_s"] = last_iter_s
            save()
        try:
            res["seed_batching"] = seed_batching(sc["seed_bench"], problems)
        except Exception as e:  # noqa: BLE001
            res["seed_batching"] = {"error": err_text(e)}
        res["wall_s"] = time.perf_counter() - t_start
        save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sandbox_mode() -> dict:
    """The sandbox's isolation here: bwrap when its trial run works, else the fallback (rlimits + uid +
    seccomp), asked for by name (the stage refuses to fall back silently)."""
    from runtime.sandbox import isolation

    try:
        return {"mode": isolation.detect_mode()}
    except isolation.SandboxUnavailable as e:
        os.environ["TURNTREE_SANDBOX_MODE"] = "fallback"
        isolation.detect_mode.cache_clear()
        return {"mode": isolation.detect_mode(), "bwrap_unavailable": str(e)[:500]}


def seed_batching(sb: dict, problems_uri: str) -> dict:
    """The live transformers engine: ``n`` prompts in one generate call with one seed (one batch) vs one seed
    per request (as the TIR loop sends them: the engine batches only equal sampling specs)."""
    from maths import prompts
    from runtime.engines import SamplingSpec, live_engine
    from runtime.tableio import read_table
    from schemas.tables import PROBLEMS

    engine = live_engine()
    if engine is None:
        return {"error": "no live engine"}
    rows = [p for p in read_table(problems_uri, PROBLEMS).to_pylist() if p["split"] == "eval"][
        : sb["prompts"]
    ]
    ids = [prompts.initial_prompt_ids(engine.tokenizer, p) for p in rows]
    out = {"backend": engine.backend, "prompts": len(ids), "max_tokens": sb["max_tokens"]}
    for name, seeds in (("one_seed", [1] * len(ids)), ("seed_per_request", list(range(1, len(ids) + 1)))):
        specs = [SamplingSpec(n=1, temperature=1.0, max_tokens=sb["max_tokens"], stop=list(prompts.TIR_STOP), seed=s)
                 for s in seeds]  # fmt: skip
        t0 = time.perf_counter()
        gens = engine.generate(ids, specs)
        dt = time.perf_counter() - t0
        tokens = sum(len(g[0].token_ids) for g in gens)
        out[name] = {"s": dt, "tokens": tokens, "tokens_per_s": tokens / max(dt, 1e-9)}
    out["speedup_one_seed"] = out["seed_per_request"]["s"] / max(out["one_seed"]["s"], 1e-9)
    return out
