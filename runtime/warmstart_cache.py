"""A machine-wide cache of warm-started checkpoints, so runs that start from the same model, problems and warm
start parameters (e.g. every ``make run`` with other RL settings) pay for the supervised fine-tune once.

Key: sha256 of the starting checkpoint's files, of the problems table's bytes, of the parameters (``enabled`` and
``cache`` left out), of the device and dtype they resolve to on this machine (``dtype="auto"`` is bf16 on a CPU
with native bf16 matmuls, fp32 on one without) and of the warm-start stage's source. Entry:
``<cache>/warmstart/<key>/checkpoint`` plus ``output.json`` (the metrics and notes of the run that made it).
Entries are written to a temporary directory and renamed into place, so a killed run never leaves a half entry;
a hit is copied into the stage's output directory (hard links when possible: checkpoints are never modified in
place) and verified against the entry's recorded hash. Runs that need the same key at the same time (a study's
cells running concurrently) take turns on ``<key>.lock``: one trains, the others then find its entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from runtime.checkpoint import directory_ref, directory_sha256
from runtime.devices import resolve_device
from runtime.tableio import sha256_file
from schemas.outputs import StageOutput

log = logging.getLogger(__name__)


def cache_root() -> Path:
    """``$TURNTREE_WARMSTART_CACHE``, else ``$TURNTREE_CACHE/warmstart`` (default ``~/.cache/turntree``)."""
    if os.environ.get("TURNTREE_WARMSTART_CACHE"):
        return Path(os.environ["TURNTREE_WARMSTART_CACHE"])
    return Path(os.environ.get("TURNTREE_CACHE", Path.home() / ".cache" / "turntree")) / "warmstart"


def cache_key(params, inputs: dict[str, str], code: str) -> str:
    body = {
        "checkpoint": directory_sha256(inputs["checkpoint"]),
        "problems": sha256_file(inputs["problems"]),
        "params": params.model_dump(mode="json", exclude={"enabled", "cache"}),
        "compute": [str(x) for x in resolve_device(params.device, params.dtype)],
        "code": hashlib.sha256(code.encode()).hexdigest(),
    }
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:24]


def _copy_tree(src: Path, dst: Path) -> None:
    try:
        shutil.copytree(src, dst, copy_function=os.link)
    except OSError:  # another filesystem: a real copy
        shutil.rmtree(dst, ignore_errors=True)
        shutil.copytree(src, dst)


@contextmanager
def _one_at_a_time(entry: Path) -> Iterator[None]:
    """Hold ``<entry>.lock`` (flock; released when the process dies): one process trains a key, the others wait
    for its entry. A cache this process cannot write is used without the lock."""
    import fcntl

    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        f = open(entry.parent / f".{entry.name}.lock", "a")  # closed by the with below
    except OSError:
        yield
        return
    with f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def cached_run(
    params, inputs: dict[str, str], out: Path, train: Callable[..., StageOutput], code: str
) -> StageOutput:
    """The warm start's output from the cache, or ``train(params, inputs, out)`` stored into the cache.
    ``code``: the source of the stage that trains (part of the key)."""
    t0 = time.perf_counter()
    key = cache_key(params, inputs, code)
    with _one_at_a_time(cache_root() / key):
        return _cached_run(params, inputs, out, train, key, t0)


def _cached_run(params, inputs, out: Path, train: Callable[..., StageOutput], key: str, t0: float):
    entry = cache_root() / key
    out.mkdir(parents=True, exist_ok=True)
    if (entry / "output.json").is_file():
        record = json.loads((entry / "output.json").read_text())
        if directory_sha256(entry / "checkpoint") == record["sha256"]:
            _copy_tree(entry / "checkpoint", out / "checkpoint")
            ref = directory_ref(out / "checkpoint")
            metrics = {
                **record["metrics"],
                "warmstart/cache_hit": 1.0,
                "timing/warmstart": time.perf_counter() - t0,
            }
            notes = [f"warm start reused from the cache ({entry})", *record["notes"]]
            log.info("warm start: cache hit %s", entry)
            return StageOutput(stage="warmstart", tables={"checkpoint": ref}, metrics=metrics, notes=notes)
        log.warning("warm start cache entry %s does not match its recorded hash: ignored and rebuilt", entry)
        shutil.rmtree(entry, ignore_errors=True)
    result = train(params, inputs, out)
    result.metrics["warmstart/cache_hit"] = 0.0
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}-", dir=entry.parent))
        _copy_tree(Path(result.uri("checkpoint")), tmp / "checkpoint")
        record = {
            "sha256": result.tables["checkpoint"].sha256,
            "metrics": result.metrics,
            "notes": result.notes,
        }
        (tmp / "output.json").write_text(json.dumps(record, indent=2))
        try:
            os.rename(tmp, entry)
        except OSError:  # another run stored the same key meanwhile: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:  # a full or read-only cache never fails the stage
        log.warning("warm start not cached (%s)", e)
    return result
