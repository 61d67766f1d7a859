"""Resource manager: inventory, all-or-nothing reservations, placement, budgets, ports,
sockets, release after exit and leak detection, on NVML fakes built from real captures."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import pytest

from connector.errors import ResourcesExhausted
from connector.graph.model import PortSpec, ResourceRequest, SocketSpec
from connector.resources.manager import (
    Inventory,
    ReleaseResult,
    Reservation,
    ReservationAsk,
    ResourceManager,
    open_resource_manager,
    visible_gpus,
)
from connector.resources.nvml import GpuBackend, GpuDevice
from connector.supervision import procs
from tests.nvml_fakes import (
    H100_CAPTURE,
    H100_MEMORY_TOTAL,
    H100_NAME,
    H100_UUID,
    capture_path,
    eight_gpu_backend,
    h100_backend,
)

CPUS = tuple(range(8))
MEMORY = 16 << 30
GIB = 1 << 30
# The 8-GPU machine's UUIDs: copies of the H100 with the first group shifted by the index.
U = [f"GPU-{0x3916ACBF + i:08x}-4032-fd78-3a4f-848162f95acf" for i in range(8)]
GPU1 = ResourceRequest(gpu=1)
GPU2 = ResourceRequest(gpu=2)
HALF = ResourceRequest(gpu=0.5)


class Recorded(list[tuple[str, dict[str, Any]]]):
    """The events a manager emitted, in order: pass it as ``on_event``."""

    def __call__(self, kind: str, **fields: Any) -> None:
        self.append((kind, fields))


# A release that gives up on processes and NVML quickly, and watchers that poll often.
QUICK_RELEASE: dict[str, float] = {"release_timeout_s": 0.2, "leak_poll_s": 0.05}


def make_manager(
    working_dir: Path,
    backend: GpuBackend | None = None,
    *,
    cpus: tuple[int, ...] = CPUS,
    memory: int = MEMORY,
    gpu_reason: str | None = None,
    **kw: Any,
) -> ResourceManager:
    """A manager over ``backend``'s GPUs with a fixed CPU and memory budget."""
    inventory = Inventory(
        gpus=tuple(backend.devices()) if backend is not None else (),
        cpus=cpus,
        memory_bytes=memory,
        gpu_reason=gpu_reason,
    )
    return ResourceManager(inventory, working_dir=working_dir, gpu_backend=backend, **kw)


def manager_over(
    working_dir: Path, devices: list[GpuDevice], backend: GpuBackend | None = None, **kw: Any
) -> ResourceManager:
    """A manager over edited devices (MIG mode, CPU affinity) of a fake machine."""
    inventory = Inventory(gpus=tuple(devices), cpus=CPUS, memory_bytes=MEMORY)
    return ResourceManager(inventory, working_dir=working_dir, gpu_backend=backend, **kw)


def gpus_of(manager: ResourceManager) -> dict[str, tuple[int, ...]]:
    """Replica -> the NVML indices of its GPUs."""
    index = {g.uuid: g.index for g in manager.inventory.gpus}
    return {r.replica_id: tuple(index[u] for u in r.gpus) for r in manager.reservations()}


def exhausted(fn: Callable[[], object]) -> ResourcesExhausted:
    with pytest.raises(ResourcesExhausted) as info:
        fn()
    return info.value


def bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_run(n: int) -> int:
    """The first of ``n`` consecutive ports that are free now."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = int(s.getsockname()[1])
        if first + n <= 65535 and all(bindable(first + i) for i in range(n)):
            return first
    raise AssertionError(f"no run of {n} free ports found")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A working dir short enough for plain socket paths (tmp_path can be long)."""
    path = Path(tempfile.mkdtemp(prefix="rm-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def no_cuda_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


# --------------------------------------------------------------------------- inventory


def test_detect_reads_gpus_cpus_and_memory(no_cuda_env: None) -> None:
    inv = Inventory.detect(h100_backend())
    assert [(g.index, g.uuid, g.name) for g in inv.gpus] == [(0, H100_UUID, H100_NAME)]
    assert inv.cpus == tuple(sorted(os.sched_getaffinity(0)))
    assert inv.memory_bytes == psutil.virtual_memory().total
    assert inv.gpu_reason is None


def test_detect_without_a_backend_keeps_the_reason(no_cuda_env: None) -> None:
    inv = Inventory.detect(None, "NVML library not found (no NVIDIA driver)")
    assert (inv.gpus, inv.gpu_reason) == ((), "NVML library not found (no NVIDIA driver)")


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("1,3", (1, 3)),
        (f"{U[6]},{U[2]}", (2, 6)),  # UUIDs, as CUDA takes them; NVML order kept
        (" 0 , 7 ", (0, 7)),
        ("", ()),
        ("9", ()),
    ],
)
def test_cuda_visible_devices_limits_what_is_handed_out(
    monkeypatch: pytest.MonkeyPatch, visible: str, indices: tuple[int, ...]
) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    inv = Inventory.detect(eight_gpu_backend())
    assert tuple(g.index for g in inv.gpus) == indices
    if not indices:
        assert inv.gpu_reason == f"CUDA_VISIBLE_DEVICES={visible!r} leaves no GPU to hand out"
    else:
        assert inv.gpu_reason is None


def test_cuda_visible_devices_unset_leaves_all_gpus(no_cuda_env: None) -> None:
    assert len(Inventory.detect(eight_gpu_backend()).gpus) == 8


@pytest.mark.parametrize(
    ("visible", "indices"),
    [
        ("GPU-3916acc1", (2,)),  # a UUID prefix naming one GPU, as CUDA allows
        ("3,GPU-3916acc,5", (3,)),  # a prefix naming several is invalid, and hides what follows
        ("0,2,-1,1", (0, 2)),  # CUDA hides an invalid entry and everything after it
        ("4,4", (4,)),
        (f"MIG-{U[5][4:]}/1/0,6", (6,)),  # MIG instances are not handed out: skipped
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(
    visible: str, indices: tuple[int, ...]
) -> None:
    devices = eight_gpu_backend().devices()
    assert tuple(g.index for g in visible_gpus(devices, visible)) == indices
    inv = Inventory.detect(eight_gpu_backend(), environ={"CUDA_VISIBLE_DEVICES": visible})
    assert tuple(g.index for g in inv.gpus) == indices


async def test_open_resource_manager_with_the_fake_and_without_gpus(
    tmp_path: Path, no_cuda_env: None
) -> None:
    manager = await open_resource_manager(
        f"fake:{capture_path(H100_CAPTURE)}", working_dir=tmp_path, namespace="t"
    )
    try:
        assert [g.uuid for g in manager.inventory.gpus] == [H100_UUID]
        assert manager.machine_view()["gpu_backend"] == "ok"
    finally:
        await manager.close()
    manager = await open_resource_manager("none", working_dir=tmp_path, namespace="t")
    assert manager.inventory.gpus == ()
    assert manager.machine_view()["gpu_backend"] == "GPU backend disabled (gpu backend 'none')"
    error = exhausted(lambda: manager.reserve("Decode/1", "Decode", GPU1))
    assert error.message == (
        "Decode replica 1 needs 1 GPU, 0 on this machine "
        "(GPU backend disabled (gpu backend 'none'))"
    )
    assert error.details == {"needed": 1, "free": 0, "holders": {}}
    await manager.close()


# --------------------------------------------------------------------------- one H100


def test_one_h100_one_holder_and_who_holds_it(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False))
    r = m.reserve("Decode/1", "Decode", GPU1)
    assert (r.gpus, r.gpu_fraction) == ((H100_UUID,), 0.0)
    error = exhausted(lambda: m.reserve("Decode/2", "Decode", GPU1))
    assert error.message == "Decode replica 2 needs 1 GPU, 0 free; GPU-3916acbf… held by Decode/1"
    assert error.details == {"needed": 1, "free": 0, "holders": {H100_UUID: ["Decode/1"]}}
    assert error.code == "resources_exhausted" and error.http_status == 409
    # A refused request leaves nothing behind.
    assert [x.replica_id for x in m.reservations()] == ["Decode/1"]
    # Asking again for the same replica is idempotent.
    assert m.reserve("Decode/1", "Decode", GPU1) is r


async def test_the_example_message_of_the_issue(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(copies=2, keep_captured_processes=False))
    m.reserve("Decode/1", "Decode", GPU1)
    error = exhausted(lambda: m.reserve("Decode/3", "Decode", GPU2))
    assert error.message == "Decode replica 3 needs 2 GPUs, 1 free; GPU-3916acbf… held by Decode/1"
    assert error.details == {"needed": 2, "free": 1, "holders": {H100_UUID: ["Decode/1"]}}
    await m.release("Decode/1", ())
    assert m.reserve("Decode/3", "Decode", GPU2).gpus == (U[0], U[1])


def test_fractions_share_one_gpu_up_to_one(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False))
    assert m.reserve("Half/1", "Half", HALF).gpus == (H100_UUID,)
    assert m.reserve("Half/2", "Half", HALF).gpu_fraction == 0.5
    error = exhausted(lambda: m.reserve("Half/3", "Half", HALF))
    assert error.message == (
        "Half replica 3 needs 0.5 of a GPU, 0 free; GPU-3916acbf… held by Half/1, Half/2"
    )
    assert error.details == {
        "needed": 0.5,
        "free": 0,
        "holders": {H100_UUID: ["Half/1", "Half/2"]},
    }
    # A whole-GPU request never shares with fraction holders.
    error = exhausted(lambda: m.reserve("Decode/1", "Decode", GPU1))
    assert (
        error.message
        == "Decode replica 1 needs 1 GPU, 0 free; GPU-3916acbf… held by Half/1, Half/2"
    )


