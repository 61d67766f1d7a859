"""OpenTelemetry: env-driven setup, real OTLP/HTTP span export, and OTel metrics export."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

from exporter.service import build_exporter
from exporter.tracing import TelemetryConfigError, setup_telemetry
from tests.exporter_helpers import (
    Clock,
    FakeProc,
    FakeProcessTable,
    FakeReader,
    component,
    replica,
    view_of,
)
from tests.otlp_receiver import otlp_receiver

ROOT = Path(__file__).resolve().parent.parent

# Emits spans the way the connector does: only the OTel API, one trace per scale operation,
# with the SDK wired by the composition root (setup_telemetry) from the OTEL_* environment.
SCALE_SCRIPT = r"""
import json, sys
from opentelemetry import trace
from opentelemetry.trace import Status, StatusCode
from exporter.tracing import setup_telemetry

telemetry = setup_telemetry()
tracer = trace.get_tracer("connector")
ids = {}

def scale(component, before, target, after, outcome, steps, error=None):
    attributes = {
        "dynamo.namespace": "demo", "dynamo.component": component,
        "dynamo_local.replicas.before": before, "dynamo_local.replicas.target": target,
        "dynamo_local.source": "planner", "dynamo_local.decision_id": 7,
    }
    root = tracer.start_span(f"scale {component}", attributes=attributes)
    ctx = trace.set_span_in_context(root)
    for name, attrs in steps:
        with tracer.start_as_current_span(name, context=ctx, attributes=attrs):
            pass
    root.set_attribute("dynamo_local.replicas.after", after)
    root.set_attribute("dynamo_local.outcome", outcome)
    if error:
        root.set_attribute("error.type", error)
        root.set_status(Status(StatusCode.ERROR, error))
    root.end()
    ids[component] = format(root.get_span_context().trace_id, "032x")

