"""The aiohttp application: scaling and inspection API, /metrics, health, OpenAPI, status page.

Embeddable::

    app = create_app(connector, token="s3cret", exporter=exporter)
    server = await start_server(app, "127.0.0.1", 8787)
    ...
    await server.stop()

``dynamo-local up`` composes it with the connector and the exporter (see ``connector.cli.program``).
The connector's lifecycle stays with the caller: the app never starts or stops it.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from dataclasses import dataclass, replace
from importlib import resources
from typing import TYPE_CHECKING

from aiohttp import web

from connector.api.context import CONTEXT, ApiContext, ApiSettings, MetricsEndpoint
from connector.api.errors import errors_middleware
from connector.api.middleware import (
    auth_middleware,
    deadline_middleware,
    guard_middleware,
    validation_middleware,
)
from connector.api.openapi import build_openapi
from connector.api.routes import ROUTES, by_method_and_path
from connector.api.timeline import attach_live

if TYPE_CHECKING:
    from connector.local import LocalConnector

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8787
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})

_CONTENT_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".css": "text/css",
    ".svg": "image/svg+xml",
}


class BindRefused(ValueError):
    """The address would expose the API without a token."""


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind(host: str, token: str | None) -> None:
    """Refuse a non-loopback address without a token, with a message that says what to do."""
    if token or is_loopback(host):
        return
    raise BindRefused(
        f"refusing to listen on {host}: the API can scale and stop processes, so a "
        "non-loopback address needs a token (--token or DYNAMO_LOCAL_TOKEN); "
        "or listen on 127.0.0.1 and reach it through an SSH tunnel"
    )


def _load_static() -> dict[str, tuple[bytes, str]]:
    folder = resources.files("connector").joinpath("static")
    assets: dict[str, tuple[bytes, str]] = {}
    if not folder.is_dir():
        return assets
    for entry in folder.iterdir():
        suffix = "." + entry.name.rsplit(".", 1)[-1] if "." in entry.name else ""
        content_type = _CONTENT_TYPES.get(suffix)
        if entry.is_file() and content_type is not None:
            assets[entry.name] = (entry.read_bytes(), content_type)
    return assets


def create_app(
    connector: LocalConnector,
    *,
    token: str | None = None,
    auth_all: bool = False,
    exporter: MetricsEndpoint | None = None,
    request_shutdown: Callable[[], None] | None = None,
    settings: ApiSettings | None = None,
) -> web.Application:
    """The API application over ``connector`` (which the caller initializes and shuts down).

    ``token`` turns on bearer auth for mutating routes (every route but the status page
    assets and ``/healthz`` with ``auth_all``). ``exporter`` serves ``/metrics`` (503 JSON
    without it). ``request_shutdown`` is what ``POST /v1/shutdown`` calls (503 without it).
    ``settings`` holds limits and timings; ``token``/``auth_all`` given here win.
    """
    if token is not None and not token.strip():
        raise ValueError("the API token must not be empty")
    if auth_all and token is None:
        raise ValueError("auth_all needs a token")
    settings = replace(settings or ApiSettings(), token=token, auth_all=auth_all)
    app = web.Application(
        middlewares=[
            errors_middleware,
            guard_middleware,
            auth_middleware,
            deadline_middleware,
            validation_middleware,
        ],
        client_max_size=settings.max_body_bytes,
    )
    ctx = ApiContext(
        connector=connector,
        settings=settings,
        exporter=exporter,
        request_shutdown=request_shutdown,
        routes=by_method_and_path(),
        openapi=build_openapi(
            token=token is not None,
            auth_all=auth_all,
            host_guard=settings.allowed_hosts is not None,
        ),
        static=_load_static(),
    )
    app[CONTEXT] = ctx
    attach_live(app, connector)  # experiments and the live timeline; stopped with the app
    for route in ROUTES:
        if route.method == "GET":
            app.router.add_get(route.path, route.handler)
        else:
            app.router.add_route(route.method, route.path, route.handler)

    async def say_goodbye(_: web.Application) -> None:
        ctx.closing.set()  # live event streams send "shutdown" and end

    app.on_shutdown.append(say_goodbye)
    return app


@dataclass
class RunningServer:
    """A started server; ``url`` has the real port when 0 was asked for."""

    runner: web.AppRunner
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        await self.runner.cleanup()


async def start_server(
    app: web.Application, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT
) -> RunningServer:
    """Listen on ``host:port`` (0 picks a free port). Checks the bind rule first."""
    check_bind(host, app[CONTEXT].settings.token)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=5.0)
    await runner.setup()
    site = web.TCPSite(runner, host, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {reason}") from exc
    bound = port
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            bound = int(address[1])
            break
    return RunningServer(runner, host, bound)


def loopback_hosts(host: str) -> frozenset[str]:
    """Host header values a loopback-bound server accepts (the DNS-rebinding guard)."""
    return frozenset(LOOPBACK_NAMES | {host.lower().strip("[]")})
