"""This process's connection to a Ray cluster, for the rollout's engine actors (``stages.rollout.fanout``) and
the sandbox's Ray batches (``runtime.sandbox.raybatch``). Ray is imported only when a caller asks for it.

    connect(None)            # already connected: kept; RAY_ADDRESS set: that cluster; else a new local one
    connect("auto")          # the cluster this machine's `ray start` runs
    connect("10.0.0.5:6379") # a head node (host:port; or ray://host:10001 through Ray Client)
    where()                  # {"pid", "node_id"} of the calling process (driver or worker)

Token authentication (Ray's default for the clusters it starts): Ray sends the token (``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``) on its own only to a cluster it finds itself (None, 'auto');
for an explicit address set ``RAY_AUTH_MODE=token`` too. A cluster that cannot be reached is a
``RayUnavailable`` with one line naming the address, raised before any work is sent (a host:port is first
probed with a plain TCP connect, so a wrong address fails in seconds).
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[1]


class RayUnavailable(RuntimeError):
    """No Ray cluster at the configured address (or Ray is not installed)."""


def probe(address: str, timeout_s: float = 5.0) -> None:
    """A plain TCP connect to ``host:port`` (``ray://host:port`` too); 'auto' and others are Ray's to resolve."""
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        if address != "auto":
            raise RayUnavailable(f"Ray address {address!r}: expected 'auto', 'host:port' or 'ray://host:port'")
        return
    try:
        with socket.create_connection((host, int(port)), timeout=timeout_s):
            pass
    except OSError as e:
        raise RayUnavailable(f"Ray cluster at {address!r} is not reachable: {e}") from None


def connect(address: str | None = None, *, num_cpus: float | None = None) -> str:
    """Connect this process to Ray (see the module docstring); returns the cluster's GCS address.

    ``num_cpus``: logical CPUs of a new local cluster (default: the CPUs this process may use)."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - the `ray` extra is not installed
        raise RayUnavailable(f"Ray is not installed ({e}): install turntree with the 'ray' extra") from None
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address
    target = address or os.environ.get("RAY_ADDRESS") or None
    kw: dict = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if target is None:
        path = os.pathsep.join(p for p in (str(PROJECT_ROOT), os.environ.get("PYTHONPATH", "")) if p)
        kw.update(
            num_cpus=num_cpus or len(os.sched_getaffinity(0)),
            runtime_env={"env_vars": {"PYTHONPATH": path}},
        )
    else:
        probe(target)
        kw["address"] = target
    try:
        ray.init(**kw)
    except Exception as e:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        hint = "" if target is None or os.environ.get("RAY_AUTH_MODE") else " (token auth: set RAY_AUTH_MODE=token)"
        raise RayUnavailable(f"Ray cluster at {target or 'a new local cluster'!r}: {first}{hint}") from None
    gcs = ray.get_runtime_context().gcs_address
    log.info("connected to Ray at %s (%s)", gcs, "new local cluster" if target is None else target)
    return gcs


def where() -> dict:
    """The calling process's pid and Ray node id (None outside Ray)."""
    node = None
    try:
        import ray

        if ray.is_initialized():
            node = ray.get_runtime_context().get_node_id()
    except ImportError:  # pragma: no cover
        pass
    return {"pid": os.getpid(), "node_id": node, "host": socket.gethostname()}
