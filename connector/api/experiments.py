"""Experiments through the HTTP API: ``POST /v1/experiments`` with a plan runs it inside the
connector with the same runner as ``dynamo-local experiment`` (:mod:`connector.experiment`),
one at a time; ``GET`` follows it, ``DELETE`` cancels it, ``.../report`` serves its report.

The runner reads the connector through :class:`~connector.api.inprocess.InProcessApi` (the
API's JSON, no HTTP round trip). Run folders go under ``<working dir>/experiments/<id>``;
the id is ``<plan name>-<date>-<time>`` (``-2``, ``-3`` ... if taken). A plan's relative
tokenizer folder is resolved against the server's current directory (where
``dynamo-local up`` was started), as there is no plan file to be relative to.

What a client can make the server hold is bounded: one run at a time (a second POST is a
409 naming the running one), the plan's own limits (phases, seconds, see
:mod:`connector.experiment.plan`), and a history of the last :data:`HISTORY` runs in memory
(older runs are forgotten by the API; their folders stay on disk).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from aiohttp import web

from connector.api.context import BODY
from connector.api.handlers import json_ok
from connector.api.inprocess import InProcessApi
from connector.errors import ConnectorError
from connector.experiment.aiperf import AiperfMissing, find_aiperf
from connector.experiment.plan import Plan, PlanError, parse_plan
from connector.experiment.runner import ExperimentError, PhaseTracker, discover, run_experiment
from connector.experiment.sampler import Load
from connector.experiment.timeline import Sample, sample_json

if TYPE_CHECKING:
    from connector.local import LocalConnector

log = logging.getLogger("connector.api.experiments")

FOLDER = "experiments"
HISTORY = 20
# A cancel stops aiperf (SIGTERM, SIGKILL after 10 s), the sampler (15 s at most) and writes
# the run folder: the DELETE answers once that is done, or after this long with 202.
CANCEL_WAIT_S = 45.0
PLAN_ORIGIN = "plan"

RUNNING = "running"
SUCCEEDED = "succeeded"
FAILED = "failed"
CANCELLED = "cancelled"
STATES = (RUNNING, SUCCEEDED, FAILED, CANCELLED)


class InvalidPlan(ConnectorError):
    code = "invalid_plan"
    http_status = 422


class ExperimentRunning(ConnectorError):
    code = "experiment_running"
    http_status = 409


class ExperimentFinished(ConnectorError):
    code = "experiment_finished"
    http_status = 409


class ExperimentNotFound(ConnectorError):
    code = "experiment_not_found"
    http_status = 404


class NoReport(ConnectorError):
    code = "no_report"
    http_status = 404


class AiperfUnavailable(ConnectorError):
    code = "aiperf_missing"
    http_status = 503


@dataclass
class Run:
    id: str
    plan: Plan
    plan_text: str
    folder: Path
    created_at: float = field(default_factory=time.time)
    state: str = RUNNING
    stage: str = "waiting for the frontend"  # before the phases: the frontend, then aiperf
    cancelling: bool = False
    tracker: PhaseTracker | None = None
    latest: Sample | None = None
    summary: dict[str, Any] | None = None
    error: str | None = None
    finished_at: float | None = None
    has_report: bool = False
    task: asyncio.Task[None] | None = None

    @property
    def total_s(self) -> float:
        return self.plan.load_seconds + self.plan.cooldown_s

    def phase(self, now: float) -> str | None:
        """What the run is doing now, in words: ``waiting for the frontend``, ``aiperf
        starting``, a phase's name, ``cool-down``, ``cancelling``; None once it ended."""
        if self.state != RUNNING:
            return None
        if self.cancelling:
            return "cancelling"
        if self.tracker is None:
            return self.stage
        return self.tracker.progress(now)[1]

    def phases_json(self) -> list[dict[str, Any]]:
        started = self.tracker.start if self.tracker else {}
        ended = self.tracker.end if self.tracker else {}
        return [
            {
                "name": p.name,
                "description": p.describe(),
                "start": _round(started.get(p.name)),
                "end": _round(ended.get(p.name)),
            }
            for p in self.plan.phases
        ]

    def to_json(self, *, full: bool) -> dict[str, Any]:
        now = time.time()
        done = 0.0
        if self.tracker is not None:
            done = self.tracker.progress(now)[0]
        if self.state == SUCCEEDED:
            done = self.total_s
        out: dict[str, Any] = {
            "id": self.id,
            "name": self.plan.name,
            "state": self.state,
            "phase": self.phase(now),
            "progress": {
                "done_s": round(done, 3),
                "total_s": self.total_s,
                "fraction": round(min(1.0, done / self.total_s), 4) if self.total_s else 1.0,
            },
            "created_at": round(self.created_at, 3),
            "started_at": _round(self.tracker.started_at if self.tracker else None),
            "finished_at": _round(self.finished_at),
            "folder": str(self.folder),
            "phases": self.phases_json(),
            "error": self.error,
            "report": f"/v1/experiments/{self.id}/report" if self.has_report else None,
        }
        if full:
            out["latest_sample"] = None if self.latest is None else sample_json(self.latest)
            out["summary"] = self.summary
        return out


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Experiments:
    """The connector's experiments: at most one running, the last :data:`HISTORY` kept."""

    def __init__(
        self,
        connector: LocalConnector,
        *,
        aiperf: str | None = None,
        on_start: Callable[[], None] | None = None,
    ) -> None:
        self.connector = connector
        self.api = InProcessApi(connector)
        self.aiperf = aiperf
        self.on_start = on_start  # the live timeline starts sampling with a run
        self.history: deque[Run] = deque(maxlen=HISTORY)
        self.current: Run | None = None
        self._lock = asyncio.Lock()

    @property
    def root(self) -> Path:
        return self.connector.working_dir / FOLDER

    def get(self, run_id: str) -> Run:
        for run in self.history:
            if run.id == run_id:
                return run
        raise ExperimentNotFound(
            f"no experiment {run_id!r} (the last {HISTORY} are kept; older run folders "
            f"stay under {self.root})",
            experiment=run_id,
        )

    def load(self, now: float) -> Load:
        """The load the running experiment asks for now (none when nothing runs)."""
        run = self.current
        if run is None or run.tracker is None:
            return Load()
        return run.tracker.current(now)

    async def start(self, plan: Plan, plan_text: str) -> Run:
        async with self._lock:  # two POSTs at once: the second sees the first as running
            running = self.current
            if running is not None:
                raise ExperimentRunning(
                    f"experiment {running.id!r} is running; one runs at a time (cancel it "
                    f"with DELETE /v1/experiments/{running.id}, or wait until it ends)",
                    running=running.id,
                    name=running.plan.name,
                )
            try:
                executable = await asyncio.to_thread(find_aiperf, self.aiperf)
            except AiperfMissing as exc:
                raise AiperfUnavailable(str(exc), feature="aiperf") from None
            run_id, folder = await asyncio.to_thread(self._claim_folder, plan.name, plan_text)
            run = Run(run_id, plan, plan_text, folder)
            self.history.append(run)
            self.current = run
            run.task = asyncio.create_task(self._execute(run, executable), name=f"exp-{run_id}")
        if self.on_start is not None:
            self.on_start()
        return run

    def _claim_folder(self, name: str, plan_text: str) -> tuple[str, Path]:
        """A new folder ``<name>-<stamp>[-N]``, created here so two runs never share one,
        with the plan in it from the start (a run that fails or is cancelled before it
        samples still says what was asked)."""
        stamp = time.strftime("%Y%m%d-%H%M%S")
        self.root.mkdir(parents=True, exist_ok=True)
        known = {r.id for r in self.history}
        for n in itertools.count(1):
            run_id = f"{name}-{stamp}" if n == 1 else f"{name}-{stamp}-{n}"
            if run_id in known:
                continue
            folder = self.root / run_id
            try:
                folder.mkdir()
            except FileExistsError:
                continue
            (folder / "plan.yaml").write_text(plan_text, encoding="utf-8")
            return run_id, folder
        raise AssertionError("unreachable")

    async def _execute(self, run: Run, executable: Path) -> None:
        def on_sample(sample: Sample, tracker: PhaseTracker) -> None:
            run.tracker = tracker
            run.latest = sample

        state, error, summary = FAILED, None, None
        try:
            target = await discover(self.api, run.plan)
            run.stage = "aiperf starting"
            outcome = await run_experiment(
                run.plan,
                self.api,
                run.folder,
                executable=executable,
                on_sample=on_sample,
                target=target,
                plan_text=run.plan_text,
            )
            summary = outcome.summary
            error = "; ".join(outcome.errors) or None
            state = FAILED if outcome.errors else SUCCEEDED
        except asyncio.CancelledError:
            # Cancelled (DELETE, or the server stopping): the runner stopped aiperf and wrote
            # what was sampled before passing the cancellation on. This task is ours and
            # ends here, so the cancellation stops with it.
            state = CANCELLED
            summary = await self._read_summary(run)
        except ExperimentError as exc:
            error = str(exc)
        except Exception as exc:
            log.exception("experiment %s failed", run.id)
            error = f"internal error: {type(exc).__name__}: {exc}"
        finally:
            has_report = await asyncio.to_thread((run.folder / "report.html").is_file)
            # All at once (no await in between): a reader never sees it ended without its
            # summary or report.
            run.state, run.error, run.summary, run.has_report = state, error, summary, has_report
            run.finished_at = time.time()
            if self.current is run:
                self.current = None

    async def _read_summary(self, run: Run) -> dict[str, Any] | None:
        def read() -> dict[str, Any] | None:
            try:
                data = json.loads((run.folder / "summary.json").read_text(encoding="utf-8"))
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None

        return await asyncio.to_thread(read)

    async def cancel(self, run_id: str) -> Run:
        run = self.get(run_id)
        if run.state != RUNNING or run.task is None:
            raise ExperimentFinished(
                f"experiment {run_id!r} is not running (it {run.state})",
                experiment=run_id,
                state=run.state,
            )
        run.cancelling = True
        run.task.cancel()
        await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)
        return run

    async def close(self) -> None:
        """The server stops: a running experiment is cancelled and its folder written."""
        run = self.current
        if run is not None and run.task is not None:
            run.cancelling = True
            run.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait({run.task}, timeout=CANCEL_WAIT_S)


