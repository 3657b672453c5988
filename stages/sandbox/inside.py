"""Trusted bootstrap that runs INSIDE the sandbox, as ``python3 -I -S -c <this file's source> JOB_FD RESULT_FD``.

It is the only code of ours that shares a process with the untrusted program, so it trusts nothing after the
program starts. Steps: read one JSON job from JOB_FD and close it; apply resource limits (and, in fallback
mode, a seccomp filter that denies non-Unix sockets); then

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


def deny_network():
    """Fallback mode only: seccomp filter failing socket(AF_INET*, ...) and io_uring_setup with EACCES."""
    import ctypes
    import platform
    import struct

    arch, nr_socket, nr_uring = {"x86_64": (0xC000003E, 41, 425), "aarch64": (0xC00000B7, 198, 425)}[
        platform.machine()
    ]
    ld, jeq, ret = 0x20, 0x15, 0x06
    errno_eacces, allow, kill = 0x00050000 | 13, 0x7FFF0000, 0x80000000
    prog = [
        (ld, 0, 0, 4), (jeq, 1, 0, arch), (ret, 0, 0, kill),  # wrong ABI (e.g. i386 socketcall): kill
        (ld, 0, 0, 0), (0x35, 0, 1, 0x40000000), (ret, 0, 0, kill),  # x32 syscalls: kill
        (jeq, 0, 1, nr_uring), (ret, 0, 0, errno_eacces),
        (jeq, 0, 3, nr_socket), (ld, 0, 0, 16), (jeq, 1, 0, 1), (ret, 0, 0, errno_eacces),
        (ret, 0, 0, allow),
    ]  # fmt: skip
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
    job_fd, result_fd = int(sys.argv[1]), int(sys.argv[2])
    job = read_job(job_fd)
    nonce = job.pop("nonce")
    for name, soft_hard in job["rlimits"].items():
        resource.setrlimit(getattr(resource, name), tuple(soft_hard))
    if job.get("deny_network"):
        deny_network()
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


if __name__ == "__main__":  # ``python -c`` runs this as __main__; tests import encode()
    main()
