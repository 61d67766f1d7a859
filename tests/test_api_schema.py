"""Schemathesis against the live server, from the ``/openapi.json`` it serves.

Every operation gets a bounded number of generated requests, valid and invalid, sent to a
real connector (with auth on and the real exporter behind ``/metrics``); every answer must
be documented (status, content type, schema) and none may be a 5xx.
"""

from __future__ import annotations

import asyncio
import json
import urllib.request
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from connector.graph import SubComponentType
from exporter.service import build_exporter
from tests.api_helpers import QUICK, TALK, serve
from tests.core_helpers import make_graph, svc, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

TOKEN = "schemathesis-token"
EXAMPLES_PER_OPERATION = 25


def fuzz_graph():  # type: ignore[no-untyped-def]
    """Components that converge fast: a generated ``wait: true`` never waits long."""
    return make_graph(
        svc("Frontend", replicas=1, max_replicas=2, readiness=QUICK),
        svc(
            "Prefill",
            sub_component_type=SubComponentType.PREFILL,
            replicas=0,
            max_replicas=2,
            readiness=QUICK,
        ),
        svc(
            "Decode",
            sub_component_type=SubComponentType.DECODE,
            replicas=1,
            max_replicas=2,
            readiness=QUICK,
        ),
        svc("Talker", TALK, replicas=1, max_replicas=1, readiness=QUICK),
        name="fuzz",
    )


def run_schemathesis(base_url: str, names: list[str]) -> tuple[list[str], dict[str, set[int]]]:
    """Runs every operation; returns the failures (operation: error) and, per operation,
    the statuses it answered."""
    with urllib.request.urlopen(base_url + "/openapi.json") as answer:
        document = json.load(answer)
    schema = schemathesis.openapi.from_dict(document)
    failures: list[str] = []
    statuses: dict[str, set[int]] = {}
    headers = {"Authorization": f"Bearer {TOKEN}"}
    for result in schema.get_all_operations():
        operation = result.ok()
        strategies = []
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            strategies.append(operation.as_strategy(mode))
            if any(p.name == "name" for p in operation.path_parameters):
                # Mostly real components, so that requests get past the 404.
                strategies += [
                    operation.as_strategy(mode, path_parameters={"name": n}) for n in names
                ]

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=True,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=st.one_of(strategies))
        def check(case: schemathesis.Case) -> None:
            response = case.call_and_validate(base_url=base_url, headers=headers, timeout=60)
            statuses.setdefault(case.operation.label, set()).add(response.status_code)

        try:
            check()
        except Exception as exc:
            failures.append(f"{operation.label}: {exc}")
    return failures, statuses


async def test_live_server_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    graph = fuzz_graph()
    async with serve(tmp_path, graph, token=TOKEN) as first:
        exporter = build_exporter(first.connector)
        await exporter.start()
        try:
            from connector.server import create_app, start_server

            app = create_app(
                first.connector,
                token=TOKEN,
                exporter=exporter,
                request_shutdown=lambda: first.shutdown_calls.append(0.0),
            )
            server = await start_server(app, "127.0.0.1", 0)
            try:
                view = first.connector.view
                await wait_until(lambda: all(c.ready == c.desired for c in view().components))
                failures, statuses = await asyncio.to_thread(
                    run_schemathesis, server.url, sorted(graph.services)
                )
            finally:
                await server.stop()
        finally:
            await exporter.stop()
    assert failures == [], "\n\n".join(failures)
    assert sorted(statuses) == sorted(document_operations())
    # Generated requests got past validation too, not only refused (random asset names
    # are all unknown: /static/{file} answers 400/404 only).
    without_success = [
        label
        for label, got in statuses.items()
        if not any(200 <= s < 300 for s in got) and label != "GET /static/{file}"
    ]
    assert without_success == []


def document_operations() -> list[str]:
    from connector.api.routes import ROUTES

    return [f"{r.method} {r.path}" for r in ROUTES]
