"""OS file locks (``fcntl.flock``) that make one process the writer of a run.

- the **run lock** (``<root>/.locks/<run_id>.lock``, held for a whole ``turntree run`` / ``turntree stage``):
  a second writer is refused at once with the holder's pid (``RunLocked``), or waits (``wait=True``);
- the **manifest lock** (``<run dir>/.manifest.lock``, held for one read-modify-write of the manifest or one
  commit): short, always waited for, so concurrent committers never lose each other's versions.

The run lock file names its holder: ``<pid>\n<token>\n``, the token a random string made when the lock is taken.
A stage the pipeline dispatches to a Prefect work pool runs in another process while the pipeline keeps the lock;
the pipeline gives it the token (``held_token``) and the stage step writes only while that very lock is held
with that token (``authorised``): any other writer is still refused, and a stage step left over from a pipeline
that has since stopped writes nothing.

Both are re-entrant within a process (flock conflicts between two descriptors of one process). A run root that
is a remote URI gets a local lock file keyed by the URI under ``~/.cache/turntree/locks``, which keeps writers on
this machine apart. On an ``s3://`` root the run lock is also a **lease** in the bucket,
``<root>/.locks/<run_id>.lock`` (holder host, pid and token), which keeps writers on different machines apart:

- taken with a conditional create (``If-None-Match: *``); a live lease of another process refuses the run
  (``RemoteRunLocked``, naming its host and pid) or is waited for;
- renewed every ``ttl/3`` seconds by a thread (``If-Match`` on its ETag; ``TURNTREE_REMOTE_LOCK_TTL``, default
  120 s); a lease not renewed for ``ttl`` seconds (by the store's clock: its holder died or lost the network)
  may be taken over, again with ``If-Match``, so two machines never both take it;
- released by marking it released (``If-Match``);
- a holder that could not renew in time, or whose lease was taken over, stops writing: every manifest write
  and version claim of the run store checks ``check_lease`` first (``LeaseLost``).

A stage step dispatched to another machine is authorised against the lease's token (``authorised``).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, tuple[int, int, str]] = {}  # path -> (fd, depth, token)
_GUARD = threading.RLock()
log = logging.getLogger("turntree.locks")


class RunLocked(RuntimeError):
    """Another live process holds the run's lock."""

    def __init__(self, run_id: str, pid: int | None):
        who = f"process {pid}" if pid else "another process"
        super().__init__(
            f"run {run_id!r} is being written by {who}; wait for it to finish, or pass --wait to queue behind it"
        )
        self.pid = pid


def lock_path(root: str, run_id: str, name: str) -> Path:
    if "://" in root and not root.startswith("file://"):
        key = hashlib.sha256(f"{root.rstrip('/')}/{run_id}".encode()).hexdigest()[:24]
        d = Path(os.environ.get("TURNTREE_LOCK_DIR", Path.home() / ".cache" / "turntree" / "locks"))
        return d / f"{key}.{name}.lock"
    base = Path(root.removeprefix("file://")).absolute()
    if name == "run":
        return base / ".locks" / f"{run_id}.lock"
    return base / run_id / f".{name}.lock"


