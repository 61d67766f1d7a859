"""Helpers for tests of the HTTP API, the CLI and the status page: a real connector under a
real circusd, served by the real app on a free loopback port."""

from __future__ import annotations

import contextlib
import json
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from connector.api.context import ApiSettings
from connector.api.server import RunningServer, create_app, start_server
from connector.graph.model import (
    Graph,
    Readiness,
    ReadinessKind,
    RestartPolicy,
    Role,
    SubComponentType,
)
from connector.local import LocalConnector
from tests.core_helpers import make_graph, options, svc

QUICK = Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.2)
SLOW = Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=30.0)
TALK = (
    sys.executable,
    "-c",
    # One write per line: Circus stamps each chunk it reads, and print() may hand a line
    # and its newline over in two writes.
    "import sys, time\n"
    "sys.stdout.write('hello from talker\\n'); sys.stdout.flush()\n"
    "sys.stderr.write('oops on stderr\\n'); sys.stderr.flush()\n"
    "time.sleep(300)",
)
CRASH = (sys.executable, "-c", "import sys; sys.exit(3)")
CRASH_FAST = RestartPolicy(backoff_base_s=0.05, backoff_max_s=0.1, crashloop_failures=2)


def api_graph() -> Graph:
    """Five cheap components: each test scales them within their small bounds."""
    return make_graph(
        svc("Frontend", role=Role.FRONTEND, replicas=1, max_replicas=2, readiness=QUICK),
        svc(
            "Prefill",
            sub_component_type=SubComponentType.PREFILL,
            replicas=0,
            max_replicas=3,
            readiness=QUICK,
        ),
        svc(
            "Decode",
            sub_component_type=SubComponentType.DECODE,
            replicas=1,
            max_replicas=3,
            readiness=QUICK,
        ),
        svc("Talker", TALK, replicas=1, max_replicas=1, readiness=QUICK),
        svc("Slow", replicas=0, max_replicas=1, readiness=SLOW),
        svc("Crashy", CRASH, replicas=0, max_replicas=1, readiness=QUICK, restart=CRASH_FAST),
        name="apitest",
    )


@dataclass
class Served:
    connector: LocalConnector
    server: RunningServer
    http: aiohttp.ClientSession
    shutdown_calls: list[float]

    @property
    def url(self) -> str:
        return self.server.url

    async def call(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        raw: bytes | None = None,
        headers: dict[str, str] | None = None,
        token: str | None = None,
    ) -> tuple[int, Any, aiohttp.ClientResponse]:
        """One request; returns status, decoded JSON (or text) and the response."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data: bytes | None = raw
        if body is not None:
            data = json.dumps(body).encode()
            sent.setdefault("Content-Type", "application/json")
        async with self.http.request(method, self.url + path, data=data, headers=sent) as resp:
            text = await resp.text()
            parsed: Any = text
            if resp.content_type == "application/json":
                parsed = json.loads(text)
            return resp.status, parsed, resp


@contextlib.asynccontextmanager
async def serve(
    working_dir: Path,
    graph: Graph | None = None,
    *,
    token: str | None = None,
    auth_all: bool = False,
    exporter: Any = None,
    settings: ApiSettings | None = None,
    with_shutdown: bool = True,
    on_shutdown: Callable[[], None] | None = None,
    **connector_options: Any,
) -> AsyncIterator[Served]:
    conn = LocalConnector("t", graph or api_graph(), working_dir, options(**connector_options))
    await conn.initialize()
    calls: list[float] = []

    def record_shutdown() -> None:
        import time

        calls.append(time.time())
        if on_shutdown is not None:
            on_shutdown()

    try:
        app = create_app(
            conn,
            token=token,
            auth_all=auth_all,
            exporter=exporter,
            request_shutdown=record_shutdown if with_shutdown else None,
            settings=settings,
        )
        server = await start_server(app, "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                yield Served(conn, server, http, calls)
        finally:
            await server.stop()
    finally:
        await conn.shutdown()


def error_of(body: Any) -> dict[str, Any]:
    """The ``error`` object of an error body, checking the envelope on the way."""
    assert isinstance(body, dict), body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"code", "message", "details"}, error
    assert isinstance(error["message"], str) and error["message"]
    assert "Traceback" not in error["message"]
    return dict(error)
