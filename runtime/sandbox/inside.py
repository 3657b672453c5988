"""Trusted bootstrap that runs INSIDE the sandbox, as ``python3 -I -S -c <this file's source> JOB_FD RESULT_FD``.

It is the only code of ours that shares a process with the untrusted program, so it trusts nothing after the
program starts. Steps: read one JSON job from JOB_FD and close it; apply resource limits (and a seccomp filter:
no namespaces, mounts, BPF, ptrace…; in fallback mode no non-Unix sockets either); then

- ``exec`` mode: run the program as ``__main__`` (its stdin/stdout/stderr are the sandbox's);
- ``tests`` mode: define the program, run the test setup, then for each item either evaluate one call
  (``"call"``: e.g. ``f(3)``) and send back its value as a plain built-in (exact type checks; anything else is
  an error record), or run a whole test (``"whole"``) and send back whether it raised.

Records go to RESULT_FD as ``<nonce> <json>\\n`` lines, ending with an ``end`` record, after which the
process leaves with ``os._exit`` (atexit handlers never run). The trusted parent evaluates the asserts.
Standard library only: this runs under the sandbox's system interpreter.
"""

import collections
import json
import os
import resource
import sys

_write, _dumps, _exit = os.write, json.dumps, os._exit
# collections types the parent rebuilds from plain data (exact type checks against these saved references;
# items are read through the C-level dict/deque methods, which a program cannot override)
_MAPPINGS = (
    (dict, "dict"),
    (collections.Counter, "Counter"),
    (collections.OrderedDict, "OrderedDict"),
    (collections.defaultdict, "defaultdict"),
)
_deque, _od_items, _dict_items = collections.deque, collections.OrderedDict.items, dict.items
MAX_RECORD = 4 << 20


class Unsupported(Exception):
    pass


def encode(v, depth=0):
    """A plain built-in value -> tagged JSON; exact type checks, so subclasses and custom objects fail."""
    if depth > 64:
        raise Unsupported("value nested too deeply")
    t = type(v)
    if v is None:
        return ["none"]
    if t is bool:
        return ["bool", v]
    if t is int:
        return ["int", hex(v)]
    if t is float:
        return ["float", v.hex()]
    if t is complex:
        return ["complex", [v.real.hex(), v.imag.hex()]]
    if t is str:
        return ["str", v]
    if t is bytes:
        return ["bytes", v.hex()]
    if t is list or t is tuple or t is set or t is frozenset:
        return [t.__name__, [encode(x, depth + 1) for x in v]]
    for cls, tag in _MAPPINGS:  # identity, not ``t in {...}``: a metaclass could fake equality with a type
        if t is cls:
            items = _od_items(v) if tag == "OrderedDict" else _dict_items(v)
            return [tag, [[encode(k, depth + 1), encode(x, depth + 1)] for k, x in items]]
    if t is _deque:
        return ["deque", [encode(x, depth + 1) for x in v]]
    raise Unsupported(f"returned a value of type {t.__name__:.80}, not a plain built-in value")


def describe(exc):
    try:
        return (f"{type(exc).__name__}: {exc}")[:1000]
    except BaseException:
        return "exception (could not be described)"


def read_job(fd):
    chunks = []
    while True:
        b = os.read(fd, 1 << 16)
        if not b:
            break
        chunks.append(b)
    os.close(fd)
    return json.loads(b"".join(chunks))


# syscalls no program of ours needs and every kernel escape starts with (namespaces, mounts, keyrings, BPF,
# userfaultfd, perf, ptrace, modules, io_uring, the new mount API), per arch: (audit arch, x32 bit?, numbers,
# clone, clone3, socket)
_SYSCALLS = {
    "x86_64": (0xC000003E, True, (272, 308, 165, 166, 155, 250, 248, 249, 321, 323, 298, 101, 310, 311, 246,
                                  320, 175, 313, 176, 304, 303, 425, 426, 427, 428, 429, 430, 431, 432, 433,
                                  442), 56, 435, 41),
    "aarch64": (0xC00000B7, False, (97, 268, 40, 39, 41, 219, 217, 218, 280, 282, 241, 117, 270, 271, 104, 294,
                                    105, 273, 106, 265, 264, 425, 426, 427, 428, 429, 430, 431, 432, 433, 442),
                220, 435, 198),
}  # fmt: skip
CLONE_NEWUSER = 0x10000000


