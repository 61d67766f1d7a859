"""Taking resources back: a stopped replica's reservation is released only once its
processes are gone and NVML lists none of its PIDs; processes that outlive the release
timeout keep it all held (lingering), GPUs NVML still shows busy are leaked until free,
and both survive a connector restart (``held_after_stop``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Collection, Coroutine, Mapping, Sequence
from typing import Any

from connector.resources.reservation import (
    LISTED,
    Leak,
    Lingering,
    ReleaseResult,
    Reservation,
    ResourceState,
    short_uuid,
)
from connector.supervision import procs


class ReleaseTracking(ResourceState):
    """Releases, lingering holds and leak watchers of a resource manager."""

    async def release(self, replica_id: str, pids: Collection[int]) -> ReleaseResult:
        """Give back a replica's resources once ``pids`` (its process tree) are gone (psutil)
        and, for GPUs, NVML lists none of them, both within ``release_timeout_s``.

        Until then the reservation stays held. Processes still running after the timeout
        (stuck in the driver, say) keep all of it held as *lingering*, reported by a
        ``leak`` event, until they exit. A GPU still listing them after the timeout, or one
        whose processes NVML cannot list, is marked ``leaked``, stays unallocatable, and
        becomes free again, with another event, once NVML shows it free. Empty ``pids``
        (the processes are known to be gone) release at once. Concurrent calls for one
        replica share one wait. An unknown replica is a no-op.
        """
        running = self._releases.get(replica_id)
        if running is not None:
            return await asyncio.shield(running)
        with self._lock:
            reservation = self._held.get(replica_id)
        if reservation is None:
            return ReleaseResult(replica_id, True)
        task = asyncio.get_running_loop().create_task(self._release(reservation, set(pids)))
        self._releases[replica_id] = task
        try:
            return await asyncio.shield(task)
        finally:
            if task.done():
                self._releases.pop(replica_id, None)
            else:  # we were cancelled; the release goes on and cleans up after itself
                task.add_done_callback(lambda _: self._releases.pop(replica_id, None))

    async def _release(self, reservation: Reservation, pid_set: set[int]) -> ReleaseResult:
        replica_id = reservation.replica_id
        deadline = time.monotonic() + self.release_timeout_s
        identities, gone = await asyncio.to_thread(self._wait_processes_gone, pid_set)
        if not gone:
            await self._linger(reservation, pid_set, identities)
            return ReleaseResult(replica_id, False)
        leaked = await self._free_gpus(reservation, pid_set, deadline)
        return ReleaseResult(replica_id, True, leaked)

    def _wait_processes_gone(self, pid_set: set[int]) -> tuple[dict[int, float], bool]:
        """Which of ``pid_set`` run, and whether they are gone within the release timeout:
        one thread hop (blocking: /proc), as a mass stop makes a thousand of them."""
        identities = procs.identify(pid_set)
        return identities, procs.wait_gone(identities, self.release_timeout_s)

    async def _free_gpus(
        self, reservation: Reservation, pid_set: set[int], deadline: float
    ) -> tuple[str, ...]:
        """The processes are gone: drop the reservation (wherever it is held), once NVML
        shows its GPUs free of them or ``deadline`` passes; the GPUs still busy then are
        marked leaked and watched. Returns those."""
        busy: dict[str, str] = {}
        if reservation.gpus and self.gpu_backend is not None and pid_set:
            busy = await self._wait_gpus_free(reservation.gpus, pid_set, deadline)
        with self._lock:
            if self._held.get(reservation.replica_id) is reservation:
                del self._held[reservation.replica_id]
            self._lingering.pop(id(reservation), None)
            self._leaked.update(
                {
                    u: Leak(reservation.component, reservation.replica_id, why, frozenset(pid_set))
                    for u, why in busy.items()
                }
            )
        for uuid, why in busy.items():
            self._leak_event(
                reservation.component,
                reservation.replica_id,
                "failed",
                f"{short_uuid(uuid)} {self._leak_phrase(uuid, why, reservation.replica_id)} "
                f"{self.release_timeout_s:g} s after release",
                gpu=uuid,
            )
            self._watch_leak(uuid)
        for path in reservation.sockets.values():
            with contextlib.suppress(FileNotFoundError):
                await asyncio.to_thread(os.unlink, path)
        return tuple(busy)

    async def _linger(
        self, reservation: Reservation, pid_set: set[int], identities: Mapping[int, float]
    ) -> None:
        """Processes outlived the release timeout: they may still use the ports, cores and
        GPUs, so everything stays held (as lingering) until they exit, then the GPUs get
        the usual NVML check."""
        replica_id = reservation.replica_id
        alive = sorted(await asyncio.to_thread(procs.running, identities))
        self._leak_event(
            reservation.component,
            replica_id,
            "failed",
            f"{replica_id}'s processes {', '.join(map(str, alive))} still run "
            f"{self.release_timeout_s:g} s after release; its resources stay held until "
            "they exit",
            pids=alive,
        )
        self._hold_lingering(Lingering(reservation, identities, frozenset(pid_set)))

    def _hold_lingering(self, lingering: Lingering) -> None:
        """Hold a lingering reservation and watch its processes; once they are gone its
        GPUs get the usual NVML check and everything is released."""
        reservation = lingering.reservation
        with self._lock:
            # Held to lingering in one step: never held nowhere, so never handed out meanwhile.
            if self._held.get(reservation.replica_id) is reservation:
                del self._held[reservation.replica_id]
            self._lingering[id(reservation)] = lingering

        async def watch() -> None:
            while True:  # psutil has no exit notification for processes not our children
                if not await asyncio.to_thread(procs.running, lingering.identities):
                    break
                await asyncio.sleep(self.leak_poll_s)
            self._leak_event(
                reservation.component,
                reservation.replica_id,
                "ok",
                f"{reservation.replica_id}'s processes exited; its resources are released",
                pids=sorted(lingering.identities),
            )
            deadline = time.monotonic() + self.release_timeout_s
            await self._free_gpus(reservation, set(lingering.pids), deadline)

        self._track(watch())

    async def _wait_gpus_free(
        self, uuids: Sequence[str], pids: set[int], deadline: float
    ) -> dict[str, str]:
        """The GPUs of ``uuids`` not shown free of ``pids`` at ``deadline``, with why (NVML
        is read at least once)."""
        while True:
            busy = await asyncio.to_thread(self._gpus_not_free, uuids, pids)
            if not busy or time.monotonic() >= deadline:
                return busy
            await asyncio.sleep(self.release_poll_s)

    def _gpus_not_free(self, uuids: Sequence[str], pids: set[int]) -> dict[str, str]:
        """Of ``uuids``, those NVML does not show free of ``pids``, each with why:
        ``listed`` (NVML lists one of them) or what kept NVML from saying."""
        assert self.gpu_backend is not None
        try:
            samples = self.gpu_backend.sample()
        except Exception as exc:  # any backend failure is "unknown", never "free"
            return dict.fromkeys(uuids, f"NVML failed: {exc}")
        busy: dict[str, str] = {}
        with self._lock:
            for s in samples:
                if s.uuid not in uuids:
                    continue
                if s.processes_known:
                    self._lists_processes.add(s.uuid)
                    if any(p.pid in pids for p in s.processes):
                        busy[s.uuid] = LISTED
                # A GPU NVML has never listed processes for (some drivers in VMs) is judged
                # by psutil alone; one that did list them before is not trusted empty now.
                elif s.uuid in self._lists_processes:
                    busy[s.uuid] = "NVML could not list its processes"
        return busy

    def _leak_phrase(self, uuid: str, why: str, replica_id: str) -> str:
        if why == LISTED:
            return f"still lists {replica_id}'s processes"
        return f"is not shown free of {replica_id}'s processes ({why})"

    def _watch_leak(self, uuid: str) -> None:
        """Poll NVML until the leaked GPU ``uuid`` is free of its replica's processes."""
        leak = self._leaked[uuid]

        async def watch() -> None:
            while True:
                await asyncio.sleep(self.leak_poll_s)
                if not await asyncio.to_thread(self._gpus_not_free, [uuid], set(leak.pids)):
                    break
            with self._lock:
                self._leaked.pop(uuid, None)
            self._leak_event(
                leak.component, leak.replica_id, "ok", f"{short_uuid(uuid)} is free again", gpu=uuid
            )

        self._track(watch())

    def _track(self, watcher: Coroutine[Any, Any, None]) -> None:
        """Run a leak watcher until it is done or :meth:`close` cancels it."""
        task = asyncio.get_running_loop().create_task(watcher)
        self._leak_tasks.add(task)
        task.add_done_callback(self._leak_tasks.discard)

    def held_after_stop(self) -> list[dict[str, Any]]:
        """What stopped replicas still hold, JSON-safe, for the connector's persisted state
        (read back by :meth:`restore_held_after_stop`): lingering reservations with their
        processes' start times, and leaked GPUs with the PIDs NVML was listing."""
        with self._lock:
            out: list[dict[str, Any]] = [
                {
                    "kind": "lingering",
                    "reservation": g.reservation.to_dict(),
                    "processes": {str(pid): t for pid, t in sorted(g.identities.items())},
                    "pids": sorted(g.pids),
                }
                for g in self._lingering.values()
            ]
            out += [
                {
                    "kind": "leaked",
                    "gpu": uuid,
                    "component": leak.component,
                    "replica": leak.replica_id,
                    "why": leak.why,
                    "pids": sorted(leak.pids),
                }
                for uuid, leak in self._leaked.items()
            ]
        return out

    def restore_held_after_stop(self, entries: Sequence[Mapping[str, Any]]) -> list[str]:
        """Hold again what :meth:`held_after_stop` persisted before a connector restart, and
        watch it as before: a lingering reservation is released once its processes are gone
        (at once if they already are), a leaked GPU once NVML shows it free. Call on the
        event loop. Returns a problem per entry that could not be read or names a GPU this
        machine no longer has (those are dropped)."""
        problems: list[str] = []
        known = {g.uuid for g in self.inventory.gpus}
        for n, entry in enumerate(entries):
            try:
                if entry["kind"] == "lingering":
                    identities = {int(p): float(t) for p, t in dict(entry["processes"]).items()}
                    self._hold_lingering(
                        Lingering(
                            Reservation.from_dict(entry["reservation"]),
                            identities,
                            frozenset(int(p) for p in entry["pids"]),
                        )
                    )
                elif entry["kind"] == "leaked":
                    uuid = str(entry["gpu"])
                    if uuid not in known:
                        problems.append(f"entry {n}: leaked GPU {uuid} is not on this machine")
                        continue
                    leak = Leak(
                        str(entry["component"]),
                        str(entry["replica"]),
                        str(entry["why"]),
                        frozenset(int(p) for p in entry["pids"]),
                    )
                    with self._lock:
                        self._leaked[uuid] = leak
                    self._watch_leak(uuid)
                else:
                    problems.append(f"entry {n}: unknown kind {entry['kind']!r}")
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                problems.append(f"entry {n}: unreadable ({type(exc).__name__}: {exc})")
        return problems

    def _leak_event(
        self, component: str, replica: str, outcome: str, reason: str, **details: Any
    ) -> None:
        # "leak" is the event catalog's kind (exporter/catalog.py EVENT_KINDS): "failed"
        # when something stays held past a release, "ok" when it is free again.
        self._emit(
            "leak",
            component=component,
            replica=replica,
            outcome=outcome,
            reason=reason,
            details=details,
        )
