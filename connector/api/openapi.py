"""The OpenAPI 3.1 document of the HTTP API, generated from the route table.

``build_openapi`` renders :data:`connector.api.routes.ROUTES` with the schemas of
:mod:`connector.api.schemas`; the server serves the result at ``/openapi.json``. Security
requirements follow the server's settings: with a token, mutating routes (every non-public
route with ``auth_all``) require the bearer scheme and document 401.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from connector.api.routes import COMMON_ERRORS, ROUTES
from connector.api.schema_refs import ref
from connector.api.schemas import NAMED
from connector.api.spec import Body, Param, Route

ERROR_DESCRIPTIONS = {
    400: "malformed body or parameter",
    401: "missing or wrong bearer token",
    403: "refused: foreign Host or cross-origin request",
    404: "unknown component or route",
    409: "conflict: replica limit, crash loop, resources exhausted, superseded",
    413: "request body too large",
    415: "request body is not of a media type the route accepts (application/json)",
    422: "well-formed but semantically invalid (e.g. a negative count)",
    500: "internal error (details in the server log, never a traceback)",
    503: "supervisor, discovery or a feature unavailable, or the connector is shut down",
    504: "did not converge (or finish) in time",
}


def _package_version() -> str:
    try:
        return version("dynamo-local")
    except PackageNotFoundError:
        return "0.0.0"


def _parameter(param: Param, where: str) -> dict[str, Any]:
    return {
        "name": param.name,
        "in": where,
        "required": param.required or where == "path",
        "description": param.description,
        "schema": copy.deepcopy(param.schema),
    }


def _content(bodies: Iterable[Body]) -> dict[str, Any]:
    return {b.content_type: {"schema": copy.deepcopy(b.schema)} for b in bodies}


def _operation(route: Route, *, token: bool, auth_all: bool, host_guard: bool) -> dict[str, Any]:
    protected = token and route.protected(auth_all)
    op: dict[str, Any] = {
        "operationId": route.operation_id,
        "summary": route.summary,
        "tags": [route.tag],
    }
    if route.description:
        op["description"] = route.description
    params = [_parameter(p, "path") for p in route.path_params]
    params += [_parameter(p, "query") for p in route.query]
    if params:
        op["parameters"] = params
    if route.body is not None:
        op["requestBody"] = {
            "required": route.body_required,
            "content": {t: {"schema": copy.deepcopy(route.body)} for t in route.body_types},
        }
    responses: dict[str, Any] = {
        str(status): {"description": description, "content": _content(bodies)}
        for status, (description, bodies) in sorted(route.responses.items())
    }
    errors = set(route.errors) | set(COMMON_ERRORS)
    if route.path_params or route.query or route.body is not None:
        errors.add(400)
    if protected:
        errors.add(401)
    if host_guard or route.mutating:
        errors.add(403)
    if route.body is not None:
        errors |= {413, 415}
    for status in sorted(errors):
        responses[str(status)] = {
            "description": ERROR_DESCRIPTIONS[status],
            "content": {"application/json": {"schema": ref("Error")}},
        }
    op["responses"] = responses
    op["security"] = [{"bearer": []}] if protected else []
    return op


def build_openapi(
    *,
    token: bool = False,
    auth_all: bool = False,
    host_guard: bool = False,
    routes: Iterable[Route] = ROUTES,
) -> dict[str, Any]:
    """The document for a server with (``token``) or without bearer auth."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        item = paths.setdefault(route.path, {})
        item[route.method.lower()] = _operation(
            route, token=token, auth_all=auth_all, host_guard=host_guard
        )
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "dynamo-local",
            "version": _package_version(),
            "description": (
                "Scale, inspect and watch a Dynamo graph supervised by dynamo-local. Errors "
                'are always JSON: {"error": {"code", "message", "details"}}.'
            ),
        },
        "paths": paths,
        "components": {"schemas": copy.deepcopy(NAMED)},
    }
    if token:
        doc["components"]["securitySchemes"] = {
            "bearer": {
                "type": "http",
                "scheme": "bearer",
                "description": "the token given to `dynamo-local up --token`",
            }
        }
    return doc