def install_seccomp(deny_network=False):
    """Every mode: a seccomp filter that fails the syscalls of ``_SYSCALLS`` (EPERM), clone with CLONE_NEWUSER
    (EPERM: no nested user namespace), clone3 (ENOSYS: libc falls back to clone, whose flags a filter can
    read) and, with ``deny_network`` (fallback mode, which has no network namespace), non-Unix sockets
    (EACCES). A foreign ABI (i386 ``int 0x80``, x32) kills the process."""
    import ctypes
    import platform
    import struct

    arch, x32, denied, nr_clone, nr_clone3, nr_socket = _SYSCALLS[platform.machine()]
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    eperm, enosys, eacces = 0x00050000 | 1, 0x00050000 | 38, 0x00050000 | 13
    allow, kill = 0x7FFF0000, 0x80000000
    prog = [(ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill), (ld, 0, 0, 0)]
    if x32:
        prog += [(jge, 0, 1, 0x40000000), (ret, 0, 0, kill)]
    for nr in denied:
        prog += [(jeq, 0, 1, nr), (ret, 0, 0, eperm)]
    prog += [(jeq, 0, 1, nr_clone3), (ret, 0, 0, enosys)]
    if deny_network:  # socket(family != AF_UNIX, ...): EACCES; not a socket: on to the clone check
        prog += [
            (jeq, 0, 4, nr_socket),
            (ld, 0, 0, 16),
            (jeq, 1, 0, 1),
            (ret, 0, 0, eacces),
            (ret, 0, 0, allow),
        ]
    # clone(flags & CLONE_NEWUSER): EPERM; anything else: allowed
    prog += [(jeq, 0, 3, nr_clone), (ld, 0, 0, 16), (jset, 0, 1, CLONE_NEWUSER), (ret, 0, 0, eperm)]
    prog += [(ret, 0, 0, allow)]
    buf = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *ins) for ins in prog))
    fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) != 0 or libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "seccomp filter could not be installed")


def flush_stdio():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


def main():
    if sys.argv[1] == "zygote":
        serve(int(sys.argv[2]))
        _exit(0)
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    run_job(read_job(job_fd), result_fd)


def run_job(job, result_fd):
    """Run one job in this process; returns only when an ``exec`` job's program ends normally."""
    nonce = job.pop("nonce")
    for name, soft_hard in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(soft_hard))
    install_seccomp(deny_network=bool(job.get("deny_network")))
    path = os.path.join(os.getcwd(), job["filename"])
    with open(path, "w") as f:
        f.write(job["code"])
    sys.argv = [job["filename"]]
    ns = {"__name__": "__main__" if job["mode"] == "exec" else "solution", "__builtins__": __builtins__}

    def emit(record):
        line = (nonce + " " + _dumps(record) + "\n").encode("utf-8", "backslashreplace")
        if len(line) > MAX_RECORD:
            line = (
                nonce + " " + _dumps({**record, "ok": False, "v": None, "err": "value too large"}) + "\n"
            ).encode()
        while line:
            line = line[_write(result_fd, line) :]

    if job["mode"] == "exec":
        try:
            exec(compile(job["code"], path, "exec"), ns)
        except SystemExit:
            raise
        except BaseException as e:
            emit({"k": "exc", "type": type(e).__name__})
            import traceback

            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            flush_stdio()
            _exit(1)
        return
    sys.stdin = open(os.devnull)
    try:
        exec(compile(job["code"], path, "exec"), ns)
        if job["setup"]:
            exec(compile(job["setup"], "<test setup>", "exec"), ns)
        emit({"k": "load", "ok": True})
    except BaseException as e:
        emit({"k": "load", "ok": False, "err": describe(e)})
        items = []
    else:
        items = job["items"]
    for i, item in enumerate(items):
        try:
            if item["kind"] == "call":
                value = eval(compile(item["src"], f"<test {i}>", "eval"), ns)
                try:
                    record = {"k": "item", "i": i, "ok": True, "v": encode(value)}
                except Unsupported as e:
                    record = {"k": "item", "i": i, "ok": False, "err": str(e), "value": True}
            else:
                exec(compile(item["src"], f"<test {i}>", "exec"), ns)
                record = {"k": "item", "i": i, "ok": True}
        except BaseException as e:
            record = {"k": "item", "i": i, "ok": False, "err": describe(e)}
        emit(record)
    emit({"k": "end"})
    flush_stdio()
    _exit(0)


# ---------------------------------------------------------------- zygote (one per worker slot)
CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID = 0x20000, 0x08000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REC, MS_PRIVATE = 2, 4, 8, 0x4000, 0x40000
PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT = 4, 24, 38, 47


