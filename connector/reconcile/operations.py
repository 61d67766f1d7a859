"""Scale operations: one trace and one event per scale, however many replicas it touches.

A scale call (or a restart, or a Planner decision) opens a :class:`ScaleOp`: its root span
``scale <component>`` stays open while the reconcile loop spawns, probes, drains, stops and
releases replicas as child spans, and closes with the outcome when the component converges,
the caller's timeout expires or a newer target supersedes it. Library code uses only the
OpenTelemetry API; the SDK is wired by the composition root (CLI/server), so without it the
spans are no-ops.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, Status, StatusCode

tracer = trace.get_tracer("connector")


class ScaleOp:
    """An in-flight change of one component's replica count."""

    def __init__(
        self,
        namespace: str,
        component: str,
        *,
        kind: str,
        source: str,
        before: int,
        target: int,
        decision_id: int | None = None,
    ) -> None:
        self.component = component
        self.kind = kind  # scale | restart
        self.source = source
        self.before = before
        self.target = target
        self.decision_id = decision_id
        self.started = time.monotonic()
        self.outcome: str | None = None
        self.reason: str | None = None
        attributes: dict[str, Any] = {
            "dynamo.namespace": namespace,
            "dynamo.component": component,
            "dynamo_local.replicas.before": before,
            "dynamo_local.replicas.target": target,
            "dynamo_local.source": source,
        }
        if decision_id is not None:
            attributes["dynamo_local.decision_id"] = decision_id
        self.span: Span = tracer.start_span(f"{kind} {component}", attributes=attributes)

    @property
    def trace_id(self) -> str | None:
        ctx = self.span.get_span_context()
        return f"{ctx.trace_id:032x}" if ctx.is_valid else None

    @property
    def done(self) -> bool:
        return self.outcome is not None

    @property
    def duration_s(self) -> float:
        return time.monotonic() - self.started

    @contextmanager
    def step(self, name: str, **attributes: Any) -> Iterator[Span]:
        """A child span of this operation (allocate, spawn, wait-ready, drain, stop, release)."""
        ctx = trace.set_span_in_context(self.span)
        with tracer.start_as_current_span(name, context=ctx, attributes=attributes) as span:
            yield span

    def finish(self, outcome: str, after: int, reason: str | None = None) -> None:
        if self.done:
            return
        self.outcome = outcome
        self.reason = reason
        self.span.set_attribute("dynamo_local.replicas.after", after)
        self.span.set_attribute("dynamo_local.outcome", outcome)
        if outcome not in ("ok", "superseded"):
            self.span.set_attribute("error.type", reason or outcome)
            self.span.set_status(Status(StatusCode.ERROR, reason or outcome))
        self.span.end()


@contextmanager
def standalone_step(name: str, **attributes: Any) -> Iterator[Span]:
    """A span for work that no scale operation asked for (a crash restart, a reap)."""
    with tracer.start_as_current_span(name, attributes=attributes) as span:
        yield span
