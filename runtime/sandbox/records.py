"""Result records of the sandbox: one execution, one graded test, one test report."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class ExecutionResult:
    """One sandboxed run.

    ``returncode``: the program's exit status (None when it could not be launched or reaped); ``timed_out``:
    killed at the wall-clock or CPU-time limit; ``memory_exceeded``: the program hit the memory limit
    (MemoryError); ``truncated``: stdout/stderr (or the result channel) passed its cap, was cut off and the run
    killed; ``isolation``: "bwrap" (namespaces) or "fallback" (rlimits + uid + seccomp only); ``error``: why the
    sandbox itself failed (launch error, internal exception), None when it worked.
    """

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    memory_exceeded: bool
    truncated: bool
    duration_s: float
    isolation: str = "bwrap"
    error: str | None = None

    @property
    def ok(self) -> bool:
        """Exited with status 0, within limits, and the sandbox itself had no error."""
        return self.returncode == 0 and not (
            self.timed_out or self.memory_exceeded or self.truncated or self.error
        )


@dataclass
class TestResult:
    """One test: ``test`` is its source; ``split`` says the verdict came from the trusted parent evaluating
    the assert on returned plain values (strong), False when the test ran whole inside the sandbox (weaker)."""

    test: str
    passed: bool
    message: str = ""
    split: bool = True
    __test__ = False  # not a pytest test class


@dataclass
class TestReport:
    """Graded run of a program against its tests. ``tampered``: the result channel carried records without
    the run's nonce, duplicates, or records after the end marker; a tampered run scores 0."""

    passed: int
    total: int
    results: list[TestResult] = field(default_factory=list)
    tampered: bool = False
    execution: ExecutionResult | None = None
    __test__ = False  # not a pytest test class

    @property
    def fraction(self) -> float:
        return self.passed / self.total if self.total else 0.0

    @property
    def all_passed(self) -> bool:
        return self.total > 0 and self.passed == self.total

    @property
    def sandbox_failed(self) -> bool:
        """The sandbox itself failed (launch failed, worker died, internal error): the counts say nothing
        about the program, so they must not become a reward (``stages.score`` retries, then marks the job)."""
        return self.execution is not None and self.execution.error is not None
