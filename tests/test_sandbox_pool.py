"""Batch forms on the bounded pool: order, futures, explicit errors, and no leaked processes or directories."""

from __future__ import annotations

import os
import time

import pytest

from runtime.sandbox import SandboxPool, default_pool, execute_many, process, run_tests_many
from runtime.sandbox import execution as execution_module
from runtime.sandbox import isolation as iso


def leftovers() -> tuple[list[int], list[str]]:
    """(live processes of this pool's sandbox uids, sandbox work dirs of this process on the host)."""
    pool, resident = default_pool(), default_pool().resident_pids()  # slots' bwrap + zygote may stay
    assert len(resident) <= 2 * len(pool.uids())
    procs = [pid for uid in pool.uids() for pid in iso.processes_of_uid(uid) if pid not in resident]
    dirs = os.listdir(iso.WORK_BASE) if iso.WORK_BASE.exists() else []
    return procs, dirs


def mixed_jobs(n: int) -> list[tuple[str, str | None]]:
    """(code, expected stdout or None) — mostly trivial programs with errors, exits and floods mixed in."""
    kinds = [
        (lambda i: f"print({i})", lambda i: f"{i}\n"),
        (lambda i: f"import sys; print({i}); sys.exit({i % 7})", lambda i: f"{i}\n"),
        (lambda i: f"raise ValueError({i})", lambda i: ""),
        (lambda i: "import os; os._exit(0)", lambda i: ""),
        (lambda i: "import sys\nwhile True: sys.stdout.write('x' * 65536)", lambda i: None),
    ]
    jobs = []
    for i in range(n):
        code, out = kinds[0] if i % 10 else kinds[(i // 10) % len(kinds)]
        jobs.append((code(i), out(i)))
    return jobs


def check_batch(n: int, timeouts: int) -> None:
    procs_before, dirs_before = leftovers()
    jobs = mixed_jobs(n)
    # a generous limit for the real jobs (a loaded CI box must not turn print(i) into a timeout)
    results = execute_many([code for code, _ in jobs], timeout_s=20)
    results += execute_many(["while True: pass"] * timeouts, timeout_s=1)
    assert len(results) == n + timeouts
    for (code, out), r in zip(jobs, results[:n], strict=True):
        assert r.error is None, (code, r.error)
        if out is not None:
            assert r.stdout == out, (code, r)
        else:
            assert r.truncated
        if code.startswith("raise"):
            assert r.returncode == 1 and "ValueError" in r.stderr
    assert all(r.timed_out for r in results[n:])
    assert leftovers() == (procs_before, dirs_before) == ([], [])


def test_batch_accounts_for_every_job_without_leaks():
    check_batch(60, timeouts=2)


@pytest.mark.slow
@pytest.mark.timeout(600)  # zygote fork per job: ~60 runs/s even on a heavily loaded 2-core box (<3 min)
def test_ten_thousand_jobs_all_accounted_for_without_leaks():
    check_batch(10_000, timeouts=4)


def test_futures_do_not_block_the_caller():
    pool = default_pool()
    start = time.monotonic()
    future = pool.submit_execute("import time; time.sleep(1); print('done')", timeout_s=5)
    assert time.monotonic() - start < 0.5 and not future.done()
    assert future.result(timeout=20).stdout == "done\n"


def test_run_tests_many_in_order_with_bad_input_as_explicit_errors():
    programs = ["def f(x): return x + 1", "def f(x): return x", "def f(x): return x + 1"]
    tests = [["assert f(1) == 2"], ["assert f(1) == 2"], ["assert f(1 == 2"]]
    reports = run_tests_many(programs, tests)
    assert [(r.passed, r.total) for r in reports] == [(1, 1), (0, 1), (0, 1)]
    assert "not valid Python" in reports[2].results[0].message and reports[2].execution.error
    with pytest.raises(ValueError, match="2 programs, 1 test lists"):
        run_tests_many(programs[:2], tests[:1])


def test_crashing_sandbox_internals_never_take_the_caller_down(monkeypatch):
    real_launch = execution_module.launch

    def flaky_launch(job, **kw):
        if "BOOM" in job["code"]:
            raise RuntimeError("worker crashed")
        return real_launch(job, **kw)

    monkeypatch.setattr(execution_module, "launch", flaky_launch)
    results = execute_many(["print('a')", "# BOOM", "print('b')"])
    assert [r.stdout for r in results] == ["a\n", "", "b\n"]
    assert results[1].error and "worker crashed" in results[1].error and results[1].returncode is None


def test_launch_failure_is_an_error_result(monkeypatch):
    monkeypatch.setattr(iso, "bwrap_command", lambda *a, **k: ["/nonexistent/bwrap"])  # per-run launch
    monkeypatch.setattr(process, "bwrap_command", lambda *a, **k: ["/nonexistent/bwrap"])  # the zygote
    monkeypatch.setenv("TURNTREE_SANDBOX_MODE", "bwrap")
    iso.detect_mode.cache_clear()
    pool = SandboxPool(1)  # fresh slots: the default pool's zygotes are already running
    try:
        (result,) = execute_many(["print(1)"], pool=pool)
    finally:
        pool.close()
        iso.detect_mode.cache_clear()
    assert result.error and "launch failed" in result.error
    assert not os.listdir(iso.WORK_BASE) if iso.WORK_BASE.exists() else True
