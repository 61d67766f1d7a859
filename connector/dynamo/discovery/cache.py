"""Dynamo discovery: which instances are registered, as an event-driven cache.

Two backends share one interface (:class:`Discovery`): etcd (:mod:`connector.dynamo.discovery.etcd`,
a prefix watch) and the file backend (:mod:`connector.dynamo.discovery.file`, inotify with an mtime
poll as backstop). Both keep the current set of :class:`Instance` in memory, so reading it is
free, and both push every change to subscribers and to :meth:`Discovery.wait_for` waiters the
moment the watch sees it: readiness never waits for a polling period.

Key and value formats live in :mod:`connector.dynamo.discovery.keys`; instance ids are u64 and stay
exact Python ints (never floats). A value that does not parse is skipped and logged once.

Which replica owns an instance (:func:`match_instance`)
--------------------------------------------------------
The connector gives every replica its own ports from its port allocation, among them
``DYN_TCP_RPC_PORT``, the port Dynamo advertises in the instance's ``transport`` address.
So, in this order:

1. **Allocated port.** The owner is the replica whose allocated ports contain the
   transport port. Allocations never overlap, so at most one replica matches. This needs no
   I/O and works for a replica that has already exited (its entry is then stale).
2. **Listening socket.** If no allocation matches (a component that picks its own port),
   the owner is the replica whose process tree holds the socket listening on that port
   (``listeners``: port -> pid, from :func:`listening_ports`, which uses psutil and must run
   off the event loop).

When ``local_hosts`` is given, an instance advertising another host is never matched: a
shared etcd may hold instances of other machines that happen to use the same port number.
An instance with no owner is *foreign*: it is listed (topology, API) but the connector never
removes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import psutil

from connector.dynamo.discovery.keys import decode_value, parse_instance_key, transport_address

log = logging.getLogger(__name__)

Listener = Callable[[str, "Instance"], None]


@dataclass(frozen=True)
class Instance:
    """One registered Dynamo endpoint instance."""

    key: str
    namespace: str
    component: str
    endpoint: str
    instance_id: int  # u64, exact; the etcd lease id of the registering process
    address: tuple[str, int] | None  # (host, port) from the transport, if it has one
    value: dict[str, Any]
    backend: str  # "etcd" | "file"
    format: str  # "v1" | "2025" | "early-2025"

    @property
    def instance_hex(self) -> str:
        return f"{self.instance_id:x}"


def parse_instance(key: str, raw: bytes | str, backend: str) -> Instance | None:
    """Build an :class:`Instance` from a key and its stored value; ``None`` if either is not
    a Dynamo instance (the caller logs)."""
    parsed = parse_instance_key(key)
    if parsed is None:
        return None
    value = decode_value(raw)
    if value is None:
        return None
    return Instance(
        key=key,
        namespace=parsed.namespace,
        component=parsed.component,
        endpoint=parsed.endpoint,
        instance_id=parsed.instance_id,
        address=transport_address(value),
        value=value,
        backend=backend,
        format=parsed.format,
    )


class Discovery(Protocol):
    """What the connector needs from a discovery backend."""

    backend: str

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def instances(self) -> list[Instance]: ...

    def registered_at(self, key: str) -> float | None: ...

    def subscribe(self, fn: Listener) -> Callable[[], None]: ...

    # ``timeout`` is part of the contract: a miss returns None instead of raising.
    async def wait_for(
        self,
        predicate: Callable[[Instance], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> Instance | None: ...

    async def remove(self, instance: Instance, *, revoke: bool = True) -> None: ...

    async def healthy(self) -> bool: ...

    def replica_env(self) -> dict[str, str]: ...


class InstanceCache:
    """The watch cache both backends fill: instances by key, subscribers and waiters.

    Backends call :meth:`_put`, :meth:`_delete` and :meth:`_replace_all` on the event loop;
    every real change is pushed synchronously to subscribers and waiters.
    """

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._by_key: dict[str, Instance] = {}
        self._listeners: list[Listener] = []
        self._waiters: list[tuple[Callable[[Instance], bool], asyncio.Future[Instance]]] = []
        self._bad_values: dict[str, bytes] = {}  # keys whose value did not parse (log once)
        self._seen_at: dict[str, float] = {}  # key -> wall time this cache first saw it

    def instances(self) -> list[Instance]:
        return sorted(self._by_key.values(), key=lambda i: i.key)

    def get(self, key: str) -> Instance | None:
        return self._by_key.get(key)

    def registered_at(self, key: str) -> float | None:
        """Wall-clock time the entry was registered, as well as the backend can tell
        (here: when this cache first saw it). Tells a new process's entry from one its
        predecessor left behind."""
        return self._seen_at.get(key)

    def subscribe(self, fn: Listener) -> Callable[[], None]:
        self._listeners.append(fn)

        def unsubscribe() -> None:
            with contextlib.suppress(ValueError):
                self._listeners.remove(fn)

        return unsubscribe

    async def wait_for(
        self,
        predicate: Callable[[Instance], bool],
        timeout: float,  # noqa: ASYNC109
    ) -> Instance | None:
        """The first instance (present now or put later) matching ``predicate``, or ``None``
        after ``timeout`` seconds. Woken by the watch, not by polling."""
        for inst in self.instances():
            if predicate(inst):
                return inst
        fut: asyncio.Future[Instance] = asyncio.get_running_loop().create_future()
        waiter = (predicate, fut)
        self._waiters.append(waiter)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(waiter)

    # ---------------------------------------------------------------- backend side

    def _put(self, key: str, raw: bytes) -> Instance | None:
        inst = parse_instance(key, raw, self.backend)
        if inst is None:
            # Skipped, and what we had stays: an empty or torn value is usually a file read
            # half-way through a rewrite, and its next write event brings the whole value.
            known_key = parse_instance_key(key) is not None
            if raw.strip() and known_key and self._bad_values.get(key) != raw:
                self._bad_values[key] = raw
                log.warning(
                    "discovery (%s): skipping %s: its value is not a JSON object: %r",
                    self.backend,
                    key,
                    raw[:200],
                )
            return None
        self._bad_values.pop(key, None)
        if self._by_key.get(key) == inst:
            return inst
        self._seen_at.setdefault(key, time.time())
        self._by_key[key] = inst
        self._notify("put", inst)
        return inst

    def _delete(self, key: str) -> Instance | None:
        self._bad_values.pop(key, None)
        self._seen_at.pop(key, None)
        inst = self._by_key.pop(key, None)
        if inst is not None:
            self._notify("delete", inst)
        return inst

    def _replace_all(self, entries: Mapping[str, bytes], prefixes: Iterable[str] = ("",)) -> None:
        """Make the cache equal ``entries`` for keys under ``prefixes`` (a full re-list)."""
        scope = tuple(prefixes)
        for key in [k for k in self._by_key if k.startswith(scope) and k not in entries]:
            self._delete(key)
        for key, raw in entries.items():
            self._put(key, raw)

    def _notify(self, kind: str, inst: Instance) -> None:
        for fn in list(self._listeners):
            try:
                fn(kind, inst)
            except Exception:  # a broken subscriber must not break discovery
                log.exception("discovery subscriber failed on %s %s", kind, inst.key)
        if kind != "put":
            return
        for predicate, fut in list(self._waiters):
            if fut.done():
                continue
            try:
                if predicate(inst):
                    fut.set_result(inst)
            except Exception as exc:
                fut.set_exception(exc)


# ------------------------------------------------------------------- ownership


@dataclass(frozen=True)
class ReplicaAddress:
    """What identifies a managed replica on the network: its allocated ports and the pids
    of its process tree."""

    replica_id: str
    ports: frozenset[int]
    pids: frozenset[int]


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def match_instance(
    instance: Instance,
    replicas: Iterable[ReplicaAddress],
    listeners: Mapping[int, int] | None = None,
    local_hosts: Collection[str] | None = None,
) -> str | None:
    """The ``replica_id`` of the managed replica that owns ``instance``, or ``None`` (foreign).

    See the module docstring for the method. ``listeners`` maps a listening port to the pid
    holding it; ``local_hosts`` are this machine's addresses (loopback always counts).
    """
    if instance.address is None:
        return None
    host, port = instance.address
    if local_hosts is not None and not _is_loopback(host) and host not in local_hosts:
        return None
    candidates = list(replicas)
    for rep in candidates:
        if port in rep.ports:
            return rep.replica_id
    pid = (listeners or {}).get(port)
    if pid is not None:
        for rep in candidates:
            if pid in rep.pids:
                return rep.replica_id
    return None


def listening_ports(pids: Iterable[int]) -> dict[int, int]:
    """Port -> pid for every TCP socket in LISTEN state held by one of ``pids``.

    Blocking (psutil reads /proc): call it with ``asyncio.to_thread``.
    """
    out: dict[int, int] = {}
    for pid in pids:
        try:
            conns = psutil.Process(pid).net_connections(kind="tcp")
        except psutil.Error:
            continue
        for conn in conns:
            if conn.status == psutil.CONN_LISTEN and conn.laddr:
                out.setdefault(conn.laddr.port, pid)
    return out


def local_addresses() -> frozenset[str]:
    """This machine's interface addresses (blocking: call it in a thread)."""
    hosts: set[str] = set()
    for addrs in psutil.net_if_addrs().values():
        for addr in addrs:
            hosts.add(addr.address.split("%", 1)[0])
    return frozenset(hosts)
