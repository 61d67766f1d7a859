"""Request handlers. Each reads its validated inputs (``request[QUERY]``, ``request[BODY]``),
calls the connector, and returns JSON; every failure is an exception the errors middleware
turns into ``{"error": ...}``."""

from __future__ import annotations

import json
import time
from typing import Any, Protocol

from aiohttp import web

from connector.api.context import BODY, QUERY, ApiContext, context
from connector.api.errors import RouteNotFound, Unavailable
from connector.api.health import readiness
from connector.api.prometheus_sd import target_groups
from connector.api.sse import stream_events, wants_event_stream
from connector.api.views import (
    component_json,
    replica_json,
    require_component,
    sorted_replicas,
)
from connector.errors import ConnectorError, ScaleTimeout
from connector.view import ConnectorView

NO_STORE = {"Cache-Control": "no-store"}


class Superseded(ConnectorError):
    """A wait ended because a newer target for the same component replaced this one."""

    code = "superseded"
    http_status = 409


class NotReady(ConnectorError):
    code = "not_ready"
    http_status = 503


def json_ok(data: Any, status: int = 200) -> web.Response:
    return web.Response(
        status=status,
        text=json.dumps(data, default=str, separators=(",", ":")),
        content_type="application/json",
        headers=NO_STORE,
    )


def _component_name(request: web.Request, ctx: ApiContext) -> str:
    """The component the path names, or 404 (checked on a view without the replicas)."""
    return _component_view(request, ctx, replicas=False)[0]


def _component_view(
    request: web.Request, ctx: ApiContext, replicas: bool = True
) -> tuple[str, ConnectorView]:
    """The component the path names (or 404) and the view; ``replicas=False`` for callers
    that need only the components: with a thousand replicas a whole view takes ~10 ms."""
    name = request.match_info["name"]
    view = ctx.connector.view(replicas=replicas)
    require_component(view, name, ctx.connector.graph.name)
    return name, view


def _source(request: web.Request) -> str:
    """Events record who asked: the CLI identifies itself by its User-Agent."""
    agent = request.headers.get("User-Agent", "")
    return "cli" if agent.startswith("dynamo-local-cli") else "api"


# ------------------------------------------------------------------------ components


async def list_components(request: web.Request) -> web.Response:
    view = context(request).connector.view()
    return json_ok(
        {"namespace": view.namespace, "components": [component_json(c) for c in view.components]}
    )


async def get_component(request: web.Request) -> web.Response:
    ctx = context(request)
    name, view = _component_view(request, ctx)
    component = require_component(view, name, ctx.connector.graph.name)
    return json_ok(
        {
            "component": component_json(component),
            "replicas": [replica_json(r) for r in sorted_replicas(view, name)],
        }
    )


async def get_replicas(request: web.Request) -> web.Response:
    ctx = context(request)
    name, view = _component_view(request, ctx)
    component = require_component(view, name, ctx.connector.graph.name)
    return json_ok(
        {
            "component": name,
            "desired": component.desired,
            "running": component.running,
            "ready": component.ready,
            "replicas": [replica_json(r) for r in sorted_replicas(view, name)],
        }
    )


def _operation_result(
    ctx: ApiContext, name: str, operation: str, target: int, waited: bool
) -> dict[str, Any]:
    # Without the replicas' views: a scale of a thousand answers within its 50 ms.
    view = ctx.connector.view(replicas=False)
    component = require_component(view, name, ctx.connector.graph.name)
    return {
        "component": name,
        "operation": operation,
        "target": target,
        "waited": waited,
        "converged": ctx.connector.converged(name),
        "state": component_json(component),
    }


def _unconverged(
    ctx: ApiContext, name: str, operation: str, target: int, waited_s: float
) -> web.Response:
    """A wait that ended unconverged. Superseded by a newer target: 409. Out of time: 202
    (accepted, still converging) with ``converged: false`` and the reason; a client-chosen
    deadline passing is not a server error."""
    err = _not_converged(ctx, name, operation, target, waited_s)
    if not isinstance(err, ScaleTimeout):
        raise err
    result = _operation_result(ctx, name, operation, target, True)
    result["converged"] = False
    result["reason"] = err.message
    return json_ok(result, status=202)


