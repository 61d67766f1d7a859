"""A prometheus trigger's query against the Prometheus HTTP API (``GET /api/v1/query``).

The answer is read as KEDA's prometheus scaler reads it
(https://keda.sh/docs/2.16/scalers/prometheus/): one series (or a scalar) gives its value;
more than one series, a non-2xx answer, an answer that is not Prometheus' JSON, or a
timeout is a failure. An empty result, and a NaN or infinite value, are 0 when
``ignoreNullValues`` is true (KEDA's default) and a failure when it is false. Nothing
else ever becomes a number: a failure is a :class:`~connector.policy.keda.Reading` with an
error, which the evaluation never reads as zero demand.
"""

from __future__ import annotations

import json
import math
from typing import Any

import aiohttp

from connector.policy.keda import Reading
from connector.policy.scaledobject import PrometheusTrigger

# KEDA's HTTP client timeout for scalers (KEDA_HTTP_DEFAULT_TIMEOUT, 3 s).
QUERY_TIMEOUT_S = 3.0
_ERROR_BODY_CHARS = 200


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _ERROR_BODY_CHARS else text[: _ERROR_BODY_CHARS - 1] + "…"


def read_answer(body: Any, trigger: PrometheusTrigger) -> Reading:
    """A Reading from a successful (2xx) answer's JSON body."""
    if not isinstance(body, dict) or body.get("status") != "success":
        error = body.get("error") if isinstance(body, dict) else None
        return Reading(None, f"Prometheus answered {_short(str(error or body))}")
    data = body.get("data")
    if not isinstance(data, dict):
        return Reading(None, "Prometheus' answer has no data")
    kind, result = data.get("resultType"), data.get("result")
    if kind == "scalar" and isinstance(result, list) and len(result) == 2:
        raw: Any = result[1]
    elif kind == "vector" and isinstance(result, list):
        if not result:
            if trigger.ignore_null_values:
                return Reading(0.0)
            return Reading(None, "the query returned no series (ignoreNullValues is false)")
        if len(result) > 1:
            return Reading(
                None, f"the query returned {len(result)} series; a trigger's query must return one"
            )
        sample = result[0].get("value") if isinstance(result[0], dict) else None
        if not isinstance(sample, list) or len(sample) != 2:
            return Reading(None, "the query's series has no value")
        raw = sample[1]
    else:
        return Reading(None, f"the query returned a {kind}, not a vector or a scalar")
    try:
        value = float(raw)
    except (TypeError, ValueError):
        return Reading(None, f"the query's value {raw!r} is not a number")
    if not math.isfinite(value):
        if trigger.ignore_null_values:
            return Reading(0.0)
        return Reading(None, f"the query's value is {raw} (ignoreNullValues is false)")
    return Reading(value)


class PrometheusClient:
    """One HTTP session for a driver's queries; :meth:`close` ends it."""

    def __init__(self, timeout_s: float = QUERY_TIMEOUT_S) -> None:
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    def _http(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        return self._session

    async def query(self, trigger: PrometheusTrigger) -> Reading:
        params: list[tuple[str, str]] = [("query", trigger.query)]
        if trigger.namespace is not None:
            params.append(("namespace", trigger.namespace))  # namespaced APIs (Thanos)
        params.extend(trigger.query_parameters)
        url = f"{trigger.server_address}/api/v1/query"
        try:
            async with self._http().get(
                url,
                params=params,
                headers=dict(trigger.custom_headers),
                ssl=not trigger.unsafe_ssl,
            ) as resp:
                text = await resp.text()
                if not 200 <= resp.status <= 299:
                    return Reading(None, f"HTTP {resp.status}: {_prometheus_error(text)}")
                try:
                    body = json.loads(text)
                except ValueError:
                    return Reading(None, f"not Prometheus' JSON: {_short(text)}")
        except TimeoutError:
            return Reading(None, f"no answer within {self.timeout_s:g} s from {url}")
        except aiohttp.ClientError as exc:
            return Reading(None, f"{type(exc).__name__}: {_short(str(exc)) or url}")
        return read_answer(body, trigger)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _prometheus_error(text: str) -> str:
    """Prometheus' own error message from an error answer, else the body's start."""
    try:
        body = json.loads(text)
    except ValueError:
        return _short(text) or "no body"
    if isinstance(body, dict) and body.get("error"):
        kind = body.get("errorType")
        return _short(f"{kind}: {body['error']}" if kind else str(body["error"]))
    return _short(text)


__all__ = ["QUERY_TIMEOUT_S", "PrometheusClient", "read_answer"]
