"""HTTP client of the dynamo-local API (what the CLI uses; usable from scripts).

    async with Client("http://127.0.0.1:8787", token=None) as api:
        await api.scale("Decode", 3, wait=True)

Errors are typed: :class:`ApiError` carries the server's ``code``, ``message`` and
``details``; :class:`Unreachable` means no server answered at the URL. :class:`SyncClient`
offers the same calls for code without an event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

import aiohttp

DEFAULT_URL = "http://127.0.0.1:8787"
URL_ENV = "DYNAMO_LOCAL_URL"
TOKEN_ENV = "DYNAMO_LOCAL_TOKEN"
USER_AGENT = "dynamo-local-cli/1"

T = TypeVar("T")


def default_url() -> str:
    return os.environ.get(URL_ENV) or DEFAULT_URL


def default_token() -> str | None:
    return os.environ.get(TOKEN_ENV) or None


class ApiError(Exception):
    """The server answered with an error body."""

    def __init__(self, status: int, code: str, message: str, details: dict[str, Any]) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.details = details


class Unreachable(Exception):
    """Nothing answered at the URL (refused, timed out, not HTTP)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"no dynamo-local server answers at {url}: {reason}")
        self.url = url
        self.reason = reason


def _error_from(status: int, text: str) -> ApiError:
    try:
        body = json.loads(text)
        error = body["error"]
        return ApiError(
            status, str(error["code"]), str(error["message"]), dict(error.get("details") or {})
        )
    except (ValueError, KeyError, TypeError):
        snippet = " ".join(text.split())[:200] or "(empty body)"
        return ApiError(status, f"http_{status}", f"HTTP {status}: {snippet}", {})


