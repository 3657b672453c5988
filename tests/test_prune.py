"""`turntree prune` on a real two-iteration tiny run (one ephemeral Prefect server, ~2-3 min on 2 cores): a
dry run changes nothing; a study cell (``flows.study.run_cell``) prunes its superseded checkpoint's optimizer
moments and keeps the latest whole, the weights byte-identical; the run still verifies and a rerun reuses every
stage; an update rerun from a pruned checkpoint is refused in one line, and one from the rerun of the update
that wrote it is not; a prune stopped between its manifest write and its file replacement is finished by the
next one; ``--final`` takes a completed run's latest state too and refuses any other run; ``--weights`` takes
the superseded checkpoints' weights of a completed run (same checks); a run whose lock is held is refused. And ``prune_optimizer_states`` (two 3–4-iteration tiny runs, one
sequential, one asynchronous): the pipeline prunes as each iteration ends."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from flows import prune
from flows.cli import main
from flows.runstore import RunStore
from schemas.params import PipelineParams
from schemas.params.presets import tiny_pipeline

REPO = Path(__file__).resolve().parents[1]


def _versions(store: RunStore) -> dict[str, str]:
    return {k: ",".join(sorted(e["versions"])) + ":" + e["current"] for k, e in store.load()["stages"].items()}


def _state(ckpt: str) -> dict:
    return torch.load(Path(ckpt) / "trainer_state.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("staleness, every", [(0, 1), (1, 3)])
def test_a_run_that_prunes_as_it_goes_keeps_the_latest_state_whole_and_stays_verified(
    tiny_model, tmp_path, staleness, every
):
    """``prune_optimizer_states``: a checkpoint's optimizer state is dropped once no stage can read it (before
    the run ends in the sequential run; under max_staleness the rollout running ahead reads one older than the
    latest, which stays whole until a later iteration ends; with ``every`` 3 iterations end with and without an
    evaluation running beside the next), the latest stays whole, the manifest records no new parameter (the run
    resumes whether or not it prunes) and a rerun reuses every stage (every reader's fingerprint was rewritten)."""
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline

    root, n = tmp_path / "runs", 3 + staleness
    body = tiny_pipeline(
        str(tiny_model), str(root), iterations=n, run_id=f"as-it-goes-{staleness}", max_staleness=staleness,
        evaluate_every=every, eval={"max_problems": 1, "iterations": 1},
    )  # fmt: skip
    params = PipelineParams.model_validate({**body, "prune_optimizer_states": True})
    with prefect_test_harness(server_startup_timeout=180):
        rid = pipeline(params)["run_id"]
        store = RunStore(str(root), rid)
        manifest = store.load()
        ckpts = [store.current_output("update", k).uri("checkpoint") for k in range(1, n + 1)]
        assert [p["uri"] for p in manifest["pruned"]] == ckpts[:-1] and all(p["done"] for p in manifest["pruned"])
        assert all("optimizer" not in _state(c) for c in ckpts[:-1]) and _state(ckpts[-1])["optimizer"]["state"]
        if staleness == 0:  # iteration 1's went when iteration 2 ended, before iteration 3 generated
            third = manifest["stages"]["iter-3/rollout"]
            assert manifest["pruned"][0]["at"] < third["versions"][third["current"]]["finished_at"]
        assert "prune_optimizer_states" not in manifest["params"]
        assert main(["verify", rid, "--root", str(root)]) == 0
        before = _versions(store)
        pipeline(params.model_copy(update={"prune_optimizer_states": False}))  # the same run: resumes
        assert _versions(store) == before


@pytest.mark.slow
def test_prune_keeps_the_run_verified_reusable_and_refuses_what_it_cannot_continue(
    tiny_model, tmp_path, monkeypatch, capsys
):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.pipeline import pipeline
    from flows.study import run_cell

    root = tmp_path / "runs"
    params = PipelineParams.model_validate(
        tiny_pipeline(
            str(tiny_model), str(root), iterations=2, run_id="pruned", eval={"max_problems": 1, "iterations": 1}
        )
    )
    with prefect_test_harness(server_startup_timeout=180):
        rid = pipeline(params)["run_id"]
        store = RunStore(str(root), rid)
        first, last = (store.current_output("update", k).uri("checkpoint") for k in (1, 2))
        weights = (Path(first) / "model.safetensors").read_bytes()
        moments = _state(first)["optimizer"]
        assert moments["state"]  # AdamW's moments are stored

        # a dry run says what it would free and changes nothing
        manifest = (root / rid / "manifest.json").read_bytes()
        capsys.readouterr()
        assert main(["prune", rid, "--root", str(root), "--dry-run"]) == 0
        assert f"{rid}: would prune the optimizer state of 1 checkpoint(s)" in capsys.readouterr().out
        assert (root / rid / "manifest.json").read_bytes() == manifest and "optimizer" in _state(first)

        # a study cell: the pipeline resumes (reuses everything), then prunes all but the latest checkpoint
        before = _versions(store)
        got = flow(lambda: run_cell(params))()
        assert got["completed"] and _versions(store) == before
        pruned, kept = _state(first), _state(last)
        assert "optimizer" not in pruned and pruned["optimizer_pruned"] is True
        assert pruned["step"] > 0 and "scheduler" in pruned and "rng" in pruned  # its position is kept
        assert kept["optimizer"]["state"] and "optimizer_pruned" not in kept
        assert (Path(first) / "model.safetensors").read_bytes() == weights
        assert [p["uri"] for p in store.load()["pruned"]] == [first] and store.load()["pruned"][0]["done"]

        capsys.readouterr()
        assert main(["runs", rid, "--root", str(root)]) == 0
        lines = {ln.split()[0]: ln for ln in capsys.readouterr().out.splitlines()}
        assert "optimizer state pruned: v1" in lines["iter-1/update"]
        assert "pruned" not in lines["iter-2/update"]

        # still verified, and a rerun reuses every stage (the readers' fingerprints were rewritten)
        assert main(["verify", rid, "--root", str(root)]) == 0
        pipeline(params)
        assert _versions(store) == before

        # the next update cannot continue AdamW from the pruned checkpoint: one line, before Prefect starts
        capsys.readouterr()
        assert main(["stage", "update", "--run", rid, "--root", str(root), "--iter", "2"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "optimizer state pruned" in err
        assert f"turntree stage update --run {rid} --iter 1" in err
        assert _versions(store) == before
        # and the trainer itself refuses to continue from it (any other way of starting an update there)
        from runtime.checkpoint import CheckpointError
        from schemas.params.update import UpdateParams
        from stages.update.trainer import Trainer

        with pytest.raises(CheckpointError, match="optimizer state was pruned"):
            Trainer(first, UpdateParams(device="cpu"))
        Trainer(last, UpdateParams(device="cpu"))  # the kept checkpoint continues AdamW

        # rerunning the update that wrote it (from the warm start) gives a new iteration-1 checkpoint, whole
        assert main(["stage", "update", "--run", rid, "--root", str(root), "--iter", "1"]) == 0
        rerun = store.current_output("update", 1).uri("checkpoint")
        assert rerun != first and _state(rerun)["optimizer"]["state"]

        # a prune stopped after its manifest write: verify names the checkpoint, the next prune finishes it
        def gone(*_):
            raise OSError("disk gone")

        with monkeypatch.context() as m:
            m.setattr(prune, "_swap_in", gone)
            with pytest.raises(OSError, match="disk gone"):
                prune.prune_run(str(root), rid)
        capsys.readouterr()
        assert main(["verify", rid, "--root", str(root)]) == 1
        assert rerun in capsys.readouterr().out
        capsys.readouterr()
        assert main(["prune", rid, "--root", str(root)]) == 0
        out = capsys.readouterr().out
        assert "pruned the optimizer state of 1 checkpoint(s)" in out and f"kept {last}" in out
        assert "optimizer" not in _state(rerun) and main(["verify", rid, "--root", str(root)]) == 0
        assert main(["stage", "update", "--run", rid, "--root", str(root), "--iter", "2"]) == 2

        # nothing left to prune: a second prune frees nothing
        capsys.readouterr()
        assert main(["prune", rid, "--root", str(root)]) == 0
        assert "of 0 checkpoint(s), 0.0 GiB" in capsys.readouterr().out

        # --final: a completed run's latest state goes too (still verified; nothing can continue AdamW from it);
        # a run that did not complete keeps it, refused in one line
        store.update(status="failed")
        capsys.readouterr()
        assert main(["prune", rid, "--root", str(root), "--final"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "not completed" in err and _state(last)["optimizer"]["state"]
        store.update(status="completed")
        assert main(["prune", rid, "--root", str(root), "--final"]) == 0
        assert "pruned the optimizer state of 1 checkpoint(s)" in capsys.readouterr().out
        assert "optimizer" not in _state(last) and main(["verify", rid, "--root", str(root)]) == 0
        with pytest.raises(CheckpointError, match="optimizer state was pruned"):
            Trainer(last, UpdateParams(device="cpu"))

        # --weights: a completed run's superseded weights go (the final checkpoint's stay, byte-identical) and it
        # still verifies; what needs them is refused in one line; a run that did not complete is refused; a prune
        # stopped between its manifest write and the files' removal is finished by the next one
        from runtime.checkpoint import load_model

        final_weights = (Path(last) / "model.safetensors").read_bytes()
        store.update(status="failed")
        assert main(["prune", rid, "--root", str(root), "--weights"]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "not completed" in err and (Path(first) / "model.safetensors").is_file()
        store.update(status="completed")
        with monkeypatch.context() as m:
            m.setattr(prune, "_drop_weights", gone)
            with pytest.raises(OSError, match="disk gone"):
                prune.prune_run(str(root), rid, weights=True)
        capsys.readouterr()
        main(["verify", rid, "--root", str(root)])  # a superseded version: named in a note, not fatal
        assert (Path(first) / "model.safetensors").is_file() and first in capsys.readouterr().out
        assert main(["prune", rid, "--root", str(root), "--weights", "--dry-run"]) == 0
        assert "would prune the optimizer state of 0 checkpoint(s), 0.0 GiB, and the weights of 1" in capsys.readouterr().out
        assert main(["prune", rid, "--root", str(root), "--weights"]) == 0
        assert "and the weights of 2" in capsys.readouterr().out  # the interrupted one and the rerun's
        for ckpt in (first, rerun):
            assert not list(Path(ckpt).glob("*.safetensors")) and (Path(ckpt) / "WEIGHTS_PRUNED.json").is_file()
            with pytest.raises(CheckpointError, match="prune --weights"):
                load_model(ckpt)
        assert (Path(last) / "model.safetensors").read_bytes() == final_weights
        capsys.readouterr()
        assert main(["verify", rid, "--root", str(root)]) == 0
        assert first not in capsys.readouterr().out  # the superseded version's new record matches too
        assert main(["eval", "--checkpoint", first, "--root", str(root)]) == 2
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "prune --weights" in err
        assert main(["prune", rid, "--root", str(root), "--weights"]) == 0  # nothing left: frees nothing
        assert "weights of" not in capsys.readouterr().out

    # a run being written (its lock held by another process) is refused in one line, untouched
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from flows.locks import run_lock\n"
         f"with run_lock({str(root)!r}, {rid!r}):\n print('held', flush=True); time.sleep(60)"],
        cwd=REPO, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        manifest = json.loads((root / rid / "manifest.json").read_text())
        capsys.readouterr()
        assert main(["prune", rid, "--root", str(root)]) == 2
        assert str(holder.pid) in capsys.readouterr().err
        assert json.loads((root / rid / "manifest.json").read_text()) == manifest
    finally:
        holder.kill()
    assert main(["prune", "no-such-run", "--root", str(root)]) == 2



def test_pruning_as_it_goes_never_fails_the_run(tmp_path, monkeypatch, caplog):
    """A prune that fails (here: the run vanished under it) costs disk space, never the run: one warning naming
    the run; a run store that is not local is skipped without a word."""
    import logging

    log = logging.getLogger("turntree.test")
    with caplog.at_level(logging.INFO, logger="turntree.test"):
        prune.prune_as_it_goes(str(tmp_path), "gone", log, before=3)
    (record,) = caplog.records
    assert record.levelno == logging.WARNING and "gone" in record.getMessage() and "not pruned" in record.getMessage()

    def boom(*a, **kw):
        raise AssertionError("a non-local run store must not be pruned")

    monkeypatch.setattr(prune, "prune_run", boom)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="turntree.test"):
        prune.prune_as_it_goes("s3://bucket/runs", "r", log)
    assert not caplog.records


def test_pruning_weights_records_the_hash_verify_computes_and_keeps_the_final_checkpoint(tmp_path):
    """``--weights`` on a hand-made completed run of three update checkpoints: the recorded sha256 of a checkpoint
    whose files sort differently as paths and as strings (``lora/…`` before ``lora.json``) is the one
    ``content_sha256`` computes after the drop; the run's ``final_checkpoint`` (a later rerun is current) and the
    latest keep their weights; a reader's fingerprint follows."""
    from flows.integrity import check_ref, content_sha256, content_size

    root, store = tmp_path / "runs", RunStore(str(tmp_path / "runs"), "hand")
    ckpts, stages = [], {}
    for k in (1, 2, 3):
        d = root / "hand" / f"iter-{k}" / "update" / "v1" / "checkpoint"
        (d / "lora").mkdir(parents=True)
        for name, body in [("model.safetensors", f"weights {k}" * 1000), ("lora.json", "{}"), ("config.json", "{}"),
                           ("lora/adapter_config.json", "{}"), ("a-b.txt", "x")]:  # fmt: skip
            (d / name).write_text(body)
        ckpts.append(str(d))
        ref = {"uri": str(d), "sha256": content_sha256(str(d)), "size": content_size(str(d))}
        stages[f"iter-{k}/update"] = {"current": "v1", "versions": {"v1": {"output": {"tables": {"checkpoint": ref}}}}}
    reader = {"inputs": {"checkpoint": ckpts[0]}, "fingerprints": {"checkpoint": stages["iter-1/update"]["versions"]["v1"]["output"]["tables"]["checkpoint"]["sha256"][:16]}}  # fmt: skip
    stages["iter-2/rollout"] = {"current": "v1", "versions": {"v1": reader}}
    store.save({"run_id": "hand", "status": "completed", "final_checkpoint": ckpts[1], "stages": stages})

    got = prune.prune_run(str(root), "hand", weights=True)
    assert got.weights == [ckpts[0]] and not got.skipped
    manifest = store.load()
    ref = manifest["stages"]["iter-1/update"]["versions"]["v1"]["output"]["tables"]["checkpoint"]
    assert check_ref(ckpts[0], ref["sha256"], ref["size"]) is None  # what verify computes
    assert manifest["stages"]["iter-2/rollout"]["versions"]["v1"]["fingerprints"]["checkpoint"] == ref["sha256"][:16]
    assert not (Path(ckpts[0]) / "model.safetensors").exists() and (Path(ckpts[0]) / "lora.json").is_file()
    assert all((Path(c) / "model.safetensors").is_file() for c in ckpts[1:])
