"""The words the connector speaks, in one place: replica phases, component statuses, event
kinds, outcomes and scale sources.

The connector writes them (state, events), the exporter's catalog turns them into label
values, the API schemas list them and the dashboards' linter checks queries against the
catalog. Each of those reads this module, so a new kind cannot be emitted without the
catalog knowing it (``tests/test_vocabulary.py`` checks every literal the connector emits).
"""

from __future__ import annotations

from enum import StrEnum


def values(words: type[StrEnum]) -> tuple[str, ...]:
    """The plain string values of ``words``, in declaration order (label values, schemas)."""
    return tuple(str(w.value) for w in words)


class Phase(StrEnum):
    """A replica record's phase (``state.ReplicaRecord.phase``)."""

    SPAWNING = "spawning"
    STARTING = "starting"
    READY = "ready"
    STOPPING = "stopping"
    BACKOFF = "backoff"
    EXITED = "exited"


# A replica's state as the view shows it: its phase, or crashloop while its component is.
REPLICA_STATES: tuple[str, ...] = (*values(Phase), "crashloop")


class ComponentStatus(StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    CRASHLOOP = "crashloop"
    STOPPED = "stopped"


class EventKind(StrEnum):
    """What an event (``events.Event.kind``) records."""

    SCALE = "scale"
    SPAWN = "spawn"
    READY = "ready"
    STOP = "stop"
    EXIT = "exit"
    RESTART = "restart"
    CRASHLOOP = "crashloop"
    REAP = "reap"
    DRAIN = "drain"
    DISCOVERY = "discovery"
    ADOPT = "adopt"
    SUPERVISOR = "supervisor"
    DECISION = "decision"
    ALLOCATE = "allocate"
    RELEASE = "release"
    LEAK = "leak"
    # A ScaledObject policy's decision (connector.policy): why it scaled, would scale (dry
    # run), held, or saw a trigger fail.
    AUTOSCALE = "autoscale"


class Outcome(StrEnum):
    """How an event's operation ended (``events.Event.outcome``)."""

    OK = "ok"
    PARTIAL = "partial"
    FAILED = "failed"
    TIMEOUT = "timeout"
    REFUSED = "refused"
    SUPERSEDED = "superseded"


class Source(StrEnum):
    """Who asked for a scale."""

    API = "api"
    PLANNER = "planner"
    CLI = "cli"
    RECONCILE = "reconcile"
    USER = "user"
    POLICY = "policy"  # a ScaledObject policy (connector.policy)
