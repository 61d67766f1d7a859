"""The policy driver: one poll loop per ScaledObject that queries its triggers, evaluates
KEDA's and the HPA's algorithm (:mod:`connector.policy.keda`), scales its component with
``scale_component(..., source="policy")`` and publishes what it did.

Every ``pollingInterval``: all triggers are queried at once (each with a timeout), the
component's current target is read from the connector's view, and the evaluation's count
is set (never waited for: like the HPA, the next evaluation sees what runs). Every
decision is an ``autoscale`` event whose reason says why, and so is a trigger starting
to fail, falling back, or answering again; :meth:`PolicyDriver.status` is what the
exporter publishes as ``dynamo_local_autoscaler_*``.

With ``dry_run`` nothing is scaled: the events say what would have been done ("dry run:
would scale ...") and the metrics carry the count the policy would set.

A count changed by someone else (``PUT .../replicas``, ``dynamo-local scale``) is what the
next evaluation starts from, as the HPA starts from a workload's ``spec.replicas`` after a
``kubectl scale``: the policy owns its component and sets the count again from its triggers
(an ``autoscale`` event says it noticed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from connector.dynamo.planner.targets import Scaler
from connector.errors import (
    ConnectorClosed,
    ConnectorError,
    InvalidReplicas,
    ResourcesExhausted,
)
from connector.events import EventLog
from connector.policy import keda
from connector.policy.binding import BoundPolicy
from connector.policy.explain import explain
from connector.policy.keda import Evaluation, PolicyState, Reading
from connector.policy.prometheus import QUERY_TIMEOUT_S, PrometheusClient
from connector.view import ConnectorView

log = logging.getLogger(__name__)


class PolicyHost(Scaler, Protocol):
    """What a driver needs of the connector (LocalConnector is one): it scales as the
    Planner's decisions do (:class:`connector.dynamo.planner.targets.Scaler`)."""

    events: EventLog

    def view(self) -> ConnectorView: ...

    async def wait_started(self) -> bool: ...


class Querier(Protocol):
    async def query(self, trigger: Any) -> Reading: ...


# A trigger's health as the events report its changes.
OK, FAILING, FALLBACK = "ok", "failing", "fallback"


