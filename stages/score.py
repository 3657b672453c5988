"""Score stage: fill the reward fields of rollout tables (docs/algorithms.md).

One way through: read the rollout table and the problems, run the programs in the sandbox, call one rewards
function (``maths.reward_fns.trajectory_rewards`` / ``node_rewards``), write.

    run(params: ScoreParams, inputs: {"trajectories": uri, "problems": uri} | {"trees": uri, "problems": uri},
        out: Path) -> StageOutput

Trajectories (TIR, GRPO/GTPO): the outcome reward r_i from the registered reward functions combined by weights
(``maths.reward_fns``): math rows compare ``final_answer`` with ``problems.answer``; code rows run the final
program (``final_answer``, else the last turn's code) against the problem's tests in the sandbox. Then the
GTPO turn rewards r_ij = r_acc + r_fmt, with self-supervised shaping of failed trajectories that have a
successful sibling. Written: ``turns[].turn_reward``, ``correct``, ``reward`` (the GRPO r_i, gated by format
errors when ``format_gate``) and ``reward_components`` (each component, plus ``format``, ``shaped`` and
``outcome``), and ``no_verdict``: True for a row whose program got no verdict because the sandbox failed twice
(``run_tests_batch``), False for every other row. The advantages stage drops a ``no_verdict`` row before any
group statistic, and the reward/* metrics here leave it out (``reward/sandbox_error_frac`` counts it).

Trees (MURPHY): r(n) per node from the ``tests_passed``/``tests_total`` the rollout stored (fraction, or
all-pass when ``code_reward="binary"``); nodes without counts are re-run in the sandbox. A re-run node the
sandbox failed twice keeps null ``tests_passed``, ``tests_total`` and ``reward`` (no verdict, so no reward)
and gets ``no_verdict`` True (every other node False): the advantages stage leaves its whole tree out (sibling
sets and returns never cross trees, so the other trees' signal is unchanged); ``reward/sandbox_error_frac``
counts it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pyarrow as pa

from maths import reward_fns as R
from maths.columns import field, list_parts, numbers, with_fields
from maths.step_rewards import reference_steps
from runtime.tableio import read_table, write_table
from schemas.outputs import StageOutput
from schemas.params.rewards import ScoreParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES

log = logging.getLogger(__name__)


def run(params: ScoreParams, inputs: dict[str, str], out: Path) -> StageOutput:
    """Score whichever rollout table ``inputs`` names ("trajectories" or "trees"), given "problems"."""
    kinds = [k for k in RUNNERS if k in inputs]
    if len(kinds) != 1 or "problems" not in inputs:
        raise ValueError(
            f"score needs 'problems' and exactly one of {sorted(RUNNERS)} in inputs; got {sorted(inputs)}"
        )
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    problems = {p["problem_id"]: p for p in read_table(inputs["problems"], PROBLEMS).to_pylist()}
    return RUNNERS[kinds[0]](params, inputs[kinds[0]], problems, out)


def run_tests_batch(
    programs: list[str], problems: list[dict], timeout_s: float, ray: bool = False
) -> list[tuple[int, int, bool]]:
    """(passed, total, sandbox_error) of each program against its problem's tests, through the sandbox's pool
    (``ray``: as Ray tasks, ``runtime.sandbox.RayBatches``, on the cluster this process is connected to or
    RAY_ADDRESS's or a new local one).

    A job whose sandbox failed (``TestReport.sandbox_failed``: launch failed, worker died, ...) got no
    verdict: it runs once more; if the sandbox fails again the job comes back with ``sandbox_error`` True (and
    0 passed), which the caller must keep out of every reward statistic."""
    from runtime.sandbox import RayBatches, run_tests_many

    pool = RayBatches() if ray else None
    tests = [list(p["tests"] or []) for p in problems]
    entry_points = [p.get("entry_point") for p in problems]

    reports = (
        run_tests_many(programs, tests, entry_points=entry_points, timeout_s=timeout_s, pool=pool, retries=1)
        if programs
        else []
    )
    if ray and programs:
        where = sorted({(w["host"], w["pid"]) for w in reports.workers})
        log.info(
            "score: %d test runs as %d Ray tasks on workers %s", len(programs), len(reports.workers), where
        )
    return [(int(r.passed), int(r.total), r.sandbox_failed) for r in reports]


def sandbox_error_notes(flags: np.ndarray, what: str) -> list[str]:
    """A note (and a warning) naming how many jobs the sandbox failed twice, or nothing."""
    if not flags.any():
        return []
    note = (
        f"{int(flags.sum())} {what} got no verdict (the sandbox failed twice): marked no_verdict and left "
        "out of the reward statistics"
    )
    log.warning(note)
    return [note]


def _problem(problems: dict[str, dict], problem_id: str, where: str) -> dict:
    if problem_id not in problems:
        raise ValueError(f"{where}: problem {problem_id!r} is not in the problems table")
    return problems[problem_id]


def _component_metrics(components: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({k for c in components for k in c})
    out = {}
    for name in names:
        vals = np.array([c[name] for c in components if name in c])
        out[f"reward/{name}/mean"] = float(vals.mean())
        out[f"reward/{name}/std"] = float(vals.std())
    return out


def score_trajectories(params: ScoreParams, uri: str, problems: dict[str, dict], out: Path) -> StageOutput:
    table = read_table(uri, TRAJECTORIES)
    n = table.num_rows
    meta = table.select(["trajectory_id", "problem_id", "final_answer"]).to_pylist()
    t_off, turns = list_parts(table["turns"])
    lengths = np.diff(t_off)
    if n and (lengths == 0).any():
        row = int(np.flatnonzero(lengths == 0)[0])
        raise ValueError(f"trajectory {meta[row]['trajectory_id']!r} (row {row}) has no turns")
    tool_call = numbers(field(turns, "tool_call"), object)
    exec_status = numbers(field(turns, "exec_status"), object)
    turn_code = field(turns, "code").to_pylist()
    turn_dicts = [{"tool_call": tc, "exec_status": es} for tc, es in zip(tool_call, exec_status, strict=True)]
    if params.step_reward > 0:  # the outputs the step reward reads (maths.step_rewards)
        for t, output in zip(turn_dicts, field(turns, "exec_output").to_pylist(), strict=True):
            t["exec_output"] = output
    last_text = field(turns, "text").take(pa.array(t_off[1:] - 1, pa.int64())).to_pylist() if n else []

    rows = []
    for i, m in enumerate(meta):
        p = _problem(problems, m["problem_id"], f"trajectory {m['trajectory_id']!r} (row {i})")
        codes = [c for c in turn_code[t_off[i] : t_off[i + 1]] if c]
        program = (
            m["final_answer"] if p["kind"] == "code" and m["final_answer"] else (codes[-1] if codes else "")
        )
        rows.append(
            {
                **m,
                "kind": p["kind"],
                "answer": p.get("answer"),
                "program": program,
                "code": "\n".join(codes),
                "turns": turn_dicts[t_off[i] : t_off[i + 1]],
                "last_text": last_text[i] or "",
                **({"steps": reference_steps(p.get("demonstration"))} if params.step_reward > 0 else {}),
            }
        )
    code_rows = [i for i, r in enumerate(rows) if r["kind"] == "code"]
    counts = run_tests_batch(
        [rows[i]["program"] for i in code_rows],
        [problems[rows[i]["problem_id"]] for i in code_rows],
        params.test_timeout_s,
        params.sandbox_ray,
    )
    sandbox_error = np.zeros(n, bool)
    for i, (passed, total, failed) in zip(code_rows, counts, strict=True):
        rows[i]["tests_passed"], rows[i]["tests_total"] = passed, total
        sandbox_error[i] = failed

    scores = R.trajectory_rewards(rows, tool_call, exec_status, lengths, table["group_id"], params)
    turn_reward, correct, reward = scores.turn_reward, scores.correct, scores.reward
    components = scores.components
    new = table.set_column(
        table.schema.get_field_index("turns"),
        "turns",
        with_fields(table["turns"], {"turn_reward": turn_reward.astype(np.float32)}),
    )
    new = new.set_column(new.schema.get_field_index("correct"), "correct", pa.array(correct, pa.bool_()))
    new = new.set_column(new.schema.get_field_index("reward"), "reward", pa.array(reward, pa.float32()))
    new = new.set_column(
        new.schema.get_field_index("reward_components"),
        "reward_components",
        pa.array([list(c.items()) for c in components], TRAJECTORIES.field("reward_components").type),
    )
    new = new.set_column(new.schema.get_field_index("no_verdict"), "no_verdict", pa.array(sandbox_error))
    ref = write_table(new, TRAJECTORIES, out / "trajectories.parquet")
    ok = ~sandbox_error  # rows with a verdict: the statistics below are theirs alone
    has = bool(ok.any())
    ok_turns = np.repeat(ok, lengths)
    metrics = {
        "reward/mean": float(reward[ok].mean()) if has else 0.0,
        "reward/std": float(reward[ok].std()) if has else 0.0,
        "reward/correct_frac": float(correct[ok].mean()) if has else 0.0,
        "reward/format_error_frac": float(scores.format_error[ok].mean()) if has else 0.0,
        "reward/shaped_frac": float(scores.shaped[ok].mean()) if has else 0.0,
        "reward/turn_reward/mean": float(turn_reward[ok_turns].mean()) if has else 0.0,
        "reward/sandbox_error_frac": float(sandbox_error.mean()) if n else 0.0,
        "reward/sandbox_errors": float(sandbox_error.sum()),
        **_component_metrics([c for c, keep in zip(components, ok, strict=True) if keep]),
    }
    notes = [f"score params: {params.model_dump()}", *sandbox_error_notes(sandbox_error, "trajectories")]
    return StageOutput(stage="score", tables={"trajectories": ref}, metrics=metrics, notes=notes)


def score_trees(params: ScoreParams, uri: str, problems: dict[str, dict], out: Path) -> StageOutput:
    trees = read_table(uri, TREES)
    t_off, nodes = list_parts(trees["nodes"])
    tree_of = np.repeat(np.arange(trees.num_rows), np.diff(t_off))
    tree_ids, problem_ids = trees["tree_id"].to_pylist(), trees["problem_id"].to_pylist()
    passed_col, total_col = field(nodes, "tests_passed"), field(nodes, "tests_total")
    missing = np.flatnonzero(
        passed_col.is_null().to_numpy(zero_copy_only=False)
        | total_col.is_null().to_numpy(zero_copy_only=False)
    )
    no_verdict = np.zeros(len(nodes), bool)  # the sandbox failed twice on the node's rerun
    passed = numbers(passed_col.fill_null(0), np.int64).copy()
    total = numbers(total_col.fill_null(0), np.int64).copy()
    if missing.size:
        node_code = field(nodes, "code").to_pylist()
        probs = [
            _problem(problems, problem_ids[tree_of[i]], f"tree {tree_ids[tree_of[i]]!r}") for i in missing
        ]
        counts = run_tests_batch(
            [node_code[i] or "" for i in missing], probs, params.test_timeout_s, params.sandbox_ray
        )
        passed[missing] = [c[0] for c in counts]
        total[missing] = [c[1] for c in counts]
        no_verdict[missing] = [c[2] for c in counts]
    no_tests = (total <= 0) & ~no_verdict
    reward, frac = R.node_rewards(passed, total, params.code_reward)
    new_nodes = with_fields(  # a node without a verdict keeps no counts and no reward (null): see module doc
        trees["nodes"],
        {
            "reward": pa.array(reward.astype(np.float32), mask=no_verdict),
            "tests_passed": pa.array(passed.astype(np.int32), mask=no_verdict),
            "tests_total": pa.array(total.astype(np.int32), mask=no_verdict),
            "no_verdict": pa.array(no_verdict),
        },
    )
    new = trees.set_column(trees.schema.get_field_index("nodes"), "nodes", new_nodes)
    ref = write_table(new, TREES, out / "trees.parquet")
    depth = numbers(field(nodes, "depth"), np.int64)[~no_verdict]
    reward, frac = reward[~no_verdict], frac[~no_verdict]  # statistics of the nodes with a verdict
    metrics = {
        "reward/mean": float(reward.mean()) if reward.size else 0.0,
        "reward/std": float(reward.std()) if reward.size else 0.0,
        f"reward/tests_{params.code_reward}/mean": float(reward.mean()) if reward.size else 0.0,
        "reward/pass_frac": float((frac == 1.0).mean()) if reward.size else 0.0,
        "reward/rerun_nodes": float(missing.size),
        "reward/sandbox_error_frac": float(no_verdict.mean()) if no_verdict.size else 0.0,
        "reward/sandbox_errors": float(no_verdict.sum()),
    }
    for d in np.unique(depth):
        metrics[f"reward/depth_{d}/pass_frac"] = float((frac[depth == d] == 1.0).mean())
    notes = [f"score params: {params.model_dump()}", *sandbox_error_notes(no_verdict, "tree nodes")]
    if no_tests.any():
        notes.append(f"{int(no_tests.sum())} nodes have no tests (tests_total 0): reward 0")
        log.warning(notes[-1])
    return StageOutput(stage="score", tables={"trees": ref}, metrics=metrics, notes=notes)


RUNNERS = {"trajectories": score_trajectories, "trees": score_trees}
