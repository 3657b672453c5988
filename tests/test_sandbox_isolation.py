"""Attacks on the sandbox's isolation, one per property listed in runtime/sandbox/__init__.py (issue 4).

Each test runs real hostile programs through the real sandbox, in the default mode (bubblewrap where user
namespaces work) and, for the properties the fallback promises, in the forced fallback mode too.
"""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import textwrap
import time

import pytest

from runtime.sandbox import SandboxPool, default_pool, execute, execute_many
from runtime.sandbox import isolation as iso


def survivors() -> list[int]:
    """Processes owned by any sandbox uid this process holds (must be none between runs)."""
    resident = default_pool().resident_pids()  # each slot's long-lived bwrap + zygote (zygote.py)
    assert len(resident) <= 2 * len(default_pool().uids())
    return [pid for uid in default_pool().uids() for pid in iso.processes_of_uid(uid) if pid not in resident]


def run(code: str, **kw):
    return execute(textwrap.dedent(code), **kw)


@pytest.fixture(params=["bwrap", "fallback"])
def mode(request, monkeypatch):
    """Run the test in each isolation mode (bwrap is skipped where namespaces do not work)."""
    if request.param == "bwrap" and iso.detect_mode() != "bwrap":
        pytest.skip("user namespaces unavailable here; the fallback variant runs instead")
    monkeypatch.setenv("TURNTREE_SANDBOX_MODE", request.param)
    iso.detect_mode.cache_clear()
    yield request.param
    monkeypatch.delenv("TURNTREE_SANDBOX_MODE")
    iso.detect_mode.cache_clear()


def test_runs_and_reports_mode(mode):
    r = run("import sys; print(input()[::-1]); print('err', file=sys.stderr)", stdin="abc")
    assert (r.stdout, r.stderr, r.returncode, r.isolation) == ("cba\n", "err\n", 0, mode)
    assert r.ok and not r.timed_out and r.duration_s > 0


def test_runs_as_unprivileged_uid_with_limits(mode):
    r = run(
        """
        import os, resource
        print(os.getuid(), os.getgid(), os.getgroups())
        for name in ("RLIMIT_CPU", "RLIMIT_AS", "RLIMIT_NPROC", "RLIMIT_FSIZE", "RLIMIT_NOFILE"):
            print(name, *resource.getrlimit(getattr(resource, name)))
        """,
        timeout_s=2.5,
        memory_mb=300,
    )
    lines = r.stdout.splitlines()
    uid, gid, groups = lines[0].split(" ", 2)
    if os.geteuid() == 0:
        assert int(uid) >= iso.UID_BASE and int(gid) >= iso.UID_BASE and groups == "[]"
    limits = dict(line.split(" ", 1) for line in lines[1:])
    assert limits["RLIMIT_CPU"] == "3 4"  # ceil(2.5) soft, +1 hard
    assert limits["RLIMIT_AS"] == f"{300 << 20} {300 << 20}"
    assert limits["RLIMIT_NPROC"] == "64 64"


def test_timeout_kills_infinite_loop_and_everything_it_spawned(mode):
    start = time.monotonic()
    r = run(
        """
        import os, subprocess
        subprocess.Popen(["sleep", "300"])
        if os.fork() == 0:
            while True: pass
        while True: pass
        """,
        timeout_s=1,
    )
    assert r.timed_out and not r.ok
    assert time.monotonic() - start < 4
    assert survivors() == []


def test_memory_limit_huge_allocation_fails_inside(mode):
    r = run("x = bytearray(8 * 2**30)\nprint('allocated')", memory_mb=256)
    assert r.memory_exceeded and r.returncode == 1 and "allocated" not in r.stdout
    assert "MemoryError" in r.stderr


def test_memory_limit_growing_list_fails_inside(mode):
    r = run("x = []\nwhile True: x.append(bytearray(1 << 20))", memory_mb=200, timeout_s=10)
    assert r.memory_exceeded and not r.timed_out


