"""Discovery, applied to managed replicas: readiness, draining, stale-entry cleanup.

:class:`DiscoveryBridge` plugs into the reconcile loop's hooks
(:class:`connector.reconcile.loop.Hooks`) without the loop knowing about Dynamo:

* **readiness** (``discovery_probe``): a replica is ready once *its own* instance is
  registered for its component's endpoints (all of them, or any, per the graph). It waits
  on the discovery watch, so it returns the moment the key appears;
* **draining** (``before_stop``): a replica about to stop is first taken out of discovery
  (its keys deleted, its lease kept) so routers stop sending to it while it finishes;
* **cleanup** (``after_exit``): when a replica's process is gone, its entries are removed
  at once (etcd: its lease revoked; file backend: its files deleted), instead of lingering
  for the lease TTL (etcd) or forever (files);
* **reaper**: every put, and a periodic sweep, removes entries whose owner is a managed
  replica that is not running (it died while the connector was away, say).

Ownership is :func:`connector.dynamo.discovery.cache.match_instance` (allocated port, then the
process tree holding the listening socket); a decision, once made, is remembered per key, so an
entry can still be attributed after its process is gone. Entries of no managed replica are foreign
and never touched."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

from connector.dynamo.discovery.cache import Discovery, Instance
from connector.dynamo.discovery.owners import Ownership, component_of
from connector.dynamo.drain import DEFAULT_DRAIN_TIMEOUT_S, DrainResult, wait_idle
from connector.events import EventLog
from connector.graph.dynamo_defaults import METRICS_PORT
from connector.graph.model import Graph, Readiness, Service
from connector.reconcile.state import ConnectorState, ReplicaRecord
from connector.supervision.probes import ProbeTarget

log = logging.getLogger(__name__)

# Phases in which a replica has no process (its entries are stale).
_NOT_RUNNING = frozenset({"backoff", "exited"})
# An entry registered this long before its replica's current process was spawned belongs
# to an earlier process of that replica (same ports, dead now). The margin covers the time
# between the process starting and the connector recording ``spawned_at``.
SPAWN_MARGIN_S = 0.1
# A removal discovery refused is tried again after this long, doubling (see _remove_soon).
REMOVE_RETRY_S = 0.1


def _drain_reason(result: DrainResult) -> str:
    if result.inflight is None:
        return "out of discovery; in-flight requests unknown (no metrics)"
    if result.timed_out:
        return f"{result.inflight:g} request(s) still in flight at the drain timeout"
    return "out of discovery, no request in flight"


class _Host(Protocol):
    graph: Graph
    state: ConnectorState
    events: EventLog


# How many groups of instances a readiness failure lists (the reason stays one line).
_LISTED_GROUPS = 6


class DiscoveryBridge:
    """Readiness, drain and cleanup for the replicas of one connector."""

    def __init__(
        self,
        host: _Host,
        discovery: Discovery,
        *,
        extra_env: Mapping[str, str] | None = None,
        sweep_s: float = 2.0,
    ) -> None:
        self.host = host
        self.discovery = discovery
        self.extra_env = dict(extra_env or {})
        self.sweep_s = sweep_s
        self.ownership = Ownership()
        self.reaped_total = 0  # entries removed because their replica's process was gone
        self._unsubscribe: Callable[[], None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._removing: set[str] = set()
        self._resolving: set[str] = set()
        # Entries taken out for a drain: their process still holds its lease (and maybe a
        # model card on it) until it exits; then the lease is revoked too.
        self._drained: dict[str, list[Instance]] = {}

    # ------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self._unsubscribe = self.discovery.subscribe(self._on_change)
        self._sweeper = asyncio.get_running_loop().create_task(
            self._sweep_loop(), name="discovery-reaper"
        )

    async def close(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        tasks = [t for t in (self._sweeper, *self._background) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._sweeper = None

    def replica_env(self) -> dict[str, str]:
        return {**self.discovery.replica_env(), **self.extra_env}

    # ------------------------------------------------------------- identity

    def _service_of(self, replica_id: str) -> Service | None:
        return self.host.graph.services.get(component_of(replica_id))

    def _namespace(self, svc: Service) -> str:
        return svc.dynamo_namespace or self.host.graph.namespace

    def _records(self) -> dict[str, ReplicaRecord]:
        return {r.replica_id: r for r in self.host.state.replicas.values()}

    def owner(self, inst: Instance) -> str | None:
        """The replica owning ``inst`` as decided earlier, or by allocated port."""
        return self.ownership.by_port(inst, self.host.state.replicas.values())

    async def resolve_owner(
        self, inst: Instance, extra: Iterable[ReplicaRecord] = ()
    ) -> str | None:
        """The owner by port, else by the process tree holding its listening socket."""
        recs = [r for r in self.host.state.replicas.values() if r.pid is not None]
        return await self.ownership.by_socket(inst, [*recs, *extra])

    def owned_by(self, replica_id: str) -> list[Instance]:
        return [i for i in self.discovery.instances() if self.owner(i) == replica_id]

    def dynamo_component(self, service: str) -> str | None:
        """The Dynamo component ``service`` registers as: learnt from its replicas'
        instances, else what its readiness names; None while nothing is known."""
        learnt = self.ownership.learnt_component(service)
        if learnt is not None:
            return learnt
        svc = self.host.graph.services.get(service)
        return svc.readiness.component if svc is not None else None

    def registered_replicas(self, service: str) -> int:
        """Replicas of ``service`` whose own instance of a readiness endpoint is listed."""
        svc = self.host.graph.services.get(service)
        if svc is None:
            return 0
        endpoints = set(svc.readiness.endpoints)
        owners = {
            owner
            for inst in self.discovery.instances()
            if inst.endpoint in endpoints
            and (owner := self.owner(inst)) is not None
            and component_of(owner) == service
        }
        return len(owners)

    # ------------------------------------------------------------- readiness

    async def probe(
        self, target: ProbeTarget, readiness: Readiness, deadline: float
    ) -> tuple[bool, str]:
        """Ready once the replica's *own* instances are registered for the endpoints
        (``readiness.match``: all or any). Its own: the instance advertises one of its
        allocated ports or a socket its process tree listens on; its namespace and
        component are then learnt, not assumed. Not ready at the deadline or if it dies
        first, with a reason that says what discovery did list."""
        svc = self._service_of(target.replica_id)
        if svc is None:
            return False, "its service left the graph"
        wanted = set(readiness.endpoints)
        need_all = readiness.match != "any"
        found: set[str] = set()
        rejected: set[str] = set()

        def candidate(inst: Instance) -> bool:
            if inst.endpoint not in wanted or inst.endpoint in found or inst.key in rejected:
                return False
            if self._predates(inst, target.spawned_at):
                return False  # left behind by an earlier process of this replica
            owner = self.ownership.known(inst.key)
            return owner is None or owner == target.replica_id

        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False, self._not_registered_reason(target, svc, readiness)
            if not await asyncio.to_thread(target.alive):
                return False, "process exited during start-up"
            # Woken by the watch; the slice only bounds how late a death is noticed.
            inst = await self.discovery.wait_for(candidate, min(remaining, 1.0))
            if inst is None:
                continue
            if await self._is_mine(inst, target):
                self._note_identity(target, svc, readiness, inst)
                found.add(inst.endpoint)
                if not need_all or found >= wanted:
                    return True, ""
            else:
                rejected.add(inst.key)

    async def _is_mine(self, inst: Instance, target: ProbeTarget) -> bool:
        if inst.address is not None and inst.address[1] in target.ports.values():
            self.ownership.record(inst, target.replica_id)
            return True
        owner = self.owner(inst)
        if owner is not None:
            return owner == target.replica_id
        # The record may not carry the new pid yet: search with the probe's own.
        rec = self._records().get(target.replica_id)
        extra = []
        if rec is not None and rec.pid is None:
            extra.append(rec.model_copy(update={"pid": target.pid}))
        return await self.resolve_owner(inst, extra) == target.replica_id

    def _note_identity(
        self, target: ProbeTarget, svc: Service, readiness: Readiness, inst: Instance
    ) -> None:
        """Say once what a service registers as when the graph named something else: a
        replica that serves is never failed for a wrong guess of its name."""
        expected_ns = self._namespace(svc)
        named = readiness.component
        if inst.namespace == expected_ns and (named is None or named == inst.component):
            return
        wrong = []
        if named is not None and named != inst.component:
            wrong.append(f"component {inst.component!r}, not {named!r}")
        if inst.namespace != expected_ns:
            wrong.append(f"namespace {inst.namespace!r}, not {expected_ns!r}")
        self.host.events.emit(
            "discovery",
            component=svc.name,
            replica=target.replica_id,
            outcome="ok",
            reason=(
                f"{target.replica_id} registered {inst.namespace}/{inst.component}/"
                f"{inst.endpoint} ({'; '.join(wrong)}); counted ready"
                + (
                    f"; set local.readiness.discovery.component: {inst.component}"
                    if named is not None and named != inst.component
                    else ""
                )
            ),
            details={"key": inst.key, "namespace": inst.namespace, "component": inst.component},
        )

    def _not_registered_reason(
        self, target: ProbeTarget, svc: Service, readiness: Readiness
    ) -> str:
        groups: dict[str, list[str]] = {}
        for inst in self.discovery.instances():
            owner = self.owner(inst) or "foreign"
            groups.setdefault(f"{inst.namespace}/{inst.component}/{inst.endpoint}", []).append(
                owner
            )
        endpoints = ", ".join(sorted(readiness.endpoints))
        head = (
            f"{target.replica_id} registered no instance of {endpoints} within "
            f"{readiness.timeout_s:g} s (expected in namespace {self._namespace(svc)!r}"
            + (f", component {readiness.component!r}" if readiness.component else "")
            + ")"
        )
        if not groups:
            return f"{head}; discovery lists no instance at all"
        listed = [
            f"{name} ({', '.join(sorted(set(owners)))})"
            for name, owners in sorted(groups.items())[:_LISTED_GROUPS]
        ]
        more = len(groups) - _LISTED_GROUPS
        tail = f", and {more} more" if more > 0 else ""
        return f"{head}; discovery lists {'; '.join(listed)}{tail}"

    # --------------------------------------------------------- drain / cleanup

    async def before_stop(self, rec: ReplicaRecord) -> None:
        """Out of discovery before the stop (keys deleted, lease kept for in-flight work),
        then, for a replica that was registered, until its in-flight requests are done
        (:func:`connector.dynamo.drain.wait_idle`), at most its ``drainSeconds``."""
        owned = self.owned_by(rec.replica_id)
        self._drained[rec.replica_id] = owned
        for inst in owned:
            await self._remove(inst, revoke=False, why="drain", replica=rec.replica_id)
        svc = self._service_of(rec.replica_id)
        if not owned or svc is None or svc.drain_s == 0:
            return  # nothing could have been routed to it, or the graph says not to wait
        ports = (rec.reservation or {}).get("ports") or {}
        metrics_port = ports.get(METRICS_PORT.get(svc.role, "system"))
        explicit = svc.drain_s is not None
        result = await wait_idle(
            int(metrics_port) if metrics_port is not None else None,
            svc.drain_s if svc.drain_s is not None else DEFAULT_DRAIN_TIMEOUT_S,
            full_without_metrics=explicit,
        )
        self.host.events.emit(
            "drain",
            component=svc.name,
            replica=rec.replica_id,
            outcome="timeout" if result.timed_out else "ok",
            duration_s=result.waited_s,
            reason=_drain_reason(result),
            details={"inflight": result.inflight},
        )

    async def after_exit(self, rec: ReplicaRecord) -> None:
        """The process is gone: its entries go now (lease revoked / files deleted). A removal
        that fails (etcd away, or its client still reconnecting after an outage) is tried
        again soon, not left to the next sweep (:meth:`_remove_soon`)."""
        for inst in self.owned_by(rec.replica_id):
            await self._remove_soon(inst, why="process exited", replica=rec.replica_id)
        for inst in self._drained.pop(rec.replica_id, []):
            if inst.backend == "etcd":  # what else the drained process kept on its lease
                with contextlib.suppress(Exception):
                    await self.discovery.remove(inst, revoke=True)

    async def _remove_soon(self, inst: Instance, *, why: str, replica: str) -> None:
        """:meth:`_remove`, tried again after REMOVE_RETRY_S, doubling, for as long as a
        sweep interval: a replica killed the moment etcd came back stayed listed until the
        next sweep, up to 2 s, where clients reconnect within a quarter second."""
        delay, waited = REMOVE_RETRY_S, 0.0
        while not await self._remove(inst, revoke=True, why=why, replica=replica):
            if waited >= self.sweep_s:
                return  # the sweeps go on trying
            await asyncio.sleep(delay)
            waited += delay
            delay *= 2

    async def _remove(self, inst: Instance, *, revoke: bool, why: str, replica: str) -> bool:
        """Take ``inst`` out of discovery; False when discovery refused (logged), True when
        it is out or another removal of it is under way."""
        if inst.key in self._removing:
            return True
        self._removing.add(inst.key)
        try:
            await self.discovery.remove(inst, revoke=revoke)
        except Exception as exc:
            log.warning("discovery: removing %s (%s) failed: %s", inst.key, why, exc)
            return False
        finally:
            self._removing.discard(inst.key)
        self.ownership.forget(inst.key)
        if why != "drain":
            self.reaped_total += 1
        self.host.events.emit(
            "reap",
            component=component_of(replica),
            replica=replica,
            reason=why,
            outcome="ok",
            details={
                "key": inst.key,
                "instance_id": inst.instance_hex,
                "backend": inst.backend,
                "revoked": revoke and inst.backend == "etcd",
            },
        )
        return True

    def stats(self) -> dict[str, Any]:
        """Instances per managed component (for the exporter), and entries reaped so far."""
        per_component: dict[str, int] = {name: 0 for name in self.host.graph.services}
        for inst in self.discovery.instances():
            owner = self.owner(inst)
            if owner is not None:
                component = component_of(owner)
                per_component[component] = per_component.get(component, 0) + 1
        return {"instances": per_component, "stale_reaped_total": self.reaped_total}

    # ------------------------------------------------------------------ reaper

    def _predates(self, inst: Instance, spawned_at: float | None) -> bool:
        registered = self.discovery.registered_at(inst.key)
        if registered is None or spawned_at is None:
            return False
        return registered < spawned_at - SPAWN_MARGIN_S

    def stale_reason(self, inst: Instance) -> tuple[str, str] | None:
        """(owner, why) when ``inst`` belongs to a managed replica but not to its running
        process; None for live and foreign entries."""
        owner = self.owner(inst)
        if owner is None:
            return None
        rec = self._records().get(owner)
        if rec is None:
            return None  # not ours (any more): foreign, never touched
        if rec.phase in _NOT_RUNNING:
            return owner, "owner not running"
        if rec.phase in ("starting", "ready") and self._predates(inst, rec.spawned_at):
            return owner, "left by an earlier process of the replica"
        return None

    def _on_change(self, kind: str, inst: Instance) -> None:
        if kind == "delete":
            self.ownership.forget(inst.key)
            return
        if self.owner(inst) is None:
            # Not ours by port: maybe by socket (a component that picks its own port).
            # Decided now, while its process is alive, so its cleanup at exit finds it.
            self._spawn(self._resolve_then_check(inst))
            return
        self._check_stale(inst)

    def _check_stale(self, inst: Instance) -> None:
        stale = self.stale_reason(inst)
        if stale is not None:
            owner, why = stale
            self._spawn(self._remove(inst, revoke=True, why=why, replica=owner))

    async def _resolve_then_check(self, inst: Instance) -> None:
        if inst.key in self._resolving or self.ownership.recently_foreign(inst.key):
            return
        self._resolving.add(inst.key)
        try:
            owner = await self.resolve_owner(inst)
        finally:
            self._resolving.discard(inst.key)
        if owner is not None and any(i.key == inst.key for i in self.discovery.instances()):
            self._check_stale(inst)  # still listed: its owner may have died meanwhile

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def sweep(self) -> int:
        """Remove every stale entry of a managed replica (see :meth:`stale_reason`)."""
        removed = 0
        for inst in self.discovery.instances():
            if self.owner(inst) is None and not self.ownership.recently_foreign(inst.key):
                await self.resolve_owner(inst)  # e.g. entries found at re-adoption
            stale = self.stale_reason(inst)
            if stale is not None:
                owner, why = stale
                await self._remove(inst, revoke=True, why=why, replica=owner)
                removed += 1
        return removed

    async def _sweep_loop(self) -> None:
        while True:
            await asyncio.sleep(self.sweep_s)
            try:
                await self.sweep()
            except Exception:
                log.exception("discovery reaper sweep failed")
