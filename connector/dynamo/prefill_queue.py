"""The prefill queue, measured: NATS JetStream, or a gauge scraped from ``/metrics``.

Dynamo's disaggregated prefill used a JetStream stream (``{namespace}_prefill_queue`` by
default, subject ``<stream>.queue``) drained by a durable pull consumer (``worker-group``);
the queue depth is the consumer's ``num_pending``. :class:`PrefillQueueMonitor` reads the
stream and consumer info and reports what they say, and nothing it cannot observe:

* ``pending`` (not yet delivered), ``ack_pending`` (delivered, not acknowledged),
  ``redelivered``: from the consumer; ``consumers``, ``stream_messages``, ``stream_bytes``:
  from the stream.
* ``enqueue_rate`` / ``dequeue_rate`` (messages per second): the growth of the stream's last
  sequence and of the consumer's delivered stream sequence since the previous read, over the
  time between the two reads. The first read, and the first after the stream was re-created,
  has no rates.
* ``oldest_pending_age_s``: age of the oldest message the consumer has not acknowledged
  (the first stream message after its ack floor), from the server's timestamp.

When NATS does not answer (a short connect timeout), ``read`` returns ``status:
"unavailable"`` with the reason, quickly, and never raises. With ``metrics_url`` and
``metric_name`` (e.g. ``dynamo_frontend_queued_requests``) the depth comes from a gauge
scraped from a component's Prometheus endpoint instead (or as fallback when NATS is down).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NATS
from prometheus_client.parser import text_string_to_metric_families

DEFAULT_CONSUMER = "worker-group"


def default_stream(namespace: str) -> str:
    return f"{namespace}_prefill_queue"


@dataclass(frozen=True)
class _Sample:
    at: float
    last_seq: int
    delivered_seq: int | None


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else float(value)


class PrefillQueueMonitor:
    """Reads the prefill queue's depth and rates. One connection, reused; re-opened on the
    next read after NATS went away."""

    def __init__(
        self,
        nats_url: str | None,
        stream: str,
        consumer: str = DEFAULT_CONSUMER,
        *,
        metrics_url: str | None = None,
        metric_name: str | None = None,
        metric_labels: Mapping[str, str] | None = None,
        connect_timeout_s: float = 1.0,
        request_timeout_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.nats_url = nats_url
        self.stream = stream
        self.consumer = consumer
        self.metrics_url = metrics_url
        self.metric_name = metric_name
        self.metric_labels = dict(metric_labels or {})
        self.connect_timeout_s = connect_timeout_s
        self.request_timeout_s = request_timeout_s
        self._clock = clock
        self._wall_clock = wall_clock
        self._nc: NATS | None = None
        self._connect_error: Exception | None = None
        self._previous: _Sample | None = None
        self._lock = asyncio.Lock()

    async def read(self) -> dict[str, Any]:
        """One reading; see the module docstring for the fields. Never raises."""
        async with self._lock:
            if self.nats_url:
                result = await self._read_jetstream()
                if result["status"] == "ok" or not self._metrics_configured:
                    return result
                fallback = await self._read_metrics()
                if fallback["status"] == "ok":
                    fallback["fallback_reason"] = result["reason"]
                    return fallback
                return result
            if self._metrics_configured:
                return await self._read_metrics()
            return {
                "status": "unavailable",
                "reason": "no prefill queue source configured (NATS URL or metrics URL)",
                "source": "jetstream",
                "stream": self.stream,
                "consumer": self.consumer,
            }

    async def close(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None and not nc.is_closed:
            with contextlib.suppress(Exception):
                await nc.close()

    @property
    def _metrics_configured(self) -> bool:
        return bool(self.metrics_url and self.metric_name)

    # ----------------------------------------------------------------- JetStream

    def _base(self) -> dict[str, Any]:
        return {"source": "jetstream", "stream": self.stream, "consumer": self.consumer}

    def _unavailable(self, reason: str) -> dict[str, Any]:
        return {"status": "unavailable", "reason": reason, **self._base()}

    async def _connection(self) -> NATS:
        if self._nc is not None and self._nc.is_connected:
            return self._nc
        await self.close()
        self._connect_error = None

        async def remember(exc: Exception) -> None:
            # nats-py would log every failed attempt; ``read`` reports the reason instead.
            self._connect_error = exc

        # No reconnect loop inside nats-py: a read must answer now; the next one reconnects.
        # (nats-py gives up on a server after max_reconnect_attempts + 1 tries.)
        nc = await nats.connect(
            self.nats_url or "",
            connect_timeout=self.connect_timeout_s,
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0,
            error_cb=remember,
        )
        self._nc = nc
        return nc

    async def _read_jetstream(self) -> dict[str, Any]:
        # A kept connection may have died since the last read without nats-py noticing yet:
        # then the first request fails, and one fresh connection gets its chance.
        reused = self._nc is not None and self._nc.is_connected
        for attempt in (1, 2):
            try:
                nc = await asyncio.wait_for(self._connection(), self.connect_timeout_s + 0.5)
            except (TimeoutError, OSError, nats.errors.Error) as exc:
                await self.close()
                cause = self._connect_error if isinstance(exc, nats.errors.NoServersError) else exc
                return self._unavailable(
                    f"NATS at {self.nats_url} is not reachable: {_describe(cause or exc)}"
                )
            jsm = nc.jsm(timeout=self.request_timeout_s)
            try:
                info = await jsm.stream_info(self.stream)
            except nats.js.errors.NotFoundError:
                return self._unavailable(f"JetStream stream {self.stream!r} does not exist")
            except (TimeoutError, nats.errors.Error, OSError) as exc:
                await self.close()
                if attempt == 1 and reused:
                    continue
                return self._unavailable(
                    f"JetStream at {self.nats_url} did not answer: {_describe(exc)}"
                )
            return await self._read_consumer(jsm, info)
        raise AssertionError("unreachable")  # the second attempt always returns

    async def _read_consumer(self, jsm: Any, info: Any) -> dict[str, Any]:
        state = info.state
        out: dict[str, Any] = {
            "status": "ok",
            **self._base(),
            "consumers": state.consumer_count,
            "stream_messages": state.messages,
            "stream_bytes": state.bytes,
        }
        now = self._clock()
        delivered_seq: int | None = None
        try:
            cinfo = await jsm.consumer_info(self.stream, self.consumer)
        except nats.js.errors.NotFoundError:
            out["reason"] = f"consumer {self.consumer!r} does not exist on stream {self.stream!r}"
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            out["reason"] = f"consumer {self.consumer!r} info failed: {_describe(exc)}"
        else:
            if cinfo.num_pending is not None:
                out["pending"] = cinfo.num_pending
            if cinfo.num_ack_pending is not None:
                out["ack_pending"] = cinfo.num_ack_pending
            if cinfo.num_redelivered is not None:
                out["redelivered"] = cinfo.num_redelivered
            if cinfo.delivered is not None:
                delivered_seq = cinfo.delivered.stream_seq
            age = await self._oldest_unacked_age(jsm, cinfo, out)
            if age is not None:
                out["oldest_pending_age_s"] = age
        self._add_rates(out, _Sample(now, state.last_seq, delivered_seq))
        return out

    def _add_rates(self, out: dict[str, Any], sample: _Sample) -> None:
        prev, self._previous = self._previous, sample
        if prev is None or sample.last_seq < prev.last_seq:
            return  # first read, or the stream was re-created: no honest rate
        elapsed = sample.at - prev.at
        if elapsed <= 0:
            return
        out["enqueue_rate"] = (sample.last_seq - prev.last_seq) / elapsed
        if (
            sample.delivered_seq is not None
            and prev.delivered_seq is not None
            and sample.delivered_seq >= prev.delivered_seq
        ):
            out["dequeue_rate"] = (sample.delivered_seq - prev.delivered_seq) / elapsed

    async def _oldest_unacked_age(
        self, jsm: Any, cinfo: Any, out: Mapping[str, Any]
    ) -> float | None:
        if not (out.get("pending", 0) or out.get("ack_pending", 0)) or cinfo.ack_floor is None:
            return None
        subject = getattr(cinfo.config, "filter_subject", None) or ">"
        try:
            msg = await jsm.get_msg(
                self.stream, seq=cinfo.ack_floor.stream_seq + 1, subject=subject, next=True
            )
        except (TimeoutError, nats.errors.Error, OSError):
            return None
        if msg.time is None:
            return None
        sent: float = msg.time.timestamp()
        return max(0.0, self._wall_clock() - sent)

    # ------------------------------------------------------------------- metrics

    async def _read_metrics(self) -> dict[str, Any]:
        base: dict[str, Any] = {
            "source": "metrics",
            "url": self.metrics_url,
            "metric": self.metric_name,
        }
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        try:
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(self.metrics_url or "") as resp,
            ):
                if resp.status != 200:
                    return {
                        "status": "unavailable",
                        "reason": f"{self.metrics_url} answered HTTP {resp.status}",
                        **base,
                    }
                text = await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return {
                "status": "unavailable",
                "reason": f"{self.metrics_url} is not reachable: {_describe(exc)}",
                **base,
            }
        try:
            value = self._gauge_value(text)
        except ValueError as exc:
            return {
                "status": "unavailable",
                "reason": f"{self.metrics_url}: not Prometheus text: {exc}",
                **base,
            }
        if value is None:
            return {
                "status": "unavailable",
                "reason": f"{self.metrics_url} has no {self.metric_name} series"
                + (f" with labels {self.metric_labels}" if self.metric_labels else ""),
                **base,
            }
        return {"status": "ok", **base, "pending": _number(value)}

    def _gauge_value(self, text: str) -> float | None:
        """Sum of the named metric's samples whose labels include ``metric_labels``."""
        total: float | None = None
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name != self.metric_name:
                    continue
                if any(sample.labels.get(k) != v for k, v in self.metric_labels.items()):
                    continue
                total = (total or 0.0) + sample.value
        return total


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    return str(exc) or type(exc).__name__
