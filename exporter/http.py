"""``GET /metrics`` for aiohttp: Prometheus text or OpenMetrics by content negotiation.

OpenMetrics (what Prometheus asks for first) carries the exemplars (trace ids on the scale
duration histogram); the classic text format is served otherwise. The exposition is
rendered in a worker thread from the latest snapshot, so a scrape neither samples anything
nor blocks the event loop. gzip when the scraper accepts it.
"""

from __future__ import annotations

import asyncio
import gzip
from collections.abc import Awaitable, Callable
from typing import Protocol

from aiohttp import web
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector

Handler = Callable[[web.Request], Awaitable[web.Response]]


class Exposable(Protocol):
    """What the handler needs: a registry, and a cheap hook run on the loop before rendering."""

    @property
    def registry(self) -> Collector: ...

    def refresh_view(self) -> None: ...


def render_exposition(
    registry: Collector, accept: str, accept_encoding: str
) -> tuple[bytes, dict[str, str]]:
    """Body and headers for one scrape (blocking: call it in a thread)."""
    encoder, content_type = choose_encoder(accept)
    body = encoder(registry)
    headers = {"Content-Type": content_type}
    if gzip_accepted(accept_encoding):
        body = gzip.compress(body, compresslevel=1)
        headers["Content-Encoding"] = "gzip"
    return body, headers


def metrics_handler(exporter: Exposable) -> Handler:
    """An aiohttp handler serving ``exporter.registry``; mount it at ``/metrics``."""

    async def handle(request: web.Request) -> web.Response:
        # Taking the connector's view is cheap but must happen on the loop that owns it.
        exporter.refresh_view()
        body, headers = await asyncio.to_thread(
            render_exposition,
            exporter.registry,
            request.headers.get("Accept", ""),
            request.headers.get("Accept-Encoding", ""),
        )
        return web.Response(body=body, headers=headers)

    return handle


def add_metrics_route(app: web.Application, exporter: Exposable, path: str = "/metrics") -> None:
    app.router.add_get(path, metrics_handler(exporter))
