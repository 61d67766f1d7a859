"""The serialized Circus channel against a real circusd, and its failure modes."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import pytest
import zmq
import zmq.asyncio

from connector.errors import SupervisorUnavailable
from connector.supervision.circus import (
    CircusChannel,
    CircusCommandError,
    CircusEvents,
    free_loopback_port,
    start_circusd,
    stop_circusd,
)

pytestmark = pytest.mark.integration


async def test_owned_circusd_starts_answers_and_stops(tmp_path: Path) -> None:
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    try:
        assert info.endpoint.startswith("tcp://127.0.0.1:")
        assert info.process_alive()
        reply = await channel.call("list")
        assert reply["status"] == "ok"
        assert reply["watchers"] == []
    finally:
        await stop_circusd(info, channel)
        channel.close()
    assert not info.process_alive()


async def test_fifty_overlapping_calls_are_serialized_and_all_answered(tmp_path: Path) -> None:
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    try:
        await channel.call("add", name="x.a.1", cmd="sleep", args=["300"], start=True, waiting=True)
        replies = await asyncio.gather(*(channel.call("list", name="x.a.1") for _ in range(50)))
        assert {len(r["pids"]) for r in replies} == {1}
        assert channel.calls == 51
    finally:
        await stop_circusd(info, channel)
        channel.close()


async def test_unknown_watcher_is_a_command_error_not_a_retry(tmp_path: Path) -> None:
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    try:
        with pytest.raises(CircusCommandError, match="circus start"):
            await channel.call("start", name="nope")
    finally:
        await stop_circusd(info, channel)
        channel.close()


async def test_gone_circusd_raises_supervisor_unavailable_within_the_deadline() -> None:
    channel = CircusChannel(f"tcp://127.0.0.1:{free_loopback_port()}", timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(SupervisorUnavailable, match=r"did not answer 'list' within 0.3 s"):
        await channel.call("list")
    assert time.monotonic() - t0 < 1.0
    channel.close()


async def test_busy_answers_are_retried_with_jitter_until_ok() -> None:
    """A ROUTER that answers errno 5 "already running" twice, then ok (circusd's busy reply)."""
    port = free_loopback_port()
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")
    seen: list[str] = []

    async def serve() -> None:
        for n in range(3):
            ident, raw = await router.recv_multipart()
            msg = json.loads(raw)
            seen.append(msg["command"])
            if n < 2:
                reply = {
                    "id": msg["id"],
                    "status": "error",
                    "errno": 5,
                    "reason": "arbiter is already running arbiter_add_watcher command",
                }
            else:
                reply = {"id": msg["id"], "status": "ok", "watchers": []}
            await router.send_multipart([ident, json.dumps(reply).encode()])

    server = asyncio.create_task(serve())
    channel = CircusChannel(f"tcp://127.0.0.1:{port}", timeout_s=1.0)
    try:
        reply = await channel.call("list")
        assert reply["status"] == "ok"
        assert seen == ["list", "list", "list"]
    finally:
        await server
        channel.close()
        router.close(linger=0)


async def test_busy_forever_gives_up_with_a_clear_error() -> None:
    port = free_loopback_port()
    ctx = zmq.asyncio.Context.instance()
    router = ctx.socket(zmq.ROUTER)
    router.bind(f"tcp://127.0.0.1:{port}")

    async def serve() -> None:
        while True:
            ident, raw = await router.recv_multipart()
            msg = json.loads(raw)
            reply = {
                "id": msg["id"],
                "status": "error",
                "errno": 5,
                "reason": "arbiter is already running manage_watchers command",
            }
            await router.send_multipart([ident, json.dumps(reply).encode()])

    server = asyncio.create_task(serve())
    channel = CircusChannel(f"tcp://127.0.0.1:{port}", timeout_s=0.5, busy_retry_s=0.3)
    try:
        with pytest.raises(SupervisorUnavailable, match="circusd stayed busy"):
            await channel.call("list")
    finally:
        server.cancel()
        channel.close()
        router.close(linger=0)


async def test_events_deliver_only_what_was_asked_for_with_the_exit_code(tmp_path: Path) -> None:
    """circusd publishes spawn, start, stop, reap... for every watcher; a subscription for
    ``reap`` hands on only that one, parsed, for watchers under its prefix only."""
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    got: list[tuple[str, str, dict[str, object]]] = []
    events = CircusEvents(
        info.pubsub_endpoint, "t.", lambda w, e, d: got.append((w, e, d)), frozenset({"reap"})
    )
    events.start()
    try:
        await asyncio.sleep(0.3)  # the subscription is in place before anything happens
        for name in ("t.decode.1", "other.decode.1"):
            await channel.call(
                "add",
                name=name,
                cmd="sh",
                args=["-c", "exit 3"],
                options={"respawn": False},
                start=True,
            )
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.5)  # anything else that would come, would by now
        assert [(w, e) for w, e, _ in got] == [("t.decode.1", "reap")]
        assert got[0][2]["exit_code"] == 3
    finally:
        await events.stop()
        await stop_circusd(info, channel)
        channel.close()
