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
- **Conditional writes** (``s3://`` roots, through boto3: pyarrow's S3 filesystem cannot send preconditions):
  ``put_object(..., if_none_match=True)`` creates an object only if it is not there (``If-None-Match: *``),
  ``put_object(..., if_match=etag)`` replaces it only if it is still the version that was read (``If-Match``);
  a lost race is ``PreconditionFailed``. The run manifest, each claimed stage version and the run's lease
  (``flows.locks``) are written this way, so one writer per run holds across machines. ``check_root`` makes
  sure the store honours them before a run starts.
"""

from __future__ import annotations

import email.utils
import hashlib
import os
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import NamedTuple

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
    """Why the remote root ``root`` cannot be used (its bucket missing, the store unreachable, or, for
    ``s3://``, conditional writes not honoured or boto3 missing), or None."""
    try:
        fs, path = resolve(root)
        bucket = path.split("/", 1)[0]
        info = fs.get_file_info(bucket)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot reach the store ({first})"
    if info.type == pafs.FileType.NotFound:
        return f"bucket {bucket!r} does not exist at {_endpoint()}; create it first"
    return check_conditional(root) if conditional(root) else None


# --- conditional writes (S3) ---------------------------------------------------------------------------
class PreconditionFailed(RuntimeError):
    """A conditional write lost its race: the object exists (If-None-Match) or changed (If-Match)."""


class Stored(NamedTuple):
    body: bytes
    etag: str
    age_s: float  # seconds since the object was last written, by the store's own clock


def conditional(root: str) -> bool:
    """Whether ``root``'s store takes conditional writes here (S3 and S3-compatible stores: ``s3://``)."""
    return scheme(root) == "s3"


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS"


_CLIENTS: dict[tuple, object] = {}
_CLIENTS_LOCK = threading.Lock()


def s3_client():
    """A boto3 S3 client for the environment's endpoint, region and keys (boto3 reads them as pyarrow does);
    one per distinct environment, made under a lock (creating clients is not thread-safe)."""
    key = tuple(
        os.environ.get(k)
        for k in (
            "AWS_ENDPOINT_URL_S3",
            "AWS_ENDPOINT_URL",
            "AWS_DEFAULT_REGION",
            "AWS_REGION",
            "AWS_PROFILE",
        )
    ) + (os.environ.get("AWS_ACCESS_KEY_ID"),)
    with _CLIENTS_LOCK:
        if key not in _CLIENTS:
            try:
                import boto3
            except ImportError:
                raise ImportError(
                    "an s3:// run root needs boto3 for its conditional writes: install turntree's 'backends' "
                    "extra (pip install 'turntree[backends]')"
                ) from None
            _CLIENTS[key] = boto3.session.Session().client("s3")
        return _CLIENTS[key]


def _bucket_key(uri: str) -> tuple[str, str]:
    rest = uri.split("://", 1)[1] if "://" in uri else uri
    bucket, _, key = rest.partition("/")
    return bucket, key


def _lost_race(e: Exception) -> bool:
    resp = getattr(e, "response", None) or {}
    code = resp.get("Error", {}).get("Code", "")
    status = resp.get("ResponseMetadata", {}).get("HTTPStatusCode")
    # 412: the precondition failed; 409: a concurrent conditional write to the same key won (AWS: retry)
    return status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")


def get_object(uri: str) -> Stored | None:
    """``uri``'s bytes, ETag and age, or None when there is no such object."""
    client = s3_client()
    bucket, key = _bucket_key(uri)
    try:
        resp = client.get_object(Bucket=bucket, Key=key)
    except client.exceptions.NoSuchKey:
        return None
    body = resp["Body"].read()
    age = 0.0
    date = resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}).get("date")
    if date and resp.get("LastModified") is not None:
        age = (email.utils.parsedate_to_datetime(date) - resp["LastModified"]).total_seconds()
    return Stored(body, resp["ETag"], max(age, 0.0))


def put_object(uri: str, data: bytes, *, if_match: str | None = None, if_none_match: bool = False) -> str:
    """Write ``data`` at ``uri`` in one PUT; with ``if_none_match`` only if nothing is there, with ``if_match``
    only if the object is still that ETag (``PreconditionFailed`` otherwise). Returns the new ETag."""
    client = s3_client()
    bucket, key = _bucket_key(uri)
    cond = {"IfNoneMatch": "*"} if if_none_match else {"IfMatch": if_match} if if_match else {}
    try:
        resp = client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
    except client.exceptions.ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        gone = bool(if_match) and code in ("NoSuchKey", "404")  # the object read earlier is no longer there
        if cond and (_lost_race(e) or gone):
            raise PreconditionFailed(
                f"{uri}: {'exists' if if_none_match else 'changed since it was read'}"
            ) from None
        raise
    return resp["ETag"]


def delete_object(uri: str) -> None:
    client = s3_client()
    bucket, key = _bucket_key(uri)
    client.delete_object(Bucket=bucket, Key=key)


def check_conditional(root: str) -> str | None:
    """Why ``root``'s store cannot keep one writer per run (boto3 missing, no write access, or conditional
    writes ignored: a second ``If-None-Match: *`` PUT of one key must fail), or None. Leaves nothing behind."""
    probe = f"{root.rstrip('/')}/.locks/.probe-{uuid.uuid4().hex[:12]}"
    try:
        put_object(probe, b"1", if_none_match=True)
        try:
            put_object(probe, b"2", if_none_match=True)
            honoured = False
        except PreconditionFailed:
            honoured = True
        finally:
            delete_object(probe)
    except ImportError as e:
        return str(e)
    except Exception as e:  # botocore's errors: no credentials, access denied, unreachable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot write to the store ({first})"
    if not honoured:
        return (
            f"the store at {_endpoint()} ignores conditional writes (a second PUT with If-None-Match: * "
            "succeeded), so one writer per run cannot be enforced there; use a store that honours them"
        )
    return None


def backoff(attempt: int) -> None:
    """A short, jittered pause before retrying a lost conditional write."""
    time.sleep(min(2.0, 0.05 * 2**attempt) * (0.5 + uuid.uuid4().int % 1000 / 1000))
