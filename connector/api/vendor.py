"""plotly.js for the status page's live charts, served by this server from the plotly Python
package's own bundled ``plotly.min.js`` (the one ``report.html`` inlines): the page loads
nothing from a CDN or anywhere else.

The file (about 5 MB) is read once, on the first request, in a thread, and kept with a
gzip copy (about 1.5 MB) for browsers that accept it; browsers cache it for a day (its name
does not change, its content only with the plotly package).
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import importlib.util
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from connector.api.errors import RouteNotFound

PATH = "/static/vendor/plotly.min.js"


@dataclass(frozen=True)
class Asset:
    body: bytes
    gzipped: bytes
    etag: str


_cache: Asset | None = None


def _plotly_js() -> Path | None:
    # find_spec does not import plotly (the Python package is heavy and not needed here).
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    return path if path.is_file() else None


def _load() -> Asset | None:
    path = _plotly_js()
    if path is None:
        return None
    body = path.read_bytes()
    digest = hashlib.sha256(body).hexdigest()[:16]
    return Asset(body, gzip.compress(body, compresslevel=6, mtime=0), f'"{digest}"')


async def asset() -> Asset | None:
    global _cache
    if _cache is None:
        # Two first requests at once may both read it: harmless, and no lock to outlive a loop.
        _cache = await asyncio.to_thread(_load)
    return _cache


async def plotly_js(request: web.Request) -> web.Response:
    found = await asset()
    if found is None:
        raise RouteNotFound(
            "plotly.js is not available: the plotly Python package is not installed "
            "(it comes with the dynamo extra; pip install plotly)",
            asset="plotly.min.js",
        )
    headers = {
        "Cache-Control": "public, max-age=86400",
        "ETag": found.etag,
        "Vary": "Accept-Encoding",
        "X-Content-Type-Options": "nosniff",
    }
    if "gzip" in request.headers.get("Accept-Encoding", ""):
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=found.gzipped, content_type="text/javascript", headers=headers)
    return web.Response(body=found.body, content_type="text/javascript", headers=headers)