def serve(ctl_fd):
    """Pid 1 of the slot's bubblewrap: per job, fork a child in fresh mount/pid/ipc namespaces, enforce the
    wall clock, kill everything left, check that nothing but this process remains, report one status line.

    Protocol on the control socket: in, a 16-byte header ``<payload length> <has stdin>`` carrying the fds
    [stdout, stderr, result, (stdin)] as SCM_RIGHTS, then the JSON job; ``k`` later asks for a kill. Out, one
    JSON line per job: ``{"rc": int | null, "timed_out": bool, "clean": bool}``. EOF: kill and leave.
    """
    import ctypes
    import select
    import signal
    import socket
    import time

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)  # nothing of ours can be ptraced or read through /proc
    sock = socket.socket(fileno=ctl_fd)
    while True:
        head, fds = b"", []
        while len(head) < 16:
            data, got, _, _ = socket.recv_fds(sock, 16 - len(head), 8)
            if not data:
                return
            head, fds = head + data, fds + got
        size, has_stdin = (int(x) for x in head.split())
        payload = bytearray()
        while len(payload) < size:
            chunk = sock.recv(min(1 << 20, size - len(payload)))
            if not chunk:
                return
            payload += chunk
        job = json.loads(payload)
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _job_child(libc, job, fds, has_stdin, ctl_fd)
        for fd in fds:
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        deadline, timed_out, rc, quit_ = start + job["timeout_s"], False, None, False
        while rc is None:
            ready, _, _ = select.select([pidfd, sock], [], [], max(0.0, deadline - time.monotonic()))
            if sock in ready:
                quit_ = not sock.recv(1)
                _kill_all(signal)
            elif pidfd not in ready:
                timed_out = True
                _kill_all(signal)
            if pidfd in ready or sock in ready or timed_out:
                rc = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        os.close(pidfd)
        clean = _sweep(signal)
        sock.sendall(
            (
                _dumps({"rc": rc if rc >= 0 else 128 - rc, "timed_out": timed_out, "clean": clean}) + "\n"
            ).encode()
        )
        if quit_ or not clean:
            return


def _kill_all(signal):
    try:
        os.kill(-1, signal.SIGKILL)  # every process of this pid namespace (and below) but pid 1, ourselves
    except ProcessLookupError:
        pass


def _sweep(signal):
    """Kill and reap every process of this namespace but ourselves; True when none is left (<= 1 s)."""
    for _ in range(1000):
        _kill_all(signal)
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break
        if [p for p in os.listdir("/proc") if p.isdigit()] == ["1"]:
            return True
        import time

        time.sleep(0.001)
    return False


def _job_child(libc, job, fds, has_stdin, ctl_fd):
    """Fresh namespaces for one job; the grandchild is pid 1 of the new pid namespace and runs the job."""
    try:
        check = _checker(libc)
        check(libc.unshare(CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
        check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make / private")
        size = f"size={job['tmpfs_mb']}m,mode=0700".encode()
        for where in (b"/tmp", b"/work", b"/dev/shm"):
            check(libc.mount(b"tmpfs", where, b"tmpfs", MS_NOSUID | MS_NODEV, size), f"tmpfs on {where}")
        grandchild = os.fork()
        if grandchild == 0:
            check(libc.mount(b"proc", b"/proc", b"proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None), "proc")
            os.chdir("/work")
            stdin = fds[3] if has_stdin else os.open(os.devnull, os.O_RDONLY)
            for target, fd in ((0, stdin), (1, fds[0]), (2, fds[1]), (3, fds[2])):
                os.dup2(fd, target)
            os.closerange(4, 1 << 16)
            os.setsid()
            _drop_privileges(libc, check)
            try:
                run_job(job, 3)
                code = 0
            except SystemExit as e:  # as the interpreter does: None -> 0, int -> status, else print it, 1
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
                if not isinstance(e.code, (int, type(None))):
                    print(e.code, file=sys.stderr)
            _finish_exec(code & 0xFF)
        for fd in fds:
            os.close(fd)
        os.close(ctl_fd)
        status = os.waitpid(grandchild, 0)[1]
        code = os.waitstatus_to_exitcode(status)
        _exit(code if code >= 0 else 128 - code)
    except BaseException as e:
        try:
            os.write(2, f"sandbox zygote child: {describe(e)}\n".encode())
        finally:
            _exit(125)


def _checker(libc):
    import ctypes

    def check(ret, what):
        if ret != 0:
            raise OSError(ctypes.get_errno(), f"{what} failed")

    return check


def _drop_privileges(libc, check):
    """No capabilities left (bounding, ambient, effective/permitted/inheritable), no way to regain any."""
    import ctypes

    for cap in range(64):
        libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0)
    libc.prctl(PR_CAP_AMBIENT, 4, 0, 0, 0)  # PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)
    data = (ctypes.c_uint32 * 6)()
    check(libc.capset(header, data), "capset")
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "no_new_privs")
    libc.prctl(PR_SET_DUMPABLE, 1, 0, 0, 0)  # the job's own processes may inspect each other, as before


def _finish_exec(code):
    """What the interpreter does at exit (thread join, atexit, flush), then leave: never back to the zygote."""
    try:
        if "threading" in sys.modules:
            sys.modules["threading"]._shutdown()
        import atexit

        atexit._run_exitfuncs()
    except BaseException:
        pass
    flush_stdio()
    _exit(code)


if __name__ == "__main__":  # ``python -c`` runs this as __main__; tests import encode()
    main()
