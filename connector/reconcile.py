"""The reconcile loop: desired state vs observed state, turned into actions.

Desired: each component's replica target (graph default, then API / Planner calls).
Observed: replica records (persisted), circusd's watchers, live processes (pidfd + psutil),
readiness. Actions: spawn, probe, restart after backoff, drain+stop, release.

Level-triggered and idempotent: every pass looks at the whole state and plans what is
missing, so a crash, a connector restart and a scale request all go through the same code.
Records are created (and persisted) *before* a process is started and removed only after
it is gone, so a pass never double-counts and a crash half-way leaves a state the next pass
(or the next connector) completes. Passes run on exit notifications, API calls and Circus
events, with a periodic resync as a backstop.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from connector import procs, restart_policy, templates
from connector.errors import (
    ComponentNotFound,
    ConnectorError,
    ResourcesExhausted,
    SupervisorUnavailable,
)
from connector.events import EventLog
from connector.graph import Graph, PortSpec, ResourceRequest, Service, SocketSpec
from connector.launcher import launcher_prefix
from connector.logs import (
    LogPolicy,
    circus_stream_options,
    log_paths,
    merge_newest,
    read_replica_lines,
)
from connector.operations import ScaleOp, standalone_step
from connector.probes import DiscoveryProbe, ProbeTarget, wait_ready
from connector.quantities import approx_memory, format_memory
from connector.state import ComponentRecord, ConnectorState, ExitRecord, ReplicaRecord, StateStore
from connector.supervisor import CircusChannel, CircusCommandError

log = logging.getLogger(__name__)


class ReservationLike(Protocol):
    ports: dict[str, int]
    sockets: dict[str, str]
    cpus: tuple[int, ...]

    def env(self) -> dict[str, str]: ...

    def gpu_fields(self) -> dict[str, str]: ...

    def to_dict(self) -> dict[str, Any]: ...


class ResourceBroker(Protocol):
    """What the loop needs from the resource manager (:mod:`connector.resources`)."""

    def reserve(
        self,
        replica_id: str,
        component: str,
        request: ResourceRequest,
        ports: Sequence[PortSpec] = (),
        sockets: Sequence[SocketSpec] = (),
    ) -> Any: ...

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


def _live_tree(pid: int | None, create_time: float | None) -> set[int]:
    """The pids of ``pid``'s tree while it is still the process we started (blocking:
    it reads /proc, so it runs in a thread)."""
    if pid and procs.same_process(pid, create_time):
        return set(procs.tree_pids(pid))
    return set()


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
    # loopback hosts: connector.dynamo_defaults.service_env); the graph's envs win over it.
    service_env: Callable[[Service, str], dict[str, str]] = field(
        default_factory=lambda: lambda svc, namespace: {}
    )


@dataclass
class PlanResult:
    started: list[str] = field(default_factory=list)
    stopping: list[str] = field(default_factory=list)
    refused: list[ResourcesExhausted] = field(default_factory=list)


class Reconciler:
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
        self.hooks = hooks or Hooks()
        self.resync_s = resync_s
        self.log_policy = log_policy or LogPolicy()
        self._circusd_alive = circusd_alive
        self._recover_supervisor = recover_supervisor
        self.ops: dict[str, ScaleOp] = {}
        self._op_done: dict[int, asyncio.Event] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._inner: dict[str, Coroutine[Any, Any, None]] = {}
        self._background: set[asyncio.Task[Any]] = set()
        self._exit_watcher = procs.ExitWatcher()
        self._exit_codes: dict[int, int] = {}
        self._last_code_by_watcher: dict[str, int] = {}
        self._reaped: dict[int, asyncio.Event] = {}
        self._blocked: dict[str, int] = {}  # component -> target at which reservations failed
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._loop_task: asyncio.Task[None] | None = None
        self._pass_lock = asyncio.Lock()
        self._closing = False
        self._reap_grace_s = 0.3

    # ----------------------------------------------------------------- naming

    def watcher_name(self, component: str, ordinal: int) -> str:
        # Circus lowercases watcher names; names are validated unique case-insensitively.
        return f"{self.namespace}.{component}.{ordinal}".lower()

    @property
    def watcher_prefix(self) -> str:
        return f"{self.namespace}.".lower()

    # ------------------------------------------------------------- lifecycle

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    def wake(self) -> None:
        self._wake.set()

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.resync_s)
            self._wake.clear()
            if self._closing:
                break
            try:
                await self.reconcile_once()
            except Exception:  # the loop must survive anything one pass runs into
                log.exception("reconcile pass failed")

    async def stop_loop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
        for watcher, task in list(self._tasks.items()):
            self._cancel(watcher, task)
        for task in list(self._background):
            task.cancel()
        for task in list(self._tasks.values()) + list(self._background):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._exit_watcher.close()

    # ---------------------------------------------------------------- passes

    async def reconcile_once(self) -> None:
        async with self._pass_lock:
            await self._observe()
            for name in self.graph.services:
                self.plan(name)
            await self._stop_unknown_components()
        await self.save()
        await self._notify()

    async def _observe(self) -> None:
        if self._circusd_alive is not None and not await asyncio.to_thread(self._circusd_alive):
            await self._supervisor_lost()
            return
        if self.resources.samples_gpus:
            # Who else uses each GPU (NVML), so busy GPUs are not handed out. Walking every
            # replica's process tree is only worth it when there are GPUs to sample.
            leaders = [r.pid for r in self.state.replicas.values() if r.pid is not None]
            await asyncio.to_thread(
                lambda: self.resources.refresh({p for pid in leaders for p in procs.tree_pids(pid)})
            )
        watched = [
            (r.watcher, r.pid, r.create_time)
            for r in self.state.replicas.values()
            if r.phase in ("starting", "ready") and r.pid is not None
        ]
        if not watched:
            return
        dead = await asyncio.to_thread(
            lambda: [(w, pid) for w, pid, ct in watched if not procs.same_process(pid, ct)]
        )
        for watcher, pid in dead:
            self._on_pid_exit(watcher, pid)
        gone = {w for w, _ in dead}
        await self._enforce_memory_limits([(w, pid) for w, pid, _ in watched if w not in gone])

    async def _enforce_memory_limits(self, running: Sequence[tuple[str, int]]) -> None:
        """Kill a replica whose process tree uses more memory (RSS) than its
        ``resources.limits.memory``, as Kubernetes' OOM killer would; its exit then follows
        the restart policy with the reason. Checked once a pass: a limit, not a cgroup."""
        limits: dict[str, int] = {}
        for watcher, _ in running:
            rec = self.state.replicas.get(watcher)
            svc = self.graph.services.get(rec.component) if rec is not None else None
            if svc is not None and svc.resources.memory_limit_bytes:
                limits[watcher] = svc.resources.memory_limit_bytes
        if not limits:
            return
        pids = dict(running)
        used = await asyncio.to_thread(lambda: {w: procs.tree_rss(pids[w]) for w in limits})
        for watcher, limit in limits.items():
            rec = self.state.replicas.get(watcher)
            if rec is None or rec.pid != pids[watcher] or used[watcher] <= limit:
                continue
            reason = (
                f"killed: memory {approx_memory(used[watcher])} above its limit "
                f"{format_memory(limit)} (resources.limits.memory)"
            )
            log.warning("%s %s", rec.replica_id, reason)
            rec.last_exit = ExitRecord(at=time.time(), reason=reason)
            await asyncio.to_thread(procs.signal_group, pids[watcher], signal.SIGKILL)

    async def _stop_unknown_components(self) -> None:
        for rec in list(self.state.replicas.values()):
            if rec.component not in self.graph.services and rec.phase != "stopping":
                self.begin_stop(rec, None, "component left the graph")

    def plan(self, name: str, op: ScaleOp | None = None) -> PlanResult:
        """Decide and launch what one component needs now. Synchronous: atomic on the loop."""
        result = PlanResult()
        svc = self.graph.services[name]
        comp = self.component_record(name)
        recs = self.state.replicas_of(name)
        now = time.time()
        if not comp.crashloop:
            for rec in recs:
                if (
                    rec.phase == "backoff"
                    and (rec.restart_at or 0) <= now
                    and rec.watcher not in self._tasks
                ):
                    self._launch(rec.watcher, self._start_replica(rec, op, restart=True))
        live = [r for r in recs if r.phase != "stopping"]
        missing = comp.target - len(live)
        if missing > 0 and not comp.crashloop and self._blocked.get(name) != comp.target:
            for _ in range(missing):
                ordinal = comp.next_ordinal
                replica_id = f"{name}/{ordinal}"
                try:
                    reservation = self.resources.reserve(
                        replica_id, name, svc.resources, svc.ports, svc.sockets
                    )
                except ResourcesExhausted as exc:
                    result.refused.append(exc)
                    break
                comp.next_ordinal += 1
                watcher = self.watcher_name(name, ordinal)
                rec = ReplicaRecord(
                    component=name,
                    ordinal=ordinal,
                    watcher=watcher,
                    reservation=reservation.to_dict(),
                    log_paths=log_paths(self.log_dir, watcher),
                )
                self.state.replicas[watcher] = rec
                result.started.append(replica_id)
                self._launch(watcher, self._start_replica(rec, op, restart=False))
            if result.refused:
                self._blocked[name] = comp.target
                first = result.refused[0]
                self.events.emit(
                    "allocate",
                    component=name,
                    outcome="refused",
                    reason=first.message,
                    details={"started": result.started, **first.details},
                    trace_id=op.trace_id if op else None,
                )
        elif missing < 0:
            # Not-ready first, then newest.
            victims = sorted(live, key=lambda r: (r.phase == "ready", -r.ordinal))[:-missing]
            for rec in victims:
                result.stopping.append(rec.replica_id)
                self.begin_stop(rec, op, "scale down")
        return result

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

    # --------------------------------------------------------------- actions

    def _replica_env(
        self, svc: Service, rec: ReplicaRecord, reservation: ReservationLike | None
    ) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.hooks.replica_env())
        env.update(self.hooks.service_env(svc, self.graph.namespace))
        env.update(
            {
                "DYNAMO_LOCAL_NAMESPACE": self.namespace,
                "DYNAMO_LOCAL_COMPONENT": svc.name,
                "DYNAMO_LOCAL_REPLICA": rec.replica_id,
                "PYTHONUNBUFFERED": "1",
            }
        )
        if reservation is not None:
            env.update(reservation.env())
        values = self._template_values(reservation)
        for key, value in svc.envs:
            env[key] = templates.expand(value, values)
        return env

    @staticmethod
    def _template_values(reservation: ReservationLike | None) -> templates.Values:
        if reservation is None:
            return templates.values_of({}, {})
        return templates.values_of(reservation.ports, reservation.sockets, reservation.gpu_fields())

    def _reservation(self, rec: ReplicaRecord) -> ReservationLike | None:
        if rec.reservation is None:
            return None
        res: ReservationLike = self.resources.reservation_from_dict(rec.reservation)
        return res

    async def _prepare_allocation(self, rec: ReplicaRecord, restart: bool) -> bool:
        """Make the replica's allocation usable right before its process (re)starts: stale
        socket files go, and ports a foreign process bound since they were reserved (or
        since its last exit) move, so it does not start only to fail on bind. True when a
        port moved: the record has the new ports and the old watcher, whose env names the
        old ones, is gone."""
        if not rec.reservation:
            return False
        reservation, moves = await asyncio.to_thread(self.resources.prepare, rec.replica_id)
        if not moves:
            return False
        rec.reservation = reservation.to_dict()
        await self.save()
        for line in moves:
            self.events.emit(
                "allocate",
                component=rec.component,
                replica=rec.replica_id,
                outcome="ok",
                reason=line,
            )
        if restart:
            with contextlib.suppress(CircusCommandError):
                await self.channel.call("rm", name=rec.watcher, waiting=True)
        return True

    async def _circus_start(self, rec: ReplicaRecord, restart: bool) -> int:
        svc = self.graph.services[rec.component]
        reservation = self._reservation(rec)
        values = self._template_values(reservation)
        argv = [templates.expand(a, values) for a in (*svc.command, *svc.args)]
        prefix = launcher_prefix(reservation.cpus if reservation else ())
        argv = prefix + argv
        started = False
        if restart:
            try:
                await self.channel.call("start", name=rec.watcher, waiting=True)
                started = True
            except CircusCommandError:
                started = False  # watcher gone (e.g. circusd was replaced): add it anew
        if not started:
            options: dict[str, Any] = {
                "env": self._replica_env(svc, rec, reservation),
                "copy_env": False,
                "respawn": False,  # restarts follow our backoff and crash-loop policy
                "numprocesses": 1,
                "graceful_timeout": svc.graceful_stop_s,
                "close_child_stdin": True,
                "working_dir": svc.working_dir or str(Path.cwd()),
                **circus_stream_options(rec.log_paths, self.log_policy),
            }
            await asyncio.to_thread(self.log_dir.mkdir, parents=True, exist_ok=True)
            await self.channel.call(
                "add",
                name=rec.watcher,
                cmd=argv[0],
                args=argv[1:],
                start=True,
                waiting=True,
                options=options,
            )
        reply = await self.channel.call("list", name=rec.watcher)
        pids = [int(p) for p in reply.get("pids", [])]
        if not pids:
            raise ExitedAtOnce(rec.watcher)
        return pids[0]

    async def _start_replica(self, rec: ReplicaRecord, op: ScaleOp | None, restart: bool) -> None:
        """Spawn (or restart after backoff) one replica, then wait for readiness."""
        svc = self.graph.services[rec.component]
        step = op.step if op else standalone_step
        name = "restart" if restart else "spawn"
        rec.phase = "spawning"
        await self.save()  # the record exists on disk before the process does
        with step(name, **{"dynamo_local.replica": rec.replica_id}):
            try:
                moved = await self._prepare_allocation(rec, restart)
                pid = await self._circus_start(rec, restart and not moved)
            except ExitedAtOnce:
                # Gone before we could see it: circusd's reap event has its exit code.
                if self.hooks.after_exit is not None:
                    await self._run_hook(self.hooks.after_exit, rec)
                await asyncio.sleep(self._reap_grace_s)
                code = self._last_code_by_watcher.pop(rec.watcher, None)
                await self._after_exit(rec, code, "exited at once: " + _describe_exit(code))
                return
            except (SupervisorUnavailable, CircusCommandError, ResourcesExhausted) as exc:
                self.events.emit(
                    name,
                    component=rec.component,
                    replica=rec.replica_id,
                    outcome="failed",
                    reason=str(exc),
                )
                await self._after_exit(rec, None, f"{name} failed: {exc}")
                return
        rec.pid = pid
        rec.create_time = await asyncio.to_thread(procs.create_time_of, pid)
        rec.spawned_at = time.time()
        rec.phase = "starting"
        rec.restart_at = None
        if restart:
            rec.restarts += 1
            self.component_record(rec.component).restarts_total += 1
        self.events.emit(
            name,
            component=rec.component,
            replica=rec.replica_id,
            outcome="ok",
            details={"pid": pid},
            trace_id=op.trace_id if op else None,
        )
        watching = self._exit_watcher.watch(pid, self._exit_callback(rec.watcher))
        if not watching and not await asyncio.to_thread(procs.same_process, pid, rec.create_time):
            self._on_pid_exit(rec.watcher, pid)
        await self.save()
        await self._notify()
        target = self._probe_target(rec, pid)
        with step("wait-ready", **{"dynamo_local.replica": rec.replica_id}) as span:
            ready, reason = await wait_ready(
                target, svc.readiness, discovery_probe=self.hooks.discovery_probe
            )
            span.set_attribute("dynamo_local.ready", ready)
        gone = not ready and not await asyncio.to_thread(target.alive)
        if rec.pid != pid or rec.phase != "starting" or gone:
            return  # exited or being stopped meanwhile; those paths own the record now
        if ready:
            rec.phase = "ready"
            rec.ready_at = time.time()
            self._blocked.pop(rec.component, None)
            self.events.emit(
                "ready",
                component=rec.component,
                replica=rec.replica_id,
                duration_s=rec.ready_at - (rec.spawned_at or rec.ready_at),
            )
            await self.save()
            await self._notify()
            return
        self.events.emit(
            "ready",
            component=rec.component,
            replica=rec.replica_id,
            outcome="failed",
            reason=reason,
        )
        rec.last_exit = ExitRecord(at=time.time(), reason=reason)
        await asyncio.to_thread(procs.terminate_group, pid, svc.graceful_stop_s)

    def _exit_callback(self, watcher: str) -> Callable[[int], None]:
        def on_exit(pid: int) -> None:
            self._on_pid_exit(watcher, pid)

        return on_exit

    def _on_pid_exit(self, watcher: str, pid: int) -> None:
        rec = self.state.replicas.get(watcher)
        if rec is None or rec.pid != pid or rec.phase not in ("starting", "ready", "spawning"):
            return
        self._exit_watcher.unwatch(pid)
        if self.hooks.after_exit is not None:
            # Stale discovery entries go now, not after the exit code arrives.
            self._spawn_background(self._run_hook(self.hooks.after_exit, rec))
        self._spawn_background(self._handle_exit(rec, pid))

    def _spawn_background(self, coro: Coroutine[Any, Any, Any]) -> None:
        bg: asyncio.Task[Any] = asyncio.get_running_loop().create_task(coro)
        self._background.add(bg)
        bg.add_done_callback(self._background.discard)

    async def _run_hook(self, hook: ReplicaHook, rec: ReplicaRecord) -> None:
        try:
            await hook(rec)
        except Exception:  # interop trouble must not stop the loop
            log.exception("hook %s failed for %s", getattr(hook, "__name__", hook), rec.replica_id)

    def on_circus_event(self, watcher: str, event: str, data: dict[str, Any]) -> None:
        """Circus pub/sub: ``reap`` carries the exit code we cannot get from a pidfd."""
        if event == "reap":
            pid = data.get("process_pid")
            code = data.get("exit_code")
            if isinstance(pid, int) and isinstance(code, int):
                self._exit_codes[pid] = code
                self._last_code_by_watcher[watcher] = code
                self._reaped.setdefault(pid, asyncio.Event()).set()
                self._prune_exit_codes()

    def _prune_exit_codes(self) -> None:
        """Exit codes wait here for the exit handler that asks for them; under a crash loop
        of many replicas nobody may, so the oldest half goes past a bound."""
        if len(self._exit_codes) > 4096:
            for pid in list(self._exit_codes)[:2048]:
                self._exit_codes.pop(pid, None)
                self._reaped.pop(pid, None)
        if len(self._last_code_by_watcher) > 4096:
            for watcher in list(self._last_code_by_watcher)[:2048]:
                self._last_code_by_watcher.pop(watcher, None)

    async def _handle_exit(self, rec: ReplicaRecord, pid: int) -> None:
        # Whatever the leader started dies with it: orphans would keep GPUs and ports.
        await asyncio.to_thread(procs.kill_leftovers, pid, rec.create_time)
        # circusd reaps within its check_delay and tells us the code; wait briefly for it.
        waiter = self._reaped.setdefault(pid, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), 1.0)
        self._reaped.pop(pid, None)
        code = self._exit_codes.pop(pid, None)
        if rec.pid != pid or rec.phase not in ("starting", "ready", "spawning"):
            return
        reason = (
            rec.last_exit.reason
            if rec.last_exit and rec.last_exit.at > (rec.spawned_at or 0)
            else None
        )
        if reason is None:
            reason = _describe_exit(code)
        await self._after_exit(rec, code, reason)

    async def _after_exit(self, rec: ReplicaRecord, code: int | None, reason: str) -> None:
        """Apply the restart policy and the crash-loop budget to a replica that exited."""
        svc = self.graph.services.get(rec.component)
        if svc is None:
            return
        comp = self.component_record(rec.component)
        policy = svc.restart
        now = time.time()
        ran = now - rec.spawned_at if rec.spawned_at else 0.0
        rec.last_exit = ExitRecord(at=now, code=code, reason=reason)
        old_pid = rec.pid
        rec.pid = None
        rec.ready_at = None
        decision = restart_policy.decide(
            policy,
            exit_code=code,
            ran_s=ran,
            now=now,
            failures=comp.failures,
            consecutive_failures=rec.consecutive_failures,
        )
        comp.failures = list(decision.failures)
        rec.consecutive_failures = decision.consecutive_failures
        self.events.emit(
            "exit",
            component=rec.component,
            replica=rec.replica_id,
            reason=reason,
            details={"pid": old_pid, "exit_code": code, "ran_s": round(ran, 3)},
        )
        if decision.action is restart_policy.ExitAction.CRASHLOOP:
            await self._enter_crashloop(rec, comp, svc, reason)
        elif decision.action is restart_policy.ExitAction.RESTART:
            rec.phase = "backoff"
            rec.restart_at = now + decision.delay_s
            self._schedule_wake(decision.delay_s)
        else:
            rec.phase = "exited"
        await self.save()
        if rec.phase == "exited" and rec.reservation is not None:
            await self._release(rec, {old_pid} if old_pid else set())
            rec.reservation = None
            await self.save()
        self.wake()
        await self._notify()

    async def _enter_crashloop(
        self, rec: ReplicaRecord, comp: ComponentRecord, svc: Service, reason: str
    ) -> None:
        comp.crashloop = True
        comp.crashloop_spec = svc.spec_digest()
        comp.crashloops_total += 1
        window = svc.restart.crashloop_window_s
        comp.crashloop_reason = (
            f"{len(comp.failures)} failures within {window:g} s; last: {rec.replica_id} {reason}"
        )
        rec.phase = "exited"
        for other in self.state.replicas_of(rec.component):
            if other.phase == "backoff":
                other.phase = "exited"
                other.restart_at = None
        last_lines = await self.read_logs([rec], 20, "both")
        self.events.emit(
            "crashloop",
            component=rec.component,
            replica=rec.replica_id,
            reason=comp.crashloop_reason,
            outcome="failed",
            details={"last_lines": last_lines},
        )
        with standalone_step("crashloop", **{"dynamo.component": rec.component}) as span:
            span.set_attribute("error.type", "crashloop")
        for other in self.state.replicas_of(rec.component):
            if other.phase == "exited" and other.reservation is not None:
                await self._release(other, set())
                other.reservation = None
        op = self.ops.get(rec.component)
        if op is not None and not op.done:
            self.finish_op(op, "failed", f"crashloop: {comp.crashloop_reason}")

    def _schedule_wake(self, delay: float) -> None:
        asyncio.get_running_loop().call_later(max(delay, 0.0), self._wake.set)

    def begin_stop(self, rec: ReplicaRecord, op: ScaleOp | None, why: str) -> None:
        """Mark a replica stopping now (so no pass counts it as live) and stop it."""
        if rec.phase == "stopping" and rec.watcher in self._tasks:
            return
        was_ready = rec.phase == "ready"
        rec.phase = "stopping"
        self._launch(rec.watcher, self._stop(rec, op, why, was_ready), replace=True)

    async def _stop(
        self, rec: ReplicaRecord, op: ScaleOp | None, why: str, was_ready: bool = False
    ) -> None:
        """Drain, stop (SIGTERM to the group, then SIGKILL), remove the watcher, release."""
        svc = self.graph.services.get(rec.component)
        rec.phase = "stopping"
        await self.save()
        await self._notify()
        step = op.step if op else standalone_step
        attrs = {"dynamo_local.replica": rec.replica_id}
        pid = rec.pid
        pids = await asyncio.to_thread(_live_tree, pid, rec.create_time)
        if pid is not None:
            self._exit_watcher.unwatch(pid)
        with step("drain", **attrs):
            if self.hooks.before_stop is not None:
                # Out of discovery, then until its in-flight requests are done: the
                # discovery bridge owns the whole drain when it runs.
                await self._run_hook(self.hooks.before_stop, rec)
            elif svc is not None and svc.drain_s and was_ready:
                await asyncio.sleep(svc.drain_s)
        with step("stop", **attrs) as span:
            how = "not running"
            if pids and pid is not None:
                graceful = svc.graceful_stop_s if svc else 10.0
                how = await procs.terminate_group_async(pid, graceful)
            span.set_attribute("dynamo_local.stop", how)
            with contextlib.suppress(SupervisorUnavailable, CircusCommandError):
                await self.channel.call("rm", name=rec.watcher, waiting=True)
        if self.hooks.after_exit is not None:
            await self._run_hook(self.hooks.after_exit, rec)
        if rec.reservation is not None:
            with step("release", **attrs):
                await self._release(rec, pids)
        self.state.replicas.pop(rec.watcher, None)
        self._blocked.pop(rec.component, None)
        self.events.emit(
            "stop",
            component=rec.component,
            replica=rec.replica_id,
            reason=why,
            outcome="ok",
            details={"how": how},
            trace_id=op.trace_id if op else None,
        )
        await self.save()
        self.wake()

    async def _release(self, rec: ReplicaRecord, pids: set[int]) -> None:
        try:
            await self.resources.release(rec.replica_id, pids)
        except ConnectorError as exc:
            self.events.emit(
                "release",
                component=rec.component,
                replica=rec.replica_id,
                outcome="failed",
                reason=exc.message,
            )

    async def _supervisor_lost(self) -> None:
        """circusd died: its replicas died with it (parent-death signal). Start over."""
        if self._recover_supervisor is None:
            return
        self.events.emit("supervisor", outcome="failed", reason="circusd is gone; restarting it")
        for rec in self.state.replicas.values():
            if rec.pid is not None:
                self._exit_watcher.unwatch(rec.pid)
                await asyncio.to_thread(procs.kill_leftovers, rec.pid, rec.create_time)
        try:
            self.channel = await self._recover_supervisor()
        except ConnectorError as exc:
            self.events.emit("supervisor", outcome="failed", reason=exc.message)
            return
        now = time.time()
        for rec in list(self.state.replicas.values()):
            if rec.phase == "stopping":
                continue
            if rec.phase in ("starting", "ready", "spawning"):
                rec.phase = "backoff"
                rec.restart_at = now
                rec.pid = None
        self.events.emit("supervisor", outcome="ok", reason="circusd restarted")
        await self.save()

    # -------------------------------------------------------------- adoption

    async def adopt(self) -> dict[str, list[str]]:
        """Match persisted records with circusd's watchers after a connector restart."""
        report: dict[str, list[str]] = {"adopted": [], "stray": [], "lost": []}
        for problem in self.resources.restore_held_after_stop(self.state.held_after_stop):
            self.events.emit("adopt", outcome="failed", reason=f"held_after_stop {problem}")
        reply = await self.channel.call("list")
        ours = [w for w in reply.get("watchers", []) if w.startswith(self.watcher_prefix)]
        for watcher in ours:
            rec = self.state.replicas.get(watcher)
            pids = [int(p) for p in (await self.channel.call("list", name=watcher)).get("pids", [])]
            if rec is None or rec.component not in self.graph.services:
                report["stray"].append(watcher)
                for pid in pids:
                    await asyncio.to_thread(procs.terminate_group, pid, 5.0)
                with contextlib.suppress(CircusCommandError):
                    await self.channel.call("rm", name=watcher, waiting=True)
                continue
            if rec.reservation is not None:
                self.resources.adopt_dict(rec.reservation)
            alive = await asyncio.to_thread(procs.same_process, rec.pid, rec.create_time)
            if rec.pid in pids and alive:
                report["adopted"].append(rec.replica_id)
                pid = rec.pid
                assert pid is not None
                self._exit_watcher.watch(pid, self._exit_callback(watcher))
                if rec.phase == "stopping":
                    self._launch(watcher, self._stop(rec, None, "stop interrupted by restart"))
                    continue
                if rec.phase != "ready":
                    rec.phase = "starting"
                    self._launch(watcher, self._resume_probe(rec))
            else:
                report["lost"].append(rec.replica_id)
                rec.pid = None
                rec.phase = "backoff" if rec.phase != "stopping" else "stopping"
                rec.restart_at = time.time()
                if rec.phase == "stopping":
                    self._launch(watcher, self._stop(rec, None, "stop interrupted by restart"))
        for watcher, rec in list(self.state.replicas.items()):
            if watcher in ours:
                continue
            # The watcher is gone (circusd restarted): the process must not survive either.
            if rec.pid is not None:
                await asyncio.to_thread(procs.kill_leftovers, rec.pid, rec.create_time)
            report["lost"].append(rec.replica_id)
            if rec.phase == "stopping" or rec.component not in self.graph.services:
                self.state.replicas.pop(watcher)
                continue
            if rec.reservation is not None:
                self.resources.adopt_dict(rec.reservation)
            rec.pid = None
            rec.phase = "backoff"
            rec.restart_at = time.time()
        for name in self.graph.services:
            self.component_record(name)
        cleared = self._clear_crashloops_of_changed_specs()
        reason = None
        if cleared:
            report["crashloop_cleared"] = cleared
            reason = (
                f"crash loop cleared for {', '.join(cleared)}: the spec (command, args, env "
                "or resources) differs from the one that crash-looped"
            )
        self.events.emit("adopt", reason=reason, details=dict(report))
        await self.save()
        return report

    def _clear_crashloops_of_changed_specs(self) -> list[str]:
        """As Kubernetes resets CrashLoopBackOff on a new pod spec: a component whose spec
        changed since it crash-looped starts afresh. Its exited replicas are removed (their
        watchers hold the old command) and the next pass starts new ones."""
        cleared = []
        for name, svc in self.graph.services.items():
            comp = self.component_record(name)
            if not comp.crashloop or comp.crashloop_spec in (None, svc.spec_digest()):
                continue
            comp.crashloop = False
            comp.crashloop_reason = None
            comp.crashloop_spec = None
            comp.failures = []
            for rec in self.state.replicas_of(name):
                if rec.phase == "exited":
                    self.begin_stop(rec, None, "spec changed since the crash loop")
            cleared.append(name)
        return cleared

    def _probe_target(self, rec: ReplicaRecord, pid: int) -> ProbeTarget:
        """What a readiness probe needs of the replica's current process ``pid``."""
        reservation = self._reservation(rec)
        return ProbeTarget(
            replica_id=rec.replica_id,
            pid=pid,
            spawned_at=rec.spawned_at or time.time(),
            ports=dict(reservation.ports) if reservation else {},
            sockets=dict(reservation.sockets) if reservation else {},
            alive=lambda: rec.pid == pid and procs.same_process(pid, rec.create_time),
            gpu=reservation.gpu_fields() if reservation else None,
        )

    async def _resume_probe(self, rec: ReplicaRecord) -> None:
        svc = self.graph.services[rec.component]
        pid = rec.pid
        if pid is None:
            return
        target = self._probe_target(rec, pid)
        ready, _ = await wait_ready(
            target, svc.readiness, discovery_probe=self.hooks.discovery_probe
        )
        if ready and rec.pid == pid and rec.phase == "starting":
            rec.phase = "ready"
            rec.ready_at = time.time()
            await self.save()
            await self._notify()

    # ------------------------------------------------------- scale operations

    def unblock(self, name: str) -> None:
        """Forget that ``name``'s reservations failed at its target, so the next pass
        tries again (a restart asks for fresh replicas)."""
        self._blocked.pop(name, None)

    async def stop_all(self, why: str) -> None:
        """Drain and stop every replica concurrently, through the same path as a
        scale-down (what a shutdown does)."""
        stops = [
            self._stop(rec, None, why, rec.phase == "ready")
            for rec in list(self.state.replicas.values())
        ]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)

    def begin_op(
        self, name: str, target: int, *, kind: str, source: str, decision_id: int | None = None
    ) -> ScaleOp:
        previous = self.ops.get(name)
        if previous is not None and not previous.done:
            self.finish_op(previous, "superseded", f"superseded by a newer target {target}")
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
        recs = self.state.replicas_of(name)
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
        done = self._op_done.get(id(op))
        if done is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), timeout_s)
        if not op.done:
            self.finish_op(op, "timeout", f"not converged within {timeout_s:g} s")
        return op.outcome == "ok"

    async def _notify(self) -> None:
        for name, op in list(self.ops.items()):
            if not op.done and name in self.graph.services and self.converged(name):
                self.finish_op(op, "ok")
        async with self._changed:
            self._changed.notify_all()

    async def wait_changed(self, timeout_s: float) -> None:
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout_s)

    async def save(self) -> None:
        # What stopped replicas still hold (lingering processes, leaked GPUs) goes with
        # every save, so a restarted connector does not hand it out.
        self.state.held_after_stop = self.resources.held_after_stop()
        await self.store.save(self.state)

    # ---------------------------------------------------------------- reading

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


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exited (code unknown)"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"
