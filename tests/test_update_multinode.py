"""Multi-node update on one machine: two torchrun agents on loopback (two "nodes", node_rank 0 and 1, one
gloo process each, a c10d rendezvous at 127.0.0.1:<port>) give the one-process update; node 0 writes the
checkpoint, node 1 writes nothing. Node 1 runs the stage's CLI (``python -m stages.update``), as a second
machine would; node 0 runs ``stages.update.run`` in this process, as the pipeline does."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest

from schemas.params.update import UpdateParams
from stages import update
from stages.update import distributed as ddist
from tests.test_update_distributed import PARAMS, _assert_same_update, samples  # noqa: F401 - fixture

REPO = ddist.REPO


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_child(proc: subprocess.Popen, timeout: float = 120.0) -> None:
    children = f"/proc/{proc.pid}/task/{proc.pid}/children"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if open(children).read().strip():
            return
        time.sleep(0.2)
    raise AssertionError(f"node 1 started no torchrun agent (exit code {proc.poll()})")


def test_torchrun_arguments_by_node_count():
    one = ddist.torchrun_command(UpdateParams(nproc=2))
    assert "--standalone" in one and "--nproc-per-node=2" in one and not any("rdzv" in a for a in one)
    p = UpdateParams(nnodes=3, node_rank=2, rdzv_endpoint="head:29400", rdzv_id="job-7")
    cmd = ddist.torchrun_command(p)
    assert "--standalone" not in cmd
    for arg in ("--nnodes=3", "--node-rank=2", "--rdzv-backend=c10d", "--rdzv-endpoint=head:29400",
                "--rdzv-id=job-7", "--rdzv-conf=is_host=false", "--nproc-per-node=1"):  # fmt: skip
        assert arg in cmd, (arg, cmd)
    assert "--rdzv-conf=is_host=true" in ddist.torchrun_command(p.model_copy(update={"node_rank": 0}))


@pytest.mark.parametrize(
    "bad, match",
    [
        ({"nnodes": 2}, "needs rdzv_endpoint"),
        ({"nnodes": 2, "node_rank": 2, "rdzv_endpoint": "h:1"}, "node_rank=2 is not below nnodes=2"),
        ({"nnodes": 2, "rdzv_endpoint": "h:1; rm -rf /"}, "rdzv_endpoint"),
        ({"nnodes": 2, "rdzv_endpoint": "no-port"}, "rdzv_endpoint"),
    ],
)
def test_bad_node_settings_are_refused(bad, match):
    with pytest.raises(ValueError, match=match):
        UpdateParams(**bad)


def test_global_rank_is_numbered_by_node(monkeypatch):
    """Under ``launch`` (agent store) rank = node_rank * nproc + local_rank, whatever torchrun said."""
    env = {"RANK": "0", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "TORCHELASTIC_USE_AGENT_STORE": "True"}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv(ddist.NODE_RANK_ENV, "1")
    assert ddist.global_rank() == 3
    monkeypatch.delenv(ddist.NODE_RANK_ENV)  # launched by someone else (a PyTorchJob, plain torchrun)
    assert ddist.global_rank() == 0


@pytest.mark.scaleout
@pytest.mark.slow  # ~45 s on 2 cores: three model loads, two torchrun agents
def test_two_nodes_give_the_one_process_update(tiny_model, samples, tmp_path):  # noqa: F811
    inputs = {"samples": samples, "checkpoint": str(tiny_model)}
    one = update.run(UpdateParams(**PARAMS), inputs, tmp_path / "one")
    endpoint = f"127.0.0.1:{_free_port()}"
    node = {**PARAMS, "nnodes": 2, "rdzv_endpoint": endpoint, "rdzv_id": f"test-{os.getpid()}"}
    out0, out1 = tmp_path / "node0", tmp_path / "node1"
    out0.mkdir()
    out1.mkdir()
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    )
    second = subprocess.Popen(
        [sys.executable, "-m", "stages.update", samples, str(tiny_model), str(out1),
         "--params", json.dumps({**node, "node_rank": 1})],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        # Node 1's torchrun agent starts first, so it has the lower pid: the c10d rendezvous (which orders the
        # nodes by host name, then pid) makes it group 0, and only the renumbering by node_rank keeps the
        # checkpoint on node 0.
        _wait_for_child(second)
        two = update.run(UpdateParams(**node, node_rank=0), inputs, out0)
        log, _ = second.communicate(timeout=300)
    finally:
        second.kill()
    assert second.returncode == 0, log[-3000:]
    assert "node 1 of 2: node 0 wrote the checkpoint" in log
    assert sorted(p.name for p in out0.iterdir()) == ["checkpoint", "steps.jsonl"]  # steps: MLflow curves
    assert list(out1.iterdir()) == []
    assert any("2 processes (ddp)" in n for n in two.notes), two.notes
    _assert_same_update(one, two, str(tiny_model))
