"""Registering the mock worker in Dynamo's discovery: file backend, etcd, or nowhere.

Keys and values come from :mod:`connector.dynamo.discovery.keys`, the module the connector's
discovery reads with, so what the mock writes is by construction what the connector understands.

Lifetimes match the real runtime (ai-dynamo-runtime 1.6.1):

* etcd: one lease per process (its id is the instance id), every endpoint key bound to it,
  kept alive at a third of the TTL. Deregistering revokes the lease, which drops all keys at
  once. A killed process leaves its keys until the lease expires.
* file: one file per endpoint, written atomically, its mtime refreshed every 2 s.
  Deregistering deletes the files; a killed process leaves them forever.

A key or file someone else removed (the connector draining this replica) is never written
again: keepalive refreshes the lease or the mtime, it does not re-register.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from connector.dynamo.discovery.keys import encode_value, file_path, instance_key, instance_value
from connector.mockworker.config import MockConfig

log = logging.getLogger(__name__)

FILE_REFRESH_S = 2.0
ETCD_RPC_TIMEOUT_S = 5


class RegistrationError(RuntimeError):
    """Registration failed; the message names the backend, where it is, and why."""


def random_instance_id() -> int:
    """A non-zero random u64: half of them are >= 2**63, so they must never pass a float."""
    while True:
        value = secrets.randbits(64)
        if value:
            return value


class Registration(ABC):
    """One process's entries in discovery."""

    def __init__(self, cfg: MockConfig, rpc_port: int) -> None:
        self.cfg = cfg
        self.rpc_port = rpc_port
        self.instance_id = 0
        # Set when the registration is gone for good while running (etcd lease lost).
        self.lost = asyncio.Event()
        self.lost_reason = ""

    @property
    def keys(self) -> list[str]:
        return [
            instance_key(self.cfg.namespace, self.cfg.component, ep, self.instance_id)
            for ep in self.cfg.endpoints
        ]

    def value(self, endpoint: str) -> dict[str, Any]:
        cfg = self.cfg
        return instance_value(
            cfg.namespace, cfg.component, endpoint, self.instance_id, cfg.rpc_host, self.rpc_port
        )

    @abstractmethod
    def where(self) -> str:
        """Human words for where the entries live (for log lines)."""

    @abstractmethod
    async def register(self) -> int:
        """Write every endpoint's entry and start keeping them alive; the instance id."""

    @abstractmethod
    async def deregister(self) -> None:
        """Remove the entries now and stop keeping them alive."""


class NoRegistration(Registration):
    """``DYN_DISCOVERY_BACKEND=none``: an identity for metrics and logs, nothing written."""

    def where(self) -> str:
        return "no discovery"

    async def register(self) -> int:
        self.instance_id = self.cfg.instance_id or random_instance_id()
        return self.instance_id

    async def deregister(self) -> None:
        return None


class FileRegistration(Registration):
    """Dynamo's file backend under ``DYN_FILE_KV``."""

    def __init__(self, cfg: MockConfig, rpc_port: int) -> None:
        super().__init__(cfg, rpc_port)
        if cfg.file_kv is None:
            raise RegistrationError("file discovery needs DYN_FILE_KV")
        self.root = Path(cfg.file_kv)
        self._refresher: asyncio.Task[None] | None = None

    @property
    def paths(self) -> list[Path]:
        return [file_path(self.root, key) for key in self.keys]

    def where(self) -> str:
        return f"file backend {self.root}"

    async def register(self) -> int:
        self.instance_id = self.cfg.instance_id or random_instance_id()
        entries = [
            (path, encode_value(self.value(ep)))
            for path, ep in zip(self.paths, self.cfg.endpoints, strict=True)
        ]
        try:
            await asyncio.to_thread(_write_files, entries)
        except OSError as exc:
            raise RegistrationError(
                f"cannot write discovery files under {self.root}: {exc}"
            ) from exc
        self._refresher = asyncio.get_running_loop().create_task(
            self._refresh(), name="file-registration-refresh"
        )
        return self.instance_id

    async def _refresh(self) -> None:
        # The mtime says "alive"; a file that is gone was removed on purpose (drain).
        paths = self.paths
        while True:
            await asyncio.sleep(FILE_REFRESH_S)
            paths = await asyncio.to_thread(_touch_existing, paths)

    async def deregister(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._refresher
            self._refresher = None
        await asyncio.to_thread(_remove_files, self.paths)


def _write_files(entries: list[tuple[Path, bytes]]) -> None:
    for path, data in entries:
        path.parent.mkdir(parents=True, exist_ok=True)
        # A dot-name in the same directory: watchers skip it, and rename is atomic.
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)


