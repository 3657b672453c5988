"""The temporary Prefect server of a command run without ``PREFECT_API_URL``, started so that a signal to the whole
process group cannot take it away from the run that still has to report to it.

Left to itself Prefect starts that server lazily, as a child in the command's process group. Ctrl-C in a terminal
and ``kill -- -PGID`` (a scheduler ending a job) then signal the server and the run at the same moment: the server
dies first, and the run, unwinding, retries every state report against a dead API for minutes (a `turntree study`
stopped this way took over 2 minutes to exit). Here the server is started up front, in a session of its own (a
group signal reaches the run only), and told by the kernel to end when the command's process ends, however it
ends (``PR_SET_PDEATHSIG``, Linux; elsewhere the normal stop at exit still runs). It stops at the command's exit.
"""

from __future__ import annotations

import os
import subprocess
import sys
from types import SimpleNamespace

# runs in the server's process before uvicorn: end with the parent (the command), then become `python -m uvicorn`
_CHILD = (
    "import os, runpy, signal, sys\n"
    "parent = int(sys.argv[1])\n"
    "try:\n"
    "    import ctypes\n"
    "    ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG\n"
    "except (AttributeError, OSError):\n"
    "    pass\n"
    "if os.getppid() != parent:\n"
    "    sys.exit(0)  # the command ended before the request took effect\n"
    "sys.argv = sys.argv[2:]\n"
    "runpy.run_module(sys.argv[0], run_name='__main__', alter_sys=True)\n"
)


def _popen_own_session(args, **kwargs):
    """``subprocess.Popen`` for Prefect's ``python -m uvicorn …``: in a session of its own, ending with us."""
    args = list(args)
    if args[1:3] == ["-m", "uvicorn"]:
        args = [args[0], "-c", _CHILD, str(os.getpid()), "uvicorn", *args[3:]]
    return subprocess.Popen(args, start_new_session=True, **kwargs)


def start_local_server() -> str | None:
    """Point this process at a Prefect server for the rest of its life: the configured one (nothing is started;
    returns None), else a temporary one started here in its own session (returns its API URL; a study passes it on
    to cells run in processes of their own, ``flows.study.one_server``). That one stops at exit, after Prefect's
    log and event workers have sent what they still hold (they drain in ``threading._shutdown``, before ``atexit``
    hooks run): stopped any earlier, it leaves them retrying against a dead server for minutes."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if os.environ.get("PREFECT_API_URL") or PREFECT_API_URL.value():
        return None
    from prefect.server.api import server as server_module

    class OwnSessionServer(server_module.SubprocessASGIServer):
        def _run_uvicorn_command(self):
            real = server_module.subprocess
            server_module.subprocess = SimpleNamespace(Popen=_popen_own_session)  # this module's name only
            try:
                return super()._run_uvicorn_command()
            finally:
                server_module.subprocess = real

    server = OwnSessionServer(port=_free_port())
    server.start()  # registers its stop with atexit
    _held.append(temporary_settings({PREFECT_API_URL: server.api_url}))
    _held[-1].__enter__()  # for the rest of the process: Prefect read its settings when it was imported
    return server.api_url


_held: list = []


def _free_port() -> int:
    """A port no other process listens on now (Prefect's own pick would share its per-port singleton)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


if __name__ == "__main__":  # pragma: no cover - a manual check: `python -m flows.prefect_local`
    print(start_local_server(), file=sys.stderr)
