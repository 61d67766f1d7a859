"""``GET /v1/events`` as Server-Sent Events: backlog, live events, resume, heartbeats,
slow clients, and a clean goodbye when the server stops."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from connector.api import sse
from connector.api.context import ApiSettings
from connector.client import Client
from tests.api_helpers import serve
from tests.core_helpers import wait_until

pytestmark = pytest.mark.integration

STREAM = {"Accept": "text/event-stream"}


class Reader:
    """Reads one SSE response message by message (comments kept as ``(":", text)``)."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self.response = response

    async def message(self, limit_s: float = 10.0) -> dict[str, str]:
        fields: dict[str, str] = {}
        while True:
            raw = await asyncio.wait_for(self.response.content.readline(), limit_s)
            if raw == b"":
                return fields if fields else {"eof": "1"}
            line = raw.decode().rstrip("\n")
            if line == "":
                if fields:
                    return fields
                continue
            name, _, value = line.partition(":")
            fields[name or ":"] = value.removeprefix(" ")

    async def event(self, limit_s: float = 10.0) -> dict[str, str]:
        """The next message that is not a comment or the retry hint."""
        while True:
            msg = await self.message(limit_s)
            if set(msg) - {":", "retry"}:
                return msg


async def test_backlog_then_live_events(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        await wait_until(lambda: api.connector.view().component("Decode").ready == 1)  # type: ignore[union-attr]
        backlog = api.connector.recent_events(0)
        async with api.http.get(api.url + "/v1/events?since=0", headers=STREAM) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/event-stream; charset=utf-8"
            assert resp.headers["Cache-Control"] == "no-store"
            reader = Reader(resp)
            first = await reader.message()
            assert first["retry"] == "2000"
            for expected in backlog:
                msg = await reader.event()
                assert int(msg["id"]) == expected.seq
                assert json.loads(msg["data"]) == expected.to_dict()
            status, _, _ = await api.call(
                "PUT", "/v1/components/Prefill/replicas", body={"replicas": 1}
            )
            assert status == 202
            kinds = []
            while "scale" not in kinds:
                msg = await reader.event()
                assert "event" not in msg  # connector events are plain messages
                data = json.loads(msg["data"])
                assert int(msg["id"]) == data["seq"] > backlog[-1].seq
                kinds.append(data["kind"])
            assert "spawn" in kinds or "ready" in kinds


async def test_without_since_the_stream_starts_now(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        await wait_until(lambda: api.connector.view().component("Decode").ready == 1)  # type: ignore[union-attr]
        last = api.connector.events.last_seq
        async with api.http.get(api.url + "/v1/events", headers=STREAM) as resp:
            reader = Reader(resp)
            await reader.message()  # retry hint
            probe = api.connector.events.emit("probe", component="Decode")
            seen = []
            while not seen or seen[-1] != probe.seq:
                seen.append(int((await reader.event())["id"]))
            assert seen[0] > last  # nothing from before the stream opened
            assert seen == sorted(seen)


async def test_resume_with_last_event_id_and_after_a_server_restart(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        await wait_until(lambda: api.connector.view().component("Decode").ready == 1)  # type: ignore[union-attr]
        seqs = [e.seq for e in api.connector.recent_events(0)]
        headers = {**STREAM, "Last-Event-ID": str(seqs[-3])}
        async with api.http.get(api.url + "/v1/events", headers=headers) as resp:
            reader = Reader(resp)
            got = [int((await reader.event())["id"]) for _ in range(2)]
            assert got == seqs[-2:]
        # An id from a previous server run (beyond anything this run has) replays it all.
        headers = {**STREAM, "Last-Event-ID": str(seqs[-1] + 1000)}
        async with api.http.get(api.url + "/v1/events", headers=headers) as resp:
            reader = Reader(resp)
            assert int((await reader.event())["id"]) == seqs[0]


async def test_heartbeats_keep_an_idle_stream_alive(tmp_path: Path) -> None:
    async with (
        serve(tmp_path, settings=ApiSettings(heartbeat_s=0.1)) as api,
        api.http.get(api.url + "/v1/events", headers=STREAM) as resp,
    ):
        reader = Reader(resp)
        await reader.message()  # retry hint
        beats = 0
        while beats < 3:
            msg = await reader.message(limit_s=2.0)
            if msg.get(":") == "heartbeat":
                beats += 1
        assert beats == 3


async def test_server_stop_says_goodbye_and_unsubscribes(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        subscribers = len(api.connector.events._subscribers)
        async with api.http.get(api.url + "/v1/events", headers=STREAM) as resp:
            reader = Reader(resp)
            await reader.message()
            await wait_until(lambda: len(api.connector.events._subscribers) == subscribers + 1)
            stopping = asyncio.create_task(api.server.stop())
            msg = await reader.event()
            assert msg == {"event": "shutdown", "data": '{"reason":"server stopping"}'}
            assert await reader.message() == {"eof": "1"}
            await asyncio.wait_for(stopping, 10)
        assert len(api.connector.events._subscribers) == subscribers


async def test_a_client_that_goes_away_is_unsubscribed(tmp_path: Path) -> None:
    async with serve(tmp_path, settings=ApiSettings(heartbeat_s=0.05)) as api:
        subscribers = len(api.connector.events._subscribers)
        resp = await api.http.get(api.url + "/v1/events", headers=STREAM)
        await Reader(resp).message()
        assert len(api.connector.events._subscribers) == subscribers + 1
        resp.close()
        # The next heartbeat write fails and the stream's handler lets go.
        await wait_until(lambda: len(api.connector.events._subscribers) == subscribers)


async def test_a_slow_client_gets_overflow_and_is_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "QUEUE_LIMIT", 3)
    async with (
        serve(tmp_path) as api,
        api.http.get(api.url + "/v1/events", headers=STREAM) as resp,
    ):
        reader = Reader(resp)
        await reader.message()
        for _ in range(10):  # no await between: the stream cannot drain
            api.connector.events.emit("probe")
        messages = []
        while True:
            msg = await reader.message()
            if "eof" in msg:
                break
            messages.append(msg)
        assert messages[-1]["event"] == "overflow"
        overflow = json.loads(messages[-1]["data"])
        assert overflow["reason"] == "client too slow"
        assert overflow["last_seq"] == max(int(m["id"]) for m in messages if "id" in m)


async def test_client_stream_events_ends_on_shutdown(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        await wait_until(lambda: api.connector.view().component("Decode").ready == 1)  # type: ignore[union-attr]
        received: list[dict[str, object]] = []

        async def consume() -> None:
            async with Client(api.url) as client:
                async for event in client.stream_events(since=0):
                    received.append(event)

        task = asyncio.create_task(consume())
        await wait_until(lambda: len(received) >= len(api.connector.recent_events(0)))
        api.connector.events.emit("probe", component="Decode")
        await wait_until(lambda: received[-1]["kind"] == "probe")
        await api.server.stop()
        await asyncio.wait_for(task, 10)  # ended by "event: shutdown", no exception
        assert [e["seq"] for e in received] == sorted(e["seq"] for e in received)