def _not_converged(
    ctx: ApiContext, name: str, operation: str, target: int, waited_s: float
) -> ConnectorError:
    """Why a wait returned False: a newer target replaced it (409), or time ran out."""
    view = ctx.connector.view(replicas=False)
    component = require_component(view, name, ctx.connector.graph.name)
    details = {
        "component": name,
        "target": target,
        "desired": component.desired,
        "ready": component.ready,
        "status": component.status,
    }
    for event in reversed(ctx.connector.recent_events(0)):
        if event.component == name and event.kind == operation:
            if event.outcome == "superseded":
                return Superseded(
                    f"{operation} of {name} to {target} was superseded by a newer target "
                    f"({component.desired})",
                    **details,
                )
            break
    return ScaleTimeout(
        f"{name} did not converge to {target} ready replicas within {waited_s:g} s "
        f"({component.ready} ready, status {component.status})",
        **details,
    )


def _wait_timeout(ctx: ApiContext, body: dict[str, Any]) -> float:
    timeout = body.get("timeout_s")
    return float(timeout) if timeout is not None else ctx.connector.options.scale_timeout_s


async def put_replicas(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _component_name(request, ctx)
    body = request[BODY]
    replicas: int = body["replicas"]
    wait = bool(body.get("wait", False))
    timeout_s = _wait_timeout(ctx, body)
    ok = await ctx.connector.scale_component(
        name, replicas, blocking=wait, timeout_s=timeout_s, source=_source(request)
    )
    if wait and not ok:
        return _unconverged(ctx, name, "scale", replicas, timeout_s)
    return json_ok(
        _operation_result(ctx, name, "scale", replicas, wait), status=200 if wait else 202
    )


async def restart_component(request: web.Request) -> web.Response:
    ctx = context(request)
    name, view = _component_view(request, ctx, replicas=False)
    body = request[BODY]
    wait = bool(body.get("wait", False))
    timeout_s = _wait_timeout(ctx, body)
    target = require_component(view, name, ctx.connector.graph.name).desired
    ok = await ctx.connector.restart_component(name, blocking=wait, timeout_s=timeout_s)
    if wait and not ok:
        return _unconverged(ctx, name, "restart", target, timeout_s)
    return json_ok(
        _operation_result(ctx, name, "restart", target, wait), status=200 if wait else 202
    )


async def get_logs(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _component_name(request, ctx)
    query: dict[str, Any] = request[QUERY]
    lines = await ctx.connector.get_component_logs(
        name,
        lines=query.get("lines", 100),
        replica=query.get("replica"),
        stream=query.get("stream", "both"),
    )
    return json_ok({"component": name, "lines": lines})


async def get_metrics(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _component_name(request, ctx)
    return json_ok(await ctx.connector.get_component_metrics(name))


async def get_component_resources(request: web.Request) -> web.Response:
    ctx = context(request)
    name = _component_name(request, ctx)
    return json_ok(await ctx.connector.get_resource_usage(name))


# ---------------------------------------------------------------------------- graph


async def get_topology(request: web.Request) -> web.Response:
    ctx = context(request)
    topology = await ctx.connector.get_system_topology()
    fmt = request[QUERY].get("format", "json")
    if fmt == "json":
        return json_ok(topology)
    from connector.dynamo import topology as render

    if fmt == "dot":
        text = render.to_dot(topology)
        return web.Response(text=text, content_type="text/vnd.graphviz", headers=NO_STORE)
    return web.Response(
        text=render.to_mermaid(topology), content_type="text/plain", headers=NO_STORE
    )


async def get_prefill_queue(request: web.Request) -> web.Response:
    return json_ok(await context(request).connector.get_prefill_queue_metrics())


class MachineResourcesSource(Protocol):
    async def __call__(self) -> dict[str, Any]: ...


async def get_resources(request: web.Request) -> web.Response:
    """The allocation map: ``LocalConnector.get_machine_resources()`` (the machine view the
    exporter reads too: ``gpus`` with their state and owners, CPU and memory budgets)."""
    connector = context(request).connector
    source: MachineResourcesSource | None = getattr(connector, "get_machine_resources", None)
    if source is None:
        raise Unavailable(
            "this connector does not report its resource allocation (no resource manager "
            "with get_machine_resources)",
            feature="resources",
        )
    return json_ok(await source())


async def get_events(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    query: dict[str, Any] = request[QUERY]
    if wants_event_stream(request):
        return await stream_events(request, ctx, query.get("since"))
    since = query.get("since", 0)
    limit = query.get("limit")
    events = ctx.connector.events.since(since, limit)
    return json_ok(
        {"events": [e.to_dict() for e in events], "last_seq": ctx.connector.events.last_seq}
    )


# ---------------------------------------------------------------------- operations


async def healthz(request: web.Request) -> web.Response:
    ctx = context(request)
    return json_ok(
        {
            "status": "ok",
            "namespace": ctx.connector.namespace,
            "uptime_s": round(time.monotonic() - ctx.started_at, 3),
        }
    )


async def readyz(request: web.Request) -> web.Response:
    ctx = context(request)
    checks = await readiness(ctx.connector, ctx.settings.readiness_timeout_s)
    as_json = {name: check.to_dict() for name, check in checks.items()}
    failing = [name for name, check in checks.items() if not check.ok]
    if failing:
        reasons = "; ".join(f"{name}: {checks[name].detail}" for name in failing)
        raise NotReady(f"not ready: {reasons}", checks=as_json)
    return json_ok({"status": "ready", "checks": as_json})


async def shutdown(request: web.Request) -> web.Response:
    ctx = context(request)
    if ctx.request_shutdown is None:
        raise Unavailable(
            "this server cannot be shut down over HTTP (it is embedded in another program)"
        )
    ctx.request_shutdown()
    return json_ok({"status": "shutting_down"}, status=202)


async def metrics(request: web.Request) -> web.StreamResponse:
    ctx = context(request)
    if ctx.exporter is None:
        raise Unavailable(
            "metrics are disabled: this server was started without an exporter",
            feature="metrics",
        )
    return await ctx.exporter.handle_metrics(request)


def _own_address(request: web.Request) -> str:
    """``host:port`` the client reached this server at: Prometheus asking for targets from
    inside a container names the host as the container sees it, and scrapes ``/metrics``
    at the same address. A Host header without a port gets the listening socket's."""
    if request.url.explicit_port is not None:
        return request.host
    sockname = request.transport.get_extra_info("sockname") if request.transport else None
    port = sockname[1] if sockname else request.url.port
    host = request.url.raw_host or "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


async def prometheus_targets(request: web.Request) -> web.Response:
    ctx = context(request)
    # The connector's own /metrics is a target only when this server serves it.
    own = _own_address(request) if ctx.exporter is not None else None
    return json_ok(target_groups(ctx.connector.view(), ctx.connector.graph, own))


async def openapi(request: web.Request) -> web.Response:
    return json_ok(context(request).openapi)


# ---------------------------------------------------------------------- status page

PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    # Everything comes from this server: no CDN, no inline script, no framing. Inline
    # styles are allowed: plotly.js (the live charts) styles its SVG through style
    # attributes and a <style> element it writes; scripts stay this server's files only.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data:; "
        "connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    ),
}


def _static(ctx: ApiContext, name: str) -> web.Response:
    found = ctx.static.get(name)
    if found is None:
        raise RouteNotFound(f"no status page asset {name!r}", asset=name)
    body, content_type = found
    return web.Response(body=body, content_type=content_type, headers=PAGE_HEADERS)


async def index(request: web.Request) -> web.Response:
    return _static(context(request), "index.html")


async def static_asset(request: web.Request) -> web.Response:
    return _static(context(request), request.match_info["file"])
