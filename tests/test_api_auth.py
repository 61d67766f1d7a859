"""Bearer auth on mutating routes (and every data route with ``auth_all``), the bind rule,
and the OpenAPI security that follows the settings."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from connector.api.routes import ROUTES
from connector.api.server import BindRefused, check_bind, create_app, is_loopback
from tests.api_helpers import Served, error_of, serve

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

TOKEN = "s3cret-token-ÿ"  # non-ASCII on purpose: compared as bytes, never raises


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def guarded(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    async with serve(Path(tmp_path_factory.mktemp("auth")), token=TOKEN) as served:
        yield served


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def locked(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    async with serve(
        Path(tmp_path_factory.mktemp("authall")), token=TOKEN, auth_all=True
    ) as served:
        yield served


MUTATIONS = [
    ("PUT", "/v1/components/Decode/replicas", {"replicas": 1}),
    ("POST", "/v1/components/Decode/restart", None),
    ("POST", "/v1/shutdown", None),
]


@pytest.mark.parametrize(("method", "path", "body"), MUTATIONS)
async def test_mutations_need_the_token(
    guarded: Served, method: str, path: str, body: object
) -> None:
    status, answer, resp = await guarded.call(method, path, body=body)
    assert status == 401
    error = error_of(answer)
    assert error["code"] == "unauthorized"
    assert error["message"] == (
        f"{method} {path} needs a bearer token (Authorization: Bearer <token>; "
        "the CLI reads --token or DYNAMO_LOCAL_TOKEN)"
    )
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="dynamo-local"'
    assert guarded.shutdown_calls == []


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("Bearer wrong", "the bearer token is wrong"),
        (f"Bearer {TOKEN}x", "the bearer token is wrong"),
        ("Bearer s3cret-token-y", "the bearer token is wrong"),  # same length, differs
        (f"Basic {TOKEN}", "the Authorization header must be 'Bearer <token>'"),
        ("Bearer ", "the Authorization header must be 'Bearer <token>'"),
    ],
)
async def test_wrong_or_malformed_tokens_are_401(
    guarded: Served, header: str, message: str
) -> None:
    status, body, _ = await guarded.call(
        "PUT",
        "/v1/components/Decode/replicas",
        body={"replicas": 1},
        headers={"Authorization": header.encode().decode("latin-1")},
    )
    assert status == 401
    assert error_of(body)["message"] == message


async def test_the_right_token_is_accepted_and_reads_stay_open(guarded: Served) -> None:
    status, body, _ = await guarded.call(
        "PUT", "/v1/components/Decode/replicas", body={"replicas": 1}, token=TOKEN
    )
    assert status == 202, body
    status, _, _ = await guarded.call("GET", "/v1/components")
    assert status == 200
    status, _, _ = await guarded.call("GET", "/openapi.json")
    assert status == 200


async def test_auth_is_checked_before_the_body_is_read(guarded: Served) -> None:
    status, body, _ = await guarded.call(
        "PUT",
        "/v1/components/Decode/replicas",
        raw=b"x" * (200 * 1024),
        headers={"Content-Type": "application/json"},
    )
    assert status == 401
    assert error_of(body)["code"] == "unauthorized"


def _sample(path: str) -> str:
    """A route's path with a plausible value for each parameter (a literal ``{id}`` is no
    path the router matches: it would be a 404 before any token is asked for)."""
    return path.replace("{name}", "Decode").replace("{id}", "burst-20260101-000000")


@pytest.mark.parametrize(
    "path",
    [_sample(route.path) for route in ROUTES if not route.public]
    + ["/v1/components/Decode/logs?lines=1"],
)
async def test_auth_all_protects_every_data_route(locked: Served, path: str) -> None:
    method = next((r.method for r in ROUTES if _sample(r.path) == path), "GET")
    status, body, _ = await locked.call(method, path)
    assert status == 401, path
    assert error_of(body)["code"] == "unauthorized"


@pytest.mark.parametrize("path", ["/", "/static/app.js", "/static/style.css", "/healthz"])
async def test_auth_all_leaves_the_page_assets_and_liveness_open(locked: Served, path: str) -> None:
    status, _, _ = await locked.call("GET", path)
    assert status == 200


async def test_auth_all_with_the_token(locked: Served) -> None:
    for path in ("/v1/components", "/v1/events", "/readyz", "/openapi.json"):
        status, _, _ = await locked.call("GET", path, token=TOKEN)
        assert status == 200, path


async def test_openapi_security_follows_the_settings(guarded: Served, locked: Served) -> None:
    _, doc, _ = await guarded.call("GET", "/openapi.json")
    assert doc["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    paths = doc["paths"]
    assert paths["/v1/components/{name}/replicas"]["put"]["security"] == [{"bearer": []}]
    assert "401" in paths["/v1/components/{name}/replicas"]["put"]["responses"]
    assert paths["/v1/components"]["get"]["security"] == []
    assert "401" not in paths["/v1/components"]["get"]["responses"]

    _, doc, _ = await locked.call("GET", "/openapi.json", token=TOKEN)
    paths = doc["paths"]
    assert paths["/v1/components"]["get"]["security"] == [{"bearer": []}]
    assert paths["/healthz"]["get"]["security"] == []
    assert paths["/"]["get"]["security"] == []


async def test_bind_rule() -> None:
    for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2", "[::1]"):
        assert is_loopback(host)
        check_bind(host, None)
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        assert not is_loopback(host)
        with pytest.raises(BindRefused) as refused:
            check_bind(host, None)
        assert str(refused.value) == (
            f"refusing to listen on {host}: the API can scale and stop processes, so a "
            "non-loopback address needs a token (--token or DYNAMO_LOCAL_TOKEN); "
            "or listen on 127.0.0.1 and reach it through an SSH tunnel"
        )
        check_bind(host, "a-token")


async def test_create_app_refuses_meaningless_auth_settings(guarded: Served) -> None:
    with pytest.raises(ValueError, match="auth_all needs a token"):
        create_app(guarded.connector, auth_all=True)
    with pytest.raises(ValueError, match="the API token must not be empty"):
        create_app(guarded.connector, token="  ")
