"""Helpers for tests that run real graphs under a real circusd through LocalConnector."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import psutil

from connector.graph.model import (
    Graph,
    Readiness,
    ReadinessKind,
    RestartPolicy,
    Role,
    Service,
)
from connector.local import ConnectorOptions, LocalConnector

SLEEP = ("sleep", "300")
FAST_RESTART = RestartPolicy(backoff_base_s=0.05, backoff_max_s=0.2, crashloop_failures=4)


def svc(
    name: str,
    command: tuple[str, ...] = SLEEP,
    *,
    replicas: int = 0,
    readiness: Readiness | None = None,
    **kw: Any,
) -> Service:
    return Service(
        name=name,
        role=kw.pop("role", Role.WORKER),
        command=command,
        replicas=replicas,
        readiness=readiness or Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.1),
        **kw,
    )


def python_cmd(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def make_graph(*services: Service, name: str = "test") -> Graph:
    return Graph(name=name, namespace=name, services={s.name: s for s in services})


def options(**kw: Any) -> ConnectorOptions:
    kw.setdefault("discovery", "none")
    kw.setdefault("gpu_backend", "none")
    return ConnectorOptions(**kw)


@contextlib.asynccontextmanager
async def running(
    graph: Graph, working_dir: Path, namespace: str = "t", **opts: Any
) -> AsyncIterator[LocalConnector]:
    conn = LocalConnector(namespace, graph, working_dir, options(**opts))
    await conn.initialize()
    try:
        yield conn
    finally:
        await conn.shutdown()


async def wait_until(
    pred: Callable[[], bool], limit_s: float = 10.0, interval: float = 0.02
) -> None:
    deadline = time.monotonic() + limit_s
    while not pred():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {limit_s} s")
        await asyncio.sleep(interval)


def replica_ids(conn: LocalConnector, component: str) -> list[str]:
    return [r.replica_id for r in conn.state.replicas_of(component)]


def phases(conn: LocalConnector, component: str) -> dict[str, str]:
    return {r.replica_id: r.phase for r in conn.state.replicas_of(component)}


def pids(conn: LocalConnector, component: str) -> dict[str, int | None]:
    return {r.replica_id: r.pid for r in conn.state.replicas_of(component)}


def alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def kinds(conn: LocalConnector, kind: str, component: str | None = None) -> list[Any]:
    return [
        e
        for e in conn.events.since(0)
        if e.kind == kind and (component is None or e.component == component)
    ]
