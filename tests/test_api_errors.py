"""Every error path and read-only route of the HTTP API, on one server shared by the module.

None of these tests changes the connector's state (refused requests change nothing, and
that is asserted), so one real connector under one real circusd serves them all.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.api_helpers import Served, error_of, serve
from tests.core_helpers import wait_until

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    async with serve(Path(tmp_path_factory.mktemp("api"))) as served:
        view = served.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        yield served


def _component(body: dict, name: str) -> dict:
    return next(c for c in body["components"] if c["name"] == name)


async def test_list_components_shape_and_values(api: Served) -> None:
    status, body, resp = await api.call("GET", "/v1/components")
    assert status == 200
    assert resp.headers["Cache-Control"] == "no-store"
    assert body["namespace"] == "t"
    assert [c["name"] for c in body["components"]] == [
        "Frontend",
        "Prefill",
        "Decode",
        "Talker",
        "Slow",
        "Crashy",
    ]
    decode = _component(body, "Decode")
    assert decode == {
        "name": "Decode",
        "role": "worker",
        "sub_component_type": "decode",
        "dynamo_namespace": "apitest",
        "status": "running",
        "replicas": {"desired": 1, "running": 1, "ready": 1, "min": 0, "max": 3},
        "restarts": 0,
        "crashloops": 0,
        "scale_in_flight": False,
        "reason": None,
    }
    assert _component(body, "Prefill")["status"] == "stopped"


async def test_get_component_and_replicas(api: Served) -> None:
    status, body, _ = await api.call("GET", "/v1/components/Decode")
    assert status == 200
    assert body["component"]["name"] == "Decode"
    (replica,) = body["replicas"]
    assert replica["replica"] == "1"
    assert replica["component"] == "Decode"
    assert replica["state"] == "ready" and replica["ready"] is True
    assert isinstance(replica["pid"], int)
    assert replica["restarts"] == 0 and replica["last_exit_code"] is None

    status, body, _ = await api.call("GET", "/v1/components/Decode/replicas")
    assert status == 200
    assert (body["component"], body["desired"], body["running"], body["ready"]) == (
        "Decode",
        1,
        1,
        1,
    )
    assert [r["replica"] for r in body["replicas"]] == ["1"]


@pytest.mark.parametrize(
    "path",
    [
        "/v1/components/Nope",
        "/v1/components/Nope/replicas",
        "/v1/components/Nope/logs",
        "/v1/components/Nope/metrics",
        "/v1/components/Nope/resources",
    ],
)
async def test_unknown_component_is_404_naming_the_known_ones(api: Served, path: str) -> None:
    status, body, _ = await api.call("GET", path)
    assert status == 404
    error = error_of(body)
    assert error["code"] == "component_not_found"
    assert error["message"] == (
        "no component 'Nope' in graph 'apitest' "
        "(components: Crashy, Decode, Frontend, Prefill, Slow, Talker)"
    )
    assert error["details"] == {"component": "Nope"}


async def test_unknown_component_for_mutations_is_404(api: Served) -> None:
    status, body, _ = await api.call("PUT", "/v1/components/Nope/replicas", body={"replicas": 1})
    assert status == 404 and error_of(body)["code"] == "component_not_found"
    status, body, _ = await api.call("POST", "/v1/components/Nope/restart")
    assert status == 404 and error_of(body)["code"] == "component_not_found"


BAD_BODIES = [
    ({"replicas": True}, 400, "bad_request", "body.replicas must be an integer, got a boolean"),
    ({"replicas": "2"}, 400, "bad_request", "body.replicas must be an integer, got a string"),
    ({"replicas": 2.5}, 400, "bad_request", "body.replicas must be an integer, got a number"),
    ({"replicas": None}, 400, "bad_request", "body.replicas must be an integer, got null"),
    ({}, 400, "bad_request", "body is missing 'replicas'"),
    (
        {"replicas": 1, "force": True},
        400,
        "bad_request",
        "body has an unknown key 'force' (allowed: replicas, wait, timeout_s)",
    ),
    (
        {"replicas": 1, "wait": "yes"},
        400,
        "bad_request",
        "body.wait must be a boolean, got a string",
    ),
    ([1], 400, "bad_request", "body must be an object, got an array"),
    ({"replicas": -1}, 422, "invalid_value", "body.replicas must be >= 0, got -1"),
    ({"replicas": 5000}, 422, "invalid_value", "body.replicas must be <= 1024, got 5000"),
    ({"replicas": 1, "timeout_s": 0}, 422, "invalid_value", "body.timeout_s must be > 0, got 0"),
    (
        {"replicas": 4},
        409,
        "replica_limit",
        "Decode: 4 replicas is outside minReplicas..maxReplicas (0..3)",
    ),
]


@pytest.mark.parametrize(("body", "status", "code", "message"), BAD_BODIES)
async def test_scale_body_is_validated_strictly(
    api: Served, body: object, status: int, code: str, message: str
) -> None:
    got, answer, _ = await api.call("PUT", "/v1/components/Decode/replicas", body=body)
    assert got == status
    error = error_of(answer)
    assert (error["code"], error["message"]) == (code, message)
    assert api.connector.view().component("Decode").desired == 1  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("raw", "content_type", "status", "code", "message"),
    [
        (b"{not json", "application/json", 400, "bad_request", "request body is not valid JSON"),
        (b'{"replicas": NaN}', "application/json", 400, "bad_request", "NaN is not valid JSON"),
        (
            b'{"replicas": 1, "replicas": 2}',
            "application/json",
            400,
            "bad_request",
            "appears twice",
        ),
        (b"\xff\xfe", "application/json", 400, "bad_request", "request body is not UTF-8"),
        (b"", "application/json", 400, "bad_request", "needs a JSON body"),
        (
            b'{"replicas": 1}',
            "text/plain",
            415,
            "unsupported_media_type",
            "must be application/json",
        ),
    ],
)
async def test_scale_malformed_bodies(
    api: Served, raw: bytes, content_type: str, status: int, code: str, message: str
) -> None:
    got, answer, _ = await api.call(
        "PUT", "/v1/components/Decode/replicas", raw=raw, headers={"Content-Type": content_type}
    )
    assert got == status
    error = error_of(answer)
    assert error["code"] == code
    assert message in error["message"]


async def test_body_over_the_size_limit_is_413(api: Served) -> None:
    raw = b'{"replicas": 1, "pad": "' + b"x" * (70 * 1024) + b'"}'
    status, body, _ = await api.call(
        "PUT",
        "/v1/components/Decode/replicas",
        raw=raw,
        headers={"Content-Type": "application/json"},
    )
    assert status == 413
    error = error_of(body)
    assert error["code"] == "payload_too_large"
    assert error["message"] == "request body is larger than the 65536 bytes this server accepts"


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"wait": 1}, 400, "body.wait must be a boolean, got an integer"),
        ({"replicas": 1}, 400, "body has an unknown key 'replicas' (allowed: wait, timeout_s)"),
        ({"timeout_s": -2}, 422, "body.timeout_s must be > 0, got -2"),
        ({"timeout_s": 1e9}, 422, "body.timeout_s must be <= 3600.0, got 1000000000.0"),
    ],
)
async def test_restart_body_is_validated(
    api: Served, body: object, status: int, message: str
) -> None:
    got, answer, _ = await api.call("POST", "/v1/components/Decode/restart", body=body)
    assert got == status
    assert error_of(answer)["message"] == message


@pytest.mark.parametrize(
    ("query", "status", "code", "message"),
    [
        ("?lines=abc", 400, "bad_request", "query.lines must be an integer, got 'abc'"),
        ("?lines=1.5", 400, "bad_request", "query.lines must be an integer, got '1.5'"),
        ("?lines=-1", 422, "invalid_value", "query.lines must be >= 0, got -1"),
        ("?lines=10001", 422, "invalid_value", "query.lines must be <= 10000, got 10001"),
        (
            "?stream=foo",
            400,
            "bad_request",
            "query.stream must be one of stdout, stderr, both, got 'foo'",
        ),
        ("?lines=1&lines=2", 400, "bad_request", "query parameter 'lines' is given 2 times"),
        (
            "?line=5",
            400,
            "bad_request",
            "unknown query parameter 'line' (allowed: lines, replica, stream)",
        ),
        ("?replica=../x", 400, "bad_request", "query.replica '../x' does not match"),
        ("?replica=7", 404, "component_not_found", "Talker has no replica 7"),
    ],
)
async def test_logs_parameters_are_validated(
    api: Served, query: str, status: int, code: str, message: str
) -> None:
    got, body, _ = await api.call("GET", f"/v1/components/Talker/logs{query}")
    assert got == status
    error = error_of(body)
    assert error["code"] == code
    assert error["message"].startswith(message)


async def test_topology_json_dot_and_mermaid(api: Served) -> None:
    status, body, resp = await api.call("GET", "/v1/topology")
    assert status == 200 and resp.content_type == "application/json"
    assert body == await api.connector.get_system_topology()
    status, text, resp = await api.call("GET", "/v1/topology?format=dot")
    assert status == 200 and resp.content_type == "text/vnd.graphviz"
    assert text.startswith("digraph")
    status, text, resp = await api.call("GET", "/v1/topology?format=mermaid")
    assert status == 200 and resp.content_type == "text/plain"
    assert text.split()[0] in ("graph", "flowchart")
    status, body, _ = await api.call("GET", "/v1/topology?format=xml")
    assert status == 400
    assert error_of(body)["message"] == (
        "query.format must be one of json, dot, mermaid, got 'xml'"
    )


async def test_prefill_queue_and_machine_resources(api: Served) -> None:
    status, body, _ = await api.call("GET", "/v1/prefill-queue")
    assert status == 200
    assert body == await api.connector.get_prefill_queue_metrics()
    status, body, _ = await api.call("GET", "/v1/resources")
    assert status == 200
    assert isinstance(body["gpus"], list)


async def test_component_metrics_and_resources(api: Served) -> None:
    status, body, _ = await api.call("GET", "/v1/components/Decode/metrics")
    assert status == 200
    assert body["component"] == "Decode"
    assert isinstance(body["replicas"], list)
    status, body, _ = await api.call("GET", "/v1/components/Decode/resources")
    assert status == 200
    assert body["component"] == "Decode"


async def test_health_and_readiness(api: Served) -> None:
    status, body, _ = await api.call("GET", "/healthz")
    assert status == 200
    assert body["status"] == "ok" and body["namespace"] == "t" and body["uptime_s"] >= 0
    status, body, _ = await api.call("GET", "/readyz")
    assert status == 200
    assert body["status"] == "ready"
    supervisor = body["checks"]["supervisor"]
    assert supervisor["ok"] is True
    assert supervisor["detail"].startswith("circusd answered at tcp://127.0.0.1:")
    assert "discovery" not in body["checks"]  # discovery is off in this connector


async def test_metrics_disabled_is_503_json(api: Served) -> None:
    status, body, _ = await api.call("GET", "/metrics")
    assert status == 503
    error = error_of(body)
    assert error == {
        "code": "unavailable",
        "message": "metrics are disabled: this server was started without an exporter",
        "details": {"feature": "metrics"},
    }


async def test_unknown_route_and_method(api: Served) -> None:
    status, body, _ = await api.call("GET", "/v1/nothing")
    assert status == 404
    assert error_of(body) == {
        "code": "not_found",
        "message": "no route GET /v1/nothing",
        "details": {"path": "/v1/nothing"},
    }
    status, body, resp = await api.call("DELETE", "/v1/components/Decode")
    assert status == 405
    assert error_of(body)["code"] == "method_not_allowed"
    assert resp.headers["Allow"] == "GET,HEAD"


async def test_no_cors_headers(api: Served) -> None:
    headers = {"Origin": "http://elsewhere.example"}
    status, _, resp = await api.call("GET", "/v1/components", headers=headers)
    assert status == 200
    assert "Access-Control-Allow-Origin" not in resp.headers
    preflight = {**headers, "Access-Control-Request-Method": "PUT"}
    status, body, resp = await api.call(
        "OPTIONS", "/v1/components/Decode/replicas", headers=preflight
    )
    assert status == 405
    assert "Access-Control-Allow-Origin" not in resp.headers
    assert error_of(body)["code"] == "method_not_allowed"


async def test_body_on_a_route_that_takes_none_is_400(api: Served) -> None:
    status, body, _ = await api.call("POST", "/v1/shutdown", body={"now": True})
    assert status == 400
    assert error_of(body)["message"] == "POST /v1/shutdown takes no request body"
    assert api.shutdown_calls == []


async def test_status_page_and_assets(api: Served) -> None:
    status, html, resp = await api.call("GET", "/")
    assert status == 200 and resp.content_type == "text/html"
    assert '<script src="/static/app.js" defer></script>' in html
    assert "http" not in html.replace("http://www.w3.org", "")  # nothing from elsewhere
    csp = resp.headers["Content-Security-Policy"]
    assert "default-src 'self'" in csp and "script-src 'self'" in csp
    for name, content_type in (("app.js", "text/javascript"), ("style.css", "text/css")):
        status, _, resp = await api.call("GET", f"/static/{name}")
        assert status == 200 and resp.content_type == content_type
    status, body, _ = await api.call("GET", "/static/missing.js")
    assert status == 404 and error_of(body)["message"] == "no status page asset 'missing.js'"
    status, body, _ = await api.call("GET", "/static/..%2Fserver.py")
    assert status in (400, 404)
    error_of(body)


async def test_openapi_document_covers_every_served_route(api: Served) -> None:
    status, doc, _ = await api.call("GET", "/openapi.json")
    assert status == 200
    assert doc["openapi"] == "3.1.0"
    served = {
        (route.method, route.resource.canonical)
        for route in api.server.runner.app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    documented = {(method.upper(), path) for path, item in doc["paths"].items() for method in item}
    assert served == documented
    scale = doc["paths"]["/v1/components/{name}/replicas"]["put"]
    assert scale["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ScaleRequest"
    }
    assert set(scale["responses"]) == {
        "200",
        "202",
        "400",
        "403",
        "404",
        "409",
        "413",
        "415",
        "422",
        "500",
        "503",
        "504",
    }
    assert scale["security"] == []  # no token on this server