async def test_thirds_sum_to_one_and_a_whole_holder_excludes_fractions(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False))
    third = ResourceRequest(gpu=0.3)
    for i in (1, 2, 3):
        m.reserve(f"T/{i}", "T", third)
    exhausted(lambda: m.reserve("T/4", "T", ResourceRequest(gpu=0.2)))  # 0.9 + 0.2 > 1
    m.reserve("T/5", "T", ResourceRequest(gpu=0.1))  # exactly 1, within float error
    assert m.machine_view()["gpus"][0]["fraction_used"] == 1.0
    for i in (1, 2, 3, 5):
        await m.release(f"T/{i}", ())
    m.reserve("Decode/1", "Decode", GPU1)
    error = exhausted(lambda: m.reserve("Q/1", "Q", ResourceRequest(gpu=0.25)))
    assert (
        error.message == "Q replica 1 needs 0.25 of a GPU, 0 free; GPU-3916acbf… held by Decode/1"
    )


def test_fraction_env_and_best_fit(tmp_path: Path) -> None:
    m = make_manager(tmp_path, eight_gpu_backend())
    half = m.reserve("Half/1", "Half", HALF)
    assert half.env() == {
        "CUDA_VISIBLE_DEVICES": U[0],
        "DYNAMO_LOCAL_GPUS": U[0],
        "DYNAMO_LOCAL_REPLICA": "Half/1",
        "DYNAMO_LOCAL_GPU_MEMORY_FRACTION": "0.5",
    }
    # A whole GPU goes elsewhere; the next fraction fills the started GPU (best fit).
    assert m.reserve("Decode/1", "Decode", GPU1).gpus == (U[1],)
    assert m.reserve("Q/1", "Q", ResourceRequest(gpu=0.25)).gpus == (U[0],)
    assert m.reserve("Big/1", "Big", ResourceRequest(gpu=0.75)).gpus == (U[2],)
    assert m.reserve("Q/2", "Q", ResourceRequest(gpu=0.25)).gpus == (U[0],)
    assert [g["fraction_used"] for g in m.machine_view()["gpus"]][:3] == [1.0, 1.0, 0.75]


def test_a_gpu_count_that_is_neither_whole_nor_a_fraction_is_a_caller_error(
    tmp_path: Path,
) -> None:
    m = make_manager(tmp_path, eight_gpu_backend())
    with pytest.raises(
        ValueError, match=r"^gpu must be a fraction below 1 or a whole number, got 1\.5$"
    ):
        m.reserve("TP/1", "TP", ResourceRequest(gpu=1.5))
    assert m.reservations() == []


def test_no_gpu_machine_says_why(tmp_path: Path) -> None:
    m = make_manager(tmp_path, None, gpu_reason="NVML library not found (no NVIDIA driver)")
    error = exhausted(lambda: m.reserve("Half/1", "Half", HALF))
    assert error.message == (
        "Half replica 1 needs 0.5 of a GPU, 0 on this machine "
        "(NVML library not found (no NVIDIA driver))"
    )
    # No GPU asked: fine, and the process sees no GPU at all.
    assert m.reserve("Frontend/1", "Frontend", ResourceRequest()).env() == {
        "CUDA_VISIBLE_DEVICES": "",
        "DYNAMO_LOCAL_GPUS": "",
        "DYNAMO_LOCAL_REPLICA": "Frontend/1",
    }


# --------------------------------------------------------------------------- placement


def test_two_gpus_take_an_nvlink_pair_first(tmp_path: Path) -> None:
    m = make_manager(tmp_path, eight_gpu_backend())
    assert m.reserve("TP/1", "TP", GPU2).gpus == (U[0], U[1])
    m.reserve("Single/1", "Single", GPU1)  # takes GPU 2, breaking the pair (2, 3)
    # GPU 3 and 4 are contiguous, but (4, 5) is an NVLink pair.
    assert m.reserve("TP/2", "TP", GPU2).gpus == (U[4], U[5])
    assert m.reserve("TP/3", "TP", GPU2).gpus == (U[6], U[7])
    error = exhausted(lambda: m.reserve("TP/4", "TP", GPU2))
    assert error.message == (
        "TP replica 4 needs 2 GPUs, 1 free; GPU-3916acbf… held by TP/1; GPU-3916acc0… held by "
        "TP/1; GPU-3916acc1… held by Single/1; GPU-3916acc3… held by TP/2; GPU-3916acc4… held "
        "by TP/2; GPU-3916acc5… held by TP/3; GPU-3916acc6… held by TP/3"
    )
    assert error.details["free"] == 1


def test_without_nvlink_two_gpus_stay_on_one_numa_node(tmp_path: Path) -> None:
    m = make_manager(tmp_path, eight_gpu_backend(nvlink_pairs=()))
    for i in range(3):
        m.reserve(f"Single/{i + 1}", "Single", GPU1)
    assert gpus_of(m) == {"Single/1": (0,), "Single/2": (1,), "Single/3": (2,)}
    # Free: 3 (node 0) and 4-7 (node 1). Contiguous would be (3, 4), across nodes.
    assert m.reserve("TP/1", "TP", GPU2).gpus == (U[4], U[5])


def test_without_topology_the_lowest_contiguous_run(tmp_path: Path) -> None:
    m = make_manager(tmp_path, eight_gpu_backend(nvlink_pairs=(), numa_nodes={}))
    m.reserve("A/1", "A", GPU1)
    m.reserve("A/2", "A", GPU1)
    m.reserve("A/3", "A", GPU1)
    asyncio.run(m.release("A/2", ()))
    # Free: 1, 3, 4, 5, 6, 7; (1, 3) are the lowest but not contiguous.
    assert m.reserve("TP/1", "TP", GPU2).gpus == (U[3], U[4])
    # Free: 1, 5, 6, 7; the contiguous run of three is (5, 6, 7).
    assert m.reserve("TP/2", "TP", ResourceRequest(gpu=3)).gpus == (U[5], U[6], U[7])
    # Only GPU 1 is left.
    assert m.reserve("B/1", "B", GPU1).gpus == (U[1],)


def test_four_gpus_take_an_nvlink_clique(tmp_path: Path) -> None:
    cliques = [
        (a, b) for group in ((0, 1, 2, 3), (4, 5, 6, 7)) for a in group for b in group if a < b
    ]
    m = make_manager(tmp_path, eight_gpu_backend(nvlink_pairs=cliques, numa_nodes={}))
    m.reserve("Single/1", "Single", GPU1)
    assert m.reserve("TP/1", "TP", ResourceRequest(gpu=4)).gpus == (U[4], U[5], U[6], U[7])
    # Pairs only (no 4-clique): one NUMA node.
    m = make_manager(tmp_path, eight_gpu_backend())
    assert m.reserve("TP/1", "TP", ResourceRequest(gpu=4)).gpus == tuple(U[:4])


