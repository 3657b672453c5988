"""Nothing hangs: vLLM's engine leaves the process's log handlers alone (the dictConfig deadlock with Prefect's API
log handler), a stalled stage fails with every thread's stack on file, and SIGTERM ends a process within seconds
even when its signal handler is stuck behind a lock. Each scenario runs in its own interpreter: a stuck one is
exactly what is tested."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.procs import alive

REPO = Path(__file__).resolve().parents[1]


def _script(tmp_path: Path, body: str) -> Path:
    path = tmp_path / "scenario.py"
    path.write_text(f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + textwrap.dedent(body))
    return path


def _start(path: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_for(proc: subprocess.Popen, line: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = proc.stdout.readline()
        if got.strip() == line:
            return
        if not got and proc.poll() is not None:
            break
    proc.kill()
    pytest.fail(f"the scenario never printed {line!r}: {proc.stderr.read()}")


# A main thread that waits forever for a lock another thread holds: a deadlock at 0% CPU.
STUCK = """
import threading, time
from runtime import watchdog
held = threading.Lock(); held.acquire()
"""


def test_stalled_main_thread_gets_stage_stalled_and_the_stacks_are_on_file(tmp_path):
    dump = tmp_path / "logs" / "watchdog.txt"
    path = _script(
        tmp_path,
        STUCK
        + f"""
def wait_for_the_engine():
    held.acquire()
with watchdog.Watchdog({str(dump)!r}, stall_s=1.0, poll_s=0.2) as w:
    watchdog.beat("rollout (iteration 1)")
    print("ready", flush=True)
    try:
        wait_for_the_engine()
    except watchdog.StageStalled as e:
        print("stalled:", e, flush=True)
""",
    )
    proc = _start(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stalled: stage rollout (iteration 1) made no progress for" in out
    assert str(dump) in out and "rerun the same command to resume" in out
    text = dump.read_text()
    assert "wait_for_the_engine" in text  # the main thread's stack, stuck in its lock wait
    assert "Current thread" in text or "Thread 0x" in text


def test_a_stall_that_does_not_unwind_ends_the_process_with_one_line(tmp_path):
    dump = tmp_path / "watchdog.txt"
    path = _script(
        tmp_path,
        STUCK
        + f"""
with watchdog.Watchdog({str(dump)!r}, stall_s=1.0, poll_s=0.2, exit_grace_s=1.0):
    watchdog.beat("update (iteration 2)")
    while True:
        try:
            held.acquire()
        except BaseException:
            pass  # a handler that swallows everything: the watchdog still ends it
""",
    )
    proc = _start(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 3
    lines = [line for line in err.splitlines() if line.startswith("turntree:")]
    assert len(lines) == 1 and "update (iteration 2) made no progress" in lines[0]
    assert dump.exists()


def test_progress_or_cpu_use_is_not_a_stall(tmp_path):
    path = _script(
        tmp_path,
        """
import time
from runtime import progress, watchdog
with watchdog.Watchdog("unused.txt", stall_s=0.6, poll_s=0.1) as w:
    t = time.monotonic()
    while time.monotonic() - t < 2.5:   # silent but busy: a long matmul
        sum(i * i for i in range(20000))
    for k in range(10):                 # idle but reporting
        progress.report("rollout", k, 10)
        time.sleep(0.2)
print("ok", w.stalled, flush=True)
""",
    )
    proc = _start(path)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert out.strip() == "ok None"


def test_sigterm_ends_a_process_whose_handler_is_stuck(tmp_path):
    """Prefect's SIGTERM handler logs; with logging's lock held by a stuck thread it never returns."""
    dump = tmp_path / "watchdog.txt"
    path = _script(
        tmp_path,
        STUCK
        + f"""
import signal, subprocess
def handler(*_):
    held.acquire()   # stands for a handler that needs a lock a deadlocked thread holds
signal.signal(signal.SIGTERM, handler)
# what a run starts (a temporary Prefect server, a vLLM engine): one ends on SIGTERM, one ignores it
quiet = dict(stdin=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # the test reads the scenario's pipes to EOF
polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL, **quiet)
deaf = subprocess.Popen([sys.executable, "-c",
    "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('deaf', flush=True); time.sleep(600)"],
    stdout=subprocess.PIPE, text=True, **quiet)
assert deaf.stdout.readline().strip() == "deaf"
print("children", polite.pid, deaf.pid, flush=True)
with watchdog.Watchdog({str(dump)!r}, stall_s=0, grace_s=1.0, poll_s=0.2, child_grace_s=1.0):
    watchdog.beat("evaluate (iteration 0)")
    print("ready", flush=True)
    while True:
        time.sleep(1)
""",
    )
    proc = _start(path)
    first = proc.stdout.readline().split()
    assert first[0] == "children", first
    children = [int(pid) for pid in first[1:]]
    _wait_for(proc, "ready")
    assert all(alive(pid) for pid in children)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("SIGTERM did not end the process")
    assert time.monotonic() - t0 < 10
    assert proc.returncode == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "SIGTERM: ended while evaluate (iteration 0)" in err
    assert "handler" in dump.read_text()
    deadline = time.monotonic() + 10  # os._exit skips atexit: the watchdog itself ended both children
    while time.monotonic() < deadline and any(alive(pid) for pid in children):
        time.sleep(0.1)
    assert not [pid for pid in children if alive(pid)]


def test_a_handler_that_returns_ends_the_process_normally(tmp_path):
    """The usual case: the Python handler runs (the watchdog woke the main thread) and the run unwinds."""
    path = _script(
        tmp_path,
        STUCK
        + """
import signal
class Terminated(BaseException): pass
def handler(*_): raise Terminated()
signal.signal(signal.SIGTERM, handler)
try:
    with watchdog.Watchdog("unused.txt", stall_s=0, grace_s=30):
        print("ready", flush=True)
        held.acquire()   # blocked in a lock wait in the main thread
except Terminated:
    print("unwound", flush=True)
""",
    )
    proc = _start(path)
    _wait_for(proc, "ready")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=20)
    assert proc.returncode == 0 and "unwound" in out


def test_stall_timeout_from_the_environment(monkeypatch):
    from runtime import watchdog

    monkeypatch.setenv(watchdog.STALL_ENV, "120")
    assert watchdog.stall_timeout() == 120
    monkeypatch.setenv(watchdog.STALL_ENV, "soon")
    with pytest.raises(ValueError, match="not a number of seconds"):
        watchdog.stall_timeout()
    monkeypatch.delenv(watchdog.STALL_ENV)
    assert watchdog.stall_timeout() == watchdog.DEFAULT_STALL_S


def test_vllm_engine_build_leaves_the_process_log_handlers_alone(tiny_model, tmp_path):
    """vLLM used to apply a non-incremental dictConfig while building its engine: every handler in the process
    (Prefect's API log handler among them) was flushed and closed under logging's lock — the deadlock."""
    path = _script(
        tmp_path,
        f"""
import logging, logging.config
from runtime.env import apply_defaults
apply_defaults(offline=True, quiet=True)
events = []
class Sentinel(logging.Handler):
    def emit(self, record): pass
    def close(self):
        events.append("closed"); super().close()
sentinel = Sentinel()
logging.getLogger().addHandler(sentinel)
real = logging.config.dictConfig
logging.config.dictConfig = lambda cfg: (events.append("dictConfig"), real(cfg))
from runtime.engines.vllm import VLLMEngine
engine = VLLMEngine({str(tiny_model)!r}, seed=0)
print("events", events, sentinel in logging.getLogger().handlers, flush=True)
""",
    )
    proc = _start(path)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "events [] True" in out, out
