"""Draining a Dynamo worker before it is stopped: out of discovery, then wait for its
in-flight requests, then (the caller) SIGTERM.

Routers stop sending to an instance the moment its key is deleted, but the requests they
already sent are still streaming. Stopping the process then fails them (upstream users see
HTTP 500s on scale-down). So after the keys go, the drain reads the worker's own
``/metrics`` (its ``DYN_SYSTEM_PORT``) until ``dynamo_component_inflight_requests`` is 0,
bounded by the drain timeout. A short settle period first covers a request a router picked
just before it saw the delete.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger(__name__)

INFLIGHT_METRIC = "dynamo_component_inflight_requests"
# A drain without an explicit ``local.drainSeconds`` waits at most this long for in-flight
# requests of a registered worker (a long generation may take a while).
DEFAULT_DRAIN_TIMEOUT_S = 30.0
# Routers act on a key delete within milliseconds; a request routed just before it still
# arrives. The drain never ends sooner than this after the keys went.
SETTLE_S = 0.5
POLL_S = 0.1


@dataclass(frozen=True)
class DrainResult:
    waited_s: float
    inflight: float | None  # last value read; None: metrics could not be read
    timed_out: bool


def inflight_requests(text: str) -> float | None:
    """The sum of ``dynamo_component_inflight_requests`` over its series, or None when the
    exposition has no such family."""
    total = None
    for family in text_string_to_metric_families(text):
        if family.name != INFLIGHT_METRIC:
            continue
        total = (total or 0.0) + sum(s.value for s in family.samples)
    return total


async def _read_inflight(session: aiohttp.ClientSession, url: str) -> float | None:
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=1.0)) as resp:
            if resp.status != 200:
                return None
            text = await resp.text()
    except (aiohttp.ClientError, TimeoutError, OSError):
        return None
    try:
        return inflight_requests(text)
    except ValueError:  # not a Prometheus exposition
        return None


async def wait_idle(
    metrics_port: int | None, limit_s: float, *, full_without_metrics: bool = False
) -> DrainResult:
    """Wait until the worker on ``metrics_port`` has no request in flight (at least
    :data:`SETTLE_S`, at most ``limit_s``). Without readable metrics there is nothing to
    wait on: the drain ends after the settle period, or after all of ``limit_s`` when
    ``full_without_metrics`` (a ``drainSeconds`` the graph set is then honoured whole)."""
    started = time.monotonic()
    deadline = started + max(limit_s, SETTLE_S)
    await asyncio.sleep(SETTLE_S)
    last: float | None = None
    if metrics_port is not None:
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        async with aiohttp.ClientSession() as session:
            last = await _read_inflight(session, url)
            while last is not None and last > 0 and time.monotonic() < deadline:
                await asyncio.sleep(POLL_S)
                last = await _read_inflight(session, url)
    if last is None and full_without_metrics:
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))
    timed_out = last is not None and last > 0
    if timed_out:
        log.warning(
            "drain: %s request(s) still in flight on port %s after %.1f s",
            last,
            metrics_port,
            limit_s,
        )
    return DrainResult(time.monotonic() - started, last, timed_out)
