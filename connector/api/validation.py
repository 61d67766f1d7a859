"""Strict validation of request bodies and query parameters against the route table's schemas.

A small subset of JSON Schema, enough for the request shapes this API accepts: ``type``,
``properties``, ``required``, ``additionalProperties: false``, ``enum``, ``pattern``,
``minimum``/``maximum``/``exclusiveMinimum``, ``minLength``/``maxLength``. Shape errors
(wrong type, unknown or missing key, not JSON) are 400 ``bad_request``; a well-typed value
out of range is 422 ``invalid_value``. ``true`` is not an integer here, unlike in Python;
``2.0`` is, as in JSON Schema.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any

from connector.api.errors import BadRequest, InvalidValue
from connector.api.schema_refs import Schema

_JSON_TYPES: dict[str, str] = {
    "object": "an object",
    "array": "an array",
    "string": "a string",
    "integer": "an integer",
    "number": "a number",
    "boolean": "a boolean",
    "null": "null",
}


def _is_type(value: Any, kind: str) -> bool:
    if kind == "object":
        return isinstance(value, dict)
    if kind == "array":
        return isinstance(value, list)
    if kind == "string":
        return isinstance(value, str)
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        # JSON has one number type: 2.0 is the integer 2 (as JSON Schema says); True is not.
        if isinstance(value, float):
            return math.isfinite(value) and value.is_integer()
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "null":
        return value is None
    raise ValueError(f"unsupported schema type {kind!r}")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def validate(value: Any, schema: Schema, where: str) -> Any:
    """The value, normalized (integral numbers in integer fields become ``int``); raises
    BadRequest / InvalidValue naming ``where`` (e.g. ``body.replicas``)."""
    kinds = schema.get("type")
    if kinds is not None:
        allowed = [kinds] if isinstance(kinds, str) else list(kinds)
        if not any(_is_type(value, k) for k in allowed):
            expected = " or ".join(_JSON_TYPES[k] for k in allowed)
            raise BadRequest(
                f"{where} must be {expected}, got {_describe(value)}",
                field=where,
                expected=allowed,
            )
        if isinstance(value, float) and "integer" in allowed and "number" not in allowed:
            value = int(value)
    if "enum" in schema and value not in schema["enum"]:
        choices = ", ".join(str(c) for c in schema["enum"] if c is not None)
        raise BadRequest(
            f"{where} must be one of {choices}, got {value!r}", field=where, allowed=schema["enum"]
        )
    if isinstance(value, str):
        _check_string(value, schema, where)
    if isinstance(value, int | float) and not isinstance(value, bool):
        _check_range(value, schema, where)
    if isinstance(value, dict):
        value = _check_object(value, schema, where)
    return value


def _check_string(value: str, schema: Schema, where: str) -> None:
    shortest = schema.get("minLength")
    if shortest is not None and len(value) < shortest:
        raise BadRequest(f"{where} is shorter than {shortest} characters", field=where)
    limit = schema.get("maxLength")
    if limit is not None and len(value) > limit:
        raise BadRequest(f"{where} is longer than {limit} characters", field=where)
    pattern = schema.get("pattern")
    if pattern is not None and not _pattern(pattern).search(value):
        raise BadRequest(f"{where} {value!r} does not match {pattern}", field=where)


def _pattern(pattern: str) -> re.Pattern[str]:
    """A JSON Schema pattern (ECMA-262, unanchored search) as a Python regex: ``$`` at the
    end means end of string, not "before a final newline" as in Python."""
    if pattern.endswith("$") and not pattern.endswith("\\$"):
        pattern = pattern[:-1] + r"\Z"
    return re.compile(pattern)


def _check_range(value: float, schema: Schema, where: str) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{where} must be a finite number", field=where)
    low = schema.get("minimum")
    if low is not None and value < low:
        raise InvalidValue(f"{where} must be >= {low}, got {value}", field=where, minimum=low)
    high = schema.get("maximum")
    if high is not None and value > high:
        raise InvalidValue(f"{where} must be <= {high}, got {value}", field=where, maximum=high)
    above = schema.get("exclusiveMinimum")
    if above is not None and value <= above:
        raise InvalidValue(f"{where} must be > {above}, got {value}", field=where, minimum=above)


def _check_object(value: dict[str, Any], schema: Schema, where: str) -> dict[str, Any]:
    properties: Mapping[str, Schema] = schema.get("properties", {})
    missing = [k for k in schema.get("required", ()) if k not in value]
    if missing:
        raise BadRequest(
            f"{where} is missing {', '.join(repr(k) for k in missing)}",
            field=where,
            missing=missing,
        )
    extra_schema = schema.get("additionalProperties", True)
    out: dict[str, Any] = {}
    for key, item in value.items():
        sub = properties.get(key)
        if sub is None:
            if extra_schema is False:
                allowed = ", ".join(properties) or "none"
                raise BadRequest(
                    f"{where} has an unknown key {key!r} (allowed: {allowed})",
                    field=f"{where}.{key}",
                    allowed=list(properties),
                )
            sub = extra_schema if isinstance(extra_schema, dict) else {}
        out[key] = validate(item, sub, f"{where}.{key}")
    return out


# ------------------------------------------------------------------------- JSON bodies


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def parse_json_body(raw: bytes) -> Any:
    """Decode a request body: UTF-8 JSON, no NaN/Infinity, no duplicate keys."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        return json.loads(text, parse_constant=_reject_constant, object_pairs_hook=_no_duplicates)
    except ValueError as exc:
        raise BadRequest(f"request body is not valid JSON: {exc}") from exc


YAML_TYPES = frozenset({"application/yaml", "application/x-yaml", "text/yaml"})
# Anchors and aliases are fine, but expanded a body holds at most this many values: a few
# nested aliases can otherwise turn 64 KiB into billions of nodes to walk.
MAX_YAML_NODES = 20_000


def parse_yaml_body(raw: bytes) -> Any:
    """Decode a YAML request body (UTF-8, one document, no duplicate keys, bounded)."""
    from connector.errors import GraphError
    from connector.graph.loader import parse_yaml

    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"request body is not UTF-8 ({exc.reason} at byte {exc.start})") from exc
    try:
        value = parse_yaml(text, "request body")
    except GraphError as exc:
        raise BadRequest(str(exc).replace("invalid YAML", "not valid YAML")) from None
    count, stack = 0, [value]
    while stack:
        item = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise BadRequest(f"request body expands to more than {MAX_YAML_NODES} YAML values")
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return value


# --------------------------------------------------------------------- query parameters

# Any integer the schema allows (its bounds are checked after): 1,000 digits is far past
# every bound and far below what int() parses slowly.
_INTEGER = re.compile(r"-?[0-9]{1,1000}")
_TRUE = frozenset({"true", "1", "yes"})
_FALSE = frozenset({"false", "0", "no"})


def parse_query_value(raw: str, schema: Schema, where: str) -> Any:
    """Turn one query-string value into the type its schema names, then validate it."""
    kind = schema.get("type", "string")
    value: Any
    if kind == "integer":
        if not _INTEGER.fullmatch(raw):
            raise BadRequest(f"{where} must be an integer, got {raw!r}", field=where)
        value = int(raw)
    elif kind == "number":
        try:
            value = float(raw)
        except ValueError:
            raise BadRequest(f"{where} must be a number, got {raw!r}", field=where) from None
    elif kind == "boolean":
        lowered = raw.lower()
        if lowered not in _TRUE | _FALSE:
            raise BadRequest(f"{where} must be true or false, got {raw!r}", field=where)
        value = lowered in _TRUE
    else:
        value = raw
    return validate(value, schema, where)
