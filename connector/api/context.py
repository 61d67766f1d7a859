"""What every handler of one application shares: the connector, the settings, the route table."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from aiohttp import web

if TYPE_CHECKING:
    from connector.api.spec import Route
    from connector.local import LocalConnector


class MetricsEndpoint(Protocol):
    """The exporter as the server sees it: one aiohttp handler for ``GET /metrics``."""

    @property
    def handle_metrics(self) -> Callable[[web.Request], Awaitable[web.StreamResponse]]: ...


@dataclass
class ApiSettings:
    """Limits and timings; the defaults are what ``dynamo-local up`` serves with."""

    token: str | None = None
    auth_all: bool = False
    max_body_bytes: int = 64 * 1024
    request_timeout_s: float = 30.0
    heartbeat_s: float = 15.0
    readiness_timeout_s: float = 2.0
    # Host header values accepted (DNS-rebinding guard); None accepts any.
    allowed_hosts: Collection[str] | None = None


@dataclass
class ApiContext:
    connector: LocalConnector
    settings: ApiSettings
    exporter: MetricsEndpoint | None = None
    request_shutdown: Callable[[], None] | None = None
    routes: dict[tuple[str, str], Route] = field(default_factory=dict)  # (method, path)
    openapi: dict[str, Any] = field(default_factory=dict)
    static: dict[str, tuple[bytes, str]] = field(default_factory=dict)  # name -> body, type
    started_at: float = field(default_factory=time.monotonic)
    # Set when the server stops: live event streams say goodbye and end.
    closing: asyncio.Event = field(default_factory=asyncio.Event)


CONTEXT = web.AppKey("dynamo_local_api", ApiContext)

# Per-request values set by the validation middleware (web.RequestKey: aiohttp >= 3.13).
QUERY: web.RequestKey[dict[str, Any]] = web.RequestKey("dynamo_local_query")
BODY: web.RequestKey[dict[str, Any]] = web.RequestKey("dynamo_local_body")  # {} if none


def context(request: web.Request) -> ApiContext:
    return request.app[CONTEXT]
