"""Fast path of bwrap mode: one long-lived sandbox per worker slot whose pid 1 is a trusted zygote.

The slot's bubblewrap (same binds, namespaces, uid and ``--clearenv`` as a per-run launch, plus
CAP_SYS_ADMIN/CAP_SETPCAP inside its own user namespace only) starts ``inside.py zygote`` once. Per job the
zygote forks a child that unshares fresh mount, pid and IPC namespaces, mounts fresh size-capped tmpfs on
``/tmp``, ``/work`` and ``/dev/shm``, and forks the job process: pid 1 of the new pid namespace with its own
``/proc``, its own session, the job's pipes as fds 0-3, all capabilities dropped (bounding set included,
no_new_privs) and the job's rlimits. So nothing of one job is visible to the next (files, /tmp, processes,
SysV/POSIX IPC, module state: each job is a fresh fork of an interpreter that never ran model code). The
zygote enforces the wall clock, kills every process of its namespace after each job, checks that only
itself is left, and reports one status line; the parent keeps a backstop deadline and kills the whole slot
(then restarts it) when the zygote misbehaves, dies, or reports an unclean sweep.

Shared between jobs of one slot (documented, harmless): the interpreter's hash seed (all forks of one zygote
share ``PYTHONHASHSEED``) and the network namespace (empty, no interface up; a job's sockets die with it).
"""

from __future__ import annotations

import json
import math
import os
import selectors
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from runtime.sandbox import process as px

# bwrap's --die-with-parent fires when the THREAD that started it exits: start zygotes from one thread that
# lives as long as the process, never from a caller's (possibly short-lived) thread
_SPAWNER = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sandbox-zygote-spawner")
STATUS_GRACE_S = 3.0  # the zygote reports within timeout + this, or the parent kills the slot


