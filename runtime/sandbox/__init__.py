"""Sandboxed code execution: the one way turntree runs model-written code (rollouts, rewards, evaluation).

Use::

    from runtime.sandbox import execute, run_tests, feedback_text, execute_many, run_tests_many
    r = execute("print(input()[::-1])", stdin="abc")            # ExecutionResult(stdout="cba\\n", ...)
    rep = run_tests(program, ["assert add(1, 2) == 3"])          # TestReport(passed=1, total=1, ...)
    text = feedback_text(rep)                                    # what the model sees next turn
    futures = [default_pool().submit_run_tests(p, t) for p, t in jobs]   # non-blocking, for rollout loops

What IS isolated (mode "bwrap", the default where user namespaces work; each property has an attack test in
tests/test_sandbox_isolation.py):
- Identity: every run starts under an unprivileged uid (3500000 + slot) reserved per concurrent run with a
  file lock in one machine-wide root-only directory (``/run/turntree-sandbox-uids``, whatever the TMPDIR),
  so RLIMIT_NPROC works (it does nothing for uid 0), runs cannot signal each other, and no two processes on
  the machine share a uid; only a slot's holder ever kills the uid's processes.
- Namespaces: bubblewrap ``--unshare-all`` (user, pid, net, ipc, uts, cgroup, mount) ``--as-pid-1
  --die-with-parent --new-session --clearenv``. Filesystem: read-only ``/usr`` (the interpreter is the system
  python3 when this process's interpreter is not readable by other uids, e.g. under a 0700 /root), fresh
  size-capped tmpfs ``/tmp``, ``/work`` (the working directory) and ``/dev/shm`` per run, private ``/proc``
  and a read-only ``/dev`` (device nodes only: no file written there can reach a later run); nothing else of
  the host is visible, nothing outside the run survives it. No nested user namespace (``--disable-userns``).
- System calls (every mode, ``inside.install_seccomp``): a seccomp filter fails unshare, setns, mount and the
  new mount API, clone with CLONE_NEWUSER (clone3 answers ENOSYS, so libc uses clone, whose flags the filter
  reads), keyctl, bpf, userfaultfd, perf_event_open, ptrace, process_vm_*, module and kexec calls, io_uring
  and open_by_handle_at; a foreign ABI (i386, x32) kills the process.
- Fast path (``zygote.py``, default in bwrap mode; ``TURNTREE_SANDBOX_ZYGOTE=0`` turns it off): one
  long-lived bubblewrap per worker slot whose pid 1 is a trusted zygote; per run it forks a child into fresh
  mount, pid and IPC namespaces (the fresh tmpfs mounts and ``/proc`` above), with every capability dropped,
  its own session and the run's rlimits, so no file, process, IPC object, environment change or module state
  of one run reaches the next. Shared by the runs of one slot: the interpreter's hash seed and the (empty)
  network namespace. The zygote kills everything after each run and checks that only itself is left; any
  failure of it costs a restart of the slot, never a wrong result.
- Network: a new, empty network namespace (no interface is up; connecting to the host's 127.0.0.1 fails).
- Limits: wall clock (``timeout_s``, the whole namespace is killed), CPU time ceil(timeout_s) s (SIGXCPU, then
  SIGKILL), address space ``memory_mb``, 64 processes/threads, 16 MiB per file, 128 open files, no core
  dumps, stdout/stderr capped at 1 MiB each (the run is killed at the cap).
- No survivors: the program is pid 1 of its pid namespace; when it exits or is killed, the kernel kills
  every process in it, including ``setsid``/double-forked daemons. The parent waits on a pidfd (per-run
  launch) or the zygote's status line, never on pipe EOF.
- Environment: ``--clearenv`` (PATH, HOME, LANG only); ``/proc`` shows only the run's own processes.
- Test verdicts: see ``grading`` — the parent parses each assert, only the calls run inside, plain values
  come back on a private pipe tagged with a per-run nonce, and the parent evaluates the assert itself.

What is NOT isolated: the host kernel (a kernel exploit through an allowed syscall escapes);
CPU and memory bandwidth (a run can slow its neighbours); memory is limited per process (address space) not
per run, so up to 64 processes x ``memory_mb`` plus 2 x 64 MiB of tmpfs is the worst case; ``/usr`` is
readable (public system files). Tests that cannot be split (they use helpers or classes of the program,
loops or statements in a check block) run whole inside the sandbox: their verdict is weaker, since the program
can tamper with them from inside (``TestResult.split`` is False).

Fallback (mode "fallback": only when asked for by name, ``TURNTREE_SANDBOX_MODE=fallback``; where bwrap
cannot run, the sandbox otherwise refuses with one line, ``SandboxUnavailable``; logged as a warning and
reported in ``ExecutionResult.isolation``): runs get the same rlimits, dropped uid and seccomp filter, which also denies non-Unix
sockets, a fresh working directory under the temp dir (deleted after the run), a scrubbed environment, and a
sweep that kills every process of the uid after the run and reaps their zombies (this process adopts the
program's orphans: PR_SET_CHILD_SUBREAPER; left to a pid 1 that does not reap, a fork bomb's zombies held
the uid at its process limit and broke the slot for every later run); but the host filesystem stays visible (only what
other users may read; /tmp is shared) and other processes are visible in /proc.
``TURNTREE_SANDBOX_MODE=bwrap|fallback`` forces a mode; ``TURNTREE_SANDBOX_WORKERS`` sizes the pool.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from runtime.sandbox.feedback import feedback_text
from runtime.sandbox.pool import SandboxPool, default_pool
from runtime.sandbox.raybatch import RayBatches
from runtime.sandbox.records import ExecutionResult, TestReport, TestResult

log = logging.getLogger(__name__)

__all__ = [
    "ExecutionResult",
    "RayBatches",
    "SandboxPool",
    "TestReport",
    "TestResult",
    "default_pool",
    "execute",
    "execute_many",
    "feedback_text",
    "run_tests",
    "run_tests_many",
]


def execute(
    code: str, *, stdin: str | None = None, timeout_s: float = 5, memory_mb: int = 1024
) -> ExecutionResult:
    """Run ``code`` as ``__main__`` in the sandbox with ``stdin``; never raises for what the code does."""
    from runtime.sandbox.execution import execute_on

    _check_limits(timeout_s, memory_mb)
    with default_pool().slot() as slot:
        return execute_on(slot, code, stdin=stdin, timeout_s=timeout_s, memory_mb=memory_mb)


def run_tests(
    program: str,
    tests: list[str],
    *,
    entry_point: str | None = None,
    timeout_s: float = 10,
    memory_mb: int = 1024,
) -> TestReport:
    """Grade ``program`` against ``tests`` (assert strings, or one HumanEval ``def check(candidate)`` block
    whose candidate is ``entry_point``); all tests share one run and ``timeout_s``.

    Raises ValueError for tests that are not valid Python (bad input, not a program failure).
    """
    from runtime.sandbox.execution import run_tests_on

    _check_limits(timeout_s, memory_mb)
    with default_pool().slot() as slot:
        return run_tests_on(
            slot, program, tests, entry_point=entry_point, timeout_s=timeout_s, memory_mb=memory_mb
        )


def execute_many(
    codes: Sequence[str],
    *,
    stdins: Sequence[str | None] | None = None,
    timeout_s: float = 5,
    memory_mb: int = 1024,
    pool: SandboxPool | RayBatches | None = None,
) -> list[ExecutionResult]:
    """``execute`` for each code on the bounded pool; results in input order, one per code, never raising
    (a failed run has ``error`` set). For a non-blocking form use ``pool.submit_execute``. A ``RayBatches``
    pool runs the batch as Ray tasks, each through its node's own pool (``runtime.sandbox.raybatch``)."""
    _check_limits(timeout_s, memory_mb)
    stdins = list(stdins) if stdins is not None else [None] * len(codes)
    if len(stdins) != len(codes):
        raise ValueError(f"execute_many: {len(codes)} codes but {len(stdins)} stdins")
    if isinstance(pool, RayBatches):
        return pool.execute_many(codes, stdins=stdins, timeout_s=timeout_s, memory_mb=memory_mb)
    pool = pool or default_pool()
    kw = {"timeout_s": timeout_s, "memory_mb": memory_mb}
    futures = [
        pool.submit_execute(code, stdin=stdin, **kw) for code, stdin in zip(codes, stdins, strict=False)
    ]
    return [f.result() for f in futures]


