"""ScaledObjects against the graph they scale: which service each one drives, and the rule
that one component has one driver.

A mature autoscaler refuses a second owner rather than letting two fight: KEDA's admission
webhook refuses a ScaledObject whose workload another ScaledObject (or an HPA) already
manages. Here the Planner executor is the other possible owner: it scales the graph's
prefill and decode components, so a ScaledObject on one of them is refused at start-up,
naming both. Manual scaling is not an owner: like a ``kubectl scale`` on a workload an HPA
manages, a ``PUT .../replicas`` is carried out and the policy sets the count again at its
next evaluation (README, "Policies: run your KEDA ScaledObject").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from connector.errors import ScaledObjectError
from connector.graph.model import Graph, Service, SubComponentType
from connector.policy.scaledobject import ScaledObject

PLANNER_SUB_TYPES = (SubComponentType.PREFILL, SubComponentType.DECODE)


@dataclass(frozen=True)
class BoundPolicy:
    """A ScaledObject and the graph service it drives."""

    scaled_object: ScaledObject
    component: str


def adapter_name(graph: Graph, service: str) -> str:
    """The name Dynamo's operator gives a service's DynamoGraphDeploymentScalingAdapter."""
    return f"{graph.name}-{service.lower()}"


def _fail(so: ScaledObject, path: str, reason: str) -> ScaledObjectError:
    return ScaledObjectError(
        f"{so.source}: {path}: {reason}", source=so.source, field=path, scaled_object=so.name
    )


def resolve_target(graph: Graph, so: ScaledObject) -> Service:
    """The service ``so.spec.scaleTargetRef`` names."""
    path = "spec.scaleTargetRef.name"
    name = so.target.name
    if so.target.is_adapter:
        by_adapter = {adapter_name(graph, s): svc for s, svc in graph.services.items()}
        found = by_adapter.get(name)
        if found is None:
            names = ", ".join(sorted(by_adapter))
            raise _fail(
                so,
                path,
                f"graph {graph.name!r} has no service whose scaling adapter is {name!r} "
                f"(adapters are named {{graph}}-{{service in lowercase}}: {names})",
            )
        return found
    found = graph.services.get(name)
    if found is None:
        names = ", ".join(sorted(graph.services))
        raise _fail(
            so, path, f"graph {graph.name!r} has no service {name!r} (its services: {names})"
        )
    return found


def _check_bounds(so: ScaledObject, svc: Service) -> None:
    """The policy must be able to set every count it may choose."""
    lowest = so.lowest_replicas
    if lowest < svc.min_replicas:
        field = "spec.idleReplicaCount" if so.idle_replicas is not None else "spec.minReplicaCount"
        raise _fail(
            so,
            field,
            f"{lowest} is below {svc.name}'s local.minReplicas ({svc.min_replicas}), so the "
            "policy could not set it",
        )
    if svc.max_replicas is not None and so.max_replicas > svc.max_replicas:
        default = "" if so.max_replicas_set else " (KEDA's default when it is not set)"
        raise _fail(
            so,
            "spec.maxReplicaCount",
            f"{so.max_replicas}{default} is above {svc.name}'s local.maxReplicas "
            f"({svc.max_replicas}), so the policy could not set it",
        )
    fallback = so.fallback
    limit = svc.max_replicas
    if fallback is not None and limit is not None and fallback.replicas > limit:
        raise _fail(
            so,
            "spec.fallback.replicas",
            f"{fallback.replicas} is above {svc.name}'s local.maxReplicas ({limit})",
        )


def planner_targets(graph: Graph) -> set[str]:
    """The services the Planner executor may scale: the prefill and decode workers."""
    return {s.name for sub in PLANNER_SUB_TYPES for s in graph.by_sub_type(sub)}


def bind(
    graph: Graph, scaled_objects: Sequence[ScaledObject], planner: str | None = None
) -> tuple[BoundPolicy, ...]:
    """Each ScaledObject with its service; refuses a target that is not in the graph, a
    replica range the service's local min/max forbid, two ScaledObjects with one name or
    one component, and a component the Planner executor scales. ``planner`` says what
    runs the Planner executor (for the message), None when it does not run."""
    bound: list[BoundPolicy] = []
    by_component: dict[str, ScaledObject] = {}
    by_name: dict[str, ScaledObject] = {}
    planned = planner_targets(graph) if planner is not None else set()
    for so in scaled_objects:
        svc = resolve_target(graph, so)
        other = by_name.get(so.name)
        if other is not None:
            raise _fail(so, "metadata.name", f"{so.name!r} is already the name of {other.source}")
        other = by_component.get(svc.name)
        if other is not None:
            raise _fail(
                so,
                "spec.scaleTargetRef.name",
                f"{svc.name} is already driven by ScaledObject {other.name!r} "
                f"({other.source}); one driver per component",
            )
        if svc.name in planned:
            raise _fail(
                so,
                "spec.scaleTargetRef.name",
                f"{svc.name} is also scaled by {planner}; one driver per component: "
                f"drop ScaledObject {so.name!r} or the Planner",
            )
        _check_bounds(so, svc)
        by_name[so.name] = so
        by_component[svc.name] = so
        bound.append(BoundPolicy(so, svc.name))
    return tuple(bound)
