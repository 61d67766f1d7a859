"""The sampling loop: every ``interval`` seconds, one :class:`~.timeline.Sample` of the graph
(replicas desired/ready/running, CPU and RSS per component: the connector's API), of what
happened (``GET /v1/events`` since the last sample) and of the frontend (its metrics,
through Prometheus or scraped directly).

Every source is read side by side with a deadline; one that fails leaves its cells empty
for that row (and is counted), it never stops the loop. The loop is bounded: it ends when
told to, or after ``max_samples``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from connector.client import ApiError, Unreachable
from connector.experiment import metrics
from connector.experiment.timeline import ComponentSample, Sample, describe_event, timeline_events

log = logging.getLogger("connector.experiment")

LOOPBACK = "127.0.0.1"  # where dynamo-local's replicas listen (DYN_HTTP_HOST)
SOURCE_TIMEOUT_S = 3.0


@dataclass(frozen=True)
class Load:
    """What the load generator is asked for at a moment (from the phase running)."""

    phase: str = ""
    concurrency: float | None = None
    request_rate: float | None = None


class GraphApi(Protocol):
    """What an experiment reads of the connector: the calls of :class:`connector.client.Client`
    it uses, answered with the API's JSON. The CLI passes a Client; the connector itself
    (experiments started through its API, the status page's live timeline) passes an
    in-process reader with the same answers (``connector.api.inprocess``)."""

    async def components(self) -> dict[str, Any]: ...

    async def component(self, name: str) -> dict[str, Any]: ...

    async def metrics(self, name: str) -> dict[str, Any]: ...

    async def events(self, since: int = 0, limit: int | None = None) -> dict[str, Any]: ...


class FrontendSource(Protocol):
    async def figures(self, now: float) -> metrics.Figures: ...

    async def close(self) -> None: ...


class ScrapeSource:
    """Scrapes every ready frontend replica's ``/metrics`` (ports from the API) and keeps the
    totals of the last ``window_s`` seconds to take differences over."""

    def __init__(self, api: GraphApi, frontends: Sequence[str], window_s: float) -> None:
        self.api = api
        self.frontends = list(frontends)
        self.window_s = window_s
        self._history: deque[tuple[float, metrics.Totals]] = deque()
        self._http: aiohttp.ClientSession | None = None

    async def urls(self) -> list[str]:
        details = await asyncio.gather(*(self.api.component(n) for n in self.frontends))
        return [
            f"http://{LOOPBACK}:{r['ports']['http']}/metrics"
            for d in details
            for r in d.get("replicas", [])
            if r.get("ready") and (r.get("ports") or {}).get("http")
        ]

    async def _scrape(self, url: str) -> metrics.Totals:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=SOURCE_TIMEOUT_S)
        async with self._http.get(url, timeout=timeout) as resp:
            resp.raise_for_status()
            text = await resp.text()
        return await asyncio.to_thread(metrics.parse_totals, text)

    async def figures(self, now: float) -> metrics.Figures:
        urls = await self.urls()
        answers = await asyncio.gather(*(self._scrape(u) for u in urls), return_exceptions=True)
        totals = [a for a in answers if isinstance(a, metrics.Totals)]
        if not totals:
            raise RuntimeError(f"no frontend replica answered on /metrics ({len(urls)} ready)")
        current = metrics.add(totals)
        self._history.append((now, current))
        while len(self._history) > 1 and self._history[1][0] <= now - self.window_s:
            self._history.popleft()
        then, older = self._history[0]
        if then >= now:
            return metrics.window(None, current, 0.0)
        return metrics.window(older, current, now - then)

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


class PrometheusSource:
    """Asks a Prometheus that scrapes the frontend (``GET /api/v1/query``)."""

    def __init__(self, url: str, selector: str, window_s: float) -> None:
        self.url = url.rstrip("/")
        self.queries = metrics.promql(selector, window_s)
        self._http: aiohttp.ClientSession | None = None

    async def _query(self, expr: str) -> float | None:
        if self._http is None:
            self._http = aiohttp.ClientSession()
        timeout = aiohttp.ClientTimeout(total=SOURCE_TIMEOUT_S)
        async with self._http.get(
            f"{self.url}/api/v1/query", params={"query": expr}, timeout=timeout
        ) as resp:
            body = await resp.json()
        if body.get("status") != "success":
            raise RuntimeError(f"Prometheus: {body.get('error', body)} (query {expr})")
        result = body["data"]["result"]
        if not result:
            return None
        return float(result[0]["value"][1])

    async def figures(self, now: float) -> metrics.Figures:
        names = list(self.queries)
        values = await asyncio.gather(*(self._query(self.queries[n]) for n in names))
        return metrics.figures_from_values(dict(zip(names, values, strict=True)))

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None


@dataclass
class SamplerStats:
    samples: int = 0
    failures: dict[str, int] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def failed(self, source: str, exc: BaseException) -> None:
        self.failures[source] = self.failures.get(source, 0) + 1
        self.last_error[source] = f"{type(exc).__name__}: {exc}"


class Sampler:
    def __init__(
        self,
        api: GraphApi,
        components: Sequence[str],
        frontend: FrontendSource,
        *,
        started_at: float,
        interval_s: float,
        load: Callable[[float], Load],
        events_since: int,
        on_sample: Callable[[Sample], None] | None = None,
        retain: bool = True,
    ) -> None:
        self.api = api
        self.components = list(components)
        self.frontend = frontend
        self.started_at = started_at
        self.interval_s = interval_s
        self.load = load
        self.on_sample = on_sample
        # An experiment keeps every sample and event for its run folder; a caller that keeps
        # its own bounded history (the connector's live timeline) passes retain=False and
        # reads each sample's events from last_events.
        self.retain = retain
        self.samples: list[Sample] = []
        self.events: list[dict[str, Any]] = []  # every event seen, as the API gave it
        self.last_events: list[dict[str, Any]] = []  # those of the latest sample
        self.stats = SamplerStats()
        self._events_seq = events_since
        # component -> (exporter snapshot time, CPU seconds per (replica, pid), cores)
        self._cpu_seen: dict[str, tuple[float, dict[tuple[str, int], float], float | None]] = {}

    async def _guard(self, source: str, call: Any) -> Any:
        try:
            return await asyncio.wait_for(call, SOURCE_TIMEOUT_S + 1)
        except asyncio.CancelledError:
            raise
        except (ApiError, Unreachable, aiohttp.ClientError, TimeoutError, Exception) as exc:
            self.stats.failed(source, exc)
            return None

    async def _component_usage(self) -> dict[str, dict[str, Any] | None]:
        answers = await asyncio.gather(
            *(self._guard(f"metrics:{n}", self.api.metrics(n)) for n in self.components)
        )
        return dict(zip(self.components, answers, strict=True))

    async def _new_events(self) -> list[dict[str, Any]]:
        data = await self.api.events(since=self._events_seq)
        batch: list[dict[str, Any]] = list(data.get("events", []))
        if batch:
            self._events_seq = max(int(e.get("seq", 0)) for e in batch)
        return batch

    def _cpu_cores(self, name: str, usage: Mapping[str, Any] | None, now: float) -> float | None:
        """Cores the component's replicas used between the exporter's last two snapshots
        (their CPU seconds' difference over the snapshots' time apart)."""
        if not usage:
            return None
        snapshot = usage.get("snapshot_time")
        at = float(snapshot) if isinstance(snapshot, int | float) else now
        current = {
            (str(r.get("replica")), int(r["pid"])): float(r["cpu_seconds_total"])
            for r in usage.get("replicas", [])
            if isinstance(r.get("cpu_seconds_total"), int | float) and r.get("pid") is not None
        }
        previous = self._cpu_seen.get(name)
        if previous is not None and previous[0] == at:
            return previous[2]
        cores: float | None = None
        if previous is not None and at > previous[0]:
            used = sum(max(0.0, v - previous[1][k]) for k, v in current.items() if k in previous[1])
            cores = used / (at - previous[0])
        self._cpu_seen[name] = (at, current, cores)
        return cores

    async def sample_once(self) -> Sample:
        now = time.time()
        listing, usage, events, figures = await asyncio.gather(
            self._guard("components", self.api.components()),
            self._component_usage(),
            self._guard("events", self._new_events()),
            self._guard("frontend", self.frontend.figures(now)),
        )
        self.last_events = list(events or [])
        if self.retain:
            self.events.extend(self.last_events)
        by_name = {c["name"]: c for c in (listing or {}).get("components", [])}
        components = {
            name: _component_sample(
                by_name.get(name), usage.get(name), self._cpu_cores(name, usage.get(name), now)
            )
            for name in self.components
        }
        fig: metrics.Figures = figures or metrics.Figures()
        load = self.load(now)
        sample = Sample(
            t=now - self.started_at,
            time=now,
            phase=load.phase,
            target_concurrency=load.concurrency,
            target_request_rate=load.request_rate,
            **dataclasses.asdict(fig),
            components=components,
            events=tuple(describe_event(e) for e in timeline_events(events or [])),
        )
        if self.retain:
            self.samples.append(sample)
        self.stats.samples += 1
        if self.on_sample is not None:
            with contextlib.suppress(Exception):
                self.on_sample(sample)
        return sample

    async def run(self, stop: asyncio.Event, max_samples: int) -> None:
        """Sample every interval (on a fixed schedule: a slow sample skips ticks instead of
        drifting) until ``stop`` is set or ``max_samples`` were taken; one last sample after
        ``stop``, so the timeline ends when the experiment does."""
        loop = asyncio.get_running_loop()
        first = loop.time()
        for tick in range(max_samples):
            await self.sample_once()
            if stop.is_set():
                return
            elapsed = loop.time() - first
            next_tick = max(tick + 1, math.ceil(elapsed / self.interval_s))
            wait_s = first + next_tick * self.interval_s - loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), wait_s)
            if stop.is_set():
                await self.sample_once()
                return
        log.warning("the sampler stopped after %d samples (its ceiling)", max_samples)


def _component_sample(
    listed: Mapping[str, Any] | None, usage: Mapping[str, Any] | None, cpu_cores: float | None
) -> ComponentSample:
    replicas = (listed or {}).get("replicas") or {}
    total_rss = ((usage or {}).get("totals") or {}).get("memory_rss_bytes")
    return ComponentSample(
        desired=replicas.get("desired"),
        ready=replicas.get("ready"),
        running=replicas.get("running"),
        cpu_cores=cpu_cores,
        rss_bytes=int(total_rss) if isinstance(total_rss, int | float) else None,
    )
