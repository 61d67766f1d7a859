"""The package's public face as a newcomer meets it: the README's Python example, the
``create()`` factory that hands back a ready connector, and what the HTTP API answers while
the connector is still starting."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import socket
import textwrap
from pathlib import Path

import aiohttp
import psutil
import pytest
import zmq
import zmq.asyncio

import connector
from connector import ConnectorClosed, LocalConnector
from connector.api.server import create_app, start_server
from tests.core_helpers import alive, make_graph, options, pids, svc

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.integration


def _readme_python_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("### Python") :]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match is not None, "the README's Python section has no code block"
    return match.group(1)


def test_every_name_the_readme_imports_from_connector_exists() -> None:
    block = _readme_python_block()
    imported = re.findall(r"from connector import ([\w, ]+)", block)
    assert imported, "the README's example imports nothing from connector"
    names = {n.strip() for line in imported for n in line.split(",")}
    assert "LocalConnector" in names
    for name in names:
        assert getattr(connector, name) is not None
    # What the package says it exports, it exports.
    for name in connector.__all__:
        assert getattr(connector, name) is not None, name
    assert connector.LocalConnector is LocalConnector
    assert connector.graph_api.graph.__module__ == "connector.graph_api"
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        _ = connector.nonsense  # type: ignore[attr-defined]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _graph_file(tmp_path: Path) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            apiVersion: nvidia.com/v1alpha1
            kind: DynamoGraphDeployment
            metadata: {name: newcomer}
            spec:
              services:
                Decode:
                  componentType: worker
                  subComponentType: decode
                  replicas: 1
                  extraPodSpec: {mainContainer: {command: [sleep, "300"]}}
                  local: {readiness: none, maxReplicas: 3}
            """
        )
    )
    return path


async def test_create_returns_a_ready_connector(tmp_path: Path) -> None:
    """``c = await LocalConnector.create(...)`` then a call, with no ``async with``."""
    c = await LocalConnector.create(
        "newcomer",
        _graph_file(tmp_path),
        tmp_path / "wd",
        discovery="none",
        gpu_backend="none",
    )
    try:
        assert await c.scale_component("Decode", 2, timeout_s=15) is True
        assert await c.get_component_replicas("Decode") == 2
        decode_pids = list(pids(c, "Decode").values())
        assert all(alive(p) for p in decode_pids)
        await c.initialize()  # idempotent: nothing restarts
        assert list(pids(c, "Decode").values()) == decode_pids
    finally:
        await c.shutdown()
    assert not any(alive(p) for p in decode_pids)
    with pytest.raises(ConnectorClosed, match="shut down"):
        await c.scale_component("Decode", 1)


async def test_async_with_await_create_still_works(tmp_path: Path) -> None:
    async with await LocalConnector.create(
        "newcomer", _graph_file(tmp_path), tmp_path / "wd", discovery="none", gpu_backend="none"
    ) as c:
        assert await c.scale_component("Decode", 1, timeout_s=15) is True
        assert await c.get_component_replicas("Decode") == 1
        (decode_pid,) = pids(c, "Decode").values()
    assert not alive(decode_pid)


async def test_two_concurrent_initialize_calls_start_once(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1))
    c = LocalConnector("t", graph, tmp_path, options())
    try:
        await asyncio.gather(c.initialize(), c.initialize())
        assert len(pids(c, "Decode")) == 1
    finally:
        await c.shutdown()


async def test_a_library_call_before_initialize_says_to_initialize(tmp_path: Path) -> None:
    c = LocalConnector("t", make_graph(svc("Decode")), tmp_path, options())
    with pytest.raises(ConnectorClosed, match=r"call initialize\(\) first"):
        await c.scale_component("Decode", 1)


async def test_api_answers_503_starting_with_retry_after_while_the_connector_starts(
    tmp_path: Path,
) -> None:
    """The window ``up`` has between listening and the connector running. A circusd that
    never answers (a zmq ROUTER socket we hold) keeps ``initialize()`` in that window for
    as long as the test needs, with no timing to guess."""
    ctx = zmq.asyncio.Context()
    silent = ctx.socket(zmq.ROUTER)
    endpoint = f"tcp://127.0.0.1:{_free_port()}"
    silent.bind(endpoint)
    c = LocalConnector("t", make_graph(svc("Decode")), tmp_path, options(circus_endpoint=endpoint))
    server = await start_server(create_app(c), "127.0.0.1", 0)
    starting = asyncio.create_task(c.initialize())
    try:
        await asyncio.wait_for(silent.recv_multipart(), 10)  # initialize() asked circusd
        async with aiohttp.ClientSession() as http:
            async with http.put(
                f"{server.url}/v1/components/Decode/replicas", json={"replicas": 1}
            ) as resp:
                body = json.loads(await resp.text())
                assert resp.status == 503
                assert resp.headers["Retry-After"] == "1"
            assert body["error"]["code"] == "starting"
            message = body["error"]["message"]
            assert message.startswith("dynamo-local is starting")
            assert "initialize()" not in message
            async with http.post(f"{server.url}/v1/components/Decode/restart", json={}) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"]["code"] == "starting"
            async with http.get(f"{server.url}/readyz") as resp:
                assert resp.status == 503  # not ready, as before
    finally:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await server.stop()
        await c.shutdown()
        silent.close(linger=0)
        ctx.term()


async def test_the_namespace_given_to_create_is_where_every_replica_registers(
    tmp_path: Path,
) -> None:
    """One meaning for a namespace (``create``'s first argument, ``up --namespace``): the
    Dynamo namespace every replica gets as ``DYN_NAMESPACE``, whatever the file says."""
    path = _graph_file(tmp_path)
    path.write_text(
        path.read_text().replace("replicas: 1", "replicas: 1\n      dynamoNamespace: infile")
    )
    async with await LocalConnector.create(
        "elsewhere", path, tmp_path / "wd", discovery="none", gpu_backend="none"
    ) as c:
        assert c.graph.namespace == "elsewhere"
        assert c.graph.services["Decode"].dynamo_namespace is None
        assert await c.scale_component("Decode", 1, timeout_s=15) is True
        (pid,) = pids(c, "Decode").values()
        assert pid is not None
        env = await asyncio.to_thread(lambda: psutil.Process(pid).environ())
        assert env["DYN_NAMESPACE"] == "elsewhere"
        assert (env["DYN_TCP_RPC_HOST"], env["DYN_SYSTEM_HOST"]) == ("127.0.0.1", "127.0.0.1")
        # A worker's default ports, one of its own each (connector.graph.dynamo_defaults).
        names = (
            "DYN_SYSTEM_PORT",
            "DYN_TCP_RPC_PORT",
            "DYN_FORWARDPASS_METRIC_PORT",
            "VLLM_NIXL_SIDE_CHANNEL_PORT",
        )
        ports = {k: int(env[k]) for k in names}
        assert len(set(ports.values())) == 4
        assert env["VLLM_NIXL_SIDE_CHANNEL_HOST"] == "127.0.0.1"
