"""The ``curl`` line ``dynamo-local up`` prints once a graph serves: pasteable as printed,
aimed at the frontend replica's real port, and printed only once the whole graph is ready
and the frontend lists a model (never a line that cannot work)."""

from __future__ import annotations

import asyncio
import json
import shlex
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import pytest
from aiohttp import web

from connector.dynamo.frontend_hint import announce_when_serving, curl_command, frontend_url
from connector.events import Event, Subscriber
from connector.view import ComponentView, ConnectorView, ReplicaView

DEFAULT_READINESS = "http://127.0.0.1:{port.http}/v1/models"


def _replica(ports: dict[str, int], ready: bool = True) -> ReplicaView:
    return ReplicaView(
        component="Frontend",
        replica="1",
        watcher="ns.frontend.1",
        state="ready" if ready else "starting",
        ready=ready,
        pid=1,
        create_time=None,
        started_at=None,
        restarts=0,
        last_exit_code=None,
        ports=ports,
    )


def test_curl_is_pasteable_json_for_any_model_name() -> None:
    command = curl_command("http://127.0.0.1:20000", "it's-a-model")
    argv = shlex.split(command)
    assert argv[:2] == ["curl", "-s"]
    assert argv[2] == "http://127.0.0.1:20000/v1/chat/completions"
    assert argv[3:5] == ["-H", "Content-Type: application/json"]
    assert argv[5] == "-d"
    assert json.loads(argv[6]) == {
        "model": "it's-a-model",
        "messages": [{"role": "user", "content": "hello"}],
        "max_tokens": 16,  # the mocker refuses a request without it
    }
    assert curl_command("http://127.0.0.1:1", "tiny-llama") == (
        "curl -s http://127.0.0.1:1/v1/chat/completions -H 'Content-Type: application/json' "
        """-d '{"model":"tiny-llama","messages":[{"role":"user","content":"hello"}],"""
        """"max_tokens":16}'"""
    )


def test_frontend_url_follows_the_readiness_probe_else_the_http_port() -> None:
    replica = _replica({"http": 20001, "system": 20002})
    assert frontend_url(DEFAULT_READINESS, replica) == "http://127.0.0.1:20001"
    # `--http-port 8000` in the args: the default probe names that port.
    assert frontend_url("http://127.0.0.1:8000/v1/models", replica) == "http://127.0.0.1:8000"
    # A probe of its own (health on another port): the http port.
    assert frontend_url("http://127.0.0.1:{port.system}/health", replica) == (
        "http://127.0.0.1:20001"
    )
    assert frontend_url(None, _replica({"system": 20002})) is None
    assert frontend_url("http://127.0.0.1:{port.gone}/v1/models", _replica({})) is None


class FakeConnector:
    """A connector's read side whose view the test changes, with events that wake readers."""

    def __init__(self, view: ConnectorView) -> None:
        self.current = view
        self.subscribers: list[Subscriber] = []

    def view(self) -> ConnectorView:
        return self.current

    def recent_events(self, since: int = 0) -> list[Event]:
        return []

    def subscribe_events(self, fn: Subscriber) -> Callable[[], None]:
        self.subscribers.append(fn)
        return lambda: self.subscribers.remove(fn)

    def change(self, view: ConnectorView) -> None:
        self.current = view
        for fn in list(self.subscribers):
            fn(Event(seq=1, time=time.time(), kind="ready"))


def _view(port: int, ready: bool) -> ConnectorView:
    components = tuple(
        ComponentView(
            name=name,
            role=role,
            sub_component_type=None,
            dynamo_namespace="ns",
            status="running" if ready else "starting",
            desired=1,
            running=1,
            ready=1 if ready else 0,
            restarts=0,
            crashloops=0,
            scale_in_flight=False,
            min_replicas=0,
            max_replicas=None,
        )
        for name, role in (("Frontend", "frontend"), ("Decode", "worker"))
    )
    frontend = _replica({"http": port}, ready=ready)
    return ConnectorView(
        namespace="ns",
        taken_at=time.time(),
        components=components,
        replicas=(frontend, replace(frontend, component="Decode", watcher="ns.decode.1")),
    )


@pytest.fixture
async def models_server() -> AsyncIterator[tuple[int, list[str]]]:
    """A /v1/models that lists whatever the test puts in the list it yields."""
    listed: list[str] = []

    async def models(_request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": m} for m in listed]})

    app = web.Application()
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server: Any = site._server
    port = server.sockets[0].getsockname()[1]
    try:
        yield port, listed
    finally:
        await runner.cleanup()


async def test_printed_once_the_graph_is_ready_and_a_model_is_listed(
    models_server: tuple[int, list[str]],
) -> None:
    port, listed = models_server
    connector = FakeConnector(_view(port, ready=False))
    lines: list[str] = []
    task = asyncio.create_task(
        announce_when_serving(connector, {"Frontend": DEFAULT_READINESS}, lines.append, poll_s=0.02)
    )
    await asyncio.sleep(0.2)
    assert lines == []  # not ready yet
    connector.change(_view(port, ready=True))
    await asyncio.sleep(0.2)
    assert lines == []  # ready, but the model is not registered yet: no line that 404s
    listed.append("tiny-llama")
    assert await asyncio.wait_for(task, 5) is True
    base = f"http://127.0.0.1:{port}"
    assert lines == [
        f"dynamo-local: Frontend serves 'tiny-llama' at {base}; try:",
        f"  {curl_command(base, 'tiny-llama')}",
    ]
    assert connector.subscribers == []  # unsubscribed once ready


async def test_nothing_printed_for_a_frontend_that_lists_no_model(
    models_server: tuple[int, list[str]],
) -> None:
    port, _ = models_server
    connector = FakeConnector(_view(port, ready=True))
    lines: list[str] = []
    printed = await announce_when_serving(
        connector, {"Frontend": DEFAULT_READINESS}, lines.append, poll_s=0.02, model_wait_s=0.3
    )
    assert printed is False and lines == []
    assert await announce_when_serving(connector, {}, lines.append) is False
