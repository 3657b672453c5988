"""The `turntree` CLI: fast help, config parsing, one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from flows.cli import UserError, load_config, main, parse_sets

REPO = Path(__file__).resolve().parents[1]


def test_help_imports_nothing_heavy():
    code = (
        "import sys, flows.cli as c\n"
        "try:\n    c.parser().parse_args(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'prefect', 'vllm', 'mlflow', 'transformers', 'pyarrow') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    assert "run" in res.stdout and "stage" in res.stdout


def test_parse_sets_nested_and_typed():
    assert parse_sets(["rollout.group_size=8", "algorithm=murphy", "data.sources=[a, b]", "x.y.z=true"]) == {
        "rollout": {"group_size": 8},
        "algorithm": "murphy",
        "data": {"sources": ["a", "b"]},
        "x": {"y": {"z": True}},
    }
    with pytest.raises(UserError, match="key=value"):
        parse_sets(["novalue"])


def test_config_file_merged_with_sets(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("algorithm: grpo\nrollout:\n  group_size: 2\n  max_turns: 2\n")
    assert load_config(str(cfg), ["rollout.group_size=6"]) == {
        "algorithm": "grpo",
        "rollout": {"group_size": 6, "max_turns": 2},
    }
    with pytest.raises(UserError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"), [])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "--set", "rollout.group_sz=3"], "rollout.group_sz: unknown parameter"),
        (
            ["run", "--set", "rollout.group_size=0"],
            "rollout.group_size: Input should be greater than or equal to 1",
        ),
        (["run", "--set", "algorithm=ppo"], "algorithm: Input should be 'grpo', 'gtpo' or 'murphy'"),
        (["stage", "score", "--run", "no-such-run"], "no run 'no-such-run'"),
        (["stage", "bogus", "--run", "x"], "unknown stage 'bogus'"),
        (["eval", "--checkpoint", "/no/such/ckpt"], "checkpoint /no/such/ckpt does not exist"),
        (["eval", "--model", "tiny", "--benchmark", "no_such"], "unknown benchmark 'no_such'"),
        (["eval", "--model", "tiny", "--benchmark", "synthetic:nope"], "unknown synthetic family 'nope'"),
        (["compare", "a=tiny", "--benchmark", "no_such"], "unknown benchmark 'no_such'"),
    ],
)
def test_bad_input_is_one_line_exit_2(argv, message, tmp_path, capsys):
    assert main([*argv, "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_runs_lists_nothing_then_something(tmp_path, capsys):
    assert main(["runs", "--root", str(tmp_path)]) == 0
    assert "no runs" in capsys.readouterr().out
    from flows.runstore import RunStore

    RunStore(str(tmp_path), "gtpo-abc").create_or_open({"algorithm": "gtpo"})
    assert main(["runs", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "gtpo-abc" in out and "created" in out


def test_stage_rerun_looks_where_the_pipeline_stores_each_stage(tmp_path, capsys):
    """data has no iteration, warm start is iteration 0, the rest are per iteration (--iter)."""
    from flows.runstore import RunStore

    RunStore(str(tmp_path), "r").create_or_open({})
    for argv, key in (
        (["stage", "warmstart", "--run", "r"], "iter-0/warmstart"),
        (["stage", "data", "--run", "r", "--iter", "3"], "'data'"),
        (["stage", "score", "--run", "r", "--iter", "2"], "iter-2/score"),
    ):
        assert main([*argv, "--root", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert f"has no stage {key}" in err or f"has no stage '{key}'" in err, err
