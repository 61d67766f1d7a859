"""``--use-dynamo-runtime``: register through the real ``ai-dynamo-runtime`` package.

Verified with ai-dynamo-runtime 1.6.1 (PyPI wheel): ``DistributedRuntime(loop, backend,
"tcp")`` reads ``DYN_FILE_KV``, ``ETCD_ENDPOINTS``, ``ETCD_LEASE_TTL``, ``DYN_TCP_RPC_HOST``,
``DYN_TCP_RPC_PORT``, ``DYN_SYSTEM_HOST`` and ``DYN_SYSTEM_PORT`` from the environment;
``runtime.endpoint("ns.component.endpoint").serve_endpoint(handler)`` registers the
instance (its id is ``endpoint.connection_id()``, the etcd lease id) and serves the TCP
request plane; ``runtime.shutdown()`` deregisters. The runtime's own system server then
answers ``/metrics`` (real ``dynamo_component_*`` series) and ``/health``, so this mode
drives its own endpoint with requests to make those series move, and the mock's own HTTP
server and TCP listener stay off.

The package is optional: it is imported only here, by name, when the flag is given.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator
from typing import Any

from connector.mockworker.config import MockConfig

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 15.0
_BACKENDS = {"file": "file", "etcd": "etcd", "none": "mem"}


class RuntimeUnavailable(RuntimeError):
    """The real runtime cannot be used; the message says why."""


def runtime_env(cfg: MockConfig) -> dict[str, str]:
    """The environment the runtime reads, with the mock's flags applied."""
    env = {
        "DYN_DISCOVERY_BACKEND": _BACKENDS[cfg.discovery],
        "DYN_TCP_RPC_HOST": cfg.rpc_host,
        "DYN_SYSTEM_HOST": cfg.system_host,
        "ETCD_ENDPOINTS": cfg.etcd_endpoints,
        "ETCD_LEASE_TTL": str(cfg.lease_ttl_s),
    }
    if cfg.file_kv:
        env["DYN_FILE_KV"] = cfg.file_kv
    if cfg.rpc_port:
        env["DYN_TCP_RPC_PORT"] = str(cfg.rpc_port)
    if cfg.system_port:
        env["DYN_SYSTEM_PORT"] = str(cfg.system_port)
    return env


class DynamoRuntimeWorker:
    """The endpoints of one process, served by the real runtime."""

    def __init__(self, cfg: MockConfig, rng: random.Random | None = None) -> None:
        self.cfg = cfg
        self.rng = rng or random.Random()
        self.instance_id = 0
        self._runtime: Any = None
        self._endpoints: list[Any] = []
        self._serving: list[asyncio.Future[Any]] = []

    def where(self) -> str:
        return f"ai-dynamo-runtime ({self.cfg.discovery} discovery)"

    async def register(self) -> int:
        try:
            module = importlib.import_module("dynamo.runtime")
        except ImportError as exc:
            raise RuntimeUnavailable(
                f"--use-dynamo-runtime needs the ai-dynamo-runtime package: {exc}"
            ) from exc
        os.environ.update(runtime_env(self.cfg))
        os.environ.setdefault("DYN_LOG", "warn")
        loop = asyncio.get_running_loop()
        try:
            self._runtime = module.DistributedRuntime(loop, _BACKENDS[self.cfg.discovery], "tcp")
        except Exception as exc:  # the runtime raises a bare Exception for bad settings
            raise RuntimeUnavailable(f"ai-dynamo-runtime did not start: {exc}") from exc
        cfg = self.cfg
        for name in cfg.endpoints:
            endpoint = self._runtime.endpoint(f"{cfg.namespace}.{cfg.component}.{name}")
            self._endpoints.append(endpoint)
            # serve_endpoint returns a future that resolves when serving stops.
            self._serving.append(asyncio.ensure_future(endpoint.serve_endpoint(self._handle)))
        self.instance_id = int(self._endpoints[0].connection_id())
        await self._wait_listed()
        self._runtime.set_health_status(True)
        return self.instance_id

    async def _wait_listed(self) -> None:
        # Registered means: the runtime's own discovery client lists this instance.
        for endpoint in self._endpoints:
            client = await endpoint.client()
            deadline = time.monotonic() + REGISTER_TIMEOUT_S
            while self.instance_id not in client.instance_ids():
                failed = [f for f in self._serving if f.done()]
                if failed:
                    raise RuntimeUnavailable(f"the runtime stopped serving: {failed[0]!r}")
                if time.monotonic() > deadline:
                    raise RuntimeUnavailable(
                        f"instance {self.instance_id:x} not listed in discovery after "
                        f"{REGISTER_TIMEOUT_S} s"
                    )
                await asyncio.sleep(0.05)

    async def _handle(self, request: Any) -> AsyncIterator[dict[str, Any]]:
        await asyncio.sleep(self.rng.uniform(0.005, 0.05))
        yield {"text": "mock", "request": request}

    async def simulate(self) -> None:
        """Send requests to this instance's own endpoints so the runtime's metrics move."""
        if self.cfg.request_rate <= 0:
            return
        clients = [await endpoint.client() for endpoint in self._endpoints]
        n = 0
        while True:
            client = clients[n % len(clients)]
            n += 1
            try:
                stream = await client.direct({"n": n}, self.instance_id)
                async for _ in stream:
                    pass
            except Exception as exc:  # the runtime is shutting down, or a request failed
                log.debug("self-request %d failed: %s", n, exc)
            await asyncio.sleep(self.rng.expovariate(self.cfg.request_rate))

    async def deregister(self) -> None:
        if self._runtime is None:
            return
        self._runtime.shutdown()
        for fut in self._serving:
            with contextlib.suppress(Exception):
                await fut