def test_fork_bomb_is_contained(mode):
    r = run(
        """
        import os, time
        n = 0
        for _ in range(500):
            try:
                if os.fork() == 0:
                    time.sleep(60)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n, flush=True)
        while True:
            try: os.fork()
            except OSError: pass
        """,
        timeout_s=2,
    )
    assert r.timed_out
    assert 0 < int(r.stdout.split()[0]) < 64  # RLIMIT_NPROC stopped it well before 500
    assert subprocess.run(["true"]).returncode == 0  # the host can still start processes
    assert survivors() == []


def test_after_a_fork_bomb_the_next_program_can_fork(mode):
    """The bomb's killed children are zombies until someone reaps them. Orphaned to a pid 1 that does not
    reap (a VM or container init), they kept the slot's uid at RLIMIT_NPROC, and every later program on the
    slot failed its first fork: the sandbox's fault scored as the program's."""
    bomb = run(
        """
        import os
        while True:
            try: os.fork()
            except OSError: pass
        """,
        timeout_s=1,
    )
    assert bomb.timed_out
    zombies = [
        pid
        for uid in default_pool().uids()
        for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
        if _owned_zombie(pid, uid)
    ]
    assert zombies == []
    r = run('import subprocess; print(subprocess.run(["true"]).returncode)')
    assert (r.stdout, r.returncode, r.stderr) == ("0\n", 0, "")


def _owned_zombie(pid: int, uid: int) -> bool:
    try:
        return os.stat(f"/proc/{pid}").st_uid == uid and iso.process_state(pid) == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def test_no_network_to_host_loopback(mode):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    r = run(
        f"""
        import socket
        try:
            socket.create_connection(("127.0.0.1", {listener.getsockname()[1]}), timeout=1)
            print("connected")
        except OSError as e:
            print("refused", type(e).__name__)
        """
    )
    listener.setblocking(False)
    with pytest.raises(BlockingIOError):  # nothing completed a handshake with the listener
        listener.accept()
    listener.close()
    assert r.stdout.startswith("refused")


def test_canary_file_elsewhere_is_unreadable_and_survives(mode, tmp_path):
    tmp_path.chmod(0o700)  # what other users' private files look like to the sandbox uid in fallback mode
    canary = tmp_path / "canary.txt"
    canary.write_text("secret answer 42")
    r = run(
        f"""
        import os
        for action in (lambda p: open(p).read(), os.remove):
            try:
                print(action({str(canary)!r}))
            except OSError as e:
                print("denied", type(e).__name__)
        """
    )
    assert "secret answer" not in r.stdout and r.stdout.count("denied") == 2
    assert canary.read_text() == "secret answer 42"


def needs_bwrap() -> None:
    if iso.detect_mode() != "bwrap":
        pytest.skip("a private filesystem view needs bwrap (the fallback documents a shared /tmp)")


def test_no_writes_outside_throwaway_dirs():
    needs_bwrap()
    r = run(
        """
        import os
        for path in ("/usr/evil.txt", "/evil.txt", "/proc/evil.txt"):
            try:
                open(path, "w").write("x")
                print("wrote", path)
            except OSError as e:
                print("denied", path)
        print(sorted(os.listdir("/")))
        """
    )
    assert "wrote" not in r.stdout and r.stdout.count("denied") == 3
    visible = set(eval(r.stdout.splitlines()[-1]))
    assert visible <= {"usr", "bin", "lib", "lib64", "lib32", "sbin", "proc", "dev", "tmp", "work"}
    assert not os.path.exists("/usr/evil.txt") and not os.path.exists("/evil.txt")


def test_tmp_is_not_shared_between_runs():
    needs_bwrap()
    first = run("open('/tmp/answer.txt', 'w').write('42'); open('answer.txt', 'w').write('42'); print('ok')")
    second = run("import os; print(os.path.exists('/tmp/answer.txt'), os.path.exists('answer.txt'))")
    assert first.stdout == "ok\n" and second.stdout == "False False\n"


def test_file_size_limit():
    r = run("open('big', 'wb').write(b'x' * (64 << 20))", memory_mb=512)
    assert r.returncode != 0