class Client:
    """Async client; one aiohttp session per instance."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self, accept: str = "application/json") -> dict[str, str]:
        headers = {"Accept": accept, "User-Agent": USER_AGENT}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        return self._session

    async def request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: dict[str, Any] | None = None,
        timeout_s: float | None = None,
        accept: str = "application/json",
    ) -> Any:
        """One call; returns decoded JSON (or text for non-JSON answers)."""
        query = {k: _query_value(v) for k, v in (params or {}).items() if v is not None}
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.timeout_s)
        try:
            async with self._open().request(
                method,
                self.url + path,
                params=query,
                json=body,
                headers=self._headers(accept),
                timeout=timeout,
            ) as response:
                text = await response.text()
                if response.status >= 400:
                    raise _error_from(response.status, text)
                if response.content_type == "application/json":
                    return json.loads(text)
                return text
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(self.url, str(exc.os_error.strerror or exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
            raise Unreachable(self.url, str(exc) or type(exc).__name__) from exc
        except TimeoutError as exc:
            raise Unreachable(
                self.url, f"no answer to {method} {path} within {timeout.total:g} s"
            ) from exc
        except aiohttp.InvalidURL as exc:
            raise Unreachable(self.url, "not a valid URL") from exc

    # ----------------------------------------------------------------- reading

    async def components(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/components")
        return result

    async def component(self, name: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/components/{_seg(name)}")
        return result

    async def replicas(self, name: str) -> dict[str, Any]:
        path = f"/v1/components/{_seg(name)}/replicas"
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def logs(
        self, name: str, lines: int = 100, replica: str | None = None, stream: str = "both"
    ) -> list[str]:
        result = await self.request(
            "GET",
            f"/v1/components/{_seg(name)}/logs",
            params={"lines": lines, "replica": replica, "stream": stream},
        )
        return list(result["lines"])

    async def metrics(self, name: str) -> dict[str, Any]:
        path = f"/v1/components/{_seg(name)}/metrics"
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def component_resources(self, name: str) -> dict[str, Any]:
        path = f"/v1/components/{_seg(name)}/resources"
        result: dict[str, Any] = await self.request("GET", path)
        return result

    async def topology(self, fmt: str = "json") -> Any:
        accept = "application/json" if fmt == "json" else "text/plain, text/vnd.graphviz"
        return await self.request("GET", "/v1/topology", params={"format": fmt}, accept=accept)

    async def prefill_queue(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/prefill-queue")
        return result

    async def resources(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/resources")
        return result

    async def events(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        result: dict[str, Any] = await self.request(
            "GET", "/v1/events", params={"since": since, "limit": limit}
        )
        return result

    async def health(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/healthz")
        return result

    async def ready(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/readyz")
        return result

    # ---------------------------------------------------------------- changing

    async def scale(
        self, name: str, replicas: int, wait: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"replicas": replicas, "wait": wait}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        result: dict[str, Any] = await self.request(
            "PUT",
            f"/v1/components/{_seg(name)}/replicas",
            body=body,
            timeout_s=_wait_budget(wait, timeout_s, self.timeout_s),
        )
        return result

    async def restart(
        self, name: str, wait: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"wait": wait}
        if timeout_s is not None:
            body["timeout_s"] = timeout_s
        result: dict[str, Any] = await self.request(
            "POST",
            f"/v1/components/{_seg(name)}/restart",
            body=body,
            timeout_s=_wait_budget(wait, timeout_s, self.timeout_s),
        )
        return result

    async def shutdown(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("POST", "/v1/shutdown")
        return result

    # ------------------------------------------------------------- experiments

    async def start_experiment(self, plan: dict[str, Any]) -> dict[str, Any]:
        """``POST /v1/experiments``: the plan document (the YAML plan's shape) runs on the
        server; the answer is the run (``id``, ``state``, ``folder``, ...)."""
        result: dict[str, Any] = await self.request("POST", "/v1/experiments", body=plan)
        return result

    async def experiments(self) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/experiments")
        return result

    async def experiment(self, run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", f"/v1/experiments/{_seg(run_id)}")
        return result

    async def cancel_experiment(self, run_id: str) -> dict[str, Any]:
        """Cancel a running experiment; answers once aiperf stopped and the folder is written
        (the server waits up to 45 s)."""
        result: dict[str, Any] = await self.request(
            "DELETE", f"/v1/experiments/{_seg(run_id)}", timeout_s=max(self.timeout_s, 60.0)
        )
        return result

    async def experiment_report(self, run_id: str) -> str:
        text: str = await self.request(
            "GET", f"/v1/experiments/{_seg(run_id)}/report", accept="text/html"
        )
        return text

    async def timeline(self, since: int = 0) -> dict[str, Any]:
        result: dict[str, Any] = await self.request("GET", "/v1/timeline", params={"since": since})
        return result

    # ------------------------------------------------------------------ stream

    async def stream_events(self, since: int | None = None) -> AsyncIterator[dict[str, Any]]:
        """Live events from ``GET /v1/events`` (SSE). Ends when the server shuts down;
        yields ``{"kind": "_overflow"}`` if the server dropped this slow client."""
        params = {"since": since} if since is not None else {}
        timeout = aiohttp.ClientTimeout(total=None, connect=self.timeout_s, sock_read=None)
        try:
            async with self._open().get(
                self.url + "/v1/events",
                params=params,
                headers=self._headers("text/event-stream"),
                timeout=timeout,
            ) as response:
                if response.status >= 400:
                    raise _error_from(response.status, await response.text())
                async for message in _sse_messages(response.content):
                    kind, data = message
                    if kind == "shutdown":
                        return
                    if kind == "overflow":
                        yield {"kind": "_overflow", **data}
                        return
                    if kind == "message":
                        yield data
        except aiohttp.ClientConnectorError as exc:
            raise Unreachable(self.url, str(exc.os_error.strerror or exc)) from exc
        except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
            raise Unreachable(self.url, "the server closed the event stream") from exc


async def _sse_messages(
    content: aiohttp.StreamReader,
) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    kind: str = "message"
    data: list[str] = []
    async for raw in content:
        line = raw.decode("utf-8").rstrip("\r\n")
        if not line:
            if data:
                yield kind, json.loads("\n".join(data))
            kind, data = "message", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            kind = value
        elif field == "data":
            data.append(value)


def _seg(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")


def _query_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _wait_budget(wait: bool, timeout_s: float | None, default: float) -> float:
    """The HTTP timeout of a call that may wait on the server: its wait plus a margin."""
    if not wait:
        return default
    return (timeout_s if timeout_s is not None else 300.0) + default


class SyncClient:
    """The async client's calls, run on a private event loop (for scripts and tests)."""

    def __init__(
        self, url: str | None = None, token: str | None = None, timeout_s: float = 30.0
    ) -> None:
        self._runner = asyncio.Runner()
        self.client = Client(url, token, timeout_s)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._runner.run(self.client.close())
        self._runner.close()

    def run(self, call: Callable[[Client], Awaitable[T]]) -> T:
        async def go() -> T:
            return await call(self.client)

        return self._runner.run(go())

    def components(self) -> dict[str, Any]:
        return self.run(lambda c: c.components())

    def component(self, name: str) -> dict[str, Any]:
        return self.run(lambda c: c.component(name))

    def scale(
        self, name: str, replicas: int, wait: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any]:
        return self.run(lambda c: c.scale(name, replicas, wait, timeout_s))

    def restart(
        self, name: str, wait: bool = False, timeout_s: float | None = None
    ) -> dict[str, Any]:
        return self.run(lambda c: c.restart(name, wait, timeout_s))

    def logs(
        self, name: str, lines: int = 100, replica: str | None = None, stream: str = "both"
    ) -> list[str]:
        return self.run(lambda c: c.logs(name, lines, replica, stream))

    def events(self, since: int = 0, limit: int | None = None) -> dict[str, Any]:
        return self.run(lambda c: c.events(since, limit))

    def shutdown(self) -> dict[str, Any]:
        return self.run(lambda c: c.shutdown())
