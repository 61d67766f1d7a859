"""The mock worker's system server (``DYN_SYSTEM_PORT``): ``/metrics``, ``/health``, ``/live``.

Same paths and meaning as ai-dynamo-runtime's system server: ``/health`` answers 503 with
``{"status": "notready"}`` until the instance is registered, then 200 with
``{"status": "ready"}``; ``/live`` says the process is up at all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aiohttp import web

# generate_latest() writes the 0.0.4 text format.
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

HealthFn = Callable[[], tuple[int, dict[str, Any]]]


def build_app(metrics_body: Callable[[], bytes], health: HealthFn) -> web.Application:
    async def metrics(_: web.Request) -> web.Response:
        return web.Response(body=metrics_body(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    async def health_handler(_: web.Request) -> web.Response:
        status, body = health()
        return web.json_response(body, status=status)

    async def live(_: web.Request) -> web.Response:
        return web.json_response({"status": "live"})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/health", health_handler)
    app.router.add_get("/live", live)
    return app


async def serve(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Start ``app`` on ``host:port``; the runner to clean up. Raises ``OSError`` if the
    port cannot be bound."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner
