"""Real Dynamo 1.6.1 processes for tests: the environment, the tiny model, start and stop.

The real ``dynamo.frontend`` and ``dynamo.mocker`` (from the ``ai-dynamo`` wheels that
``scripts/setup.sh`` installs) run as child processes on loopback, discover each other
through a real etcd (:class:`tests.servers.EtcdServer`) and serve the tiny local model of
:mod:`connector.dynamo.tiny_model`, so no GPU, hub or network is needed. What this module knows
about them (verified on 1.6.1):

* Every listener must be pinned to loopback by environment (:func:`dynamo_env`): without
  ``DYN_TCP_RPC_HOST`` the request plane binds and advertises the host's main address.
  The ZMQ event-plane sockets still bind 0.0.0.0 (only their advertised address follows
  ``DYN_EVENT_PLANE_HOST``); no setting changes that.
* A worker's ``/metrics`` exists only when ``DYN_SYSTEM_PORT`` is set; 1.6.1 reads it as a
  signed 16-bit number, so it must be below 32768. If that port is taken the worker logs
  an error and runs on *without* it, so readiness checks that the port is held by the
  worker's own PID (another process's ``/metrics`` could otherwise pass for it).
* A worker is ready once its instance key ``v1/instances/{ns}/{component}/generate/{hex}``
  is in etcd and the key's transport address (``tcp: "127.0.0.1:PORT/{hex}/..."``) is a
  port the worker's PID listens on: that ties a discovery entry to a process.
* The frontend is ready once ``/v1/models`` lists the model; its ``--http-host`` defaults to
  0.0.0.0, so it is always given.
* A worker whose request-plane port is taken exits with code 0 (the error is only logged),
  so "exited" is a failure whatever the code.

Processes are stopped by PID, their whole tree: SIGTERM, then SIGKILL after a deadline
(:func:`tests.servers.stop_process_tree`); never by name.

Fixtures (registered as a plugin by ``tests/conftest.py``): ``tiny_model`` (session scope:
the model folder, written once) and ``dynamo`` (a :class:`DynamoLauncher` whose processes
are all stopped after the test).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from connector.dynamo.tiny_model import write_tiny_model
from tests.servers import (
    LOOPBACK,
    STOP_TIMEOUT_S,
    free_port,
    log_tail,
    spawn,
    stop_process_tree,
    wait_ready,
)

# The model name the tiny model is served under (its folder name too).
TINY_MODEL_NAME = "tiny-llama"
# Cold starts take ~0.6 s each on an idle machine; a loaded 2-core test machine is slower.
START_TIMEOUT_S = 60.0
# Port collisions (a free port taken before the process binds it) are retried this often.
START_ATTEMPTS = 3
# DYN_SYSTEM_PORT is an i16 in ai-dynamo-runtime 1.6.1.
SYSTEM_PORT_BELOW = 32768
_ANSI = re.compile(r"\x1b\[[0-9;]*m")

# Environment a developer's shell or CI may set that would point a test's Dynamo process at
# another deployment (or make it bind elsewhere): never inherited.
_INHERITED_PREFIXES = ("DYN_", "ETCD_", "NATS_", "HF_", "TRANSFORMERS_")


def dynamo_missing() -> str | None:
    """Why the real Dynamo cannot run here, or ``None`` when it can."""
    for module in ("dynamo.frontend", "dynamo.mocker", "tokenizers"):
        try:
            found = importlib.util.find_spec(module) is not None
        except ImportError:  # a parent package that is not there
            found = False
        if not found:
            return f"{module} is not installed (scripts/setup.sh installs the real Dynamo)"
    return None


def require_dynamo() -> None:
    """Skip the calling test, saying why, where the real Dynamo is not installed."""
    reason = dynamo_missing()
    if reason:
        pytest.skip(reason)


def dynamo_env(
    namespace: str,
    etcd_url: str,
    *,
    system_port: int | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The environment of a Dynamo process of ``namespace`` on loopback, discovering through
    the etcd at ``etcd_url``, offline (no hub), with ``/metrics`` on ``system_port`` if given.
    ``extra`` is applied last."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED_PREFIXES)}
    env.update(
        {
            "DYN_NAMESPACE": namespace,
            "DYN_DISCOVERY_BACKEND": "etcd",
            "ETCD_ENDPOINTS": etcd_url,
            "DYN_TCP_RPC_HOST": LOOPBACK,
            "DYN_TCP_RESPONSE_STREAM_HOST": LOOPBACK,
            "DYN_EVENT_PLANE_HOST": LOOPBACK,
            "DYN_SYSTEM_HOST": LOOPBACK,
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
        }
    )
    if system_port is not None:
        env["DYN_SYSTEM_PORT"] = str(system_port)
    env.update(extra or {})
    return env


# --------------------------------------------------------------------------- etcd


def etcd_prefix(etcd_url: str, prefix: str, timeout: float = 2.0) -> dict[str, bytes]:
    """Every key under ``prefix`` with its value, through etcd's JSON gateway (sync: usable
    from any test without an etcd client or event loop)."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = json.dumps(
        {
            "key": base64.b64encode(prefix.encode()).decode(),
            "range_end": base64.b64encode(end.encode()).decode(),
        }
    ).encode()
    request = urllib.request.Request(f"{etcd_url}/v3/kv/range", data=body, method="POST")
    with urllib.request.urlopen(request, timeout=timeout) as resp:
        answer = json.loads(resp.read())
    return {
        base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
        for kv in answer.get("kvs", [])
    }


