"""``LocalConnector``: the public façade that composes graph, state, Circus, resources,
discovery and the reconcile loop for one namespace.

    async with await LocalConnector.create("demo", "examples/demo.yaml") as c:
        await c.scale_component("Decode", 3)

Every mutating call only changes the desired state and wakes the reconcile loop; the loop
is the one place that starts and stops processes.

Over 500 lines because it is the whole public surface: every call the HTTP API, the CLI, the
Planner (Dynamo's ``PlannerConnector`` methods) and a library user make has its entry here,
with its docstring, and each delegates in a few lines (circusd to
:class:`~connector.supervision.daemon.CircusSupervisor`, the checks of a target to
:mod:`connector.reconcile.targets`, the rest to the loop, the resources and interop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from connector import defaults
from connector.dynamo.planner.interface import PlannerConnectorMixin
from connector.errors import (
    ComponentNotFound,
    ConnectorClosed,
    ConnectorStarting,
    InvalidOptions,
    InvalidReplicas,
)
from connector.events import Event, EventLog, Subscriber
from connector.graph import dynamo_defaults
from connector.graph.model import Graph
from connector.interop import Interop, start_interop
from connector.options import Closeable, ConnectorOptions, default_working_dir
from connector.reconcile import targets
from connector.reconcile.loop import PLAN_STEP, Hooks, Reconciler, ResourceBroker
from connector.reconcile.state import ComponentRecord, ConnectorState, StateStore
from connector.reconcile.status import build_view
from connector.supervision import procs
from connector.supervision.circus import CircusChannel
from connector.supervision.daemon import CircusSupervisor
from connector.supervision.logs import LogPolicy
from connector.supervision.open_files import raise_open_files_limit
from connector.view import ConnectorView

__all__ = ["ConnectorOptions", "LocalConnector", "default_working_dir"]

log = logging.getLogger(__name__)

_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
MAX_LOG_LINES = 10_000


def _log_policy(options: ConnectorOptions) -> LogPolicy:
    """The replica log policy the options ask for; a value out of range is refused by name."""
    # At least one rotated file: with none, Circus's rotation never happens and the file
    # grows without bound (as logging's RotatingFileHandler with backupCount 0).
    values = {
        "log_max_bytes": (options.log_max_bytes, 0),
        "log_backups": (options.log_backups, 1),
        "stopped_logs_kept": (options.stopped_logs_kept, 0),
    }
    for name, (value, least) in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            raise InvalidOptions(
                f"{name} must be an integer >= {least}, got {value!r}", **{name: value}
            )
    return LogPolicy(
        max_bytes=options.log_max_bytes,
        backup_count=options.log_backups,
        stopped_kept=options.stopped_logs_kept,
    )


class LocalConnector(PlannerConnectorMixin):
    """Supervises one graph in one namespace. Create with :meth:`create`."""

    def __init__(
        self,
        namespace: str,
        graph: Graph,
        working_dir: Path | None = None,
        options: ConnectorOptions | None = None,
    ) -> None:
        if not _NAMESPACE.match(namespace):
            raise InvalidReplicas(
                f"namespace {namespace!r} must be lowercase letters, digits, '-' or '_' "
                "(it becomes part of process and file names)",
                namespace=namespace,
            )
        self.namespace = namespace
        self.graph = graph
        self.working_dir = (working_dir or default_working_dir(namespace)).expanduser()
        self.options = options or ConnectorOptions()
        if self.options.max_replicas is not None and self.options.max_replicas < 1:
            raise InvalidReplicas(
                f"max_replicas must be >= 1, got {self.options.max_replicas}",
                max_replicas=self.options.max_replicas,
            )
        self.replica_budget = self.options.max_replicas or defaults.replica_budget()
        self.log_policy = _log_policy(self.options)
        self.events = EventLog(self.working_dir / "events.jsonl")
        self.store = StateStore(self.working_dir)
        self.state = ConnectorState(namespace=namespace, graph_source=graph.source)
        self.resources: ResourceBroker | None = None
        self.reconciler: Reconciler | None = None
        self.hooks = Hooks(service_env=dynamo_defaults.service_env)
        self.supervisor = CircusSupervisor(
            self.working_dir / "circus",
            check_delay_s=self.options.circus_check_delay_s,
            endpoint=self.options.circus_endpoint,
            pubsub_endpoint=self.options.circus_pubsub_endpoint,
        )
        self._initialized = False
        self._starting = False  # initialize() is under way: callers are told to retry
        self._closed = False
        # Set once initialize() has finished (or failed) or shutdown() began: what
        # wait_started() waits on.
        self._settled = asyncio.Event()
        self._extensions: list[Closeable] = []  # started after the loop, stopped before it
        self.interop: Interop | None = None  # discovery, Planner executor, prefill queue
        self._metrics_source: Callable[[str], dict[str, Any]] | None = None
        self._resource_manager: Any = None

    # ------------------------------------------------------------------ creation

    @classmethod
    async def create(
        cls,
        namespace: str,
        bento_identifier: str | Path = ".",
        working_dir: str | Path | None = None,
        **options: Any,
    ) -> LocalConnector:
        """Load the graph named by ``bento_identifier`` (YAML file, directory,
        ``module:attr``), run it in Dynamo namespace ``namespace`` (every service registers
        there, whatever the file says) and return a connector that is already initialized
        (circusd up, replicas re-adopted, the loop running), as ``asyncpg.create_pool()``
        returns a ready pool. Either::

            c = await LocalConnector.create("demo", "graph.yaml")
            try:
                await c.scale_component("Decode", 2)
            finally:
                await c.shutdown()

        or ``async with await LocalConnector.create(...) as c:`` (entering again is a
        no-op; leaving shuts down). ``options`` are :class:`ConnectorOptions` fields."""
        from connector.graph.loader import load_graph

        graph = await asyncio.to_thread(load_graph, bento_identifier)
        connector = cls(
            namespace,
            graph.in_namespace(namespace),
            Path(working_dir) if working_dir is not None else None,
            ConnectorOptions(**options),
        )
        await connector.initialize()
        return connector

    async def __aenter__(self) -> LocalConnector:
        await self.initialize()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.shutdown()

    # ---------------------------------------------------------------- lifecycle

    async def initialize(self) -> None:
        """Take the namespace, attach to or start circusd, re-adopt replicas, start the loop."""
        if self._initialized:
            return
        if self._closed:
            raise ConnectorClosed("this connector was shut down; create a new one")
        if self._starting:
            await self._settled.wait()  # a second caller waits for the first one's start
            if not self._initialized:
                raise ConnectorClosed("the connector failed to start")
            return
        targets.check_graph_budget(
            self.replica_budget, {n: s.replicas for n, s in self.graph.services.items()}
        )
        self._starting = True
        # Before circusd starts, which inherits it: each replica holds descriptors in
        # circusd and in the connector (connector.supervision.open_files).
        raise_open_files_limit()
        try:
            await asyncio.to_thread(self.store.acquire)
            try:
                await self._initialize_locked()
            except BaseException:
                # A circusd we started just now must not outlive a failed start; one we
                # re-attached to keeps running the replicas it already had.
                self._settled.set()
                await self._teardown(detach=not self.supervisor.started)
                raise
            self._initialized = True
        finally:
            self._starting = False
            self._settled.set()

    async def wait_started(self) -> bool:
        """Wait until :meth:`initialize` has re-adopted the replicas and started the loop:
        True, or False when the start failed or the connector is shutting down."""
        await self._settled.wait()
        return self._initialized and not self._closed

    async def _initialize_locked(self) -> None:
        loaded = await asyncio.to_thread(self.store.load)
        if loaded is not None:
            self.state = loaded
            self.state.graph_source = self.graph.source
        self.resources = await self._make_resources()
        self.state.circusd = (await self.supervisor.attach(self.state.circusd)).to_dict()
        await self.store.save(self.state)
        assert self.supervisor.channel is not None
        self.reconciler = Reconciler(
            namespace=self.namespace,
            graph=self.graph,
            state=self.state,
            store=self.store,
            channel=self.supervisor.channel,
            events=self.events,
            resources=self.resources,
            log_dir=self.working_dir / "logs",
            log_policy=self.log_policy,
            hooks=self.hooks,
            resync_s=self.options.resync_s,
            circusd_alive=self.supervisor.alive,
            recover_supervisor=self._restart_circusd,
        )
        await self._start_interop()
        self.supervisor.subscribe(
            self.reconciler.watcher_prefix,
            self.reconciler.on_circus_event,
            self.reconciler.CIRCUS_EVENTS,
        )
        report = await self.reconciler.adopt()
        if report["adopted"] or report["stray"] or report["lost"]:
            log.info("re-adoption: %s", report)
        self._clamp_targets()
        targets.check_graph_budget(
            self.replica_budget,
            {n: self.reconciler.component_record(n).target for n in self.graph.services},
        )
        self.reconciler.start()
        await self.reconciler.reconcile_once()

    async def _make_resources(self) -> ResourceBroker:
        from connector.resources.manager import open_resource_manager

        manager = await open_resource_manager(
            self.options.gpu_backend,
            working_dir=self.working_dir,
            namespace=self.namespace,
            port_range=self.options.port_range,
            on_event=self.events.emit,
            foreign_memory_threshold_bytes=self.options.gpu_foreign_memory_threshold_bytes,
            release_timeout_s=self.options.gpu_release_timeout_s,
        )
        self._resource_manager = manager
        return manager

    async def _start_interop(self) -> None:
        """Discovery, Planner executor and queue monitor, when configured."""
        self.interop = await start_interop(self)
        self._extensions.append(self.interop)

    def _clamp_targets(self) -> None:
        assert self.reconciler is not None
        for name, svc in self.graph.services.items():
            comp = self.reconciler.component_record(name)
            upper = svc.max_replicas if svc.max_replicas is not None else comp.target
            comp.target = max(svc.min_replicas, min(comp.target, upper))

    async def _restart_circusd(self) -> CircusChannel:
        channel = await self.supervisor.restart()
        assert self.supervisor.info is not None
        self.state.circusd = self.supervisor.info.to_dict()
        return channel

    async def shutdown(self, detach: bool = False) -> None:
        """Stop every replica gracefully and circusd (or, with ``detach``, leave them running
        for the next connector to re-adopt). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._settled.set()
        await self._teardown(detach=detach)

    async def _teardown(self, detach: bool) -> None:
        rec = self.reconciler
        if rec is not None:
            try:
                await rec.stop_loop()
                if not detach:
                    await rec.stop_all("connector shutdown")
            except Exception:
                # Whatever failed, circusd is still stopped below: its replicas die with
                # it (parent-death signal), so a failed stop never leaks processes.
                log.exception("stopping the replicas failed; stopping circusd takes them down")
        for ext in reversed(self._extensions):
            try:
                await ext.close()
            except Exception:
                log.exception("closing %s failed", type(ext).__name__)
        self._extensions = []
        if await self.supervisor.close(detach=detach):
            self.state.circusd = None
        if self._resource_manager is not None:
            with contextlib.suppress(Exception):
                await self._resource_manager.close()
        with contextlib.suppress(Exception):
            await self.store.save(self.state)
        await self.events.aclose()
        await asyncio.to_thread(self.store.close)

    @property
    def closed(self) -> bool:
        return self._closed

    async def ping_supervisor(self, timeout_s: float) -> dict[str, Any]:
        """circusd's answer to ``list`` on the connector's own serialized channel (the one
        the loop uses, so an answer means our commands get through). Raises
        ConnectorClosed before start, SupervisorUnavailable when circusd does not answer."""
        rec = self.reconciler
        channel = rec.channel if rec is not None else self.supervisor.channel
        if channel is None or self._closed:
            raise ConnectorClosed("the connector has no supervisor channel (not initialized)")
        reply: dict[str, Any] = await channel.call("list", timeout_s=timeout_s)
        return {**reply, "endpoint": channel.endpoint}

    @property
    def gpu_backend(self) -> Any:
        """The GPU backend the resources were opened with (NVML, a fake, or None)."""
        return getattr(self._resource_manager, "gpu_backend", None)

    @property
    def resource_manager(self) -> Any:
        """The resource manager (reservations, releases, the machine view); None before
        :meth:`initialize`."""
        return self._resource_manager

    @property
    def metrics_source(self) -> Callable[[str], dict[str, Any]] | None:
        return self._metrics_source

    def attach(self, closeable: Closeable) -> None:
        """Close ``closeable`` with the connector (after the loop stops, before circusd):
        what a caller started on top of it, such as an exporter."""
        self._extensions.append(closeable)

    def set_metrics_source(self, source: Callable[[str], dict[str, Any]] | None) -> None:
        """Where ``get_component_metrics``/``get_resource_usage`` read usage from: the
        exporter's latest snapshot when one runs (same numbers as ``/metrics``)."""
        self._metrics_source = source

    async def get_machine_resources(self) -> dict[str, Any]:
        """The whole machine: GPUs (owner, used/total, leaked), CPU and memory budgets,
        ports and sockets in use."""
        self._live()
        assert self.resources is not None
        view: dict[str, Any] = self.resources.machine_view()
        return view

    def _live(self) -> Reconciler:
        if self._closed:
            raise ConnectorClosed("the connector is shut down")
        if not self._initialized or self.reconciler is None:
            if self._starting:
                raise ConnectorStarting(
                    "dynamo-local is starting (starting circusd and re-adopting the replicas "
                    "that are already running); retry in a moment, or wait until GET /readyz "
                    "answers 200",
                    retry_after_s=ConnectorStarting.retry_after_s,
                )
            raise ConnectorClosed("the connector is not initialized; call initialize() first")
        return self.reconciler

    # ---------------------------------------------------------------- scaling

    async def scale_component(
        self,
        name: str,
        replicas: int,
        blocking: bool = True,
        timeout_s: float | None = None,
        source: str = "api",
        decision_id: int | None = None,
    ) -> bool:
        """Set ``name``'s replica target. With ``blocking``, wait until exactly that many
        replicas are ready; returns False on timeout (or when a newer target supersedes it).

        Raises InvalidReplicas (bad number), ReplicaLimit (outside min/max), CrashLoop,
        ResourcesExhausted (nothing of the scale-up fits, or only part: then the replicas
        that fit are started and the exception's ``details["started"]`` names them).
        """
        rec = self._live()
        rec.require(name)
        replicas = targets.check_count(name, replicas)
        self._check_target(name, replicas)
        # The ports of the replicas to start are bind-checked in a thread, then the checks
        # run again (the state may have moved meanwhile): from them to the plan all is
        # synchronous, so atomic on the loop.
        probed = await rec.probe_ports_for(name, replicas - rec.live_count(name))
        comp = self._check_target(name, replicas)
        before = comp.target
        op = rec.begin_op(name, replicas, kind="scale", source=source, decision_id=decision_id)
        with op.step("allocate"):
            # The first step now, so a scale that cannot get resources is refused at once;
            # the rest a step at a time, the loop free in between: awaited here when the
            # caller waits, else in the background (a later refusal settles the op then).
            plan = rec.plan(name, op, probed, limit=PLAN_STEP)
            if blocking:
                plan = await rec.plan_steps(name, op, plan)
        if plan.more and not plan.refused and not op.done:
            rec.continue_plan(name, op, plan)
        if plan.refused:
            refusal = rec.settle_refused(name, op, plan, before)
            await rec.save()
            raise refusal
        rec.wake()
        if not blocking:
            rec.save_soon()
            self.store.raise_if_failing()  # a dir known unwritable: 503 (the change is kept)
            return True
        await rec.save()
        return await rec.wait_op(op, timeout_s or self.options.scale_timeout_s)

    def _check_target(self, name: str, replicas: int) -> ComponentRecord:
        """Refuse a target outside the component's min/max or the replica budget, or for a
        component in crashloop; return its record otherwise."""
        rec = self._live()
        targets.check_bounds(rec.require(name), replicas)
        current = {n: rec.component_record(n).target for n in self.graph.services}
        targets.check_budget(self.replica_budget, name, replicas, current)
        comp = rec.component_record(name)
        targets.check_not_crashlooping(name, comp)
        return comp

    async def add_component(self, name: str, blocking: bool = True) -> bool:
        """Dynamo's older Planner interface: one replica more."""
        current = self._live().component_record(name).target
        return await self.scale_component(name, current + 1, blocking, source="planner")

    async def remove_component(self, name: str, blocking: bool = True) -> bool:
        """Dynamo's older Planner interface: one replica less (never below zero)."""
        rec = self._live()
        rec.require(name)
        current = rec.component_record(name).target
        if current == 0:
            return True
        return await self.scale_component(name, current - 1, blocking, source="planner")

    async def restart_component(
        self, name: str, blocking: bool = True, timeout_s: float | None = None
    ) -> bool:
        """Replace every replica with a fresh one and clear a crash loop."""
        rec = self._live()
        rec.require(name)
        comp = rec.component_record(name)
        comp.crashloop = False
        comp.crashloop_reason = None
        comp.crashloop_spec = None
        comp.failures = []
        rec.unblock(name)
        target = comp.target
        probed = await rec.probe_ports_for(name, target)  # every replica is replaced
        op = rec.begin_op(name, target, kind="restart", source="api")
        for replica in self.state.replicas_of(name):
            if replica.phase != "stopping":
                rec.begin_stop(replica, op, "restart")
        plan = rec.plan(name, op, probed, limit=PLAN_STEP)
        if blocking:
            plan = await rec.plan_steps(name, op, plan)
        if plan.more and not plan.refused and not op.done:
            rec.continue_plan(name, op, plan)
        rec.wake()
        if not blocking:
            rec.save_soon()
            self.store.raise_if_failing()  # a dir known unwritable: 503 (the change is kept)
            return True
        await rec.save()
        return await rec.wait_op(op, timeout_s or self.options.scale_timeout_s)

    async def get_component_replicas(self, name: str) -> int:
        """Replicas that are ready now."""
        rec = self._live()
        rec.require(name)
        return sum(1 for r in self.state.replicas_of(name) if r.phase == "ready")

    # ---------------------------------------------------------------- reading

    def view(self, replicas: bool = True) -> ConnectorView:
        """The snapshot readers use; ``replicas=False`` leaves out the replicas' views (the
        components' counts are still there), for callers that need only those."""
        ops = self.reconciler.ops if self.reconciler is not None else {}
        return build_view(self.namespace, self.graph, self.state, ops, replicas=replicas)

    def converged(self, name: str) -> bool:
        """Exactly the target's count of replicas of ``name``, all ready."""
        return self._live().converged(name)

    def recent_events(self, since: int = 0) -> list[Event]:
        return self.events.since(since)

    def subscribe_events(self, fn: Subscriber) -> Callable[[], None]:
        return self.events.subscribe(fn)

    async def list_components(self) -> list[dict[str, Any]]:
        self._live()
        return [
            {
                "name": c.name,
                "role": c.role,
                "sub_component_type": c.sub_component_type,
                "status": c.status,
                "replicas": {"desired": c.desired, "running": c.running, "ready": c.ready},
                "restarts": c.restarts,
                "crashloops": c.crashloops,
                "scale_in_flight": c.scale_in_flight,
                "reason": c.reason,
            }
            for c in self.view().components
        ]

    async def get_component_logs(
        self, name: str, lines: int = 100, replica: str | int | None = None, stream: str = "both"
    ) -> list[str]:
        """Newest ``lines`` log lines across the component's replicas (capped at 10 000),
        each prefixed by its replica; includes replicas that crashed."""
        rec = self._live()
        rec.require(name)
        if isinstance(lines, bool) or not isinstance(lines, int) or lines < 0:
            raise InvalidReplicas(f"lines must be a non-negative integer, got {lines!r}")
        if stream not in ("stdout", "stderr", "both"):
            raise InvalidReplicas(f"stream must be stdout, stderr or both, got {stream!r}")
        lines = min(lines, MAX_LOG_LINES)
        recs = self.state.replicas_of(name)
        if replica is not None:
            wanted = str(replica).rsplit("/", 1)[-1]
            recs = [r for r in recs if str(r.ordinal) == wanted]
            if not recs:
                raise ComponentNotFound(f"{name} has no replica {replica}", component=name)
        return await rec.read_logs(recs, lines, stream)

    async def get_resource_usage(self, name: str) -> dict[str, Any]:
        """Per replica: what is allocated and what is used (pids, CPU, RSS, GPU memory)."""
        rec = self._live()
        rec.require(name)
        from connector.usage import resource_usage

        return await resource_usage(self, name)

    async def get_component_metrics(self, name: str) -> dict[str, Any]:
        rec = self._live()
        rec.require(name)
        from connector.usage import component_metrics

        return await component_metrics(self, name)

    def discovery_stats(self) -> dict[str, Any]:
        """Discovery instances per component and stale entries reaped (no I/O)."""
        from connector.interop import discovery_stats

        return discovery_stats(self)

    def planner_status(self) -> dict[str, Any]:
        """The Planner executor's decision seen, acknowledged and being applied (no I/O);
        ``{}`` when no executor runs."""
        from connector.interop import planner_status

        return planner_status(self)

    def autoscaler_status(self) -> dict[str, Any]:
        """What each ScaledObject policy last evaluated (no I/O); ``{}`` when none runs."""
        from connector.interop import autoscaler_status

        return autoscaler_status(self)

    async def get_system_topology(self) -> dict[str, Any]:
        self._live()
        from connector.interop import system_topology

        return await system_topology(self)

    async def get_prefill_queue_metrics(self) -> dict[str, Any]:
        self._live()
        from connector.interop import prefill_queue_metrics

        return await prefill_queue_metrics(self)

    # ------------------------------------------------------------- internals

    def replica_pids(self, name: str) -> dict[str, set[int]]:
        """Process-tree pids of each live replica (blocking psutil: call in a thread)."""
        out: dict[str, set[int]] = {}
        table = procs.process_tree()
        for r in self.state.replicas_of(name):
            if r.pid is not None and procs.same_process(r.pid, r.create_time):
                out[r.replica_id] = table.of(r.pid)
        return out
