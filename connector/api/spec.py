"""What a route is (:class:`Route`, :class:`Param`, :class:`Body`): the types of the route
table, apart from the table itself (:mod:`connector.api.routes`), which imports every
handler. The request context and the middleware need the types, not the handlers.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web

from connector.api.schema_refs import Schema

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

DEFAULT_TIMEOUT_S = 30.0
COMPONENT_NAME = {"type": "string", "minLength": 1, "maxLength": 253}


@dataclass(frozen=True)
class Param:
    name: str
    schema: Schema
    description: str
    required: bool = False


@dataclass(frozen=True)
class Body:
    """A response or request body of one media type."""

    schema: Schema
    content_type: str = "application/json"


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    operation_id: str
    summary: str
    tag: str
    description: str = ""
    path_params: tuple[Param, ...] = ()
    query: tuple[Param, ...] = ()
    body: Schema | None = None
    body_required: bool = False
    # Media types the body may come in: JSON, and YAML (application/yaml) where a route takes
    # what users also write as files (an experiment plan).
    body_types: tuple[str, ...] = ("application/json",)
    # False: the handler checks the decoded body itself (with errors in its own words, e.g.
    # an experiment plan's reader naming the field); the schema still documents it.
    validate_body: bool = True
    # status -> (description, bodies); errors list the statuses answered with Error JSON.
    responses: dict[int, tuple[str, tuple[Body, ...]]] = field(default_factory=dict)
    errors: tuple[int, ...] = ()
    # None: the handler bounds itself (event streams, waits with their own timeout_s).
    timeout_s: float | None = DEFAULT_TIMEOUT_S
    # Reachable without a token even with --auth-all (static page assets, liveness).
    public: bool = False

    @property
    def mutating(self) -> bool:
        return self.method not in ("GET", "HEAD")

    def protected(self, auth_all: bool) -> bool:
        return self.mutating or (auth_all and not self.public)
