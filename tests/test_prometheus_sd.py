"""Prometheus HTTP service discovery (``GET /v1/prometheus/targets``).

Three levels: the target list computed from hand-made views (every replica state, every
role, ports declared under other names); the live endpoint on a real connector under a
real circusd (exact groups for a frontend and two workers, and replicas that stop or exit
leaving it); and a real Prometheus running the repository's own
``deploy/prometheus/prometheus.yml`` (the connector's address rewritten to this run's
loopback port) that discovers mock Dynamo processes through the endpoint, scrapes them and
answers queries filtered on the labels the endpoint gives, joined with the connector's own
``dynamo_local_*`` series.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from connector.api.prometheus_sd import metrics_port_name, target_groups
from connector.graph.model import (
    Graph,
    PortSpec,
    Readiness,
    ReadinessKind,
    RestartMode,
    RestartPolicy,
    Role,
    Service,
    SubComponentType,
)
from connector.view import ComponentView, ConnectorView, ReplicaView
from dashboards.promql import DYNAMO_COMPONENTS_JOB, DYNAMO_FRONTEND_JOB, JOB
from tests.api_helpers import QUICK, Served, serve
from tests.core_helpers import make_graph, svc, wait_until
from tests.servers import PrometheusFactory, PrometheusServer

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"

SYSTEM = PortSpec("system", "DYN_SYSTEM_PORT")
RPC = PortSpec("rpc", "DYN_TCP_RPC_PORT")
HTTP = PortSpec("http", "DYN_HTTP_PORT")


class _Metrics:
    """Stands in for the exporter: the server then serves /metrics, so it lists itself."""

    async def handle_metrics(self, request: web.Request) -> web.Response:
        return web.Response(text="")


# --------------------------------------------------------------------------- from views


def _component(name: str, role: str, namespace: str = "ns") -> ComponentView:
    return ComponentView(
        name=name,
        role=role,
        sub_component_type=None,
        dynamo_namespace=namespace,
        status="running",
        desired=1,
        running=1,
        ready=1,
        restarts=0,
        crashloops=0,
        scale_in_flight=False,
        min_replicas=0,
        max_replicas=None,
    )


def _replica(
    component: str, ordinal: int, state: str, ports: dict[str, int], pid: int | None = 100
) -> ReplicaView:
    return ReplicaView(
        component=component,
        replica=str(ordinal),
        watcher=f"t.{component}.{ordinal}",
        state=state,
        ready=state == "ready",
        pid=pid,
        create_time=None,
        started_at=None,
        restarts=0,
        last_exit_code=None,
        ports=ports,
    )


def _labels(ns: str, component: str, replica: int, role: str) -> dict[str, str]:
    return {
        "__metrics_path__": "/metrics",
        "dynamo_namespace": ns,
        "dynamo_component": component,
        "replica": str(replica),
        "role": role,
    }


def test_running_replicas_with_a_metrics_port_are_targets() -> None:
    graph = make_graph(
        svc("Frontend", role=Role.FRONTEND, ports=(HTTP,)),
        svc("Decode", ports=(SYSTEM, RPC)),
        # Declared under its own name: the env var says it is the system port.
        svc("Prefill", ports=(PortSpec("metrics", "DYN_SYSTEM_PORT"), RPC)),
        svc("Router", role=Role.ROUTER, ports=(SYSTEM, RPC)),
        svc("Planner", role=Role.PLANNER, ports=(SYSTEM,)),
        svc("Sidecar", ports=(RPC,)),
        name="ns",
    )
    view = ConnectorView(
        namespace="conn",
        taken_at=0.0,
        components=(
            _component("Router", "router"),
            _component("Planner", "planner"),
            _component("Prefill", "worker"),
            _component("Decode", "worker", namespace="decode-ns"),
            _component("Frontend", "frontend"),
            _component("Sidecar", "worker"),
        ),
        replicas=(
            _replica("Decode", 10, "ready", {"system": 2010, "rpc": 3010}),
            _replica("Decode", 2, "starting", {"system": 2002, "rpc": 3002}),
            *(
                _replica("Decode", i, state, {"system": 2000 + i, "rpc": 3000 + i})
                for i, state in enumerate(
                    ("spawning", "stopping", "backoff", "exited", "crashloop"), start=3
                )
            ),
            _replica("Decode", 0, "ready", {"system": 2000, "rpc": 3000}),
            _replica("Decode", 1, "ready", {"system": 2001, "rpc": 3001}, pid=None),
            _replica("Frontend", 0, "ready", {"http": 8000}),
            _replica("Prefill", 0, "ready", {"metrics": 2100, "rpc": 3100}),
            _replica("Router", 0, "ready", {"system": 2200, "rpc": 3200}),
            _replica("Planner", 0, "starting", {"system": 2300}),
            _replica("Sidecar", 0, "ready", {"rpc": 3400}),
        ),
    )
    replicas = [
        {"targets": ["127.0.0.1:2000"], "labels": _labels("decode-ns", "Decode", 0, "worker")},
        {"targets": ["127.0.0.1:2002"], "labels": _labels("decode-ns", "Decode", 2, "worker")},
        {"targets": ["127.0.0.1:2010"], "labels": _labels("decode-ns", "Decode", 10, "worker")},
        {"targets": ["127.0.0.1:8000"], "labels": _labels("ns", "Frontend", 0, "frontend")},
        {"targets": ["127.0.0.1:2300"], "labels": _labels("ns", "Planner", 0, "planner")},
        {"targets": ["127.0.0.1:2100"], "labels": _labels("ns", "Prefill", 0, "worker")},
        {"targets": ["127.0.0.1:2200"], "labels": _labels("ns", "Router", 0, "router")},
    ]
    assert target_groups(view, graph, None) == replicas
    connector = {
        "targets": ["host.example:8787"],
        "labels": {"__metrics_path__": "/metrics", "dynamo_namespace": "conn", "role": "connector"},
    }
    assert target_groups(view, graph, "host.example:8787") == [connector, *replicas]


def test_metrics_port_name_follows_the_env_var_the_process_reads() -> None:
    assert metrics_port_name(Role.WORKER, None) == "system"
    assert metrics_port_name(Role.ROUTER, None) == "system"
    assert metrics_port_name(Role.PLANNER, None) == "system"
    assert metrics_port_name(Role.FRONTEND, None) == "http"
    web_port = svc("F", role=Role.FRONTEND, ports=(PortSpec("web", "DYN_HTTP_PORT"),))
    assert metrics_port_name(Role.FRONTEND, web_port) == "web"
    # A port named "system" that the process does not read as DYN_SYSTEM_PORT loses to the
    # one it does read.
    both = svc("W", ports=(PortSpec("system"), PortSpec("sys2", "DYN_SYSTEM_PORT")))
    assert metrics_port_name(Role.WORKER, both) == "sys2"


# --------------------------------------------------------------------------- live endpoint


def _sd_graph() -> Graph:
    never = RestartPolicy(mode=RestartMode.NEVER)
    return make_graph(
        svc("Frontend", role=Role.FRONTEND, replicas=1, max_replicas=1, ports=(HTTP,)),
        svc(
            "Decode",
            sub_component_type=SubComponentType.DECODE,
            replicas=2,
            max_replicas=2,
            dynamo_namespace="decode-ns",
            ports=(SYSTEM, RPC),
            restart=never,
        ),
        svc("Sidecar", replicas=1, max_replicas=1),  # no ports: no target
        name="sdtest",
    )


async def _targets(served: Served) -> list[dict[str, Any]]:
    status, body, resp = await served.call("GET", "/v1/prometheus/targets")
    assert (status, resp.headers["Content-Type"]) == (200, "application/json; charset=utf-8")
    assert isinstance(body, list)
    return body


def _ports(served: Served, component: str) -> dict[str, dict[str, int]]:
    return {r.replica: r.ports for r in served.connector.view().replicas_of(component)}


@pytest.mark.integration
async def test_endpoint_lists_a_frontend_and_two_workers_and_drops_what_stops(
    tmp_path: Path,
) -> None:
    async with serve(tmp_path, _sd_graph(), exporter=_Metrics()) as served:
        view = served.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        frontend = _ports(served, "Frontend")["1"]["http"]
        decode = {r: p["system"] for r, p in _ports(served, "Decode").items()}
        assert sorted(decode) == ["1", "2"]
        own = {
            "targets": [f"127.0.0.1:{served.server.port}"],
            "labels": {
                "__metrics_path__": "/metrics",
                "dynamo_namespace": "t",
                "role": "connector",
            },
        }

        def decode_group(replica: str) -> dict[str, Any]:
            return {
                "targets": [f"127.0.0.1:{decode[replica]}"],
                "labels": _labels("decode-ns", "Decode", int(replica), "worker"),
            }

        frontend_group = {
            "targets": [f"127.0.0.1:{frontend}"],
            "labels": _labels("sdtest", "Frontend", 1, "frontend"),
        }
        assert await _targets(served) == [
            own,
            decode_group("1"),
            decode_group("2"),
            frontend_group,
        ]

        # An exited replica (killed; its policy never restarts it) is no target.
        [pid] = [r.pid for r in view().replicas_of("Decode") if r.replica == "2"]
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        await wait_until(
            lambda: (
                [r.state for r in view().replicas_of("Decode") if r.replica == "2"] == ["exited"]
            )
        )
        assert await _targets(served) == [own, decode_group("1"), frontend_group]

        # A stopped replica neither.
        await served.connector.scale_component("Frontend", 0)
        await wait_until(lambda: view().replicas_of("Frontend") == [])
        assert await _targets(served) == [own, decode_group("1")]


@pytest.mark.integration
async def test_without_an_exporter_the_connector_lists_only_replicas(tmp_path: Path) -> None:
    graph = make_graph(svc("Decode", replicas=1, ports=(SYSTEM,)), name="sdtest")
    async with serve(tmp_path, graph) as served:
        view = served.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        port = _ports(served, "Decode")["1"]["system"]
        assert await _targets(served) == [
            {"targets": [f"127.0.0.1:{port}"], "labels": _labels("sdtest", "Decode", 1, "worker")}
        ]


# --------------------------------------------------------------------------- real Prometheus

# dynamo-local's mock worker, not Dynamo's own processes: this test needs every role's
# /metrics where Dynamo serves it (frontend, workers, Planner) and nothing else, started in
# a fraction of a second. The real frontend scraped through the same endpoint is in
# test_dynamo_e2e.py.
MOCK = (sys.executable, "-m", "connector.mockworker", "--discovery", "none")


def mock_frontend() -> Service:
    """The mock worker as a frontend: ``dynamo_frontend_*`` on its HTTP port, ready when
    that port answers ``/health``."""
    return svc(
        "Frontend",
        (*MOCK, "--role", "frontend"),
        role=Role.FRONTEND,
        replicas=1,
        ports=(HTTP, RPC),
        readiness=Readiness(kind=ReadinessKind.HTTP, url="http://127.0.0.1:{port.http}/health"),
    )


def _mock_graph() -> Graph:
    """Mock Dynamo processes serving /metrics where the real ones do: a frontend on its
    HTTP port, decode workers on their system port."""
    return make_graph(
        mock_frontend(),
        svc(
            "Decode",
            (*MOCK, "--role", "worker"),
            sub_component_type=SubComponentType.DECODE,
            replicas=2,
            ports=(SYSTEM, RPC),
            readiness=Readiness(
                kind=ReadinessKind.HTTP, url="http://127.0.0.1:{port.system}/health"
            ),
        ),
        svc("Sidecar", replicas=1, readiness=QUICK),
        name="sdns",
    )


def _repository_config(api_port: int) -> str:
    """deploy/prometheus/prometheus.yml with the connector on this run's loopback port (its
    static target and its discovery URL), 1 s intervals, no rules or Alertmanager, and
    without the compose-only rewrite of 127.0.0.1 to the container's name for the host."""
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config.pop("rule_files")
    config.pop("alerting")
    api = f"127.0.0.1:{api_port}"
    jobs = [j for j in config["scrape_configs"] if j["job_name"] != "prometheus"]
    for job in jobs:
        for static in job.get("static_configs", []):
            assert static["targets"] == ["host.docker.internal:8787"]
            static["targets"] = [api]
        for sd in job.get("http_sd_configs", []):
            assert sd["url"] == "http://host.docker.internal:8787/v1/prometheus/targets"
            sd.update(url=f"http://{api}/v1/prometheus/targets", refresh_interval="1s")
        rules = job.get("relabel_configs", [])
        job["relabel_configs"] = [r for r in rules if r.get("target_label") != "__address__"]
        assert len(rules) - len(job["relabel_configs"]) == (1 if "http_sd_configs" in job else 0)
    assert sorted(j["job_name"] for j in jobs) == sorted(
        [JOB, DYNAMO_FRONTEND_JOB, DYNAMO_COMPONENTS_JOB]
    )
    config["scrape_configs"] = jobs
    return json.dumps(config)