def test_a_gpu_busy_with_a_foreign_process_is_skipped(tmp_path: Path) -> None:
    backend = eight_gpu_backend()
    backend.add_process(1, 99999, 2 * GIB)  # not ours, above the 1 GiB threshold
    backend.add_process(4, 99998, GIB // 2)  # not ours, below it
    m = make_manager(tmp_path, backend)
    m.refresh(our_pids=set())
    view = m.machine_view()["gpus"]
    assert [g["foreign_memory_bytes"] for g in view] == [0, 2 * GIB, 0, 0, GIB // 2, 0, 0, 0]
    # Pair (0, 1) is broken by the foreign process; (2, 3) is next.
    assert m.reserve("TP/1", "TP", GPU2).gpus == (U[2], U[3])
    assert m.reserve("A/1", "A", GPU1).gpus == (U[0],)
    assert m.reserve("A/2", "A", GPU1).gpus == (U[4],)  # below the threshold: usable
    assert m.reserve("Half/1", "Half", HALF).gpus == (U[5],)
    m.reserve("TP/2", "TP", GPU1)
    m.reserve("TP/3", "TP", GPU1)
    error = exhausted(lambda: m.reserve("X/1", "X", GPU1))
    assert error.message.startswith("X replica 1 needs 1 GPU, 0 free; ")
    assert error.details["holders"][U[1]] == ["foreign processes"]
    assert "; GPU-3916acc0… busy with foreign processes (2Gi of GPU memory);" in error.message
    # The same process counted as ours (e.g. a replica's child) does not block the GPU.
    m.refresh(our_pids={99999})
    assert m.reserve("X/1", "X", GPU1).gpus == (U[1],)


def test_a_gpu_in_mig_mode_is_not_handed_out(tmp_path: Path) -> None:
    devices = eight_gpu_backend().devices()[:3]
    devices[0] = replace(devices[0], mig_mode=True)
    m = manager_over(tmp_path, devices)
    assert m.reserve("A/1", "A", GPU1).gpus == (U[1],)
    assert m.reserve("Half/1", "Half", HALF).gpus == (U[2],)
    error = exhausted(lambda: m.reserve("A/2", "A", GPU1))
    assert error.message == (
        "A replica 2 needs 1 GPU, 0 free; "
        "GPU-3916acbf… in MIG mode (MIG instances are not handed out); "
        "GPU-3916acc0… held by A/1; GPU-3916acc1… held by Half/1"
    )
    assert error.details["holders"][U[0]] == ["MIG mode"]
    view = m.machine_view()
    assert [(g["state"], g["mig_mode"]) for g in view["gpus"]] == [
        ("free", True),
        ("allocated", False),
        ("allocated", False),
    ]
    assert view["free_gpus"] == 0


def test_the_foreign_threshold_is_configurable(tmp_path: Path) -> None:
    backend = h100_backend()  # the capture's own load process: 3.3 GB, not ours
    strict = make_manager(tmp_path, backend)
    strict.refresh(our_pids=set())
    error = exhausted(lambda: strict.reserve("Decode/1", "Decode", GPU1))
    assert error.message == (
        "Decode replica 1 needs 1 GPU, 0 free; "
        "GPU-3916acbf… busy with foreign processes (3.1Gi of GPU memory)"
    )
    assert error.details == {
        "needed": 1,
        "free": 0,
        "holders": {H100_UUID: ["foreign processes"]},
    }
    lenient = make_manager(tmp_path, backend, foreign_memory_threshold_bytes=4 * GIB)
    lenient.refresh(our_pids=set())
    assert lenient.reserve("Decode/1", "Decode", GPU1).gpus == (H100_UUID,)


def test_concurrent_reservations_from_threads_never_share_a_gpu(tmp_path: Path) -> None:
    m = make_manager(tmp_path, eight_gpu_backend())

    def ask(i: int) -> str | None:
        try:
            return m.reserve(f"W/{i}", "W", GPU1).gpus[0]
        except ResourcesExhausted:
            return None

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        got = list(pool.map(ask, range(20)))
    granted = [g for g in got if g is not None]
    assert sorted(granted) == sorted(U)
    assert len(m.reservations()) == 8


# --------------------------------------------------------------------------- CPU and memory


def test_cpu_budget(tmp_path: Path) -> None:
    m = make_manager(tmp_path, cpus=(0, 1, 2, 3))
    m.reserve("A/1", "A", ResourceRequest(cpu=1.5))
    m.reserve("A/2", "A", ResourceRequest(cpu=2))
    error = exhausted(lambda: m.reserve("A/3", "A", ResourceRequest(cpu=1)))
    assert error.message == "A replica 3 needs 1 CPU core, 0.5 of 4 unreserved"
    assert error.details == {"needed": 1.0, "free": 0.5, "kind": "cpu"}
    assert m.reserve("A/4", "A", ResourceRequest(cpu=0.5)).cpu_cores == 0.5


def test_memory_budget(tmp_path: Path) -> None:
    m = make_manager(tmp_path, memory=4 * GIB)
    m.reserve("A/1", "A", ResourceRequest(memory_bytes=3 * GIB))
    error = exhausted(lambda: m.reserve("A/2", "A", ResourceRequest(memory_bytes=2 * GIB)))
    assert error.message == "A replica 2 needs 2Gi of memory, 1Gi unreserved"
    assert error.details == {"needed": 2 * GIB, "free": GIB, "kind": "memory"}
    assert m.reserve("A/3", "A", ResourceRequest(memory_bytes=GIB)).memory_bytes == GIB


def test_pinned_cores_are_whole_and_never_shared(tmp_path: Path) -> None:
    m = make_manager(tmp_path, cpus=(2, 3, 5, 7))
    a = m.reserve("A/1", "A", ResourceRequest(cpu=2, pin_cpus=True))
    assert a.cpus == (2, 3)
    assert a.env()["DYNAMO_LOCAL_CPUS"] == "2,3"
    assert a.env()["DYNAMO_LOCAL_CPU_CORES"] == "2"
    b = m.reserve("B/1", "B", ResourceRequest(cpu=1.5, pin_cpus=True))
    assert b.cpus == (5, 7)  # 1.5 cores pin 2 whole cores
    # 0.5 core is left in the budget, but no core is left to pin.
    error = exhausted(lambda: m.reserve("C/1", "C", ResourceRequest(cpu=0.5, pin_cpus=True)))
    assert error.message == "C replica 1 needs 1 pinned CPU core, 0 not pinned"
    assert error.details == {"needed": 1, "free": 0, "kind": "cpu"}
    # Unpinned it fits the budget.
    assert m.reserve("C/1", "C", ResourceRequest(cpu=0.5)).cpus == ()
    assert m.machine_view()["cpu"] == {
        "allocatable_cores": 4.0,
        "reserved_cores": 4.0,
        "pinned": [2, 3, 5, 7],
    }


def test_pinned_cores_are_taken_near_the_replicas_gpus(tmp_path: Path) -> None:
    # GPUs 0-3 are attached to cores 0-3, GPUs 4-7 to cores 4-7 (NVML's CPU affinity).
    devices = [
        replace(g, cpu_affinity=tuple(range(4)) if g.index < 4 else tuple(range(4, 8)))
        for g in eight_gpu_backend(nvlink_pairs=(), numa_nodes={}).devices()
    ]
    m = manager_over(tmp_path, devices)
    assert m.reserve("A/1", "A", ResourceRequest(gpu=1, cpu=1, pin_cpus=True)).cpus == (0,)
    assert m.reserve("Big/1", "Big", ResourceRequest(gpu=3)).gpus == tuple(U[1:4])
    # GPU 4 is next: its cores, not the lowest free ones (1-3).
    pinned = m.reserve("B/1", "B", ResourceRequest(gpu=1, cpu=2, pin_cpus=True))
    assert (pinned.gpus, pinned.cpus) == ((U[4],), (4, 5))
    # Near cores run out: the rest come from the lowest free ones.
    m.reserve("C/1", "C", ResourceRequest(cpu=2, pin_cpus=True))  # no GPU: lowest (1, 2)
    wide = m.reserve("D/1", "D", ResourceRequest(gpu=1, cpu=3, pin_cpus=True))
    assert (wide.gpus, wide.cpus) == ((U[5],), (3, 6, 7))
    # Without known affinity the lowest free cores are taken.
    m = manager_over(tmp_path, [replace(d, cpu_affinity=None) for d in devices])
    m.reserve("Big/1", "Big", ResourceRequest(gpu=4))
    assert m.reserve("B/1", "B", ResourceRequest(gpu=1, cpu=2, pin_cpus=True)).cpus == (0, 1)


def test_all_or_nothing_a_refused_part_keeps_nothing(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False), memory=GIB)
    error = exhausted(
        lambda: m.reserve("A/1", "A", ResourceRequest(gpu=1, cpu=1, memory_bytes=2 * GIB))
    )
    assert error.details["kind"] == "memory"
    view = m.machine_view()
    assert (view["free_gpus"], view["cpu"]["reserved_cores"], m.reservations()) == (1, 0, [])
    assert m.reserve("B/1", "B", GPU1).gpus == (H100_UUID,)


def test_reserve_many_keeps_those_that_fit_and_reports_the_rest(tmp_path: Path) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False))
    done, failed = m.reserve_many(
        [(f"Half/{i}", "Half", HALF, (), ()) for i in (1, 2, 3)]
        + [("Front/1", "Front", ResourceRequest(cpu=1), (), ())]
    )
    assert [r.replica_id for r in done] == ["Half/1", "Half/2", "Front/1"]
    assert [e.message for e in failed] == [
        "Half replica 3 needs 0.5 of a GPU, 0 free; GPU-3916acbf… held by Half/1, Half/2"
    ]


