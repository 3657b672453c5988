"""A run's watchdog: a stalled stage fails the run with its threads' stacks on file, and SIGTERM/SIGINT end the
process within seconds even when a thread holds a lock forever.

A daemon thread watches two things while a run is active (``Watchdog.start`` … ``stop``, in the main thread):

- **Progress.** ``beat(label)`` (stage starts and ends, every ``runtime.progress.report``) says the run moves. When
  no beat came for ``stall_s`` seconds *and* this process with its children used less than ``idle_cpu`` of one
  core over that time (a deadlock sits at ~0% CPU; a long silent computation does not), the watchdog writes every
  thread's stack (``faulthandler``, which takes no Python lock) to ``dump_path``, then raises ``StageStalled`` in
  the main thread (a real signal, so a thread blocked in a lock wait wakes up) and, if the process is still there
  ``grace_s`` later, prints one line on stderr and ends it with exit status 3.
- **Termination.** ``signal.set_wakeup_fd`` makes the interpreter's C-level signal handler write the signal number
  to a pipe the watchdog reads, whichever thread the kernel chose and whether or not the main thread can run
  Python. On SIGTERM or SIGINT the watchdog wakes the main thread (so the installed Python handler runs: Prefect's
  raises ``TerminationSignal``), and if the process is still there ``grace_s`` later it dumps the stacks, prints
  one line and exits at once (143 for SIGTERM, 130 for SIGINT). Runs resume from their last completed stage.

Either forced exit first ends the process's children (SIGTERM, then SIGKILL after ``child_grace_s``): ``os._exit``
skips the atexit hooks that would have stopped them, and a run must not leave its temporary Prefect server, vLLM
engine or sandbox workers behind.

``suspended()`` pauses stall detection while the process waits on purpose for work done elsewhere (a stage
dispatched to a Prefect work pool). Everything the watchdog writes goes through ``os.write`` and
``faulthandler``: it never needs the logging lock that the threads it reports on may hold.
"""

from __future__ import annotations

import faulthandler
import os
import select
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path

STALL_ENV = "TURNTREE_STALL_TIMEOUT"  # seconds without progress before a stalled run fails; 0 = never
DEFAULT_STALL_S = 900.0
_WAKE = signal.SIGUSR2  # wakes the main thread out of a blocking wait; its handler does nothing
_STALL = signal.SIGUSR1  # raises StageStalled in the main thread
_active: Watchdog | None = None


class StageStalled(RuntimeError):
    """A stage made no progress for the watchdog's ``stall_s``."""


def stall_timeout() -> float:
    """``$TURNTREE_STALL_TIMEOUT`` seconds (a number ≥ 0; 0 turns stall detection off), else the default."""
    raw = os.environ.get(STALL_ENV, "")
    if not raw:
        return DEFAULT_STALL_S
    try:
        value = float(raw)
    except ValueError:
        raise ValueError(f"{STALL_ENV}={raw!r} is not a number of seconds") from None
    if value < 0:
        raise ValueError(f"{STALL_ENV}={raw!r} must be ≥ 0 (0 turns stall detection off)")
    return value


def beat(label: str | None = None) -> None:
    """Tell the active watchdog (if any) that the run moved; ``label`` names what it is doing now."""
    if _active is not None:
        _active.beat(label)


@contextmanager
def suspended():
    """Stall detection off while this block waits on purpose (beats resume it)."""
    w = _active
    if w is None:
        yield
        return
    w.suspend_depth += 1
    try:
        yield
    finally:
        w.suspend_depth -= 1
        w.beat()


def _tree_cpu_seconds() -> float:
    import psutil

    me = psutil.Process()
    total = sum(me.cpu_times()[:2])
    for child in me.children(recursive=True):
        try:
            total += sum(child.cpu_times()[:2])
        except psutil.Error:
            pass
    return total


def _end_children(grace_s: float) -> None:
    """SIGTERM every descendant of this process, SIGKILL those still there ``grace_s`` later (a forced exit)."""
    import psutil

    try:
        kids = psutil.Process().children(recursive=True)
    except psutil.Error:
        return
    for kid in kids:
        try:
            kid.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(kids, timeout=grace_s)
    for kid in alive:
        try:
            kid.kill()
        except psutil.Error:
            pass


def _say(line: str) -> None:
    try:
        os.write(2, f"turntree: {line}\n".encode())
    except OSError:
        pass


