"""Dynamo interop end to end: LocalConnector + real etcd + mock (and real-runtime) workers.

The test acts as the Planner in "virtual" mode, writing exactly the keys it writes, and
checks that the graph's prefill and decode components are scaled and the decision
acknowledged; a SIGKILLed replica's discovery entry is gone well within the lease TTL.

Why dynamo-local's mock worker and not Dynamo's mocker here: these tests drive the
Planner's key protocol through many decisions, up to four prefill and four decode replicas
each, and one asks for more than fits; real mockers (about 100 MB and 0.6 s each) would
cost more than two cores give a unit of the suite. The same paths with the real frontend,
mocker and Planner, from a graph with no ``local:`` block, are in ``test_dynamo_e2e.py``
and ``test_planner_real.py``; one test here also registers through the real runtime.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aetcd
import pytest

from connector.graph.model import (
    Graph,
    PortSpec,
    Readiness,
    ReadinessKind,
    Role,
    Service,
    SubComponentType,
)
from connector.local import ConnectorOptions, LocalConnector
from exporter.embedded import exporter_sources
from exporter.exposition import Format
from exporter.service import Exporter, build_exporter
from tests.core_helpers import kinds, wait_until
from tests.exporter_helpers import samples
from tests.nvml_fakes import H100_CAPTURE, capture_path

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

NS = "e2e"


def _worker(name: str, sub: SubComponentType, component: str, *extra: str) -> Service:
    return Service(
        name=name,
        role=Role.WORKER,
        sub_component_type=sub,
        command=(sys.executable, "-m", "connector.mockworker"),
        args=("--role", "worker", "--endpoint", "generate", *extra),
        dynamo_namespace=NS,
        max_replicas=4,
        ports=(PortSpec("system", "DYN_SYSTEM_PORT"), PortSpec("rpc", "DYN_TCP_RPC_PORT")),
        readiness=Readiness(kind=ReadinessKind.DISCOVERY, component=component, timeout_s=60),
        graceful_stop_s=5,
    )


def _graph(*extra: str) -> Graph:
    return Graph(
        name=NS,
        namespace=NS,
        services={
            "Prefill": _worker("Prefill", SubComponentType.PREFILL, "prefill", *extra),
            "Decode": _worker("Decode", SubComponentType.DECODE, "backend", *extra),
        },
    )


class Planner:
    """Writes decisions the way Dynamo's Planner does in virtual mode: the changed counts,
    then ``decision_id``, decimal strings on its own lease."""

    prefix = f"v1/{NS}/planner/"

    def __init__(self, client: Any) -> None:
        self.client = client
        self.lease: Any = None

    async def start(self) -> None:
        self.lease = await self.client.lease(30)

    async def decide(
        self, decision_id: int, prefill: int | None = None, decode: int | None = None
    ) -> None:
        for name, value in (("num_prefill_workers", prefill), ("num_decode_workers", decode)):
            if value is not None:
                await self._put(name, str(value))
        await self._put("decision_id", str(decision_id))

    async def _put(self, name: str, value: str) -> None:
        await self.client.put((self.prefix + name).encode(), value.encode(), lease=self.lease)

    async def ack(self) -> Any:
        return await self.client.get((self.prefix + "scaled_decision_id").encode())

    async def stop(self) -> None:
        await self.lease.revoke()


@pytest.fixture
async def etcd(etcd_server: Any) -> AsyncIterator[Any]:
    client = aetcd.Client(etcd_server.host, etcd_server.port, timeout=5)
    yield client
    await client.close()


async def _keys(client: Any, prefix: str) -> list[str]:
    got = await client.get_prefix(prefix.encode(), keys_only=True)
    return sorted(kv.key.decode() for kv in got)


async def _planner_gauges(exporter: Exporter) -> dict[str, float]:
    """The Planner gauges (and the planner source's health) of a fresh snapshot."""
    await exporter.sample_once()
    values = samples(exporter.exposition.render(Format.TEXT))
    return {
        series: value
        for series, value in values.items()
        if series.startswith("dynamo_local_planner_") or series.endswith('{source="planner"}')
    }


def _expected(
    decision: int | None, acknowledged: int | None, seen_at: float | None
) -> dict[str, float]:
    """The planner source's series: absent values are absent series, never zeros."""
    ns = f'{{dynamo_namespace="{NS}"}}'
    out: dict[str, float] = {
        'dynamo_local_exporter_source_up{source="planner"}': 1.0,
        'dynamo_local_exporter_source_errors_total{source="planner"}': 0.0,
    }
    if decision is not None:
        out[f"dynamo_local_planner_decision_id{ns}"] = decision
    if acknowledged is not None:
        out[f"dynamo_local_planner_decision_acknowledged_id{ns}"] = acknowledged
    if seen_at is not None:
        out[f"dynamo_local_planner_decision_seen_timestamp_seconds{ns}"] = seen_at
    return out


def _without_timing(gauges: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in gauges.items() if "last_success" not in k and "duration" not in k}


async def _executor_recorded_ack(conn: LocalConnector, decision_id: int) -> None:
    """etcd has an ack the moment its transaction commits; the executor records it when its
    call returns, one loop turn later."""
    deadline = time.monotonic() + 5
    while conn.planner_status().get("acknowledged") != decision_id:
        assert time.monotonic() < deadline, f"the executor did not record ack {decision_id}"
        await asyncio.sleep(0.01)


async def test_planner_decision_scales_the_graph_and_is_acknowledged(
    tmp_path: Path, etcd_server: Any, etcd: Any
) -> None:
    options = ConnectorOptions(
        discovery="etcd", etcd_url=etcd_server.url, gpu_backend="none", planner_executor=True
    )
    planner = Planner(etcd)
    await planner.start()
    async with LocalConnector("e2e", _graph(), tmp_path, options) as conn:
        # The exporter as `dynamo-local up` builds it reads the executor's status.
        sources = exporter_sources(conn)
        assert sources["planner_status"] == conn.planner_status
        exporter = build_exporter(conn, **sources, interval_s=3600.0)
        await exporter.start()
        # The executor runs; the Planner has decided nothing yet: no series, no zeros.
        assert _without_timing(await _planner_gauges(exporter)) == _expected(None, None, None)
        before = time.time()
        await planner.decide(1, prefill=2, decode=1)
        deadline = time.monotonic() + 60
        while True:
            ack = await planner.ack()
            if ack is not None and bytes(ack.value) == b"1":
                break
            assert time.monotonic() < deadline, "decision 1 was not acknowledged"
            await asyncio.sleep(0.05)
        await _executor_recorded_ack(conn, 1)
        after = time.time()
        seen_at = conn.planner_status()["decision_seen_at"]
        assert before <= seen_at <= after
        assert _without_timing(await _planner_gauges(exporter)) == _expected(1, 1, seen_at)
        assert await conn.get_component_replicas("Prefill") == 2
        assert await conn.get_component_replicas("Decode") == 1
        prefill, decode, stable = await conn.get_actual_worker_counts()
        assert (prefill, decode, stable) == (2, 1, True)
        # Each ready replica is in discovery under the component it registers as.
        keys = await _keys(etcd, f"v1/instances/{NS}/")
        assert len([k for k in keys if k.startswith(f"v1/instances/{NS}/prefill/generate/")]) == 2
        assert len([k for k in keys if k.startswith(f"v1/instances/{NS}/backend/generate/")]) == 1
        decisions = [e for e in conn.events.since(0) if e.kind == "decision"]
        assert decisions and decisions[-1].outcome == "ok"
        # The Planner scales decode down; the drained replica leaves discovery first.
        await planner.decide(2, decode=0)
        while True:
            ack = await planner.ack()
            if ack is not None and bytes(ack.value) == b"2":
                break
            assert time.monotonic() < deadline + 30, "decision 2 was not acknowledged"
            await asyncio.sleep(0.05)
        await _executor_recorded_ack(conn, 2)
        assert await conn.get_component_replicas("Decode") == 0
        assert [k for k in await _keys(etcd, f"v1/instances/{NS}/backend/")] == []
        seen_at_2 = conn.planner_status()["decision_seen_at"]
        assert seen_at < seen_at_2 <= time.time()
        assert _without_timing(await _planner_gauges(exporter)) == _expected(2, 2, seen_at_2)
        await exporter.stop()
    assert conn.planner_status() == {}  # the executor is closed with the connector
    await planner.stop()


async def test_sigkilled_replica_leaves_discovery_at_once(
    tmp_path: Path, etcd_server: Any, etcd: Any
) -> None:
    options = ConnectorOptions(discovery="etcd", etcd_url=etcd_server.url, gpu_backend="none")
    async with LocalConnector("e2e", _graph(), tmp_path, options) as conn:
        # No executor: the exporter is not handed the Planner source at all.
        assert "planner_status" not in exporter_sources(conn)
        assert conn.planner_status() == {}
        assert await conn.scale_component("Decode", 1, timeout_s=60)
        keys = await _keys(etcd, f"v1/instances/{NS}/backend/")
        assert len(keys) == 1
        pid = conn.state.replicas_of("Decode")[0].pid
        assert pid is not None
        killed = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        while await _keys(etcd, f"v1/instances/{NS}/backend/"):
            assert time.monotonic() - killed < 0.5, "stale entry outlived 500 ms"
            await asyncio.sleep(0.01)
        # The bridge records the reap when its revoke call returns: the key can be gone from
        # etcd (seen above) a loop turn before the event is in the log.
        await wait_until(lambda: bool(kinds(conn, "reap")), limit_s=5)
        reaps = kinds(conn, "reap")
        assert reaps and reaps[-1].details["revoked"] is True


async def test_real_dynamo_runtime_worker_is_discovered_made_ready_and_cleaned_up(
    tmp_path: Path, etcd_server: Any, etcd: Any
) -> None:
    pytest.importorskip("dynamo.runtime", reason="ai-dynamo-runtime is not installed")
    options = ConnectorOptions(discovery="etcd", etcd_url=etcd_server.url, gpu_backend="none")
    graph = _graph("--use-dynamo-runtime")
    async with LocalConnector("e2e", graph, tmp_path, options) as conn:
        assert await conn.scale_component("Decode", 1, timeout_s=90)
        keys = await _keys(etcd, f"v1/instances/{NS}/backend/generate/")
        assert len(keys) == 1
        topology = await conn.get_system_topology()
        decode = next(n for n in topology["nodes"] if n["id"] == "Decode")
        assert len(decode["instances"]) == 1
        assert await conn.scale_component("Decode", 0, timeout_s=60)
        assert await _keys(etcd, f"v1/instances/{NS}/backend/") == []


async def test_impossible_decision_is_applied_in_part_recorded_and_acknowledged(
    tmp_path: Path, etcd_server: Any, etcd: Any
) -> None:
    capture = capture_path(H100_CAPTURE)
    from dataclasses import replace

    from connector.graph.model import ResourceRequest

    base = _graph()
    # One GPU on the (fake) machine; each decode replica wants a whole one.
    decode = replace(base.services["Decode"], resources=ResourceRequest(gpu=1))
    graph = replace(base, services={**base.services, "Decode": decode})
    options = ConnectorOptions(
        discovery="etcd",
        etcd_url=etcd_server.url,
        gpu_backend=f"fake:{capture}",
        planner_executor=True,
    )
    planner = Planner(etcd)
    await planner.start()
    async with LocalConnector("e2e", graph, tmp_path, options) as conn:
        # The capture's GPU is held by a foreign process: let ours pass the threshold.
        assert conn.resource_manager is not None
        conn.resource_manager.foreign_threshold = 1 << 40
        await planner.decide(1, prefill=1, decode=2)
        deadline = time.monotonic() + 60
        while True:
            ack = await planner.ack()
            if ack is not None and bytes(ack.value) == b"1":
                break
            assert time.monotonic() < deadline, "decision 1 was not acknowledged"
            await asyncio.sleep(0.05)
        # The part that fits was started; the acknowledgement does not wait for it.
        assert conn.state.components["Decode"].target == 1
        assert await conn.scale_component("Decode", 1, timeout_s=60)
        assert await conn.get_component_replicas("Decode") == 1
        assert await conn.get_component_replicas("Prefill") == 1
        decision = [e for e in conn.events.since(0) if e.kind == "decision"][-1]
        assert decision.outcome == "partial"
        assert decision.reason is not None and "Decode replica 2 needs 1 GPU, 0 free" in (
            decision.reason
        )
    await planner.stop()
