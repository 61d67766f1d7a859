"""The exporter over real processes: promtool on the live output, killed replicas vanish."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from exporter.service import Exporter, build_exporter
from tests.exporter_helpers import (
    FakeReader,
    Tree,
    component,
    key,
    replica,
    samples,
    series_with,
    spawn_tree,
    view_of,
)

PROMTOOL = shutil.which("promtool")


@dataclass
class Live:
    client: TestClient[web.Request, web.Application]
    exporter: Exporter
    reader: FakeReader
    trees: list[Tree]

    async def scrape(self, accept: str = "") -> str:
        resp = await self.client.get("/metrics", headers={"Accept": accept})
        assert resp.status == 200
        return await resp.text()


@pytest.fixture
async def live() -> AsyncIterator[Live]:
    trees = [spawn_tree(2), spawn_tree(0), spawn_tree(1)]
    try:
        replicas = (
            replica("prefill", 0, trees[0].pid, create_time=trees[0].create_time()),
            replica("decode", 0, trees[1].pid, create_time=trees[1].create_time()),
            replica("decode", 1, trees[2].pid, create_time=trees[2].create_time()),
        )
        components = (component("prefill", sub="prefill"), component("decode", desired=2))
        reader = FakeReader(view_of(components, replicas, taken_at=1.0))
        exporter = build_exporter(reader, interval_s=3600.0)  # tests sample explicitly
        app = web.Application()
        app.router.add_get("/metrics", exporter.handle_metrics)
        await exporter.start()
        client = TestClient(TestServer(app, host="127.0.0.1"))
        await client.start_server()
        try:
            yield Live(client, exporter, reader, trees)
        finally:
            await client.close()
            await exporter.stop()
    finally:
        for tree in trees:
            if tree.proc.poll() is None:
                tree.kill()


@pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus) is not installed")
async def test_promtool_check_metrics_reports_nothing_on_live_output(live: Live) -> None:
    await live.exporter.sample_once()  # a second cycle: utilization ratios exist now
    live.reader.events.emit(
        "scale", component="decode", source="api", from_replicas=1, to_replicas=2,
        outcome="ok", duration_s=0.8, trace_id="0af7651916cd43dd8448eb211c80319c",
    )  # fmt: skip
    text = await live.scrape()
    assert series_with(text, "replica_cpu_utilization_ratio")
    assert series_with(text, "scale_duration_seconds_bucket")
    assert PROMTOOL is not None
    proc = await asyncio.create_subprocess_exec(
        PROMTOOL, "check", "metrics",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(text.encode()), 30)
    assert (proc.returncode, out.decode()) == (0, "")


async def test_process_trees_are_summed_per_replica(live: Live) -> None:
    values = samples(await live.scrape())
    for comp, ordinal, processes in (("prefill", "0", 3), ("decode", "0", 1), ("decode", "1", 2)):
        labels = {"dynamo_namespace": "demo", "dynamo_component": comp, "replica": ordinal}
        assert values[key("dynamo_local_replica_processes", **labels)] == processes
        assert values[key("dynamo_local_replica_memory_rss_bytes", **labels)] > 0
        assert key("dynamo_local_replica_cpu_seconds_total", **labels) in values
    (info,) = series_with(await live.scrape(), "replica_info", 'dynamo_component="prefill"')
    assert f'pid="{live.trees[0].pid}"' in info
    assert 'command="sh -c sleep 600 & sleep 600 & wait"' in info


async def test_killed_replica_series_are_gone_on_the_next_scrape(live: Live) -> None:
    decode1 = ('dynamo_component="decode"', 'replica="1"')
    before = await live.scrape()
    assert series_with(before, "replica_cpu_seconds_total", *decode1)
    live.trees[2].kill()
    await live.exporter.sample_once()
    after = await live.scrape()
    for name in ("replica_info", "replica_cpu_seconds_total", "replica_memory_rss_bytes"):
        assert not series_with(after, name, *decode1), name
    # The other replicas are untouched; the connector's own view still lists the slot until
    # it notices the exit, and says so through the state series.
    assert series_with(after, "replica_cpu_seconds_total", 'dynamo_component="prefill"')
    assert series_with(after, "replica_cpu_seconds_total", 'dynamo_component="decode"')
    assert series_with(after, "replica_ready", *decode1)
