"""Discovery benchmark: readiness latency and the stale-entry window, against real etcd.

1. Readiness latency: a replica of the mock worker registers in etcd; we measure from the
   moment its key appears (seen by an independent watch) to the moment the blocking
   ``scale_component`` call returns, and, in the same run, what Dynamo's old connector did:
   polling discovery every 5 s from spawn (a real poller runs alongside).
2. Stale window: a registered replica is SIGKILLed; we measure from the kill to its key
   being gone, ours (lease revoked at exit) against an unmanaged worker killed the same way,
   whose key lives until its lease expires (TTL ``--ttl``; Dynamo's default is 30 s, and the
   window scales with it).

    python -m bench.discovery_bench [--samples 5] [--ttl 10]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aetcd

from connector.dynamo.discovery.etcd import etcd_endpoint
from connector.graph.model import Graph, PortSpec, Readiness, ReadinessKind, Role, Service
from connector.local import ConnectorOptions, LocalConnector
from tests.servers import EtcdServer

POLL_S = 5.0


def _graph() -> Graph:
    worker = Service(
        name="Decode",
        role=Role.WORKER,
        command=(sys.executable, "-m", "connector.mockworker"),
        args=("--role", "worker", "--endpoint", "generate", "--startup-delay", "0.3"),
        max_replicas=16,
        ports=(PortSpec("system", "DYN_SYSTEM_PORT"), PortSpec("rpc", "DYN_TCP_RPC_PORT")),
        readiness=Readiness(kind=ReadinessKind.DISCOVERY, component="backend", timeout_s=30),
        graceful_stop_s=5,
    )
    return Graph(name="bench", namespace="bench", services={"Decode": worker})


async def _key_times(
    client: aetcd.Client, seen: dict[bytes, float], gone: dict[bytes, float]
) -> None:
    watch = await client.watch_prefix(b"v1/instances/")
    async for event in watch:
        key = event.kv.key
        if event.kind == aetcd.EventKind.PUT:
            seen.setdefault(key, time.monotonic())
        else:
            gone[key] = time.monotonic()


async def _poller(client: aetcd.Client, since: float, result: list[float]) -> None:
    """Dynamo's old approach: look every 5 s after spawn."""
    while True:
        await asyncio.sleep(POLL_S - (time.monotonic() - since) % POLL_S)
        if len(await client.get_prefix(b"v1/instances/", keys_only=True)):
            result.append(time.monotonic())
            return


async def run(samples: int, ttl: int) -> None:
    with tempfile.TemporaryDirectory(prefix="dl-disc-bench-") as d:
        tmp = Path(d)
        etcd = EtcdServer(tmp / "etcd")
        etcd.start()
        try:
            host, port = etcd_endpoint(etcd.url)
            client = aetcd.Client(host=host, port=port)
            seen: dict[bytes, float] = {}
            gone: dict[bytes, float] = {}
            watcher = asyncio.create_task(_key_times(client, seen, gone))
            await asyncio.sleep(0.2)
            options = ConnectorOptions(discovery="etcd", etcd_url=etcd.url, gpu_backend="none")
            ours_ready: list[float] = []
            polled: list[float] = []
            stale_ours: list[float] = []
            async with LocalConnector("bench", _graph(), tmp / "wd", options) as conn:
                for _ in range(samples):
                    spawn = time.monotonic()
                    poll_seen: list[float] = []
                    poller = asyncio.create_task(_poller(client, spawn, poll_seen))
                    before = set(seen)
                    assert await conn.scale_component("Decode", 1, timeout_s=30)
                    returned = time.monotonic()
                    key = next(k for k in seen if k not in before)
                    ours_ready.append(returned - seen[key])
                    await poller
                    polled.append(poll_seen[0] - seen[key])
                    pid = conn.state.replicas_of("Decode")[0].pid
                    assert pid is not None
                    killed = time.monotonic()
                    os.kill(pid, signal.SIGKILL)
                    while key not in gone:
                        await asyncio.sleep(0.002)
                    stale_ours.append(gone[key] - killed)
                    assert await conn.scale_component("Decode", 0, timeout_s=30)
                    seen.pop(key, None)
                    gone.pop(key, None)
            # An unmanaged worker: nothing revokes its lease when it dies.
            env = {
                **os.environ,
                "DYN_NAMESPACE": "bench",
                "DYN_COMPONENT": "backend",
                "DYN_DISCOVERY_BACKEND": "etcd",
                "ETCD_ENDPOINTS": etcd.url,
                "ETCD_LEASE_TTL": str(ttl),
                "DYN_TCP_RPC_PORT": "0",
            }
            before = set(seen)
            proc = subprocess.Popen(
                [sys.executable, "-m", "connector.mockworker"], env=env, stdout=subprocess.DEVNULL
            )
            while not set(seen) - before:
                await asyncio.sleep(0.01)
            key = next(iter(set(seen) - before))
            killed = time.monotonic()
            proc.kill()
            proc.wait()
            while key not in gone:
                await asyncio.sleep(0.01)
            expiry = gone[key] - killed
            watcher.cancel()
            await client.close()
        finally:
            etcd.stop()
    med = statistics.median
    print("readiness latency: key visible -> blocking scale returns")
    print(f"  ours (event-driven watch)  : median {med(ours_ready) * 1000:8.1f} ms")
    print(f"  5 s polling (old connector): median {med(polled) * 1000:8.1f} ms")
    print(f"  ratio polling/ours         : {med(polled) / med(ours_ready):8.1f}x")
    print("stale window: SIGKILL -> entry gone")
    print(
        f"  ours (lease revoked at exit): median {med(stale_ours) * 1000:7.1f} ms  "
        f"(target < 500 ms: {'OK' if med(stale_ours) < 0.5 else 'MISSED'})"
    )
    print(f"  lease expiry (TTL {ttl} s)     : {expiry * 1000:9.1f} ms")
    print(f"  ratio expiry/ours           : {expiry / med(stale_ours):8.1f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--ttl", type=int, default=10)
    args = ap.parse_args(argv)
    asyncio.run(run(args.samples, args.ttl))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