class Zygote:
    """The zygote of one uid slot (started lazily, restarted after any failure)."""

    def __init__(self, uid: int | None) -> None:
        self.uid = uid
        self.proc: subprocess.Popen | None = None
        self.sock: socket.socket | None = None
        self.starts = 0
        self._clean = False
        self._lock = threading.Lock()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def resident_pids(self) -> set[int]:
        """Host pids of the slot's bwrap and zygote (the only processes of the uid allowed between jobs)."""
        if not self.alive():
            return set()
        pids = {self.proc.pid}
        try:
            for task in os.listdir(f"/proc/{self.proc.pid}/task"):
                with open(f"/proc/{self.proc.pid}/task/{task}/children") as f:
                    pids.update(int(p) for p in f.read().split())
        except OSError:
            pass
        return pids

    def _start(self) -> None:
        ours, theirs = socket.socketpair()
        try:
            cmd = px.bwrap_command(
                px.Limits(tmpfs_mb=1), -1, -1, runner_args=["zygote", str(theirs.fileno())], caps=True
            )
            ids = {"user": self.uid, "group": self.uid, "extra_groups": []} if self.uid is not None else {}
            self.proc = _SPAWNER.submit(
                subprocess.Popen,
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                cwd="/",
                env={},
                start_new_session=True,
                **ids,
            ).result()
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock, self.starts = ours, self.starts + 1

    def stop(self) -> None:
        """Kill the slot's sandbox (every process of its uid) and forget it."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            px.kill_uid(self.uid)
            try:
                self.proc.kill()
                self.proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired):
                pass
            self.proc = None

    def run(self, payload: dict, stdin: bytes | None, limits: px.Limits) -> px.RawRun:
        """One job through the zygote (started or restarted as needed); never raises for what the job does."""
        with self._lock:
            start = time.monotonic()
            if not self.alive():
                self.stop()
                try:
                    self._start()
                except Exception as e:
                    return px.RawRun(b"", b"", b"", None, False, False, time.monotonic() - start, "bwrap",
                                      f"launch failed: {e!r}")  # fmt: skip
            self._clean = False
            raw = self._run(payload, stdin, limits, start)
            if raw.error or raw.returncode is None or not self._clean:
                self.stop()  # unclean, dead or hung zygote: the next job gets a fresh sandbox
            return raw

    def _run(self, payload: dict, stdin: bytes | None, limits: px.Limits, start: float) -> px.RawRun:
        body = json.dumps({**payload, "timeout_s": limits.timeout_s, "tmpfs_mb": limits.tmpfs_mb}).encode()
        pipes = [os.pipe() for _ in range(4 if stdin else 3)]
        theirs = [pipes[0][1], pipes[1][1], pipes[2][1]] + ([pipes[3][0]] if stdin else [])
        try:
            socket.send_fds(self.sock, [f"{len(body):12d} {int(bool(stdin))}  ".encode()], theirs)
            self.sock.sendall(body)
        except OSError as e:
            for r, w in pipes:
                os.close(r)
                os.close(w)
            return px.RawRun(b"", b"", b"", None, False, False, time.monotonic() - start, "bwrap",
                              f"sandbox worker unreachable: {e!r}")  # fmt: skip
        for fd in theirs:
            os.close(fd)
        out_fd, err_fd, res_fd = pipes[0][0], pipes[1][0], pipes[2][0]
        caps = {out_fd: limits.output_bytes, err_fd: limits.output_bytes, res_fd: limits.result_bytes}
        return self._supervise(caps, pipes[3][1] if stdin else None, stdin, limits, start)

    def _supervise(self, caps: dict, stdin_fd, stdin, limits, start) -> px.RawRun:
        out_fd, err_fd, res_fd = list(caps)
        bufs = {fd: bytearray() for fd in caps}
        sel = selectors.DefaultSelector()
        for fd in caps:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        pending = memoryview(stdin) if stdin else None
        if stdin_fd is not None:
            os.set_blocking(stdin_fd, False)
            sel.register(stdin_fd, selectors.EVENT_WRITE)
        sel.register(self.sock, selectors.EVENT_READ)
        status_buf, status, truncated, error = b"", None, False, None
        deadline = start + limits.timeout_s + STATUS_GRACE_S
        drain_until = math.inf
        try:
            while caps or status is None:
                now = time.monotonic()
                if status is not None and now >= drain_until:
                    break
                if status is None and now >= deadline:
                    error = "sandbox worker did not report (killed and restarted)"
                    break
                wake = drain_until if status is not None else deadline
                for key, _ in sel.select(max(0.0, min(wake - now, 0.5))):
                    fd = key.fd
                    if key.fileobj is self.sock:
                        chunk = self.sock.recv(4096)
                        if not chunk:
                            sel.unregister(self.sock)
                            error = "sandbox worker died (restarted)"
                            status = {"rc": None, "timed_out": False, "clean": False}
                        status_buf += chunk
                        if b"\n" in status_buf:
                            status = json.loads(status_buf.split(b"\n", 1)[0])
                            sel.unregister(self.sock)
                        if status is not None:
                            drain_until = time.monotonic() + 0.5
                    elif fd == stdin_fd:
                        try:
                            pending = pending[os.write(fd, pending[:65536]) :]
                            done = not len(pending)
                        except OSError:
                            done = True
                        if done:
                            sel.unregister(fd)
                            os.close(fd)
                            stdin_fd = None
                    else:
                        chunk = os.read(fd, 65536)
                        room = caps[fd] - len(bufs[fd])
                        bufs[fd] += chunk[:room]
                        if len(chunk) > room and not truncated:
                            truncated = True
                            self.sock.send(b"k")  # the zygote kills the job
                        if not chunk or len(chunk) > room:
                            sel.unregister(fd)
                            del caps[fd]
        finally:
            sel.close()
            for fd in (out_fd, err_fd, res_fd, stdin_fd):
                if fd is not None:
                    os.close(fd)
        status = status or {"rc": None, "timed_out": False, "clean": False}
        self._clean = bool(status.get("clean"))
        marker = b"sandbox zygote child: "
        if status["rc"] == 125 and marker in bufs[err_fd] and error is None:  # our namespace set-up failed
            error = "sandbox set-up failed: " + bufs[err_fd].split(marker, 1)[1][:300].decode(
                errors="replace"
            )
        return px.RawRun(
            stdout=bytes(bufs[out_fd]),
            stderr=bytes(bufs[err_fd]),
            records=bytes(bufs[res_fd]),
            returncode=status["rc"],
            timed_out=bool(status["timed_out"]),
            truncated=truncated,
            duration_s=time.monotonic() - start,
            isolation="bwrap",
            error=error,
        )
