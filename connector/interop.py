"""Wires Dynamo interop (discovery, Planner executor, prefill queue) into a connector.

Configuration comes from :class:`connector.options.ConnectorOptions`: ``discovery``
(``file`` | ``etcd`` | ``none``), ``file_kv`` (default ``<working_dir>/discovery``),
``etcd_url``, ``nats_url``, ``planner_executor``, and in ``extra``:
``prefill_queue_stream`` (default ``{graph namespace}_prefill_queue``),
``prefill_queue_consumer`` (default ``worker-group``), ``prefill_queue_metrics_url`` and
``prefill_queue_metric`` (a gauge such as ``dynamo_frontend_queued_requests``),
``prefill_queue_metric_labels`` (a label filter for it). ``scaled_objects`` (with
``policy_dry_run``) start one policy driver per ScaledObject (:mod:`connector.policy`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from connector.dynamo.discovery.backends import open_discovery
from connector.dynamo.discovery.bridge import DiscoveryBridge
from connector.dynamo.discovery.cache import Discovery
from connector.dynamo.planner.executor import VirtualConnectorExecutor
from connector.dynamo.planner.targets import (
    DecisionOutcome,
    Scaler,
    apply_decision,
    resolve_component,
)
from connector.dynamo.prefill_queue import DEFAULT_CONSUMER, PrefillQueueMonitor, default_stream
from connector.dynamo.topology import build_topology, observe_links
from connector.errors import DiscoveryUnavailable
from connector.events import EventLog
from connector.graph.model import Graph, SubComponentType
from connector.options import ConnectorOptions
from connector.policy.binding import bind
from connector.policy.driver import Policies
from connector.reconcile.loop import Hooks
from connector.reconcile.state import ConnectorState
from connector.view import ConnectorView


class InteropHost(Scaler, Protocol):
    """What interop needs of the connector it serves (LocalConnector is one): typed here,
    so that this module does not import the connector that starts it. It scales as the
    Planner's decisions need (:class:`connector.dynamo.planner.targets.Scaler`)."""

    graph: Graph
    state: ConnectorState
    events: EventLog
    options: ConnectorOptions
    working_dir: Path
    hooks: Hooks
    interop: Interop | None

    def view(self) -> ConnectorView: ...

    def replica_pids(self, name: str) -> dict[str, set[int]]: ...

    async def wait_started(self) -> bool: ...

    async def get_prefill_queue_metrics(self) -> dict[str, Any]: ...


@dataclass
class Interop:
    """Everything Dynamo-specific one connector runs; closed in reverse order."""

    discovery: Discovery | None = None
    bridge: DiscoveryBridge | None = None
    executor: VirtualConnectorExecutor | None = None
    queue: PrefillQueueMonitor | None = None
    policies: Policies | None = None

    async def close(self) -> None:
        if self.policies is not None:
            await self.policies.close()
        if self.executor is not None:
            await self.executor.close()
        if self.queue is not None:
            await self.queue.close()
        if self.bridge is not None:
            await self.bridge.close()
        if self.discovery is not None:
            await self.discovery.close()


def interop_of(connector: InteropHost) -> Interop | None:
    return connector.interop


def _namespaces(connector: InteropHost) -> list[str]:
    graph = connector.graph
    names = {graph.namespace} | {
        s.dynamo_namespace for s in graph.services.values() if s.dynamo_namespace
    }
    return sorted(names)


async def start_interop(connector: InteropHost) -> Interop:
    """Start what the options ask for and plug it into the connector's hooks."""
    opts = connector.options
    interop = Interop()
    extra_env = {"NATS_SERVER": opts.nats_url} if opts.nats_url else {}
    if opts.etcd_url and opts.discovery != "etcd":
        # The Planner's virtual connector dials etcd whatever the discovery backend
        # (localhost:2379 unless told): hand every replica the etcd there is.
        extra_env["ETCD_ENDPOINTS"] = opts.etcd_url
    try:
        if opts.discovery != "none":
            root = opts.file_kv or connector.working_dir / "discovery"
            discovery = open_discovery(
                opts.discovery,
                file_root=root,
                etcd_url=opts.etcd_url,
                namespaces=_namespaces(connector),
            )
            await discovery.start()
            interop.discovery = discovery
            bridge = DiscoveryBridge(connector, discovery, extra_env=extra_env)
            await bridge.start()
            interop.bridge = bridge
            hooks = connector.hooks
            hooks.discovery_probe = bridge.probe
            hooks.before_stop = bridge.before_stop
            hooks.after_exit = bridge.after_exit
            hooks.replica_env = bridge.replica_env
        elif extra_env:
            connector.hooks.replica_env = lambda: dict(extra_env)
        if opts.planner_executor:
            interop.executor = await _start_executor(connector)
        if opts.scaled_objects:
            interop.policies = _start_policies(connector)
        interop.queue = _queue_monitor(connector)
    except BaseException:
        with contextlib.suppress(Exception):
            await interop.close()
        raise
    return interop


