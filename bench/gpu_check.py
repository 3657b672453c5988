"""One-shot GPU check of the update and the learning loop (issue 24), run once on a lent H200 by
``bench/gpu_check.sh``; ``--cpu-smoke`` runs the same code paths at toy sizes on CPU (gloo).

    bash bench/gpu_check.sh                  # on the GPU machine: results in $OUT/gpu_check.json + gpu_check.log
    bash bench/gpu_check.sh --cpu-smoke      # here: tiny shapes, device cpu, gloo (a few minutes on 2 cores)
    .venv/bin/python bench/gpu_check.py simenv DIR   # here: a venv of only the GPU image's packages (+ .whl/ ones)
    bash bench/gpu_check.sh --sections s2    # any subset of s1,s2,s3

Each section runs in a child process of its own with a time limit (a crash, an OOM or a hang loses that section
only); the child writes its results as it goes and the parent merges them into ``gpu_check.json`` after every
section. This file is the parent and the summary; the sections are ``gpu_s1_update.py``, ``gpu_s2_distributed.py``
(+ ``gpu_force_world.py``, its torchrun hook) and ``gpu_s3_learning.py``, over ``gpu_common.py``. Sections:

s1  update throughput: ``stages.update.Trainer.update`` (the update stage's own trainer, bf16 autocast over fp32
    master weights) on synthetic RL-shaped samples (1024-2048 tokens, untrained prompt and tool-output spans,
    ±1 advantages), for a SmolLM2-135M-shaped and a ~1.07B Llama-shaped model, both random-initialised here (no
    weights travel: the 64 MiB cap is below even SmolLM2's 94 MiB GGUF). Per shape: tokens/s, model FLOP/s as
    MFU against the H200's dense bf16 peak (989 TFLOP/s spec; the 8192^3 GEMM measured in the same run is also
    given), peak memory, and a plain HF forward+backward of the same model and micro-batch shape as a ceiling
    reference (what transformers alone reaches, without the update's loss code).
    FLOPs (useful model FLOPs only, no recompute, no padding): training pass per sample of L tokens with P prompt
    tokens: 6·N_body·L + 6·V·h·(L−P+1) [LM head only where logits are kept] + 6·n_layers·h·L² [causal
    attention, QKᵀ and AV]; the π_old pass (no-grad forward of every minibatch but the first): a third of that.
s2  ``update.distributed=ddp`` and ``fsdp2`` under torchrun with one process, through ``stages.update.distributed.
    launch`` (torchrun --standalone --nproc-per-node 1 -m stages.update …), NCCL on CUDA. With one process the
    stage itself would not wrap the model (``World.distributed`` is ``size > 1``), so each rank is given a
    one-rank world whose ``distributed`` is True (a sitecustomize hook: process group opened, DDP / FSDP2 wrap,
    all collectives): the rest is the stage's own code. Compared with the one-process update of the same samples
    (losses per optimizer step, grad norms, and the final weights).
s3  one learning-recipe cell without Prefect/MLflow: the stages called in ``flows.pipeline.drive``'s order (data →
    warm start → evaluate → [rollout → score → advantages → update → evaluate] × k), transformers rollout backend
    on CUDA, update on CUDA; a ~10M random Qwen2 with turntree's tiny tokenizer, a warm start on tool-arith
    demonstrations, then GTPO iterations while the time budget lasts. Reward, held-out accuracy and stage times
    per iteration; and the transformers engine's generate with one seed for a batch vs one seed per request
    (what the TIR loop sends), to measure how much the per-request seeds cost that backend.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

from gpu_common import CPU_CONFIG, GPU_CONFIG, REPO, SECTIONS, err_text, write_json
from gpu_s1_update import section_s1
from gpu_s2_distributed import section_s2
from gpu_s3_learning import section_s3

SECTION_FNS = {"s1": section_s1, "s2": section_s2, "s3": section_s3}


# --- a section in a child process ---------------------------------------------------------------------------------------
def run_section_child(name: str, cfg: dict, result: Path) -> int:
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("turntree").setLevel(logging.INFO)
    res: dict = {"section": name, "status": "running"}

    def save():
        write_json(result, res)

    save()
    t0 = time.perf_counter()
    try:
        SECTION_FNS[name](cfg, res, save)
        res["status"] = "ok"
    except BaseException as e:  # noqa: BLE001 - recorded, then the child exits non-zero
        res["status"] = "error"
        res["error"] = err_text(e)
        res["traceback"] = traceback.format_exc()[-6000:]
    res["section_s"] = time.perf_counter() - t0
    save()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0 if res["status"] == "ok" else 1)  # skip teardown (NCCL / engine threads)


# --- the parent ----------------------------------------------------------------------------------------------------------
def run_all(args) -> int:
    cfg = json.loads(json.dumps(CPU_CONFIG if args.cpu_smoke else GPU_CONFIG))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path, json_path = out / "gpu_check.log", out / "gpu_check.json"
    budget = float(args.budget_s or cfg["budget_s"])
    t_start = time.perf_counter()
    results: dict = {
        "mode": "cpu-smoke" if args.cpu_smoke else "gpu",
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "python": sys.version.split()[0],
        "budget_s": budget,
        "sections": {},
    }
    write_json(json_path, results)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    for k, v in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
                 "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
                 "TQDM_DISABLE": "1"}.items():  # fmt: skip
        env.setdefault(k, v)
    if args.cpu_smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    wanted = [s.strip() for s in args.sections.split(",") if s.strip()]
    with log_path.open("a") as log:
        for name in wanted:
            left = budget - (time.perf_counter() - t_start)
            if name == "s3":
                timeout = min(cfg["s3"]["timeout_max_s"], left - 5)
                if timeout < cfg["s3"]["timeout_min_s"]:
                    results["sections"][name] = {
                        "status": "skipped",
                        "why": f"{left:.0f} s left of the budget",
                    }
                    write_json(json_path, results)
                    continue
                cfg["s3_timeout_s"] = timeout
            else:
                timeout = min(cfg[name]["timeout_s"], max(left - 5, 10))
            result = out / f"section_{name}.json"
            log.write(f"\n===== {name} (timeout {timeout:.0f} s) {time.strftime('%H:%M:%S')} =====\n")
            log.flush()
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {name}: start (timeout {timeout:.0f} s)", flush=True
            )
            t0 = time.perf_counter()
            cmd = [sys.executable, str(Path(__file__).resolve()), "section", name, "--cfg", json.dumps(cfg),
                   "--result", str(result)]  # fmt: skip
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, env=env,
                                    start_new_session=True)  # fmt: skip
            timed_out = False
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                os.killpg(
                    proc.pid, signal.SIGTERM
                )  # the section's own process group (its torchrun ranks too)
                try:
                    rc = proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    rc = proc.wait()
            try:
                sec = json.loads(result.read_text())
                result.unlink()
            except (OSError, json.JSONDecodeError) as e:
                sec = {"status": "error", "error": f"no result file ({e})"}
            if timed_out:
                sec["status"] = "timeout"
                sec["error"] = f"killed after {timeout:.0f} s (partial results kept)"
            sec["rc"] = rc
            sec["wall_s"] = time.perf_counter() - t0
            results["sections"][name] = sec
            results["elapsed_s"] = time.perf_counter() - t_start
            write_json(json_path, results)
            print(
                f"[{time.perf_counter() - t_start:6.1f}s] {name}: {sec['status']} in {sec['wall_s']:.0f} s",
                flush=True,
            )
            if sec["status"] != "ok":
                log.flush()
                tail = log_path.read_text(errors="replace")[-1500:]
                print(f"--- {name} log tail ---\n{tail}\n--- end ---", flush=True)
    results["elapsed_s"] = time.perf_counter() - t_start
    write_json(json_path, results)
    print(summary(results), flush=True)
    return 0 if all(s.get("status") == "ok" for s in results["sections"].values()) else 1


def _f(x, fmt="{:.3g}"):
    return "-" if x is None else (fmt.format(x) if isinstance(x, int | float) else str(x))


def summary(results: dict) -> str:
    lines = [f"=== gpu_check ({results['mode']}), {results.get('elapsed_s', 0):.0f} s ==="]
    s1 = results["sections"].get("s1")
    if s1:
        env = s1.get("env", {})
        lines.append(f"env: {env.get('device_name')} torch {env.get('torch')} cuda {env.get('cuda')} "
                     f"transformers {env.get('transformers')} pydantic {env.get('pydantic')} python {env.get('python')}")  # fmt: skip
        lines.append(
            f"s1 [{s1.get('status')}] bf16 GEMM {_f(s1.get('gemm_tflops'), '{:.0f}')} TFLOP/s measured"
        )
        for name, r in (s1.get("shapes") or {}).items():
            b = r.get("best")
            if b:
                hf = r.get("hf_fwd_bwd_baseline") or {}
                lines.append(
                    f"  {name}: {r.get('n_params', 0) / 1e6:.0f}M params, {b['tokens']} tokens/update, "
                    f"train {b['tokens_per_s_train']:.0f} tok/s MFU {100 * b['mfu_train']:.1f}% | whole update "
                    f"{b['tokens_per_s_update']:.0f} tok/s MFU {100 * b['mfu_update']:.1f}% (pi_old {b['pi_old_s']:.2f} s, "
                    f"train {b['train_s']:.2f} s) | peak {b['max_memory_allocated_mb'] or b['peak_mem_train_mb']:.0f} MB"
                    f" | HF fwd+bwd ref MFU {_f(100 * hf['mfu'] if 'mfu' in hf else None, '{:.1f}')}%"
                )
            if r.get("error"):
                lines.append(f"  {name}: ERROR {r['error'][:300]}")
        if s1.get("error"):
            lines.append(f"  ERROR {s1['error'][:300]}")
    s2 = results["sections"].get("s2")
    if s2:
        lines.append(f"s2 [{s2.get('status')}] single loss/step: "
                     + ", ".join(f"{x['loss']:.5f}" for x in (s2.get("single") or {}).get("steps", [])))  # fmt: skip
        for kind in ("ddp", "fsdp2"):
            r = s2.get(kind) or {}
            c = r.get("compare") or {}
            if c:
                lines.append(
                    f"  {kind}: wrapped={r.get('wrapped')} match={c['match_bf16_tolerance']} losses "
                    + ", ".join(f"{x['loss_multi']:.5f}" for x in c["steps"])
                    + f" | weights rel-L2 {c['weights_rel_l2_diff_vs_update']:.2e} max|Δ| {c['weights_max_abs_diff']:.2e}"
                    + f" | {r.get('wall_s', 0):.0f} s"
                )
            elif r.get("error"):
                lines.append(f"  {kind}: ERROR {r['error'][:400]}")
        if s2.get("error"):
            lines.append(f"  ERROR {s2['error'][:300]}")
    s3 = results["sections"].get("s3")
    if s3 and s3.get("status") != "skipped":
        st = s3.get("setup", {})
        ws = s3.get("warmstart", {})
        lines.append(f"s3 [{s3.get('status')}] {_f(s3.get('n_params', 0) / 1e6, '{:.1f}')}M-param policy; "
                     f"setup {', '.join(f'{k} {v:.1f}' for k, v in st.items())}; "
                     f"warm start loss {_f(ws.get('actor/sft_loss_first'))} -> {_f(ws.get('actor/sft_loss_last', ws.get('actor/sft_loss')))}")  # fmt: skip
        lines.append(
            "  iter reward correct tools  held-out        rollout_s (tok/s)  score_s adv_s update_s eval_s"
        )
        for it in s3.get("iterations", []):
            ev = it.get("evaluate") or {}
            acc = next(iter((ev.get("accuracy") or {}).values()), None)
            rw = it.get("reward") or {}
            ro = it.get("rollout") or {}
            lines.append(
                f"  {it['iteration']:>4} {_f(rw.get('reward/mean'), '{:.3f}'):>6} {_f(rw.get('reward/correct_frac'), '{:.2f}'):>7} "
                f"{_f(ro.get('rollout/tool_calls_per_trajectory'), '{:.2f}'):>5}  {_f(acc, '{:.3f}'):>8}  "
                f"{_f(it.get('rollout_s'), '{:.1f}'):>9} ({_f(ro.get('rollout/tokens_per_s'), '{:.0f}')}) "
                f"{_f(it.get('score_s'), '{:.1f}'):>7} {_f(it.get('advantages_s'), '{:.1f}'):>5} "
                f"{_f(it.get('update_s'), '{:.1f}'):>8} {_f(ev.get('wall_s'), '{:.1f}'):>6}"
            )
        sb = s3.get("seed_batching") or {}
        if "speedup_one_seed" in sb:
            lines.append(f"  transformers engine, {sb['prompts']} prompts: one seed {sb['one_seed']['tokens_per_s']:.0f} tok/s vs "
                         f"seed per request {sb['seed_per_request']['tokens_per_s']:.0f} tok/s (x{sb['speedup_one_seed']:.1f} time)")  # fmt: skip
        if s3.get("stopped"):
            lines.append(f"  {s3['stopped']}")
        if s3.get("error"):
            lines.append(f"  ERROR {s3['error'][:400]}")
    for name, s in results["sections"].items():
        if s.get("status") in ("skipped", "timeout"):
            lines.append(f"{name}: {s['status']} ({s.get('why') or s.get('error')})")
    return "\n".join(lines)


# --- a venv with the GPU image's packages only (CPU smoke) ----------------------------------------------------------------
H200_PACKAGES = """absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build
certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-ml-py onnx onnx-ir onnxruntime onnxscript opencv-python-headless
optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy
portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks
pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image scikit-learn scipy
seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels sympy
tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton typer
typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"""
# here only because this machine's newer versions need them (huggingface-hub 2.x; the GPU image has 1.33)
SIM_EXTRAS = "httpx2 httpcore2 truststore"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def make_simenv(target: Path) -> None:
    """A venv at ``target`` whose site-packages links only the distributions of this interpreter that the GPU
    image has (KINDS.md's list), plus the wheels carried in ``.whl/`` (linked from here, same versions)."""
    import importlib.metadata as md
    import sysconfig
    import venv

    carried = {_norm(p.name.split("-")[0]) for p in (REPO / ".whl").glob("*.whl")}
    allowed = {_norm(n) for n in H200_PACKAGES.split()} | carried | {_norm(n) for n in SIM_EXTRAS.split()}
    if target.exists():
        shutil.rmtree(target)
    venv.EnvBuilder(with_pip=False, symlinks=True).create(target)
    site = Path(sysconfig.get_path("purelib", vars={"base": str(target), "platbase": str(target)}))
    here = Path(sysconfig.get_path("purelib"))
    linked, found = set(), set()
    for dist in md.distributions(path=[str(here)]):
        name = _norm(dist.metadata["Name"])
        if name not in allowed:
            continue
        found.add(name)
        tops = {Path(str(f)).parts[0] for f in (dist.files or []) if not str(f).startswith("..")}
        for top in tops:
            if top in linked or top == "__pycache__" or top.endswith(".pth"):
                continue
            src = here / top
            if src.exists():
                (site / top).symlink_to(src)
                linked.add(top)
    print(f"simenv {target}: {len(found)} distributions linked; carried: {sorted(carried)}")
    print(f"  not on this machine: {sorted(allowed - found)[:20]} ...")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    sec = sub.add_parser("section", help="(internal) one section in this process")
    sec.add_argument("name", choices=SECTIONS)
    sec.add_argument("--cfg", required=True)
    sec.add_argument("--result", type=Path, required=True)
    sim = sub.add_parser("simenv", help="build a venv holding only the GPU image's packages")
    sim.add_argument("target", type=Path)
    ap.add_argument("--cpu-smoke", action="store_true", help="toy sizes on CPU (gloo)")
    ap.add_argument("--out", default=os.environ.get("OUT") or "/tmp/gpu_check_out")
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--budget-s", type=float, default=None, help="whole run (default: 330 on GPU)")
    args = ap.parse_args()
    if args.cmd == "section":
        return run_section_child(args.name, json.loads(args.cfg), args.result)
    if args.cmd == "simenv":
        make_simenv(args.target)
        return 0
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
