"""A bounded pool of sandbox workers: one uid slot per concurrent run, futures for the rollout loop.

Threads, not processes: a worker only launches bubblewrap and waits in ``select``, so the GIL is free for
generation. Every submitted job resolves to a result (an ``error`` field rather than an exception), so a
crashed or hung run never takes the caller down; the wall-clock limit bounds every wait.
"""

from __future__ import annotations

import atexit
import os
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager

from runtime.sandbox.execution import execute_on, run_tests_on
from runtime.sandbox.isolation import UidSlot
from runtime.sandbox.records import ExecutionResult, TestReport, TestResult


def default_workers() -> int:
    """``TURNTREE_SANDBOX_WORKERS`` or the number of CPUs this process may use."""
    return int(os.environ.get("TURNTREE_SANDBOX_WORKERS", 0)) or len(os.sched_getaffinity(0))


class SandboxPool:
    """``workers`` concurrent runs at most, each under its own uid slot (reserved lazily, kept for reuse)."""

    def __init__(self, workers: int | None = None) -> None:
        self.workers = workers or default_workers()
        if self.workers < 1:
            raise ValueError(f"sandbox pool needs at least one worker, got {self.workers}")
        self._free: queue.SimpleQueue[UidSlot] = queue.SimpleQueue()
        self._slots: list[UidSlot] = []
        self._lock = threading.Lock()
        self._executor = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="sandbox")

    @contextmanager
    def slot(self):
        """Reserve a uid slot for one run (blocks while ``workers`` runs are in flight)."""
        try:
            slot = self._free.get_nowait()
        except queue.Empty:
            with self._lock:
                slot = UidSlot() if len(self._slots) < self.workers else None
                if slot is not None:
                    self._slots.append(slot)
            slot = slot or self._free.get()
        try:
            yield slot
        finally:
            self._free.put(slot)

    def uids(self) -> list[int]:
        """The sandbox uids this pool holds (for leak checks: no process may own one between runs)."""
        return [s.uid for s in self._slots if s.uid is not None]

    def resident_pids(self) -> set[int]:
        """Host pids of the slots' zygotes (bwrap + zygote): the only sandbox-uid processes allowed between
        runs. Leak checks: ``processes_of_uid(uid) - resident_pids()`` must be empty."""
        return set().union(*(s.resident_pids() for s in self._slots))

    def submit_execute(self, code: str, **kwargs) -> Future[ExecutionResult]:
        """Non-blocking ``execute``: returns a Future that always resolves to an ExecutionResult."""
        return self._executor.submit(self._execute, code, kwargs)

    def submit_run_tests(self, program: str, tests: list[str], **kwargs) -> Future[TestReport]:
        """Non-blocking ``run_tests``: returns a Future that always resolves to a TestReport."""
        return self._executor.submit(self._run_tests, program, tests, kwargs)

    def _execute(self, code: str, kwargs: dict) -> ExecutionResult:
        try:
            with self.slot() as slot:
                return execute_on(slot, code, **{**EXECUTE_DEFAULTS, **kwargs})
        except Exception as e:
            return error_result(f"sandbox internal error: {e!r}")

    def _run_tests(self, program: str, tests: list[str], kwargs: dict) -> TestReport:
        try:
            with self.slot() as slot:
                return run_tests_on(slot, program, tests, **{**RUN_TESTS_DEFAULTS, **kwargs})
        except Exception as e:
            results = [TestResult(t, False, f"sandbox error: {e!r}", False) for t in tests]
            return TestReport(0, len(tests), results, False, error_result(f"sandbox error: {e!r}"))

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        for slot in self._slots:
            slot.release()


EXECUTE_DEFAULTS = {"stdin": None, "timeout_s": 5.0, "memory_mb": 1024}
RUN_TESTS_DEFAULTS = {"entry_point": None, "timeout_s": 10.0, "memory_mb": 1024}


def error_result(message: str) -> ExecutionResult:
    return ExecutionResult("", "", None, False, False, False, 0.0, isolation="none", error=message)


_POOL: SandboxPool | None = None
_POOL_LOCK = threading.Lock()


def default_pool() -> SandboxPool:
    """The process-wide pool (created on first use, sized by ``default_workers``)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = SandboxPool()
            atexit.register(_POOL.close)
        return _POOL
