"""Nothing stale, raced or silently wrong in the run store: recorded sha256/size checked before reuse and before a
read, stage code hashed with what it imports, one writer per run, scratch dirs removed only when their owner is
dead, bad input refused before any work starts."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flows import integrity
from flows.cli import main
from flows.integrity import IntegrityError, code_hash, content_sha256
from flows.locks import RunLocked, run_lock
from flows.runner import check_inputs
from flows.runstore import RunStore
from runtime.tableio import write_table
from schemas import tables
from schemas.outputs import StageOutput
from tests.test_runstore import ROW

REPO = Path(__file__).resolve().parents[1]


def _commit(store: RunStore, prompt: str, iteration=1) -> StageOutput:
    scratch = store.scratch_dir("data", iteration)
    ref = write_table([{**ROW, "prompt": prompt}], tables.PROBLEMS, scratch / "problems.parquet")
    out = StageOutput(stage="data", tables={"problems": ref})
    return store.commit("data", iteration, scratch, out, inputs={}, params={"p": prompt}, params_field="data")


def test_truncated_or_altered_output_is_not_reused_and_verify_names_it(tmp_path, capsys):
    store = RunStore(str(tmp_path), "r")
    store.create_or_open({})
    out = _commit(store, "a")
    ref = store.current_output("data", 1).tables["problems"]
    assert ref.size == os.path.getsize(ref.uri)  # the size is recorded on commit
    assert store.find_completed("data", 1, {}, {"p": "a"}) is not None
    assert main(["verify", "r", "--root", str(tmp_path)]) == 0
    capsys.readouterr()

    good = Path(ref.uri).read_bytes()
    Path(ref.uri).write_bytes(good[: len(good) // 2])  # truncated
    assert store.find_completed("data", 1, {}, {"p": "a"}) is None
    assert main(["verify", "r", "--root", str(tmp_path)]) == 1
    (line,) = capsys.readouterr().out.splitlines()
    assert ref.uri in line and "recorded" in line and "turntree stage data --run r --iter 1" in line

    write_table([{**ROW, "prompt": "b"}], tables.PROBLEMS, ref.uri)  # valid table, other content
    assert store.find_completed("data", 1, {}, {"p": "a"}) is None
    with pytest.raises(IntegrityError, match="rewrite it with `turntree stage data --run r --iter 1"):
        check_inputs(store, {"problems": out.uri("problems")})  # a stage never reads it


def test_content_hash_of_a_directory_matches_the_checkpoint_writer(tiny_model):
    from runtime.checkpoint import directory_sha256

    assert content_sha256(str(tiny_model)) == directory_sha256(tiny_model)


def test_code_hash_follows_transitive_imports(tmp_path, monkeypatch):
    """An edit of a module the stage imports (here maths.eval_metrics under stages.evaluate) changes the
    stage's code hash; an edit elsewhere does not."""
    for pkg in integrity.PACKAGES:
        shutil.copytree(REPO / pkg, tmp_path / pkg, ignore=shutil.ignore_patterns("*.gz", "__pycache__"))
    monkeypatch.setattr(integrity, "REPO", tmp_path)
    assert "maths.eval_metrics" in integrity.code_closure("stages.evaluate")
    before = {m: code_hash(m) for m in ("stages.evaluate", "stages.update", "stages.score")}
    with open(tmp_path / "maths" / "eval_metrics.py", "a") as f:
        f.write("\n# edited\n")
    after = {m: code_hash(m) for m in before}
    assert after["stages.evaluate"] != before["stages.evaluate"]
    assert after["stages.update"] == before["stages.update"]
    with open(tmp_path / "stages" / "score.py", "a") as f:
        f.write("\n# edited\n")
    assert code_hash("stages.score") != before["stages.score"]


_COMMITTER = """
import sys
from flows.runstore import RunStore
from tests.test_run_integrity import _commit
store = RunStore(sys.argv[1], "race")
for i in range(int(sys.argv[2])):
    _commit(store, f"{sys.argv[3]}{i}")
"""