EXPERIMENTS = web.AppKey("dynamo_local_experiments", Experiments)


def experiments_of(request: web.Request) -> Experiments:
    return request.app[EXPERIMENTS]


# -------------------------------------------------------------------------- handlers


def _plan_text(request: web.Request, raw: bytes, body: dict[str, Any]) -> str:
    """The plan as it was given, for the run folder's ``plan.yaml``: YAML as sent, JSON
    rewritten as YAML (the same document)."""
    if request.content_type != "application/json":
        return raw.decode("utf-8")
    return yaml.safe_dump(body, sort_keys=False, allow_unicode=True)


async def post_experiment(request: web.Request) -> web.Response:
    experiments = experiments_of(request)
    body = request[BODY]
    raw = await request.read()  # already read by the validation middleware: cached
    try:
        plan = await asyncio.to_thread(
            parse_plan, body, origin=PLAN_ORIGIN, base_dir=Path(os.getcwd())
        )
    except PlanError as exc:
        raise InvalidPlan(str(exc), field=exc.field) from None
    run = await experiments.start(plan, _plan_text(request, raw, body))
    response = json_ok(run.to_json(full=True), status=202)
    response.headers["Location"] = f"/v1/experiments/{run.id}"
    return response


async def list_experiments(request: web.Request) -> web.Response:
    experiments = experiments_of(request)
    runs = [r.to_json(full=False) for r in reversed(experiments.history)]
    current = experiments.current
    return json_ok(
        {"experiments": runs, "running": current.id if current else None, "kept": HISTORY}
    )


