"""Real servers for tests: etcd, NATS with JetStream, Prometheus and circusd.

Each server runs as a child process on free loopback ports inside the test's temporary
folder, and is stopped again by its process tree (SIGTERM, then SIGKILL, then reaped),
never by name, so parallel sessions on the same machine never touch each other's servers.
A server that does not come up fails the test with the tail of its log in the message.

The classes (:class:`EtcdServer`, :class:`NatsServer`, :class:`PrometheusServer`,
:class:`CircusdServer`) can be used directly (``start()`` / ``stop()``); the fixtures wrap
them with function scope. Loaded by ``tests/conftest.py`` as a pytest plugin.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import inspect
import json
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, overload

import aiohttp
import psutil
import pytest

from connector.dynamo.private_etcd import etcd_argv

LOOPBACK = "127.0.0.1"
T = TypeVar("T")
START_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 5.0
LOG_TAIL_LINES = 40
# A port picked by free_port() can be taken by someone else before the server binds it;
# a server that then dies with "address already in use" is started again on new ports.
START_ATTEMPTS = 3


class ServerStartError(RuntimeError):
    """A server did not come up; the message holds the reason and the tail of its log."""


def spawn(
    argv: Sequence[str], *, cwd: Path, log_path: Path, env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """Start ``argv`` in its own session, dying with this process, output to ``log_path``."""
    with log_path.open("ab") as log:
        return subprocess.Popen(
            _die_with_parent(list(argv)),
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_ready(
    proc: subprocess.Popen[bytes],
    name: str,
    *,
    log_path: Path,
    ready: Callable[[], bool],
    timeout: float,
    error: type[Exception],
    fatal: type[Exception] | None = None,
    interval: float = 0.02,
    tail: Callable[[Path], str] | None = None,
) -> None:
    """Poll ``ready`` until it answers true. An exit meanwhile, whatever its code, or the
    deadline stops the process tree and raises ``error`` with the log's tail; ``ready``
    raising ``fatal`` does the same at once; any other exception counts as not ready.
    ``tail`` renders the log's tail for those errors (default: :func:`log_tail`)."""
    last = tail or log_tail
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise error(
                f"{name} exited with code {code} while starting; "
                f"log tail ({log_path}):\n{last(log_path)}"
            )
        try:
            if ready():
                return
        except Exception as exc:
            if fatal is not None and isinstance(exc, fatal):
                stop_process_tree(proc)
                raise error(f"{name}: {exc}; log tail ({log_path}):\n{last(log_path)}") from None
        if time.monotonic() >= deadline:
            stop_process_tree(proc)
            raise error(
                f"{name} was not ready within {timeout} s; log tail ({log_path}):\n{last(log_path)}"
            )
        time.sleep(interval)


# --------------------------------------------------------------------------- helpers


# Ports the tests hand out by default: under the connector's replica range (20000-29999)
# and outside the kernel's ephemeral range (32768-60999 here), where a port found free by
# bind(0) can be taken a moment later as the source port of anybody's outgoing connection
# (a real flake: a mock worker's /metrics port taken between the pick and its bind).
TEST_PORTS = (10000, 19999)
# Ports handed out lately: two picks in a row (a server's client and peer ports) must
# differ even before either is bound.
_HANDED: collections.deque[int] = collections.deque(maxlen=512)


def free_port(below: int | None = None) -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, picked at random and
    tried by binding: from :data:`TEST_PORTS`, or with ``below`` only ports under that number
    (e.g. 32768: ai-dynamo-runtime 1.6.1 reads ``DYN_SYSTEM_PORT`` as a signed 16-bit
    number)."""
    low, high = TEST_PORTS if below is None else (max(1024, below // 2), below - 1)
    rng = random.Random()
    for _ in range(200):
        candidate = rng.randint(low, high)
        if candidate in _HANDED:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((LOOPBACK, candidate))
            except OSError:
                continue
        _HANDED.append(candidate)
        return candidate
    raise RuntimeError(f"no free loopback port in {low}-{high}")


def wait_until(predicate: Callable[[], T], timeout: float = 10.0, interval: float = 0.05) -> T:
    """Poll ``predicate`` until it returns something truthy; return that value.

    Raises :class:`TimeoutError` after ``timeout`` seconds. Exceptions from the predicate
    count as "not yet" and the last one is named in the error.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"condition not met within {timeout} s{why}")
        time.sleep(interval)


