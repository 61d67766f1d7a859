"""OpenTelemetry setup: the one composition root for the SDK, providers and exporters.

Library code (the connector) uses only the OpenTelemetry API (``trace.get_tracer``); this
module, called once by the CLI/server start-up, installs the SDK from the standard
environment:

- ``OTEL_SDK_DISABLED=true``: nothing is installed; spans stay no-ops.
- Otherwise an SDK tracer provider is installed, so spans get real trace ids (events and
  exemplars carry them) whether or not they are exported. Sampler, resource
  (``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``) and batching (``OTEL_BSP_*``) come
  from the environment as the SDK reads it.
- ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT``) set: spans are
  exported over OTLP/HTTP (protobuf); headers, timeout, compression and certificates from
  the usual ``OTEL_EXPORTER_OTLP_*`` variables. With ``..._METRICS_ENDPOINT`` or the general
  endpoint, metrics are exported too, every ``OTEL_METRIC_EXPORT_INTERVAL`` ms.
- Nothing set: nothing leaves the process.

``OTEL_TRACES_EXPORTER`` / ``OTEL_METRICS_EXPORTER`` may be ``otlp`` (default) or ``none``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

from opentelemetry import metrics, trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

log = logging.getLogger(__name__)

DEFAULT_SERVICE_NAME = "dynamo-local"
SUPPORTED_PROTOCOLS = ("http/protobuf", "")


class TelemetryConfigError(ValueError):
    """The OTEL_* environment asks for something this build cannot do."""


@dataclass
class Telemetry:
    """What :func:`setup_telemetry` installed. ``shutdown`` flushes and stops exporters."""

    tracer_provider: TracerProvider | None
    meter_provider: MeterProvider | None
    traces_exported: bool
    metrics_exported: bool

    def shutdown(self) -> None:
        if self.tracer_provider is not None:
            self.tracer_provider.force_flush()
            self.tracer_provider.shutdown()
        if self.meter_provider is not None:
            self.meter_provider.shutdown()


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() == "true"


def _exporter_choice(env: Mapping[str, str], variable: str) -> bool:
    """Whether OTEL_{TRACES,METRICS}_EXPORTER allows OTLP."""
    names = [n.strip().lower() for n in env.get(variable, "otlp").split(",") if n.strip()]
    if "none" in names:
        return False
    unsupported = [n for n in names if n != "otlp"]
    if unsupported:
        raise TelemetryConfigError(
            f"{variable}={env[variable]!r}: only 'otlp' and 'none' are supported"
        )
    return True


def _check_protocol(env: Mapping[str, str], signal: str) -> None:
    for variable in (f"OTEL_EXPORTER_OTLP_{signal}_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        value = env.get(variable)
        if value is not None:
            if value.strip() not in SUPPORTED_PROTOCOLS:
                raise TelemetryConfigError(
                    f"{variable}={value!r}: dynamo-local exports OTLP over HTTP only; "
                    "set it to 'http/protobuf' and point the endpoint at the HTTP port "
                    "(usually 4318)"
                )
            return


def setup_telemetry(
    *,
    service_name: str = DEFAULT_SERVICE_NAME,
    env: Mapping[str, str] | None = None,
    set_global: bool = True,
) -> Telemetry:
    """Install the OpenTelemetry SDK as the standard environment describes (see module doc).

    ``env`` defaults to ``os.environ`` (exporters read their own settings from there);
    ``set_global=False`` builds the providers without installing them (for tests).
    """
    env = os.environ if env is None else env
    if _truthy(env.get("OTEL_SDK_DISABLED")):
        return Telemetry(None, None, traces_exported=False, metrics_exported=False)
    defaults = {} if env.get("OTEL_SERVICE_NAME") else {SERVICE_NAME: service_name}
    resource = Resource.create(defaults)

    tracer_provider = TracerProvider(resource=resource)
    traces_endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    traces_exported = bool(traces_endpoint) and _exporter_choice(env, "OTEL_TRACES_EXPORTER")
    if traces_exported:
        _check_protocol(env, "TRACES")
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        tracer_provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
        log.info("exporting traces over OTLP/HTTP to %s", traces_endpoint)

    metrics_endpoint = env.get("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") or env.get(
        "OTEL_EXPORTER_OTLP_ENDPOINT"
    )
    metrics_exported = bool(metrics_endpoint) and _exporter_choice(env, "OTEL_METRICS_EXPORTER")
    meter_provider: MeterProvider | None = None
    if metrics_exported:
        _check_protocol(env, "METRICS")
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter

        reader = PeriodicExportingMetricReader(OTLPMetricExporter())
        meter_provider = MeterProvider(resource=resource, metric_readers=[reader])
        log.info("exporting metrics over OTLP/HTTP to %s", metrics_endpoint)

    if set_global:
        trace.set_tracer_provider(tracer_provider)
        if meter_provider is not None:
            metrics.set_meter_provider(meter_provider)
    return Telemetry(tracer_provider, meter_provider, traces_exported, metrics_exported)