class PolicyDriver:
    """Drives one component from one ScaledObject."""

    def __init__(
        self,
        host: PolicyHost,
        policy: BoundPolicy,
        querier: Querier,
        *,
        dry_run: bool = False,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.host = host
        self.policy = policy
        self.so = policy.scaled_object
        self.spec = self.so.policy
        self.component = policy.component
        self.querier = querier
        self.dry_run = dry_run
        self._clock = clock
        self._wall = wall
        self.state: PolicyState | None = None
        self.last: Evaluation | None = None
        self.last_at: float | None = None  # Unix time of the last evaluation
        self.errors_total = [0] * len(self.so.triggers)
        self.last_errors: list[str | None] = [None] * len(self.so.triggers)
        self._health = [OK] * len(self.so.triggers)
        self._last_set: int | None = None  # the count this driver set last
        self._last_event: tuple[Any, ...] | None = None  # for repeated refusals / dry runs

    # ------------------------------------------------------------------ the loop

    async def run(self) -> None:
        """Evaluate every ``pollingInterval`` (fixed cadence) until cancelled or the
        connector closes. Waits until the connector has adopted its replicas first."""
        if not await self.host.wait_started():
            return
        self.start()
        loop = asyncio.get_running_loop()
        interval = float(self.so.polling_interval_s)
        next_at = loop.time()
        while True:
            try:
                await self.evaluate_once()
            except ConnectorClosed:
                return
            except Exception:  # one broken evaluation must not end the policy
                log.exception("policy %s: evaluation failed", self.so.name)
            next_at += interval
            now = loop.time()
            if next_at < now:  # overran (slow queries): skip the missed ticks
                next_at = now + interval
            await asyncio.sleep(next_at - now)

    def start(self) -> None:
        """Start the clocks KEDA's initialCooldownPeriod counts from."""
        if self.state is None:
            self.state = PolicyState(started_at=self._clock())

    def _current(self) -> int:
        component = self.host.view().component(self.component)
        if component is None:
            raise ConnectorClosed(f"component {self.component} is gone from the view")
        return component.desired

    async def evaluate_once(self) -> Evaluation:
        """Query, evaluate, scale (unless dry run) and publish, once."""
        self.start()
        assert self.state is not None
        readings: Sequence[Reading] = await asyncio.gather(
            *(self.querier.query(t) for t in self.so.triggers)
        )
        # Read after the queries: a count changed while they ran is the one to start from.
        current = self._current()
        self._notice_outside_change(current)
        now = self._clock()
        previous = self.state.failures
        evaluation = keda.evaluate(self.spec, self.state, readings, current, now)
        self.state = evaluation.state
        self.last, self.last_at = evaluation, self._wall()
        for i, reading in enumerate(readings):
            if reading.error is not None:
                self.errors_total[i] += 1
            self.last_errors[i] = reading.error
        self._health_events(evaluation, previous)
        if evaluation.changes:
            await self._apply(evaluation, now)
        else:
            self._last_event = None
        return evaluation

    # ------------------------------------------------------------------ decisions

    def _details(self, evaluation: Evaluation) -> dict[str, Any]:
        return {
            "scaled_object": self.so.name,
            "file": self.so.source,
            "step": evaluation.step.value,
            "dry_run": self.dry_run,
            "recommendation": evaluation.recommendation,
            "limited_by": evaluation.limited_by,
            "triggers": [
                {
                    "trigger": t.label,
                    "query": t.query,
                    "value": o.value,
                    "error": o.error,
                    "active": o.active,
                    "failures": o.failures,
                    "fallback": o.fallback,
                    "proposal": o.proposal.replicas if o.proposal is not None else None,
                }
                for t, o in zip(self.so.triggers, evaluation.triggers, strict=True)
            ],
        }

    def _emit(
        self,
        reason: str,
        outcome: str | None,
        details: dict[str, Any],
        before: int | None = None,
        after: int | None = None,
    ) -> None:
        self.host.events.emit(
            "autoscale",
            component=self.component,
            source="policy",
            from_replicas=before,
            to_replicas=after,
            outcome=outcome,
            reason=reason,
            details=details,
        )

    def _emit_once(self, key: tuple[Any, ...], *args: Any, **kwargs: Any) -> None:
        """Emit unless the same decision was the last one emitted: a refusal or a dry run
        repeats at every evaluation until something changes."""
        if key == self._last_event:
            return
        self._last_event = key
        self._emit(*args, **kwargs)

    async def _apply(self, evaluation: Evaluation, now: float) -> None:
        reason = explain(self.so, self.component, evaluation)
        details = self._details(evaluation)
        move = (evaluation.current, evaluation.desired)
        if self.dry_run:
            self._emit_once(("dry", *move), f"dry run: {reason}", None, details, *move)
            return
        try:
            await self.host.scale_component(
                self.component, evaluation.desired, blocking=False, source="policy"
            )
        except ConnectorClosed:
            raise
        except ResourcesExhausted as exc:
            target = exc.details.get("target")
            self._last_set = target if isinstance(target, int) else evaluation.current
            outcome = "partial" if exc.details.get("started") else "refused"
            self._emit_once(
                (outcome, *move, exc.message),
                f"{reason}; not met: {exc.message}",
                outcome,
                details,
                *move,
            )
            return
        except ConnectorError as exc:
            self._last_set = evaluation.current
            outcome = "refused" if isinstance(exc, InvalidReplicas) else "failed"
            self._emit_once(
                (outcome, *move, exc.message),
                f"{reason}; not met: {exc.message}",
                outcome,
                details,
                *move,
            )
            return
        self._last_set = evaluation.desired
        assert self.state is not None
        self.state = keda.scaled(self.spec, self.state, now, evaluation)
        self._last_event = None
        self._emit(reason, "ok", details, *move)

    def _notice_outside_change(self, current: int) -> None:
        last = self._last_set
        if last is None or current == last:
            return
        self._last_set = current
        self._emit(
            f"{self.component} was set to {current} outside the policy (it had set {last}); "
            f"ScaledObject {self.so.name!r} drives {self.component} and sets its count from "
            "its triggers again at each evaluation, as KEDA's HPA does after a manual scale",
            None,
            {"scaled_object": self.so.name, "file": self.so.source, "dry_run": self.dry_run},
            last,
            current,
        )

    def _health_events(self, evaluation: Evaluation, previous: tuple[int, ...]) -> None:
        """An event when a trigger starts failing, falls back, or answers again."""
        fallback = self.spec.fallback
        for i, (trigger, outcome) in enumerate(
            zip(self.so.triggers, evaluation.triggers, strict=True)
        ):
            health = FALLBACK if outcome.fallback else FAILING if outcome.error else OK
            if health == self._health[i]:
                continue
            self._health[i] = health
            head = f"{self.component}: trigger {trigger.label} query={trigger.query}"
            details = {
                "scaled_object": self.so.name,
                "file": self.so.source,
                "trigger": trigger.label,
                "failures": outcome.failures,
                "error": outcome.error,
                "dry_run": self.dry_run,
            }
            if health == OK:
                failed = previous[i] if i < len(previous) else 0
                assert outcome.value is not None
                self._emit(
                    f"{head} answers again (value {outcome.value!r}) after {failed} failed queries",
                    "ok",
                    details,
                )
            elif health == FAILING:
                then = (
                    f"; fallback to {fallback.replicas} replicas once it has failed more than "
                    f"{fallback.failure_threshold} times in a row"
                    if fallback is not None and self.spec.uses_fallback(i)
                    else ""
                )
                self._emit(
                    f"{head} failed ({outcome.error}): it gives no metric, so the count does "
                    f"not go down for it and never to zero while it fails{then}",
                    "failed",
                    details,
                )
            else:
                assert fallback is not None
                self._emit(
                    f"{head} failed {outcome.failures} times in a row, past failureThreshold "
                    f"{fallback.failure_threshold}: fallback to {fallback.replicas} replicas "
                    f"({outcome.error})",
                    "failed",
                    details,
                )

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """For the exporter (``exporter.sources.parse_autoscaler``)."""
        last = self.last
        triggers = []
        for i, trigger in enumerate(self.so.triggers):
            outcome = last.triggers[i] if last is not None else None
            triggers.append(
                {
                    "trigger": trigger.label,
                    "query": trigger.query,
                    "value": outcome.value if outcome is not None else None,
                    "active": outcome.active if outcome is not None else None,
                    "failures": outcome.failures if outcome is not None else 0,
                    "fallback": outcome.fallback if outcome is not None else False,
                    "errors_total": self.errors_total[i],
                    "last_error": self.last_errors[i],
                }
            )
        return {
            "scaled_object": self.so.name,
            "component": self.component,
            "file": self.so.source,
            "dry_run": self.dry_run,
            "polling_interval_s": self.so.polling_interval_s,
            "evaluated_at": self.last_at,
            "current_replicas": last.current if last is not None else None,
            "desired_replicas": last.desired if last is not None else None,
            "step": last.step.value if last is not None else None,
            "triggers": triggers,
        }


class Policies:
    """Every policy driver of one connector, started and closed together."""

    def __init__(
        self,
        host: PolicyHost,
        bound: Sequence[BoundPolicy],
        *,
        dry_run: bool = False,
        query_timeout_s: float = QUERY_TIMEOUT_S,
    ) -> None:
        self.client = PrometheusClient(query_timeout_s)
        self.dry_run = dry_run
        self.drivers = [PolicyDriver(host, b, self.client, dry_run=dry_run) for b in bound]
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def running(self) -> bool:
        return any(not t.done() for t in self._tasks)

    def start(self) -> None:
        if self._tasks:
            return
        self._tasks = [
            asyncio.create_task(d.run(), name=f"policy-{d.so.name}") for d in self.drivers
        ]

    async def close(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.client.close()

    def status(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, "scaled_objects": [d.status() for d in self.drivers]}
