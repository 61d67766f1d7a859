"""The ready-to-paste ``curl`` that ``dynamo-local up`` prints once a graph serves.

A newcomer who has just started a graph wants to see it answer. Once every component has
its replicas ready and a frontend replica lists a model on its OpenAI endpoint
(``GET /v1/models``), ``up`` prints a chat completion request for that model, with the
frontend's real (allocated) port, so it can be pasted as is. Any graph with a
``componentType: frontend`` service gets it; a frontend that never lists a model (a mock,
or one whose workers never register) gets no line rather than a wrong one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import shlex
from collections.abc import Callable

import aiohttp

from connector.events import Event
from connector.graph import templates
from connector.graph.model import Graph, Role
from connector.view import ConnectorReader, ReplicaView

log = logging.getLogger(__name__)

MODELS_PATH = "/v1/models"
POLL_S = 0.5
# After the graph is ready, how long to wait for a model to be listed before giving up.
MODEL_WAIT_S = 120.0


def curl_command(base_url: str, model: str, prompt: str = "hello", max_tokens: int = 16) -> str:
    """A shell command that asks ``model`` behind ``base_url`` for a chat completion.
    ``max_tokens`` is always given: Dynamo's mocker rejects a request without it."""
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": prompt}],
            "max_tokens": max_tokens,
        },
        separators=(",", ":"),
    )
    return (
        f"curl -s {shlex.quote(base_url + '/v1/chat/completions')} "
        f"-H 'Content-Type: application/json' -d {shlex.quote(body)}"
    )


def frontend_url(graph_readiness_url: str | None, replica: ReplicaView) -> str | None:
    """Where a frontend replica serves its OpenAI API: the base of its readiness URL when
    that is the default ``/v1/models`` probe (it follows ``--http-port`` too), else its
    ``http`` port."""
    if graph_readiness_url and graph_readiness_url.endswith(MODELS_PATH):
        try:
            url = templates.expand(
                graph_readiness_url, templates.values_of(replica.ports, replica.sockets)
            )
        except KeyError:
            url = None
        if url is not None:
            return url.removesuffix(MODELS_PATH)
    port = replica.ports.get("http")
    return f"http://127.0.0.1:{port}" if port else None


def _graph_ready(reader: ConnectorReader) -> bool:
    view = reader.view()
    return bool(view.components) and all(
        c.ready >= c.desired and not c.scale_in_flight for c in view.components
    )


async def _until_graph_ready(connector: ConnectorReader, backstop_s: float) -> None:
    """Return once every component has its replicas ready. Every connector event (a
    replica ready, a scale finished) wakes the check; ``backstop_s`` bounds a missed one."""
    loop = asyncio.get_running_loop()
    changed = asyncio.Event()

    def on_event(_event: Event) -> None:
        # Events may be emitted off the loop's thread.
        loop.call_soon_threadsafe(changed.set)

    unsubscribe = connector.subscribe_events(on_event)
    try:
        while not _graph_ready(connector):
            changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), backstop_s)
    finally:
        unsubscribe()


async def _models(session: aiohttp.ClientSession, base_url: str) -> list[str]:
    try:
        async with session.get(base_url + MODELS_PATH) as resp:
            if resp.status != 200:
                return []
            body = await resp.json(content_type=None)
    except (TimeoutError, aiohttp.ClientError, ValueError):
        return []
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        return []
    return [m["id"] for m in data if isinstance(m, dict) and isinstance(m.get("id"), str)]


async def announce_when_serving(
    connector: ConnectorReader,
    frontends: dict[str, str | None],
    out: Callable[[str], None],
    *,
    poll_s: float = POLL_S,
    model_wait_s: float = MODEL_WAIT_S,
) -> bool:
    """Wait until the graph is ready and a frontend lists a model, then print the curl.

    ``frontends``: each frontend service's name and readiness URL template. Returns
    whether a line was printed (False when no frontend listed a model in time). Runs
    until then; ``up`` cancels it when it stops first.
    """
    if not frontends:
        return False
    timeout = aiohttp.ClientTimeout(total=2)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        await _until_graph_ready(connector, poll_s)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + model_wait_s
        while loop.time() < deadline:
            view = connector.view()
            for name, readiness_url in frontends.items():
                for replica in view.replicas_of(name):
                    base = frontend_url(readiness_url, replica) if replica.ready else None
                    if base is None:
                        continue
                    models = await _models(session, base)
                    if models:
                        out(f"dynamo-local: {name} serves {models[0]!r} at {base}; try:")
                        out(f"  {curl_command(base, models[0])}")
                        return True
            await asyncio.sleep(poll_s)
    log.debug("no frontend listed a model within %s s of the graph being ready", model_wait_s)
    return False


def frontend_services(graph: Graph) -> dict[str, str | None]:
    """The graph's frontend services, each with its readiness URL template."""
    return {n: s.readiness.url for n, s in graph.services.items() if s.role is Role.FRONTEND}
