"""Core benchmark: what the connector adds on top of a bare Circus spawn, and fan-out.

1. Spawn overhead. ``scale_component(c, n + 1, blocking=True)`` until the new replica is
   ready (readiness ``none``, so the worker's own start-up is excluded), against the same
   spawn done with Circus's own client (``add`` with start, then ``list`` until the pid is
   visible: what ``circusctl add --start`` does), on the same circusd kind, in one run.
   Target: overhead <= 50 ms median.
2. Fan-out. Wall time of ``0 -> 16`` replicas against ``0 -> 1`` for a worker that takes
   ``--startup`` seconds to become ready (it opens its TCP port only then; readiness ``tcp``).
   Target: 0 -> 16 <= 1.5x one.

    python -m bench.core_bench [--samples 20] [--fanout 16] [--startup 0.5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

from circus.client import CircusClient

from connector.graph.model import Graph, PortSpec, Readiness, ReadinessKind, Role, Service
from connector.local import ConnectorOptions, LocalConnector
from connector.supervision.circus import start_circusd, stop_circusd

WORKER = (
    "import socket, sys, time, os\n"
    "time.sleep(float(sys.argv[1]))\n"
    "s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
    "time.sleep(600)\n"
)


def _ms(values: list[float]) -> str:
    med, lo, hi = statistics.median(values) * 1000, min(values) * 1000, max(values) * 1000
    return f"median {med:7.2f} ms  (min {lo:.2f}, max {hi:.2f})"


async def bare_circus_spawns(tmp: Path, samples: int) -> list[float]:
    info = await start_circusd(tmp / "bare")
    client = CircusClient(endpoint=info.endpoint, timeout=5)

    def one(i: int) -> float:
        t0 = time.perf_counter()
        client.call(
            {
                "command": "add",
                "properties": {
                    "name": f"bare.w.{i}",
                    "cmd": "sleep",
                    "args": ["600"],
                    "start": True,
                    "options": {"respawn": False},
                },
            }
        )
        while not client.call({"command": "list", "properties": {"name": f"bare.w.{i}"}}).get(
            "pids"
        ):
            pass
        return time.perf_counter() - t0

    try:
        return [await asyncio.to_thread(one, i) for i in range(samples)]
    finally:
        client.stop()
        await stop_circusd(info, None)


def _graph(startup: float | None) -> Graph:
    if startup is None:
        service = Service(
            name="W",
            role=Role.WORKER,
            command=("sleep", "600"),
            max_replicas=64,
            readiness=Readiness(kind=ReadinessKind.NONE),
        )
    else:
        service = Service(
            name="W",
            role=Role.WORKER,
            command=(sys.executable, "-c", WORKER, str(startup)),
            max_replicas=64,
            ports=(PortSpec("main", "PORT"),),
            readiness=Readiness(kind=ReadinessKind.TCP, port="main", period_s=0.01),
        )
    return Graph(name="bench", namespace="bench", services={"W": service})


async def connector_spawns(tmp: Path, samples: int) -> list[float]:
    options = ConnectorOptions(discovery="none", gpu_backend="none")
    async with LocalConnector("bench", _graph(None), tmp / "ours", options) as conn:
        out = []
        for n in range(samples):
            t0 = time.perf_counter()
            ok = await conn.scale_component("W", n + 1, timeout_s=30)
            out.append(time.perf_counter() - t0)
            assert ok, f"scale to {n + 1} did not converge"
        return out


async def fanout(tmp: Path, k: int, startup: float) -> tuple[float, float]:
    options = ConnectorOptions(discovery="none", gpu_backend="none")
    async with LocalConnector("fan", _graph(startup), tmp / "fan", options) as conn:
        t0 = time.perf_counter()
        assert await conn.scale_component("W", 1, timeout_s=60)
        one = time.perf_counter() - t0
        assert await conn.scale_component("W", 0, timeout_s=60)
        t0 = time.perf_counter()
        assert await conn.scale_component("W", k, timeout_s=120)
        many = time.perf_counter() - t0
        return one, many


async def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=20)
    ap.add_argument("--fanout", type=int, default=16)
    ap.add_argument("--startup", type=float, default=0.5)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dl-core-bench-") as d:
        tmp = Path(d)
        bare = await bare_circus_spawns(tmp, args.samples)
        ours = await connector_spawns(tmp, args.samples)
        overhead = statistics.median(ours) - statistics.median(bare)
        print("spawn to visible/ready, one replica at a time")
        print(f"  bare circus add+list : {_ms(bare)}")
        print(f"  scale_component n+1  : {_ms(ours)}")
        print(
            f"  overhead (median)    : {overhead * 1000:7.2f} ms   target <= 50 ms  "
            f"{'OK' if overhead <= 0.05 else 'MISSED'}"
        )
        print(f"  ratio ours/bare      : {statistics.median(ours) / statistics.median(bare):.2f}x")
        one, many = await fanout(tmp, args.fanout, args.startup)
        ratio = many / one
        print(f"fan-out, worker start-up {args.startup:g} s")
        print(f"  0 -> 1               : {one * 1000:7.1f} ms")
        print(f"  0 -> {args.fanout:<2d}              : {many * 1000:7.1f} ms")
        print(
            f"  ratio                : {ratio:.2f}x   target <= 1.5x  "
            f"{'OK' if ratio <= 1.5 else 'MISSED'}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
