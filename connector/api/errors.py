"""Errors of the HTTP layer and the middleware that turns every failure into JSON.

Every response that is not a success is ``{"error": {"code", "message", "details"}}``. The
connector's own errors already carry their code and HTTP status; aiohttp's routing errors
(unknown path, wrong method, body too large) are translated; anything else is logged with
its traceback and answered as ``500 internal`` with a request id to find it in the log.
The traceback never reaches the client.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from connector.api.context import CONTEXT
from connector.errors import ConnectorError, SupervisorUnavailable
from connector.supervision.circus import CircusCommandError

log = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class BadRequest(ConnectorError):
    """Malformed body or parameter: wrong type, unknown key, not JSON."""

    code = "bad_request"
    http_status = 400


class Unauthorized(ConnectorError):
    code = "unauthorized"
    http_status = 401


class RouteNotFound(ConnectorError):
    code = "not_found"
    http_status = 404


class MethodNotAllowed(ConnectorError):
    code = "method_not_allowed"
    http_status = 405


class NotAcceptable(ConnectorError):
    code = "not_acceptable"
    http_status = 406


class PayloadTooLarge(ConnectorError):
    code = "payload_too_large"
    http_status = 413


class UnsupportedMediaType(ConnectorError):
    code = "unsupported_media_type"
    http_status = 415


class InvalidValue(ConnectorError):
    """Well-formed, but the value is out of range (a negative count, a zero timeout)."""

    code = "invalid_value"
    http_status = 422


class Unavailable(ConnectorError):
    """A feature this server runs without (metrics disabled, no shutdown handler)."""

    code = "unavailable"
    http_status = 503


class RequestTimeout(ConnectorError):
    code = "request_timeout"
    http_status = 504


class InternalError(ConnectorError):
    code = "internal"
    http_status = 500


_HTTP_ERRORS: dict[int, type[ConnectorError]] = {
    400: BadRequest,
    404: RouteNotFound,
    405: MethodNotAllowed,
    406: NotAcceptable,
    413: PayloadTooLarge,
    415: UnsupportedMediaType,
}


def error_body(error: ConnectorError) -> dict[str, Any]:
    return {"error": error.to_dict()}


def error_response(error: ConnectorError, headers: dict[str, str] | None = None) -> web.Response:
    text = json.dumps(error_body(error), default=str)
    return web.Response(
        status=error.http_status, text=text, content_type="application/json", headers=headers
    )


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ConnectorError:
    status = exc.status
    if status == 404:
        return RouteNotFound(f"no route {request.method} {request.path}", path=request.path)
    if status == 405:
        allowed = sorted(getattr(exc, "allowed_methods", ()) or ())
        return MethodNotAllowed(
            f"{request.method} is not allowed on {request.path}"
            + (f" (allowed: {', '.join(allowed)})" if allowed else ""),
            method=request.method,
            allowed=allowed,
        )
    if status == 413:
        limit = request.app[CONTEXT].settings.max_body_bytes
        return PayloadTooLarge(
            f"request body is larger than the {limit} bytes this server accepts",
            limit_bytes=limit,
        )
    cls = _HTTP_ERRORS.get(status)
    reason = exc.text or exc.reason
    if cls is not None:
        return cls(reason or f"HTTP {status}")
    error = ConnectorError(reason or f"HTTP {status}")
    error.code = f"http_{status}"
    error.http_status = status
    return error


def _supervisor_error(exc: CircusCommandError) -> ConnectorError:
    return SupervisorUnavailable(
        f"circusd refused {exc.command!r}: {exc.reason}", command=exc.command, errno=exc.errno
    )


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outermost middleware: nothing but JSON errors leaves the server."""
    try:
        return await handler(request)
    except ConnectorError as exc:
        headers: dict[str, str] = {}
        if exc.http_status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="dynamo-local"'
        if exc.retry_after_s is not None:
            headers["Retry-After"] = str(exc.retry_after_s)
        return error_response(exc, headers or None)
    except CircusCommandError as exc:
        return error_response(_supervisor_error(exc))
    except web.HTTPException as exc:
        if exc.status < 400:
            raise  # redirects and other non-errors pass through as aiohttp built them
        return error_response(_from_http_exception(exc, request), _allow_header(exc))
    except asyncio.CancelledError:
        raise  # the client went away or the server is stopping
    except Exception:
        request_id = uuid.uuid4().hex[:12]
        log.exception(
            "request %s %s failed (request id %s)", request.method, request.path, request_id
        )
        return error_response(
            InternalError(
                f"internal error while serving {request.method} {request.path}; the server "
                f"log has the details under request id {request_id}",
                request_id=request_id,
            )
        )


def _allow_header(exc: web.HTTPException) -> dict[str, str] | None:
    allow = exc.headers.get("Allow")
    return {"Allow": allow} if allow else None
