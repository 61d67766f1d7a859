"""On a real GPU: a replica gets its GPU by UUID, is attributed by PID, and its GPU is given
back only after it exits. Runs only where NVML finds a GPU (``pytest -m gpu``)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from connector.graph import PortSpec, Readiness, ReadinessKind, ResourceRequest
from connector.nvml import open_gpu_backend
from tests.core_helpers import alive, make_graph, pids, running, svc

pytestmark = [pytest.mark.gpu, pytest.mark.integration]

# Holds 512 MiB on the GPU it was given, then opens its port (its readiness).
HOLDER = (
    "import os, socket, time, torch\n"
    "x = torch.empty(512 << 20, dtype=torch.uint8, device='cuda'); x.fill_(1)\n"
    "torch.cuda.synchronize()\n"
    "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "time.sleep(600)\n"
)


@pytest.fixture
def gpu_uuid() -> str:
    backend, reason = open_gpu_backend("nvml")
    if backend is None:
        pytest.skip(f"no GPU: {reason}")
    try:
        return backend.devices()[0].uuid
    finally:
        backend.close()


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
        assert machine["gpus"][0]["owners"] == ["Decode/1"]
        assert machine["gpus"][0]["state"] == "allocated"
        # NVML attributes the memory to the replica's PID.
        backend = conn._resource_manager.gpu_backend
        samples = await asyncio.to_thread(backend.sample)
        mine = [p for s in samples for p in s.processes if p.pid == pid]
        assert mine and (mine[0].used_memory_bytes or 0) >= 512 << 20
        usage = await conn.get_resource_usage("Decode")
        assert usage["replicas"][0]["allocated"]["gpus"] == [gpu_uuid]
        # A second replica cannot have the only GPU.
        from connector.errors import ResourcesExhausted

        with pytest.raises(ResourcesExhausted, match="Decode replica 2 needs 1 GPU, 0 free"):
            await conn.scale_component("Decode", 2)
        assert await conn.scale_component("Decode", 0, timeout_s=60)
        assert not alive(pid)
        samples = await asyncio.to_thread(backend.sample)
        assert not [p for s in samples for p in s.processes if p.pid == pid]
        machine = await conn.get_machine_resources()
        assert machine["gpus"][0]["state"] == "free"
