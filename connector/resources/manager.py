"""Resource inventory and all-or-nothing reservations: GPUs, CPU, memory, ports, sockets.

Every replica gets its resources here before its process starts and gives them back only
when they are really free: its processes are gone (psutil) and NVML lists none of its PIDs.
Processes that outlive the release timeout keep everything held (``lingering``) until they
exit. A GPU that stays busy past the release timeout, or whose processes NVML cannot list,
is marked ``leaked`` and is not handed out again until NVML shows it free.

``reserve`` is synchronous with no await inside, so on the event loop it is atomic; a lock
also makes it safe from threads. Nothing is ever over-allocated: a whole GPU has one holder,
fractions on one GPU sum to at most 1 and never share with a whole-GPU holder, and CPU cores
and memory stay within what the machine (and the connector's own affinity) offers.

Placement of N > 1 GPUs prefers a set connected by NVLink, then GPUs on one NUMA node, then
the lowest contiguous indices. GPUs that foreign processes (not ours) use beyond a memory
threshold are skipped, and so are GPUs in MIG mode (their MIG instances are not handed out;
a whole-GPU UUID would show the process no device). GPUs go to the process as
``CUDA_VISIBLE_DEVICES`` with UUIDs, because CUDA's index order can differ from NVML's.

Why this module is over 500 lines: handing out is one atomic decision under one lock
(GPUs, CPU, memory, ports and sockets together, with the refusal message naming what is
missing and who holds it), and it reads best in one place. The model and placement are in
:mod:`connector.resources.reservation`, taking resources back in :mod:`connector.resources.release`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import os
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from connector import defaults
from connector.errors import ResourcesExhausted
from connector.graph.model import PortSpec, ResourceRequest, SocketSpec
from connector.graph.quantities import approx_memory, format_memory
from connector.resources.nvml import GpuBackend, GpuDevice, open_gpu_backend
from connector.resources.release import ReleaseTracking
from connector.resources.reservation import (
    EPS,
    LISTED,
    SOCKET_PATH_LIMIT,
    UNSAFE_IN_NAME,
    Inventory,
    ReleaseResult,
    Reservation,
    ReservationAsk,
    gpu_amount,
    ordinal_of,
    place_gpus,
    plural,
    port_free,
    port_holder,
    probe_free_ports,
    short_uuid,
    visible_gpus,
)

__all__ = [
    "Inventory",
    "ReleaseResult",
    "Reservation",
    "ReservationAsk",
    "ResourceManager",
    "open_resource_manager",
    "visible_gpus",
]


class ResourceManager(ReleaseTracking):
    """Holds every replica's reservation; the only place resources are handed out.

    ``foreign_memory_threshold_bytes``: a GPU whose processes that are not ours use more
    GPU memory than this is skipped (known after :meth:`refresh`). ``release_timeout_s``:
    how long :meth:`release` waits for processes to exit and NVML to let go before marking
    a GPU leaked, polling NVML every ``release_poll_s``. ``on_event(kind, **fields)``
    receives ``leak`` and ``allocate`` events.
    """

    @classmethod
    async def create(
        cls,
        gpu_backend: GpuBackend | None,
        *,
        working_dir: Path,
        gpu_reason: str | None = None,
        **kwargs: Any,
    ) -> ResourceManager:
        """A manager over the detected inventory (NVML read in a thread); ``gpu_reason``
        says why ``gpu_backend`` is None; ``kwargs`` go to the constructor."""
        inventory = await asyncio.to_thread(Inventory.detect, gpu_backend, gpu_reason)
        return cls(inventory, working_dir=working_dir, gpu_backend=gpu_backend, **kwargs)

    # ---------------------------------------------------------------- queries

    def reservation(self, replica_id: str) -> Reservation | None:
        """What ``replica_id`` holds, or None."""
        with self._lock:
            return self._held.get(replica_id)

    def reservations(self) -> list[Reservation]:
        """Every reservation held, in the order they were made or adopted."""
        with self._lock:
            return list(self._held.values())

    # ------------------------------------------------------------ reservation

    def reserve(
        self,
        replica_id: str,
        component: str,
        request: ResourceRequest,
        ports: Sequence[PortSpec] = (),
        sockets: Sequence[SocketSpec] = (),
        *,
        probed: Collection[int] = (),
    ) -> Reservation:
        """Reserve everything one replica needs, or nothing.

        Raises :class:`ResourcesExhausted` naming what is missing and who holds it, with
        ``details`` (``needed``, ``free``, and ``holders`` for GPUs or ``kind`` for the
        rest). Synchronous with no await: atomic on the event loop, and locked for threads.
        A replica that already holds a reservation gets it back unchanged. Nothing is
        written to disk here: :meth:`prepare` does that before the process starts.
        ``probed``: ports :meth:`probe_ports` found bindable just before (in a thread), taken
        without binding them again here; any other port is bind-checked as it is picked.
        """
        with self._lock:
            existing = self._held.get(replica_id)
            if existing is not None:
                return existing
            label = f"{component} replica {ordinal_of(replica_id)}"
            gpus, fraction = self._pick_gpus(label, request.gpu)
            cores = self._check_cpu(label, request, gpus)
            self._check_memory(label, request.memory_bytes)
            port_map = self._pick_ports(label, ports, probed)
            socket_map = self._socket_paths(component, replica_id, sockets)
            env_names = {f"port.{p.name}": p.env for p in ports if p.env}
            env_names.update({f"socket.{s.name}": s.env for s in sockets if s.env})
            reservation = Reservation(
                replica_id=replica_id,
                component=component,
                gpus=gpus,
                gpu_fraction=fraction,
                cpu_cores=request.cpu,
                cpus=cores,
                memory_bytes=request.memory_bytes,
                ports=port_map,
                sockets=socket_map,
                env_names=env_names,
            )
            self._held[replica_id] = reservation
        return reservation

    def _usable(self, dev: GpuDevice) -> bool:
        return self._blocked_by(dev) is None

    def _blocked_by(self, dev: GpuDevice) -> str | None:
        """Why a GPU nobody of ours holds cannot be handed out, or None."""
        if dev.uuid in self._leaked:
            return "leaked"
        if dev.mig_mode:
            return "MIG mode"
        if self._foreign_busy.get(dev.uuid, 0) > self.foreign_threshold:
            return "foreign processes"
        return None

    def _exhausted(self, message: str, **details: Any) -> ResourcesExhausted:
        return ResourcesExhausted(message, **details)

    def _pick_gpus(self, label: str, amount: float) -> tuple[tuple[str, ...], float]:
        if amount <= 0:
            return (), 0.0
        if amount > 1 and amount != int(amount):
            # The graph loader refuses these; a caller building requests by hand may not.
            raise ValueError(f"gpu must be a fraction below 1 or a whole number, got {amount:g}")
        gpus = list(self.inventory.gpus)
        if not gpus:
            raise self._exhausted(
                f"{label} needs {gpu_amount(amount)}, 0 on this machine"
                f" ({self.inventory.gpu_reason or 'no GPU found'})",
                needed=amount,
                free=0,
                holders={},
            )
        if amount < 1:
            candidates = [
                g
                for g in gpus
                if self._usable(g)
                and self._whole_holder(g.uuid) is None
                and self._fraction_used(g.uuid) + amount <= 1 + EPS
            ]
            if not candidates:
                raise self._gpu_exhausted(label, amount, 0)
            # Best fit: the fullest GPU that still has room, so whole GPUs stay free.
            best = max(candidates, key=lambda g: (self._fraction_used(g.uuid), -g.index))
            return (best.uuid,), amount
        n = int(amount)
        free = [
            g
            for g in gpus
            if self._usable(g)
            and self._whole_holder(g.uuid) is None
            and self._fraction_used(g.uuid) == 0
        ]
        if len(free) < n:
            raise self._gpu_exhausted(label, n, len(free))
        return tuple(g.uuid for g in place_gpus(free, n)), 0.0

    def _gpu_exhausted(self, label: str, needed: float, free: int) -> ResourcesExhausted:
        holders: dict[str, list[str]] = {}
        parts: list[str] = []
        for g in self.inventory.gpus:
            who = self._holders(g.uuid)
            blocked = self._blocked_by(g)
            if who:
                holders[g.uuid] = who
                parts.append(f"{short_uuid(g.uuid)} held by {', '.join(who)}")
            elif blocked is not None:
                holders[g.uuid] = [blocked]
                parts.append(f"{short_uuid(g.uuid)} {self._blocked_phrase(g.uuid, blocked)}")
        message = f"{label} needs {gpu_amount(needed)}, {free} free"
        if parts:
            message += "; " + "; ".join(parts)
        return self._exhausted(message, needed=needed, free=free, holders=holders)

    def _blocked_phrase(self, uuid: str, blocked: str) -> str:
        if blocked == "leaked":
            leak = self._leaked[uuid]
            if leak.why == LISTED:
                return f"leaked by {leak.replica_id} (NVML still lists its processes)"
            return f"leaked by {leak.replica_id} (not shown free of its processes: {leak.why})"
        if blocked == "foreign processes":
            used = approx_memory(self._foreign_busy.get(uuid, 0))
            return f"busy with foreign processes ({used} of GPU memory)"
        return "in MIG mode (MIG instances are not handed out)"

    def _check_cpu(
        self, label: str, request: ResourceRequest, gpus: Sequence[str] = ()
    ) -> tuple[int, ...]:
        total = float(len(self.inventory.cpus))
        used = float(self._index.cpu)
        if request.cpu and used + request.cpu > total + EPS:
            raise self._exhausted(
                f"{label} needs {plural(request.cpu, 'CPU core')}, "
                f"{max(total - used, 0):g} of {total:g} unreserved",
                needed=request.cpu,
                free=max(total - used, 0),
                kind="cpu",
            )
        if not request.pin_cpus or not request.cpu:
            return ()
        pinned = self._index.pinned
        free = [c for c in self.inventory.cpus if c not in pinned]
        want = math.ceil(request.cpu)
        if len(free) < want:
            raise self._exhausted(
                f"{label} needs {plural(want, 'pinned CPU core')}, {len(free)} not pinned",
                needed=want,
                free=len(free),
                kind="cpu",
            )
        # Cores close to the replica's GPUs first (NVML's CPU affinity), when NVML says.
        near = self._gpu_affinity(gpus)
        free.sort(key=lambda c: (c not in near, c))
        return tuple(sorted(free[:want]))

    def _gpu_affinity(self, gpus: Sequence[str]) -> set[int]:
        by_uuid = {g.uuid: g for g in self.inventory.gpus}
        near: set[int] = set()
        for uuid in gpus:
            dev = by_uuid.get(uuid)
            if dev is None or dev.cpu_affinity is None:
                return set()
            near.update(dev.cpu_affinity)
        return near

    def _check_memory(self, label: str, amount: int) -> None:
        if not amount:
            return
        free = self.inventory.memory_bytes - self._index.memory
        if amount > free:
            raise self._exhausted(
                f"{label} needs {format_memory(amount)} of memory, "
                f"{approx_memory(max(free, 0))} unreserved",
                needed=amount,
                free=max(free, 0),
                kind="memory",
            )

    def _pick_ports(
        self, label: str, specs: Sequence[PortSpec], probed: Collection[int] = ()
    ) -> dict[str, int]:
        if not specs:
            return {}
        taken = self._index.ports
        lo, hi = self.port_range
        span = hi - lo + 1
        out: dict[str, int] = {}
        tried = 0
        port = self._next_port
        while len(out) < len(specs) and tried < span:
            tried += 1
            candidate = port
            port = lo + (port - lo + 1) % span
            if candidate in taken or candidate in out.values():
                continue
            if candidate not in probed and not port_free(candidate):
                continue
            out[specs[len(out)].name] = candidate
        if len(out) < len(specs):
            mine = sum(1 for p in taken if lo <= p <= hi)
            raise self._exhausted(
                f"{label} needs {plural(len(specs), 'port')}, {len(out)} free in {lo}-{hi} "
                f"({mine} held by replicas, the rest bound by other processes)",
                needed=len(specs),
                free=len(out),
                kind="ports",
            )
        self._next_port = port
        return out

    def probe_ports(self, count: int) -> frozenset[int]:
        """Up to ``count`` ports that the next reservations would pick and that bind now
        (no hold has them), for :meth:`reserve`'s ``probed``: the reconcile loop probes the
        ports of a scale of many replicas here, in a thread, instead of binding each on the
        event loop while it plans. Blocking (binds): call it in a thread."""
        if count <= 0:
            return frozenset()
        with self._lock:
            start = self._next_port
            taken = list(self._index.ports)
        return probe_free_ports(self.port_range, start, count, taken)

    def prepare(self, replica_id: str) -> tuple[Reservation | None, list[str]]:
        """Just before a replica's process (re)starts: its socket folder exists, no stale
        socket file sits at its paths (a process that died leaves its file behind, and
        binding an existing path fails), and its ports are still free
        (:meth:`recheck_ports`, whose result this returns). Blocking: call it in a thread.
        """
        held = self.reservation(replica_id)
        if held is not None and held.sockets:
            (self.working_dir / "sock").mkdir(parents=True, exist_ok=True)
            for path in held.sockets.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return self.recheck_ports(replica_id)

    def recheck_ports(self, replica_id: str) -> tuple[Reservation | None, list[str]]:
        """Before a replica's process (re)starts: are its reserved ports still free? A
        foreign process may have bound one since the reservation or the last exit. Each
        taken port moves to a free one in the range. Returns the reservation (a new one when
        a port moved; None for an unknown replica) and one line per move naming who holds
        the old port. Raises :class:`ResourcesExhausted` when no free port is left (the
        reservation is unchanged then). Blocking (binds, and psutil): call it in a thread.
        """
        with self._lock:
            held = self._held.get(replica_id)
        if held is None or not held.ports:
            return held, []
        # Bound outside the lock: the event loop takes it to reserve (a plan step of many
        # replicas), and threads checking replicas' ports under it held the loop back for
        # every bind of every replica ahead (tens of ms at 1,000 replicas of 4 ports).
        # SO_REUSEADDR as servers bind: only a listener (or a binder) counts as taken,
        # not the TIME_WAIT connections the replica's previous process left behind.
        taken = [name for name, port in held.ports.items() if not port_free(port, True)]
        if not taken:
            return held, []
        with self._lock:
            if self._held.get(replica_id) is not held:
                # Released or moved meanwhile (a stop, another check): nothing to move here.
                return self._held.get(replica_id), []
            label = f"{held.component} replica {ordinal_of(replica_id)}"
            moved = self._pick_ports(label, [PortSpec(name) for name in taken])
            updated = replace(held, ports={**held.ports, **moved})
            self._held[replica_id] = updated
        lines = [
            f"{replica_id}: port {name} {held.ports[name]} is taken by "
            f"{port_holder(held.ports[name])}; moved to {moved[name]}"
            for name in taken
        ]
        return updated, lines

    def _socket_paths(
        self, component: str, replica_id: str, specs: Sequence[SocketSpec]
    ) -> dict[str, str]:
        if not specs:
            return {}
        base = self.working_dir / "sock"
        held = self._index.sockets
        out: dict[str, str] = {}
        for spec in specs:
            name = f"{component.lower()}-{ordinal_of(replica_id)}-{spec.name}"
            path = base / f"{UNSAFE_IN_NAME.sub('_', name)}.sock"
            # Too long, or taken (components differing only in case): a hashed name.
            if len(os.fsencode(str(path))) >= SOCKET_PATH_LIMIT or str(path) in held:
                digest = hashlib.sha1(f"{replica_id}/{spec.name}".encode()).hexdigest()[:12]
                path = base / f"{digest}.sock"
            if len(os.fsencode(str(path))) >= SOCKET_PATH_LIMIT:
                raise self._exhausted(
                    f"working dir {self.working_dir} is too long for Unix socket paths "
                    f"(must stay under {SOCKET_PATH_LIMIT} bytes); use a shorter --working-dir",
                    working_dir=str(self.working_dir),
                    kind="sockets",
                )
            out[spec.name] = str(path)
        return out

    def reserve_many(
        self, asks: Sequence[ReservationAsk]
    ) -> tuple[list[Reservation], list[ResourcesExhausted]]:
        """Reserve for several replicas in order, each all-or-nothing: those that fit are
        kept (in order), the others reported, one error each; nothing is rolled back."""
        done: list[Reservation] = []
        failed: list[ResourcesExhausted] = []
        with self._lock:
            for ask in asks:
                replica_id, component, request, ports, sockets = ReservationAsk(*ask)
                try:
                    done.append(self.reserve(replica_id, component, request, ports, sockets))
                except ResourcesExhausted as exc:
                    failed.append(exc)
        return done, failed

    def reservation_from_dict(self, data: Mapping[str, Any]) -> Reservation:
        """:meth:`Reservation.from_dict` (for callers that only hold the manager)."""
        return Reservation.from_dict(data)

    def adopt(self, reservation: Reservation) -> Reservation:
        """Re-install a persisted reservation (connector restart) and return what is held.

        Idempotent: a replica already holding one keeps it. The reservation is installed
        even when it collides with another (its process holds those resources either way);
        the collision is reported as an ``allocate`` event so nothing passes silently.
        """
        with self._lock:
            held = self._held.get(reservation.replica_id)
            if held is not None:
                return held
            clash = self._collisions(reservation)
            self._held[reservation.replica_id] = reservation
        if clash:
            self._emit(
                "allocate",
                component=reservation.component,
                replica=reservation.replica_id,
                outcome="failed",
                reason=f"adopted {reservation.replica_id} overlaps: {'; '.join(clash)}",
                details={"collisions": clash},
            )
        return reservation

    def _collisions(self, r: Reservation) -> list[str]:
        """What ``r`` would share with the reservations held now (callers hold the lock)."""
        out = []
        for uuid in r.gpus:
            whole = self._whole_holder(uuid)
            fraction = self._fraction_used(uuid)
            if whole is not None:
                out.append(f"{short_uuid(uuid)} is held whole by {whole}")
            elif fraction and (not r.gpu_fraction or fraction + r.gpu_fraction > 1 + EPS):
                out.append(f"{short_uuid(uuid)} is {fraction:g} taken by fractions")
        # The index says whether anything clashes; the holders are looked up only then, so
        # adopting N replicas stays linear.
        if any(p in self._index.ports for p in r.ports.values()):
            ports = {p: who for who, o in self._holds() for p in o.ports.values()}
            out += [f"port {p} is held by {ports[p]}" for p in r.ports.values() if p in ports]
        if any(c in self._index.pinned for c in r.cpus):
            cpus = {c: who for who, o in self._holds() for c in o.cpus}
            out += [f"CPU {c} is pinned by {cpus[c]}" for c in r.cpus if c in cpus]
        return out

    def adopt_dict(self, data: Mapping[str, Any]) -> Reservation:
        """:meth:`adopt` a reservation in its :meth:`Reservation.to_dict` form."""
        return self.adopt(Reservation.from_dict(data))

    # ---------------------------------------------------------------- release

    # ------------------------------------------------------------ persistence

    # --------------------------------------------------------------- sampling

    @property
    def samples_gpus(self) -> bool:
        """Whether :meth:`refresh` reads anything (there is a GPU backend)."""
        return self.gpu_backend is not None

    def refresh(self, our_pids: Collection[int]) -> None:
        """Re-read NVML: how much GPU memory processes outside ``our_pids`` (every replica's
        process tree) use on each GPU, for the foreign-use check and the machine view.
        Blocking: call it in a thread."""
        if self.gpu_backend is None:
            return
        samples = self.gpu_backend.sample()
        with self._lock:  # lingering processes are a stopped replica's: ours, not foreign
            ours = set(our_pids).union(*(g.identities for g in self._lingering.values()))
        foreign = {
            s.uuid: sum(p.used_memory_bytes or 0 for p in s.processes if p.pid not in ours)
            for s in samples
        }
        with self._lock:
            self._last_sample = samples
            self._foreign_busy = foreign
            self._lists_processes.update(s.uuid for s in samples if s.processes_known)

    async def close(self) -> None:
        """Stop the leak watchers and releases still waiting (their reservations stay
        held, as persisted), and close the GPU backend."""
        for task in [*self._leak_tasks, *self._releases.values()]:
            task.cancel()
        if self.gpu_backend is not None:
            await asyncio.to_thread(self.gpu_backend.close)

    # ------------------------------------------------------------------- view

    def machine_view(self) -> dict[str, Any]:
        """The whole machine for the API, the status page and the exporter: per GPU its
        state (``free``, ``allocated``, ``leaked``), owners, fraction used, memory (used as of
        the last :meth:`refresh`), foreign use and MIG mode; CPU and memory budgets (lingering
        reservations included); ports and sockets per replica; the lingering reservations
        of stopped replicas whose processes still run. JSON-safe."""
        with self._lock:
            samples = {s.uuid: s for s in self._last_sample}
            gpus = []
            for g in self.inventory.gpus:
                owners = self._holders(g.uuid)
                state = "leaked" if g.uuid in self._leaked else ("allocated" if owners else "free")
                entry: dict[str, Any] = {
                    "index": g.index,
                    "uuid": g.uuid,
                    "name": g.name,
                    "state": state,
                    "owners": owners,
                    "fraction_used": round(
                        1.0 if self._whole_holder(g.uuid) else float(self._fraction_used(g.uuid)),
                        6,
                    ),
                    "memory_total_bytes": g.memory_total_bytes,
                    "foreign_memory_bytes": self._foreign_busy.get(g.uuid, 0),
                    "blocked_by_foreign": self._foreign_busy.get(g.uuid, 0)
                    > self.foreign_threshold,
                    "mig_mode": g.mig_mode,
                }
                sample = samples.get(g.uuid)
                if sample is not None and sample.memory_used_bytes is not None:
                    entry["memory_used_bytes"] = sample.memory_used_bytes
                gpus.append(entry)
            holds = [r for _, r in self._holds()]
            reserved_cores = sum(r.cpu_cores for r in holds)
            reserved_memory = sum(r.memory_bytes for r in holds)
            return {
                "gpus": gpus,
                # A GPU busy with foreign processes (or in MIG mode) is not allocated, but not
                # usable either.
                "free_gpus": sum(
                    1
                    for g, e in zip(self.inventory.gpus, gpus, strict=True)
                    if e["state"] == "free" and self._blocked_by(g) is None
                ),
                "gpu_backend": self.inventory.gpu_reason or "ok",
                "cpu": {
                    "allocatable_cores": float(len(self.inventory.cpus)),
                    "reserved_cores": reserved_cores,
                    "pinned": sorted(c for r in holds for c in r.cpus),
                },
                "memory": {
                    "allocatable_bytes": self.inventory.memory_bytes,
                    "reserved_bytes": reserved_memory,
                },
                "ports": {r.replica_id: dict(r.ports) for r in self._held.values() if r.ports},
                "sockets": {
                    r.replica_id: dict(r.sockets) for r in self._held.values() if r.sockets
                },
                "port_range": list(self.port_range),
                # Stopped replicas whose processes outlived the release: still holding.
                "lingering": [
                    {
                        "replica": g.reservation.replica_id,
                        "pids": sorted(g.identities),
                        "reservation": g.reservation.to_dict(),
                    }
                    for g in self._lingering.values()
                ],
            }


async def open_resource_manager(
    gpu_backend_spec: str,
    *,
    working_dir: Path,
    namespace: str,
    port_range: tuple[int, int] = defaults.PORT_RANGE,
    on_event: Callable[..., Any] | None = None,
    foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES,
    release_timeout_s: float = defaults.RELEASE_TIMEOUT_S,
) -> ResourceManager:
    """Open the GPU backend named by ``gpu_backend_spec`` (see
    :func:`connector.resources.nvml.open_gpu_backend`) and build a manager over the detected
    inventory; without a GPU the manager has none, and says why in its machine view."""
    backend, reason = await asyncio.to_thread(open_gpu_backend, gpu_backend_spec)
    del namespace  # paths are under the namespace's working dir already
    return await ResourceManager.create(
        backend,
        working_dir=working_dir,
        gpu_reason=reason,
        port_range=port_range,
        on_event=on_event,
        foreign_memory_threshold_bytes=foreign_memory_threshold_bytes,
        release_timeout_s=release_timeout_s,
    )