async def _start_executor(connector: InteropHost) -> VirtualConnectorExecutor:
    opts = connector.options
    if not opts.etcd_url:
        raise DiscoveryUnavailable(
            "the Planner executor (planner_executor=True) reads the Planner's decisions "
            "from etcd: set etcd_url",
        )

    async def apply(prefill: int | None, decode: int | None, decision_id: int) -> DecisionOutcome:
        # A decision pending at start-up waits until the connector has re-adopted its
        # replicas and runs its loop, so it never races the adoption.
        if not await connector.wait_started():
            return DecisionOutcome("failed", "connector shut down during start-up")
        outcome = await apply_decision(
            connector.graph,
            connector,
            prefill,
            decode,
            decision_id,
            timeout_s=opts.scale_timeout_s,
        )
        interop = interop_of(connector)
        if interop is None or interop.bridge is None or not outcome.applied:
            return outcome
        return await until_discovered(connector.graph, interop.bridge, outcome, DISCOVERED_WAIT_S)

    executor = VirtualConnectorExecutor(
        opts.etcd_url, connector.graph.namespace, apply, connector.events
    )
    await executor.start()
    return executor


def _start_policies(connector: InteropHost) -> Policies:
    """One driver per ScaledObject; each waits until the connector runs its loop. Checked
    against the graph here too (``up`` checks before it starts anything), so a library
    connector refuses a second driver of a component just as ``up`` does."""
    opts = connector.options
    planner = "the Planner executor (planner_executor=True)" if opts.planner_executor else None
    bound = bind(connector.graph, opts.scaled_objects, planner)
    policies = Policies(connector, bound, dry_run=opts.policy_dry_run)
    policies.start()
    return policies


# How long an acknowledgement waits, after the scale, for discovery to list the desired
# instances (a replica's readiness already waited for its registration; this covers the
# replicas whose readiness is not discovery, and the keys of stopped ones going away).
DISCOVERED_WAIT_S = 30.0


async def until_discovered(
    graph: Graph, bridge: DiscoveryBridge, outcome: DecisionOutcome, limit_s: float
) -> DecisionOutcome:
    """``outcome`` once discovery lists, for each component the decision scaled, exactly
    as many replicas' instances as it set; as upstream's newer VirtualConnector calls a
    deployment stable only then. Past ``limit_s`` the outcome turns ``partial`` and says
    what discovery listed, so the Planner is still acknowledged, never left waiting."""
    services = {
        sub: resolve_component(graph, SubComponentType(sub)).name for sub in outcome.applied
    }

    def missing() -> list[str]:
        short = []
        for sub, target in outcome.applied.items():
            listed = bridge.registered_replicas(services[sub])
            if listed != target:
                short.append(f"{services[sub]}: discovery lists {listed} of {target}")
        return short

    deadline = time.monotonic() + limit_s
    while missing():
        if time.monotonic() > deadline:
            reasons = [r for r in (outcome.reason, *missing()) if r]
            return DecisionOutcome("partial", "; ".join(reasons), outcome.applied)
        await asyncio.sleep(0.05)
    return outcome


def _queue_monitor(connector: InteropHost) -> PrefillQueueMonitor:
    opts = connector.options
    extra = opts.extra
    return PrefillQueueMonitor(
        opts.nats_url,
        str(extra.get("prefill_queue_stream") or default_stream(connector.graph.namespace)),
        str(extra.get("prefill_queue_consumer") or DEFAULT_CONSUMER),
        metrics_url=extra.get("prefill_queue_metrics_url"),
        metric_name=extra.get("prefill_queue_metric"),
        metric_labels=extra.get("prefill_queue_metric_labels"),
    )


def discovery_stats(connector: InteropHost) -> dict[str, Any]:
    """Instances per component and stale entries reaped, as the exporter reads them."""
    interop = interop_of(connector)
    if interop is None or interop.bridge is None:
        return {}
    return interop.bridge.stats()


def planner_status(connector: InteropHost) -> dict[str, Any]:
    """The Planner executor's status (``VirtualConnectorExecutor.status``), as the exporter
    reads it; ``{}`` while no executor runs (not configured, not started yet, or closed)."""
    interop = interop_of(connector)
    executor = interop.executor if interop is not None else None
    if executor is None or not executor.running:
        return {}
    return executor.status()


def autoscaler_status(connector: InteropHost) -> dict[str, Any]:
    """The policy drivers' status (``Policies.status``), as the exporter reads it; ``{}``
    while no policy runs."""
    interop = interop_of(connector)
    policies = interop.policies if interop is not None else None
    if policies is None or not policies.running:
        return {}
    return policies.status()


async def system_topology(connector: InteropHost) -> dict[str, Any]:
    """Graph, replicas, discovery instances and observed links, joined."""
    interop = interop_of(connector)
    view = connector.view()
    instances = interop.discovery.instances() if interop and interop.discovery else []
    owners: dict[str, str | None] = {}
    components: dict[str, str] = {}
    if interop is not None and interop.bridge is not None:
        owners = {inst.key: interop.bridge.owner(inst) for inst in instances}
        components = dict(interop.bridge.ownership.learnt())

    def measure() -> Any:
        pids = {
            name: [pid for tree in connector.replica_pids(name).values() for pid in tree]
            for name in connector.graph.services
        }
        return observe_links(pids)

    links = await asyncio.to_thread(measure)
    return build_topology(connector.graph, view, instances, links, owners, components)


async def prefill_queue_metrics(connector: InteropHost) -> dict[str, Any]:
    interop = interop_of(connector)
    monitor = interop.queue if interop is not None else None
    if monitor is None:
        monitor = _queue_monitor(connector)
        try:
            return await monitor.read()
        finally:
            await monitor.close()
    return await monitor.read()
