"""The timeline: one row per sample (every ``interval`` seconds) of what the graph and the
frontend did, and how it is written as CSV.

Columns: ``t_s`` (seconds since the experiment started), ``time`` (Unix time), ``phase``
(the load phase running, empty while aiperf starts or after the load), the phase's
``target_concurrency`` / ``target_request_rate``, the frontend's ``request_rate``,
``errors_per_s``, ``inflight``, ``ttft_p50_s``, ``ttft_p99_s``, ``itl_p50_s``,
``itl_p99_s``; then per component ``<name>_desired``, ``<name>_ready``, ``<name>_running``,
``<name>_cpu_cores``, ``<name>_rss_bytes``; and ``events``: what ``GET /v1/events``
reported since the previous row (scale operations with their durations, Planner decisions
with their acknowledgement, replicas ready, stopped or exited), ``; ``-separated.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from connector.experiment.metrics import Figures

FIXED_COLUMNS = (
    "t_s",
    "time",
    "phase",
    "target_concurrency",
    "target_request_rate",
    "request_rate",
    "errors_per_s",
    "inflight",
    "ttft_p50_s",
    "ttft_p99_s",
    "itl_p50_s",
    "itl_p99_s",
)
COMPONENT_FIELDS = ("desired", "ready", "running", "cpu_cores", "rss_bytes")
# The event kinds a timeline row names (others, e.g. allocate/release, stay in events.jsonl).
TIMELINE_EVENT_KINDS = frozenset(
    {"scale", "decision", "autoscale", "ready", "stop", "exit", "crashloop", "restart"}
)


@dataclass(frozen=True)
class ComponentSample:
    desired: int | None = None
    ready: int | None = None
    running: int | None = None
    cpu_cores: float | None = None
    rss_bytes: int | None = None


@dataclass(frozen=True, kw_only=True)
class Sample(Figures):
    """One timeline row: the frontend's figures (:class:`metrics.Figures`, inherited, so a
    figure is named once) plus the time, the load asked for and each component's state."""

    t: float
    time: float
    phase: str = ""
    target_concurrency: float | None = None
    target_request_rate: float | None = None
    components: Mapping[str, ComponentSample] = field(default_factory=dict)
    events: tuple[str, ...] = ()

    def value(self, column: str) -> float | None:
        """A numeric fixed column by name (``ttft_p99_s``, ...)."""
        v = getattr(self, column)
        return None if v is None else float(v)


def columns(components: Sequence[str]) -> list[str]:
    return [
        *FIXED_COLUMNS,
        *(f"{name}_{f}" for name in components for f in COMPONENT_FIELDS),
        "events",
    ]


def to_csv(samples: Sequence[Sample], components: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(columns(components))
    for s in samples:
        row: list[object] = [
            _num(s.t, 3),
            _num(s.time, 3),
            s.phase,
            *(_num(getattr(s, c)) for c in FIXED_COLUMNS[3:]),
        ]
        for name in components:
            c = s.components.get(name, ComponentSample())
            row.extend(_num(getattr(c, f)) for f in COMPONENT_FIELDS)
        row.append("; ".join(s.events))
        writer.writerow(row)
    return out.getvalue()


def _num(value: float | int | None, digits: int = 6) -> str:
    if value is None:
        return ""
    if isinstance(value, int):
        return str(value)
    text = f"{value:.{digits}f}".rstrip("0").rstrip(".")
    return "0" if text in ("", "-0") else text


def describe_event(event: Mapping[str, Any]) -> str:
    """One event as a timeline cell: ``scale Decode 1→2 (planner) ok in 6.1 s``. A policy's
    ``autoscale`` decision keeps its reason, which says why (the trigger's value against its
    target, what limited the step), as a Planner decision keeps its own."""
    kind = str(event.get("kind", "?"))
    who = event.get("replica") or event.get("component") or ""
    parts = [kind, str(who)] if who else [kind]
    if kind == "decision":
        d = event.get("details") or {}
        parts.append(
            f"#{d.get('decision_id', '?')} prefill={d.get('num_prefill_workers', '?')} "
            f"decode={d.get('num_decode_workers', '?')}, acknowledged"
        )
    elif event.get("from_replicas") is not None or event.get("to_replicas") is not None:
        parts.append(f"{event.get('from_replicas', '?')}→{event.get('to_replicas', '?')}")
    if event.get("source"):
        parts.append(f"({event['source']})")
    if event.get("outcome"):
        parts.append(str(event["outcome"]))
    if isinstance(event.get("duration_s"), int | float):
        parts.append(f"in {event['duration_s']:.1f} s")
    if event.get("reason") and kind in ("exit", "crashloop", "decision", "autoscale", "scale"):
        parts.append(f"— {event['reason']}")
    return " ".join(parts)


def timeline_events(events: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The events a timeline row names: not a scale to the count a component already had
    (the Planner restating a target), which stays in events.jsonl."""
    return [
        e
        for e in events
        if e.get("kind") in TIMELINE_EVENT_KINDS
        and not (e.get("kind") == "scale" and e.get("from_replicas") == e.get("to_replicas"))
    ]


def sample_json(sample: Sample) -> dict[str, Any]:
    """One sample as JSON (the API's experiment status and live timeline): the CSV's columns,
    the components nested by name, numbers rounded as in the CSV, the events described."""
    out: dict[str, Any] = {
        "t": round(sample.t, 3),
        "time": round(sample.time, 3),
        "phase": sample.phase,
    }
    for column in FIXED_COLUMNS[3:]:
        value = getattr(sample, column)
        out[column] = None if value is None else round(float(value), 6)
    out["components"] = {
        name: {
            "desired": c.desired,
            "ready": c.ready,
            "running": c.running,
            "cpu_cores": None if c.cpu_cores is None else round(c.cpu_cores, 4),
            "rss_bytes": c.rss_bytes,
        }
        for name, c in sample.components.items()
    }
    out["events"] = list(sample.events)
    return out
