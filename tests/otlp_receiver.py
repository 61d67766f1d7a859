"""A tiny in-process OTLP/HTTP receiver for tests: ``/v1/traces`` and ``/v1/metrics``.

Decodes the protobuf bodies the OpenTelemetry OTLP/HTTP exporters send (gzip or not) with
``opentelemetry-proto`` and keeps what it got as plain records the tests assert on.
"""

from __future__ import annotations

import asyncio
import gzip
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import Any

from aiohttp import web
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue


def _value(v: AnyValue) -> Any:
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [_value(x) for x in v.array_value.values]
    return getattr(v, kind) if kind else None


def _attrs(kvs: Any) -> dict[str, Any]:
    return {kv.key: _value(kv.value) for kv in kvs if isinstance(kv, KeyValue)}


@dataclass(frozen=True)
class ReceivedSpan:
    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    status_code: int  # 0 unset, 1 ok, 2 error
    resource: dict[str, Any]
    scope: str


@dataclass(frozen=True)
class ReceivedPoint:
    metric: str
    unit: str
    kind: str  # gauge | sum | histogram
    attributes: dict[str, Any]
    value: float | None  # gauge and sum points
    count: int | None = None  # histogram points
    total: float | None = None


@dataclass
class OtlpReceiver:
    spans: list[ReceivedSpan] = field(default_factory=list)
    points: list[ReceivedPoint] = field(default_factory=list)
    requests: int = 0
    url: str = ""

    async def _body(self, request: web.Request) -> bytes:
        body = await request.read()
        if request.headers.get("Content-Encoding", "").lower() == "gzip":
            body = gzip.decompress(body)
        return body

    async def traces(self, request: web.Request) -> web.Response:
        self.requests += 1
        message = ExportTraceServiceRequest.FromString(await self._body(request))
        for rs in message.resource_spans:
            resource = _attrs(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    self.spans.append(
                        ReceivedSpan(
                            name=s.name,
                            trace_id=s.trace_id.hex(),
                            span_id=s.span_id.hex(),
                            parent_span_id=s.parent_span_id.hex(),
                            attributes=_attrs(s.attributes),
                            status_code=int(s.status.code),
                            resource=resource,
                            scope=ss.scope.name,
                        )
                    )
        body = ExportTraceServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def metrics(self, request: web.Request) -> web.Response:
        self.requests += 1
        message = ExportMetricsServiceRequest.FromString(await self._body(request))
        for rm in message.resource_metrics:
            for sm in rm.scope_metrics:
                for m in sm.metrics:
                    kind = m.WhichOneof("data")
                    data = getattr(m, kind)
                    for p in data.data_points:
                        attrs = _attrs(p.attributes)
                        if kind == "histogram":
                            point = ReceivedPoint(m.name, m.unit, kind, attrs, None)
                            self.points.append(replace(point, count=p.count, total=p.sum))
                            continue
                        number = p.as_double if p.WhichOneof("value") == "as_double" else p.as_int
                        self.points.append(ReceivedPoint(m.name, m.unit, kind, attrs, number))
        body = ExportMetricsServiceResponse().SerializeToString()
        return web.Response(body=body, content_type="application/x-protobuf")

    async def wait_for(self, pred: Callable[[], bool], limit_s: float = 10.0) -> None:
        deadline = time.monotonic() + limit_s
        while not pred():
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"OTLP receiver: condition not met within {limit_s} s "
                    f"({len(self.spans)} spans, {len(self.points)} points received)"
                )
            await asyncio.sleep(0.02)


@asynccontextmanager
async def otlp_receiver() -> AsyncIterator[OtlpReceiver]:
    """Serve a receiver on a free loopback port; ``receiver.url`` is the OTLP endpoint."""
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    app.router.add_post("/v1/metrics", receiver.metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    receiver.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    await web.SockSite(runner, sock).start()
    try:
        yield receiver
    finally:
        await runner.cleanup()
        sock.close()
