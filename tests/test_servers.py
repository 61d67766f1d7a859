"""Each real-server fixture proven by a round trip through its own client."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import aetcd
import nats
import psutil
import pytest
from aiohttp import web

from tests.servers import (
    CircusdServer,
    EtcdServer,
    NatsServer,
    PrometheusFactory,
    ServerStartError,
    free_port,
    wait_until,
)

pytestmark = pytest.mark.integration


async def test_etcd_put_get_and_lease(etcd_server: EtcdServer) -> None:
    assert etcd_server.url == f"http://127.0.0.1:{etcd_server.port}"
    assert etcd_server.host == "127.0.0.1"
    async with aetcd.Client(etcd_server.host, etcd_server.port, timeout=5) as client:
        lease = await client.lease(5)
        await client.put(b"v1/instances/ns/backend/generate/1", b'{"a":1}', lease=lease)
        got = await client.get(b"v1/instances/ns/backend/generate/1")
        assert got is not None
        assert got.value == b'{"a":1}'
        assert got.lease == lease.id
        await lease.revoke()
        assert await client.get(b"v1/instances/ns/backend/generate/1") is None


async def test_nats_jetstream_publish_and_consume(nats_server: NatsServer) -> None:
    assert nats_server.url == f"nats://127.0.0.1:{nats_server.port}"
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        await js.add_stream(name="t_prefill_queue", subjects=["t_prefill_queue.queue"])
        for i in range(3):
            await js.publish("t_prefill_queue.queue", f"m{i}".encode())
        sub = await js.pull_subscribe("t_prefill_queue.queue", durable="worker-group")
        msgs = await sub.fetch(3, timeout=2)
        assert [m.data for m in msgs] == [b"m0", b"m1", b"m2"]
        for m in msgs:
            await m.ack()
        info = await js.consumer_info("t_prefill_queue", "worker-group")
        assert info.num_pending == 0
        assert info.delivered.stream_seq == 3
    finally:
        await nc.close()


async def test_prometheus_scrapes_a_served_metric(prometheus_server: PrometheusFactory) -> None:
    async def metrics(_: web.Request) -> web.Response:
        body = '# TYPE fixture_probe gauge\nfixture_probe{side="test"} 42\n'
        return web.Response(text=body, content_type="text/plain")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        prom = prometheus_server([f"127.0.0.1:{port}"])
        assert prom.url == f"http://127.0.0.1:{prom.port}"
        result = await prom.wait_for('fixture_probe{side="test"}', timeout=20)
        assert len(result) == 1
        assert result[0]["value"][1] == "42"
        assert result[0]["metric"]["instance"] == f"127.0.0.1:{port}"
        assert await prom.query("absent_metric_name") == []
    finally:
        await runner.cleanup()


def test_prometheus_config_with_rules_is_generated(
    prometheus_server: PrometheusFactory, tmp_path: Path
) -> None:
    rules = tmp_path / "rules.yml"
    rules.write_text("groups:\n- name: g\n  rules:\n  - record: fixture:one\n    expr: vector(1)\n")
    prom = prometheus_server(
        ["127.0.0.1:9", "http://127.0.0.1:10/custom"], rule_files=[rules], scrape_interval="2s"
    )
    config = json.loads(prom.config_path.read_text())
    assert config["global"] == {"scrape_interval": "2s", "evaluation_interval": "2s"}
    assert config["rule_files"] == [str(rules)]
    assert [(j["metrics_path"], j["static_configs"]) for j in config["scrape_configs"]] == [
        ("/custom", [{"targets": ["127.0.0.1:10"]}]),
        ("/metrics", [{"targets": ["127.0.0.1:9"]}]),
    ]


def _circus_call(server: CircusdServer, command: str, **props: Any) -> dict[str, Any]:
    return server.call(command, **props)


async def test_circusd_adds_and_lists_a_watcher_then_stops_clean(tmp_path: Path) -> None:
    server = CircusdServer(tmp_path / "circusd")
    server.start()
    try:
        assert server.endpoint.startswith("tcp://127.0.0.1:")
        assert server.pubsub_endpoint.startswith("tcp://127.0.0.1:")
        reply = await asyncio.to_thread(
            _circus_call,
            server,
            "add",
            name="sleeper",
            cmd=sys.executable,
            args=["-c", "import time; time.sleep(60)"],
            start=True,
        )
        assert reply["status"] == "ok", reply
        listed = await asyncio.to_thread(_circus_call, server, "list")
        assert listed["watchers"] == ["sleeper"]
        pids_reply = await asyncio.to_thread(_circus_call, server, "list", name="sleeper")
        pids = pids_reply["pids"]
        assert isinstance(pids, list) and len(pids) == 1
        child = psutil.Process(pids[0])
        assert child.ppid() == server.pid
        circusd = psutil.Process(server.pid)
    finally:
        server.stop()
    assert not circusd.is_running()
    assert not child.is_running()


def test_circusd_fixture_serves_status(circusd_server: CircusdServer) -> None:
    assert circusd_server.call("status")["status"] == "ok"
    assert psutil.Process(circusd_server.pid).is_running()


def test_a_server_that_exits_while_starting_fails_with_its_log_tail(tmp_path: Path) -> None:
    class Broken(NatsServer):
        def argv(self) -> list[str]:
            return [sys.executable, "-c", "import sys; print('cannot open store'); sys.exit(3)"]

    server = Broken(tmp_path / "broken")
    with pytest.raises(ServerStartError) as err:
        server.start(timeout=5)
    assert str(err.value) == (
        f"nats exited with code 3 while starting; log tail ({server.log_path}):\ncannot open store"
    )
    assert server.proc is None


def test_a_server_that_never_gets_ready_is_stopped(tmp_path: Path) -> None:
    class Silent(NatsServer):
        def argv(self) -> list[str]:
            return [
                sys.executable,
                "-c",
                "import time; print('waiting', flush=True); time.sleep(30)",
            ]

    server = Silent(tmp_path / "silent")
    with pytest.raises(ServerStartError, match=r"^nats was not ready within 0.3 s; log tail"):
        server.start(timeout=0.3)
    assert server.proc is None


def test_wait_until_returns_the_value_and_times_out_with_the_last_error() -> None:
    calls = iter([0, 0, 7])
    assert wait_until(lambda: next(calls), timeout=2, interval=0.001) == 7

    def boom() -> bool:
        raise ValueError("still down")

    with pytest.raises(TimeoutError, match=r"within 0.05 s \(last error: ValueError"):
        wait_until(boom, timeout=0.05, interval=0.01)
