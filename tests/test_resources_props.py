"""Property: over random sequences of scale-ups (one, batched, concurrent from threads),
scale-downs, crashes, stops whose processes survive (lingering), and connector restarts on a
synthetic 8-GPU machine, nothing is ever over-allocated, a request is refused exactly when it
cannot fit, what the manager holds for replicas is exactly what the live replicas hold (the
model), and what stopped replicas' surviving processes hold stays held, across restarts,
until they exit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import shutil
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    multiple,
    rule,
)

from connector.errors import ResourcesExhausted
from connector.graph.model import PortSpec, ResourceRequest, SocketSpec
from connector.resources.manager import (
    Inventory,
    ReleaseResult,
    Reservation,
    ReservationAsk,
    ResourceManager,
)
from connector.resources.nvml import FakeGpuBackend
from tests.nvml_fakes import eight_gpu_backend
from tests.test_resources import dead_pid, free_run, reap_zombies

GIB = 1 << 30
CPUS = tuple(range(8))
MEMORY = 16 * GIB
FOREIGN_GPU = 7  # a process that is not ours uses 3 GiB there: never handed out
EPS = 1e-9
RELEASE_TIMEOUT_S = 5.0
STUCK_TIMEOUT_S = 0.05  # how long a release waits for processes that will not exit
STUCK_HOLDER = " (stopped; processes still running)"
T = TypeVar("T")

requests = st.builds(
    ResourceRequest,
    gpu=st.sampled_from([0, 0, 0.25, 0.5, 0.75, 1, 1, 2, 3]),
    cpu=st.sampled_from([0, 0, 0.5, 1, 2]),
    memory_bytes=st.sampled_from([0, 0, GIB, 3 * GIB]),
    pin_cpus=st.booleans(),
)
components = st.sampled_from(["Decode", "Prefill", "Frontend"])
Ask = tuple[str, ResourceRequest, int, int]  # component, request, ports, sockets
asks = st.tuples(components, requests, st.integers(0, 2), st.integers(0, 1))


def port_specs(n: int) -> list[PortSpec]:
    return [PortSpec(f"p{i}", env=f"P{i}_PORT") for i in range(n)]


def socket_specs(n: int) -> list[SocketSpec]:
    return [SocketSpec(f"s{i}") for i in range(n)]


class Allocation(RuleBasedStateMachine):
    replicas = Bundle("replicas")
    stuck = Bundle("stuck")

    def __init__(self) -> None:
        super().__init__()
        # One loop for the whole run, in a thread: the manager's watchers (lingering
        # processes, leaked GPUs) outlive the rule that started them.
        self.loop = asyncio.new_event_loop()
        self.loop_thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.loop_thread.start()
        self.dir = Path(tempfile.mkdtemp(prefix="rp-", dir="/tmp"))
        self.backend: FakeGpuBackend = eight_gpu_backend()
        self.backend.add_process(FOREIGN_GPU, 424242, 3 * GIB)
        self.first_port = free_run(40)
        self.manager = self.new_manager()
        self.model: dict[str, Reservation] = {}
        # Stopped replicas whose processes still run: by PID, what they still hold.
        self.lingering: dict[int, Reservation] = {}
        self.sleepers: dict[int, subprocess.Popen[bytes]] = {}
        self.ordinals: Counter[str] = Counter()
        self.exited_pid = dead_pid()  # one exited process per run, its PID kept from reuse

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def new_manager(self) -> ResourceManager:
        inventory = Inventory(gpus=tuple(self.backend.devices()), cpus=CPUS, memory_bytes=MEMORY)
        manager = ResourceManager(
            inventory,
            working_dir=self.dir,
            port_range=(self.first_port, self.first_port + 39),
            gpu_backend=self.backend,
            release_timeout_s=RELEASE_TIMEOUT_S,
            release_poll_s=0.005,
            leak_poll_s=0.01,
        )
        manager.refresh(our_pids=set())  # sees the foreign process, as the core does
        return manager

    def teardown(self) -> None:
        for proc in self.sleepers.values():
            proc.kill()
            proc.wait()
        self.run(self.manager.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.loop_thread.join(10)
        self.loop.close()
        reap_zombies()
        shutil.rmtree(self.dir, ignore_errors=True)

    # ------------------------------------------------------------------ model

    def next_id(self, component: str) -> str:
        self.ordinals[component] += 1
        return f"{component}/{self.ordinals[component]}"

    def fits(self, request: ResourceRequest) -> bool:
        """Whether the model says the request fits (ports aside: the OS decides those)."""
        held = [*self.model.values(), *self.lingering.values()]
        uuids = [g.uuid for g in self.manager.inventory.gpus]
        usable = [u for i, u in enumerate(uuids) if i != FOREIGN_GPU]
        whole = {u for r in held if not r.gpu_fraction for u in r.gpus}
        frac = {u: sum(r.gpu_fraction for r in held if u in r.gpus) for u in uuids}
        if request.gpu >= 1:
            free = [u for u in usable if u not in whole and frac[u] == 0]
            gpu_ok = len(free) >= int(request.gpu)
        elif request.gpu > 0:
            gpu_ok = any(u not in whole and frac[u] + request.gpu <= 1 + EPS for u in usable)
        else:
            gpu_ok = True
        cores = sum(r.cpu_cores for r in held)
        cpu_ok = not request.cpu or cores + request.cpu <= len(CPUS) + EPS
        if cpu_ok and request.pin_cpus and request.cpu:
            pinned = {c for r in held for c in r.cpus}
            cpu_ok = len(CPUS) - len(pinned) >= math.ceil(request.cpu)
        memory_ok = sum(r.memory_bytes for r in held) + request.memory_bytes <= MEMORY
        return gpu_ok and cpu_ok and memory_ok

    def check_granted(self, r: Reservation, component: str, ask: Ask) -> None:
        _, request, ports, sockets = ask
        assert r.component == component
        if request.gpu >= 1:
            assert (len(r.gpus), r.gpu_fraction) == (int(request.gpu), 0.0)
        elif request.gpu > 0:
            assert (len(r.gpus), r.gpu_fraction) == (1, request.gpu)
        else:
            assert (r.gpus, r.gpu_fraction) == ((), 0.0)
        assert (r.cpu_cores, r.memory_bytes) == (request.cpu, request.memory_bytes)
        pins = math.ceil(request.cpu) if request.pin_cpus and request.cpu else 0
        assert len(r.cpus) == pins
        assert sorted(r.ports) == [f"p{i}" for i in range(ports)]
        assert sorted(r.sockets) == [f"s{i}" for i in range(sockets)]
        assert r.env()["CUDA_VISIBLE_DEVICES"] == ",".join(r.gpus)

    def reserve_one(self, replica_id: str, ask: Ask) -> None:
        component, request, ports, sockets = ask
        fits = self.fits(request)
        try:
            r = self.manager.reserve(
                replica_id, component, request, port_specs(ports), socket_specs(sockets)
            )
        except ResourcesExhausted as exc:
            assert self.manager.reservation(replica_id) is None
            # Refused exactly when it does not fit, or when the OS has no port left.
            assert not fits or exc.details.get("kind") == "ports", exc.message
            event(f"refused: {exc.details.get('kind', 'gpu')}")
            return
        assert fits, f"{replica_id} {request} was granted but does not fit"
        self.check_granted(r, component, ask)
        self.model[replica_id] = r
        event("granted")

    # ------------------------------------------------------------------ rules

    @initialize()
    def start(self) -> None:
        assert self.model == {}

    def never_granted(self, replica_id: str) -> bool:
        """Whether ``replica_id`` was refused; releasing it is then a no-op.

        Every scale-up puts every id it asked for into the bundle, granted or not: which
        of concurrent asks win depends on thread timing, and a bundle whose size depends on
        it makes Hypothesis's replays draw differently (FlakyStrategyDefinition)."""
        if replica_id in self.model:
            return False
        assert self.manager.reservation(replica_id) is None
        result = self.run(self.manager.release(replica_id, {self.exited_pid}))
        assert result == ReleaseResult(replica_id, True)
        event("release of a refused replica: no-op")
        return True

    @rule(target=replicas, ask=asks)
    def scale_up_one(self, ask: Ask) -> object:
        replica_id = self.next_id(ask[0])
        self.reserve_one(replica_id, ask)
        return replica_id

    @rule(target=replicas, batch=st.lists(asks, min_size=1, max_size=3))
    def scale_up_many(self, batch: list[Ask]) -> object:
        ids = [self.next_id(component) for component, *_ in batch]
        done, failed = self.manager.reserve_many(
            [
                ReservationAsk(rid, c, req, port_specs(p), socket_specs(s))
                for rid, (c, req, p, s) in zip(ids, batch, strict=True)
            ]
        )
        assert len(done) + len(failed) == len(batch)
        by_id = dict(zip(ids, batch, strict=True))
        for r in done:
            self.check_granted(r, by_id[r.replica_id][0], by_id[r.replica_id])
            self.model[r.replica_id] = r
        return multiple(*ids)

    @rule(target=replicas, batch=st.lists(asks, min_size=2, max_size=4))
    def scale_up_concurrently(self, batch: list[Ask]) -> object:
        ids = [self.next_id(component) for component, *_ in batch]

        def one(rid: str, ask: Ask) -> Reservation | None:
            c, req, p, s = ask
            try:
                return self.manager.reserve(rid, c, req, port_specs(p), socket_specs(s))
            except ResourcesExhausted:
                return None

        with concurrent.futures.ThreadPoolExecutor(len(batch)) as pool:
            got = list(pool.map(one, ids, batch))
        for rid, ask, r in zip(ids, batch, got, strict=True):
            if r is not None:
                self.check_granted(r, ask[0], ask)
                self.model[rid] = r
        return multiple(*ids)

    @rule(replica_id=consumes(replicas))
    def scale_down(self, replica_id: str) -> None:
        if self.never_granted(replica_id):
            return
        # The replica's process has exited; NVML never listed it.
        result = self.run(self.manager.release(replica_id, {self.exited_pid}))
        assert (result.processes_gone, result.leaked_gpus) == (True, ())
        del self.model[replica_id]

    @rule(replica_id=consumes(replicas))
    def crash(self, replica_id: str) -> None:
        # The replica was killed; the driver still lists its PID on its GPUs for a moment.
        # Its GPUs stay held until NVML lets go, then everything is given back.
        if self.never_granted(replica_id):
            return
        pid = self.exited_pid
        index = {g.uuid: g.index for g in self.manager.inventory.gpus}
        gpus = self.model[replica_id].gpus
        for uuid in gpus:
            self.backend.add_process(index[uuid], pid, GIB)

        async def release_after_kill() -> ReleaseResult:
            release = asyncio.create_task(self.manager.release(replica_id, {pid}))
            if gpus:
                await asyncio.sleep(0.01)
                # Not before NVML lets go (whatever the timing: it still lists the PID).
                assert not release.done()
                assert self.manager.reservation(replica_id) == self.model[replica_id]
            self.backend.remove_pid(pid)
            return await release

        event("crash: NVML listed the PID" if gpus else "crash: no GPU")
        result = self.run(release_after_kill())
        assert (result.processes_gone, result.leaked_gpus) == (True, ())
        del self.model[replica_id]

    @rule(target=stuck, replica_id=consumes(replicas))
    def stop_but_its_processes_survive(self, replica_id: str) -> object:
        # Stuck in the driver, say: SIGKILL did not end it within the release timeout.
        proc = subprocess.Popen(["sleep", "120"])
        self.sleepers[proc.pid] = proc
        if self.never_granted(replica_id):
            return proc.pid  # a stray sleeper: the bundle gets a PID either way
        self.manager.release_timeout_s = STUCK_TIMEOUT_S
        try:
            result = self.run(self.manager.release(replica_id, {proc.pid}))
        finally:
            self.manager.release_timeout_s = RELEASE_TIMEOUT_S
        assert (result.processes_gone, result.leaked_gpus) == (False, ())
        assert self.manager.reservation(replica_id) is None
        self.lingering[proc.pid] = self.model.pop(replica_id)
        event("stuck: lingering")
        return proc.pid

    @rule(pid=consumes(stuck))
    def stuck_processes_exit(self, pid: int) -> None:
        proc = self.sleepers.pop(pid)
        proc.kill()
        proc.wait()
        deadline = time.monotonic() + 10
        while any(pid in g["pids"] for g in self.manager.machine_view()["lingering"]):
            assert time.monotonic() < deadline, f"{pid} exited but its resources stay held"
            time.sleep(0.01)
        self.lingering.pop(pid, None)  # absent for a refused replica's stray sleeper

    @rule()
    def restart_connector(self) -> None:
        saved = [json.dumps(r.to_dict()) for r in self.manager.reservations()]
        after_stop = json.dumps(self.manager.held_after_stop())
        self.run(self.manager.close())
        self.manager = self.new_manager()
        for text in saved:
            self.manager.adopt_dict(json.loads(text))

        async def restore() -> list[str]:
            return self.manager.restore_held_after_stop(json.loads(after_stop))

        assert self.run(restore()) == []

    # ------------------------------------------------------------- invariants

    @invariant()
    def held_is_exactly_the_live_replicas(self) -> None:
        assert {r.replica_id: r for r in self.manager.reservations()} == self.model

    def lingering_holds(self) -> list[Reservation]:
        view = self.manager.machine_view()
        return [Reservation.from_dict(g["reservation"]) for g in view["lingering"]]

    @invariant()
    def surviving_processes_keep_what_their_replica_held(self) -> None:
        by_pid = {g["pids"][0]: g for g in self.manager.machine_view()["lingering"]}
        assert sorted(by_pid) == sorted(self.lingering)
        for pid, r in self.lingering.items():
            assert Reservation.from_dict(by_pid[pid]["reservation"]) == r

    @invariant()
    def never_over_allocated(self) -> None:
        held = [*self.manager.reservations(), *self.lingering_holds()]
        whole = [u for r in held if not r.gpu_fraction for u in r.gpus]
        assert len(whole) == len(set(whole)), "a whole GPU handed out twice"
        for uuid in {u for r in held for u in r.gpus}:
            fraction = sum(r.gpu_fraction for r in held if uuid in r.gpus)
            assert fraction <= 1 + EPS
            assert uuid not in whole or fraction == 0, "a fraction shares a whole GPU"
        foreign = self.manager.inventory.gpus[FOREIGN_GPU].uuid
        assert all(foreign not in r.gpus for r in held)
        assert sum(r.cpu_cores for r in held) <= len(CPUS) + EPS
        pinned = [c for r in held for c in r.cpus]
        assert len(pinned) == len(set(pinned)) and set(pinned) <= set(CPUS)
        assert sum(r.memory_bytes for r in held) <= MEMORY
        ports = [p for r in held for p in r.ports.values()]
        assert len(ports) == len(set(ports)), "a port handed out twice"
        lo, hi = self.manager.port_range
        assert all(lo <= p <= hi for p in ports)
        sockets = [s for r in held for s in r.sockets.values()]
        assert len(sockets) == len(set(sockets))
        assert all(len(s.encode()) < 100 for s in sockets)

    @invariant()
    def the_view_agrees(self) -> None:
        view = self.manager.machine_view()
        owners = {g["uuid"]: sorted(g["owners"]) for g in view["gpus"]}
        for g in self.manager.inventory.gpus:
            expected = sorted(
                [r.replica_id for r in self.model.values() if g.uuid in r.gpus]
                + [r.replica_id + STUCK_HOLDER for r in self.lingering.values() if g.uuid in r.gpus]
            )
            assert owners[g.uuid] == expected
        blocked = {g["uuid"] for g in view["gpus"] if g["blocked_by_foreign"]}
        assert view["free_gpus"] == sum(1 for u, v in owners.items() if not v and u not in blocked)
        assert view["cpu"]["reserved_cores"] == pytest.approx(
            sum(r.cpu_cores for r in [*self.model.values(), *self.lingering.values()])
        )


Allocation.TestCase.settings = settings(
    max_examples=50, stateful_step_count=25, deadline=None, database=None
)
TestAllocation = Allocation.TestCase
