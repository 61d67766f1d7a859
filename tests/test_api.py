"""The HTTP API changing a real connector under a real circusd: scaling, restarts, waits,
crash loops, logs, events, shutdown, metrics, guards. Each test owns its connector; the
read-only routes and refused requests are in ``test_api_errors.py`` on a shared one."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from connector.api.context import ApiSettings
from tests.api_helpers import Served, error_of, serve
from tests.core_helpers import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Served]:
    async with serve(tmp_path) as served:
        view = served.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        yield served


# ----------------------------------------------------------------------- scaling


async def test_scale_with_wait_converges_and_records_the_event(api: Served) -> None:
    status, body, _ = await api.call(
        "PUT", "/v1/components/Decode/replicas", body={"replicas": 3, "wait": True, "timeout_s": 20}
    )
    assert status == 200
    assert body["component"] == "Decode"
    assert body["operation"] == "scale"
    assert body["target"] == 3
    assert body["waited"] is True and body["converged"] is True
    assert body["state"]["replicas"]["ready"] == 3
    assert body["state"]["status"] == "running"
    scale_events = [e for e in api.connector.recent_events(0) if e.kind == "scale"]
    assert scale_events[-1].component == "Decode"
    assert (scale_events[-1].from_replicas, scale_events[-1].to_replicas) == (1, 3)
    assert scale_events[-1].outcome == "ok"
    assert scale_events[-1].source == "api"


async def test_scale_without_wait_answers_202_then_converges(api: Served) -> None:
    # 2.0 is the integer 2 in JSON (and JSON Schema); it is normalized, not refused.
    status, body, _ = await api.call(
        "PUT", "/v1/components/Prefill/replicas", body={"replicas": 2.0}
    )
    assert status == 202
    assert body["waited"] is False and body["target"] == 2
    assert isinstance(body["target"], int)
    assert body["state"]["replicas"]["desired"] == 2
    view = api.connector.view
    await wait_until(lambda: view().component("Prefill").ready == 2)  # type: ignore[union-attr]
    status, body, _ = await api.call("PUT", "/v1/components/Prefill/replicas", body={"replicas": 0})
    assert status == 202
    await wait_until(lambda: not view().replicas_of("Prefill"))


async def test_scale_from_the_cli_user_agent_is_recorded_as_cli(api: Served) -> None:
    status, _, _ = await api.call(
        "PUT",
        "/v1/components/Decode/replicas",
        body={"replicas": 1, "wait": True},
        headers={"User-Agent": "dynamo-local-cli/1"},
    )
    assert status == 200
    assert [e.source for e in api.connector.recent_events(0) if e.kind == "scale"][-1] == "cli"


async def test_scale_wait_timeout_is_202_unconverged_and_keeps_the_target(api: Served) -> None:
    status, body, _ = await api.call(
        "PUT", "/v1/components/Slow/replicas", body={"replicas": 1, "wait": True, "timeout_s": 0.3}
    )
    assert status == 202
    assert body["converged"] is False
    assert body["waited"] is True
    assert body["reason"] == (
        "Slow did not converge to 1 ready replicas within 0.3 s (0 ready, status starting)"
    )
    assert body["state"]["replicas"]["desired"] == 1
    assert body["state"]["status"] == "starting"
    assert api.connector.view().component("Slow").desired == 1  # type: ignore[union-attr]


async def test_superseded_wait_is_409(api: Served) -> None:
    waiting = asyncio.create_task(
        api.call(
            "PUT",
            "/v1/components/Slow/replicas",
            body={"replicas": 1, "wait": True, "timeout_s": 20},
        )
    )
    await wait_until(lambda: api.connector.view().component("Slow").desired == 1)  # type: ignore[union-attr]
    status, _, _ = await api.call("PUT", "/v1/components/Slow/replicas", body={"replicas": 0})
    assert status == 202
    status, body, _ = await waiting
    assert status == 409
    error = error_of(body)
    assert error["code"] == "superseded"
    assert error["message"] == "scale of Slow to 1 was superseded by a newer target (0)"


async def test_crashloop_refuses_scaling_until_restarted(api: Served) -> None:
    status, _, _ = await api.call("PUT", "/v1/components/Crashy/replicas", body={"replicas": 1})
    assert status == 202
    view = api.connector.view
    await wait_until(lambda: view().component("Crashy").status == "crashloop")  # type: ignore[union-attr]
    status, body, _ = await api.call("PUT", "/v1/components/Crashy/replicas", body={"replicas": 1})
    assert status == 409
    error = error_of(body)
    assert error["code"] == "crashloop"
    assert error["message"].startswith("Crashy is in crashloop (")
    status, body, _ = await api.call("POST", "/v1/components/Crashy/restart")
    assert status == 202
    assert body["operation"] == "restart"
    assert body["state"]["status"] != "crashloop"


async def test_restart_with_wait_replaces_every_replica(api: Served) -> None:
    before = {r.replica: r.pid for r in api.connector.view().replicas_of("Decode")}
    status, body, _ = await api.call(
        "POST", "/v1/components/Decode/restart", body={"wait": True, "timeout_s": 20}
    )
    assert status == 200
    assert (body["operation"], body["target"], body["converged"]) == ("restart", 1, True)
    after = {r.replica: r.pid for r in api.connector.view().replicas_of("Decode")}
    assert len(after) == 1
    assert set(after.values()).isdisjoint(before.values())


# --------------------------------------------------------------------------- logs


async def test_logs_of_a_component(api: Served) -> None:
    view = api.connector.view
    await wait_until(lambda: view().component("Talker").ready == 1)  # type: ignore[union-attr]

    async def lines(query: str) -> list[str]:
        status, body, _ = await api.call("GET", f"/v1/components/Talker/logs{query}")
        assert status == 200, body
        assert body["component"] == "Talker"
        return list(body["lines"])

    deadline = asyncio.get_running_loop().time() + 10
    both: list[str] = []
    while asyncio.get_running_loop().time() < deadline:
        both = await lines("")
        if len(both) == 2:
            break
        await asyncio.sleep(0.05)
    assert [line.split("] ", 1)[0] for line in both] == [
        "[Talker/1 stdout",
        "[Talker/1 stderr",
    ], both
    assert both[0].endswith("| hello from talker")
    assert both[1].endswith("| oops on stderr")
    only_err = await lines("?stream=stderr&lines=5")
    assert len(only_err) == 1 and only_err[0].startswith("[Talker/1] ")
    assert only_err[0].endswith("| oops on stderr")
    assert await lines("?lines=1") == both[-1:]
    assert await lines("?lines=0") == []
    assert await lines("?replica=1&stream=stdout") == [both[0].replace(" stdout]", "]", 1)]
    assert await lines("?replica=Talker/1&stream=stdout") == [both[0].replace(" stdout]", "]", 1)]


# ------------------------------------------------------------------------ events


async def test_events_json_since_and_limit(api: Served) -> None:
    status, body, _ = await api.call("GET", "/v1/events")
    assert status == 200
    seqs = [e["seq"] for e in body["events"]]
    assert seqs == sorted(seqs) and seqs[-1] == body["last_seq"]
    assert all({"seq", "time", "kind"} <= set(e) for e in body["events"])
    status, later, _ = await api.call("GET", f"/v1/events?since={seqs[-2]}")
    assert [e["seq"] for e in later["events"]] == seqs[-1:]
    status, limited, _ = await api.call("GET", "/v1/events?limit=2")
    assert [e["seq"] for e in limited["events"]] == seqs[-2:]
    for query, code in (("?since=-1", "invalid_value"), ("?limit=0", "invalid_value")):
        status, answer, _ = await api.call("GET", f"/v1/events{query}")
        assert status == 422 and error_of(answer)["code"] == code


# -------------------------------------------------------------------- operations


async def test_readiness_fails_when_circusd_is_gone(tmp_path: Path) -> None:
    settings = ApiSettings(readiness_timeout_s=0.3)
    async with serve(tmp_path, settings=settings) as api:
        info = api.connector.supervisor.info
        assert info is not None and info.pid is not None
        import os
        import signal

        await api.connector.reconciler.stop_loop()  # type: ignore[union-attr]
        os.kill(info.pid, signal.SIGSTOP)  # frozen: alive but not answering
        try:
            status, body, _ = await api.call("GET", "/readyz")
        finally:
            os.kill(info.pid, signal.SIGCONT)
        assert status == 503
        error = error_of(body)
        assert error["code"] == "not_ready"
        assert error["message"].startswith("not ready: supervisor: circusd did not answer 'list'")
        assert error["details"]["checks"]["supervisor"]["ok"] is False


async def test_shutdown_calls_the_handler(api: Served) -> None:
    status, body, _ = await api.call("POST", "/v1/shutdown")
    assert status == 202
    assert body == {"status": "shutting_down"}
    assert len(api.shutdown_calls) == 1


async def test_shutdown_without_a_handler_is_503(tmp_path: Path) -> None:
    async with serve(tmp_path, with_shutdown=False) as api:
        status, body, _ = await api.call("POST", "/v1/shutdown")
        assert status == 503
        assert error_of(body)["message"] == (
            "this server cannot be shut down over HTTP (it is embedded in another program)"
        )


async def test_metrics_mounted_from_the_exporter(tmp_path: Path) -> None:
    from exporter.service import build_exporter

    async with serve(tmp_path) as first:
        exporter = build_exporter(first.connector)
        await exporter.start()
        try:
            from connector.api.server import create_app, start_server

            app = create_app(first.connector, exporter=exporter)
            server = await start_server(app, "127.0.0.1", 0)
            try:
                async with first.http.get(server.url + "/metrics") as resp:
                    text = await resp.text()
                    assert resp.status == 200
                    assert resp.content_type == "text/plain"
                    assert "dynamo_local_" in text
                headers = {"Accept": "application/openmetrics-text; version=1.0.0"}
                async with first.http.get(server.url + "/metrics", headers=headers) as resp:
                    assert resp.status == 200
                    assert resp.content_type == "application/openmetrics-text"
                    assert (await resp.text()).rstrip().endswith("# EOF")
            finally:
                await server.stop()
        finally:
            await exporter.stop()


# ----------------------------------------------------------- errors never leak


async def test_internal_error_is_json_without_traceback(
    api: Served, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken() -> None:
        raise RuntimeError("secret internals")

    monkeypatch.setattr(api.connector, "view", broken)
    with caplog.at_level(logging.ERROR, logger="connector.api.errors"):
        status, body, _ = await api.call("GET", "/v1/components")
    assert status == 500
    error = error_of(body)
    assert error["code"] == "internal"
    request_id = error["details"]["request_id"]
    assert error["message"] == (
        "internal error while serving GET /v1/components; the server log has the details "
        f"under request id {request_id}"
    )
    assert "secret" not in str(body)
    logged = [r for r in caplog.records if request_id in r.getMessage()]
    assert logged and logged[0].exc_info is not None
    assert "secret internals" in str(logged[0].exc_info[1])


async def test_request_timeout_is_504(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with serve(tmp_path, settings=ApiSettings(request_timeout_s=0.2)) as api:

        async def hang() -> dict[str, object]:
            await asyncio.sleep(30)
            return {}

        monkeypatch.setattr(api.connector, "get_prefill_queue_metrics", hang)
        status, body, _ = await api.call("GET", "/v1/prefill-queue")
        assert status == 504
        assert error_of(body) == {
            "code": "request_timeout",
            "message": "GET /v1/prefill-queue did not finish within 0.2 s",
            "details": {"timeout_s": 0.2},
        }


async def test_foreign_host_and_cross_origin_writes_are_refused(tmp_path: Path) -> None:
    settings = ApiSettings(allowed_hosts=frozenset({"127.0.0.1", "localhost", "::1"}))
    async with serve(tmp_path, settings=settings) as api:
        status, body, _ = await api.call(
            "GET", "/v1/components", headers={"Host": "attacker.example"}
        )
        assert status == 403
        assert error_of(body)["message"] == ("Host 'attacker.example' is not a name of this server")
        status, _, _ = await api.call("GET", "/v1/components", headers={"Host": "localhost:1"})
        assert status == 200
        status, body, _ = await api.call(
            "PUT",
            "/v1/components/Decode/replicas",
            body={"replicas": 2},
            headers={"Origin": "http://attacker.example"},
        )
        assert status == 403
        assert error_of(body)["message"] == (
            "cross-origin PUT from http://attacker.example refused"
        )
        assert api.connector.view().component("Decode").desired == 1  # type: ignore[union-attr]
        status, _, _ = await api.call(
            "PUT",
            "/v1/components/Decode/replicas",
            body={"replicas": 1},
            headers={"Origin": api.url},
        )
        assert status == 202


async def test_readiness_includes_discovery_when_configured(tmp_path: Path) -> None:
    async with serve(tmp_path, discovery="file") as api:
        status, body, _ = await api.call("GET", "/readyz")
        assert status == 200, body
        assert body["checks"]["discovery"] == {
            "ok": True,
            "detail": f"file discovery at {tmp_path / 'discovery'} is healthy",
        }
        assert body["checks"]["supervisor"]["ok"] is True


async def test_resources_without_a_resource_report_is_503(
    api: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    from connector.local import LocalConnector

    monkeypatch.delattr(LocalConnector, "get_machine_resources", raising=False)
    status, body, _ = await api.call("GET", "/v1/resources")
    assert status == 503
    assert error_of(body) == {
        "code": "unavailable",
        "message": "this connector does not report its resource allocation (no resource "
        "manager with get_machine_resources)",
        "details": {"feature": "resources"},
    }
