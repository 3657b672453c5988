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
is a remote URI (``s3://…``) gets a local lock file keyed by the URI under ``~/.cache/turntree/locks``: it keeps
writers on this machine apart, not writers on other machines.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

_HELD: dict[str, tuple[int, int, str]] = {}  # path -> (fd, depth, token)
_GUARD = threading.RLock()


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


def run_lock(root: str, run_id: str, *, wait: bool = False):
    """The run's writer lock: raises ``RunLocked`` naming the holder's pid unless ``wait``."""
    return file_lock(lock_path(root, run_id, "run"), wait=wait, run_id=run_id)


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
    while another process holds the run lock under that token (the pipeline that dispatched the step)."""
    if not token:
        with run_lock(root, run_id):
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


class Terminated(KeyboardInterrupt):
    """SIGTERM as an exception, so a run unwinds like Ctrl-C: the temporary Prefect server and the workers it
    started are stopped (their atexit hooks run), the run is marked failed and its lock released."""


def _on_sigterm(signum, frame):
    raise Terminated()


def install_sigterm() -> None:
    import signal

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