def test_output_flood_is_cut_off_quickly(mode):
    start = time.monotonic()
    r = run("for _ in range(10**4):\n    print('x' * 10**5)", timeout_s=30)  # 10^9 characters
    assert r.truncated and not r.timed_out
    assert time.monotonic() - start < 5
    assert len(r.stdout) <= iso.Limits().output_bytes
    assert survivors() == []


def test_daemonised_children_do_not_survive_and_do_not_block(mode):
    start = time.monotonic()
    r = run(
        """
        import os, subprocess, time
        subprocess.Popen(["sleep", "120"], start_new_session=True)
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                time.sleep(120)  # holds stdout/stderr open
            os._exit(0)
        print("parent done")
        """,
        timeout_s=20,
    )
    assert (r.stdout, r.returncode, r.timed_out) == ("parent done\n", 0, False), r.stderr[-500:]
    assert time.monotonic() - start < 5  # waited on the process, not on pipe EOF
    assert survivors() == []


def test_environment_is_scrubbed(mode, monkeypatch):
    monkeypatch.setenv("TURNTREE_TEST_SECRET", "hunter2-token")
    r = run(
        """
        import os
        print(sorted(os.environ))
        leaked = []
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    leaked.append(open(f"/proc/{pid}/environ", "rb").read())
                except OSError:
                    pass
        print(any(b"hunter2" in e for e in leaked))
        """
    )
    names, leaked = r.stdout.splitlines()
    assert set(eval(names)) <= {"PATH", "HOME", "LANG", "PWD", "LC_CTYPE"} and leaked == "False"
    assert "hunter2" not in r.stdout


def test_bwrap_shows_only_own_processes():
    needs_bwrap()
    r = run("import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))")
    assert eval(r.stdout) == [1]


def test_missing_namespaces_refuse_unless_fallback_is_named(monkeypatch, caplog):
    """Issue 21 finding 5: where bwrap cannot run, the sandbox used to fall back with a warning."""
    monkeypatch.delenv("TURNTREE_SANDBOX_MODE", raising=False)
    monkeypatch.setattr(iso, "bwrap_binary", lambda: None)
    iso.detect_mode.cache_clear()
    try:
        with pytest.raises(iso.SandboxUnavailable, match="TURNTREE_SANDBOX_MODE=fallback") as e:
            iso.detect_mode()
        assert "\n" not in str(e.value) and "no bwrap binary" in str(e.value)
        with pytest.raises(iso.SandboxUnavailable):
            execute("print(1)")  # refused, never a result
        monkeypatch.setenv("TURNTREE_SANDBOX_MODE", "fallback")
        iso.detect_mode.cache_clear()
        with caplog.at_level(logging.WARNING, logger="runtime.sandbox.isolation"):
            assert execute("print(1)").isolation == "fallback"
        assert "FALLBACK" in caplog.text
    finally:
        iso.detect_mode.cache_clear()


def test_no_state_survives_between_runs_of_one_worker_slot():
    """Same slot, same zygote: files, /dev/shm, module state, environment, children and kill(-1) of run 1
    leave nothing for run 2 (each run is a fresh fork in fresh namespaces)."""
    needs_bwrap()
    pool = SandboxPool(1)
    try:
        first = execute_many(
            [
                """
import json, os, sys, subprocess
json.leaked = 42
sys.modules["leak"] = json
os.environ["LEAK"] = "1"
for path in ("/tmp/a", "/work/a", "/dev/shm/a"):
    open(path, "w").write("x")
subprocess.Popen(["sleep", "60"], start_new_session=True)
print("ok", flush=True)
os.kill(-1, 9)
"""
            ],
            pool=pool,
        )[0]
        second = execute_many(
            [
                """
import json, os, sys
print(hasattr(json, "leaked"), "leak" in sys.modules, "LEAK" in os.environ,
      [os.path.exists(p) for p in ("/tmp/a", "/work/a", "/dev/shm/a")],
      sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"""
            ],
            pool=pool,
        )[0]
        assert first.stdout == "ok\n" and first.error is None
        assert second.stdout == "False False False [False, False, False] [1]\n", second
        uid = pool.uids()[0]
        assert set(iso.processes_of_uid(uid)) <= pool.resident_pids()
    finally:
        pool.close()


