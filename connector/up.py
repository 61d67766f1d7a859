"""``dynamo-local up``: the composition root.

Wires, in order: OpenTelemetry (``exporter.tracing``), the connector (graph loaded,
circusd started, replicas adopted or started), the exporter, the HTTP app; then serves
until SIGINT/SIGTERM or ``POST /v1/shutdown``, and takes everything down in reverse order
so that no process is left behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from connector import defaults
from connector.api.context import CONTEXT, ApiSettings
from connector.errors import ConnectorError
from connector.local import ConnectorOptions, LocalConnector
from connector.server import RunningServer, create_app, is_loopback, loopback_hosts, start_server

log = logging.getLogger(__name__)


@dataclass
class UpConfig:
    graph: str
    namespace: str | None = None
    host: str = "127.0.0.1"
    port: int = 8787
    token: str | None = None
    auth_all: bool = False
    discovery: str = "file"
    etcd_url: str | None = None
    nats_url: str | None = None
    planner_executor: bool = False
    working_dir: Path | None = None
    gpu_backend: str = "auto"
    metrics: bool = True
    port_range: tuple[int, int] = defaults.PORT_RANGE
    gpu_foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES
    gpu_release_timeout_s: float = defaults.RELEASE_TIMEOUT_S

    def options(self) -> ConnectorOptions:
        return ConnectorOptions(
            discovery=self.discovery,
            etcd_url=self.etcd_url,
            nats_url=self.nats_url,
            planner_executor=self.planner_executor,
            gpu_backend=self.gpu_backend,
            port_range=self.port_range,
            gpu_foreign_memory_threshold_bytes=self.gpu_foreign_memory_threshold_bytes,
            gpu_release_timeout_s=self.gpu_release_timeout_s,
        )


class StartupError(Exception):
    """``up`` could not start; the message says what and why (exit code 1)."""


async def _load_connector(config: UpConfig) -> LocalConnector:
    from connector.graph_loader import load_graph

    graph = await asyncio.to_thread(load_graph, config.graph)
    if config.namespace:
        graph = graph.in_namespace(config.namespace)  # one namespace, everywhere
    return LocalConnector(graph.namespace, graph, config.working_dir, config.options())


def _install_signals(stop: asyncio.Event, out: Callable[[str], None]) -> Callable[[], None]:
    """SIGINT/SIGTERM set ``stop``; a second signal says shutdown is under way."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None  # embedded in a thread (tests): the caller stops us
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        if stop.is_set():
            out("dynamo-local: still stopping replicas, please wait")
            return
        out(f"dynamo-local: {signal.Signals(signum).name} received, shutting down")
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)

    def remove() -> None:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)

    return remove


class Stack:
    """What ``up`` started, so that it can be stopped in reverse order whatever failed."""

    def __init__(self) -> None:
        self.telemetry: Any = None
        self.connector: LocalConnector | None = None
        self.exporter: Any = None
        self.server: RunningServer | None = None

    async def close(self, out: Callable[[str], None]) -> None:
        """Stop in the order that keeps the API truthful: the server goes last, so a client
        (``dynamo-local down``) that sees it gone knows every replica is gone too."""
        if self.exporter is not None:
            with contextlib.suppress(Exception):
                await self.exporter.stop()
            self.exporter = None
        if self.connector is not None:
            running = len(self.connector.view().replicas)
            if running:
                out(f"dynamo-local: stopping {running} replica(s)")
            await self.connector.shutdown()
            self.connector = None
        if self.server is not None:
            await self.server.stop()
            self.server = None
        if self.telemetry is not None:
            with contextlib.suppress(Exception):
                await asyncio.to_thread(self.telemetry.shutdown)
            self.telemetry = None


def _build_exporter(connector: LocalConnector, telemetry: Any) -> Any:
    """The exporter over ``connector``; started once the connector runs. The connector
    reads its own usage numbers from it, so the API and ``/metrics`` agree."""
    from connector.usage import exporter_sources
    from exporter.service import build_exporter

    exporter = build_exporter(connector, **exporter_sources(connector))
    exporter.instrument_otel(telemetry.meter_provider)
    connector.set_metrics_source(exporter.component_metrics)
    return exporter


async def run_up(
    config: UpConfig,
    *,
    out: Callable[[str], None] = print,
    stop: asyncio.Event | None = None,
    on_listening: Callable[[RunningServer], None] | None = None,
) -> int:
    """Run until ``stop`` is set (signals and ``POST /v1/shutdown`` set it). Returns 0, or
    raises StartupError / ConnectorError with a one-line reason."""
    from exporter.tracing import TelemetryConfigError, setup_telemetry

    stop = stop or asyncio.Event()
    stack = Stack()
    remove_signals = _install_signals(stop, out)
    try:
        try:
            stack.telemetry = setup_telemetry()
        except TelemetryConfigError as exc:
            raise StartupError(f"OpenTelemetry settings: {exc}") from exc
        connector = await _load_connector(config)
        settings = ApiSettings(
            allowed_hosts=loopback_hosts(config.host) if is_loopback(config.host) else None
        )
        app = create_app(
            connector,
            token=config.token,
            auth_all=config.auth_all,
            request_shutdown=stop.set,
            settings=settings,
        )
        # Listen first: a busy port fails before any process is started. Until the
        # connector runs, the API answers 503 `starting` with Retry-After.
        try:
            stack.server = await start_server(app, config.host, config.port)
        except OSError as exc:
            raise StartupError(exc.strerror or str(exc)) from exc
        await connector.initialize()  # cleans up after itself when it fails
        stack.connector = connector
        if config.metrics:
            # Built after initialize: it samples the GPUs the connector opened.
            exporter = _build_exporter(connector, stack.telemetry)
            await exporter.start()
            stack.exporter = exporter
            app[CONTEXT].exporter = exporter
        _announce(connector, stack.server, config, out)
        if on_listening is not None:
            on_listening(stack.server)
        await stop.wait()
        out("dynamo-local: shutting down")
    finally:
        try:
            await stack.close(out)
        finally:
            remove_signals()
    out("dynamo-local: stopped")
    return 0


def _announce(
    connector: LocalConnector, server: RunningServer, config: UpConfig, out: Callable[[str], None]
) -> None:
    graph = connector.graph
    out(
        f"dynamo-local: graph {graph.name!r} ({len(graph.services)} components) in namespace "
        f"{connector.namespace!r}, working dir {connector.working_dir}"
    )
    out(f"  API          {server.url}/v1   (OpenAPI: {server.url}/openapi.json)")
    metrics = f"{server.url}/metrics" if config.metrics else "disabled"
    out(f"  metrics      {metrics}")
    out(f"  status page  {server.url}/")
    if config.token:
        scope = "every route" if config.auth_all else "mutating routes"
        out(f"  auth         bearer token required on {scope}")
    out("  Ctrl-C stops every replica and exits")


def describe_failure(exc: BaseException) -> str:
    """One line for a failed ``up``."""
    if isinstance(exc, ConnectorError):
        return exc.message
    if isinstance(exc, StartupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
