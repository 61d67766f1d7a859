"""Typed errors of the public API.

Every error carries a stable ``code`` (used as the JSON error code by the HTTP API) and the
HTTP status it maps to, so the server never has to guess and never leaks a traceback.
"""

from __future__ import annotations

import errno
from typing import Any


class ConnectorError(Exception):
    """Base of every error dynamo-local raises on purpose."""

    code = "internal"
    http_status = 500
    # Seconds a client should wait before trying again (the HTTP API sends it as
    # ``Retry-After``); None when retrying soon would not help.
    retry_after_s: int | None = None

    def __init__(self, message: str, **details: Any) -> None:
        super().__init__(message)
        self.message = message
        self.details: dict[str, Any] = details

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "details": self.details}


class GraphError(ConnectorError):
    """A graph file or object is invalid; the message names file, service, field and why."""

    code = "invalid_graph"
    http_status = 422


class ScaledObjectError(ConnectorError):
    """A KEDA ScaledObject file asks for something invalid or that dynamo-local cannot honour;
    the message names the file, the field path and why (connector.policy)."""

    code = "invalid_scaledobject"
    http_status = 422


class InvalidOptions(ConnectorError):
    """A :class:`~connector.options.ConnectorOptions` value is out of range; the message
    names the option and the value."""

    code = "invalid_options"
    http_status = 422


class ComponentNotFound(ConnectorError):
    code = "component_not_found"
    http_status = 404


class InvalidReplicas(ConnectorError):
    """Negative, non-integer, or outside ``minReplicas``/``maxReplicas``."""

    code = "invalid_replicas"
    http_status = 422


class ReplicaLimit(InvalidReplicas):
    """The target is a valid number but beyond the component's min/max bounds."""

    code = "replica_limit"
    http_status = 409


class ReplicaBudgetExceeded(InvalidReplicas):
    """The target would take the machine past its replica budget (``--max-replicas``)."""

    code = "replica_budget"
    http_status = 422


class CrashLoop(ConnectorError):
    """The component is in crashloop; restart it before scaling."""

    code = "crashloop"
    http_status = 409


class SupervisorUnavailable(ConnectorError):
    """circusd is gone or does not answer within the deadline."""

    code = "supervisor_unavailable"
    http_status = 503


class DiscoveryUnavailable(ConnectorError):
    code = "discovery_unavailable"
    http_status = 503


class ScaleTimeout(ConnectorError):
    code = "scale_timeout"
    http_status = 504


class NamespaceLocked(ConnectorError):
    """Another connector already manages this namespace (same working dir)."""

    code = "namespace_locked"
    http_status = 409


class ResourcesExhausted(ConnectorError):
    """A replica's request cannot be met; says what is missing and who holds it."""

    code = "resources_exhausted"
    http_status = 409


class ConnectorClosed(ConnectorError):
    code = "connector_closed"
    http_status = 503


class StateWriteFailed(ConnectorError):
    """``state.json`` could not be written (disk full, read-only or vanished working dir).

    What was asked for is kept in memory and carried out once a write succeeds again (the
    loop saves every pass, and each save writes the whole state), so repeating the call
    is safe. ``errno`` is the OS error's number, as on the :class:`OSError` it wraps."""

    code = "state_unwritable"
    http_status = 503
    retry_after_s = 5

    def __init__(self, message: str, *, os_errno: int | None = None, **details: Any) -> None:
        super().__init__(message, **details)
        self.errno = os_errno

    @classmethod
    def from_os_error(cls, path: str, exc: OSError) -> StateWriteFailed:
        """The error naming ``path`` (state.json) and the OS's reason (``exc``)."""
        code = exc.errno
        name = errno.errorcode.get(code, str(code)) if code is not None else None
        reason = exc.strerror or str(exc) or type(exc).__name__
        return cls(
            f"cannot write the connector's state to {path}: {reason}"
            + (f" ({name})" if name else "")
            + "; what was asked for is kept in memory, written and carried out once the "
            "working dir is writable again",
            os_errno=code,
            path=path,
            errno=name,
            reason=reason,
        )


class ConnectorStarting(ConnectorClosed):
    """The connector is still starting (circusd, re-adoption): try again in a moment."""

    code = "starting"
    http_status = 503
    retry_after_s = 1
