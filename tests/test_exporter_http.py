"""``/metrics`` over aiohttp: content negotiation, exemplars, gzip, and a loop that stays free."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.exposition import generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as openmetrics_latest

from exporter.exposition import Format, negotiate
from exporter.http import add_metrics_route
from exporter.service import Exporter
from tests.exporter_helpers import (
    FakeProcessTable,
    FakeReader,
    component,
    key,
    samples,
    series_with,
    view_of,
)
from tests.test_exporter_sampling import _setup

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
LABELS = {"dynamo_namespace": "demo", "dynamo_component": "decode"}
OPENMETRICS = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"


@dataclass
class Served:
    client: TestClient[web.Request, web.Application]
    exporter: Exporter
    reader: FakeReader
    table: FakeProcessTable


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    reader, table, _, exporter = _setup(interval_s=3600.0)  # no periodic sample during a test
    app = web.Application()
    add_metrics_route(app, exporter.exposition)
    await exporter.start()
    reader.events.emit(
        "scale", component="decode", source="api", from_replicas=0, to_replicas=2,
        outcome="ok", duration_s=1.7, trace_id=TRACE_ID,
    )  # fmt: skip
    client = TestClient(TestServer(app, host="127.0.0.1"))
    await client.start_server()
    try:
        yield Served(client, exporter, reader, table)
    finally:
        await client.close()
        await exporter.stop()


async def test_prometheus_text_by_default(served: Served) -> None:
    client = served.client
    resp = await client.get("/metrics", headers={"Accept-Encoding": "identity"})
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    text = await resp.text()
    assert "# EOF" not in text
    assert " # {" not in text  # no exemplars in the classic format
    values = samples(text)
    assert values[key("dynamo_local_component_replicas_desired", **LABELS)] == 2


async def test_openmetrics_carries_trace_id_exemplars(served: Served) -> None:
    client = served.client
    resp = await client.get("/metrics", headers={"Accept": OPENMETRICS})
    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = await resp.text()
    assert text.endswith("# EOF\n")
    assert "# UNIT dynamo_local_scale_duration_seconds seconds" in text
    (line,) = [ln for ln in text.splitlines() if f'trace_id="{TRACE_ID}"' in ln]
    assert re.fullmatch(
        r'dynamo_local_scale_duration_seconds_bucket\{direction="up",dynamo_component="decode",'
        r'dynamo_namespace="demo",le="2\.5",outcome="ok"\} 1\.0 # \{trace_id="'
        + TRACE_ID
        + r'"\} 1\.7 \d+\.\d+',
        line,
    )


async def test_gzip_when_accepted(served: Served) -> None:
    client = served.client
    resp = await client.get("/metrics", headers={"Accept-Encoding": "gzip"}, auto_decompress=False)
    assert resp.headers["Content-Encoding"] == "gzip"
    body = gzip.decompress(await resp.read()).decode()
    assert "dynamo_local_component_replicas_desired" in body


async def test_scrapes_render_the_latest_snapshot_and_never_sample(served: Served) -> None:
    snapshot = served.exporter.latest_snapshot()
    assert snapshot is not None
    before, view_calls = served.table.calls, served.reader.view_calls
    served.reader.set_view(view_of((component("decode", desired=5),), (), taken_at=99.0))
    desired = key("dynamo_local_component_replicas_desired", **LABELS)
    for _ in range(3):
        text = await (await served.client.get("/metrics")).text()
        assert samples(text)[desired] == 2  # the snapshot's view, not a fresh one
    assert (served.table.calls, served.reader.view_calls) == (before, view_calls)
    assert served.exporter.latest_snapshot() is snapshot
    await served.exporter.sample_once()
    text = await (await served.client.get("/metrics")).text()
    assert samples(text)[desired] == 5
    assert not series_with(text, "replica_cpu_seconds_total")  # replicas gone from the view


def test_content_negotiation() -> None:
    assert negotiate("") is Format.TEXT
    assert negotiate("text/plain;version=0.0.4") is Format.TEXT
    assert negotiate("text/plain;version=1.0.0;escaping=underscores") is Format.TEXT
    assert negotiate(OPENMETRICS) is Format.OPENMETRICS
    assert negotiate("application/openmetrics-text") is Format.OPENMETRICS
    assert negotiate("application/openmetrics-text;version=0.0.1") is Format.TEXT
    assert negotiate("application/openmetrics-text;q=0,text/plain") is Format.TEXT


async def test_fast_renderer_matches_prometheus_client_byte_for_byte() -> None:
    reader, table, _, exporter = _setup(
        machine_view=lambda: {"gpus": [{"uuid": "GPU-a", "state": "free"}]},
        discovery_stats=lambda: {"instances": {"decode": 2}, "stale_reaped_total": 1},
    )
    table.bump(100, command='python -c "print(1)" C:\\dir\nnext')  # needs escaping
    await exporter.start()
    try:
        reader.events.emit(
            "scale", component="decode", source="api", from_replicas=2, to_replicas=1,
            outcome="ok", duration_s=12345678.5, trace_id=TRACE_ID,
        )  # fmt: skip
        await exporter.sample_once()
        assert exporter.exposition.render(Format.TEXT).encode() == generate_latest(
            exporter.registry
        )
        assert exporter.exposition.render(Format.OPENMETRICS).encode() == openmetrics_latest(
            exporter.registry
        )
    finally:
        await exporter.stop()
