"""Ray fan-out on a real local Ray cluster (``ray.init(num_cpus=2)`` in this process): the rollout's engine actors
(``rollout.workers``) write the table the in-process stage writes for the same seed, and sandbox batches run as
Ray tasks give the in-process results, hostile programs still contained by the bubblewrap sandbox. The checks
without a cluster (seeds, shards, bad input) run in the quick suite; the cluster ones are ``slow``."""

from __future__ import annotations

import os
import random

import pytest
from pydantic import ValidationError

from runtime.tableio import read_table, write_table
from schemas.params.rewards import ScoreParams
from schemas.params.rollout import RolloutParams
from schemas.tables import PROBLEMS, TRAJECTORIES, TREES
from stages.rollout.fanout import shard_problems
from stages.rollout.seeding import request_seeds

ray = pytest.importorskip("ray")


def problem_rows() -> list[dict]:
    base = {k: None for k in PROBLEMS.names}
    rows = []
    for i in range(3):
        rows.append({**base, "problem_id": f"m/{i}", "kind": "math", "prompt": f"What is {i + 2} * 7?",
                     "answer": str((i + 2) * 7), "source": "t", "test_format": "none", "split": "train"})  # fmt: skip
        rows.append({**base, "problem_id": f"c/{i}", "kind": "code", "entry_point": f"f{i}", "source": "t",
                     "prompt": f"Write a function f{i}(x) that returns x + {i}.", "test_format": "asserts",
                     "tests": [f"assert f{i}(1) == {1 + i}"], "split": "train"})  # fmt: skip
    # the same prompt under another id: its samples must stay in the shard of the first (seeding by rank)
    rows.append({**rows[0], "problem_id": "m/dup"})
    return rows


# --- without a cluster ---------------------------------------------------------------------------------------
def test_request_seeds_follow_the_request_not_the_batch():
    rng = random.Random(0)
    prompts_ = [[rng.randrange(100) for _ in range(rng.randrange(1, 9))] for _ in range(12)]
    prompts_ += [prompts_[3], prompts_[3]]  # identical requests: told apart by their rank
    seeds = request_seeds(7, prompts_)
    assert len(set(seeds)) == len(seeds)
    # any split that keeps identical prompts together (in order) gives each request the same seed
    first, second = [0, 1, 3, 5, 12, 13, 8], [2, 4, 6, 7, 9, 10, 11]
    split = dict(zip(first, request_seeds(7, [prompts_[i] for i in first]), strict=True))
    split |= dict(zip(second, request_seeds(7, [prompts_[i] for i in second]), strict=True))
    assert [split[i] for i in range(len(prompts_))] == seeds
    assert request_seeds(8, prompts_) != seeds  # the run's seed and iteration still matter


def test_shards_keep_equal_prompts_together_and_cover_every_problem():
    rows = problem_rows()
    for n in (1, 2, 3, 7, 50):
        shards = shard_problems(rows, n)
        assert sorted(i for s in shards for i in s) == list(range(len(rows)))
        assert 1 <= len(shards) <= n and all(shards)
        assert any(0 in s and len(rows) - 1 in s for s in shards)  # m/0 and m/dup share a shard
    assert [len(s) for s in shard_problems(rows, 2)] == [4, 3]


def test_shards_sample_like_the_whole_batch(tiny_engine):
    """In one process, on the real engine: the shards' trajectories are the whole batch's (a turn's seed is keyed
    by the trajectory's global index: each shard is told its problems' positions); without the positions they
    are not (why the fan-out passes them). Trees (request seeding) are compared with the actors' below."""
    from stages.rollout.shard import rollout_rows

    problems = [p for p in problem_rows() if p["kind"] == "math"]
    shards = shard_problems(problems, 2)
    assert len(shards) == 2 and shards[0] != list(range(len(shards[0])))  # the duplicate prompt moved up

    def rows(positions: bool) -> tuple[dict, dict]:
        params = RolloutParams(group_size=2, max_turns=2, max_new_tokens=8, seed=1)
        whole, _ = rollout_rows(tiny_engine, problems, params, 1, progress_stage=None)
        parts = [
            rollout_rows(
                tiny_engine, [problems[i] for i in s], params, 1, None, positions=s if positions else None
            )[0]
            for s in shards
        ]
        ids = lambda rs: {r["trajectory_id"]: r["turns"] for r in rs}  # noqa: E731
        return ids(whole), ids([r for part in parts for r in part])

    whole, split = rows(positions=True)
    assert whole == split and len(whole) == 2 * len(problems)
    first = {k: v[0]["completion_token_ids"] for k, v in whole.items()}
    assert first["it1/m/0/0"] != first["it1/m/0/1"] != first["it1/m/dup/0"]  # same prompt, other samples
    whole, split = rows(positions=False)
    assert whole != split