def _touch_existing(paths: list[Path]) -> list[Path]:
    kept = []
    for path in paths:
        try:
            os.utime(path)
        except FileNotFoundError:
            log.info("discovery file %s was removed; not writing it again", path)
            continue
        kept.append(path)
    return kept


def _remove_files(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)


class EtcdRegistration(Registration):
    """Dynamo's etcd backend: keys bound to this process's lease."""

    def __init__(self, cfg: MockConfig, rpc_port: int) -> None:
        super().__init__(cfg, rpc_port)
        # Imported here: only etcd-backed workers pay for loading gRPC.
        from connector.dynamo.discovery.etcd import etcd_endpoint

        self.host, self.port = etcd_endpoint(cfg.etcd_endpoints)
        self._client: Any = None
        self._keepalive: asyncio.Task[None] | None = None

    def where(self) -> str:
        return f"etcd at http://{self.host}:{self.port} (lease TTL {self.cfg.lease_ttl_s} s)"

    async def register(self) -> int:
        import aetcd

        from connector.dynamo.discovery.etcd import ETCD_CLIENT_OPTIONS

        self._client = aetcd.Client(
            self.host, self.port, timeout=ETCD_RPC_TIMEOUT_S, options=dict(ETCD_CLIENT_OPTIONS)
        )
        try:
            lease = await asyncio.wait_for(
                self._client.lease(self.cfg.lease_ttl_s), ETCD_RPC_TIMEOUT_S
            )
            self.instance_id = int(lease.id)
            for key, ep in zip(self.keys, self.cfg.endpoints, strict=True):
                await self._client.put(key.encode(), encode_value(self.value(ep)), lease=lease)
        except Exception as exc:
            await self._close_client()
            reason = str(exc) or type(exc).__name__
            raise RegistrationError(
                f"cannot register in etcd at http://{self.host}:{self.port}: {reason}"
            ) from exc
        self._keepalive = asyncio.get_running_loop().create_task(
            self._keep_alive(), name="etcd-lease-keepalive"
        )
        return self.instance_id

    async def _keep_alive(self) -> None:
        ttl = self.cfg.lease_ttl_s
        last_ok = time.monotonic()
        while True:
            await asyncio.sleep(ttl / 3)
            try:
                reply = await asyncio.wait_for(
                    self._client.refresh_lease(self.instance_id), ETCD_RPC_TIMEOUT_S
                )
            except Exception as exc:
                # etcd may be back before the lease runs out; give up only once it has.
                if time.monotonic() - last_ok < ttl:
                    log.warning("refreshing lease %x failed, retrying: %s", self.instance_id, exc)
                    continue
                self._lose(f"etcd unreachable for longer than the lease TTL ({ttl} s): {exc}")
                return
            if reply is None or reply.TTL <= 0:
                self._lose(f"etcd lease {self.instance_id:x} expired or was revoked")
                return
            last_ok = time.monotonic()

    def _lose(self, reason: str) -> None:
        self.lost_reason = reason
        self.lost.set()

    async def deregister(self) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keepalive
            self._keepalive = None
        if self._client is None:
            return
        try:
            if not self.lost.is_set():
                # Revoking deletes every key bound to the lease, atomically.
                await self._client.revoke_lease(self.instance_id)
        finally:
            await self._close_client()

    async def _close_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(Exception):
                await self._client.close()
            self._client = None


def open_registration(cfg: MockConfig, rpc_port: int) -> Registration:
    if cfg.discovery == "file":
        return FileRegistration(cfg, rpc_port)
    if cfg.discovery == "etcd":
        return EtcdRegistration(cfg, rpc_port)
    return NoRegistration(cfg, rpc_port)