def _up(targets: list[dict[str, Any]]) -> dict[tuple[str, str], str]:
    return {(t["labels"]["job"], t["labels"]["instance"]): t["health"] for t in targets}


@pytest.mark.integration
@pytest.mark.slow
@pytest.mark.timeout(90)
async def test_real_prometheus_discovers_scrapes_and_joins(
    tmp_path: Path, prometheus_server: PrometheusFactory
) -> None:
    from connector.api.server import create_app, start_server
    from exporter.service import build_exporter

    async with serve(tmp_path, _mock_graph()) as first:
        view = first.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components), 30)
        exporter = build_exporter(first.connector)
        await exporter.start()
        server = await start_server(create_app(first.connector, exporter=exporter), "127.0.0.1", 0)
        try:
            prom = prometheus_server([], config_text=_repository_config(server.port))
            await _check_prometheus(prom, first, server.port)
        finally:
            await server.stop()
            await exporter.stop()


async def _check_prometheus(prom: PrometheusServer, served: Served, api_port: int) -> None:
    frontend = _ports(served, "Frontend")["1"]["http"]
    decode = {r: p["system"] for r, p in _ports(served, "Decode").items()}
    want = {
        (JOB, f"127.0.0.1:{api_port}"): "up",
        (DYNAMO_FRONTEND_JOB, f"127.0.0.1:{frontend}"): "up",
        (DYNAMO_COMPONENTS_JOB, f"127.0.0.1:{decode['1']}"): "up",
        (DYNAMO_COMPONENTS_JOB, f"127.0.0.1:{decode['2']}"): "up",
    }
    # A target is "unknown" until its first scrape.
    deadline = time.monotonic() + 30
    while (got := _up(await prom.targets())) != want:
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.25)
    targets = {t["labels"]["instance"]: t for t in await prom.targets()}
    assert targets[f"127.0.0.1:{decode['2']}"]["labels"] == {
        "dynamo_component": "Decode",
        "dynamo_namespace": "sdns",
        "instance": f"127.0.0.1:{decode['2']}",
        "job": DYNAMO_COMPONENTS_JOB,
        "replica": "2",
        "role": "worker",
    }

    # Dynamo's frontend series, which carry no namespace of their own, filter on the
    # discovered labels, as the Overview dashboard's panels do.
    queued = await prom.wait_for(
        'dynamo_frontend_queued_requests{dynamo_namespace="sdns", dynamo_component="Frontend"}',
        timeout=30,
    )
    assert [r["metric"] for r in queued] == [
        {
            "__name__": "dynamo_frontend_queued_requests",
            "dynamo_component": "Frontend",
            "dynamo_namespace": "sdns",
            "instance": f"127.0.0.1:{frontend}",
            "job": DYNAMO_FRONTEND_JOB,
            "model": "mock-model",
            "replica": "1",
            "role": "frontend",
        }
    ]
    # A worker's series join the connector's per replica: the target's dynamo_component
    # (the graph's service name) replaces Dynamo's own ("backend", kept as exported_*).
    joined = await prom.wait_for(
        'dynamo_component_uptime_seconds{dynamo_namespace="sdns", dynamo_component="Decode"} '
        "* on (dynamo_namespace, dynamo_component, replica) group_left () "
        f'dynamo_local_replica_ready{{job="{JOB}"}}',
        timeout=30,
    )
    assert sorted((r["metric"]["replica"], r["metric"]["dynamo_component"]) for r in joined) == [
        ("1", "Decode"),
        ("2", "Decode"),
    ]
    requests = await prom.wait_for(
        'dynamo_component_requests_total{dynamo_namespace="sdns", dynamo_component="Decode", '
        'replica="1"}',
        timeout=30,
    )
    assert {r["metric"]["exported_dynamo_component"] for r in requests} == {"backend"}