def _holder(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def holder_pid(path: Path) -> int | None:
    try:
        return int((_holder(path) or ["0"])[0]) or None
    except ValueError:
        return None


@contextmanager
def file_lock(path: Path, *, wait: bool, run_id: str = "", poll: float = 0.2):
    """Hold an exclusive flock on ``path`` (created with its parents) for the ``with`` block."""
    key = str(path)
    with _GUARD:
        if key in _HELD:
            fd, depth, token = _HELD[key]
            _HELD[key] = (fd, depth + 1, token)
            held = True
        else:
            held = False
    if not held:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not wait:
                    pid = holder_pid(path)
                    os.close(fd)
                    raise RunLocked(run_id, pid) from None
                time.sleep(poll)
        token = uuid.uuid4().hex
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n{token}\n".encode(), 0)
        with _GUARD:
            _HELD[key] = (fd, 1, token)
    try:
        yield
    finally:
        with _GUARD:
            fd, depth, token = _HELD[key]
            if depth > 1:
                _HELD[key] = (fd, depth - 1, token)
            else:
                del _HELD[key]
                os.ftruncate(fd, 0)
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


@contextmanager
def run_lock(root: str, run_id: str, *, wait: bool = False):
    """The run's writer lock: raises ``RunLocked`` naming the holder's pid unless ``wait``. On an ``s3://``
    root, also the run's lease in the bucket (one writer across machines), under the same token."""
    path = lock_path(root, run_id, "run")
    with file_lock(path, wait=wait, run_id=run_id):
        if not _leased(root):
            yield
            return
        with _GUARD:
            token = _HELD[str(path)][2]
        with remote_lease(root, run_id, token, wait=wait):
            yield


def held_token(root: str, run_id: str) -> str | None:
    """The token of the run lock this process holds (None: it holds none), for the stages it dispatches."""
    with _GUARD:
        held = _HELD.get(str(lock_path(root, run_id, "run")))
    return held[2] if held else None


class NotAuthorised(RunLocked):
    """A stage step whose token is not the one of the run lock's current holder."""

    def __init__(self, run_id: str, pid: int | None):
        RuntimeError.__init__(
            self,
            f"run {run_id!r} is being written by process {pid}, which did not dispatch this stage step (its "
            "lock token differs): nothing written"
            if pid
            else f"run {run_id!r} is no longer locked by the pipeline that dispatched this stage step (it has "
            "stopped): nothing written",
        )
        self.pid = pid


@contextmanager
def authorised(root: str, run_id: str, token: str | None):
    """Write access for a stage step: with no token, the run lock itself (``run_lock``); with a token, only
    while another process holds the run lock under that token (the pipeline that dispatched the step; on an
    ``s3://`` root its lease in the bucket, so the step may run on another machine)."""
    if not token:
        with run_lock(root, run_id):
            yield
        return
    if _leased(root):
        held = read_lease(root, run_id)
        if held is None or held.get("released") or held["expired"]:
            raise NotAuthorised(run_id, None)
        if held.get("token") != token:
            raise NotAuthorised(run_id, held.get("pid"))
        yield
        return
    path = lock_path(root, run_id, "run")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:  # held: by whom?
        held = _holder(path)
        if len(held) < 2 or held[1] != token:
            raise NotAuthorised(run_id, holder_pid(path)) from None
    else:  # nobody holds it: the pipeline that dispatched this step has stopped
        fcntl.flock(fd, fcntl.LOCK_UN)
        raise NotAuthorised(run_id, None) from None
    finally:
        os.close(fd)
    yield


# --- the run's lease in the bucket (s3:// roots) -------------------------------------------------------------
def _leased(root: str) -> bool:
    from flows.remote import conditional

    return conditional(root)


def lease_uri(root: str, run_id: str) -> str:
    return f"{root.rstrip('/')}/.locks/{run_id}.lock"


def lease_ttl() -> float:
    return float(os.environ.get("TURNTREE_REMOTE_LOCK_TTL", "120"))


class RemoteRunLocked(RunLocked):
    """Another live process, on this machine or another, holds the run's lease in the bucket."""

    def __init__(self, run_id: str, holder: dict):
        RuntimeError.__init__(
            self,
            f"run {run_id!r} is being written by process {holder.get('pid')} on {holder.get('host')} (its lease "
            f"was renewed {holder.get('age_s', 0):.0f}s ago and lapses {holder.get('ttl')}s after a renewal); wait "
            "for it to finish, or pass --wait to queue behind it",
        )
        self.pid = holder.get("pid")


class LeaseLost(RunLocked):
    """This process's lease on a run lapsed or was taken over: it must not write any more."""

    def __init__(self, run_id: str, why: str):
        RuntimeError.__init__(
            self, f"run {run_id!r}: this process no longer holds the run's lease ({why}): nothing written"
        )
        self.pid = None


def read_lease(root: str, run_id: str) -> dict | None:
    """The lease's record (host, pid, token, ttl, released) plus ``age_s`` and ``expired``, or None."""
    from flows.remote import get_object

    got = get_object(lease_uri(root, run_id))
    if got is None:
        return None
    try:
        held = json.loads(got.body)
    except ValueError:
        held = {}
    ttl = float(held.get("ttl") or lease_ttl())
    return {**held, "etag": got.etag, "age_s": got.age_s, "expired": got.age_s > ttl}


class Lease:
    """One process's lease on a run (see the module docstring)."""

    def __init__(self, root: str, run_id: str, token: str):
        self.root, self.run_id, self.token = root, run_id, token
        self.uri = lease_uri(root, run_id)
        self.ttl = lease_ttl()
        self.etag: str | None = None
        self.lost: str | None = None  # why the lease is no longer ours
        self.renewed = 0.0  # time.monotonic() of the last successful write
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _body(self, released: bool = False) -> bytes:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "token": self.token,
                "ttl": self.ttl,
                "written_at": time.time(),
                "released": released,
            }
        ).encode()

    def acquire(self, wait: bool, poll: float = 1.0) -> None:
        from flows.remote import PreconditionFailed, put_object

        while True:
            try:
                self.etag = put_object(self.uri, self._body(), if_none_match=True)
                break
            except PreconditionFailed:
                pass
            run_id = self.run_id
            held = read_lease(self.root, run_id)
            if held is None:  # released and deleted meanwhile: try again
                continue
            if held.get("released") or held["expired"]:
                try:  # take it over, unless another process just did
                    self.etag = put_object(self.uri, self._body(), if_match=held["etag"])
                    if not held.get("released"):
                        log.warning(
                            "took over the lease of run %r from process %s on %s (not renewed for %.0fs)",
                            run_id,
                            held.get("pid"),
                            held.get("host"),
                            held["age_s"],
                        )
                    break
                except PreconditionFailed:
                    continue
            if not wait:
                raise RemoteRunLocked(run_id, held)
            time.sleep(poll)
        self.renewed = time.monotonic()
        self._thread = threading.Thread(target=self._beat, name=f"turntree-lease-{self.run_id}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        from flows.remote import PreconditionFailed, put_object

        while not self._stop.wait(self.ttl / 3):
            with self._lock:
                if self.lost:
                    return
                try:
                    self.etag = put_object(self.uri, self._body(), if_match=self.etag)
                    self.renewed = time.monotonic()
                except PreconditionFailed:
                    self.lost = "another process took it over"
                    log.error(
                        "run %r: lease lost (%s); this process writes nothing more", self.run_id, self.lost
                    )
                    return
                except Exception as e:  # the store is unreachable for now: retry until the lease lapses
                    log.warning("run %r: could not renew the lease (%s)", self.run_id, e)

    def check(self) -> None:
        """Raise ``LeaseLost`` unless the lease is surely still ours: not taken over, and renewed within the
        last 2/3 of its time to live (another machine may take it over only after the whole of it)."""
        if self.lost:
            raise LeaseLost(self.run_id, self.lost)
        if time.monotonic() - self.renewed > self.ttl * 2 / 3:
            raise LeaseLost(self.run_id, f"not renewed for {time.monotonic() - self.renewed:.0f}s")

    def release(self) -> None:
        from flows.remote import PreconditionFailed, put_object

        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
        with self._lock:
            if self.lost:
                return
            try:
                put_object(self.uri, self._body(released=True), if_match=self.etag)
            except PreconditionFailed:
                pass  # taken over after it lapsed: not ours to release
            except Exception as e:
                log.warning(
                    "run %r: could not release the lease (%s); it lapses in %ss", self.run_id, e, self.ttl
                )


_LEASES: dict[str, list] = {}  # lease uri -> [Lease, depth]


@contextmanager
def remote_lease(root: str, run_id: str, token: str, *, wait: bool = False):
    """Hold the run's lease in the bucket for the ``with`` block (re-entrant within a process)."""
    key = lease_uri(root, run_id)
    with _GUARD:
        held = _LEASES.get(key)
        if held:
            held[1] += 1
    if not held:
        lease = Lease(root, run_id, token)
        lease.acquire(wait)
        with _GUARD:
            _LEASES[key] = held = [lease, 1]
    try:
        yield held[0]
    finally:
        with _GUARD:
            held[1] -= 1
            done = held[1] == 0
            if done:
                del _LEASES[key]
        if done:
            held[0].release()


def check_lease(root: str, run_id: str) -> None:
    """Before a write to the run: ``LeaseLost`` if this process holds the run's lease and it is no longer
    surely its own (a process that holds no lease, e.g. a dispatched stage step, is not concerned)."""
    with _GUARD:
        held = _LEASES.get(lease_uri(root, run_id)) if "://" in root else None
    if held:
        held[0].check()


_MANIFEST_THREADS: dict[str, threading.RLock] = {}


@contextmanager
def manifest_lock(root: str, run_id: str):
    """One read-modify-write of the manifest at a time: across processes (flock) and across this process's
    threads (the file lock is re-entrant per process; an asynchronous pipeline commits a rollout from a worker
    thread while the main thread commits the update)."""
    path = lock_path(root, run_id, "manifest")
    with _GUARD:
        threads = _MANIFEST_THREADS.setdefault(str(path), threading.RLock())
    with threads, file_lock(path, wait=True, run_id=run_id):
        yield


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
