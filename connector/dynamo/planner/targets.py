"""The Planner's side of a scale, without etcd: its target types (field-compatible with Dynamo's
``TargetReplica``), which graph service a target names, and how one decision is applied to the graph
(:func:`apply_decision`, through the :class:`Scaler` the connector and the policies share). The
virtual-connector executor (:mod:`connector.dynamo.planner.executor`) reads the decisions from etcd
and hands them here."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from connector.errors import (
    ComponentNotFound,
    ConnectorError,
    GraphError,
    ResourcesExhausted,
)
from connector.graph.model import Graph, Service, SubComponentType

__all__ = [
    "DecisionOutcome",
    "Scaler",
    "SubComponentType",
    "TargetReplica",
    "apply_decision",
    "resolve_component",
    "resolve_targets",
]


# ------------------------------------------------------------------- Planner types


@dataclass(kw_only=True)
class TargetReplica:
    """One scaling target, field-compatible with Dynamo's ``TargetReplica``."""

    sub_component_type: SubComponentType
    component_name: str | None = None
    desired_replicas: int

    @classmethod
    def from_any(cls, obj: Any) -> TargetReplica:
        """Accept ours, Dynamo's (pydantic, its own enum) or a mapping with the same fields."""
        if isinstance(obj, cls):
            return obj

        def get(name: str) -> Any:
            if isinstance(obj, Mapping):
                return obj.get(name)
            return getattr(obj, name, None)

        sub = get("sub_component_type")
        sub = getattr(sub, "value", sub)
        try:
            sub_type = SubComponentType(str(sub))
        except ValueError:
            raise GraphError(
                f"sub_component_type must be 'prefill' or 'decode', got {sub!r}"
            ) from None
        replicas = get("desired_replicas")
        if isinstance(replicas, bool) or not isinstance(replicas, int):
            raise GraphError(f"desired_replicas must be an integer, got {replicas!r}")
        name = get("component_name")
        if name is not None and not isinstance(name, str):
            raise GraphError(f"component_name must be a string, got {name!r}")
        return cls(sub_component_type=sub_type, component_name=name, desired_replicas=replicas)


def resolve_component(
    graph: Graph, sub_type: SubComponentType, component_name: str | None = None
) -> Service:
    """The graph service for a Planner target: by name if given (it must have that
    sub-type), else the only service with ``subComponentType`` ``sub_type``."""
    if component_name is not None:
        svc = graph.services.get(component_name)
        if svc is None:
            # Dynamo's Planner may name the Dynamo component (lowercase) rather than the
            # service; accept either when it is unambiguous.
            matches = [
                s
                for s in graph.by_sub_type(sub_type)
                if (s.readiness.component or s.name.lower()) == component_name
            ]
            if len(matches) == 1:
                return matches[0]
            raise ComponentNotFound(
                f"graph {graph.name!r} has no component {component_name!r}",
                component=component_name,
            )
        if svc.sub_component_type is not sub_type:
            actual = svc.sub_component_type.value if svc.sub_component_type else "unset"
            raise ComponentNotFound(
                f"component {component_name!r} is not a {sub_type.value} worker "
                f"(its subComponentType is {actual})",
                component=component_name,
            )
        return svc
    found = graph.by_sub_type(sub_type)
    if not found:
        raise ComponentNotFound(
            f"graph {graph.name!r} has no component with subComponentType {sub_type.value}",
            sub_component_type=sub_type.value,
        )
    if len(found) > 1:
        names = ", ".join(sorted(s.name for s in found))
        raise GraphError(
            f"graph {graph.name!r} has several {sub_type.value} components ({names}); "
            "name one with component_name",
            sub_component_type=sub_type.value,
            components=sorted(s.name for s in found),
        )
    return found[0]


def resolve_targets(graph: Graph, targets: Iterable[Any]) -> dict[str, int]:
    """Planner targets -> {service name: replicas}. Raises if two targets hit one service."""
    out: dict[str, int] = {}
    for raw in targets:
        target = TargetReplica.from_any(raw)
        svc = resolve_component(graph, target.sub_component_type, target.component_name)
        if svc.name in out:
            raise GraphError(f"two targets for component {svc.name!r}", component=svc.name)
        out[svc.name] = target.desired_replicas
    return out


# ------------------------------------------------------------------ decisions


@dataclass(frozen=True)
class DecisionOutcome:
    """What applying a decision achieved. ``applied``: sub-type -> replica target set."""

    outcome: str  # ok | partial | failed
    reason: str | None = None
    applied: dict[str, int] = field(default_factory=dict)


class Scaler(Protocol):
    """The part of LocalConnector that :func:`apply_decision` drives."""

    async def scale_component(
        self,
        name: str,
        replicas: int,
        blocking: bool = True,
        timeout_s: float | None = None,
        source: str = "api",
        decision_id: int | None = None,
    ) -> bool: ...


async def apply_decision(
    graph: Graph,
    scaler: Scaler,
    num_prefill: int | None,
    num_decode: int | None,
    decision_id: int,
    *,
    timeout_s: float | None = None,
) -> DecisionOutcome:
    """Scale the graph's prefill and decode components (concurrently, blocking until ready)
    and report: ``ok`` (all met), ``partial`` (some met or some progress) or ``failed``."""
    parts: list[tuple[SubComponentType, int]] = [
        (sub, n)
        for sub, n in (
            (SubComponentType.PREFILL, num_prefill),
            (SubComponentType.DECODE, num_decode),
        )
        if n is not None
    ]

    async def one(sub: SubComponentType, n: int) -> tuple[str, int | None, str | None]:
        """(ok|partial|failed, replica target set, reason)."""
        try:
            svc = resolve_component(graph, sub)
        except ConnectorError as exc:
            if n == 0 and isinstance(exc, ComponentNotFound):
                return "ok", None, None  # nothing asked of a component we do not have
            return "failed", None, exc.message
        try:
            ok = await scaler.scale_component(
                svc.name,
                n,
                blocking=True,
                timeout_s=timeout_s,
                source="planner",
                decision_id=decision_id,
            )
        except ResourcesExhausted as exc:
            target = exc.details.get("target")
            started = exc.details.get("started") or []
            status = "partial" if started else "failed"
            return status, target if isinstance(target, int) else None, f"{svc.name}: {exc.message}"
        except ConnectorError as exc:
            return "failed", None, f"{svc.name}: {exc.message}"
        if not ok:
            return "partial", n, f"{svc.name}: {n} replicas not all ready before the timeout"
        return "ok", n, None

    results = await asyncio.gather(*(one(sub, n) for sub, n in parts))
    applied = {
        sub.value: target
        for (sub, _), (_, target, _) in zip(parts, results, strict=True)
        if target is not None
    }
    statuses = [status for status, _, _ in results]
    reasons = [reason for _, _, reason in results if reason]
    if all(s == "ok" for s in statuses):
        return DecisionOutcome("ok", None, applied)
    outcome = "failed" if all(s == "failed" for s in statuses) else "partial"
    return DecisionOutcome(outcome, "; ".join(reasons), applied)