def test_two_processes_committing_to_one_run_lose_nothing(tmp_path):
    store = RunStore(str(tmp_path), "race")
    store.create_or_open({})
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    n = 25
    procs = [
        subprocess.Popen([sys.executable, "-c", _COMMITTER, str(tmp_path), str(n), tag], env=env, cwd=REPO)
        for tag in ("a", "b")
    ]
    assert [p.wait(timeout=300) for p in procs] == [0, 0]
    versions = store.load()["stages"]["iter-1/data"]["versions"]
    dirs = {p.name for p in (tmp_path / "race" / "iter-1" / "data").iterdir() if not p.name.startswith(".")}
    assert len(versions) == 2 * n and set(versions) == dirs
    prompts = {v["params"]["p"] for v in versions.values()}
    assert prompts == {f"{t}{i}" for t in "ab" for i in range(n)}


def test_run_lock_refuses_a_second_writer_with_the_holders_pid(tmp_path):
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time\nfrom flows.locks import run_lock\n"
            f"with run_lock({str(tmp_path)!r}, 'r1'):\n    print('held', flush=True)\n    time.sleep(60)\n",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLocked, match=f"process {holder.pid}"):
            with run_lock(str(tmp_path), "r1"):
                pass
        with run_lock(str(tmp_path), "r2"):  # another run is not blocked
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_lock(str(tmp_path), "r1"):  # released when its holder died
        with run_lock(str(tmp_path), "r1"):  # re-entrant within a process
            pass


def test_scratch_dirs_are_removed_only_when_their_owner_is_dead(tmp_path):
    store = RunStore(str(tmp_path), "s")
    store.create_or_open({})
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stage = tmp_path / "s" / "iter-1" / "rollout"
    mine = store.scratch_dir("rollout", 1)
    other_live = stage / f".tmp-{os.getppid()}-abc123"
    orphan = stage / f".tmp-{dead.pid}-def456"
    for d in (other_live, orphan):
        d.mkdir(parents=True)
    assert store.clean_scratch() == 1
    assert mine.is_dir() and other_live.is_dir() and not orphan.exists()


# --- bad input: one line, exit 2, before Prefect starts, nothing left behind ------------------------------------
def _bad_cases(tmp_path: Path, tiny_model: Path) -> list[tuple[list[str], str]]:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    (tmp_path / "emptyckpt").mkdir()
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    model = f"model={tiny_model}"
    cases = [
        (["run", "--set", model, "--set", "data.sources=[nosuch]"], "unknown data source 'nosuch'"),
        (["run", "--set", model, "--set", f"data.sources=[{empty}]"], "is an empty file"),
        (["run", "--set", model, "--set", "data.sources=['synthetic:nope']"], "unknown synthetic family"),
        (["run", "--set", f"model={tmp_path / 'nomodel'}"], "does not exist"),
        (["run", "--set", f"model={no_weights}"], "has no weights"),
        (["run", "--set", model, "--set", "run_id=../x"], "invalid run id '../x'"),
        (["run", "--set", model, "--set", f"run_root={a_file / 'runs'}"], "is a file, not a directory"),
        (["eval", "--checkpoint", str(tmp_path / "emptyckpt")], "is not a model directory (no config.json)"),
        (["compare", "x=missing-run"], "no run 'missing-run'"),
        (["compare", f"x={tmp_path / 'nowhere'}"], "does not exist"),
    ]
    if os.geteuid() != 0:  # root writes anywhere
        readonly = tmp_path / "ro"
        readonly.mkdir(mode=0o500)
        cases.append((["run", "--set", model, "--set", f"run_root={readonly / 'runs'}"], "is not writable"))
    return cases


