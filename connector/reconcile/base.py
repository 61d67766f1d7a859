"""What every part of the reconcile loop shares: the contracts it is given (the resource broker, the
hooks interop plugs in), its state and the small machinery (task registry, wake-ups, scale
operations, saving). The replica actions (:mod:`connector.reconcile.replica_actions`), adoption
(:mod:`connector.reconcile.adoption`) and the loop itself (:mod:`connector.reconcile.loop`) build on
it, one module each."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import os
import signal
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from connector.errors import (
    ComponentNotFound,
    ResourcesExhausted,
    StateWriteFailed,
)
from connector.events import EventLog
from connector.graph.model import Graph, PortSpec, ResourceRequest, Service, SocketSpec
from connector.reconcile.operations import ScaleOp
from connector.reconcile.state import ComponentRecord, ConnectorState, ReplicaRecord, StateStore
from connector.supervision import procs
from connector.supervision.circus import CircusChannel
from connector.supervision.logs import (
    LogFileMaker,
    LogPolicy,
    merge_newest,
    read_replica_lines,
)
from connector.supervision.probes import DiscoveryProbe

log = logging.getLogger("connector.reconcile")


class ReservationLike(Protocol):
    ports: dict[str, int]
    sockets: dict[str, str]
    cpus: tuple[int, ...]

    def env(self) -> dict[str, str]: ...

    def gpu_fields(self) -> dict[str, str]: ...

    def to_dict(self) -> dict[str, Any]: ...


class ResourceBroker(Protocol):
    """What the loop needs from the resource manager (:mod:`connector.resources.manager`)."""

    def reserve(
        self,
        replica_id: str,
        component: str,
        request: ResourceRequest,
        ports: Sequence[PortSpec] = (),
        sockets: Sequence[SocketSpec] = (),
        *,
        probed: Collection[int] = (),
    ) -> Any: ...

    def probe_ports(self, count: int) -> Collection[int]: ...

    def reservation_from_dict(self, data: Mapping[str, Any]) -> Any: ...

    def adopt_dict(self, data: Mapping[str, Any]) -> Any: ...

    async def release(self, replica_id: str, pids: Any) -> Any: ...

    def machine_view(self) -> dict[str, Any]: ...

    @property
    def samples_gpus(self) -> bool: ...

    def refresh(self, our_pids: Collection[int]) -> None: ...

    def held_after_stop(self) -> list[dict[str, Any]]: ...

    def prepare(self, replica_id: str) -> tuple[Any, list[str]]: ...

    def restore_held_after_stop(self, entries: Sequence[Mapping[str, Any]]) -> list[str]: ...


ReplicaHook = Callable[[ReplicaRecord], Awaitable[None]]


@dataclass
class Hooks:
    """Where the Dynamo interop plugs in without the loop knowing about discovery."""

    discovery_probe: DiscoveryProbe | None = None
    # Take a replica out of discovery before it is stopped (routers stop sending to it).
    before_stop: ReplicaHook | None = None
    # A replica's process is gone: remove what it left in discovery at once.
    after_exit: ReplicaHook | None = None
    # Extra env for every replica (discovery backend, NATS, ...).
    replica_env: Callable[[], dict[str, str]] = field(default_factory=lambda: dict)
    # Env a service's replicas get for what they are (Dynamo's namespace, component,
    # loopback hosts: connector.graph.dynamo_defaults.service_env); the graph's envs win over it.
    service_env: Callable[[Service, str], dict[str, str]] = field(
        default_factory=lambda: lambda svc, namespace: {}
    )


# Replicas one step of a plan reserves and launches. A scale of 1,000 is planned in steps
# with the event loop free in between, so no request waits for all of it: ~0.2 ms a replica
# (reservation, record, task), up to 0.5 ms on two busy cores; 64 a step held it 20-60 ms.
PLAN_STEP = 32

# A scale's plan keeps at most this many of its replicas planned but not yet added to
# circusd (phase "spawning"), checked every PLAN_PACE_S. circusd adds 60-150 a second, one
# at a time, so planning 1,000 at once only queued them, and their first steps (reservation,
# record, save, log files) ran in the scale's first 2 s with the loop 90% busy: /healthz
# answered in 50-135 ms then, 16-34 ms (p99) paced. A plan that sees none of them leave for
# PLAN_STALL_S goes on. Scaling down, a step follows the last after PLAN_PACE_S (a stop may
# drain for seconds: counted, the drains would run a step at a time, not all together).
PLAN_AHEAD = 4 * PLAN_STEP
PLAN_PACE_S = 0.02
PLAN_STALL_S = 10.0

# Replicas being signalled and removed from circusd at once. circusd removes one watcher at
# a time, so more in flight only queue for it; with a thousand they all ran their steps at
# once, the loop had ~1,600 callbacks ready per turn and /healthz waited 150-230 ms (p99)
# for its turn; with 64, 45-55 ms, and 1,000 still stop in ~5 s. Drains (which may last a
# request's time) are not counted.
STOP_SLOTS = 64


@dataclass
class PlanResult:
    started: list[str] = field(default_factory=list)
    stopping: list[str] = field(default_factory=list)
    refused: list[ResourcesExhausted] = field(default_factory=list)
    more: bool = False  # the step limit stopped it: replicas are still missing

    def extend(self, step: PlanResult) -> None:
        self.started += step.started
        self.stopping += step.stopping
        self.refused += step.refused
        self.more = step.more


class ReconcilerBase:
    """State and machinery of one reconcile loop (see
    :class:`connector.reconcile.loop.Reconciler`)."""

    def __init__(
        self,
        *,
        namespace: str,
        graph: Graph,
        state: ConnectorState,
        store: StateStore,
        channel: CircusChannel,
        events: EventLog,
        resources: ResourceBroker,
        log_dir: Path,
        hooks: Hooks | None = None,
        resync_s: float = 1.0,
        log_policy: LogPolicy | None = None,
        circusd_alive: Callable[[], bool] | None = None,
        recover_supervisor: Callable[[], Awaitable[CircusChannel]] | None = None,
    ) -> None:
        self.namespace = namespace
        self.graph = graph
        self.state = state
        self.store = store
        self.channel = channel
        self.events = events
        self.resources = resources
        self.log_dir = log_dir
        self.log_files = LogFileMaker(log_dir)
        self.hooks = hooks or Hooks()
        self.resync_s = resync_s
        self.log_policy = log_policy or LogPolicy()
        # Where a component without workingDir runs: the folder the connector started in
        # (read once: a getcwd per spawn sat on the path of every add).
        self.default_working_dir = os.getcwd()
        self._circusd_alive = circusd_alive
        self._recover_supervisor = recover_supervisor
        self.ops: dict[str, ScaleOp] = {}
        self._op_done: dict[int, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._inner: dict[str, Coroutine[Any, Any, None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._exit_watcher = procs.ExitWatcher()
        self._stop_slots = asyncio.Semaphore(STOP_SLOTS)
        self._exit_codes: dict[int, int] = {}
        self._last_code_by_watcher: dict[str, int] = {}
        self._reaped: dict[int, asyncio.Event] = {}
        self._blocked: dict[str, int] = {}  # component -> target at which reservations failed
        # component -> the rest of a scale's plan, run a step at a time after the first
        # (Reconciler.continue_plan); passes leave such a component to it.
        self._planning: dict[str, asyncio.Task[None]] = {}
        # Components whose scale's plan runs (paced) in its caller or in the background,
        # with the op it plans for: a pass leaves their plan to it.
        self._driving: dict[str, ScaleOp] = {}
        self._wake = asyncio.Event()
        # Set (and replaced) at each change: what wait_changed() waiters wake on.
        self._changed = asyncio.Event()
        self._notify_scheduled = False
        self._loop_task: asyncio.Task[None] | None = None
        self._pass_lock = asyncio.Lock()
        self._closing = False
        self._reap_grace_s = 0.3
        # Stopped replicas' log files to prune (Reconciler._prune_stopped_logs): set by
        # every stop, and at start for what an earlier connector left.
        self._logs_stale = True
        self._logs_pruned_at = -math.inf

    def watcher_name(self, component: str, ordinal: int) -> str:
        # Circus lowercases watcher names; names are validated unique case-insensitively.
        return f"{self.namespace}.{component}.{ordinal}".lower()

    @property
    def watcher_prefix(self) -> str:
        return f"{self.namespace}.".lower()

    def wake(self) -> None:
        self._wake.set()

    def _launch(self, watcher: str, coro: Coroutine[Any, Any, None], replace: bool = False) -> None:
        current = self._tasks.get(watcher)
        if current is not None and not current.done():
            if not replace:
                coro.close()
                return
            self._cancel(watcher, current)
        task = asyncio.get_running_loop().create_task(self._guard(watcher, coro))
        self._tasks[watcher] = task
        self._inner[watcher] = coro

    def _cancel(self, watcher: str, task: asyncio.Task[None]) -> None:
        task.cancel()
        inner = self._inner.get(watcher)
        # A task cancelled before it ever ran would leave its action un-awaited.
        if inner is not None and inspect.getcoroutinestate(inner) == inspect.CORO_CREATED:
            inner.close()

    async def _guard(self, watcher: str, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except asyncio.CancelledError:
            raise
        except StateWriteFailed:
            pass  # the store logs it; the loop's passes go on from the record in memory
        except Exception:
            log.exception("replica task %s failed", watcher)
        finally:
            if self._tasks.get(watcher) is asyncio.current_task():
                del self._tasks[watcher]
                self._inner.pop(watcher, None)
            await self._notify()

    def component_record(self, name: str) -> ComponentRecord:
        comp = self.state.components.get(name)
        if comp is None:
            svc = self.graph.services[name]
            comp = ComponentRecord(target=svc.replicas)
            self.state.components[name] = comp
        return comp

    def _spawn_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        bg: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(bg)
        bg.add_done_callback(self._background.discard)

    async def _run_hook(self, hook: ReplicaHook, rec: ReplicaRecord) -> None:
        try:
            await hook(rec)
        except Exception:  # interop trouble must not stop the loop
            log.exception("hook %s failed for %s", getattr(hook, "__name__", hook), rec.replica_id)

    def _schedule_wake(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake.set)

    def unblock(self, name: str) -> None:
        """Forget that ``name``'s reservations failed at its target, so the next pass
        tries again (a restart asks for fresh replicas)."""
        self._blocked.pop(name, None)

    def begin_op(
        self, name: str, target: int, *, kind: str, source: str, decision_id: int | None = None
    ) -> ScaleOp:
        previous = self.ops.get(name)
        if previous is not None and not previous.done:
            self.finish_op(previous, "superseded", f"superseded by a newer target {target}")
        planning = self._planning.pop(name, None)
        if planning is not None:
            planning.cancel()  # the new target is planned afresh, from what exists now
        comp = self.component_record(name)
        live = [r for r in self.state.replicas_of(name) if r.phase != "stopping"]
        op = ScaleOp(
            self.namespace,
            name,
            kind=kind,
            source=source,
            before=len(live),
            target=target,
            decision_id=decision_id,
        )
        self.ops[name] = op
        self._op_done[id(op)] = asyncio.Event()
        comp.target = target
        # A new request retries even a target refused before: resources may be free now
        # (a leak cleared, a foreign process gone). Only resync passes stay blocked.
        self._blocked.pop(name, None)
        return op

    def converged(self, name: str) -> bool:
        comp = self.component_record(name)
        # Asked after every replica's step while an op is open: one pass, no sort.
        recs = [r for r in self.state.replicas.values() if r.component == name]
        return len(recs) == comp.target and all(r.phase == "ready" for r in recs)

    def finish_op(self, op: ScaleOp, outcome: str, reason: str | None = None) -> None:
        after = len([r for r in self.state.replicas_of(op.component) if r.phase == "ready"])
        op.finish(outcome, after, reason)
        self.events.emit(
            op.kind,
            component=op.component,
            source=op.source,
            from_replicas=op.before,
            to_replicas=op.target,
            outcome=outcome,
            reason=reason,
            duration_s=round(op.duration_s, 6),
            trace_id=op.trace_id,
            details={"decision_id": op.decision_id} if op.decision_id is not None else {},
        )
        done = self._op_done.pop(id(op), None)
        if done is not None:
            done.set()
        if self.ops.get(op.component) is op:
            del self.ops[op.component]

    async def wait_op(self, op: ScaleOp, timeout_s: float) -> bool:
        """Wait until ``op`` is done, at most ``timeout_s``: True when it converged. Raises
        :class:`StateWriteFailed` as soon as a state write fails meanwhile: no replica
        starts or stops until its record is written, so the wait could only run out; the op
        stays open, and is carried out once a write succeeds."""
        done = self._op_done.get(id(op))
        if done is not None:
            ended = asyncio.ensure_future(done.wait())
            failing = asyncio.ensure_future(self.store.failing.wait())
            try:
                await asyncio.wait(
                    (ended, failing), timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED
                )
            finally:
                ended.cancel()
                failing.cancel()
            if not op.done:
                self.store.raise_if_failing()
        if not op.done:
            self.finish_op(op, "timeout", f"not converged within {timeout_s:g} s")
        return op.outcome == "ok"

    async def _notify(self) -> None:
        """Something changed: finish the ops that converged and wake wait_changed().

        Coalesced: one check per loop iteration however many replicas changed in it. 1,000
        replica tasks woken by one shared state write each asked for it, and each check
        walks every record (O(N)), so they alone held the loop ~0.1 s."""
        if not self._notify_scheduled:
            self._notify_scheduled = True
            asyncio.get_running_loop().call_soon(self._check_ops)

    def _check_ops(self) -> None:
        self._notify_scheduled = False
        for name, op in list(self.ops.items()):
            if not op.done and name in self.graph.services and self.converged(name):
                self.finish_op(op, "ok")
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, timeout_s: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout_s)

    def save_soon(self) -> None:
        """Persist without waiting for the write: what a scale that does not wait does, so
        it answers without a state write (an fsync on a busy disk took 70-140 ms) in its
        path. Nothing depends on that write: every replica the scale starts writes its
        record, and so the target, before its process exists; a crash before the write
        leaves the previous, consistent state. A failed write is logged, and the next
        save (the loop saves every pass) tries again."""

        async def write() -> None:
            try:
                await self.save()
            except StateWriteFailed:
                pass  # the store logs it, once and then at most once a minute
            except Exception:
                log.exception("saving the state failed")

        self._spawn_background(write())

    async def save(self) -> None:
        # What stopped replicas still hold (lingering processes, leaked GPUs) goes with
        # every save, so a restarted connector does not hand it out.
        self.state.held_after_stop = self.resources.held_after_stop()
        await self.store.save(self.state)

    async def read_logs(self, recs: Sequence[ReplicaRecord], lines: int, stream: str) -> list[str]:
        streams = ("stdout", "stderr") if stream == "both" else (stream,)

        def read() -> list[tuple[str, list[str]]]:
            out: list[tuple[str, list[str]]] = []
            for rec in recs:
                for s in streams:
                    path = rec.log_paths.get(s)
                    if path:
                        label = rec.replica_id if len(streams) == 1 else f"{rec.replica_id} {s}"
                        out.append((label, read_replica_lines(self.log_dir, Path(path), lines)))
            return out

        return merge_newest(await asyncio.to_thread(read), lines)

    def require(self, name: str) -> Service:
        svc = self.graph.services.get(name)
        if svc is None:
            known = ", ".join(sorted(self.graph.services)) or "none"
            raise ComponentNotFound(
                f"no component {name!r} in graph {self.graph.name!r} (components: {known})",
                component=name,
            )
        return svc


class ExitedAtOnce(Exception):
    """The replica's process exited before circusd could even list it."""


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (code unknown)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
