"""The request pipeline after the errors middleware: guards, auth, deadline, validation.

Order matters: a request from a foreign origin or with a wrong token is refused before its
body is read; the deadline covers reading and validating the body as well as the handler.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from connector.api.context import BODY, QUERY, ApiContext, context
from connector.api.errors import BadRequest, RequestTimeout, Unauthorized, UnsupportedMediaType
from connector.api.schemas import resolve
from connector.api.spec import Route
from connector.api.validation import (
    YAML_TYPES,
    parse_json_body,
    parse_query_value,
    parse_yaml_body,
    validate,
)
from connector.errors import ConnectorError

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Forbidden(ConnectorError):
    code = "forbidden"
    http_status = 403


def route_of(request: web.Request, ctx: ApiContext) -> Route | None:
    """The table entry the request matched (None for aiohttp's own 404/405 answers)."""
    matched = request.match_info.route
    resource = matched.resource
    if resource is None:
        return None
    method = "GET" if matched.method == "HEAD" else matched.method
    return ctx.routes.get((method, resource.canonical))


def _host_only(value: str) -> str:
    """``host[:port]`` without the port; IPv6 brackets kept off."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """DNS-rebinding and cross-site request guards for a server on a loopback address.

    No CORS is offered, but a browser still *sends* simple cross-origin POSTs; a mutating
    request whose ``Origin`` is not this server is refused before it does anything.
    """
    ctx = context(request)
    allowed = ctx.settings.allowed_hosts
    if allowed is not None:
        host = _host_only(request.headers.get("Host", ""))
        if host not in allowed and not host.endswith(".localhost"):
            raise Forbidden(
                f"Host {request.headers.get('Host', '')!r} is not a name of this server",
                host=request.headers.get("Host", ""),
            )
    origin = request.headers.get("Origin")
    if origin is not None and request.method not in ("GET", "HEAD", "OPTIONS"):
        origin_host = urlsplit(origin).netloc.lower()
        if origin_host != request.host.lower():
            raise Forbidden(
                f"cross-origin {request.method} from {origin} refused",
                origin=origin,
            )
    return await handler(request)


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise Unauthorized(
            "the Authorization header must be 'Bearer <token>'", scheme=scheme or None
        )
    return value.strip()


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    token = ctx.settings.token
    route = route_of(request, ctx)
    if token is None or route is None or not route.protected(ctx.settings.auth_all):
        return await handler(request)
    given = _bearer(request)
    if given is None:
        raise Unauthorized(
            f"{request.method} {request.path} needs a bearer token "
            "(Authorization: Bearer <token>; the CLI reads --token or DYNAMO_LOCAL_TOKEN)"
        )
    # Constant-time compare; both sides as bytes so non-ASCII input cannot raise.
    if not hmac.compare_digest(given.encode("utf-8"), token.encode("utf-8")):
        raise Unauthorized("the bearer token is wrong")
    return await handler(request)


@web.middleware
async def deadline_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    route = route_of(request, ctx)
    limit = None if route is None else route.timeout_s
    if limit is None:
        return await handler(request)
    limit = min(limit, ctx.settings.request_timeout_s)
    try:
        async with asyncio.timeout(limit) as scope:
            return await handler(request)
    except TimeoutError:
        if scope.expired():
            raise RequestTimeout(
                f"{request.method} {request.path} did not finish within {limit:g} s",
                timeout_s=limit,
            ) from None
        raise


@web.middleware
async def validation_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = context(request)
    route = route_of(request, ctx)
    if route is None:
        return await handler(request)
    for param in route.path_params:
        validate(request.match_info.get(param.name, ""), param.schema, f"path.{param.name}")
    request[QUERY] = _parse_query(request, route)
    request[BODY] = await _parse_body(request, route)
    return await handler(request)


def _parse_query(request: web.Request, route: Route) -> dict[str, Any]:
    known = {p.name: p for p in route.query}
    out: dict[str, Any] = {}
    for key in request.query:
        param = known.get(key)
        if param is None:
            allowed = ", ".join(known) or "none"
            raise BadRequest(
                f"unknown query parameter {key!r} (allowed: {allowed})",
                parameter=key,
                allowed=list(known),
            )
        values = request.query.getall(key)
        if len(values) > 1:
            raise BadRequest(f"query parameter {key!r} is given {len(values)} times")
        out[key] = parse_query_value(values[0], param.schema, f"query.{key}")
    for param in route.query:
        if param.required and param.name not in out:
            raise BadRequest(f"query parameter {param.name!r} is required")
    return out


async def _parse_body(request: web.Request, route: Route) -> dict[str, Any]:
    """The validated JSON object, or ``{}`` for a route whose body is optional and absent."""
    raw = await request.read() if request.body_exists else b""
    if route.body is None:
        if raw.strip():
            raise BadRequest(f"{request.method} {request.path} takes no request body")
        return {}
    if not raw.strip():
        if route.body_required:
            raise BadRequest(f"{request.method} {request.path} needs a JSON body")
        return {}
    if request.content_type not in route.body_types:
        raise UnsupportedMediaType(
            f"the request body must be {' or '.join(route.body_types)}, got {request.content_type}",
            content_type=request.content_type,
            accepted=list(route.body_types),
        )
    if request.content_type in YAML_TYPES:
        decoded = await asyncio.to_thread(parse_yaml_body, raw)  # pure Python: off the loop
    else:
        decoded = parse_json_body(raw)
    value = validate(decoded, resolve(route.body), "body") if route.validate_body else decoded
    if not isinstance(value, dict):  # every request body schema is an object
        raise BadRequest("the request body must be a JSON object")
    return value