scale("decode", 1, 3, 3, "ok", [
    ("allocate", {"dynamo_local.replicas": 2}),
    ("spawn", {"dynamo_local.replica": "1"}),
    ("spawn", {"dynamo_local.replica": "2"}),
    ("wait-ready", {}),
])
scale("prefill", 2, 0, 1, "timeout", [
    ("drain", {"dynamo_local.replica": "1"}),
    ("stop", {"dynamo_local.replica": "1"}),
    ("release", {"dynamo_local.replica": "1"}),
], error="ScaleTimeout")
telemetry.shutdown()
print(json.dumps({"ids": ids, "exported": telemetry.traces_exported}))
"""


async def test_scale_trace_is_exported_over_otlp_http_from_the_environment() -> None:
    async with otlp_receiver() as receiver:
        env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
        env |= {
            "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
            "OTEL_SERVICE_NAME": "dynamo-local-test",
            "OTEL_BSP_SCHEDULE_DELAY": "50",
            "PYTHONPATH": str(ROOT),
        }
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-W", "error", "-c", SCALE_SCRIPT,
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        result = json.loads(out)
        assert result["exported"] is True
        await receiver.wait_for(lambda: len(receiver.spans) == 9)

    by_trace: dict[str, list] = {}
    for s in receiver.spans:
        by_trace.setdefault(s.trace_id, []).append(s)
    assert set(by_trace) == set(result["ids"].values())

    up = by_trace[result["ids"]["decode"]]
    (root,) = [s for s in up if s.parent_span_id == ""]
    assert root.name == "scale decode"
    assert root.scope == "connector"
    assert root.resource["service.name"] == "dynamo-local-test"
    assert root.attributes == {
        "dynamo.namespace": "demo",
        "dynamo.component": "decode",
        "dynamo_local.replicas.before": 1,
        "dynamo_local.replicas.target": 3,
        "dynamo_local.replicas.after": 3,
        "dynamo_local.source": "planner",
        "dynamo_local.decision_id": 7,
        "dynamo_local.outcome": "ok",
    }
    children = sorted(
        (s.name, s.attributes.get("dynamo_local.replica", "")) for s in up if s is not root
    )
    assert children == [("allocate", ""), ("spawn", "1"), ("spawn", "2"), ("wait-ready", "")]
    assert all(s.parent_span_id == root.span_id for s in up if s is not root)

    down = by_trace[result["ids"]["prefill"]]
    (root,) = [s for s in down if s.parent_span_id == ""]
    assert root.name == "scale prefill"
    assert root.status_code == 2
    assert root.attributes["error.type"] == "ScaleTimeout"
    assert root.attributes["dynamo_local.outcome"] == "timeout"
    assert sorted(s.name for s in down if s is not root) == ["drain", "release", "stop"]


def test_nothing_is_exported_without_an_endpoint() -> None:
    telemetry = setup_telemetry(env={}, set_global=False)
    try:
        assert telemetry.tracer_provider is not None  # spans still get real trace ids
        assert (telemetry.traces_exported, telemetry.metrics_exported) == (False, False)
        assert telemetry.meter_provider is None
        span = telemetry.tracer_provider.get_tracer("t").start_span("scale x")
        assert span.get_span_context().is_valid
        span.end()
    finally:
        telemetry.shutdown()


def test_sdk_disabled_and_exporter_none_are_honoured() -> None:
    disabled = setup_telemetry(env={"OTEL_SDK_DISABLED": "true"}, set_global=False)
    assert disabled.tracer_provider is None and disabled.meter_provider is None
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"}
    telemetry = setup_telemetry(env=env, set_global=False)
    try:
        assert telemetry.traces_exported is False
        assert telemetry.metrics_exported is True
    finally:
        telemetry.shutdown()


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
            "OTEL_EXPORTER_OTLP_PROTOCOL='grpc': dynamo-local exports OTLP over HTTP only",
        ),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_TRACES_EXPORTER": "zipkin"},
            "OTEL_TRACES_EXPORTER='zipkin': only 'otlp' and 'none' are supported",
        ),
    ],
)
def test_unsupported_settings_fail_with_a_clear_message(env: dict[str, str], message: str) -> None:
    with pytest.raises(TelemetryConfigError, match=message.replace("(", r"\(")):
        setup_telemetry(env=env, set_global=False)


async def test_catalog_is_exported_as_otel_metrics_with_semconv_names() -> None:
    table = FakeProcessTable({100: FakeProc(1, 10.0, 4.0, 5000, cpus=2)})
    reader = FakeReader(
        view_of((component("decode"),), (replica("decode", 0, 100, create_time=10.0),), 1.0)
    )
    clock = Clock()
    from exporter.process_tree import ProcessTreeSampler

    exporter = build_exporter(reader, processes=ProcessTreeSampler(table, clock=clock), clock=clock)
    async with otlp_receiver() as receiver:
        metric_exporter = OTLPMetricExporter(endpoint=receiver.url + "/v1/metrics")
        reader_ = PeriodicExportingMetricReader(metric_exporter, export_interval_millis=3_600_000)
        provider = MeterProvider(metric_readers=[reader_])
        exporter.instrument_otel(provider)
        await exporter.start()
        reader.events.emit(
            "scale", component="decode", source="api", from_replicas=0, to_replicas=1,
            outcome="ok", duration_s=0.4, trace_id="ab" * 16,
        )  # fmt: skip
        try:
            # The OTLP exporter posts synchronously; our receiver runs on this loop.
            await asyncio.to_thread(provider.force_flush)
            await receiver.wait_for(
                lambda: any(p.metric == "process.cpu.time" for p in receiver.points)
            )
        finally:
            await exporter.stop()
            await asyncio.to_thread(provider.shutdown)
    points = {p.metric: p for p in receiver.points}
    cpu = points["process.cpu.time"]
    assert (cpu.kind, cpu.unit, cpu.value) == ("sum", "s", 4.0)
    assert cpu.attributes == {
        "dynamo.namespace": "demo",
        "dynamo.component": "decode",
        "dynamo_local.replica": "0",
    }
    rss = points["process.memory.usage"]
    assert (rss.kind, rss.unit, rss.value) == ("sum", "By", 5000)
    desired = points["dynamo_local.component.replicas.desired"]
    assert (desired.kind, desired.value) == ("gauge", 1)
    duration = points["dynamo_local.scale.duration"]
    assert (duration.kind, duration.unit, duration.count, duration.total) == (
        "histogram",
        "s",
        1,
        0.4,
    )
    assert duration.attributes["dynamo_local.direction"] == "up"
