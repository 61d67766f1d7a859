"""On a real GPU: a replica gets its GPU by UUID, is attributed by PID, and its GPU is given
back only after it exits. Runs only where NVML finds a GPU (``pytest -m gpu``)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import pytest

from connector.errors import ResourcesExhausted
from connector.graph.model import PortSpec, Readiness, ReadinessKind, ResourceRequest
from connector.resources.nvml import open_gpu_backend
from tests.core_helpers import alive, make_graph, pids, running, svc
from tests.servers import wait_until_async

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

# Holds 512 MiB on the GPU it was given, then opens its port (its readiness).
HOLDER = (
    "import os, socket, time, torch\n"
    "x = torch.empty(512 << 20, dtype=torch.uint8, device='cuda'); x.fill_(1)\n"
    "torch.cuda.synchronize()\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "time.sleep(600)\n"
)


async def _holds(backend: Any, pids: set[int | None], at_least: int) -> bool:
    """Whether NVML lists each of ``pids`` with ``at_least`` bytes of GPU memory."""
    samples = await asyncio.to_thread(backend.sample)
    listed = {p.pid: p.used_memory_bytes or 0 for s in samples for p in s.processes}
    return all(pid is not None and listed.get(pid, 0) >= at_least for pid in pids)


@pytest.fixture
def gpu_uuid(monkeypatch: pytest.MonkeyPatch) -> str:
    """The first GPU, and the only one the connector may hand out (its own
    ``CUDA_VISIBLE_DEVICES``), so the tests read the same on a machine with more GPUs."""
    backend, reason = open_gpu_backend("nvml")
    if backend is None:
        pytest.skip(f"no GPU: {reason}")
    try:
        uuid = backend.devices()[0].uuid
    finally:
        backend.close()
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", uuid)
    return uuid


async def test_replica_gets_its_gpu_and_releases_it_after_exit(
    tmp_path: Path, gpu_uuid: str
) -> None:
    pytest.importorskip("torch")
    graph = make_graph(
        svc(
            "Decode",
            (sys.executable, "-c", HOLDER),
            max_replicas=2,
            resources=ResourceRequest(gpu=1),
            ports=(PortSpec("main", "PORT"),),
            readiness=Readiness(kind=ReadinessKind.TCP, port="main", timeout_s=120),
        )
    )
    async with running(graph, tmp_path, gpu_backend="nvml") as conn:
        assert await conn.scale_component("Decode", 1, timeout_s=120)
        pid = pids(conn, "Decode")["Decode/1"]
        assert pid is not None
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        assert f"CUDA_VISIBLE_DEVICES={gpu_uuid}".encode() in environ
        machine = await conn.get_machine_resources()
        assert [g["uuid"] for g in machine["gpus"]] == [gpu_uuid]
        assert machine["gpus"][0]["owners"] == ["Decode/1"]
        assert machine["gpus"][0]["state"] == "allocated"
        # NVML attributes the memory to the replica's PID (it may list it a moment after
        # the replica opened its port).
        backend = conn.gpu_backend
        await wait_until_async(lambda: _holds(backend, {pid}, 512 << 20), timeout=30)
        samples = await asyncio.to_thread(backend.sample)
        mine = [p for s in samples for p in s.processes if p.pid == pid]
        assert mine and (mine[0].used_memory_bytes or 0) >= 512 << 20
        usage = await conn.get_resource_usage("Decode")
        assert usage["replicas"][0]["allocated"]["gpus"] == [gpu_uuid]
        # A second replica cannot have the only GPU.
        with pytest.raises(ResourcesExhausted, match="Decode replica 2 needs 1 GPU, 0 free"):
            await conn.scale_component("Decode", 2)
        assert await conn.scale_component("Decode", 0, timeout_s=60)
        assert not alive(pid)
        samples = await asyncio.to_thread(backend.sample)
        assert not [p for s in samples for p in s.processes if p.pid == pid]
        machine = await conn.get_machine_resources()
        assert machine["gpus"][0]["state"] == "free"


# Holds 256 MiB on the GPU it shares, then opens its port (its readiness).
SHARER = (
    "import os, socket, time, torch\n"
    "x = torch.empty(256 << 20, dtype=torch.uint8, device='cuda'); x.fill_(1)\n"
    "torch.cuda.synchronize()\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "time.sleep(600)\n"
)


async def test_half_gpu_replicas_share_the_gpu_and_each_is_attributed(
    tmp_path: Path, gpu_uuid: str
) -> None:
    pytest.importorskip("torch")
    graph = make_graph(
        svc(
            "Half",
            (sys.executable, "-c", SHARER),
            max_replicas=3,
            resources=ResourceRequest(gpu=0.5),
            ports=(PortSpec("main", "PORT"),),
            readiness=Readiness(kind=ReadinessKind.TCP, port="main", timeout_s=120),
        )
    )
    async with running(graph, tmp_path, gpu_backend="nvml") as conn:
        assert await conn.scale_component("Half", 2, timeout_s=120)
        replica_pids = pids(conn, "Half")
        for pid in replica_pids.values():
            assert pid is not None
            environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            assert f"CUDA_VISIBLE_DEVICES={gpu_uuid}".encode() in environ
            assert b"DYNAMO_LOCAL_GPU_MEMORY_FRACTION=0.5" in environ
        machine = await conn.get_machine_resources()
        (gpu,) = machine["gpus"]
        assert (gpu["owners"], gpu["fraction_used"]) == (["Half/1", "Half/2"], 1.0)
        backend = conn.gpu_backend
        await wait_until_async(
            lambda: _holds(backend, set(replica_pids.values()), 256 << 20), timeout=30
        )
        samples = await asyncio.to_thread(backend.sample)
        listed = {p.pid: p.used_memory_bytes for s in samples for p in s.processes}
        for pid in replica_pids.values():
            assert (listed.get(pid) or 0) >= 256 << 20, f"NVML lists {listed}, not PID {pid}"
        with pytest.raises(ResourcesExhausted) as info:
            await conn.scale_component("Half", 3)
        assert info.value.message == (
            f"Half replica 3 needs 0.5 of a GPU, 0 free; {gpu_uuid[:12]}… held by Half/1, Half/2"
        )
        assert await conn.scale_component("Half", 0, timeout_s=60)
        assert not any(alive(pid) for pid in replica_pids.values())
        machine = await conn.get_machine_resources()
        assert (machine["gpus"][0]["state"], machine["gpus"][0]["owners"]) == ("free", [])