def test_reserve_many_takes_named_asks(tmp_path: Path) -> None:
    first = free_run(2)
    m = make_manager(tmp_path, eight_gpu_backend(), port_range=(first, first + 1))
    done, failed = m.reserve_many(
        [
            ReservationAsk("TP/1", "TP", GPU2, ports=[PortSpec("http")]),
            ReservationAsk("TP/2", "TP", GPU2, ports=[PortSpec("http"), PortSpec("rpc")]),
            ReservationAsk("Front/1", "Front", ResourceRequest(cpu=1)),
        ]
    )
    assert [(r.replica_id, r.gpus, r.ports) for r in done] == [
        ("TP/1", (U[0], U[1]), {"http": first}),
        ("Front/1", (), {}),
    ]
    assert [e.details for e in failed] == [{"needed": 2, "free": 1, "kind": "ports"}]
    assert m.reservation("TP/2") is None  # its GPUs were not kept
    assert m.machine_view()["free_gpus"] == 6


# --------------------------------------------------------------------------- reservations


def sample_reservation() -> Reservation:
    return Reservation(
        replica_id="Decode/2",
        component="Decode",
        gpus=(U[0], U[1]),
        cpu_cores=2.0,
        cpus=(0, 1),
        memory_bytes=GIB,
        ports={"system": 21001, "nixl": 21002},
        sockets={"rpc": "/w/sock/decode-2-rpc.sock"},
        env_names={"port.system": "DYN_SYSTEM_PORT", "socket.rpc": "RPC_SOCKET"},
    )


def test_reservation_env_is_exact() -> None:
    assert sample_reservation().env() == {
        "CUDA_VISIBLE_DEVICES": f"{U[0]},{U[1]}",
        "DYNAMO_LOCAL_GPUS": f"{U[0]},{U[1]}",
        "DYNAMO_LOCAL_REPLICA": "Decode/2",
        "DYNAMO_LOCAL_CPUS": "0,1",
        "DYNAMO_LOCAL_CPU_CORES": "2",
        "DYNAMO_LOCAL_MEMORY_BYTES": str(GIB),
        "DYN_SYSTEM_PORT": "21001",  # "nixl" has no env name: template only
        "RPC_SOCKET": "/w/sock/decode-2-rpc.sock",
    }


def test_reservation_round_trips_through_json() -> None:
    r = sample_reservation()
    d = r.to_dict()
    assert d == {
        "replica_id": "Decode/2",
        "component": "Decode",
        "gpus": [U[0], U[1]],
        "gpu_fraction": 0.0,
        "cpu_cores": 2.0,
        "cpus": [0, 1],
        "memory_bytes": GIB,
        "ports": {"system": 21001, "nixl": 21002},
        "sockets": {"rpc": "/w/sock/decode-2-rpc.sock"},
        "env_names": {"port.system": "DYN_SYSTEM_PORT", "socket.rpc": "RPC_SOCKET"},
    }
    assert Reservation.from_dict(json.loads(json.dumps(d))) == r
    half = Reservation("Half/1", "Half", gpus=(U[3],), gpu_fraction=0.25)
    assert Reservation.from_dict(json.loads(json.dumps(half.to_dict()))) == half
    assert Reservation.from_dict({"replica_id": "F/1", "component": "F"}) == Reservation("F/1", "F")


def test_adopt_after_a_restart_holds_the_same_resources(tmp_path: Path) -> None:
    backend = eight_gpu_backend()
    first = make_manager(tmp_path, backend)
    held = [first.reserve("TP/1", "TP", GPU2), first.reserve("Half/1", "Half", HALF)]
    saved = [json.dumps(r.to_dict()) for r in held]
    again = make_manager(tmp_path, backend)
    adopted = [again.adopt_dict(json.loads(s)) for s in saved]
    assert adopted == held
    assert again.reservation_from_dict(json.loads(saved[0])) == held[0]
    assert again.adopt(Reservation("TP/1", "TP", gpus=(U[7],))) == held[0]  # idempotent
    assert gpus_of(again) == {"TP/1": (0, 1), "Half/1": (2,)}
    # New reservations respect the adopted ones.
    assert again.reserve("TP/2", "TP", GPU2).gpus == (U[4], U[5])
    assert again.reserve("Half/2", "Half", HALF).gpus == (U[2],)


def test_adopting_a_colliding_reservation_keeps_it_and_says_so(tmp_path: Path) -> None:
    events = Recorded()
    m = make_manager(tmp_path, eight_gpu_backend(), on_event=events)
    m.adopt(Reservation("A/1", "A", gpus=(U[0],), cpus=(3,), ports={"http": 21000}))
    m.adopt(Reservation("Q/1", "Q", gpus=(U[1],), gpu_fraction=0.5))
    # A fraction that still fits beside other fractions is no collision.
    m.adopt(Reservation("Q/2", "Q", gpus=(U[1],), gpu_fraction=0.25))
    assert events == []
    clash = Reservation(
        "B/1", "B", gpus=(U[0], U[1]), cpus=(3, 4), ports={"http": 21000, "rpc": 21001}
    )
    assert m.adopt(clash) == clash
    assert events == [
        (
            "allocate",
            {
                "component": "B",
                "replica": "B/1",
                "outcome": "failed",
                "reason": "adopted B/1 overlaps: GPU-3916acbf… is held whole by A/1; "
                "GPU-3916acc0… is 0.75 taken by fractions; port 21000 is held by A/1; "
                "CPU 3 is pinned by A/1",
                "details": {
                    "collisions": [
                        "GPU-3916acbf… is held whole by A/1",
                        "GPU-3916acc0… is 0.75 taken by fractions",
                        "port 21000 is held by A/1",
                        "CPU 3 is pinned by A/1",
                    ]
                },
            },
        )
    ]
    # Both are held (their processes hold the GPU either way), and the view shows it.
    assert m.machine_view()["gpus"][0]["owners"] == ["A/1", "B/1"]


# --------------------------------------------------------------------------- ports