def run_tests_many(
    programs: Sequence[str],
    tests: Sequence[list[str]],
    *,
    entry_points: Sequence[str | None] | None = None,
    timeout_s: float = 10,
    memory_mb: int = 1024,
    pool: SandboxPool | RayBatches | None = None,
    retries: int = 0,
) -> list[TestReport]:
    """``run_tests`` for each (program, tests, entry point) on the bounded pool; reports in input order, one per
    program, never raising (bad tests give a report whose results say why). Non-blocking:
    ``pool.submit_run_tests``; as Ray tasks: a ``RayBatches`` pool.

    ``retries``: a job whose sandbox failed (``TestReport.sandbox_failed``: launch failed, worker died, ...) got
    no verdict on the program; it runs again, up to ``retries`` more times. One still failed after that comes
    back as it is: the caller keeps it out of every statistic."""
    reports = _run_tests_once(programs, tests, entry_points, timeout_s, memory_mb, pool)
    for _ in range(retries):
        failed = [i for i, r in enumerate(reports) if r.sandbox_failed]
        if not failed:
            break
        log.warning(
            "sandbox: %d of %d jobs failed (%s); running them again",
            len(failed), len(reports), reports[failed[0]].execution.error,
        )  # fmt: skip
        again = _run_tests_once(
            [programs[i] for i in failed],
            [tests[i] for i in failed],
            [entry_points[i] for i in failed] if entry_points is not None else None,
            timeout_s,
            memory_mb,
            pool,
        )
        for i, report in zip(failed, again, strict=True):
            reports[i] = report
    return reports


def _run_tests_once(programs, tests, entry_points, timeout_s, memory_mb, pool) -> list[TestReport]:
    _check_limits(timeout_s, memory_mb)
    entry_points = list(entry_points) if entry_points is not None else [None] * len(programs)
    if not len(programs) == len(tests) == len(entry_points):
        raise ValueError(
            f"run_tests_many: {len(programs)} programs, {len(tests)} test lists, {len(entry_points)} entry points"
        )
    if isinstance(pool, RayBatches):
        return pool.run_tests_many(
            programs, tests, entry_points=entry_points, timeout_s=timeout_s, memory_mb=memory_mb
        )
    pool = pool or default_pool()
    kw = {"timeout_s": timeout_s, "memory_mb": memory_mb}
    futures = [
        pool.submit_run_tests(p, list(t), entry_point=e, **kw)
        for p, t, e in zip(programs, tests, entry_points, strict=False)
    ]
    return [f.result() for f in futures]


def _check_limits(timeout_s: float, memory_mb: int) -> None:
    if not 0 < timeout_s <= 3600:
        raise ValueError(f"sandbox timeout_s must be in (0, 3600], got {timeout_s}")
    if not 16 <= memory_mb <= 1 << 20:
        raise ValueError(f"sandbox memory_mb must be in [16, 1048576], got {memory_mb}")
