"""``GET /v1/events`` as a Server-Sent Events stream.

Each connector event is one message: ``id`` is its ``seq`` (a reconnecting client sends it
back as ``Last-Event-ID`` and misses nothing the ring still holds), ``data`` its JSON. A
comment line every ``heartbeat_s`` keeps proxies and idle clients from closing the stream.
When the server stops, every stream gets ``event: shutdown`` and ends cleanly. A client too
slow to keep up gets ``event: overflow`` and is closed; it reconnects from its last id.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from aiohttp import web

from connector.api.context import ApiContext
from connector.events import Event

log = logging.getLogger(__name__)

QUEUE_LIMIT = 1000
RETRY_MS = 2000


def wants_event_stream(request: web.Request) -> bool:
    return "text/event-stream" in request.headers.get("Accept", "")


def start_seq(request: web.Request, since: int | None, last_seq: int) -> int:
    """Where the stream starts: ``since``, else ``Last-Event-ID``, else now.

    A number beyond the newest event means the client saw a previous server run (``seq``
    restarts with each run): it gets everything this run still holds.
    """
    header = request.headers.get("Last-Event-ID", "").strip()
    if since is None and header.isdigit():
        since = int(header)
    if since is None:
        return last_seq
    return 0 if since > last_seq else since


def format_event(event: Event) -> bytes:
    data = json.dumps(event.to_dict(), default=str, separators=(",", ":"))
    return f"id: {event.seq}\ndata: {data}\n\n".encode()


def format_control(name: str, data: dict[str, object]) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def stream_events(
    request: web.Request, ctx: ApiContext, since: int | None
) -> web.StreamResponse:
    connector = ctx.connector
    queue: asyncio.Queue[Event] = asyncio.Queue(maxsize=QUEUE_LIMIT)
    overflowed = asyncio.Event()

    def deliver(event: Event) -> None:
        try:
            queue.put_nowait(event)
        except asyncio.QueueFull:
            overflowed.set()

    # Subscribe before reading the backlog; both happen on the loop, and ``seq`` drops
    # anything seen twice.
    unsubscribe = connector.subscribe_events(deliver)
    try:
        backlog = connector.recent_events(start_seq(request, since, connector.events.last_seq))
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream; charset=utf-8",
                "Cache-Control": "no-store",
                "X-Accel-Buffering": "no",
            }
        )
        await response.prepare(request)
        await response.write(f"retry: {RETRY_MS}\n: dynamo-local events\n\n".encode())
        sent = 0
        for event in backlog:
            await response.write(format_event(event))
            sent = event.seq
        await _pump(response, queue, overflowed, ctx, sent)
        return response
    finally:
        unsubscribe()


async def _pump(
    response: web.StreamResponse,
    queue: asyncio.Queue[Event],
    overflowed: asyncio.Event,
    ctx: ApiContext,
    sent: int,
) -> None:
    heartbeat_s = ctx.settings.heartbeat_s
    closing = asyncio.ensure_future(ctx.closing.wait())
    try:
        while True:
            if overflowed.is_set():
                await response.write(
                    format_control("overflow", {"reason": "client too slow", "last_seq": sent})
                )
                return
            getter = asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait(
                {getter, closing}, timeout=heartbeat_s, return_when=asyncio.FIRST_COMPLETED
            )
            if getter not in done:
                getter.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await getter
            if closing in done:
                await response.write(format_control("shutdown", {"reason": "server stopping"}))
                return
            if getter in done:
                event = getter.result()
                if event.seq > sent:
                    await response.write(format_event(event))
                    sent = event.seq
            else:
                await response.write(b": heartbeat\n\n")
    except (ConnectionResetError, ConnectionError):
        log.debug("event stream client went away")
    finally:
        closing.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await closing