def test_dev_is_read_only_and_dev_shm_is_fresh_and_sized_per_job():
    """Issue 21 finding 3: a program wrote /dev/planted and the next programs of the slot read it back."""
    needs_bwrap()
    pool = SandboxPool(1)
    try:
        plant = """
import os
for path in ("/dev/planted", "/dev/shm/planted"):
    try:
        open(path, "w").write("the answer is 42")
        print("wrote", path)
    except OSError as e:
        print("denied", path, e.errno)
st = os.statvfs("/dev/shm")
print("shm bytes", st.f_blocks * st.f_frsize)
"""
        look = "import os; print([os.path.exists(p) for p in ('/dev/planted', '/dev/shm/planted')])"
        first, second, third = execute_many([plant, look, look], pool=pool)
        assert "denied /dev/planted 30" in first.stdout  # EROFS
        assert "wrote /dev/shm/planted" in first.stdout  # its own fresh /dev/shm...
        shm = int(first.stdout.split("shm bytes ")[1])
        assert 0 < shm <= 256 << 20  # ...sized like /tmp
        assert second.stdout == third.stdout == "[False, False]\n"
    finally:
        pool.close()


NESTED_USERNS = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWNS = 0x10000000, 0x40000000, 0x20000
for name, flags in (("user+net", CLONE_NEWUSER | CLONE_NEWNET), ("user", CLONE_NEWUSER), ("mount", CLONE_NEWNS)):
    rc = libc.unshare(flags)
    print(name, "unshared" if rc == 0 else f"refused {ctypes.get_errno()}")
# clone(2) with CLONE_NEWUSER directly, the other door (raw syscall: 56 on x86_64, 220 on aarch64)
import platform
nr = {"x86_64": 56, "aarch64": 220}[platform.machine()]
SIGCHLD = 17
pid = libc.syscall(nr, CLONE_NEWUSER | SIGCHLD, 0, 0, 0, 0)
if pid == 0:
    os._exit(0)
print("clone", "created" if pid > 0 else f"refused {ctypes.get_errno()}")
if pid > 0:
    os.waitpid(pid, 0)
"""


def test_no_nested_user_namespace(mode):
    """Issue 21 finding 4: unshare(CLONE_NEWUSER | CLONE_NEWNET) succeeded inside a job with every capability."""
    r = run(NESTED_USERNS)
    assert r.error is None, r
    lines = r.stdout.splitlines()
    assert lines[0].startswith("user+net refused") and lines[1].startswith("user refused"), r.stdout
    assert lines[2].startswith("mount refused") and lines[3].startswith("clone refused"), r.stdout


def test_seccomp_denies_escape_syscalls_but_not_ordinary_work(mode):
    r = run(
        """
import ctypes, os, subprocess, threading, platform
libc = ctypes.CDLL(None, use_errno=True)
nrs = {"x86_64": {"bpf": 321, "userfaultfd": 323, "keyctl": 250, "ptrace": 101, "setns": 308, "io_uring_setup": 425},
       "aarch64": {"bpf": 280, "userfaultfd": 282, "keyctl": 219, "ptrace": 117, "setns": 268, "io_uring_setup": 425}}
for name, nr in sorted(nrs[platform.machine()].items()):
    rc = libc.syscall(nr, 0, 0, 0, 0, 0)
    print(name, rc, ctypes.get_errno())
t = threading.Thread(target=lambda: None); t.start(); t.join()
print(subprocess.run(["echo", "child ok"], capture_output=True, text=True).stdout.strip())
"""
    )
    assert r.error is None, r
    lines = r.stdout.splitlines()
    for line in lines[:6]:
        name, rc, errno = line.split()
        assert (rc, errno) == ("-1", "1"), line  # EPERM from the filter, whatever the syscall's arguments
    assert lines[6] == "child ok"
