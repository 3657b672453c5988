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
all at once. On an ``s3://`` root every write is conditional, so writers on different machines cannot undo
each other: the manifest is created with ``If-None-Match: *`` and rewritten with ``If-Match`` on the ETag it
was read at (a read-modify-write that lost the race is read and applied again; a ``save`` of a stale manifest
raises ``ManifestChanged``), and a version number is claimed (``v<n>.claim``, ``If-None-Match: *``) before
anything is uploaded under ``v<n>/``. The run's lease (``flows.locks``) is checked before each of them.

Nothing recorded holds credentials: the manifest is written through ``flows.uris.redact_all``, and a root with
credentials in it (``s3://KEY:SECRET@bucket``) is refused.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from flows import remote
from flows.history import RunHistory, parse_key, stage_key  # noqa: F401 - re-exported
from flows.integrity import content_size
from flows.locks import check_lease, manifest_lock, pid_alive
from flows.provenance import git_sha, package_versions  # noqa: F401 - git_sha re-exported
from flows.remote import keep_mirror, to_uri
from flows.uris import CredentialsInURI, credentials_error, redact_all
from runtime.tableio import resolve
from schemas.outputs import StageOutput, TableRef

MANIFEST = "manifest.json"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
_SCRATCH = re.compile(r"^\.tmp-(?:(\d+)-)?[0-9a-f]+$")
_VERSION = re.compile(r"^v(\d+)(?:\.claim)?$")  # a version directory, or the claim of its number
_RETRIES = 20  # read-modify-writes of the manifest that may lose a race before giving up
log = logging.getLogger("turntree.runstore")


class RunNotFound(FileNotFoundError):
    pass


class ManifestChanged(RuntimeError):
    """Another writer changed (or created) the run's manifest since this process read it: nothing written."""


@dataclass
class RunStore(RunHistory):
    """One run's directory and manifest."""

    root: str
    run_id: str

    def __post_init__(self) -> None:
        why = credentials_error(self.root)
        if why:
            raise CredentialsInURI(why)
        if not _RUN_ID.match(self.run_id):
            raise ValueError(f"invalid run id {self.run_id!r}: use letters, digits, '.', '_' and '-'")
        self.fs, root_path = resolve(self.root)
        self.base = f"{root_path.rstrip('/')}/{self.run_id}"
        self.remote = not isinstance(self.fs, pafs.LocalFileSystem)
        # conditional writes (S3); _etag: the manifest's ETag at this store's last load/save (for ``save``)
        self.conditional = self.remote and remote.conditional(self.root)
        self._etag: str | None = None

    # --- manifest -------------------------------------------------------------------------------------
    @property
    def manifest_path(self) -> str:
        return f"{self.base}/{MANIFEST}"

    def exists(self) -> bool:
        return self.fs.get_file_info(self.manifest_path).type == pafs.FileType.File

    @property
    def manifest_uri(self) -> str:
        return to_uri(self.root, self.manifest_path)

    def load(self) -> dict[str, Any]:
        manifest, etag = self._read()
        if self.conditional:  # a later ``save`` by the same caller replaces exactly this version
            self._etag = etag
        return manifest

    def _read(self) -> tuple[dict[str, Any], str | None]:
        """The manifest and, on S3, its ETag (which a conditional write names)."""
        missing = RunNotFound(
            f"no run {self.run_id!r} under {self.root} (no {MANIFEST}); `turntree runs` lists runs"
        )
        etag = None
        if self.conditional:
            got = remote.get_object(self.manifest_uri)
            if got is None:
                raise missing
            etag, data = got.etag, got.body
        else:
            if not self.exists():
                raise missing
            with self.fs.open_input_stream(self.manifest_path) as f:
                data = f.read()
        try:
            return json.loads(data.decode()), etag
        except json.JSONDecodeError as e:
            raise ValueError(f"manifest of run {self.run_id!r} is corrupt: {e}") from None

    def save(self, manifest: dict[str, Any]) -> None:
        """Write the manifest atomically (temp + rename; on S3 one conditional PUT: ``ManifestChanged`` when
        another writer changed it since this store's last ``load``); a read-modify-write goes through
        ``update``/``commit``, which hold the manifest lock and, on S3, retry a lost race."""
        self._etag = self._write(manifest, self._etag)

    def _write(self, manifest: dict[str, Any], etag: str | None) -> str | None:
        """Write the manifest; on S3 only if it is still version ``etag`` (None: only if there is none yet).
        Returns the new ETag (S3), else None."""
        manifest["updated_at"] = time.time()
        data = json.dumps(redact_all(manifest), indent=2, sort_keys=True, default=str).encode()
        if self.conditional:
            check_lease(self.root, self.run_id)
            try:
                return remote.put_object(self.manifest_uri, data, if_match=etag, if_none_match=etag is None)
            except remote.PreconditionFailed:
                raise ManifestChanged(
                    f"run {self.run_id!r}: another writer {'created' if etag is None else 'changed'} its "
                    "manifest since this process read it; nothing written"
                ) from None
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
        params = redact_all(params)  # as the manifest records them
        for _ in range(2):  # on S3, another machine may create it between our look and our create
            if self.exists():
                manifest = self.load()
                if not same_run(manifest.get("params"), params):
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
            try:
                self._etag = self._write(manifest, None)
            except ManifestChanged:
                continue
            return manifest
        raise ManifestChanged(f"run {self.run_id!r}: its manifest appeared and vanished while it was created")

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
            return self._read_modify_write(lambda manifest: manifest.update(fields))

    def _read_modify_write(self, change) -> dict[str, Any]:
        """Load the manifest, apply ``change`` to it, save it; on S3, when another writer saved in between
        (the If-Match failed), read it again and apply ``change`` to that, so neither update is lost."""
        for attempt in range(_RETRIES):
            # the ETag goes with this read, not with the store (which threads share)
            manifest, etag = self._read()
            change(manifest)
            try:
                self._write(manifest, etag)
                return manifest
            except ManifestChanged:
                if not self.conditional:
                    raise
                remote.backoff(attempt)
        raise ManifestChanged(
            f"run {self.run_id!r}: its manifest kept changing under {_RETRIES} attempts to update it"
        )

    # --- stage outputs ----------------------------------------------------------------------------------
    def stage_dir(self, stage: str, iteration: int | None) -> str:
        return f"{self.base}/{stage_key(stage, iteration)}"

    def next_version(self, stage: str, iteration: int | None) -> str:
        """The first version number above every version directory (and, on S3, every claimed number)."""
        d = self.stage_dir(stage, iteration)
        infos = self.fs.get_file_info(pafs.FileSelector(d, allow_not_found=True))
        nums = [int(m.group(1)) for i in infos if (m := _VERSION.match(i.base_name))]
        return f"v{max(nums, default=0) + 1}"

    def _claim_version(self, stage: str, iteration: int | None) -> str:
        """On S3: the next version number, claimed by creating ``v<n>.claim`` (``If-None-Match: *``) before
        anything is uploaded, so two writers never upload into one version; a number claimed meanwhile by
        another writer is skipped. Elsewhere the next number (the manifest lock keeps writers apart)."""
        version = self.next_version(stage, iteration)
        if not self.conditional:
            return version
        n = int(version[1:])
        body = json.dumps(
            {"host": os.uname().nodename, "pid": os.getpid(), "claimed_at": time.time()}
        ).encode()
        for _ in range(1000):
            check_lease(self.root, self.run_id)
            claim = to_uri(self.root, f"{self.stage_dir(stage, iteration)}/v{n}.claim")
            try:
                remote.put_object(claim, body, if_none_match=True)
                return f"v{n}"
            except remote.PreconditionFailed:
                n += 1
        raise ManifestChanged(
            f"run {self.run_id!r}: could not claim a version of {stage_key(stage, iteration)}"
        )

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
        moved: Callable[[Path, str | Path], None] | None = None,
    ) -> StageOutput:
        """Move a finished stage's scratch dir to the next version and record it as current (under the manifest
        lock, so concurrent committers each get their own version and all of them are recorded). ``made_by``:
        where it ran (host, pid, Prefect flow run). ``moved(scratch, where)``: told where the scratch dir's files
        now are on this machine (the runner tells the live engine, whose weights may name the scratch dir)."""
        record = {
            "inputs": inputs,
            "params": params,
            "params_field": params_field,
            "code": code,
            "fingerprints": fingerprints if fingerprints is not None else dict(inputs),
            **({"made_by": made_by} if made_by else {}),
        }
        with manifest_lock(self.root, self.run_id):
            return self._commit(stage, iteration, scratch, output, record, moved or (lambda old, new: None))

    def _commit(self, stage, iteration, scratch, output, record, moved):
        version = self._claim_version(stage, iteration)
        final = f"{self.stage_dir(stage, iteration)}/{version}"
        prefix = str(scratch)
        if self.remote:
            pafs.copy_files(
                str(scratch), final, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs
            )
            final = to_uri(self.root, final)
            # weights pushed from the scratch checkpoint are now served from this machine's mirror of `final`
            moved(scratch, keep_mirror(scratch, final))
        else:
            os.replace(scratch, final)
            moved(scratch, final)  # e.g. weights pushed from the scratch checkpoint now live at `final`
        tables = {}
        for name, ref in output.tables.items():
            uri = ref.uri
            if uri.startswith(prefix):
                uri = final + uri[len(prefix) :]
            tables[name] = TableRef(uri=uri, sha256=ref.sha256, rows=ref.rows, size=content_size(uri))
        output = output.model_copy(update={"tables": tables})
        record = {"finished_at": time.time(), **record, "output": output.model_dump()}

        def add(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"].setdefault(stage_key(stage, iteration), {"versions": {}})
            entry["versions"][version] = record
            entry["current"] = version

        self._read_modify_write(add)
        return output

    def note_current(self, stage: str, iteration: int | None, **fields: Any) -> None:
        """Add ``fields`` (e.g. a rerun's ``overrides``) to the record of the stage's current version."""

        def add(manifest: dict[str, Any]) -> None:
            entry = manifest["stages"][stage_key(stage, iteration)]
            entry["versions"][entry["current"]].update(fields)

        with manifest_lock(self.root, self.run_id):
            self._read_modify_write(add)


def same_run(recorded: dict | None, params: dict[str, Any]) -> bool:
    """The recorded parameters, read by today's code (parameters added since take their defaults), are these:
    a run made before a parameter existed resumes when that parameter keeps its default (the one check of
    ``create_or_open`` and of the CLI's preflight)."""
    from schemas.params import PipelineParams

    if recorded == params:
        return True
    try:
        return PipelineParams.model_validate(recorded or {}).identity() == params
    except ValueError:
        return False


def list_runs(root: str) -> list[dict[str, Any]]:
    """Manifests of every run under ``root`` (newest first)."""
    why = credentials_error(root)
    if why:
        raise CredentialsInURI(why)
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