class Watchdog:
    """See the module docstring. ``dump_path``: where the stacks go (created on demand)."""

    def __init__(
        self,
        dump_path: Path,
        stall_s: float = DEFAULT_STALL_S,
        *,
        grace_s: float = 10.0,
        poll_s: float = 1.0,
        idle_cpu: float = 0.05,
        exit_grace_s: float = 30.0,
        child_grace_s: float = 3.0,
    ):
        self.dump_path = Path(dump_path)
        self.stall_s, self.grace_s, self.poll_s, self.idle_cpu = stall_s, grace_s, poll_s, idle_cpu
        self.exit_grace_s = exit_grace_s  # after StageStalled is raised: time for the run to fail cleanly
        self.child_grace_s = child_grace_s  # a forced exit: time for the children to end on SIGTERM
        self.label = "starting"
        self.suspend_depth = 0
        self._last = time.monotonic()
        self._cpu_mark = (self._last, 0.0)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pipe: tuple[int, int] | None = None
        self._old_fd = -1
        self._old_handlers: dict[int, object] = {}
        self._main = threading.main_thread().ident
        self.stalled: str | None = None

    # --- lifecycle (main thread) ------------------------------------------------------------------------------
    def start(self) -> Watchdog:
        global _active
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("the watchdog is installed from the main thread (signals are delivered there)")
        r, w = os.pipe()
        os.set_blocking(w, False)
        self._pipe = (r, w)
        self._old_fd = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        self._old_handlers = {
            _WAKE: signal.signal(_WAKE, lambda *_: None),
            _STALL: signal.signal(_STALL, self._raise_stalled),
        }
        self._cpu_mark = (time.monotonic(), _tree_cpu_seconds())
        self._thread = threading.Thread(target=self._loop, name="turntree-watchdog", daemon=True)
        self._thread.start()
        _active = self
        return self

    def stop(self) -> None:
        global _active
        self._stop.set()
        if self._pipe:
            os.write(self._pipe[1], b"\0")  # wake the loop to notice the stop
        if self._thread:
            self._thread.join(timeout=5)
        if _active is self:
            _active = None
        if threading.current_thread() is threading.main_thread():
            signal.set_wakeup_fd(self._old_fd)
            for sig, handler in self._old_handlers.items():
                signal.signal(sig, handler)
        if self._pipe:
            for fd in self._pipe:
                os.close(fd)
            self._pipe = None

    def __enter__(self) -> Watchdog:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- called from any thread -------------------------------------------------------------------------------
    def beat(self, label: str | None = None) -> None:
        self._last = time.monotonic()
        if label:
            self.label = label

    def _raise_stalled(self, *_):
        raise StageStalled(self.stalled or f"{self.label}: no progress")

    # --- the watchdog thread ----------------------------------------------------------------------------------
    def _loop(self) -> None:
        r = self._pipe[0]
        while not self._stop.is_set():
            ready, _, _ = select.select([r], [], [], self.poll_s)
            if ready:
                data = os.read(r, 64)
                if self._old_fd >= 0:  # someone else's wakeup fd was there before: keep it informed
                    try:
                        os.write(self._old_fd, data)
                    except OSError:
                        pass
                for signum in (b for b in data if b in (signal.SIGTERM, signal.SIGINT)):
                    if not self._stop.is_set():
                        self._on_termination(signum)
            if not self._stop.is_set():
                self._check_progress()

    def _on_termination(self, signum: int) -> None:
        name = signal.Signals(signum).name
        # usually the main thread runs the handler by itself; only one stuck in a wait needs waking (a signal
        # interrupts whatever system call it is in, which some native code handles badly: not at once)
        if self._stop.wait(min(1.0, self.grace_s / 2)):
            return
        signal.pthread_kill(self._main, _WAKE)  # the main thread runs the pending handler now
        if self._stop.wait(self.grace_s):
            return
        where = self._dump(
            f"{name} received while {self.label}; the process had not ended {self.grace_s:g} s later"
        )
        _say(f"{name}: ended while {self.label} (a thread was stuck; every thread's stack is in {where})")
        _end_children(self.child_grace_s)
        os._exit(128 + signum)

    def _check_progress(self) -> None:
        now = time.monotonic()
        if self.suspend_depth or not self.stall_s:
            self._last = now
            self._cpu_mark = (now, self._cpu_mark[1])  # a stale CPU figure can only count as busy: harmless
            return
        last = self._last
        if last != self._cpu_mark[0]:  # a beat since the mark: CPU is measured over the silence after it
            self._cpu_mark = (last, _tree_cpu_seconds())
        if now - self._last < self.stall_s:
            return
        t0, c0 = self._cpu_mark
        c1 = _tree_cpu_seconds()
        if (c1 - c0) > self.idle_cpu * (now - t0):  # busy, only silent: not a stall
            self._last = now
            self._cpu_mark = (now, c1)
            return
        idle = now - self._last
        why = f"stage {self.label} made no progress for {idle:.0f} s"
        where = self._dump(why)
        self.stalled = f"{why} (every thread's stack is in {where}); rerun the same command to resume"
        signal.pthread_kill(self._main, _STALL)
        if self._stop.wait(self.exit_grace_s):
            return
        _say(f"{self.stalled}; the stuck process did not unwind and was ended")
        _end_children(self.child_grace_s)
        os._exit(3)

    def _dump(self, why: str) -> Path:
        try:
            self.dump_path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.dump_path, "a") as f:
                f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} pid {os.getpid()}: {why}\n")
                f.flush()
                faulthandler.dump_traceback(file=f, all_threads=True)
            return self.dump_path
        except OSError:
            faulthandler.dump_traceback(file=2, all_threads=True)
            return Path("<stderr>")
