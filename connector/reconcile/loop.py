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
import logging
import signal
import time
from collections.abc import Collection, Sequence

from connector.errors import (
    ResourcesExhausted,
    StateWriteFailed,
)
from connector.graph.quantities import approx_memory, format_memory
from connector.reconcile.adoption import Adoption
from connector.reconcile.base import (
    PLAN_AHEAD,
    PLAN_PACE_S,
    PLAN_STALL_S,
    PLAN_STEP,
    Hooks,
    PlanResult,
    ReplicaHook,
    ReservationLike,
    ResourceBroker,
)
from connector.reconcile.operations import ScaleOp
from connector.reconcile.state import ExitRecord, ReplicaRecord
from connector.supervision import procs
from connector.supervision.logs import (
    delete_log_files,
    list_log_folder,
    log_paths,
    stopped_log_files,
)

__all__ = [
    "PLAN_STEP",
    "Hooks",
    "PlanResult",
    "Reconciler",
    "ReplicaHook",
    "ReservationLike",
    "ResourceBroker",
]

log = logging.getLogger(__name__)


class Reconciler(Adoption):
    """The loop: observe, plan, act, requeue (level-triggered, idempotent)."""

    # Stopped replicas' log files are pruned at most this often (a folder listing each).
    LOG_PRUNE_S = 10.0

    def start(self) -> None:
        self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.resync_s)
            self._wake.clear()
            if self._closing:
                break
            try:
                await self.reconcile_once()
            except StateWriteFailed:
                pass  # the store logs it, once and then at most once a minute; next pass retries
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
        for task in [*self._background, *self._planning.values()]:
            task.cancel()
        for task in [*self._tasks.values(), *self._background, *self._planning.values()]:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._exit_watcher.close()

    async def reconcile_once(self) -> None:
        async with self._pass_lock:
            await self._observe()
            for name in self.graph.services:
                planning = self._planning.get(name)
                if (planning is not None and not planning.done()) or name in self._driving:
                    continue  # a scale's plan is under way, a step at a time
                await self.plan_steps(name, None, PlanResult(more=True))
            await self._stop_unknown_components()
        await self.save()
        await self._notify()
        await self._prune_stopped_logs()

    async def _prune_stopped_logs(self) -> None:
        """Delete the log files of stopped replicas beyond the newest
        ``LogPolicy.stopped_kept`` of each component: after a stop (or once after start,
        for what an earlier connector left), at most once per :attr:`LOG_PRUNE_S`."""
        now = time.monotonic()
        if not self._logs_stale or now - self._logs_pruned_at < self.LOG_PRUNE_S:
            return
        self._logs_stale, self._logs_pruned_at = False, now
        names = await asyncio.to_thread(list_log_folder, self.log_dir)
        # The records as they are *after* the listing: a file listed belongs to a replica
        # that has a record now or stopped before now (a record exists before its files
        # and goes only at its stop, and ordinals are never reused), so no live replica's
        # file is ever taken for a stopped one's.
        live = frozenset(self.state.replicas)
        prefix, keep = self.watcher_prefix, self.log_policy.stopped_kept

        def prune() -> int:
            return delete_log_files(self.log_dir, stopped_log_files(names, prefix, live, keep))

        if await asyncio.to_thread(prune):
            log.debug("deleted log files of stopped replicas in %s", self.log_dir)

    async def _observe(self) -> None:
        if self._circusd_alive is not None and not await asyncio.to_thread(self._circusd_alive):
            await self._supervisor_lost()
            return
        if self.resources.samples_gpus:
            # Who else uses each GPU (NVML), so busy GPUs are not handed out. Walking every
            # replica's process tree is only worth it when there are GPUs to sample.
            leaders = [r.pid for r in self.state.replicas.values() if r.pid is not None]

            def ours() -> set[int]:
                table = procs.process_tree()
                return {p for pid in leaders for p in table.of(pid)}

            await asyncio.to_thread(lambda: self.resources.refresh(ours()))
        watched = [
            (r.watcher, r.pid, r.create_time)
            for r in self.state.replicas.values()
            if r.phase in ("starting", "ready") and r.pid is not None
        ]
        if not watched:
            return
        running = await asyncio.to_thread(
            procs.running_as_recorded, [(pid, ct) for _, pid, ct in watched]
        )
        dead = [(w, pid) for w, pid, _ in watched if pid not in running]
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

        def rss() -> dict[str, int]:
            table = procs.process_tree()
            return {w: procs.tree_rss(pids[w], table) for w in limits}

        used = await asyncio.to_thread(rss)
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

    def live_count(self, name: str) -> int:
        """Replicas of ``name`` that count against its target (all but those stopping)."""
        return sum(
            1 for r in self.state.replicas.values() if r.component == name and r.phase != "stopping"
        )

    async def probe_ports_for(
        self, name: str, missing: int | None = None, limit: int = PLAN_STEP
    ) -> Collection[int]:
        """Free ports for the replicas ``name`` is about to start (``missing``, or what
        its target lacks now; at most ``limit``, a plan step), bind-checked in a thread:
        :meth:`plan` reserves them without binding each port on the event loop (1,000
        workers with 4 ports each are 4,000 binds, ~60 ms). A hint only: ``reserve`` still
        never hands out a held port, and a port bound meanwhile moves before the process
        starts (``prepare``)."""
        svc = self.graph.services[name]
        comp = self.component_record(name)
        if missing is None:
            if comp.crashloop or self._blocked.get(name) == comp.target:
                return ()
            missing = comp.target - self.live_count(name)
        missing = min(missing, limit)
        if not svc.ports or missing <= 0:
            return ()
        return await asyncio.to_thread(self.resources.probe_ports, missing * len(svc.ports))

    async def plan_steps(self, name: str, op: ScaleOp | None, result: PlanResult) -> PlanResult:
        """Go on with ``result`` (a plan's first step) a step of :data:`PLAN_STEP`
        replicas at a time, the loop free in between, until nothing is missing or a
        reservation is refused; returns the whole plan. Each step is one synchronous
        :meth:`plan` that re-reads the state, so whatever happened in between (a newer
        target, an exit) is planned from what is there: never more than the target. A
        scale's plan (``op``) goes at circusd's pace: a step once fewer than
        :data:`PLAN_AHEAD` of the component's replicas wait for their ``add`` (a step that
        stops replicas: :data:`PLAN_PACE_S` after the last)."""
        if op is not None:
            self._driving[name] = op
        try:
            while result.more and not result.refused and not self._closing:
                if op is not None:
                    await self._pace(name, op)
                    if op.done:
                        break  # superseded: the newer target has its own plan
                probed = await self.probe_ports_for(name)
                result.extend(self.plan(name, op, probed, limit=PLAN_STEP))
                await asyncio.sleep(0)
        finally:
            # A newer scale's plan may drive the component by now: it is its to clear.
            if op is not None and self._driving.get(name) is op:
                del self._driving[name]
        return result

    def _waiting_for_add(self, name: str) -> int:
        return sum(
            1 for r in self.state.replicas.values() if r.component == name and r.phase == "spawning"
        )

    async def _pace(self, name: str, op: ScaleOp) -> None:
        """Before a step that starts replicas: until fewer than PLAN_AHEAD of ``name``'s
        replicas wait for their ``add`` (or none has left for PLAN_STALL_S: a plan is never
        held up for good). Before a step that stops replicas: PLAN_PACE_S, no more. Stops
        are not counted: a stop may drain for seconds, and all drain together."""
        if self.component_record(name).target <= self.live_count(name):
            await asyncio.sleep(PLAN_PACE_S)
            return
        waiting = self._waiting_for_add(name)
        since = time.monotonic()
        while waiting >= PLAN_AHEAD and not op.done and not self._closing:
            await asyncio.sleep(PLAN_PACE_S)
            now_waiting = self._waiting_for_add(name)
            if now_waiting < waiting:
                since = time.monotonic()
            elif time.monotonic() - since > PLAN_STALL_S:
                return
            waiting = now_waiting

    def continue_plan(self, name: str, op: ScaleOp, first: PlanResult) -> None:
        """Run the rest of a plan whose first step is done in the background (a scale
        that does not wait): a refusal on the way settles the op as a scale that waited
        would (target lowered to what runs, ``partial``), announced by its events."""

        async def rest() -> None:
            result = await self.plan_steps(name, op, first)
            if result.refused and not op.done:
                self.settle_refused(name, op, result)
            await self.save()
            self.wake()

        task = asyncio.get_running_loop().create_task(rest())
        self._planning[name] = task
        task.add_done_callback(
            lambda t: self._planning.pop(name) if self._planning.get(name) is t else None
        )

    def settle_refused(
        self, name: str, op: ScaleOp, plan: PlanResult, before: int | None = None
    ) -> ResourcesExhausted:
        """A scale's reservations were refused (all, or past ``plan.started``): keep the
        target at what could be started, so nothing retries in a hot loop, finish the op
        ``partial`` or ``refused``, and return the error that says so."""
        svc = self.graph.services[name]
        comp = self.component_record(name)
        requested = op.target
        comp.target = max(self.live_count(name), svc.min_replicas)
        op.target = comp.target
        first = plan.refused[0]
        self.finish_op(op, "partial" if plan.started else "refused", first.message)
        return ResourcesExhausted(
            first.message,
            **{
                **first.details,
                "component": name,
                "requested": requested,
                "before": op.before if before is None else before,
                "started": plan.started,
                "target": comp.target,
            },
        )

    def plan(
        self,
        name: str,
        op: ScaleOp | None = None,
        probed: Collection[int] = (),
        limit: int | None = None,
    ) -> PlanResult:
        """Decide and launch what one component needs now. Synchronous: atomic on the loop.
        ``probed``: ports :meth:`probe_ports_for` found free, reserved without a bind here.
        ``limit``: start at most that many new replicas (``more`` says some are left)."""
        result = PlanResult()
        svc = self.graph.services[name]
        comp = self.component_record(name)
        recs = self.state.replicas_of(name)
        now = time.time()
        for rec in recs:
            # A start or stop whose task died half-way (its state write failed: disk full, a
            # read-only dir) has no task left: the record would stay spawning, starting or
            # stopping forever. A stop is finished; a start is tried again like a restart;
            # a replica whose process runs is probed again.
            if rec.watcher in self._tasks:
                continue
            if rec.phase == "stopping":
                self.begin_stop(rec, op, "an interrupted stop, resumed")
            elif rec.phase == "spawning" and not comp.crashloop:
                rec.phase = "backoff"
                rec.restart_at = now
            elif rec.phase == "starting" and self._exit_watcher.watching(rec.pid):
                self._launch(rec.watcher, self._resume_probe(rec))  # (not one that exited)
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
            if limit is not None and missing > limit:
                result.more = True
                missing = limit
            for _ in range(missing):
                ordinal = comp.next_ordinal
                replica_id = f"{name}/{ordinal}"
                try:
                    reservation = self.resources.reserve(
                        replica_id, name, svc.resources, svc.ports, svc.sockets, probed=probed
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
            if limit is not None and -missing > limit:
                result.more = True
                missing = -limit
            # Not-ready first, then newest.
            victims = sorted(live, key=lambda r: (r.phase == "ready", -r.ordinal))[:-missing]
            for rec in victims:
                result.stopping.append(rec.replica_id)
                self.begin_stop(rec, op, "scale down")
        return result

    async def stop_all(self, why: str) -> None:
        """Drain and stop every replica concurrently, through the same path as a
        scale-down (what a shutdown does)."""
        stops = [
            self._stop(rec, None, why, rec.phase == "ready")
            for rec in list(self.state.replicas.values())
        ]
        if stops:
            await asyncio.gather(*stops, return_exceptions=True)