@dataclass(frozen=True)
class Instance:
    """One ``v1/instances/{ns}/{component}/{endpoint}/{hex}`` entry."""

    key: str
    instance_id: int
    host: str
    port: int
    value: dict[str, Any]


def instances(
    etcd_url: str, namespace: str, component: str, endpoint: str = "generate"
) -> list[Instance]:
    """The registered instances of one endpoint, with the request-plane address each
    advertises (``transport.tcp`` is ``host:port/{hex}/{ns}/{component}/{endpoint}``)."""
    found = []
    prefix = f"v1/instances/{namespace}/{component}/{endpoint}/"
    for key, raw in etcd_prefix(etcd_url, prefix).items():
        value = json.loads(raw)
        address = value.get("transport", {}).get("tcp", "").split("/", 1)[0]
        host, _, port = address.rpartition(":")
        found.append(Instance(key, int(key.rsplit("/", 1)[1], 16), host, int(port or 0), value))
    return found


# --------------------------------------------------------------------------- processes


def listening(pid: int) -> set[tuple[str, int]]:
    """``(address, port)`` of every TCP socket that ``pid`` or a descendant listens on."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return set()
    found = set()
    for proc in procs:
        with contextlib.suppress(psutil.Error):
            for conn in proc.net_connections(kind="tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr:
                    found.add((conn.laddr.ip, conn.laddr.port))
    return found


def _http_get(url: str, timeout: float = 1.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


class DynamoStartError(RuntimeError):
    """A Dynamo process did not come up; the message holds the reason and its log tail."""


@dataclass
class DynamoProcess:
    """One Dynamo process (``python -m dynamo.<module> ...``) with its log in ``workdir``."""

    name: str
    argv: list[str]
    env: dict[str, str]
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

    def log_tail(self) -> str:
        # Dynamo colours its log even into a file (NO_COLOR is not honoured); the tail
        # lands in assertion messages, so without the escape codes.
        return _ANSI.sub("", log_tail(self.log_path))

    def ready(self) -> bool:
        """One cheap readiness check; exceptions count as not ready, except
        :class:`DynamoStartError`, which fails the start at once."""
        raise NotImplementedError

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Start and wait until :meth:`ready`; an exit meanwhile (with any code: a worker
        whose port is taken exits 0) or the deadline stops it and raises
        :class:`DynamoStartError`."""
        self.proc = spawn(self.argv, cwd=self.workdir, log_path=self.log_path, env=self.env)
        try:
            wait_ready(
                self.proc,
                self.name,
                log_path=self.log_path,
                ready=self.ready,
                timeout=timeout,
                error=DynamoStartError,
                fatal=DynamoStartError,
                interval=0.05,
                tail=lambda path: _ANSI.sub("", log_tail(path)),
            )
        except DynamoStartError:
            self.proc = None
            raise

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM the process tree, SIGKILL what is left after ``timeout``, reap it."""
        if self.proc is not None:
            stop_process_tree(self.proc, timeout=timeout)
            self.proc = None

    def listening(self) -> set[tuple[str, int]]:
        return listening(self.pid) if self.proc is not None else set()


@dataclass
class Worker(DynamoProcess):
    """A ``dynamo.mocker`` process."""

    namespace: str = ""
    component: str = "backend"
    etcd_url: str = ""
    system_port: int | None = None

    def own_instances(self) -> list[Instance]:
        """Its entries in etcd: those whose advertised port this process listens on."""
        ports = {port for _, port in self.listening()}
        return [
            i for i in instances(self.etcd_url, self.namespace, self.component) if i.port in ports
        ]

    def ready(self) -> bool:
        # A taken system port is only logged (the worker runs on without /metrics): the
        # port must be this process's own, and the log line ends the wait at once.
        if self.system_port is not None and (LOOPBACK, self.system_port) not in self.listening():
            address = f"{LOOPBACK}:{self.system_port}"
            if f"Failed to bind to address {address}" in self.log_tail():
                raise DynamoStartError(f"system port {address}: address already in use")
            return False
        return bool(self.own_instances())

    @property
    def metrics_url(self) -> str:
        if self.system_port is None:
            raise RuntimeError(f"{self.name} was started without a system port")
        return f"http://{LOOPBACK}:{self.system_port}/metrics"


@dataclass
class Frontend(DynamoProcess):
    """A ``dynamo.frontend`` process."""

    http_port: int = 0
    model_name: str = TINY_MODEL_NAME

    def ready(self) -> bool:
        return self.model_name in self.models()

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.http_port}"

    def models(self) -> list[str]:
        status, body = _http_get(f"{self.url}/v1/models")
        if status != 200:
            return []
        return [m["id"] for m in json.loads(body).get("data", [])]


def _port_taken(exc: DynamoStartError, port: int | None) -> bool:
    """Whether a failed start was (probably) a port someone else took after it was picked:
    the process said so, or (a taken system port is only logged) the port is busy now
    that the process is gone."""
    if "address already in use" in str(exc).lower():
        return True
    if port is None:
        return False
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        # As servers bind: TIME_WAIT connections of the stopped process do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((LOOPBACK, port))
        except OSError:
            return True
    return False


class DynamoLauncher:
    """Starts real Dynamo processes for one test in ``workdir`` and stops them all at the
    end (:meth:`stop_all`, called by the ``dynamo`` fixture)."""

    def __init__(self, workdir: Path, model_path: Path) -> None:
        self.workdir = workdir
        self.model_path = model_path
        self.started: list[DynamoProcess] = []

    def mocker(
        self,
        namespace: str,
        etcd_url: str,
        *,
        mode: str = "agg",
        model_name: str = TINY_MODEL_NAME,
        system_port: bool = True,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> Worker:
        """A mocker in ``mode`` (agg, prefill or decode), ready once registered in etcd
        (agg and decode register as component ``backend``, prefill as ``prefill``), with
        ``/metrics`` on a free system port unless ``system_port`` is false."""
        component = "prefill" if mode == "prefill" else "backend"
        index = len(self.started)
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port(below=SYSTEM_PORT_BELOW) if system_port else None
            worker = Worker(
                name=f"mocker-{mode}-{index}",
                argv=[
                    sys.executable,
                    "-m",
                    "dynamo.mocker",
                    "--model-path",
                    str(self.model_path),
                    "--model-name",
                    model_name,
                    "--disaggregation-mode",
                    mode,
                    *args,
                ],
                env=dynamo_env(namespace, etcd_url, system_port=port, extra=env),
                workdir=self.workdir / f"mocker-{mode}-{index}",
                namespace=namespace,
                component=component,
                etcd_url=etcd_url,
                system_port=port,
            )
            self.started.append(worker)
            try:
                worker.start(timeout)
                return worker
            except DynamoStartError as exc:
                if attempt == START_ATTEMPTS or not _port_taken(exc, port):
                    raise
        raise AssertionError("unreachable")

    def frontend(
        self,
        namespace: str,
        etcd_url: str,
        *,
        model_name: str = TINY_MODEL_NAME,
        args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        timeout: float = START_TIMEOUT_S,
    ) -> Frontend:
        """A frontend on a free loopback HTTP port, scoped to ``namespace`` (through
        ``DYN_NAMESPACE``), ready once ``/v1/models`` lists ``model_name``."""
        index = len(self.started)
        for attempt in range(1, START_ATTEMPTS + 1):
            port = free_port()
            frontend = Frontend(
                name=f"frontend-{index}",
                argv=[
                    sys.executable,
                    "-m",
                    "dynamo.frontend",
                    "--http-host",
                    LOOPBACK,
                    "--http-port",
                    str(port),
                    *args,
                ],
                env=dynamo_env(namespace, etcd_url, extra=env),
                workdir=self.workdir / f"frontend-{index}",
                http_port=port,
                model_name=model_name,
            )
            self.started.append(frontend)
            try:
                frontend.start(timeout)
                return frontend
            except DynamoStartError as exc:
                if attempt == START_ATTEMPTS or not _port_taken(exc, port):
                    raise
        raise AssertionError("unreachable")

    def stop_all(self) -> None:
        # Frontends and routers first, so none sends a request to a worker being stopped.
        for process in sorted(reversed(self.started), key=lambda p: not isinstance(p, Frontend)):
            process.stop()


# --------------------------------------------------------------------------- clients


async def chat(
    http: aiohttp.ClientSession, port: int, prompt: str = "hello", tokens: int = 8
) -> tuple[int, str]:
    """One chat completion from the frontend on ``port``: (status, the answer's text, or
    the error body). A dropped connection is a failure too: status 0 and what happened."""
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": tokens,
    }
    try:
        async with http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body) as resp:
            text = await resp.text()
            if resp.status != 200:
                return resp.status, text
            return resp.status, json.loads(text)["choices"][0]["message"]["content"]
    except (aiohttp.ClientError, TimeoutError) as exc:
        return 0, f"{type(exc).__name__}: {exc}"


async def until_the_model_is_listed(http: aiohttp.ClientSession, port: int) -> None:
    """The frontend answers /v1/models (its readiness) before it has read the workers'
    model card from discovery; a client waits for the model, as a user's first curl would."""
    deadline = time.monotonic() + 30
    while True:
        async with http.get(f"http://127.0.0.1:{port}/v1/models") as resp:
            models = [m["id"] for m in (await resp.json()).get("data", [])]
        if TINY_MODEL_NAME in models:
            return
        assert time.monotonic() < deadline, f"the frontend lists {models}"
        await asyncio.sleep(0.05)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model folder (written once per session); its name is :data:`TINY_MODEL_NAME`."""
    require_dynamo()
    return write_tiny_model(tmp_path_factory.mktemp("models"), TINY_MODEL_NAME)


@pytest.fixture
def dynamo(tmp_path: Path, tiny_model: Path) -> Iterator[DynamoLauncher]:
    """A :class:`DynamoLauncher` for this test; every process it started is stopped after."""
    launcher = DynamoLauncher(tmp_path / "dynamo", tiny_model)
    try:
        yield launcher
    finally:
        launcher.stop_all()


__all__ = [
    "TINY_MODEL_NAME",
    "DynamoLauncher",
    "DynamoProcess",
    "DynamoStartError",
    "Frontend",
    "Instance",
    "Worker",
    "chat",
    "dynamo_env",
    "dynamo_missing",
    "etcd_prefix",
    "instances",
    "listening",
    "require_dynamo",
    "until_the_model_is_listed",
]
