"""Scale benchmark: many replicas up and down, against bare circusd in the same run.

For ``sleep`` replicas (readiness ``none``, exit on SIGTERM at once):

1. ``0 -> N`` through ``scale_component`` against bare circusd ``add`` (with start) of N
   watchers one after the other through Circus's own client. Target: <= 1.5x.
2. ``N -> 0``. Target: <= 3 s for N = 512.
3. ``shutdown()`` with N running (what Ctrl-C does). Target: <= 5 s for N = 512.
4. State writes during ``N -> 0`` (coalesced: far fewer than N) and the connector's RSS
   with N running. Target: <= 100 MB at 512.

    python -m bench.scale_bench [--replicas 512]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

import psutil
from circus.client import CircusClient

from connector.graph import Graph, Readiness, ReadinessKind, Role, Service
from connector.local import ConnectorOptions, LocalConnector
from connector.supervisor import start_circusd, stop_circusd


def _graph(n: int) -> Graph:
    svc = Service(
        name="Sleep",
        role=Role.WORKER,
        command=("sleep", "600"),
        replicas=0,
        readiness=Readiness(kind=ReadinessKind.NONE),
        graceful_stop_s=2.0,
    )
    return Graph(name="bench", namespace="bench", services={"Sleep": svc})


async def bare_circus_adds(tmp: Path, n: int) -> float:
    info = await start_circusd(tmp / "bare")
    client = CircusClient(endpoint=info.endpoint, timeout=30)

    def add_all() -> float:
        t0 = time.perf_counter()
        for i in range(n):
            command = {
                "command": "add",
                "properties": {
                    "name": f"bare.w.{i}",
                    "cmd": "sleep",
                    "args": ["600"],
                    "start": True,
                    "waiting": True,  # until the process runs, as the connector waits
                    "options": {"respawn": False},
                },
            }
            # circusd runs one state-changing command at a time and answers errno 5 to the
            # next one meanwhile: retried, as any client must (the connector does too).
            while (reply := client.call(command)).get("status") != "ok":
                if reply.get("errno") != 5:
                    raise RuntimeError(f"circusd refused add: {reply}")
                time.sleep(0.001)
        return time.perf_counter() - t0

    try:
        return await asyncio.to_thread(add_all)
    finally:
        client.stop()
        await stop_circusd(info, None)


async def connector_round(tmp: Path, n: int) -> dict[str, float]:
    options = ConnectorOptions(discovery="none", gpu_backend="none", max_replicas=max(n, 64))
    conn = LocalConnector("bench", _graph(n), tmp / "wd", options)
    await conn.initialize()
    me = psutil.Process()
    try:
        t0 = time.perf_counter()
        assert await conn.scale_component("Sleep", n, timeout_s=600)
        up = time.perf_counter() - t0
        rss = me.memory_info().rss
        writes = conn.store.writes_total
        t0 = time.perf_counter()
        assert await conn.scale_component("Sleep", 0, timeout_s=600)
        down = time.perf_counter() - t0
        down_writes = conn.store.writes_total - writes
        assert await conn.scale_component("Sleep", n, timeout_s=600)
        t0 = time.perf_counter()
    finally:
        await conn.shutdown()
    shutdown = time.perf_counter() - t0
    return {
        "up": up,
        "down": down,
        "shutdown": shutdown,
        "rss_mb": rss / 2**20,
        "down_writes": float(down_writes),
    }


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replicas", type=int, default=512)
    args = parser.parse_args(argv)
    n = args.replicas
    with tempfile.TemporaryDirectory(prefix="dl-scale-") as tmp:
        bare = await bare_circus_adds(Path(tmp), n)
        got = await connector_round(Path(tmp), n)
    cores = len(psutil.Process().cpu_affinity() or [])
    print(f"scale bench, {n} sleep replicas, {cores} cores")
    print(f"  bare circusd add x{n}:        {bare:7.2f} s")
    print(f"  connector 0 -> {n}:            {got['up']:7.2f} s  ({got['up'] / bare:.2f}x bare)")
    print(f"  connector {n} -> 0:            {got['down']:7.2f} s")
    print(f"  shutdown with {n} running:     {got['shutdown']:7.2f} s")
    print(f"  state writes during {n} -> 0:  {got['down_writes']:7.0f}")
    print(f"  connector RSS with {n}:        {got['rss_mb']:7.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
