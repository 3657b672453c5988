"""Run roots on an object store (``s3://bucket/prefix``): what a remote root needs beyond a local directory.

- **URIs**: pyarrow's filesystems take paths without the scheme (``bucket/prefix/…``); what the manifest
  records, and what stages are given, is the full URI (``s3://bucket/prefix/…``), so any process can open it.
- **Endpoint and credentials** come from the environment, as for every AWS client: ``AWS_ENDPOINT_URL`` (an
  S3-compatible store: MinIO, Ceph, moto), ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_DEFAULT_REGION``; pyarrow 25, boto3 and MLflow's S3 client all read them.
- **Local mirror** (``$TURNTREE_REMOTE_CACHE``, default ``~/.cache/turntree/remote``): stages read tables
  straight from the store, but a model directory (a checkpoint) must be local for vLLM and transformers. A
  committed version's directory is kept in the mirror at upload time (so the engine that the update pushed its
  weights into keeps serving them), and a remote checkpoint this machine has not got is downloaded once,
  checked against the sha256 the manifest recorded.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from runtime.tableio import resolve


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if is_remote(uri) else ""


def to_uri(root: str, path: str) -> str:
    """The URI of filesystem path ``path`` on ``root``'s store (``bucket/a/b`` → ``s3://bucket/a/b``)."""
    return f"{scheme(root)}://{path}" if is_remote(root) else path


def cache_root() -> Path:
    """Where this machine mirrors remote run directories, one folder per endpoint."""
    base = Path(os.environ.get("TURNTREE_REMOTE_CACHE") or Path.home() / ".cache" / "turntree" / "remote")
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "aws"
    return base / hashlib.sha256(endpoint.encode()).hexdigest()[:12]


def mirror_path(uri: str) -> Path:
    """The local mirror of remote ``uri`` (files below it mirror below it)."""
    sch, rest = uri.split("://", 1)
    return cache_root() / sch / rest.strip("/")


def keep_mirror(scratch: Path, uri: str) -> Path:
    """Move a just-uploaded local directory into the mirror of ``uri`` (replacing a stale copy); returns it."""
    dest = mirror_path(uri)
    if dest.exists():
        shutil.rmtree(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(scratch, dest)
    except OSError:  # another file system (the scratch dir is in $TMPDIR)
        shutil.move(str(scratch), str(dest))
    return dest


def local_dir(uri: str, sha256: str | None = None) -> Path:
    """A local copy of the remote directory ``uri``: the mirror when it is there (and, given ``sha256``, holds
    that content), else downloaded into it now."""
    from flows.integrity import content_sha256

    dest = mirror_path(uri)
    if dest.is_dir() and (sha256 is None or content_sha256(str(dest)) == sha256):
        return dest
    fs, path = resolve(uri)
    tmp = dest.parent / f".{dest.name}.{uuid.uuid4().hex[:12]}.part"
    tmp.mkdir(parents=True)
    try:
        pafs.copy_files(path, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
        if sha256 is not None and content_sha256(str(tmp)) != sha256:
            raise ValueError(f"{uri}: downloaded content differs from its recorded sha256")
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def localize(inputs: dict[str, str], sha256_of=lambda uri: None) -> dict[str, str]:
    """``inputs`` with every remote directory (a checkpoint) replaced by its local copy; remote tables stay
    URIs (``runtime.tableio`` reads them from the store). ``sha256_of(uri)``: the recorded content hash."""
    out = dict(inputs)
    for name, uri in inputs.items():
        if not isinstance(uri, str) or not is_remote(uri):
            continue
        fs, path = resolve(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            out[name] = str(local_dir(uri, sha256_of(uri)))
    return out


def check_stored(uri: str, sha256: str, size: int | None) -> str | None:
    """``flows.integrity.check_ref`` for deciding what a stage may read: a remote directory (a checkpoint) is
    what the stage reads through this machine's mirror, so the mirror is what is checked, fetched once when
    missing or different, instead of downloading the whole directory to hash it at every check.
    ``turntree verify`` checks the store itself (``check_ref``)."""
    from flows.integrity import check_ref

    if is_remote(uri):
        fs, path = resolve(uri)
        if fs.get_file_info(path).type == pafs.FileType.Directory:
            try:
                local_dir(uri, sha256)
            except ValueError:
                return "sha256 differs from the recorded one"
            return None
    return check_ref(uri, sha256, size)


def local_view(uri: str) -> str | None:
    """A local path holding ``uri``'s content, without downloading: the path itself, or its mirror."""
    if not is_remote(uri):
        return uri if os.path.exists(uri) else None
    p = mirror_path(uri)
    return str(p) if p.exists() else None


def check_root(root: str) -> str | None:
    """Why the remote root ``root`` cannot be used (its bucket missing or the store unreachable), or None."""
    try:
        fs, path = resolve(root)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot reach the store ({first})"
    if info.type == pafs.FileType.NotFound:
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"
        return f"bucket {bucket!r} does not exist at {endpoint}; create it first"
    return None
