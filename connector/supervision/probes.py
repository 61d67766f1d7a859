"""Readiness probes: how a replica proves it is ready.

A probe is retried every ``period_s`` until it passes, the replica dies, or the readiness
timeout expires. The discovery probe (registered in Dynamo's discovery) is event-driven and
plugged in by the connector when a discovery backend is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import aiohttp

from connector.graph import templates
from connector.graph.model import Readiness, ReadinessKind


@dataclass
class ProbeTarget:
    replica_id: str
    pid: int
    spawned_at: float
    ports: dict[str, int] = field(default_factory=dict)
    sockets: dict[str, str] = field(default_factory=dict)
    alive: Callable[[], bool] = lambda: True
    gpu: dict[str, str] | None = None  # {gpu.*} template values; None: holds no GPU


# (ready, reason when not): the reason says what discovery listed instead.
DiscoveryProbe = Callable[[ProbeTarget, Readiness, float], Awaitable[tuple[bool, str]]]


async def _http_ok(url: str, session: aiohttp.ClientSession) -> bool:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            return 200 <= resp.status < 300
    except (aiohttp.ClientError, TimeoutError, OSError):
        return False


async def _tcp_ok(port: int) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 1.0)
    except (OSError, TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def _tcp_port(readiness: Readiness, target: ProbeTarget) -> int:
    port = readiness.port
    if isinstance(port, int):
        return port
    if port is None:
        raise ValueError("tcp readiness needs a port")
    if port.isdigit():
        return int(port)
    return target.ports[port]


async def wait_ready(
    target: ProbeTarget,
    readiness: Readiness,
    *,
    discovery_probe: DiscoveryProbe | None = None,
) -> tuple[bool, str]:
    """Wait until the replica is ready. Returns (ready, reason-if-not)."""
    deadline = time.monotonic() + readiness.timeout_s
    kind = readiness.kind
    if kind is ReadinessKind.NONE:
        return True, ""
    if kind is ReadinessKind.DISCOVERY and discovery_probe is None and readiness.default:
        kind = ReadinessKind.PROCESS  # the role's default, and no discovery runs
    if kind is ReadinessKind.PROCESS:
        wait = target.spawned_at + readiness.startup_grace_s - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        alive = await asyncio.to_thread(target.alive)
        return (True, "") if alive else (False, "process exited during start-up")
    if kind is ReadinessKind.DISCOVERY:
        if discovery_probe is None:
            return False, "discovery readiness needs a discovery backend"
        return await discovery_probe(target, readiness, deadline)

    url = templates.expand(
        readiness.url or "", templates.values_of(target.ports, target.sockets, target.gpu)
    )
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if not await asyncio.to_thread(target.alive):
                return False, "process exited during start-up"
            if kind is ReadinessKind.HTTP:
                if await _http_ok(url, session):
                    return True, ""
            elif await _tcp_ok(_tcp_port(readiness, target)):
                return True, ""
            await asyncio.sleep(readiness.period_s)
    return False, f"{kind.value} readiness did not pass within {readiness.timeout_s:g} s"
