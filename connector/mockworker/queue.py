"""The old prefill queue on NATS JetStream: a producer (frontend mock) or a consumer
(prefill-worker mock).

Stream ``{namespace}_prefill_queue`` by default, subject ``<stream>.queue``, durable pull consumer
``worker-group`` (the names :mod:`connector.dynamo.prefill_queue` measures). Both sides create the
stream and the durable consumer when missing, so the queue depth (the consumer's ``num_pending``) is
observable from the first message on, whichever side starts first."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from connector.dynamo.prefill_queue import DEFAULT_CONSUMER
from connector.mockworker.config import MockConfig

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 2.0
FETCH_TIMEOUT_S = 1.0


class QueueError(RuntimeError):
    """The prefill queue cannot be used; the message names the server and the reason."""


def subject_of(stream: str) -> str:
    return f"{stream}.queue"


async def _connect(url: str) -> Any:
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        # One line per failure instead of nats-py's default traceback.
        last_error[:] = [exc]
        log.warning("NATS at %s: %s", url, exc or type(exc).__name__)

    try:
        # Bounded: with reconnects allowed, nats-py would retry a dead server forever.
        return await asyncio.wait_for(
            nats.connect(
                url,
                connect_timeout=CONNECT_TIMEOUT_S,
                allow_reconnect=True,
                max_reconnect_attempts=-1,  # once up, ride out NATS restarts
                reconnect_time_wait=0.5,
                error_cb=on_error,
            ),
            CONNECT_TIMEOUT_S + 1,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        cause = last_error[0] if last_error else exc
        reason = str(cause) or type(cause).__name__
        raise QueueError(f"cannot connect to NATS at {url}: {reason}") from exc


async def _ensure_queue(js: Any, stream: str) -> None:
    subject = subject_of(stream)
    try:
        await js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        await js.add_stream(name=stream, subjects=[subject])
    try:
        await js.consumer_info(stream, DEFAULT_CONSUMER)
    except nats.js.errors.NotFoundError:
        # Creating an identical durable consumer twice is a no-op, so racing sides agree.
        await js.add_consumer(
            stream,
            ConsumerConfig(
                durable_name=DEFAULT_CONSUMER,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
                filter_subject=subject,
            ),
        )


async def run_queue(cfg: MockConfig, instance_id: int) -> None:
    """Produce or consume until cancelled (a producer with ``--messages`` returns after
    that many). Raises :class:`QueueError` when NATS cannot be used at the start."""
    if cfg.queue == "none":
        return
    nc = await _connect(cfg.nats_url)
    try:
        js = nc.jetstream()
        try:
            await _ensure_queue(js, cfg.stream)
        except nats.errors.Error as exc:
            raise QueueError(
                f"cannot create stream {cfg.stream!r} / consumer {DEFAULT_CONSUMER!r} "
                f"on NATS at {cfg.nats_url}: {exc}"
            ) from exc
        if cfg.queue == "producer":
            await _produce(js, cfg, instance_id)
        else:
            await _consume(js, cfg)
    finally:
        await nc.close()


async def _produce(js: Any, cfg: MockConfig, instance_id: int) -> None:
    subject = subject_of(cfg.stream)
    log.info("producing to %s at %s msg/s", subject, cfg.rate)
    seq = 0
    while not cfg.messages or seq < cfg.messages:
        seq += 1
        body = {"request_id": f"{instance_id:x}-{seq}", "seq": seq}
        await js.publish(subject, json.dumps(body).encode())
        await asyncio.sleep(1.0 / cfg.rate)
    log.info("published %d messages to %s; producer done", seq, subject)


async def _consume(js: Any, cfg: MockConfig) -> None:
    sub = await js.pull_subscribe_bind(DEFAULT_CONSUMER, stream=cfg.stream)
    log.info("consuming %s as %r at %s msg/s", cfg.stream, DEFAULT_CONSUMER, cfg.rate)
    consumed = 0
    while True:
        try:
            msgs = await sub.fetch(1, timeout=FETCH_TIMEOUT_S)
        except nats.errors.TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
            consumed += 1
            if consumed % 100 == 0:
                log.info("consumed %d messages", consumed)
        await asyncio.sleep(1.0 / cfg.rate)
