"""``/metrics`` over aiohttp: content negotiation, exemplars, gzip, and a loop that stays free."""

from __future__ import annotations

import gzip
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exporter.http import add_metrics_route
from exporter.service import Exporter
from tests.exporter_helpers import (
    FakeProcessTable,
    FakeReader,
    component,
    key,
    samples,
    view_of,
)
from tests.test_exporter_sampling import _setup

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
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
    add_metrics_route(app, exporter)
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
    labels = {"dynamo_namespace": "demo", "dynamo_component": "decode"}
    assert values[key("dynamo_local_component_replicas_desired", **labels)] == 2


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


async def test_scrape_takes_a_fresh_view_but_never_samples(
    served: Served,
) -> None:
    snapshot = served.exporter.latest_snapshot()
    assert snapshot is not None
    before = served.table.calls
    served.reader.set_view(view_of((component("decode", desired=5),), (), taken_at=99.0))
    text = await (await served.client.get("/metrics")).text()
    assert served.table.calls == before
    assert served.exporter.latest_snapshot() is snapshot
    labels = {"dynamo_namespace": "demo", "dynamo_component": "decode"}
    assert samples(text)[key("dynamo_local_component_replicas_desired", **labels)] == 5
