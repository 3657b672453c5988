"""``turntree prune``: drop the optimizer state of a run's superseded checkpoints, keeping everything a report,
an evaluation, ``turntree verify`` or a resume reads.

Every update writes a full checkpoint, and its ``trainer_state.pt`` (AdamW's two moments in fp32) is twice the
weights: SmolLM2-135M's 0.5 GB of weights come with 1.1 GB of optimizer state, so an 8-iteration run stores
~13 GB, of which only the latest checkpoint's optimizer state is ever read again (by the next update, when the run
is resumed or extended). Pruning rewrites every other update checkpoint's ``trainer_state.pt`` without the
optimizer moments (step, scheduler position, RNG and lineage stay) and marks it ``optimizer_pruned``; the weights
are untouched, so evaluations, comparisons and study reports read the same model.

The run store stays verified: each pruned checkpoint's recorded sha256 and size are rewritten, and so are the
content fingerprints of every stage version that read it, so a resumed run still reuses its stages. The new
records are written before the file is replaced (with a ``pruned`` entry naming the old and new sha256 and the
staged file), so a prune stopped between the two is finished by the next one. A run being written (its run lock
held) is refused, and a checkpoint that no longer matches its record is left alone and reported. An update
rerun from a pruned checkpoint is refused by the trainer (``stages.update.trainer``) rather than silently
restarting AdamW. ``--final`` prunes a completed run's latest checkpoint too: no update of the run reads it again.

``--weights`` (a completed run) also drops the *weights* of every update checkpoint but the latest (and the run's
``final_checkpoint``, which compare and MLflow name, when a later rerun is current), the 0.5 GB per
iteration that stays after the optimizer state is gone: their evaluations, trajectories, tables, MLflow curves and
every report or paired comparison built from them stay; what needs the weights themselves (evaluating that
iteration again, rerunning a stage that reads it, ``model=`` that directory) is refused in one line by
``runtime.checkpoint.check_checkpoint``, which finds the ``WEIGHTS_PRUNED.json`` left in their place. The same
crash-safe order holds: the new sha256 and size (of the directory without its weights, with the marker) are
recorded first, then the weight files removed and the marker written; a prune stopped between the two is
finished by the next one.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flows.history import parse_key
from flows.integrity import check_ref, content_sha256, content_size, is_local
from flows.locks import manifest_lock, run_lock
from flows.runstore import RunNotFound, RunStore
from runtime.tableio import sha256_file

TRAINER_STATE = "trainer_state.pt"  # runtime.checkpoint.TRAINER_STATE (not imported: it imports torch)
_STAGED = ".trainer_state.pruned.pt"  # beside the checkpoint directory, outside what its sha256 covers
WEIGHTS_PRUNED = "WEIGHTS_PRUNED.json"  # runtime.checkpoint.WEIGHTS_PRUNED
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")  # runtime.checkpoint's


@dataclass
class Pruned:
    run_id: str
    checkpoints: list[str] = field(default_factory=list)  # pruned now (or finished from an earlier prune)
    freed: int = 0  # bytes
    kept: str | None = None  # the latest checkpoint, whose optimizer state the next update reads
    skipped: list[str] = field(default_factory=list)  # "uri: why"

    weights: list[str] = field(default_factory=list)  # checkpoints whose weights went (``--weights``)
    weights_freed: int = 0

    def summary(self, dry_run: bool = False) -> str:
        verb = "would prune" if dry_run else "pruned"
        line = (
            f"{self.run_id}: {verb} the optimizer state of {len(self.checkpoints)} checkpoint(s), "
            f"{self.freed / 2**30:.1f} GiB"
        )
        if self.weights:
            line += f", and the weights of {len(self.weights)}, {self.weights_freed / 2**30:.1f} GiB"
        if self.kept:
            line += f"; kept {self.kept}"
        return "\n".join([line, *(f"  not pruned: {s}" for s in self.skipped)])


def _update_checkpoints(manifest: dict[str, Any]) -> tuple[list[tuple[str, str, dict]], tuple[str, str] | None]:
    """Every (stage key, version, checkpoint ref) of the run's updates, and the (key, version) to keep: the
    current version of the last iteration's update."""
    found, last = [], None
    for key, entry in manifest["stages"].items():
        stage, it = parse_key(key)
        if stage != "update":
            continue
        for version, record in entry.get("versions", {}).items():
            ref = record.get("output", {}).get("tables", {}).get("checkpoint")
            if ref:
                found.append((key, version, ref))
        if entry.get("current") and (last is None or it > parse_key(last[0])[1]):
            last = (key, entry["current"])
    return found, last


