"""The real Dynamo 1.6.1 under dynamo-local, with a graph copied from Kubernetes (no
``local:`` block anywhere): a real etcd, the real frontend and real mocker workers.

What a plain ``DynamoGraphDeployment`` must get by default (README, "Defaults for a graph
copied from Kubernetes"): a worker counts as ready only once its instance is registered,
under the component it really registers as (``backend``, learnt); a SIGKILLed worker's
instance leaves etcd at once and the worker is replaced; a scale-down drains a worker
(out of discovery, in-flight requests finished) so that no request fails.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from connector.api.server import create_app, start_server
from connector.graph.loader import load_graph
from connector.interop import system_topology
from connector.local import ConnectorOptions, LocalConnector
from tests.dynamo_helpers import (
    TINY_MODEL_NAME,
    chat,
    instances,
    require_dynamo,
    until_the_model_is_listed,
)
from tests.servers import EtcdServer, PrometheusFactory

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

NS = "plain"

# As a user copies it from a cluster: componentType, replicas, envs, the container command.
GRAPH = """\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {{name: plain}}
spec:
  envs:
    - {{name: HF_HUB_OFFLINE, value: "1"}}
    - {{name: TRANSFORMERS_OFFLINE, value: "1"}}
  services:
    Frontend:
      dynamoNamespace: {ns}
      componentType: frontend
      replicas: 1
      extraPodSpec:
        mainContainer:
          command: ["{{python}}", -m, dynamo.frontend]
    Worker:
      dynamoNamespace: {ns}
      componentType: worker
      replicas: 1
      extraPodSpec:
        mainContainer:
          command: ["{{python}}", -m, dynamo.mocker]
          args: [--model-path, "{model}", --model-name, {name}, --speedup-ratio, "10"]
