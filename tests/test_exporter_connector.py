"""The exporter over a real LocalConnector (real circusd, real process trees)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import psutil
import pytest

from connector.graph.model import ResourceRequest
from exporter.embedded import exporter_sources
from exporter.exposition import Format
from exporter.service import build_exporter
from tests.core_helpers import make_graph, pids, python_cmd, running, svc, wait_until
from tests.exporter_helpers import key, samples, series_with

pytestmark = pytest.mark.integration

# A replica that forks a child: its tree has two processes.
FORKING = python_cmd(
    "import subprocess, time; p = subprocess.Popen(['sleep', '300']); time.sleep(300)"
)


async def test_scaling_a_real_connector_shows_in_metrics_and_usage(tmp_path: Path) -> None:
    graph = make_graph(svc("decode", FORKING, replicas=1))
    async with running(graph, tmp_path) as connector:
        exporter = build_exporter(connector, **exporter_sources(connector), interval_s=3600.0)
        await exporter.start()
        try:
            assert await connector.scale_component("decode", 3)
            # Ready is "alive for its start-up grace"; each replica forks its child on its
            # own time, which a loaded machine can push past that grace.
            leaders = [p for p in pids(connector, "decode").values() if p]
            await wait_until(lambda: all(len(psutil.Process(p).children()) == 1 for p in leaders))
            await exporter.sample_once()
            text = exporter.exposition.render(Format.TEXT)
            values = samples(text)
            decode = connector.view().component("decode")
            assert decode is not None
            ns = decode.dynamo_namespace
            comp = {"dynamo_namespace": ns, "dynamo_component": "decode"}
            assert values[key("dynamo_local_component_replicas_ready", **comp)] == 3
            replicas = sorted(r.replica for r in connector.view().replicas_of("decode"))
            for ordinal in replicas:
                labels = {**comp, "replica": ordinal}
                assert values[key("dynamo_local_replica_processes", **labels)] == 2
            ops = key(
                "dynamo_local_scale_operations_total",
                **comp, direction="up", source="api", outcome="ok",
            )  # fmt: skip
            assert values[ops] == 1
            usage = exporter.component_metrics("decode")
            assert usage["totals"]["processes"] == 6
            assert [r["replica"] for r in usage["replicas"]] == replicas

            assert await connector.scale_component("decode", 1)
            await exporter.sample_once()
            text = exporter.exposition.render(Format.TEXT)
            (kept,) = [r.replica for r in connector.view().replicas_of("decode")]
            for ordinal in replicas:
                found = series_with(text, "replica_cpu_seconds_total", f'replica="{ordinal}"')
                assert bool(found) == (ordinal == kept), ordinal
            snapshot = exporter.latest_snapshot()
            assert snapshot is not None
            assert {h.source: h.up for h in snapshot.health}["processes"] is True
        finally:
            await exporter.stop()


async def test_a_memory_limit_is_published_only_for_the_service_that_sets_one(
    tmp_path: Path,
) -> None:
    capped = svc(
        "Capped", resources=ResourceRequest(memory_bytes=64 << 20, memory_limit_bytes=1 << 30)
    )
    graph = make_graph(capped, svc("Free"))
    async with running(graph, tmp_path, resync_s=0.1) as connector:
        exporter = build_exporter(connector, **exporter_sources(connector), interval_s=3600.0)
        await exporter.start()
        try:
            assert await connector.scale_component("Capped", 1)
            assert await connector.scale_component("Free", 1)
            view = connector.view()
            (limited,) = view.replicas_of("Capped")
            (unlimited,) = view.replicas_of("Free")
            assert (limited.memory_limit_bytes, unlimited.memory_limit_bytes) == (1 << 30, 0)
            await exporter.sample_once()
            text = exporter.exposition.render(Format.TEXT)
            values = samples(text)
            component = view.component("Capped")
            assert component is not None
            labels = {
                "dynamo_namespace": component.dynamo_namespace,
                "dynamo_component": "Capped",
                "replica": limited.replica,
            }
            limit = key("dynamo_local_replica_memory_limit_bytes", **labels)
            assert values[limit] == 1 << 30
            assert values[key("dynamo_local_replica_memory_reserved_bytes", **labels)] == 64 << 20
            # A sleep stays far within its limit, which the reconcile loop enforces on the
            # same RSS number.
            assert 0 < values[key("dynamo_local_replica_memory_rss_bytes", **labels)] < 1 << 30
            # No limit: no series at all (not a 0), though Free's other series are there.
            assert list(series_with(text, "dynamo_local_replica_memory_limit_bytes{")) == [limit]
            assert series_with(text, "dynamo_local_replica_memory_rss_bytes{", '"Free"')
            # A few resync passes later the limited replica still runs the same process.
            await asyncio.sleep(0.5)
            (still,) = connector.view().replicas_of("Capped")
            assert (still.state, still.pid) == ("ready", limited.pid)
        finally:
            await exporter.stop()
