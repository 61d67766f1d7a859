"""The replica actions: spawn (env, argv, Circus watcher), probe, exit handling with the
restart policy and crash loop, drain and stop, release, and recovery from a lost circusd.

About 500 lines: what is done to one replica, from its watcher's options to its release, is
one mixin of the :class:`~connector.reconcile.loop.Reconciler`; the decision after an exit
is the pure :mod:`connector.reconcile.restart_policy`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from connector.errors import (
    ConnectorError,
    ResourcesExhausted,
    SupervisorUnavailable,
)
from connector.graph import templates
from connector.graph.model import Service
from connector.reconcile import restart_policy
from connector.reconcile.base import (
    ExitedAtOnce,
    ReconcilerBase,
    ReservationLike,
    describe_exit,
)
from connector.reconcile.operations import ScaleOp, standalone_step
from connector.reconcile.state import ComponentRecord, ExitRecord, ReplicaRecord
from connector.supervision import procs
from connector.supervision.circus import CircusCommandError
from connector.supervision.launcher import launcher_prefix
from connector.supervision.logs import circus_stream_options
from connector.supervision.probes import ProbeTarget, wait_ready

log = logging.getLogger("connector.reconcile")

# How long an exit's handling waits for circusd's reap event (the exit code). circusd reaps
# every check_delay (0.25 s) when not busy; 1 s was once missed on a loaded machine, and
# the wait ends as soon as the event comes, so only an exit whose code never comes waits
# all of it.
REAP_WAIT_S = 2.0


async def _live_tree(pid: int | None, create_time: float | None) -> set[int]:
    """The pids of ``pid``'s tree while it is still the process we started (the walk is
    shared with the stops asked at the same moment; the identity check in a thread)."""
    if not pid:
        return set()
    members = await procs.tree_pids_async(pid)
    if not members:
        return set()
    same: bool = await asyncio.to_thread(procs.same_process, pid, create_time)
    return members if same else set()


class ReplicaActions(ReconcilerBase):
    """What the loop does to one replica."""

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
        """Make the replica's log files and its allocation usable right before its process
        (re)starts: stale socket files go, and ports a foreign process bound since they
        were reserved (or since its last exit) move, so it does not start only to fail on
        bind. True when a port moved: the record has the new ports and the old watcher,
        whose env names the old ones, is gone."""
        await self.log_files.make(rec.log_paths)
        if not rec.reservation:
            return False
        # Blocking (unlink, binds): in a thread.
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
        reply: dict[str, Any] | None = None
        if restart:
            try:
                reply = await self.channel.call("start", name=rec.watcher, waiting=True)
            except CircusCommandError:
                reply = None  # watcher gone (e.g. circusd was replaced): add it anew
        if reply is None:
            options: dict[str, Any] = {
                "env": self._replica_env(svc, rec, reservation),
                "copy_env": False,
                "respawn": False,  # restarts follow our backoff and crash-loop policy
                "numprocesses": 1,
                "graceful_timeout": svc.graceful_stop_s,
                "close_child_stdin": True,
                "working_dir": svc.working_dir or self.default_working_dir,
                **circus_stream_options(rec.log_paths, self.log_policy),
            }
            reply = await self.channel.call(
                "add",
                name=rec.watcher,
                cmd=argv[0],
                args=argv[1:],
                start=True,
                waiting=True,
                options=options,
            )
        # circusd answers a waited start (and an add with start) with the pids it started
        # ("started") or found running ("kept"): no `list` round trip per replica, which
        # took ~1.2 ms of the one serialized channel each. A circusd that answers
        # without them is asked.
        if "started" in reply or "kept" in reply:
            pids = [int(p) for p in (*reply.get("started", ()), *reply.get("kept", ()))]
        else:
            listed = await self.channel.call("list", name=rec.watcher)
            pids = [int(p) for p in listed.get("pids", [])]
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
                await self._after_exit(rec, code, "exited at once: " + describe_exit(code))
                return
            # OSError: the log folder or files could not be made (a full disk, a path
            # taken by a folder); circusd itself answered that as a failed add before the
            # files were made here, and a spawn that fails must not leave a traceback.
            except (SupervisorUnavailable, CircusCommandError, ResourcesExhausted, OSError) as exc:
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

    # The circus events the loop needs: only ``reap`` (a pidfd tells it of an exit sooner,
    # but not the exit code).
    CIRCUS_EVENTS = frozenset({"reap"})

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
        # circusd reaps within its check_delay and tells us the code; wait a while for it,
        # counted from the exit (what is done meanwhile does not shorten the wait).
        waiter = self._reaped.setdefault(pid, asyncio.Event())
        deadline = time.monotonic() + REAP_WAIT_S
        await procs.kill_leftovers_async(pid, rec.create_time)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiter.wait(), max(0.0, deadline - time.monotonic()))
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
            reason = describe_exit(code)
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
        drains = self.hooks.before_stop is not None or bool(svc and svc.drain_s and was_ready)
        # The tree is walked while the process is surely still ours: before a drain (which
        # may last seconds, and the process may end meanwhile), else once it has a slot.
        pids = await _live_tree(pid, rec.create_time) if drains else set()
        if pid is not None:
            self._exit_watcher.unwatch(pid)
        with step("drain", **attrs):
            if self.hooks.before_stop is not None:
                # Out of discovery, then until its in-flight requests are done: the
                # discovery bridge owns the whole drain when it runs.
                await self._run_hook(self.hooks.before_stop, rec)
            elif svc is not None and svc.drain_s and was_ready:
                await asyncio.sleep(svc.drain_s)
        async with self._stop_slots:
            if not drains:
                pids = await _live_tree(pid, rec.create_time)
            how = await self._terminate(rec, step, attrs, pids, walked=not drains)
        if rec.reservation is not None:
            with step("release", **attrs):
                await self._release(rec, pids)
        self.state.replicas.pop(rec.watcher, None)
        self._logs_stale = True  # its log files may go now (Reconciler._prune_stopped_logs)
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

    async def _terminate(
        self,
        rec: ReplicaRecord,
        step: Any,
        attrs: dict[str, Any],
        pids: set[int],
        walked: bool,
    ) -> str:
        """SIGTERM the group (SIGKILL after the grace period), remove the watcher; how it
        went: ``terminated``, ``killed`` or ``not running``. ``walked``: ``pids`` is the
        tree as walked a moment ago (no drain in between), so it is not walked again."""
        svc = self.graph.services.get(rec.component)
        pid = rec.pid
        with step("stop", **attrs) as span:
            how = "not running"
            if pids and pid is not None:
                graceful = svc.graceful_stop_s if svc else 10.0
                how = await procs.terminate_group_async(
                    pid, graceful, members=pids if walked else None
                )
            span.set_attribute("dynamo_local.stop", how)
            with contextlib.suppress(SupervisorUnavailable, CircusCommandError):
                await self.channel.call("rm", name=rec.watcher, waiting=True)
        if self.hooks.after_exit is not None:
            await self._run_hook(self.hooks.after_exit, rec)
        return how

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
        groups = [(r.pid, r.create_time) for r in self.state.replicas.values() if r.pid]
        for pid, _ in groups:
            self._exit_watcher.unwatch(pid)
        await asyncio.to_thread(procs.kill_groups, groups)  # one read of the table for all
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
