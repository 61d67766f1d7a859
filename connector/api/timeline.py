"""The live timeline the status page charts: every second, what the experiment sampler
records (:class:`connector.experiment.sampler.Sampler`: each component's desired, ready and
running replicas, CPU and RSS; the frontend's request rate, errors, requests in flight,
TTFT and ITL from its own ``/metrics``; the scale events of that second), kept in a ring of
:data:`CAPACITY` samples (15 minutes) and served as ``GET /v1/timeline?since=SEQ``.

Nothing runs until someone reads it: the first read starts the sampler, which stops again
once nobody has read for :data:`IDLE_STOP_S` and no experiment runs (the ring keeps what it
had; the next read starts sampling again, so an idle connector does no work). An experiment
started through the API starts it too, and while one runs each sample carries its phase and
the load it asks for.

:func:`attach_live` puts the timeline and the experiments (:mod:`connector.api.experiments`)
on an application and stops both when it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from aiohttp import web

from connector.api.context import QUERY
from connector.api.experiments import EXPERIMENTS, Experiments
from connector.api.handlers import json_ok
from connector.api.inprocess import InProcessApi
from connector.experiment import metrics
from connector.experiment.sampler import FrontendSource, Sampler, ScrapeSource
from connector.experiment.timeline import describe_event, sample_json, timeline_events

if TYPE_CHECKING:
    from connector.local import LocalConnector

log = logging.getLogger("connector.api.timeline")

INTERVAL_S = 1.0
WINDOW_S = 10.0  # the frontend's rates and percentiles, as an experiment's default
CAPACITY = 900  # 15 minutes at one sample a second
IDLE_STOP_S = 120.0
MARKS_PER_SAMPLE = 50  # an event storm is summarized, not carried whole into every read
FRONTEND = "frontend"


class _NoFrontend:
    """A graph without a frontend: no load or latency to show."""

    async def figures(self, now: float) -> metrics.Figures:
        return metrics.Figures()

    async def close(self) -> None:
        return None


def _mark(event: Mapping[str, Any]) -> dict[str, Any]:
    keys = ("component", "replica", "source", "from_replicas", "to_replicas", "outcome")
    out: dict[str, Any] = {
        "seq": int(event.get("seq", 0)),
        "time": round(float(event.get("time", 0.0)), 3),
        "kind": str(event.get("kind", "")),
        "text": describe_event(event),
    }
    for key in keys:
        if event.get(key) is not None:
            out[key] = event[key]
    if isinstance(event.get("duration_s"), int | float):
        out["duration_s"] = round(float(event["duration_s"]), 3)
    return out


class LiveTimeline:
    def __init__(self, connector: LocalConnector, experiments: Experiments) -> None:
        self.connector = connector
        self.experiments = experiments
        self.api = InProcessApi(connector)
        self.ring: deque[dict[str, Any]] = deque(maxlen=CAPACITY)
        self.seq = 0
        self.last_read = -math.inf
        self.task: asyncio.Task[None] | None = None

    @property
    def sampling(self) -> bool:
        return self.task is not None and not self.task.done()

    def touch(self) -> None:
        """A reader (or an experiment) wants samples: start sampling if it is not running."""
        self.last_read = time.monotonic()
        if not self.sampling:
            self.task = asyncio.create_task(self._run(), name="live-timeline")

    def _components(self) -> tuple[list[str], list[str]]:
        view = self.connector.view()
        names = [c.name for c in view.components]
        return names, [c.name for c in view.components if c.role == FRONTEND]

    def _idle(self) -> bool:
        return time.monotonic() - self.last_read > IDLE_STOP_S and self.experiments.current is None

    async def _run(self) -> None:
        names, frontends = self._components()
        scrape = ScrapeSource(self.api, frontends, WINDOW_S)
        sampler = Sampler(
            self.api,
            names,
            scrape if frontends else _NoFrontend(),
            started_at=time.time(),
            interval_s=INTERVAL_S,
            load=self.experiments.load,
            events_since=self.connector.events.last_seq,
            retain=False,
        )
        loop = asyncio.get_running_loop()
        first = loop.time()
        try:
            for tick in itertools.count():
                names, frontends = self._components()
                # Components come and go (the Planner interface adds and removes them).
                sampler.components = names
                scrape.frontends = frontends
                source: FrontendSource = scrape if frontends else _NoFrontend()
                sampler.frontend = source
                sample = await sampler.sample_once()
                self.seq += 1
                row = sample_json(sample)
                del row["t"]  # seconds since this sampler started: nothing to a reader
                row["seq"] = self.seq
                row["marks"] = [
                    _mark(e) for e in timeline_events(sampler.last_events)[-MARKS_PER_SAMPLE:]
                ]
                self.ring.append(row)
                if self._idle():
                    return
                # A fixed schedule: a slow sample skips ticks instead of drifting.
                elapsed = loop.time() - first
                next_tick = max(tick + 1, math.ceil(elapsed / INTERVAL_S))
                await asyncio.sleep(max(0.0, first + next_tick * INTERVAL_S - loop.time()))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("the live timeline stopped sampling")
        finally:
            await scrape.close()

    def read(self, since: int) -> dict[str, Any]:
        names, frontends = self._components()
        view = self.connector.view()
        roles = {c.name: c.role for c in view.components}
        # A cursor from before a restart of the connector (above what exists) gets it all.
        start = 0 if since > self.seq else since
        samples = [row for row in self.ring if row["seq"] > start]
        return {
            "interval_s": INTERVAL_S,
            "window_s": WINDOW_S,
            "capacity": CAPACITY,
            "sampling": self.sampling,
            "last_seq": self.seq,
            "components": [{"name": n, "role": roles[n]} for n in names],
            "frontends": frontends,
            "samples": samples,
            "experiment": self._experiment(),
        }

    def _experiment(self) -> dict[str, Any] | None:
        """The running experiment, else the latest one if it ended within the ring's span."""
        runs: Sequence[Any] = self.experiments.history
        if not runs:
            return None
        run = self.experiments.current or runs[-1]
        if run.finished_at is not None and run.finished_at < time.time() - CAPACITY * INTERVAL_S:
            return None
        brief = run.to_json(full=False)
        keys = ("id", "name", "state", "phase", "progress", "phases", "report", "error")
        return {k: brief[k] for k in keys}

    async def close(self) -> None:
        task = self.task
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


TIMELINE = web.AppKey("dynamo_local_timeline", LiveTimeline)


def attach_live(app: web.Application, connector: LocalConnector) -> None:
    """The experiments and the live timeline of ``app``'s connector; both stop with it (a
    running experiment is cancelled, its run folder written)."""
    experiments = Experiments(connector)
    timeline = LiveTimeline(connector, experiments)
    experiments.on_start = timeline.touch
    app[EXPERIMENTS] = experiments
    app[TIMELINE] = timeline

    async def stop(_: web.Application) -> None:
        await experiments.close()
        await timeline.close()

    app.on_cleanup.append(stop)


async def get_timeline(request: web.Request) -> web.Response:
    timeline = request.app[TIMELINE]
    timeline.touch()
    return json_ok(timeline.read(int(request[QUERY].get("since", 0))))