"""


def _graph_file(tmp_path: Path, model: Path) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(GRAPH.format(ns=NS, model=model, name=TINY_MODEL_NAME))
    return path


@pytest.fixture
async def plain(
    tmp_path: Path, tiny_model: Path, etcd_server: EtcdServer
) -> AsyncIterator[LocalConnector]:
    require_dynamo()
    assert "local:" not in GRAPH
    graph = load_graph(_graph_file(tmp_path, tiny_model))
    assert all(s.readiness.default for s in graph.services.values())  # nothing spelled out
    options = ConnectorOptions(discovery="etcd", etcd_url=etcd_server.url, gpu_backend="none")
    conn = LocalConnector(NS, graph, tmp_path / "wd", options)
    await conn.initialize()
    try:
        yield conn
    finally:
        await conn.shutdown()


def _port(conn: LocalConnector, replica: str, name: str) -> int:
    rep = next(r for r in conn.view().replicas if f"{r.component}/{r.replica}" == replica)
    return rep.ports[name]


def _worker_instances(etcd_url: str) -> dict[str, Any]:
    """The ``backend/generate`` instances etcd lists (Dynamo's name for an aggregated
    worker), by key."""
    return {i.key: i for i in instances(etcd_url, NS, "backend")}


async def test_a_plain_graph_is_ready_once_registered_and_serves(
    plain: LocalConnector, etcd_server: EtcdServer
) -> None:
    conn = plain
    assert await conn.scale_component("Frontend", 1, timeout_s=90) is True
    assert await conn.scale_component("Worker", 1, timeout_s=90) is True
    # Ready means registered: the moment the scale returns, etcd lists the worker's
    # instance, advertising the request-plane port dynamo-local gave that replica.
    listed = _worker_instances(etcd_server.url)
    assert [i.port for i in listed.values()] == [_port(conn, "Worker/1", "rpc")]
    ready = next(e for e in conn.events.since(0) if e.kind == "ready" and e.replica == "Worker/1")
    assert (ready.outcome, ready.reason) == (None, None)  # a failed one says why
    topo = await system_topology(conn)
    worker = next(n for n in topo["nodes"] if n["id"] == "Worker")
    assert worker["dynamo_component"] == "backend"  # learnt, not "worker"
    assert {i["replica"] for i in worker["instances"]} == {"Worker/1"}
    assert topo["external"] == []
    async with aiohttp.ClientSession() as http:
        await until_the_model_is_listed(http, _port(conn, "Frontend/1", "http"))
        status, content = await chat(http, _port(conn, "Frontend/1", "http"))
    assert status == 200, content
    assert content.strip()


async def test_a_sigkilled_worker_leaves_etcd_at_once_and_is_replaced(
    plain: LocalConnector, etcd_server: EtcdServer
) -> None:
    conn = plain
    assert await conn.scale_component("Worker", 1, timeout_s=90) is True
    (old_key,) = _worker_instances(etcd_server.url)
    (rec,) = conn.state.replicas_of("Worker")
    pid = rec.pid
    assert pid is not None
    killed_at = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    while old_key in _worker_instances(etcd_server.url):
        assert time.monotonic() - killed_at < 0.5, "the dead worker's key outlived 0.5 s"
        await asyncio.sleep(0.01)
    gone_s = time.monotonic() - killed_at
    reap = None
    deadline = time.monotonic() + 10
    while reap is None and time.monotonic() < deadline:
        reap = next((e for e in conn.events.since(0) if e.kind == "reap"), None)
        await asyncio.sleep(0.02)
    assert reap is not None and reap.replica == "Worker/1"
    assert reap.details["revoked"] is True
    # Replaced: a new process of the same replica registers again.
    deadline = time.monotonic() + 90
    while not (
        (keys := _worker_instances(etcd_server.url))
        and old_key not in keys
        and await conn.get_component_replicas("Worker") == 1
    ):
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        await asyncio.sleep(0.1)
    assert gone_s < 0.5


async def test_scaling_down_under_load_fails_no_request(
    plain: LocalConnector, etcd_server: EtcdServer
) -> None:
    conn = plain
    assert await conn.scale_component("Frontend", 1, timeout_s=90) is True
    assert await conn.scale_component("Worker", 2, timeout_s=90) is True
    assert len(_worker_instances(etcd_server.url)) == 2
    port = _port(conn, "Frontend/1", "http")
    results: list[tuple[int, str]] = []
    stop = asyncio.Event()

    async def client(http: aiohttp.ClientSession) -> None:
        while not stop.is_set():
            results.append(await chat(http, port, tokens=64))

    async with aiohttp.ClientSession() as http:
        await until_the_model_is_listed(http, port)
        clients = [asyncio.create_task(client(http)) for _ in range(4)]
        await asyncio.sleep(2.0)  # requests in flight on both workers
        assert await conn.scale_component("Worker", 1, timeout_s=90) is True
        await asyncio.sleep(1.0)
        stop.set()
        await asyncio.gather(*clients)
    failed = [r for r in results if r[0] != 200]
    assert len(results) >= 8
    assert failed == []
    assert len(_worker_instances(etcd_server.url)) == 1
    (drain,) = [e for e in conn.events.since(0) if e.kind == "drain"]
    assert drain.outcome == "ok"
    assert drain.details["inflight"] == 0.0


async def test_a_real_prometheus_scrapes_the_real_frontend_through_the_sd_targets(
    plain: LocalConnector, etcd_server: EtcdServer, prometheus_server: PrometheusFactory
) -> None:
    """The 1.6.1 frontend labels its series with no ``dynamo_namespace``; the SD targets add
    it, so the SLA Planner's kind of query (filtered on the namespace) returns data."""
    conn = plain
    assert await conn.scale_component("Frontend", 1, timeout_s=90) is True
    assert await conn.scale_component("Worker", 1, timeout_s=90) is True
    server = await start_server(create_app(conn), "127.0.0.1", 0)
    try:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [
                {
                    "job_name": "dynamo",
                    "http_sd_configs": [
                        {"url": f"{server.url}/v1/prometheus/targets", "refresh_interval": "1s"}
                    ],
                }
            ],
        }
        prom = prometheus_server([], config_text=yaml.safe_dump(config))
        port = _port(conn, "Frontend/1", "http")
        async with aiohttp.ClientSession() as http:
            await until_the_model_is_listed(http, port)
            for _ in range(3):
                status, _ = await chat(http, port)
                assert status == 200
        query = f'sum(dynamo_frontend_requests_total{{dynamo_namespace="{NS}"}})'
        deadline = time.monotonic() + 60
        while not (result := await prom.query(query)):
            assert time.monotonic() < deadline, f"no data for {query}"
            await asyncio.sleep(1.0)
        assert float(result[0]["value"][1]) >= 3
        targets = await prom.targets()
        frontend = [t for t in targets if t["labels"].get("role") == "frontend"]
        assert [(t["health"], t["labels"]["dynamo_component"]) for t in frontend] == [
            ("up", "Frontend")
        ]
        assert frontend[0]["labels"]["dynamo_namespace"] == NS
    finally:
        await server.stop()
