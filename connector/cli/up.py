"""``dynamo-local up``: the composition root.

Wires, in order: OpenTelemetry (``exporter.tracing``), the graph and the ScaledObjects
checked against it (:mod:`connector.policy`), a private etcd when the graph needs etcd and
none was named (:mod:`connector.dynamo.private_etcd`), the connector (circusd started, replicas
adopted or started, the policies' drivers), the exporter, the HTTP app; then serves
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
from connector.api.server import (
    RunningServer,
    create_app,
    is_loopback,
    loopback_hosts,
    start_server,
)
from connector.cli.heap import freeze_startup_heap
from connector.dynamo.frontend_hint import announce_when_serving, frontend_services
from connector.dynamo.private_etcd import PACKAGE, EtcdNotInstalled, PrivateEtcd, PrivateEtcdError
from connector.errors import ConnectorError
from connector.graph.model import Graph, Role
from connector.local import LocalConnector
from connector.options import ConnectorOptions, default_working_dir
from connector.policy.binding import BoundPolicy, bind
from connector.policy.scaledobject import ScaledObject, load_scaled_object

log = logging.getLogger(__name__)


@dataclass
class UpConfig:
    graph: str
    namespace: str | None = None
    host: str = "127.0.0.1"
    port: int = 8787
    token: str | None = None
    auth_all: bool = False
    # None (no --discovery): etcd when there is an etcd (--etcd-url or a private one),
    # else file.
    discovery: str | None = None
    etcd_url: str | None = None
    nats_url: str | None = None
    planner_executor: bool = False
    working_dir: Path | None = None
    gpu_backend: str = "auto"
    metrics: bool = True
    port_range: tuple[int, int] = defaults.PORT_RANGE
    gpu_foreign_memory_threshold_bytes: int = defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES
    gpu_release_timeout_s: float = defaults.RELEASE_TIMEOUT_S
    max_replicas: int | None = None  # None: defaults.replica_budget()
    log_max_bytes: int = defaults.LOG_MAX_BYTES
    log_backups: int = defaults.LOG_BACKUPS
    stopped_logs_kept: int = defaults.STOPPED_LOGS_KEPT
    scaledobjects: tuple[str, ...] = ()  # KEDA ScaledObject files, as named on the command line
    dry_run: bool = False  # the policies record what they would do, and never scale

    def options(
        self,
        graph: Graph | None = None,
        private_etcd_url: str | None = None,
        scaled_objects: tuple[ScaledObject, ...] = (),
    ) -> ConnectorOptions:
        etcd_url = self.etcd_url or private_etcd_url
        # A Planner in virtual mode waits forever for its decisions to be acknowledged:
        # with an etcd to read them from, the executor is always on for such a graph.
        executor = self.planner_executor or (
            etcd_url is not None and graph is not None and bool(_planners(graph))
        )
        return ConnectorOptions(
            discovery=self.discovery or ("etcd" if etcd_url else "file"),
            etcd_url=etcd_url,
            nats_url=self.nats_url,
            planner_executor=executor,
            gpu_backend=self.gpu_backend,
            port_range=self.port_range,
            gpu_foreign_memory_threshold_bytes=self.gpu_foreign_memory_threshold_bytes,
            gpu_release_timeout_s=self.gpu_release_timeout_s,
            max_replicas=self.max_replicas,
            log_max_bytes=self.log_max_bytes,
            log_backups=self.log_backups,
            stopped_logs_kept=self.stopped_logs_kept,
            scaled_objects=scaled_objects,
            policy_dry_run=self.dry_run,
        )


class StartupError(Exception):
    """``up`` could not start; the message says what and why (exit code 1)."""


async def _load_graph(config: UpConfig) -> Graph:
    from connector.graph.loader import load_graph

    graph = await asyncio.to_thread(load_graph, config.graph)
    if config.namespace:
        graph = graph.in_namespace(config.namespace)  # one namespace, everywhere
    return graph


def _planners(graph: Graph) -> list[str]:
    return [s.name for s in graph.services.values() if s.role is Role.PLANNER]


def _planner_driver(graph: Graph, config: UpConfig) -> str | None:
    """What will run the Planner executor (for the one-driver message); None: nothing."""
    planners = _planners(graph)
    if planners:
        return f"the Planner executor (always on for the graph's Planner service {planners[0]})"
    if config.planner_executor:
        return "the Planner executor (--planner-executor)"
    return None


async def _load_policies(
    graph: Graph, config: UpConfig, out: Callable[[str], None]
) -> tuple[BoundPolicy, ...]:
    """Read and check every ``--scaledobject`` file before anything starts: a file that
    asks for what cannot be honoured, or a component with two drivers, fails here."""
    scaled = [
        await asyncio.to_thread(load_scaled_object, Path(name), name)
        for name in config.scaledobjects
    ]
    bound = bind(graph, scaled, _planner_driver(graph, config))
    for so in scaled:
        for warning in so.warnings:
            out(f"dynamo-local: {warning}")
    return bound


def _why_etcd(graph: Graph, config: UpConfig) -> str | None:
    """Why this run needs an etcd (None: it does not)."""
    planners = _planners(graph)
    if planners:
        # Its virtual connector dials etcd whatever the discovery backend, and the
        # executor reads its decisions from there.
        return f"graph {graph.name!r} has a Planner (service {planners[0]}), which needs etcd"
    if config.discovery == "etcd":
        return "--discovery etcd needs etcd"
    if config.planner_executor:
        return "--planner-executor reads the Planner's decisions from etcd"
    return None


async def _private_etcd(
    graph: Graph, config: UpConfig, working_dir: Path, stack: Stack, out: Callable[[str], None]
) -> str | None:
    """Start a private etcd when this run needs one and no --etcd-url names one; its URL."""
    why = _why_etcd(graph, config)
    if config.etcd_url or why is None:
        return None
    etcd = PrivateEtcd(working_dir / "etcd")
    try:
        url = await etcd.start()
    except EtcdNotInstalled as exc:
        raise StartupError(
            f"{why}, and {exc}: install it (apt-get install {PACKAGE}) or pass --etcd-url URL"
        ) from exc
    except PrivateEtcdError as exc:
        raise StartupError(
            f"{why}, and a private etcd did not start: {exc}; or pass --etcd-url URL"
        ) from exc
    stack.etcd = etcd
    if etcd.reused:
        out(f"dynamo-local: using the private etcd a previous run left at {url}")
    else:
        out(f"dynamo-local: started a private etcd at {url} (data in {etcd.data_dir})")
    return url


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
        self.etcd: PrivateEtcd | None = None
        # A reused private etcd is ours to stop only once our connector took the namespace
        # (a second `up` of a running namespace finds the first one's etcd, then fails).
        self.etcd_owned = False
        self.connector: LocalConnector | None = None
        self.exporter: Any = None
        self.server: RunningServer | None = None
        self.hint: asyncio.Task[bool] | None = None

    async def close(self, out: Callable[[str], None]) -> None:
        """Stop in the order that keeps the API truthful: the server goes last, so a client
        (``dynamo-local down``) that sees it gone knows every replica is gone too. A
        private etcd goes after the replicas, which deregister from it as they stop."""
        if self.hint is not None:
            self.hint.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.hint
            self.hint = None
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
        if self.etcd is not None:
            if self.etcd_owned or not self.etcd.reused:
                try:
                    await self.etcd.stop()
                except Exception:
                    log.exception("stopping the private etcd (pid %s)", self.etcd.pid)
            self.etcd = None
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
    from exporter.embedded import exporter_sources
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
        graph = await _load_graph(config)
        policies = await _load_policies(graph, config, out)
        working_dir = (config.working_dir or default_working_dir(graph.namespace)).expanduser()
        etcd_url = await _private_etcd(graph, config, working_dir, stack, out)
        options = config.options(graph, etcd_url, tuple(p.scaled_object for p in policies))
        connector = LocalConnector(graph.namespace, graph, working_dir, options)
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
        # Listen first: a busy port fails before any replica is started (a private etcd
        # started above is stopped again). Until the connector runs, the API answers 503
        # `starting` with Retry-After.
        try:
            stack.server = await start_server(app, config.host, config.port)
        except OSError as exc:
            raise StartupError(exc.strerror or str(exc)) from exc
        await connector.initialize()  # cleans up after itself when it fails
        stack.connector = connector
        stack.etcd_owned = True
        if config.metrics:
            # Built after initialize: it samples the GPUs the connector opened.
            exporter = _build_exporter(connector, stack.telemetry)
            await exporter.start()
            stack.exporter = exporter
            app[CONTEXT].exporter = exporter
        freeze_startup_heap()  # what lives from here on is what the collector walks
        _announce(connector, stack.server, config, out, policies)
        # Once the graph serves: a curl that gets an answer from its frontend.
        stack.hint = asyncio.create_task(
            announce_when_serving(connector, frontend_services(connector.graph), out)
        )
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
    connector: LocalConnector,
    server: RunningServer,
    config: UpConfig,
    out: Callable[[str], None],
    policies: tuple[BoundPolicy, ...] = (),
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
    for p in policies:
        so = p.scaled_object
        mode = " (dry run: records what it would do, never scales)" if config.dry_run else ""
        out(
            f"  policy       {so.name} ({so.source}) drives {p.component} every "
            f"{so.polling_interval_s} s{mode}"
        )
    out("  Ctrl-C stops every replica and exits")


def describe_failure(exc: BaseException) -> str:
    """One line for a failed ``up``."""
    if isinstance(exc, ConnectorError):
        return exc.message
    if isinstance(exc, StartupError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"
