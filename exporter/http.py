"""``GET /metrics`` for aiohttp: Prometheus text or OpenMetrics by content negotiation.

OpenMetrics (what Prometheus asks for first) carries the exemplars (trace ids on the scale
duration histogram); the classic text format is served otherwise. The body comes from the
latest snapshot's cached rendering (see :mod:`exporter.exposition`), assembled in a worker
thread, so a scrape neither samples anything nor blocks the event loop. gzip when the
scraper accepts it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.Response]]


class BodySource(Protocol):
    def body(self, accept: str, accept_encoding: str) -> tuple[bytes, dict[str, str]]: ...


def metrics_handler(exposition: BodySource) -> Handler:
    """An aiohttp handler serving ``exposition`` (e.g. ``exporter.exposition``)."""

    async def handle(request: web.Request) -> web.Response:
        body, headers = await asyncio.to_thread(
            exposition.body,
            request.headers.get("Accept", ""),
            request.headers.get("Accept-Encoding", ""),
        )
        return web.Response(body=body, headers=headers)

    return handle


def add_metrics_route(app: web.Application, exposition: BodySource, path: str = "/metrics") -> None:
    app.router.add_get(path, metrics_handler(exposition))