def test_bad_scale_out_settings_fail_in_one_line_before_any_work(tmp_path):
    for bad in ({"workers": 0}, {"workers": 2, "seeding": "batch"}, {"ray_address": " "},
                {"backend": "transformers", "tensor_parallel_size": 2}, {"worker_cpus": 0}):  # fmt: skip
        with pytest.raises(ValidationError):
            RolloutParams(**bad)
    from runtime.rayfan import RayUnavailable
    from stages.rollout import run

    if ray.is_initialized():
        ray.shutdown()
    params = RolloutParams(workers=2, ray_address="127.0.0.1:9")  # nothing listens on the discard port
    out = tmp_path / "out"
    with pytest.raises(RayUnavailable) as e:
        run(params, {"problems": str(tmp_path / "absent.parquet"), "checkpoint": "x"}, out)
    assert "127.0.0.1:9" in str(e.value) and "\n" not in str(e.value)
    assert not out.exists() and not ray.is_initialized()
    with pytest.raises(RayUnavailable, match="expected 'auto'"):
        run(RolloutParams(workers=2, ray_address="no-port"), {"problems": "x", "checkpoint": "x"}, out)


@pytest.mark.parametrize(
    "sets, message",
    [
        (
            ["rollout.workers=2", "rollout.ray_address=127.0.0.1:9"],
            "Ray cluster at '127.0.0.1:9' is not reachable",
        ),
        (["score.sandbox_ray=true", "rollout.ray_address=127.0.0.1:9"], "is not reachable"),
        (["rollout.workers=0"], "rollout.workers: Input should be greater than or equal to 1"),
        (["rollout.workers=2", "rollout.seeding=batch"], "cannot be split over workers > 1"),
    ],
)
def test_turntree_run_refuses_bad_scale_out_in_one_line(sets, message, tmp_path, capsys):
    from flows.cli import main

    argv = ["run", *[x for s in sets for x in ("--set", s)], "--root", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# --- on a local Ray cluster ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    from stages.rollout import fanout

    fanout.release()
    ray.shutdown()


HOSTILE = {
    "plain": "print(sum(range(10)))",
    "error": "raise ValueError('no')",
    "timeout": "while True:\n    pass",
    "pid": "import os\nprint(os.getpid(), os.getuid() != 0)",
    "fork_bomb": (
        "import os, time\nn = 0\ntry:\n    while True:\n        if os.fork() == 0:\n            time.sleep(30)\n"
        "            os._exit(0)\n        n += 1\nexcept OSError as e:\n    print('stopped by', type(e).__name__, n > 0)"
    ),
}


def _same(r) -> tuple:
    return (
        r.stdout,
        r.stderr,
        r.returncode,
        r.timed_out,
        r.memory_exceeded,
        r.truncated,
        r.isolation,
        r.error,
    )


@pytest.mark.scaleout
@pytest.mark.slow
def test_sandbox_batches_on_ray_tasks_match_in_process(cluster, tmp_path):
    from runtime.sandbox import RayBatches, execute_many, run_tests_many

    outside = tmp_path / "escaped.txt"
    codes = {**HOSTILE, "write_outside": f"open({str(outside)!r}, 'w').write('x')\nprint('wrote')"}
    names = list(codes)
    local = execute_many([codes[k] for k in names], timeout_s=3)
    remote = execute_many([codes[k] for k in names], timeout_s=3, pool=RayBatches(chunks=2))
    assert [_same(r) for r in remote] == [_same(r) for r in local]
    got = dict(zip(names, remote, strict=True))
    assert got["plain"].stdout == "45\n" and got["error"].returncode != 0 and got["timeout"].timed_out
    assert got["fork_bomb"].stdout.startswith("stopped by") and not got["fork_bomb"].timed_out
    assert not outside.exists()  # the write landed in the run's private filesystem, if anywhere
    if got["pid"].isolation == "bwrap":
        assert got["pid"].stdout.split()[1] == "True"  # never the Ray worker's root
    workers = remote.workers
    assert len(workers) == 2 and all(w["pid"] != os.getpid() for w in workers)
    assert {w["node_id"] for w in workers} == {n["NodeID"] for n in ray.nodes()}

    programs = ["def f(x):\n    return x + 1", "def f(x):\n    return x", "import os\nos._exit(3)"]
    tests = [["assert f(1) == 2", "assert f(0) == 1"]] * 3
    local_reports = run_tests_many(programs, tests)
    remote_reports = run_tests_many(programs, tests, pool=RayBatches())
    assert [(r.passed, r.total, r.results, r.tampered) for r in remote_reports] == [
        (r.passed, r.total, r.results, r.tampered) for r in local_reports
    ]
    assert [r.passed for r in remote_reports] == [2, 0, 0]


@pytest.mark.scaleout
@pytest.mark.slow
def test_score_stage_test_batches_on_ray_match_in_process(cluster, tmp_path, caplog):
    import logging

    from stages import score
    from tests.scored_tables import problem, trajectory, turn

    tests = ["assert add(1, 2) == 3", "assert add(0, 0) == 0"]
    programs = {
        "right": "def add(a, b):\n    return a + b\n",
        "half": "def add(a, b):\n    return 3\n",
        "tamper": "import os\nos.system('kill -9 -1')\ndef add(a, b):\n    return a + b\n",
        "escape": f"open({str(tmp_path / 'escaped')!r}, 'w').write('x')\ndef add(a, b):\n    return a + b\n",
        "spin": "while True:\n    pass\n",
    }
    rows = [
        trajectory(k, "add", "g", [turn([i + 1], code=code)], final_answer=code, idx=i)
        for i, (k, code) in enumerate(programs.items())
    ]
    write_table([problem("add", "code", tests=tests, entry_point="add")], PROBLEMS, tmp_path / "p.parquet")
    write_table(rows, TRAJECTORIES, tmp_path / "t.parquet")
    inputs = {"trajectories": str(tmp_path / "t.parquet"), "problems": str(tmp_path / "p.parquet")}
    local = score.run(ScoreParams(shaping=False, test_timeout_s=3), inputs, tmp_path / "local")
    with caplog.at_level(logging.INFO, logger="stages.score"):
        remote = score.run(
            ScoreParams(shaping=False, test_timeout_s=3, sandbox_ray=True), inputs, tmp_path / "r"
        )
    said = [r.getMessage() for r in caplog.records if "Ray tasks on workers" in r.getMessage()]
    assert said and "5 test runs as 2 Ray tasks" in said[0] and f", {os.getpid()})" not in said[0]
    a, b = (read_table(o.uri("trajectories"), TRAJECTORIES).to_pylist() for o in (local, remote))
    assert a == b
    rewards = {r["trajectory_id"]: r["reward"] for r in b}
    assert (rewards["right"], rewards["half"], rewards["spin"]) == (1.0, 0.5, 0.0)
    assert not (tmp_path / "escaped").exists()


def _rows(out, kind) -> list[dict]:
    return read_table(out.uri(kind), TRAJECTORIES if kind == "trajectories" else TREES).to_pylist()


def _split_logprobs(value, found: list):
    """``value`` with every list of log-probs taken out (into ``found``): compared with a tolerance."""
    if isinstance(value, dict):
        return {
            k: (found.append(v) or "lp") if "logprob" in k else _split_logprobs(v, found)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_split_logprobs(v, found) for v in value]
    return value


def _perturbed_copy(model_dir, dest):
    """A checkpoint of the same architecture with other weights (every float tensor scaled)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(model_dir, dest)
    for f in dest.glob("*.safetensors"):
        tensors = {k: (v * 1.5 if v.is_floating_point() else v) for k, v in load_file(str(f)).items()}
        save_file(tensors, str(f), metadata={"format": "pt"})
    return dest


@pytest.mark.scaleout
@pytest.mark.slow
def test_rollout_on_ray_engine_actors_matches_in_process(cluster, tiny_engine, tiny_model, tmp_path):
    """Both kinds on the tiny model, then the next iteration's checkpoint pushed into the same actors."""
    import numpy as np

    from stages.rollout import run

    src = write_table(problem_rows(), PROBLEMS, tmp_path / "problems.parquet")
    common = dict(group_size=2, child_group_size=2, max_turns=2, tree_depth=2, problems_per_iteration=20,
                  max_new_tokens=10, temperature=1.0, seed=5)  # fmt: skip

    def both(kind: str, checkpoint, tag: str):
        inputs = {"problems": src.uri, "checkpoint": str(checkpoint), "iteration": "2"}
        local = run(RolloutParams(kind=kind, seeding="request", **common), inputs, tmp_path / f"local-{tag}")
        fanned = run(RolloutParams(kind=kind, workers=2, worker_cpus=0.5, **common), inputs, tmp_path / tag)
        assert fanned.metrics["rollout/ray_workers"] == 2.0
        shard_notes = [n for n in fanned.notes if n.startswith("rollout shard")]
        pids = {int(n.split(" pid ")[1].split()[0]) for n in shard_notes}
        assert len(pids) == 2 and os.getpid() not in pids
        a_lp, b_lp = [], []
        a, b = _split_logprobs(_rows(local, kind), a_lp), _split_logprobs(_rows(fanned, kind), b_lp)
        assert a == b  # ids, token ids, texts, stop reasons, tree shapes: exactly
        np.testing.assert_allclose(np.concatenate(a_lp), np.concatenate(b_lp), atol=1e-4)
        assert fanned.metrics["rollout/tokens"] == local.metrics["rollout/tokens"]
        return _rows(fanned, kind), pids

    tables = {kind: both(kind, tiny_model, kind) for kind in ("trajectories", "trees")}
    # every tree node was graded in the sandbox (in the actors too: the tables are equal)
    assert all(n["tests_total"] == 1 and n["exec_result"] for t in tables["trees"][0] for n in t["nodes"])
    groups = {}
    for r in tables["trajectories"][0]:
        groups.setdefault(r["group_id"], []).append(r["turns"][0]["completion_token_ids"])
    assert all(g[0] != g[1] for g in groups.values())  # samples of a group differ (seeded by rank)

    # the next iteration: new weights pushed into the live engines, the actors' as this process's
    newer = _perturbed_copy(tiny_model, tmp_path / "newer")
    try:
        rows, pids = both("trajectories", newer, "newer")
    finally:
        tiny_engine.update_weights(tiny_model)  # the session engine serves the tiny model again
    assert pids == tables["trajectories"][1]  # the same actors
    assert rows != tables["trajectories"][0]