def test_ports_are_really_free_and_distinct(tmp_path: Path) -> None:
    first = free_run(3)
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", first))  # someone else's: must be skipped
        m = make_manager(tmp_path, port_range=(first, first + 2))
        a = m.reserve("A/1", "A", ResourceRequest(), [PortSpec("http", env="HTTP_PORT")])
        assert a.ports == {"http": first + 1}
        assert a.env()["HTTP_PORT"] == str(first + 1)
        b = m.reserve("B/1", "B", ResourceRequest(), [PortSpec("http")])
        assert b.ports == {"http": first + 2}
        error = exhausted(lambda: m.reserve("C/1", "C", ResourceRequest(), [PortSpec("http")]))
        assert error.message == (
            f"C replica 1 needs 1 port, 0 free in {first}-{first + 2} "
            "(2 held by replicas, the rest bound by other processes)"
        )
        assert error.details == {"needed": 1, "free": 0, "kind": "ports"}
        asyncio.run(m.release("A/1", ()))
        assert m.reserve("C/1", "C", ResourceRequest(), [PortSpec("http")]).ports == {
            "http": first + 1
        }
    assert m.machine_view()["ports"] == {"B/1": {"http": first + 2}, "C/1": {"http": first + 1}}


def test_two_ports_for_one_replica_are_all_or_nothing(tmp_path: Path) -> None:
    first = free_run(3)
    m = make_manager(tmp_path, port_range=(first, first + 2))
    two = [PortSpec("system", env="DYN_SYSTEM_PORT"), PortSpec("rpc", env="DYN_TCP_RPC_PORT")]
    assert m.reserve("A/1", "A", ResourceRequest(), two).ports == {
        "system": first,
        "rpc": first + 1,
    }
    error = exhausted(lambda: m.reserve("B/1", "B", ResourceRequest(), two))
    assert error.message == (
        f"B replica 1 needs 2 ports, 1 free in {first}-{first + 2} "
        "(2 held by replicas, the rest bound by other processes)"
    )
    assert error.details == {"needed": 2, "free": 1, "kind": "ports"}
    assert [r.replica_id for r in m.reservations()] == ["A/1"]


SERVE_PORT = (
    "import os, socket, time\n"
    "s = socket.socket()\n"
    "s.bind(('127.0.0.1', int(os.environ['HTTP_PORT'])))\n"
    "s.listen()\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


async def test_a_real_process_binds_its_port_and_release_waits_for_it(tmp_path: Path) -> None:
    first = free_run(2)
    m = make_manager(tmp_path, port_range=(first, first + 1))
    r = m.reserve("Web/1", "Web", ResourceRequest(), [PortSpec("http", env="HTTP_PORT")])
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_PORT],
        env={**os.environ, **r.env()},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        port = r.ports["http"]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        assert not bindable(port)
        release = asyncio.create_task(m.release("Web/1", {proc.pid}))
        await asyncio.sleep(0.3)
        assert not release.done()  # the process still runs
        assert m.reservation("Web/1") == r
        proc.terminate()
        result = await asyncio.wait_for(release, 10)
        assert result == ReleaseResult("Web/1", processes_gone=True)
        assert m.reservation("Web/1") is None
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- sockets


def test_a_port_bound_by_someone_else_since_the_reservation_moves(tmp_path: Path) -> None:
    first = free_run(3)
    m = make_manager(tmp_path, None, port_range=(first, first + 2))
    held = m.reserve("Decode/1", "Decode", ResourceRequest(), [PortSpec("http"), PortSpec("rpc")])
    assert held.ports == {"http": first, "rpc": first + 1}
    assert m.recheck_ports("Decode/1") == (held, [])  # nothing taken: nothing moves
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", first))
    squatter.listen()
    try:
        moved, lines = m.recheck_ports("Decode/1")
        me = psutil.Process().name()
        assert lines == [f"Decode/1: port http {first} is taken by pid {os.getpid()} ({me}); "
                         f"moved to {first + 2}"]  # fmt: skip
        assert moved is not None and moved.ports == {"http": first + 2, "rpc": first + 1}
        assert m.reservation("Decode/1") == moved
        assert m.machine_view()["ports"] == {"Decode/1": {"http": first + 2, "rpc": first + 1}}
        # Nowhere left to go: refused, and the reservation stays as it was.
        blocker = socket.socket()
        blocker.bind(("127.0.0.1", first + 2))
        blocker.listen()
        with blocker:
            error = exhausted(lambda: m.recheck_ports("Decode/1"))
            assert error.details == {"needed": 1, "free": 0, "kind": "ports"}
            assert m.reservation("Decode/1") == moved
    finally:
        squatter.close()
    assert m.recheck_ports("Nobody/1") == (None, [])


def test_socket_paths_are_short_deterministic_and_stale_files_go(short_dir: Path) -> None:
    spec = [SocketSpec("rpc", env="RPC_SOCKET")]
    expected = short_dir / "sock" / "decode-1-rpc.sock"
    expected.parent.mkdir()
    expected.write_text("stale")  # left by an earlier run
    m = make_manager(short_dir)
    r = m.reserve("Decode/1", "Decode", ResourceRequest(), (), spec)
    assert r.sockets == {"rpc": str(expected)}
    assert r.env()["RPC_SOCKET"] == str(expected)
    assert len(os.fsencode(str(expected))) < 100
    assert expected.exists()  # reserving touches no disk (it runs on the event loop) ...
    assert m.prepare("Decode/1") == (r, [])  # ... preparing the spawn does, in a thread
    assert not expected.exists()
    # Another manager (a restart) names the same replica's socket the same way.
    again = make_manager(short_dir).reserve("Decode/1", "Decode", ResourceRequest(), (), spec)
    assert again.sockets == r.sockets
    assert m.machine_view()["sockets"] == {"Decode/1": {"rpc": str(expected)}}


def test_socket_names_never_collide_or_leave_the_socket_folder(short_dir: Path) -> None:
    m = make_manager(short_dir)
    first = m.reserve("Decode/1", "Decode", ResourceRequest(), (), [SocketSpec("rpc")])
    path = Path(first.sockets["rpc"])
    assert path == short_dir / "sock" / "decode-1-rpc.sock"
    m.prepare("Decode/1")
    path.write_text("bound by Decode/1")  # stands in for the live socket
    # "decode" differs only in case: a hashed name, and Decode/1's socket stays.
    other = m.reserve("decode/1", "decode", ResourceRequest(), (), [SocketSpec("rpc")])
    m.prepare("decode/1")
    digest = hashlib.sha1(b"decode/1/rpc").hexdigest()[:12]
    assert other.sockets == {"rpc": str(short_dir / "sock" / f"{digest}.sock")}
    assert path.read_text() == "bound by Decode/1"
    odd = m.reserve("W/1", "W", ResourceRequest(), (), [SocketSpec("../x y")])
    assert odd.sockets == {"../x y": str(short_dir / "sock" / "w-1-.._x_y.sock")}


def test_a_long_working_dir_gets_hashed_socket_names(short_dir: Path) -> None:
    spec = [SocketSpec("nixl_side_channel")]
    wd = short_dir / ("w" * (70 - len(str(short_dir)) - 1))
    assert len(str(wd)) == 70
    m = make_manager(wd)
    r = m.reserve("PrefillWorker/12", "PrefillWorker", ResourceRequest(), (), spec)
    digest = hashlib.sha1(b"PrefillWorker/12/nixl_side_channel").hexdigest()[:12]
    assert r.sockets == {"nixl_side_channel": f"{wd}/sock/{digest}.sock"}
    assert len(r.sockets["nixl_side_channel"]) == 93
    m.prepare("PrefillWorker/12")
    assert (wd / "sock").is_dir()


def test_an_absurdly_long_working_dir_is_refused_with_nothing_held(short_dir: Path) -> None:
    wd = short_dir / ("w" * 90)
    m = make_manager(wd, h100_backend(keep_captured_processes=False))
    with pytest.raises(ResourcesExhausted) as info:
        m.reserve("Decode/1", "Decode", GPU1, (), [SocketSpec("rpc")])
    assert info.value.message == (
        f"working dir {wd} is too long for Unix socket paths (must stay under 100 bytes); "
        "use a shorter --working-dir"
    )
    assert info.value.details == {"working_dir": str(wd), "kind": "sockets"}
    assert m.reservations() == []
    assert m.machine_view()["free_gpus"] == 1


