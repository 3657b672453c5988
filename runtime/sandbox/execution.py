"""``execute`` and ``run_tests`` on one already-reserved uid slot (the pool module reserves slots)."""

from __future__ import annotations

import secrets

from runtime.sandbox.grading import PlannedTest, TestPlan, decode, parse_records, plan_tests, short_repr
from runtime.sandbox.isolation import Limits, RawRun, UidSlot, launch
from runtime.sandbox.records import ExecutionResult, TestReport, TestResult


def to_result(raw: RawRun, nonce: str) -> ExecutionResult:
    stderr = raw.stderr.decode("utf-8", "replace")
    memory = f"{nonce} ".encode() + b'{"k": "exc", "type": "MemoryError"}' in raw.records
    last_line = stderr.rstrip().rsplit("\n", 1)[-1]
    return ExecutionResult(
        stdout=raw.stdout.decode("utf-8", "replace"),
        stderr=stderr,
        returncode=raw.returncode,
        timed_out=raw.timed_out,
        memory_exceeded=memory or last_line.startswith("MemoryError"),
        truncated=raw.truncated,
        duration_s=raw.duration_s,
        isolation=raw.isolation,
        error=raw.error,
    )


def execute_on(
    slot: UidSlot, code: str, *, stdin: str | None, timeout_s: float, memory_mb: int
) -> ExecutionResult:
    """Run ``code`` as ``__main__`` with ``stdin``; see ``runtime.sandbox.execute``."""
    nonce = secrets.token_hex(16)
    job = {"mode": "exec", "code": code, "nonce": nonce}
    raw = launch(
        job, limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb), slot=slot, stdin=(stdin or "").encode()
    )
    return to_result(raw, nonce)


def run_tests_on(
    slot: UidSlot,
    program: str,
    tests: list[str],
    *,
    entry_point: str | None,
    timeout_s: float,
    memory_mb: int,
) -> TestReport:
    """Grade ``program`` against ``tests``; see ``runtime.sandbox.run_tests``."""
    plan = plan_tests(program, tests, entry_point)
    nonce = secrets.token_hex(16)
    job = {"mode": "tests", "code": program, "setup": plan.setup, "items": plan.items, "nonce": nonce}
    job["filename"] = "solution.py"
    raw = launch(job, limits=Limits(timeout_s=timeout_s, memory_mb=memory_mb), slot=slot)
    execution = to_result(raw, nonce)
    load, found, _ended, tampered = parse_records(raw.records, nonce, len(plan.items))
    results = []
    for test in plan.tests:
        try:
            results.append(_grade(test, plan, load, found, execution))
        except ValueError:  # a value record that does not decode was not written by our runner
            tampered = True
            results.append(TestResult(test.source, False, "malformed result record", test.split))
    if tampered:
        results = [
            TestResult(r.test, False, "run tampered with the result channel", r.split) for r in results
        ]
    passed = sum(r.passed for r in results)
    return TestReport(
        passed=passed, total=len(results), results=results, tampered=tampered, execution=execution
    )


def _missing_reason(execution: ExecutionResult) -> str:
    if execution.error:
        return f"sandbox error: {execution.error}"
    if execution.timed_out:
        return "no result: timed out before this test finished"
    if execution.truncated:
        return "no result: output limit exceeded, run stopped"
    if execution.memory_exceeded:
        return "no result: memory limit exceeded"
    return f"no result: the program exited (status {execution.returncode}) before this test finished"


def _grade(
    test: PlannedTest, plan: TestPlan, load: dict | None, found: dict, execution: ExecutionResult
) -> TestResult:
    def fail(message: str) -> TestResult:
        return TestResult(test.source, False, message, test.split)

    if load is None:
        return fail(_missing_reason(execution))
    if not load.get("ok"):
        return fail(f"program failed to load: {load.get('err', '')}")
    records = [found.get(i) for i in test.items]
    if any(r is None for r in records):
        return fail(_missing_reason(execution))
    for i, record in zip(test.items, records, strict=False):
        if not record.get("ok"):
            what = plan.items[i]["src"] if test.split else "test"
            verb = "" if record.get("value") else "raised "
            return fail(f"{what} {verb}{record.get('err', 'an exception')}")
    if not test.split:
        return TestResult(test.source, True, "", False)
    values = {f"__v{i}": decode(r["v"]) for i, r in zip(test.items, records, strict=False)}
    returned = "; ".join(
        f"{plan.items[i]['src']} returned {short_repr(values[f'__v{i}'])}" for i in test.items
    )
    try:
        ok = bool(eval(compile(test.expr, "<assert>", "eval"), {**plan.parent_names, **values}))  # noqa: S307
    except Exception as e:
        return fail(f"{returned} (assert raised {type(e).__name__}: {e})")
    return TestResult(test.source, True, "", True) if ok else fail(returned)
