"""What a replica target may be: a whole number, within the component's
``minReplicas..maxReplicas``, within the machine's replica budget (what a component without
``maxReplicas`` may have is the budget's share the others leave), and not for a component in
crash loop. Pure checks over the graph and the targets, each refusal a typed error that says
how to get past it; the façade runs them before the loop plans anything."""

from __future__ import annotations

from collections.abc import Mapping

from connector.errors import CrashLoop, InvalidReplicas, ReplicaBudgetExceeded, ReplicaLimit
from connector.graph.model import Service
from connector.reconcile.state import ComponentRecord

RAISE_BUDGET = (
    "raise it with `dynamo-local up --max-replicas N` (ConnectorOptions.max_replicas in Python)"
)


def check_count(name: str, replicas: object) -> int:
    """``replicas`` as a count: an integer (not a bool), at least 0."""
    if isinstance(replicas, bool) or not isinstance(replicas, int):
        raise InvalidReplicas(f"replicas must be an integer, got {replicas!r}", component=name)
    if replicas < 0:
        raise InvalidReplicas(f"replicas must be >= 0, got {replicas}", component=name)
    return replicas


def check_bounds(svc: Service, replicas: int) -> None:
    if replicas < svc.min_replicas or (
        svc.max_replicas is not None and replicas > svc.max_replicas
    ):
        upper = svc.max_replicas if svc.max_replicas is not None else "∞"
        raise ReplicaLimit(
            f"{svc.name}: {replicas} replicas is outside minReplicas..maxReplicas "
            f"({svc.min_replicas}..{upper})",
            component=svc.name,
            requested=replicas,
            min_replicas=svc.min_replicas,
            max_replicas=svc.max_replicas,
        )


def check_budget(budget: int, name: str, replicas: int, targets: Mapping[str, int]) -> None:
    """Refuse ``replicas`` for ``name`` when, with the other components' ``targets``, the
    graph would pass the machine's replica ``budget``."""
    others = sum(target for other, target in targets.items() if other != name)
    if others + replicas <= budget:
        return
    left = max(budget - others, 0)
    raise ReplicaBudgetExceeded(
        f"{name}: {replicas} replicas would make {others + replicas} in the graph, above "
        f"this machine's replica budget of {budget} ({left} left for {name}); {RAISE_BUDGET}",
        component=name,
        requested=replicas,
        budget=budget,
        available=left,
    )


def check_graph_budget(budget: int, targets: Mapping[str, int]) -> None:
    """Refuse a graph whose targets together pass the machine's replica ``budget``."""
    total = sum(targets.values())
    if total > budget:
        raise ReplicaBudgetExceeded(
            f"the graph asks for {total} replicas, above this machine's replica budget "
            f"of {budget}; {RAISE_BUDGET}",
            requested=total,
            budget=budget,
        )


def check_not_crashlooping(name: str, comp: ComponentRecord) -> None:
    if comp.crashloop:
        raise CrashLoop(
            f"{name} is in crashloop ({comp.crashloop_reason}); restart it first",
            component=name,
            reason=comp.crashloop_reason,
        )