@overload
async def wait_until_async(
    predicate: Callable[[], Awaitable[T]], timeout: float = ..., interval: float = ...
) -> T: ...
@overload
async def wait_until_async(
    predicate: Callable[[], T], timeout: float = ..., interval: float = ...
) -> T: ...
async def wait_until_async(
    predicate: Callable[[], Any], timeout: float = 10.0, interval: float = 0.05
) -> Any:
    """:func:`wait_until` for async tests; ``predicate`` may be sync or async."""
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while True:
        try:
            value = predicate()
            if inspect.isawaitable(value):
                value = await value
        except Exception as exc:
            last_error = exc
        else:
            if value:
                return value
        if time.monotonic() >= deadline:
            why = f" (last error: {last_error!r})" if last_error else ""
            raise TimeoutError(f"condition not met within {timeout} s{why}")
        await asyncio.sleep(interval)


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    return "\n".join(text.splitlines()[-lines:])


def _die_with_parent(argv: list[str]) -> list[str]:
    # If pytest itself is killed, its servers go too instead of living on as orphans.
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", *argv] if setpriv else argv


def stop_process_tree(proc: subprocess.Popen[bytes], timeout: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process and every descendant, SIGKILL what is left, reap the child.

    Descendants are collected before anything is signalled, so children reparented when
    their parent dies are still found by PID (with their create time, so a recycled PID is
    never hit).
    """
    try:
        root = psutil.Process(proc.pid)
        tree = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        tree = []
    for p in tree:
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    psutil.wait_procs(alive, timeout=timeout)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


# --------------------------------------------------------------------------- base


@dataclass
class ServerProcess:
    """A server child process with its log file in ``workdir``."""

    name: str
    workdir: Path
    proc: subprocess.Popen[bytes] | None = field(default=None, init=False)
    log_path: Path = field(init=False)

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def argv(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """One cheap readiness check; exceptions count as not ready."""
        raise NotImplementedError

    def pick_ports(self) -> None:
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        for attempt in range(1, START_ATTEMPTS + 1):
            self.pick_ports()
            try:
                self._start_once(timeout)
                return
            except ServerStartError as exc:
                if attempt == START_ATTEMPTS or "address already in use" not in str(exc):
                    raise

    def _start_once(self, timeout: float) -> None:
        self.proc = spawn(self.argv(), cwd=self.workdir, log_path=self.log_path)
        try:
            wait_ready(
                self.proc,
                self.name,
                log_path=self.log_path,
                ready=self.ready,
                timeout=timeout,
                error=ServerStartError,
            )
        except ServerStartError:
            self.proc = None
            raise

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_tree(self.proc)
            self.proc = None

    def __enter__(self) -> ServerProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _started(server: ServerProcess) -> None:
    """Start ``server``, failing the test (not erroring it) with the reason and log tail."""
    try:
        server.start()
    except ServerStartError as exc:
        pytest.fail(str(exc), pytrace=False)


ServerT = TypeVar("ServerT", bound=ServerProcess)


def _serving(server: ServerT) -> Iterator[ServerT]:
    """Fixture body: start ``server``, hand it to the test, stop it afterwards."""
    _started(server)
    try:
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- etcd


class EtcdServer(ServerProcess):
    """Debian's etcd 3.4, single member, tuned to elect itself leader in ~100 ms."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("etcd", workdir)
        self.host = LOOPBACK
        self.port = 0
        self.peer_port = 0

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def pick_ports(self) -> None:
        self.port, self.peer_port = free_port(), free_port()

    def argv(self) -> list[str]:
        peer = f"http://{LOOPBACK}:{self.peer_port}"
        return etcd_argv("etcd", "test", self.workdir / "data", self.url, peer)

    def ready(self) -> bool:
        status, body = _http_get(f"{self.url}/health")
        return status == 200 and json.loads(body).get("health") == "true"


# --------------------------------------------------------------------------- NATS


class NatsServer(ServerProcess):
    """nats-server with JetStream (``-js``), its store in the test's folder."""

    def __init__(self, workdir: Path) -> None:
        super().__init__("nats", workdir)
        self.host = LOOPBACK
        self.port = 0

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    def pick_ports(self) -> None:
        self.port = free_port()

    def argv(self) -> list[str]:
        return [
            "nats-server",
            "-js",
            "-a",
            self.host,
            "-p",
            str(self.port),
            "-sd",
            str(self.workdir / "jetstream"),
        ]

    def ready(self) -> bool:
        # The server greets every connection with an INFO line; JetStream is on once it
        # says so there.
        with socket.create_connection((self.host, self.port), timeout=1.0) as s:
            line = s.makefile("rb").readline()
        if not line.startswith(b"INFO "):
            return False
        return bool(json.loads(line[5:]).get("jetstream"))


# --------------------------------------------------------------------------- Prometheus


class PrometheusServer(ServerProcess):
    """Prometheus with a generated config scraping ``scrape_targets``.

    A target is ``host:port`` (scraped at ``/metrics``) or a URL such as
    ``http://127.0.0.1:8000/custom/metrics``. ``config_text``, when given, replaces the
    generated configuration entirely.
    """

    def __init__(
        self,
        workdir: Path,
        scrape_targets: Sequence[str],
        rule_files: Sequence[str | Path] = (),
        scrape_interval: str = "1s",
        config_text: str | None = None,
    ) -> None:
        super().__init__("prometheus", workdir)
        self.host = LOOPBACK
        self.port = 0
        self.config_path = workdir / "prometheus.yml"
        text = config_text or self._generate(scrape_targets, rule_files, scrape_interval)
        self.config_path.write_text(text)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @staticmethod
    def _generate(targets: Sequence[str], rule_files: Sequence[str | Path], interval: str) -> str:
        # One job per (scheme, metrics path), so URL targets with other paths work too.
        jobs: dict[tuple[str, str], list[str]] = {}
        for target in targets:
            if "://" in target:
                parts = urllib.parse.urlsplit(target)
                key = (parts.scheme, parts.path or "/metrics")
                jobs.setdefault(key, []).append(parts.netloc)
            else:
                jobs.setdefault(("http", "/metrics"), []).append(target)
        config: dict[str, Any] = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(Path(f).resolve()) for f in rule_files],
            "scrape_configs": [
                {
                    "job_name": f"job{i}",
                    "scheme": scheme,
                    "metrics_path": path,
                    "static_configs": [{"targets": hosts}],
                }
                for i, ((scheme, path), hosts) in enumerate(sorted(jobs.items()))
            ],
        }
        return json.dumps(config, indent=2)  # JSON is YAML

    def pick_ports(self) -> None:
        self.port = free_port()

    def argv(self) -> list[str]:
        return [
            "prometheus",
            f"--config.file={self.config_path}",
            f"--storage.tsdb.path={self.workdir / 'data'}",
            f"--web.listen-address={self.host}:{self.port}",
            "--web.enable-lifecycle",
            "--log.level=warn",
        ]

    def ready(self) -> bool:
        status, _ = _http_get(f"{self.url}/-/ready")
        return status == 200

    async def _api(self, path: str, **params: str) -> Any:
        # Async, so a /metrics the test serves on its own loop keeps answering scrapes.
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{self.url}{path}", params=params) as resp,
        ):
            body = await resp.json()
        if body.get("status") != "success":
            raise AssertionError(f"Prometheus {path} {params} failed: {body}")
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the ``result`` list (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = await self._api("/api/v1/query", query=expr)
        result: list[dict[str, Any]] = data["result"]
        return result

    async def targets(self) -> list[dict[str, Any]]:
        data = await self._api("/api/v1/targets")
        active: list[dict[str, Any]] = data["activeTargets"]
        return active

    async def wait_for(self, expr: str, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Poll ``expr`` until it returns a non-empty result, and return it.

        The first scrape is queryable only 5-6 s after start even at a 1 s interval, so the
        default deadline is generous. On timeout the message names the targets' health.
        """
        deadline = time.monotonic() + timeout
        while True:
            result = await self.query(expr)
            if result:
                return result
            if time.monotonic() >= deadline:
                targets = [
                    {k: t.get(k) for k in ("scrapeUrl", "health", "lastError")}
                    for t in await self.targets()
                ]
                raise AssertionError(
                    f"Prometheus query {expr!r} stayed empty for {timeout} s; targets: {targets}"
                )
            await asyncio.sleep(0.25)


# --------------------------------------------------------------------------- circusd


class CircusdServer(ServerProcess):
    """A real ``circusd`` from the virtualenv, controlled over tcp://127.0.0.1."""

    def __init__(self, workdir: Path, check_delay: float = 1.0) -> None:
        super().__init__("circusd", workdir)
        self.control_port = 0
        self.pubsub_port = 0
        self.check_delay = check_delay
        self.config_path = workdir / "circus.ini"

    @property
    def endpoint(self) -> str:
        return f"tcp://{LOOPBACK}:{self.control_port}"

    @property
    def pubsub_endpoint(self) -> str:
        return f"tcp://{LOOPBACK}:{self.pubsub_port}"

    def pick_ports(self) -> None:
        self.control_port, self.pubsub_port = free_port(), free_port()
        self.config_path.write_text(
            "[circus]\n"
            f"endpoint = {self.endpoint}\n"
            f"pubsub_endpoint = {self.pubsub_endpoint}\n"
            "statsd = False\n"
            f"check_delay = {self.check_delay}\n"
        )

    def argv(self) -> list[str]:
        circusd = Path(sys.executable).parent / "circusd"
        return [str(circusd), "--log-level", "warning", str(self.config_path)]

    def call(self, command: str, timeout: float = 2.0, **properties: Any) -> dict[str, Any]:
        """One synchronous command on the control endpoint (blocking: not for the loop)."""
        from circus.client import CircusClient

        client = CircusClient(endpoint=self.endpoint, timeout=timeout)
        try:
            reply: dict[str, Any] = client.call({"command": command, "properties": properties})
        finally:
            client.stop()
        return reply

    def ready(self) -> bool:
        return self.call("list", timeout=0.5).get("status") == "ok"


# --------------------------------------------------------------------------- fixtures


@pytest.fixture
def etcd_server(tmp_path: Path) -> Iterator[EtcdServer]:
    yield from _serving(EtcdServer(tmp_path / "etcd"))


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    yield from _serving(NatsServer(tmp_path / "nats"))


PrometheusFactory = Callable[..., PrometheusServer]


@pytest.fixture
def prometheus_server(tmp_path: Path) -> Iterator[PrometheusFactory]:
    """A factory: ``start(scrape_targets, rule_files=(), scrape_interval="1s",
    config_text=None) -> PrometheusServer``. Every server it started is stopped after the
    test."""
    started: list[PrometheusServer] = []

    def start(
        scrape_targets: Sequence[str],
        rule_files: Sequence[str | Path] = (),
        scrape_interval: str = "1s",
        config_text: str | None = None,
    ) -> PrometheusServer:
        workdir = tmp_path / f"prometheus{len(started)}"
        workdir.mkdir(parents=True, exist_ok=True)
        server = PrometheusServer(workdir, scrape_targets, rule_files, scrape_interval, config_text)
        started.append(server)
        _started(server)
        return server

    try:
        yield start
    finally:
        for server in started:
            server.stop()


@pytest.fixture
def circusd_server(tmp_path: Path) -> Iterator[CircusdServer]:
    yield from _serving(CircusdServer(tmp_path / "circusd"))


__all__ = [
    "CircusdServer",
    "EtcdServer",
    "NatsServer",
    "PrometheusServer",
    "ServerProcess",
    "ServerStartError",
    "free_port",
    "log_tail",
    "stop_process_tree",
    "wait_until",
    "wait_until_async",
]
