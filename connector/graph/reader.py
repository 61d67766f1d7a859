"""The typed reader every graph section is read with: each failure names
``origin: path: reason`` (``graph.yaml: spec.services.Decode.replicas: must be >= 0, got
-1``), and the name patterns those paths check against. Shared by the graph loader and
anything else that reads a Kubernetes-shaped file the same way."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, NoReturn, TypeVar

from connector.errors import ConnectorError, GraphError

log = logging.getLogger("connector.graph")

# Service names become Circus watcher names, which Circus lowercases.
SERVICE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")
NAMESPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")
GRAPH_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
ALLOCATION_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_-]*")  # ports and sockets
DYNAMO_NAME = re.compile(r"[A-Za-z0-9_-]+")  # discovery components and endpoints

T = TypeVar("T")


def choices(values: Iterable[str]) -> str:
    return ", ".join(values)


class Reader:
    """Typed access to the raw mapping; every failure names ``origin: path: reason``.

    Raises :class:`GraphError` for a graph; a reader of another file kind (a ScaledObject,
    an experiment plan) sets :attr:`error` to its own error type and keeps the rest."""

    error: type[ConnectorError] = GraphError

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.warnings: list[str] = []
        self.service: str | None = None  # the service being read, for error details

    def fail(self, path: str, reason: str) -> NoReturn:
        details: dict[str, Any] = {"source": self.origin, "field": path}
        if self.service is not None:
            details["service"] = self.service
        prefix = f"{path}: " if path else ""
        raise self.error(f"{self.origin}: {prefix}{reason}", **details)

    def warn(self, path: str, reason: str) -> None:
        message = f"{self.origin}: {path}: {reason}"
        self.warnings.append(message)
        log.warning("%s", message)

    def mapping(self, value: object, path: str, *, optional: bool = True) -> Mapping[str, Any]:
        if value is None and optional:
            return {}
        if not isinstance(value, Mapping):
            self.fail(path, f"must be a mapping, got {describe(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(f"{path}.{key}", f"keys must be strings, got {describe(key)}")
        return value

    def known(self, value: Mapping[str, Any], path: str, keys: Iterable[str]) -> None:
        allowed = set(keys)
        for key in value:
            if key not in allowed:
                self.warn(join_path(path, key), "not used by dynamo-local, ignored")

    def sequence(self, value: object, path: str) -> Sequence[Any]:
        if value is None:
            return ()
        if isinstance(value, str | bytes) or not isinstance(value, Sequence):
            self.fail(path, f"must be a list, got {describe(value)}")
        return value

    def string(self, value: object, path: str, pattern: re.Pattern[str] | None = None) -> str:
        if not isinstance(value, str) or not value:
            self.fail(path, f"must be a non-empty string, got {describe(value)}")
        if pattern is not None and not pattern.fullmatch(value):
            self.fail(path, f"invalid name {value!r}: {PATTERN_RULES[pattern.pattern]}")
        return value

    def text(self, value: object, path: str) -> str:
        """A command-line or env value: a string, or a number written without quotes."""
        if isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.fail(path, f"must be a string, got {describe(value)}")

    def integer(self, value: object, path: str, *, minimum: int, maximum: int | None = None) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(path, f"must be an integer, got {describe(value)}")
        if value < minimum:
            self.fail(path, f"must be >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            self.fail(path, f"must be <= {maximum}, got {value}")
        return value

    def seconds(self, value: object, path: str, *, positive: bool) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.fail(path, f"must be a number of seconds, got {describe(value)}")
        if positive and value <= 0:
            self.fail(path, f"must be > 0, got {value}")
        if value < 0:
            self.fail(path, f"must be >= 0, got {value}")
        return float(value)

    def boolean(self, value: object, path: str) -> bool:
        if not isinstance(value, bool):
            self.fail(path, f"must be true or false, got {describe(value)}")
        return value

    def choice(self, value: object, path: str, options: Iterable[str]) -> str:
        allowed = list(options)
        if not isinstance(value, str) or value not in allowed:
            self.fail(path, f"must be one of {choices(allowed)}, got {describe(value)}")
        return value

    def quantity(self, value: object, path: str, parse: Callable[[object], T]) -> T:
        try:
            return parse(value)
        except ValueError as exc:
            self.fail(path, str(exc))


PATTERN_RULES = {
    SERVICE_NAME.pattern: "must start with a letter and hold only letters, digits, '_' and '-'",
    NAMESPACE_NAME.pattern: "must start with a letter or digit and hold only letters, digits, "
    "'_' and '-'",
    GRAPH_NAME.pattern: "must start with a letter or digit and hold only letters, digits, "
    "'_', '.' and '-'",
    ENV_NAME.pattern: "must start with a letter or '_' and hold only letters, digits and '_'",
    DYNAMO_NAME.pattern: "must hold only letters, digits, '_' and '-'",
}


def describe(value: object) -> str:
    if value is None:
        return "nothing"
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list | tuple):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def join_path(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)