async def get_experiment(request: web.Request) -> web.Response:
    run = experiments_of(request).get(request.match_info["id"])
    return json_ok(run.to_json(full=True))


async def cancel_experiment(request: web.Request) -> web.Response:
    run = await experiments_of(request).cancel(request.match_info["id"])
    # Still stopping after CANCEL_WAIT_S: accepted, GET shows when it is cancelled.
    return json_ok(run.to_json(full=True), status=200 if run.state != RUNNING else 202)


# The report is one self-contained page with plotly's script inline: a sandbox without
# same-origin makes it an opaque origin (it can run its charts, never read this API or the
# status page's token), and it may load nothing.
REPORT_HEADERS = {
    "Cache-Control": "no-cache",
    "Content-Security-Policy": (
        "sandbox allow-scripts; default-src 'none'; script-src 'unsafe-inline'; "
        "style-src 'unsafe-inline'; img-src data:; font-src data:"
    ),
}


async def get_report(request: web.Request) -> web.Response:
    run = experiments_of(request).get(request.match_info["id"])
    if run.state == RUNNING:
        raise ExperimentRunning(
            f"experiment {run.id!r} is still running; its report is written when it ends",
            experiment=run.id,
            phase=run.phase(time.time()),
        )
    try:
        page = await asyncio.to_thread((run.folder / "report.html").read_bytes)
    except OSError:
        why = run.error or "the run folder has no report.html"
        raise NoReport(
            f"experiment {run.id!r} has no report ({run.state}: {why})",
            experiment=run.id,
            state=run.state,
        ) from None
    return web.Response(body=page, content_type="text/html", headers=REPORT_HEADERS)


__all__ = [
    "CANCELLED",
    "EXPERIMENTS",
    "FAILED",
    "RUNNING",
    "STATES",
    "SUCCEEDED",
    "Experiments",
    "Run",
    "cancel_experiment",
    "get_experiment",
    "get_report",
    "list_experiments",
    "post_experiment",
]