def _refingerprint(manifest: dict[str, Any], uri: str, old: str, new: str) -> None:
    """Every stage version that read ``uri`` with fingerprint ``old`` now names ``new`` (same weights)."""
    for entry in manifest["stages"].values():
        for record in entry.get("versions", {}).values():
            prints = record.get("fingerprints") or {}
            for name, read in (record.get("inputs") or {}).items():
                if read == uri and prints.get(name) == old[:16]:
                    prints[name] = new[:16]


def _swap_in(staged: Path, ckpt: Path) -> None:
    """Replace the checkpoint's trainer state with the slimmed one (atomic within the filesystem)."""
    os.replace(staged, ckpt / TRAINER_STATE)


def _mark_done(store: RunStore, uri: str) -> None:
    def done(manifest: dict[str, Any]) -> None:
        for item in manifest.get("pruned", []):
            if item["uri"] == uri:
                item["done"] = True

    with manifest_lock(store.root, store.run_id):
        store._read_modify_write(done)


def _finish_pending(store: RunStore, result: Pruned) -> None:
    """Complete prunes whose records were written but whose file was not yet replaced."""
    for item in store.load().get("pruned", []):
        if item.get("done"):
            continue
        ckpt = Path(item["uri"])
        if item.get("kind") == "weights":
            _drop_weights(ckpt, item)
        elif (staged := Path(item["staged"])).exists() and check_ref(str(ckpt), item["old_sha256"], None) is None:
            _swap_in(staged, ckpt)
        if check_ref(str(ckpt), item["new_sha256"], None) is not None:
            result.skipped.append(f"{ckpt}: an interrupted prune cannot be finished (run `turntree verify`)")
            continue
        _mark_done(store, item["uri"])
        if item.get("kind") == "weights":
            result.weights.append(str(ckpt))
            result.weights_freed += item["freed"]
        else:
            result.checkpoints.append(str(ckpt))


def _weight_files(ckpt: Path) -> list[Path]:
    return sorted({p for pat in WEIGHT_PATTERNS for p in ckpt.glob(pat) if p.is_file()})


def _drop_weights(ckpt: Path, item: dict[str, Any]) -> None:
    """Leave the marker recorded in ``item`` in place of the checkpoint's weight files (idempotent). The files go
    first: on a full disk the marker may not fit until they are gone."""
    for name in item["files"]:
        (ckpt / name).unlink(missing_ok=True)
    marker = ckpt / WEIGHTS_PRUNED
    if not marker.is_file() or marker.read_text() != item["marker"]:
        tmp = ckpt.parent / f".{ckpt.name}.{WEIGHTS_PRUNED}"  # outside what the directory's sha256 covers
        tmp.write_text(item["marker"])
        os.replace(tmp, marker)