SERVE_SOCKET = (
    "import os, socket, time\n"
    "s = socket.socket(socket.AF_UNIX)\n"
    "s.bind(os.environ['RPC_SOCKET'])\n"
    "s.listen()\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


async def test_a_real_process_binds_its_socket_and_release_removes_it(short_dir: Path) -> None:
    m = make_manager(short_dir)
    r = m.reserve(
        "Decode/1", "Decode", ResourceRequest(), (), [SocketSpec("rpc", env="RPC_SOCKET")]
    )
    path = r.sockets["rpc"]
    m.prepare("Decode/1")  # the socket folder exists before the process binds in it
    proc = subprocess.Popen(
        [sys.executable, "-c", SERVE_SOCKET],
        env={**os.environ, **r.env()},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert await asyncio.to_thread(proc.stdout.readline) == "ready\n"
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(path)
        proc.kill()  # killed: the socket file stays behind
        await asyncio.to_thread(proc.wait)
        assert Path(path).exists()
        assert await m.release("Decode/1", {proc.pid}) == ReleaseResult("Decode/1", True)
        assert not Path(path).exists()
    finally:
        proc.kill()
        proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


# --------------------------------------------------------------------------- release and leaks


_ZOMBIES: list[subprocess.Popen[bytes]] = []


def dead_pid() -> int:
    """The PID of a process that has exited. It is left unreaped (a zombie, which counts as
    gone), so the kernel cannot hand the PID to another process while a test uses it."""
    proc = subprocess.Popen(["true"])
    _ZOMBIES.append(proc)
    deadline = time.monotonic() + 10
    while psutil.Process(proc.pid).status() != psutil.STATUS_ZOMBIE:
        assert time.monotonic() < deadline, "the child did not exit"
        time.sleep(0.005)
    return proc.pid


def reap_zombies() -> None:
    """Reap what :func:`dead_pid` left (once no test uses those PIDs any more)."""
    while _ZOMBIES:
        _ZOMBIES.pop().wait()


@pytest.fixture(autouse=True)
def _reap_after_each_test() -> Iterator[None]:
    yield
    reap_zombies()


async def test_release_waits_for_nvml_to_drop_the_pid(tmp_path: Path) -> None:
    backend = h100_backend(keep_captured_processes=False)
    m = make_manager(tmp_path, backend, release_timeout_s=30)
    m.reserve("Decode/1", "Decode", GPU1)
    pid = dead_pid()
    backend.add_process(0, pid, GIB)  # the driver still lists the exited process
    release = asyncio.create_task(m.release("Decode/1", {pid}))
    await asyncio.sleep(0.3)
    assert not release.done()
    assert m.machine_view()["gpus"][0]["owners"] == ["Decode/1"]
    backend.remove_pid(pid)
    assert await asyncio.wait_for(release, 5) == ReleaseResult("Decode/1", True)
    assert m.machine_view()["gpus"][0]["state"] == "free"


async def test_release_of_a_crash_or_an_unknown_replica_is_immediate(tmp_path: Path) -> None:
    backend = h100_backend(keep_captured_processes=False)
    m = make_manager(tmp_path, backend)
    m.reserve("Decode/1", "Decode", GPU1)
    assert await m.release("Decode/1", ()) == ReleaseResult("Decode/1", True)
    assert await m.release("Nobody/1", {1}) == ReleaseResult("Nobody/1", True)
    assert m.reservations() == []


async def poll(pred: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        assert time.monotonic() < deadline, f"condition not met within {limit_s} s"
        await asyncio.sleep(0.05)


async def test_a_gpu_still_listed_after_the_timeout_is_leaked_until_free(
    tmp_path: Path,
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    m = make_manager(tmp_path, backend, release_timeout_s=0.2, on_event=events)
    m.reserve("Decode/1", "Decode", GPU1)
    pid = dead_pid()
    backend.add_process(0, pid, GIB)
    try:
        result = await m.release("Decode/1", {pid})
        assert result == ReleaseResult("Decode/1", True, (H100_UUID,))
        assert m.reservations() == []
        gpu = m.machine_view()["gpus"][0]
        assert (gpu["state"], gpu["owners"], gpu["fraction_used"]) == ("leaked", [], 0)
        assert m.machine_view()["free_gpus"] == 0
        assert events == [
            (
                "leak",
                {
                    "component": "Decode",
                    "replica": "Decode/1",
                    "outcome": "failed",
                    "reason": "GPU-3916acbf… still lists Decode/1's processes 0.2 s after release",
                    "details": {"gpu": H100_UUID},
                },
            )
        ]
        for request in (GPU1, HALF):
            error = exhausted(functools.partial(m.reserve, "Decode/2", "Decode", request))
            assert error.details["holders"] == {H100_UUID: ["leaked"]}
        assert exhausted(lambda: m.reserve("Decode/2", "Decode", GPU1)).message == (
            "Decode replica 2 needs 1 GPU, 0 free; "
            "GPU-3916acbf… leaked by Decode/1 (NVML still lists its processes)"
        )
        backend.remove_pid(pid)  # the driver lets go; the watcher polls every second
        await poll(lambda: m.machine_view()["gpus"][0]["state"] == "free", limit_s=5)
        assert events[1] == (
            "leak",
            {
                "component": "Decode",
                "replica": "Decode/1",
                "outcome": "ok",
                "reason": "GPU-3916acbf… is free again",
                "details": {"gpu": H100_UUID},
            },
        )
        assert m.reserve("Decode/2", "Decode", GPU1).gpus == (H100_UUID,)
    finally:
        await m.close()


def sleeper() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])


def test_identities_tell_a_process_from_a_recycled_pid() -> None:
    proc = sleeper()
    try:
        ids = procs.identify({proc.pid, dead_pid()})
        assert list(ids) == [proc.pid]  # a PID already gone is not tracked
        assert procs.running(ids) == {proc.pid}
        # The same PID with another start time is another process: the tracked one is gone.
        assert procs.running({proc.pid: ids[proc.pid] - 100}) == set()
        assert procs.wait_gone(ids, 0.05) is False
    finally:
        proc.kill()
        proc.wait()
    assert procs.running(ids) == set()
    assert procs.wait_gone(ids, 0) is True


async def test_a_stuck_replica_s_gpu_is_never_free_while_it_turns_lingering(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    m = make_manager(tmp_path, backend, **QUICK_RELEASE)
    m.reserve("Decode/1", "Decode", GPU1)
    slow_running = procs.running

    def running(identities: Any) -> set[int]:
        time.sleep(0.3)  # a slow psutil pass: the loop serves other calls meanwhile
        return slow_running(identities)

    monkeypatch.setattr(procs, "running", running)
    proc = sleeper()
    grabbed: list[str] = []

    async def grab() -> None:  # another scale on the loop, again and again
        while True:
            with contextlib.suppress(ResourcesExhausted):
                grabbed.append(m.reserve("Other/1", "Other", GPU1).replica_id)
                return
            await asyncio.sleep(0.01)

    grabber = asyncio.create_task(grab())
    try:
        backend.add_process(0, proc.pid, GIB)
        assert await m.release("Decode/1", {proc.pid}) == ReleaseResult("Decode/1", False)
        await asyncio.sleep(0.1)
        assert grabbed == []
        assert m.machine_view()["gpus"][0]["owners"] == [
            "Decode/1 (stopped; processes still running)"
        ]
    finally:
        grabber.cancel()
        proc.kill()
        proc.wait()
        await m.close()


async def test_processes_outliving_the_release_keep_everything_held_until_they_exit(
    short_dir: Path,
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    port = free_run(1)
    m = make_manager(
        short_dir,
        backend,
        cpus=(0, 1),
        memory=4 * GIB,
        port_range=(port, port),
        on_event=events,
        **QUICK_RELEASE,
    )
    request = ResourceRequest(gpu=1, cpu=2, memory_bytes=3 * GIB, pin_cpus=True)
    held = m.reserve("Decode/1", "Decode", request, [PortSpec("http")], [SocketSpec("rpc")])
    proc = sleeper()  # stands in for a replica stuck in the driver: it outlives SIGKILL
    try:
        backend.add_process(0, proc.pid, GIB)
        assert await m.release("Decode/1", {proc.pid}) == ReleaseResult("Decode/1", False)
        assert events == [
            (
                "leak",
                {
                    "component": "Decode",
                    "replica": "Decode/1",
                    "outcome": "failed",
                    "reason": f"Decode/1's processes {proc.pid} still run 0.2 s after release; "
                    "its resources stay held until they exit",
                    "details": {"pids": [proc.pid]},
                },
            )
        ]
        assert m.reservation("Decode/1") is None  # the replica is gone ...
        view = m.machine_view()  # ... but what its processes use is not free
        stuck = "Decode/1 (stopped; processes still running)"
        assert (view["gpus"][0]["state"], view["gpus"][0]["owners"]) == ("allocated", [stuck])
        assert view["cpu"] == {"allocatable_cores": 2.0, "reserved_cores": 2.0, "pinned": [0, 1]}
        assert view["memory"] == {"allocatable_bytes": 4 * GIB, "reserved_bytes": 3 * GIB}
        assert (view["ports"], view["sockets"]) == ({}, {})
        assert view["lingering"] == [
            {"replica": "Decode/1", "pids": [proc.pid], "reservation": held.to_dict()}
        ]
        # The same replica id asked again gets nothing the stuck processes may still use.
        assert exhausted(lambda: m.reserve("Decode/1", "Decode", GPU1)).message == (
            f"Decode replica 1 needs 1 GPU, 0 free; GPU-3916acbf… held by {stuck}"
        )
        for ask, kind in (
            (ResourceRequest(cpu=1), "cpu"),
            (ResourceRequest(memory_bytes=2 * GIB), "memory"),
        ):
            assert exhausted(lambda a=ask: m.reserve("Other/1", "Other", a)).details["kind"] == kind
        ports = exhausted(lambda: m.reserve("Other/1", "Other", ResourceRequest(), [PortSpec("p")]))
        assert ports.details == {"needed": 1, "free": 0, "kind": "ports"}
        # Nothing from the refused asks stayed held.
        assert m.reservations() == []
        # Its processes are ours, not foreign, while they linger.
        m.refresh(our_pids=())
        assert m.machine_view()["gpus"][0]["foreign_memory_bytes"] == 0

        proc.kill()
        proc.wait()
        backend.remove_pid(proc.pid)
        await poll(lambda: m.machine_view()["lingering"] == [])
        assert events[1] == (
            "leak",
            {
                "component": "Decode",
                "replica": "Decode/1",
                "outcome": "ok",
                "reason": "Decode/1's processes exited; its resources are released",
                "details": {"pids": [proc.pid]},
            },
        )
        view = m.machine_view()
        assert (view["gpus"][0]["state"], view["cpu"]["reserved_cores"]) == ("free", 0.0)
        # The socket file goes in a thread after the lingering hold is dropped.
        await poll(lambda: not os.path.exists(held.sockets["rpc"]))
        again = m.reserve("Decode/1", "Decode", request, [PortSpec("http")], [SocketSpec("rpc")])
        assert (again.gpus, again.cpus, again.ports) == ((H100_UUID,), (0, 1), {"http": port})
    finally:
        proc.kill()
        proc.wait()
        await m.close()


async def test_a_lingering_process_that_exits_with_the_gpu_still_listed_leaks_it(
    tmp_path: Path,
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    m = make_manager(tmp_path, backend, on_event=events, **QUICK_RELEASE)
    m.reserve("Decode/1", "Decode", GPU1)
    proc = sleeper()
    try:
        backend.add_process(0, proc.pid, GIB)
        await m.release("Decode/1", {proc.pid})
        proc.kill()
        proc.wait()  # gone, but the driver keeps listing it
        await poll(lambda: m.machine_view()["gpus"][0]["state"] == "leaked")
        assert [(kind, f["outcome"], f["details"]) for kind, f in events] == [
            ("leak", "failed", {"pids": [proc.pid]}),
            ("leak", "ok", {"pids": [proc.pid]}),
            ("leak", "failed", {"gpu": H100_UUID}),
        ]
        assert m.machine_view()["lingering"] == []
        backend.remove_pid(proc.pid)
        await poll(lambda: m.machine_view()["gpus"][0]["state"] == "free")
    finally:
        proc.kill()
        proc.wait()
        await m.close()


async def test_a_gpu_whose_processes_nvml_cannot_list_is_not_taken_for_free(
    tmp_path: Path,
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    m = make_manager(tmp_path, backend, on_event=events, **QUICK_RELEASE)
    m.refresh(our_pids=())  # NVML has listed this GPU's processes before
    m.reserve("Decode/1", "Decode", GPU1)
    pid = dead_pid()
    backend.add_process(0, pid, GIB)
    backend.fail_process_listing(0)  # an empty answer now would hide the exited process
    try:
        assert await m.release("Decode/1", {pid}) == ReleaseResult("Decode/1", True, (H100_UUID,))
        assert events[0][1]["reason"] == (
            "GPU-3916acbf… is not shown free of Decode/1's processes "
            "(NVML could not list its processes) 0.2 s after release"
        )
        assert exhausted(lambda: m.reserve("Decode/2", "Decode", GPU1)).message == (
            "Decode replica 2 needs 1 GPU, 0 free; GPU-3916acbf… leaked by Decode/1 "
            "(not shown free of its processes: NVML could not list its processes)"
        )
        backend.fail_process_listing(0, failing=False)  # listed again: still there
        await asyncio.sleep(0.2)
        assert m.machine_view()["gpus"][0]["state"] == "leaked"
        backend.remove_pid(pid)
        await poll(lambda: m.machine_view()["gpus"][0]["state"] == "free")
        assert [f["outcome"] for _, f in events] == ["failed", "ok"]
    finally:
        await m.close()


async def test_nvml_failing_outright_leaks_the_gpu_and_the_watcher_outlasts_it(
    tmp_path: Path,
) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    m = make_manager(tmp_path, backend, on_event=events, **QUICK_RELEASE)
    m.reserve("Decode/1", "Decode", GPU1)
    backend.fail_sampling(RuntimeError("GPU is lost"))
    try:
        assert await m.release("Decode/1", {dead_pid()}) == ReleaseResult(
            "Decode/1", True, (H100_UUID,)
        )
        assert events[0][1]["reason"] == (
            "GPU-3916acbf… is not shown free of Decode/1's processes "
            "(NVML failed: GPU is lost) 0.2 s after release"
        )
        await asyncio.sleep(0.3)  # several polls that raise: the watcher goes on
        (watcher,) = m._leak_tasks
        assert not watcher.done()
        backend.fail_sampling(None)
        await poll(lambda: m.machine_view()["gpus"][0]["state"] == "free")
        assert [f["outcome"] for _, f in events] == ["failed", "ok"]
    finally:
        await m.close()


async def test_a_gpu_nvml_never_lists_processes_for_is_judged_by_psutil(tmp_path: Path) -> None:
    backend = h100_backend(keep_captured_processes=False)
    backend.fail_process_listing(0)  # a driver that never answers the listing
    m = make_manager(tmp_path, backend, release_timeout_s=5)
    m.refresh(our_pids=())
    m.reserve("Decode/1", "Decode", GPU1)
    try:
        result = await asyncio.wait_for(m.release("Decode/1", {dead_pid()}), 2)
        assert result == ReleaseResult("Decode/1", True)
        assert m.machine_view()["gpus"][0]["state"] == "free"
    finally:
        await m.close()


async def test_what_stopped_replicas_hold_survives_a_restart_of_the_manager(
    tmp_path: Path,
) -> None:
    backend = h100_backend(copies=2, keep_captured_processes=False)
    first = make_manager(tmp_path, backend, release_timeout_s=0.1, leak_poll_s=0.05)
    stuck = first.reserve("Decode/1", "Decode", ResourceRequest(gpu=1, cpu=2))
    first.reserve("Decode/2", "Decode", GPU1)
    proc = sleeper()
    gone = dead_pid()
    backend.add_process(0, proc.pid, GIB)
    backend.add_process(1, gone, GIB)  # exited, but the driver still lists it
    try:
        await first.release("Decode/1", {proc.pid})
        await first.release("Decode/2", {gone})
        entries = first.held_after_stop()
        created = psutil.Process(proc.pid).create_time()
        assert entries == [
            {
                "kind": "lingering",
                "reservation": stuck.to_dict(),
                "processes": {str(proc.pid): created},
                "pids": [proc.pid],
            },
            {
                "kind": "leaked",
                "gpu": U[1],
                "component": "Decode",
                "replica": "Decode/2",
                "why": "listed",
                "pids": [gone],
            },
        ]
        await first.close()  # the connector stops; its watchers with it

        # A new manager (the restarted connector) reads what was persisted, as JSON.
        events = Recorded()
        second = make_manager(tmp_path, backend, on_event=events, **QUICK_RELEASE)
        broken = [{"kind": "nonsense"}, {"kind": "leaked", "gpu": "GPU-gone", "pids": []}, {}]
        problems = second.restore_held_after_stop(json.loads(json.dumps(entries)) + broken)
        assert problems == [
            "entry 2: unknown kind 'nonsense'",
            "entry 3: leaked GPU GPU-gone is not on this machine",
            "entry 4: unreadable (KeyError: 'kind')",
        ]
        assert second.held_after_stop() == entries
        view = second.machine_view()
        assert [(g["state"], g["owners"]) for g in view["gpus"]] == [
            ("allocated", ["Decode/1 (stopped; processes still running)"]),
            ("leaked", []),
        ]
        assert view["cpu"]["reserved_cores"] == 2.0
        assert exhausted(lambda: second.reserve("Decode/3", "Decode", GPU1)).details["holders"] == {
            U[0]: ["Decode/1 (stopped; processes still running)"],
            U[1]: ["leaked"],
        }

        backend.remove_pid(gone)  # the driver lets go of GPU 1
        await poll(lambda: second.machine_view()["gpus"][1]["state"] == "free")
        proc.kill()
        proc.wait()
        backend.remove_pid(proc.pid)
        await poll(lambda: second.held_after_stop() == [])
        assert [(f["outcome"], f["reason"]) for _, f in events] == [
            ("ok", "GPU-3916acc0… is free again"),
            ("ok", "Decode/1's processes exited; its resources are released"),
        ]
        assert second.machine_view()["cpu"]["reserved_cores"] == 0.0
        await second.close()
    finally:
        proc.kill()
        proc.wait()
        await first.close()


async def test_concurrent_releases_of_one_replica_share_one_wait(tmp_path: Path) -> None:
    backend = h100_backend(keep_captured_processes=False)
    events = Recorded()
    m = make_manager(tmp_path, backend, release_timeout_s=0.3, on_event=events)
    m.reserve("Decode/1", "Decode", GPU1)
    pid = dead_pid()
    backend.add_process(0, pid, GIB)
    try:
        first, second = await asyncio.gather(
            m.release("Decode/1", {pid}), m.release("Decode/1", {pid})
        )
        assert first == second == ReleaseResult("Decode/1", True, (H100_UUID,))
        assert [(kind, f["outcome"]) for kind, f in events] == [("leak", "failed")]
        assert len(m._leak_tasks) == 1
        # Done: a later call finds nothing to release.
        assert await m.release("Decode/1", {pid}) == ReleaseResult("Decode/1", True)
    finally:
        await m.close()


async def test_close_cancels_a_waiting_release_and_keeps_the_reservation(
    tmp_path: Path,
) -> None:
    m = make_manager(tmp_path, h100_backend(keep_captured_processes=False))
    r = m.reserve("Decode/1", "Decode", GPU1)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        release = asyncio.create_task(m.release("Decode/1", {proc.pid}))
        await poll(lambda: "Decode/1" in m._releases)
        await m.close()
        with pytest.raises(asyncio.CancelledError):
            await release
        assert m.reservation("Decode/1") == r
    finally:
        proc.kill()
        proc.wait()


async def test_close_stops_leak_watchers(tmp_path: Path) -> None:
    backend = h100_backend(keep_captured_processes=False)
    m = make_manager(tmp_path, backend, release_timeout_s=0.1)
    m.reserve("Decode/1", "Decode", GPU1)
    pid = dead_pid()
    backend.add_process(0, pid, GIB)
    await m.release("Decode/1", {pid})
    (task,) = m._leak_tasks
    await m.close()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    assert task.cancelled()


# --------------------------------------------------------------------------- machine view


def test_machine_view_is_exact(short_dir: Path) -> None:
    first = free_run(2)
    backend = h100_backend(keep_captured_processes=False)
    m = make_manager(short_dir, backend, port_range=(first, first + 1))
    half = m.reserve("Half/1", "Half", HALF)
    front = m.reserve(
        "Frontend/1",
        "Frontend",
        ResourceRequest(cpu=1, memory_bytes=GIB, pin_cpus=True),
        [PortSpec("http")],
        [SocketSpec("rpc")],
    )
    backend.add_process(0, 4242, 2 * GIB)  # "ours": the Half replica's process
    m.refresh(our_pids={4242})
    assert half.gpus == (H100_UUID,)
    assert m.machine_view() == {
        "gpus": [
            {
                "index": 0,
                "uuid": H100_UUID,
                "name": H100_NAME,
                "state": "allocated",
                "owners": ["Half/1"],
                "fraction_used": 0.5,
                "memory_total_bytes": H100_MEMORY_TOTAL,
                "foreign_memory_bytes": 0,
                "blocked_by_foreign": False,
                "mig_mode": False,
                "memory_used_bytes": 3794599936 - 3282042880 + 2 * GIB,
            }
        ],
        "free_gpus": 0,
        "gpu_backend": "ok",
        "cpu": {"allocatable_cores": 8.0, "reserved_cores": 1.0, "pinned": [0]},
        "memory": {"allocatable_bytes": MEMORY, "reserved_bytes": GIB},
        "ports": {"Frontend/1": {"http": first}},
        "sockets": {"Frontend/1": {"rpc": front.sockets["rpc"]}},
        "port_range": [first, first + 1],
        "lingering": [],
    }
    assert front.sockets["rpc"] == str(short_dir / "sock" / "frontend-1-rpc.sock")


def test_refresh_without_a_backend_is_a_no_op(tmp_path: Path) -> None:
    m = make_manager(tmp_path, None, gpu_reason="GPU backend disabled (gpu backend 'none')")
    m.refresh(our_pids={1})
    assert m.machine_view()["gpus"] == []
    assert m.machine_view()["gpu_backend"] == "GPU backend disabled (gpu backend 'none')"


def test_ports_are_bind_checked_before_a_start_without_holding_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The event loop takes the manager's lock to reserve (a plan step of many replicas);
    threads re-checking ports before starts held it across every bind, and the loop waited
    for them. Each bind now runs with the lock free, and a port taken meanwhile still moves."""
    import connector.resources.manager as manager_module

    first = free_run(3)
    m = make_manager(tmp_path, None, port_range=(first, first + 2))
    m.reserve("Decode/1", "Decode", ResourceRequest(), [PortSpec("http")])
    lock_free_during_bind: list[bool] = []
    real_port_free = manager_module.port_free

    def free_from_another_thread() -> bool:
        got = m._lock.acquire(blocking=False)
        if got:
            m._lock.release()
        return got

    def watched_port_free(port: int, reuse_address: bool = False) -> bool:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            lock_free_during_bind.append(pool.submit(free_from_another_thread).result())
        return real_port_free(port, reuse_address)

    monkeypatch.setattr(manager_module, "port_free", watched_port_free)
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", first))
    squatter.listen()
    with squatter:
        moved, lines = m.recheck_ports("Decode/1")
    assert moved is not None and moved.ports == {"http": first + 1}
    assert len(lines) == 1
    # The re-check of the reserved port, then the pick of its new one (a move is rare;
    # its pick binds under the lock, as a reservation's does).
    assert lock_free_during_bind == [True, False]
