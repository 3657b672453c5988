"""GPU check s2: the update under torchrun with DDP and FSDP2, one process (``bench/gpu_check.py``)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import traceback
from pathlib import Path

from gpu_common import REPO, build_checkpoint, err_text, free, note, sample_rows, write_samples

# --- s2: DDP / FSDP2 under torchrun, one process ------------------------------------------------------------------------
HOOK = """\
import os
if os.environ.get("GPU_CHECK_FORCE_WORLD") == "1" and "LOCAL_RANK" in os.environ:
    import importlib.util, sys
    try:
        spec = importlib.util.spec_from_file_location("gpu_check_hook_module", os.environ["GPU_CHECK_SCRIPT"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        mod.force_distributed_world()
    except Exception as e:
        sys.stderr.write("gpu_check hook failed: %r\\n" % (e,))
        raise
"""


def section_s2(cfg: dict, res: dict, save) -> None:
    from safetensors.torch import load_file

    from schemas.params.update import UpdateParams
    from stages import update
    from stages.update import distributed as ddist

    dev, sc = cfg["device"], cfg["s2"]
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-s2-"))
    try:
        t0 = time.perf_counter()
        base_ckpt = build_checkpoint(tmp / "base", sc["arch"], dev, seed=1)
        rows = sample_rows(sc["samples"], sc["arch"]["vocab_size"], sc["len"], sc["prompt"], seed=7, group=4)
        inputs = {"samples": write_samples(tmp / "samples.parquet", rows), "checkpoint": str(base_ckpt)}
        res["setup_s"] = time.perf_counter() - t0
        base = dict(
            device=dev, dtype="bfloat16", lr=sc["lr"], minibatch_size=sc["minibatch"], micro_batch_size=sc["micro"],
            target_kl=None, seed=3, cpu_threads=1,
        )  # fmt: skip
        outs = {}
        t0 = time.perf_counter()
        outs["single"] = update.run(UpdateParams(**base), inputs, tmp / "single")
        res["single"] = summarize_update(outs["single"], tmp / "single", time.perf_counter() - t0)
        save()
        free(dev)
        hook = tmp / "hook"
        hook.mkdir()
        (hook / "sitecustomize.py").write_text(HOOK)
        os.environ["PYTHONPATH"] = os.pathsep.join(
            filter(None, [str(hook), str(REPO), os.environ.get("PYTHONPATH")])
        )
        os.environ["GPU_CHECK_FORCE_WORLD"] = "1"
        os.environ["GPU_CHECK_SCRIPT"] = str(Path(__file__).with_name("gpu_force_world.py").resolve())
        os.environ.setdefault("NCCL_DEBUG", "WARN")
        single_w = load_file(str(tmp / "single" / "checkpoint" / "model.safetensors"))
        base_w = load_file(str(base_ckpt / "model.safetensors"))
        for kind in ("ddp", "fsdp2"):
            r = res.setdefault(kind, {})
            try:
                p = UpdateParams(**base, nproc=1, distributed=kind)
                r["torchrun"] = " ".join(ddist.torchrun_command(p)[1:]) + " -m stages.update ..."
                note(f"s2: {kind} under torchrun")
                t0 = time.perf_counter()
                out = ddist.launch(p, inputs, tmp / kind)
                r.update(summarize_update(out, tmp / kind, time.perf_counter() - t0))
                r["wrapped"] = any(f"processes ({kind})" in n for n in out.notes)
                w = load_file(str(Path(out.uri("checkpoint")) / "model.safetensors"))
                r["compare"] = compare_updates(res["single"], r, base_w, single_w, w)
            except Exception as e:  # noqa: BLE001
                r["error"] = err_text(e)
                r["traceback"] = traceback.format_exc()[-4000:]
            save()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def summarize_update(out, outdir: Path, wall: float) -> dict:
    steps = [json.loads(x) for x in (outdir / "steps.jsonl").read_text().splitlines() if x.strip()]
    keep = ("actor/loss", "actor/grad_norm", "actor/approx_kl", "actor/entropy", "actor/clip_frac",
            "actor/trained_tokens", "actor/steps", "actor/tokens_per_s", "actor/peak_mem_mb", "timing/update")  # fmt: skip
    return {
        "wall_s": wall,
        "metrics": {k: out.metrics[k] for k in keep if k in out.metrics},
        "steps": [
            {k: s[k] for k in ("step", "loss", "grad_norm", "approx_kl", "entropy", "tokens")} for s in steps
        ],
        "notes": out.notes,
    }


def compare_updates(single: dict, multi: dict, base_w: dict, single_w: dict, multi_w: dict) -> dict:
    """Per-step losses and grad norms, and the weights: max |Δ|, and ‖w_multi − w_single‖ / ‖w_single − w_base‖."""
    import torch

    steps = []
    ok = len(single["steps"]) == len(multi["steps"]) and len(single["steps"]) > 0
    for a, b in zip(single["steps"], multi["steps"], strict=False):
        d_loss = abs(a["loss"] - b["loss"])
        d_gn = abs(a["grad_norm"] - b["grad_norm"]) / max(abs(a["grad_norm"]), 1e-12)
        steps.append({"step": a["step"], "loss_single": a["loss"], "loss_multi": b["loss"], "abs_diff_loss": d_loss,
                      "rel_diff_grad_norm": d_gn})  # fmt: skip
        ok &= d_loss <= 1e-2 * abs(a["loss"]) + 1e-3 and d_gn <= 2e-2
    num = den = 0.0
    max_abs = 0.0
    for k, ws in single_w.items():
        if k not in multi_w:
            ok = False
            continue
        diff = (multi_w[k].float() - ws.float()).double()
        num += float((diff**2).sum())
        den += float(((ws.float() - base_w[k].float()).double() ** 2).sum()) if k in base_w else 0.0
        max_abs = max(max_abs, float(diff.abs().max()))
    rel = (num**0.5) / max(den**0.5, 1e-30)
    ok &= rel <= 0.1
    return {
        "steps": steps,
        "weights_max_abs_diff": max_abs,
        "weights_rel_l2_diff_vs_update": rel,
        "update_l2": den**0.5,
        "match_bf16_tolerance": bool(ok),
        "tolerance": "per step |Δloss| <= 1e-2·|loss| + 1e-3 and grad-norm rel diff <= 2e-2; "
        "||w_multi − w_single|| <= 0.1·||w_single − w_base||",
        "torch": torch.__version__,
    }