def _prune_weights(store: RunStore, key: str, version: str, ref: dict[str, Any], result: Pruned, dry_run: bool) -> None:
    """Record, then drop, the weights of one superseded update checkpoint (module docstring)."""
    ckpt = Path(ref["uri"])
    files = _weight_files(ckpt)
    if not files or (ckpt / WEIGHTS_PRUNED).exists():
        return
    if why := check_ref(str(ckpt), ref["sha256"], ref.get("size")):
        result.skipped.append(f"{ckpt}: {why}, not what the manifest recorded (run `turntree verify`)")
        return
    sizes = {f.relative_to(ckpt).as_posix(): f.stat().st_size for f in files}
    freed = sum(sizes.values())
    if dry_run:
        result.weights.append(str(ckpt))
        result.weights_freed += freed
        return
    marker = json.dumps(
        {"pruned_by": "turntree prune --weights", "run": store.run_id, "stage": key, "version": version,
         "old_sha256": ref["sha256"], "removed": sizes}, indent=1, sort_keys=True,
    ) + "\n"  # fmt: skip
    as_it_will_be = {**dict.fromkeys(sizes), WEIGHTS_PRUNED: hashlib.sha256(marker.encode()).hexdigest()}
    new = content_sha256(str(ckpt), as_it_will_be)
    size = ref["size"] - freed + len(marker.encode()) if ref.get("size") is not None else None
    item = {
        "uri": str(ckpt), "stage": key, "version": version, "kind": "weights", "old_sha256": ref["sha256"],
        "new_sha256": new, "files": sorted(sizes), "marker": marker, "freed": freed, "at": time.time(),
        "done": False,
    }  # fmt: skip

    def record(manifest: dict[str, Any]) -> None:
        out = manifest["stages"][key]["versions"][version]["output"]["tables"]["checkpoint"]
        out["sha256"], out["size"] = item["new_sha256"], size
        _refingerprint(manifest, item["uri"], item["old_sha256"], item["new_sha256"])
        manifest.setdefault("pruned", []).append(item)

    with manifest_lock(store.root, store.run_id):
        store._read_modify_write(record)
    _drop_weights(ckpt, item)
    if why := check_ref(str(ckpt), item["new_sha256"], size):
        result.skipped.append(f"{ckpt}: after pruning its weights, {why}, not what was recorded (`turntree verify`)")
        return
    _mark_done(store, str(ckpt))
    result.weights.append(str(ckpt))
    result.weights_freed += freed


def _state(ckpt: Path) -> dict[str, Any] | None:
    """``ckpt``'s trainer state (memory-mapped: cheap) when it still holds optimizer moments, else None."""
    import torch

    if not (ckpt / TRAINER_STATE).is_file():
        return None
    state = torch.load(ckpt / TRAINER_STATE, map_location="cpu", weights_only=True, mmap=True)
    return state if isinstance(state, dict) and state.get("optimizer") is not None else None


def _slim(state: dict[str, Any], staged: Path) -> None:
    """Write the trainer state without the optimizer moments (and marked so) to ``staged``."""
    import torch

    torch.save({**{k: v for k, v in state.items() if k != "optimizer"}, "optimizer_pruned": True}, staged)


