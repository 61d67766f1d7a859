"""Dynamo's etcd discovery backend, as a prefix watch (``aetcd``, asyncio).

Watched prefixes: ``v1/instances/`` (current), ``instances/`` (2025) and, read-only,
``{ns}/components/`` (early 2025) for every namespace given or seen under the other two.
Each prefix is listed once and then watched from the revision after the listing, so no
change falls between the two. When the watch breaks (etcd restarted, network), the cache
keeps its last view, :meth:`EtcdDiscovery.healthy` turns false, and a new session lists
everything again (dropping what vanished meanwhile) and watches on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlsplit

import aetcd

from connector.dynamo.discovery.cache import Instance, InstanceCache
from connector.dynamo.discovery.keys import LEGACY_2025_PREFIX, V1_PREFIX
from connector.errors import DiscoveryUnavailable

log = logging.getLogger(__name__)


# gRPC's reconnect backoff starts at 1 s and grows 1.6x per attempt up to 120 s by default:
# after an etcd outage of 30 s a client stayed away 15 s after etcd was back (the chaos bench
# measured a killed replica's key listed 13-17 s). Capped at 1 s (jitter +-20%), a replica
# killed the moment etcd came back stayed listed up to 1.2 s; tried every 100-250 ms, the
# clients are back within a quarter second, for a refused connect a quarter second apart
# while etcd is away.
ETCD_CLIENT_OPTIONS: dict[str, int] = {
    "grpc.initial_reconnect_backoff_ms": 100,
    "grpc.max_reconnect_backoff_ms": 250,
}


def etcd_endpoint(url: str) -> tuple[str, int]:
    """(host, port) of the first endpoint in an ``ETCD_ENDPOINTS``-style string.

    Accepts ``http://host:port``, ``host:port`` and comma-separated lists of either.
    """
    first = url.split(",", 1)[0].strip()
    if "://" not in first:
        first = "http://" + first
    parts = urlsplit(first)
    if not parts.hostname:
        raise ValueError(f"etcd endpoint {url!r} has no host")
    return parts.hostname, parts.port or 2379


def legacy_prefix(namespace: str) -> str:
    return f"{namespace}/components/"


class EtcdDiscovery(InstanceCache):
    """Discovery over etcd. ``start`` raises :class:`DiscoveryUnavailable` if etcd does not
    answer; after that, outages are ridden out by re-listing."""

    def __init__(
        self,
        url: str,
        *,
        namespaces: Iterable[str] = (),
        rpc_timeout_s: float = 2.0,
        retry_s: float = 0.5,
    ) -> None:
        super().__init__("etcd")
        self.url = url
        self.host, self.port = etcd_endpoint(url)
        self.rpc_timeout_s = rpc_timeout_s
        self.retry_s = retry_s
        self._client: Any = None
        self._prefixes: list[str] = [V1_PREFIX, LEGACY_2025_PREFIX]
        self._prefixes += [legacy_prefix(ns) for ns in namespaces]
        self._leases: dict[str, int] = {}  # key -> lease the key is bound to (0: none)
        self._session: list[asyncio.Task[None]] = []
        self._failed = asyncio.Event()
        self._connected = False
        self._runner: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._client = aetcd.Client(
            self.host, self.port, timeout=self.rpc_timeout_s, options=dict(ETCD_CLIENT_OPTIONS)
        )
        try:
            await self._open_session()
        except Exception as exc:
            await self._drop_session()
            with contextlib.suppress(Exception):
                await self._client.close()
            raise DiscoveryUnavailable(
                f"etcd discovery at {self.url} is not reachable: {exc or type(exc).__name__}",
                url=self.url,
            ) from exc
        self._runner = asyncio.get_running_loop().create_task(
            self._supervise(), name="etcd-discovery"
        )

    async def close(self) -> None:
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
            self._runner = None
        await self._drop_session()
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None

    async def remove(self, instance: Instance, *, revoke: bool = True) -> None:
        """Take ``instance`` out of etcd now.

        ``revoke=True`` (the process is gone): revoke the lease its key is bound to (the
        instance id when unknown), which also drops the process's other keys (its other
        endpoints, its model card). ``revoke=False`` (draining a live process): delete only
        this key, so the process keeps its lease and finishes its in-flight requests.
        The key is deleted in both cases, in case it was not bound to that lease.
        """
        client = self._require_client()
        lease = self._leases.get(instance.key) or instance.instance_id
        if revoke and lease:
            try:
                await client.revoke_lease(lease)
            except (aetcd.ClientError, ValueError) as exc:  # already gone, or not a lease id
                log.debug("revoking lease %x of %s: %s", lease, instance.key, exc)
        await client.delete(instance.key.encode())
        self._leases.pop(instance.key, None)
        self._delete(instance.key)

    async def healthy(self) -> bool:
        if self._client is None or not self._connected:
            return False
        try:
            await asyncio.wait_for(self._client.status(), self.rpc_timeout_s)
        except Exception:
            return False
        return True

    def replica_env(self) -> dict[str, str]:
        return {
            "DYN_DISCOVERY_BACKEND": "etcd",
            "ETCD_ENDPOINTS": f"http://{self.host}:{self.port}",
        }

    def lease_of(self, key: str) -> int | None:
        """The lease ``key`` is bound to, as last seen by the watch (0: none)."""
        return self._leases.get(key)

    # ----------------------------------------------------------------- sessions

    def _require_client(self) -> Any:
        if self._client is None:
            raise DiscoveryUnavailable(f"etcd discovery at {self.url} is not started")
        return self._client

    async def _open_session(self) -> None:
        """List and watch every prefix; raises if etcd does not answer."""
        self._failed.clear()
        for prefix in list(self._prefixes):
            await self._start_prefix(prefix)
        self._connected = True

    async def _start_prefix(self, prefix: str) -> None:
        client = self._require_client()
        listing = await client.get_prefix(prefix.encode())
        entries: dict[str, bytes] = {}
        for kv in listing:
            key = kv.key.decode(errors="replace")
            entries[key] = kv.value
            self._leases[key] = kv.lease
        self._replace_all(entries, prefixes=(prefix,))
        for key in entries:
            self._note_namespace(key)
        watch = await client.watch_prefix(
            prefix.encode(), start_revision=listing.header.revision + 1
        )
        task = asyncio.get_running_loop().create_task(
            self._consume(prefix, watch), name=f"etcd-watch {prefix}"
        )
        self._session.append(task)

    async def _consume(self, prefix: str, watch: Any) -> None:
        try:
            async for event in watch:
                key = event.kv.key.decode(errors="replace")
                if event.kind == "PUT":
                    self._leases[key] = event.kv.lease
                    self._put(key, event.kv.value)
                    self._note_namespace(key)
                else:
                    self._leases.pop(key, None)
                    self._delete(key)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await watch.cancel()
            raise
        except Exception as exc:
            log.warning("etcd discovery: watch on %r broke: %s", prefix, exc)
        # A watch that ends (error or server-side cancel) means the session is stale.
        self._failed.set()

    def _note_namespace(self, key: str) -> None:
        inst = self.get(key)
        if inst is None or inst.format == "early-2025":
            return
        prefix = legacy_prefix(inst.namespace)
        if prefix in self._prefixes:
            return
        self._prefixes.append(prefix)
        task = asyncio.get_running_loop().create_task(self._add_prefix(prefix))
        self._session.append(task)

    async def _add_prefix(self, prefix: str) -> None:
        try:
            await self._start_prefix(prefix)
        except Exception as exc:
            log.warning("etcd discovery: cannot watch %r: %s", prefix, exc)
            self._failed.set()

    async def _drop_session(self) -> None:
        tasks, self._session = self._session, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._connected = False

    async def _supervise(self) -> None:
        while True:
            await self._failed.wait()
            await self._drop_session()
            while True:
                try:
                    await self._open_session()
                    log.info("etcd discovery: watching %s again", self.url)
                    break
                except Exception as exc:
                    await self._drop_session()
                    log.debug("etcd discovery: %s still unreachable: %s", self.url, exc)
                    await asyncio.sleep(self.retry_s)
