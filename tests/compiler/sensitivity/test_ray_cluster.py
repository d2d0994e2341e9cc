"""A two-node Ray cluster on this machine (`ray start --head` + `ray start --address`, own temp dirs
and ports): ALPS and HAWQ through `RayExecutor(address=...)` match the serial executor bit for bit."""

from __future__ import annotations

import dataclasses
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bitmix.compiler.fold import prepare
from bitmix.compiler.sensitivity import ALPSConfig, HAWQConfig, ScoreContext, SerialExecutor, score
from bitmix.ir.targets import get_target
from tests.conftest import captured, zoo_entry

ray = pytest.importorskip("ray")
from bitmix.compiler.sensitivity.ray_executor import RayExecutor  # noqa: E402

pytestmark = pytest.mark.slow
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Ray head did not open port {port}")


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    """Head and worker node as `ray start --block` processes of our own: terminating them (by pid)
    stops exactly the Ray processes they started, never another Ray on the machine."""
    port = _free_port()
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats", "--block"]
    env = os.environ | {"RAY_AUTH_MODE": "disabled"}  # a private cluster on localhost, as the driver expects
    nodes = []
    try:
        head_dir = tmp_path_factory.mktemp("ray-head")
        nodes.append(subprocess.Popen([RAY, "start", "--head", f"--port={port}", "--include-dashboard=false",
                                       f"--temp-dir={head_dir}", *common], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL, env=env))
        _wait_for(port)
        nodes.append(subprocess.Popen([RAY, "start", f"--address=127.0.0.1:{port}", *common],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        address = f"127.0.0.1:{port}"
        ray.init(address=address, log_to_driver=False)
        deadline = time.monotonic() + 120
        while sum(n["Alive"] for n in ray.nodes()) < 2 and time.monotonic() < deadline:
            time.sleep(0.5)
        ray.shutdown()
        yield address
    finally:
        ray.shutdown()
        for node in reversed(nodes):
            node.terminate()
            try:
                node.wait(60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(tmp_path_factory.getbasetemp() / "ray-head0", ignore_errors=True)


def test_two_node_cluster_matches_serial(two_nodes):
    graph = captured("digits-cnn")
    _, _, data = zoo_entry("digits-cnn")
    ctx = ScoreContext(graph, get_target("int4int2-npu"), prepare(graph), data)
    with RayExecutor(address=two_nodes) as cluster:
        assert cluster.workers == 2
        nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        assert len(nodes) == 2
        for method in (HAWQConfig(samples=4, examples=64), ALPSConfig(epochs=0.05)):
            serial = score(method, dataclasses.replace(ctx, executor=SerialExecutor()))
            assert score(method, dataclasses.replace(ctx, executor=cluster)) == serial
    assert not ray.is_initialized()  # the executor left the cluster it joined