def prune_run(
    root: str,
    run_id: str,
    *,
    dry_run: bool = False,
    before: int | None = None,
    final: bool = False,
    weights: bool = False,
    optimizer: bool = True,
) -> Pruned:
    """Prune the optimizer state of every update checkpoint of ``run_id`` but the latest (module docstring).

    ``before``: only those of iterations before it. ``final``: the latest's too, of a completed run (no update of it
    reads that any more; a new run continued from that checkpoint, ``model=`` it, is refused by the trainer). The
    run lock is re-entrant within a process, so the pipeline writing the run may call this (``prune_as_it_goes``).
    ``weights``: the weights of every update checkpoint but the latest and the run's ``final_checkpoint`` too, of
    a completed run (after the optimizer pass, so what is left to hash is small). ``optimizer`` False: no
    optimizer pass (a study that keeps its optimizer states but not its weights)."""
    if not is_local(root):
        raise ValueError(f"turntree prune works on a local run store; {root} is not one")
    store = RunStore(root, run_id)
    if not store.exists():
        raise RunNotFound(f"no run {run_id!r} under {root}")
    result = Pruned(run_id)
    with run_lock(root, run_id, wait=False):  # RunLocked (one line) while another process writes it
        if not dry_run:
            _finish_pending(store, result)
        manifest = store.load()
        if final and manifest.get("status") != "completed":
            raise ValueError(
                f"run {run_id!r} is {manifest.get('status')}, not completed: --final would take the optimizer state "
                "its next update continues from; prune without --final"
            )
        if weights and manifest.get("status") != "completed":
            raise ValueError(
                f"run {run_id!r} is {manifest.get('status')}, not completed: its stages may still read earlier "
                "checkpoints' weights; prune without --weights"
            )
        found, last = _update_checkpoints(manifest)
        if final:
            last = None
        for key, version, ref in sorted(found, key=lambda f: (parse_key(f[0])[1], f[1])) if optimizer else []:
            ckpt = Path(ref["uri"])
            if (key, version) == last:
                result.kept = str(ckpt)
                continue
            if before is not None and parse_key(key)[1] >= before:
                continue
            state = ckpt / TRAINER_STATE
            if (loaded := _state(ckpt)) is None:  # none, or already without moments
                continue
            if why := check_ref(str(ckpt), ref["sha256"], ref.get("size")):
                result.skipped.append(f"{ckpt}: {why}, not what the manifest recorded (run `turntree verify`)")
                continue
            staged = ckpt.parent / _STAGED
            if dry_run:
                result.checkpoints.append(str(ckpt))
                result.freed += state.stat().st_size  # about: the moments are nearly all of it
                continue
            _slim(loaded, staged)
            del loaded  # the memory map of the file about to be replaced
            freed = state.stat().st_size - staged.stat().st_size
            new = content_sha256(str(ckpt), {TRAINER_STATE: sha256_file(staged)})
            size = ref["size"] - freed if ref.get("size") is not None else None
            item = {
                "uri": str(ckpt), "stage": key, "version": version, "old_sha256": ref["sha256"],
                "new_sha256": new, "staged": str(staged), "freed": freed, "at": time.time(), "done": False,
            }  # fmt: skip

            def record(manifest: dict[str, Any], key=key, version=version, item=item, size=size) -> None:
                out = manifest["stages"][key]["versions"][version]["output"]["tables"]["checkpoint"]
                out["sha256"], out["size"] = item["new_sha256"], size
                _refingerprint(manifest, item["uri"], item["old_sha256"], item["new_sha256"])
                manifest.setdefault("pruned", []).append(item)

            with manifest_lock(root, run_id):
                store._read_modify_write(record)
            _swap_in(staged, ckpt)
            if content_size(str(ckpt)) != size:
                result.skipped.append(f"{ckpt}: its size after pruning differs from the recorded one")
                continue
            _mark_done(store, str(ckpt))
            result.checkpoints.append(str(ckpt))
            result.freed += freed
        if weights:  # after the optimizer pass: what is left to hash is then small
            manifest = store.load()
            found, last = _update_checkpoints(manifest)
            final_ckpt = manifest.get("final_checkpoint")  # what compare / MLflow name (a later rerun may not be it)
            for key, version, ref in sorted(found, key=lambda f: (parse_key(f[0])[1], f[1])):
                if (key, version) != last and ref["uri"] != final_ckpt and (before is None or parse_key(key)[1] < before):
                    _prune_weights(store, key, version, ref, result, dry_run)
    return result


def prune_as_it_goes(root: str, run_id: str, log: Any, before: int | None = None) -> None:
    """``prune_optimizer_states``: called by the pipeline (which holds the run lock) as iteration k ends, with
    ``before`` = k - max_staleness, and once more when the run ends, with None. When iteration k ends every stage
    that read an update checkpoint before k has finished, but for the rollout running ahead under
    ``max_staleness``, which reads one a version older than the latest (so up to max_staleness of them stay whole
    until the next iteration ends); the latest update's, which the next update continues, is always kept. A run
    store that is not local, or a prune that fails, costs disk space, never the run: it is logged."""
    if not is_local(root):
        return
    try:
        result = prune_run(root, run_id, before=before)
    except Exception as e:  # noqa: BLE001 - disk space is not worth a run
        log.warning("run %s: superseded optimizer states not pruned: %s", run_id, e)
        return
    if result.checkpoints or result.skipped:
        log.info(result.summary())
