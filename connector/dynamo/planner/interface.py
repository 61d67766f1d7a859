"""The connector interface Dynamo's Planner calls, for :class:`LocalConnector`.

:class:`PlannerConnectorMixin` gives a connector the methods of Dynamo's
``PlannerConnector`` protocol (2026): ``async_init``, ``validate_deployment``,
``wait_for_deployment_ready``, ``get_model_name``, ``get_gpu_counts``,
``get_actual_worker_counts`` and ``set_component_replicas``, with the same names, arguments
and return shapes, so the unmodified Planner can drive the connector in-process. Prefill and
decode components are the graph services whose ``subComponentType`` says so
(:func:`connector.dynamo.planner.targets.resolve_component`).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

from connector.dynamo.planner.targets import TargetReplica, resolve_component, resolve_targets
from connector.errors import (
    ComponentNotFound,
    ConnectorError,
    GraphError,
    InvalidReplicas,
    ScaleTimeout,
)
from connector.graph.model import Graph, Role, Service, SubComponentType
from connector.view import ConnectorView

# Flags by which Dynamo's workers name the model they serve, most specific first.
MODEL_FLAGS = ("--served-model-name", "--model-name", "--model", "--model-path")


class _Options(Protocol):
    scale_timeout_s: float


class _Reconciler(Protocol):
    async def wait_changed(self, timeout_s: float) -> None: ...


class PlannerHost(Protocol):
    """What the mixin needs of the connector it is mixed into."""

    @property
    def graph(self) -> Graph: ...

    @property
    def options(self) -> _Options: ...

    @property
    def reconciler(self) -> _Reconciler | None: ...

    async def initialize(self) -> None: ...

    def view(self) -> ConnectorView: ...

    async def scale_component(
        self,
        name: str,
        replicas: int,
        blocking: bool = True,
        timeout_s: float | None = None,
        source: str = "api",
        decision_id: int | None = None,
    ) -> bool: ...


def unstable_components(view: ConnectorView, include_planner: bool = True) -> list[str]:
    """Components not settled: not every desired replica ready, or a change in flight."""
    out = []
    for comp in view.components:
        if not include_planner and comp.role == Role.PLANNER.value:
            continue
        reps = view.replicas_of(comp.name)
        settled = (
            comp.ready == comp.desired
            and len(reps) == comp.desired
            and all(r.ready for r in reps)
            and not comp.scale_in_flight
            and comp.status != "crashloop"
        )
        if not settled:
            out.append(comp.name)
    return out


def model_name_of(services: Iterable[Service]) -> str | None:
    """The model the services serve, from their command lines (per service, its most
    specific flag); None if none says, GraphError if they disagree."""
    names: dict[str, list[str]] = {}
    for svc in services:
        argv = (*svc.command, *svc.args)
        found = next((v for flag in MODEL_FLAGS if (v := _flag_value(argv, flag))), None)
        if found:
            names.setdefault(found, []).append(svc.name)
    if len(names) > 1:
        listing = "; ".join(f"{', '.join(who)}: {name}" for name, who in sorted(names.items()))
        raise GraphError(f"workers serve different models ({listing})", models=sorted(names))
    return next(iter(names), None)


def _flag_value(argv: Sequence[str], flag: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == flag and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(flag + "="):
            return arg[len(flag) + 1 :]
    return None


class PlannerConnectorMixin:
    """Dynamo's ``PlannerConnector`` methods; mix into a class satisfying PlannerHost."""

    async def async_init(self: PlannerHost) -> None:
        await self.initialize()

    def _worker(
        self: PlannerHost, sub: SubComponentType, name: str | None, required: bool
    ) -> Service | None:
        try:
            return resolve_component(self.graph, sub, name)
        except ComponentNotFound:
            if required or name is not None:
                raise
            return None

    async def validate_deployment(
        self: PlannerHost,
        prefill_component_name: str | None = None,
        decode_component_name: str | None = None,
        require_prefill: bool = True,
        require_decode: bool = True,
    ) -> None:
        """Raise :class:`GraphError` naming every problem (missing or ambiguous workers)."""
        problems: list[str] = []
        asked = (
            (SubComponentType.PREFILL, prefill_component_name, require_prefill),
            (SubComponentType.DECODE, decode_component_name, require_decode),
        )
        for sub, name, required in asked:
            try:
                PlannerConnectorMixin._worker(self, sub, name, required)
            except ConnectorError as exc:
                problems.append(exc.message)
        if problems:
            raise GraphError(
                f"graph {self.graph.name!r} cannot be driven by the Planner: "
                + "; ".join(problems),
                problems=problems,
            )

    async def wait_for_deployment_ready(
        self: PlannerHost, include_planner: bool = True, timeout_s: float | None = None
    ) -> None:
        """Return once every component has all desired replicas ready and nothing is in
        flight; raise :class:`ScaleTimeout` naming the unsettled components otherwise."""
        limit = timeout_s if timeout_s is not None else self.options.scale_timeout_s
        deadline = time.monotonic() + limit
        while True:
            pending = unstable_components(self.view(), include_planner)
            if not pending:
                return
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ScaleTimeout(
                    f"deployment not ready within {limit:g} s: {', '.join(pending)} not settled",
                    components=pending,
                )
            rec = self.reconciler
            if rec is None:
                await asyncio.sleep(min(remaining, 0.1))
            else:
                await rec.wait_changed(min(remaining, 1.0))

    def get_model_name(
        self: PlannerHost, require_prefill: bool = True, require_decode: bool = True
    ) -> str:
        """The served model, from the workers' ``--served-model-name`` / ``--model`` flags."""
        workers = [
            svc
            for sub, required in (
                (SubComponentType.PREFILL, require_prefill),
                (SubComponentType.DECODE, require_decode),
            )
            if (svc := PlannerConnectorMixin._worker(self, sub, None, required)) is not None
        ]
        name = model_name_of(workers or self.graph.services.values())
        if name is None:
            raise GraphError(
                f"graph {self.graph.name!r} names no model: no worker passes "
                + " or ".join(MODEL_FLAGS)
            )
        return name

    def get_gpu_counts(
        self: PlannerHost, require_prefill: bool = True, require_decode: bool = True
    ) -> tuple[int | None, int | None]:
        """GPUs per replica of the prefill and decode workers (a fraction counts as one);
        None for a worker the graph does not have and that is not required."""
        counts: list[int | None] = []
        for sub, required in (
            (SubComponentType.PREFILL, require_prefill),
            (SubComponentType.DECODE, require_decode),
        ):
            svc = PlannerConnectorMixin._worker(self, sub, None, required)
            counts.append(None if svc is None else math.ceil(svc.resources.gpu))
        return counts[0], counts[1]

    async def get_actual_worker_counts(
        self: PlannerHost,
        prefill_component_name: str | None = None,
        decode_component_name: str | None = None,
    ) -> tuple[int, int, bool]:
        """(ready prefill replicas, ready decode replicas, stable). Stable only when every
        replica of every component is ready and nothing is in flight."""
        view = self.view()
        ready: list[int] = []
        for sub, name in (
            (SubComponentType.PREFILL, prefill_component_name),
            (SubComponentType.DECODE, decode_component_name),
        ):
            svc = PlannerConnectorMixin._worker(self, sub, name, False)
            comp = view.component(svc.name) if svc is not None else None
            ready.append(comp.ready if comp is not None else 0)
        return ready[0], ready[1], not unstable_components(view)

    async def set_component_replicas(
        self: PlannerHost, target_replicas: Sequence[TargetReplica | Any], blocking: bool = True
    ) -> None:
        """Scale every target (all validated first; scaled concurrently). With ``blocking``,
        return when all are ready; the first error is raised after all were attempted."""
        if not target_replicas:
            raise InvalidReplicas("set_component_replicas needs at least one target")
        wanted = resolve_targets(self.graph, target_replicas)
        results = await asyncio.gather(
            *(
                self.scale_component(name, n, blocking=blocking, source="planner")
                for name, n in wanted.items()
            ),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        late = [name for name, ok in zip(wanted, results, strict=True) if ok is False]
        if late:
            raise ScaleTimeout(
                f"{', '.join(late)} not ready within {self.options.scale_timeout_s:g} s",
                components=late,
            )
