"""An experiment POSTed to a real connector runs the real aiperf (from ``.venv-aiperf``)
against the real Dynamo frontend and one real mocker (under that connector, discovering
through a real etcd), and a second one is cancelled while aiperf sends load.

Why the real frontend, not dynamo-local's mock worker: aiperf needs an OpenAI-compatible
server (``/v1/models``, streaming ``/v1/chat/completions``), and the mock worker serves only
``/metrics`` and ``/health``. The graph is the cheapest real one that serves: a frontend and
one aggregated mocker (each ready in about a second), no Planner, no prefill worker.
"""

from __future__ import annotations

import asyncio
import csv
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from connector.api.server import RunningServer, create_app, start_server
from connector.experiment.aiperf import AiperfMissing, find_aiperf
from connector.graph.loader import load_graph
from connector.local import ConnectorOptions, LocalConnector
from tests.dynamo_helpers import TINY_MODEL_NAME, require_dynamo, until_the_model_is_listed
from tests.servers import EtcdServer
from tests.test_dynamo_e2e import GRAPH  # the plain graph, as copied from a cluster

pytestmark = [pytest.mark.integration, pytest.mark.e2e, pytest.mark.slow]

NS = "apiexp"
TOKEN = "real-exp"


def _plan(name: str, duration: float, tokenizer: Path) -> dict[str, Any]:
    return {
        "name": name,
        "seed": 5,
        "tokenizer": str(tokenizer),
        "gracePeriod": 10,
        "cooldown": 1,
        "phases": [
            {
                "name": "load",
                "concurrency": 3,
                "inputTokens": 64,
                "outputTokens": 16,
                "duration": duration,
            }
        ],
    }


@dataclass
class Live:
    connector: LocalConnector
    server: RunningServer
    http: aiohttp.ClientSession

    async def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with self.http.request(
            method, self.server.url + path, json=body, headers=headers
        ) as resp:
            if resp.content_type == "application/json":
                return resp.status, await resp.json()
            return resp.status, await resp.text()


@pytest.fixture
async def live(
    tmp_path: Path, tiny_model: Path, etcd_server: EtcdServer, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Live]:
    require_dynamo()
    try:
        monkeypatch.setenv("AIPERF", str(find_aiperf()))
    except AiperfMissing as exc:
        pytest.skip(str(exc))
    graph_file = tmp_path / "graph.yaml"
    graph_file.write_text(GRAPH.format(ns=NS, model=tiny_model, name=TINY_MODEL_NAME))
    options = ConnectorOptions(discovery="etcd", etcd_url=etcd_server.url, gpu_backend="none")
    conn = LocalConnector(NS, load_graph(graph_file), tmp_path / "wd", options)
    await conn.initialize()
    try:
        server = await start_server(create_app(conn, token=TOKEN), "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as http:
                await conn.wait_for_deployment_ready(timeout_s=60)
                frontend = next(r for r in conn.view().replicas if r.component == "Frontend")
                await until_the_model_is_listed(http, frontend.ports["http"])
                yield Live(conn, server, http)
        finally:
            await server.stop()
    finally:
        await conn.shutdown()


def _aiperf_processes() -> list[psutil.Process]:
    """aiperf processes this test started (children of this process: the runner is here)."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            if any("aiperf" in part for part in child.cmdline()[:2]):
                found.append(child)
        except psutil.Error:
            continue
    return found


async def _follow(live: Live, run_id: str, until: Any, limit_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + limit_s
    while True:
        status, body = await live.call("GET", f"/v1/experiments/{run_id}")
        assert status == 200, body
        if until(body):
            return body
        assert time.monotonic() < deadline, f"not there within {limit_s:g} s: {body}"
        await asyncio.sleep(0.25)


@pytest.mark.timeout(240)
async def test_a_posted_experiment_runs_aiperf_and_another_is_cancelled(
    live: Live, tiny_model: Path
) -> None:
    t0 = time.monotonic()
    status, run = await live.call("POST", "/v1/experiments", _plan("api-e2e", 4, tiny_model))
    assert status == 202, run
    run_id = run["id"]
    # The live timeline shows the run's phase while it sends load.
    phases_seen: set[str] = set()
    since = 0

    def done(body: dict[str, Any]) -> bool:
        return body["state"] != "running"

    deadline = time.monotonic() + 150
    body = run
    while not done(body):
        assert time.monotonic() < deadline, body
        status, page = await live.call("GET", f"/v1/timeline?since={since}")
        assert status == 200
        since = page["last_seq"]
        phases_seen |= {s["phase"] for s in page["samples"]}
        await asyncio.sleep(0.5)
        status, body = await live.call("GET", f"/v1/experiments/{run_id}")
    print(f"first run took {time.monotonic() - t0:.1f} s")
    assert body["state"] == "succeeded", body
    assert body["error"] is None and body["phase"] is None
    assert body["progress"]["fraction"] == 1.0
    summary = body["summary"]
    assert summary["errors"] == [] and summary["requests_failed"] == 0, summary
    assert summary["requests_total"] >= 3, summary
    assert set(summary["requests_by_phase"]) == {"load"}
    assert body["latest_sample"]["components"]["Worker"]["ready"] == 1
    assert body["phases"][0]["start"] is not None and body["phases"][0]["end"] is not None
    assert "load" in phases_seen, phases_seen

    folder = Path(body["folder"])
    assert folder == live.connector.working_dir / "experiments" / run_id
    for name in ("plan.yaml", "timeline.csv", "events.jsonl", "summary.json", "report.html"):
        assert (folder / name).is_file(), name
    assert (folder / "aiperf" / "segment1" / "aiperf.yaml").is_file()
    assert body["report"] == f"/v1/experiments/{run_id}/report"
    status, page = await live.call("GET", body["report"])
    assert status == 200
    assert "<title>dynamo-local experiment: api-e2e</title>" in page

    # The second: cancelled while aiperf runs; aiperf is stopped, the folder written.
    status, run = await live.call("POST", "/v1/experiments", _plan("api-cancel", 120, tiny_model))
    assert status == 202, run
    cancel_id = run["id"]
    status, busy = await live.call("POST", "/v1/experiments", _plan("third", 5, tiny_model))
    assert status == 409 and busy["error"]["details"]["running"] == cancel_id
    # Once aiperf runs (sampling started before it): no need to wait for its load.
    deadline = time.monotonic() + 60
    while not _aiperf_processes():
        assert time.monotonic() < deadline, "aiperf did not start"
        await asyncio.sleep(0.1)
    began = time.monotonic()
    status, cancelled = await live.call("DELETE", f"/v1/experiments/{cancel_id}")
    assert status == 200, cancelled
    assert cancelled["state"] == "cancelled"
    assert cancelled["summary"]["errors"] == ["interrupted"]
    assert _aiperf_processes() == []
    print(f"cancelled in {time.monotonic() - began:.1f} s")
    cancel_folder = Path(cancelled["folder"])
    with (cancel_folder / "timeline.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) >= 1 and rows[-1]["Worker_ready"] == "1", rows
    assert (cancel_folder / "report.html").is_file()
    assert cancelled["report"] == f"/v1/experiments/{cancel_id}/report"
