"""Real NVML: a replica's GPU memory is attributed by PID over its process tree (-m gpu)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import pytest

from exporter.exposition import Format
from exporter.service import build_exporter
from tests.core_helpers import wait_until
from tests.exporter_helpers import FakeReader, Tree, component, replica, series_with, view_of

pytestmark = pytest.mark.gpu

ALLOC = (
    "import sys, time, torch\n"
    "x = torch.ones(1 << 30, dtype=torch.uint8, device='cuda')\n"
    "open(sys.argv[1], 'w').write('ready')\n"
    "time.sleep(120)\n"
)


async def test_gpu_memory_of_a_child_process_is_attributed_to_its_replica(
    tmp_path: Path,
) -> None:
    pytest.importorskip("torch")
    from connector.resources.nvml import open_gpu_backend

    backend, reason = open_gpu_backend("nvml")
    if backend is None:
        pytest.skip(f"no NVML GPU: {reason}")
    ready = tmp_path / "ready"
    # The CUDA process is a child of the replica's root, as a vLLM engine is.
    script = tmp_path / "alloc.py"
    script.write_text(ALLOC)
    tree = Tree(subprocess.Popen(["sh", "-c", f'"{sys.executable}" {script} {ready} & wait']))
    try:
        deadline = time.monotonic() + 120
        while not ready.exists():
            assert time.monotonic() < deadline, "the CUDA child did not allocate within 120 s"
            await asyncio.sleep(0.1)
        (uuid, *_) = [d.uuid for d in backend.devices()]

        def child_listed() -> bool:
            # NVML may list the child's memory a moment after the child wrote "ready".
            tree_pids = {tree.pid, *tree.child_pids()}
            processes = [p for s in backend.sample() if s.uuid == uuid for p in s.processes]
            return any(
                p.pid in tree_pids and (p.used_memory_bytes or 0) >= 1 << 30 for p in processes
            )

        await wait_until(child_listed, limit_s=30)
        reader = FakeReader(
            view_of(
                (component("decode"),),
                (replica("decode", 0, tree.pid, create_time=tree.create_time(), gpus=(uuid,)),),
                taken_at=1.0,
            )
        )
        exporter = build_exporter(reader, gpu_backend=backend, interval_s=3600.0)
        await exporter.start()
        try:
            await exporter.sample_once()
            text = exporter.exposition.render(Format.TEXT)
        finally:
            await exporter.stop()
        (line,) = series_with(text, "replica_gpu_memory_used_bytes", f'gpu="{uuid}"').values()
        assert line >= 1 << 30
        assert series_with(text, "dynamo_local_gpu_memory_total_bytes", uuid)
        usage = exporter.component_metrics("decode")
        assert usage["totals"]["gpu_memory_used_bytes"] == line
    finally:
        tree.kill()
        backend.close()