def test_bad_input_is_refused_before_any_work(tiny_model, tmp_path, capsys):
    import time

    root = tmp_path / "runs"
    for argv, message in _bad_cases(tmp_path, tiny_model):
        t = time.monotonic()
        assert main([*argv, "--root", str(root)]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, (argv, err)
        assert time.monotonic() - t < 5, argv  # no Prefect start-up
        assert not root.exists(), argv  # no run dir, no manifest, no MLflow store


def test_stage_refuses_bad_overrides_and_corrupt_inputs(tmp_path, capsys):
    store = RunStore(str(tmp_path), "r")
    store.create_or_open({})
    out = _commit(store, "a")
    entry = store.load()
    # a score version that read the data output: its rerun must check that input first
    entry["stages"]["iter-1/score"] = {
        "current": "v1",
        "versions": {
            "v1": {
                "inputs": {"problems": out.uri("problems")},
                "params": {},
                "output": {"stage": "s", "tables": {}},
            }
        },
    }
    store.save(entry)
    argv = ["stage", "score", "--run", "r", "--root", str(tmp_path)]
    assert main([*argv, "--set", "shaping_alpha=lots"]) == 2
    err = capsys.readouterr().err
    assert "bad parameters: score.shaping_alpha: " in err and err.count("\n") == 1
    # the same bad key gives the same one line from `run` and `stage`, in either spelling
    assert main([*argv, "--set", "score.shaping_alpha=lots"]) == 2
    assert capsys.readouterr().err == err
    assert main(["run", "--root", str(tmp_path / "other"), "--set", "score.shaping_alpha=lots"]) == 2
    assert capsys.readouterr().err == err
    assert main([*argv, "--set", "score.no_such=1"]) == 2
    unknown = capsys.readouterr().err
    assert unknown == "turntree: error: bad parameters: score.no_such: unknown parameter\n"
    assert main(["run", "--root", str(tmp_path / "other"), "--set", "score.no_such=1"]) == 2
    assert capsys.readouterr().err == unknown
    Path(out.uri("problems")).write_bytes(b"garbage")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert (
        out.uri("problems") in err and "turntree stage data --run r --iter 1" in err and err.count("\n") == 1
    )


def test_data_prepare_refuses_tests_that_do_not_parse(tmp_path, capsys):
    rows = [
        {"problem_id": "ok", "kind": "code", "prompt": "f", "test_format": "asserts", "entry_point": "f",
         "tests": ["assert f(1) == 1"]},
        {"problem_id": "broken", "kind": "code", "prompt": "g", "test_format": "asserts", "entry_point": "g",
         "tests": ["assert g(1) == (1"]},
    ]  # fmt: skip
    src = tmp_path / "p.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "broken" in err and "not valid Python" in err and "ok (" not in err
    assert main(["data", "prepare", str(src), "--out", str(tmp_path / "o2"), "--skip-bad"]) == 0
    assert "wrote 1 problems" in capsys.readouterr().out


def test_retries_only_on_transient_io_errors():
    import errno

    from flows.tasks import transient
    from stages.data import DataError

    assert transient(OSError(errno.EIO, "i/o error")) and transient(ConnectionResetError())
    for permanent in (
        DataError("unknown source"),
        ValueError("bad parameters"),
        KeyError("x"),
        FileNotFoundError("gone"),
        PermissionError("no"),
        OSError(errno.ENOSPC, "disk full"),
    ):
        assert not transient(permanent), permanent


def test_a_nested_override_on_a_rerun_keeps_the_other_recorded_entries():
    """`stage --set` goes through run's deep merge: one entry of a recorded dict changes, the others stay."""
    from flows.config import parse_sets
    from flows.runner import stage_params
    from schemas.params import ScoreParams

    recorded = ScoreParams(reward_weights={"math_answer": 1.0, "format": 0.5}, shaping_alpha=0.2)
    for spelling in ("reward_weights.math_answer=2", "score.reward_weights.math_answer=2"):
        p = stage_params("score", recorded.model_dump(mode="json"), parse_sets([spelling]))
        assert p.reward_weights == {"math_answer": 2.0, "format": 0.5} and p.shaping_alpha == 0.2, spelling
