"""The discovery bridge: readiness, drain, cleanup and reaping for managed replicas,
on real file discovery (and real etcd for lease revocation)."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aetcd
import pytest

from bench.chaos import RestartableEtcd
from connector.dynamo.discovery.bridge import DiscoveryBridge
from connector.dynamo.discovery.etcd import ETCD_CLIENT_OPTIONS, EtcdDiscovery
from connector.dynamo.discovery.file import FileDiscovery
from connector.dynamo.discovery.keys import encode_value, file_path, instance_key, instance_value
from connector.events import EventLog
from connector.graph.model import Graph, Readiness, ReadinessKind, Role, Service
from connector.reconcile.state import ConnectorState, ReplicaRecord
from connector.supervision.probes import ProbeTarget

NS = "dyn"
GRAPH = Graph(
    name="g",
    namespace=NS,
    services={
        "Decode": Service(
            name="Decode",
            role=Role.WORKER,
            command=("w",),
            readiness=Readiness(
                kind=ReadinessKind.DISCOVERY,
                component="backend",
                endpoints=("generate", "clear_kv_blocks"),
            ),
        ),
    },
)


@dataclass
class Host:
    graph: Graph = GRAPH
    state: ConnectorState = field(default_factory=lambda: ConnectorState(namespace="t"))
    events: EventLog = field(default_factory=EventLog)

    def add(self, ordinal: int, port: int | None, phase: str = "starting", **kw: Any) -> str:
        ports = {"rpc": port} if port is not None else {}
        rec = ReplicaRecord(
            component="Decode",
            ordinal=ordinal,
            watcher=f"t.decode.{ordinal}",
            phase=phase,  # type: ignore[arg-type]
            reservation={"ports": ports},
            spawned_at=kw.pop("spawned_at", time.time()),
            **kw,
        )
        self.state.replicas[rec.watcher] = rec
        return rec.replica_id

    def rec(self, replica_id: str) -> ReplicaRecord:
        return next(r for r in self.state.replicas.values() if r.replica_id == replica_id)


def register(
    root: Path, iid: int, port: int, endpoint: str = "generate", mtime: float | None = None
) -> str:
    key = instance_key(NS, "backend", endpoint, iid)
    path = file_path(root, key)
    tmp = path.with_name("." + path.name)
    tmp.write_bytes(encode_value(instance_value(NS, "backend", endpoint, iid, "127.0.0.1", port)))
    if mtime is not None:
        os.utime(tmp, (mtime, mtime))
    os.replace(tmp, path)
    return key


def target(host: Host, replica_id: str, alive: Callable[[], bool] = lambda: True) -> ProbeTarget:
    rec = host.rec(replica_id)
    ports = {k: int(v) for k, v in (rec.reservation or {}).get("ports", {}).items()}
    return ProbeTarget(
        replica_id=replica_id,
        pid=rec.pid or os.getpid(),
        spawned_at=rec.spawned_at or time.time(),
        ports=ports,
        alive=alive,
    )


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


@pytest.fixture
async def files(tmp_path: Path) -> AsyncIterator[tuple[Host, FileDiscovery, DiscoveryBridge]]:
    host = Host()
    disc = FileDiscovery(tmp_path / "kv", poll_s=60)
    await disc.start()
    bridge = DiscoveryBridge(host, disc, extra_env={"NATS_SERVER": "nats://127.0.0.1:4222"})
    await bridge.start()
    yield host, disc, bridge
    await bridge.close()
    await disc.close()


def reaps(host: Host) -> list[tuple[str | None, str | None, str]]:
    return [
        (e.replica, e.reason, e.details["key"]) for e in host.events.since(0) if e.kind == "reap"
    ]


async def test_replica_env(files: Any) -> None:
    _, disc, bridge = files
    assert bridge.replica_env() == {
        "DYN_DISCOVERY_BACKEND": "file",
        "DYN_FILE_KV": str(disc.root),
        "NATS_SERVER": "nats://127.0.0.1:4222",
    }


async def test_ready_once_all_endpoints_of_its_own_instance_are_registered(files: Any) -> None:
    host, disc, bridge = files
    mine = host.add(1, 20011)
    other = host.add(2, 20012)
    probe = asyncio.create_task(
        bridge.probe(target(host, mine), GRAPH.services["Decode"].readiness, time.monotonic() + 5)
    )
    await asyncio.sleep(0.05)
    register(disc.root, 0xB, 20012)  # the other replica's: not ours
    register(disc.root, 0xB, 20012, "clear_kv_blocks")
    register(disc.root, 0xA, 20011)  # one endpoint of two: not yet
    await asyncio.sleep(0.1)
    assert not probe.done()
    started = time.monotonic()
    key = register(disc.root, 0xA, 20011, "clear_kv_blocks")
    assert await asyncio.wait_for(probe, 5) == (True, "")
    assert time.monotonic() - started < 0.5
    assert bridge.ownership.known(key) == mine
    assert bridge.owner(disc.get(instance_key(NS, "backend", "generate", 0xB))) == other


async def test_any_endpoint_is_enough_with_match_any(files: Any) -> None:
    host, disc, bridge = files
    mine = host.add(1, 20011)
    readiness = Readiness(
        kind=ReadinessKind.DISCOVERY,
        component="backend",
        endpoints=("generate", "clear_kv_blocks"),
        match="any",
    )
    register(disc.root, 0xA, 20011, "clear_kv_blocks")
    assert await bridge.probe(target(host, mine), readiness, time.monotonic() + 5) == (True, "")


async def test_an_entry_left_by_an_earlier_process_does_not_make_it_ready(
    tmp_path: Path,
) -> None:
    # A bridge that is not started: no reaper, so the probe alone must tell them apart.
    host = Host()
    disc = FileDiscovery(tmp_path / "kv", poll_s=60)
    await disc.start()
    try:
        bridge = DiscoveryBridge(host, disc)
        mine = host.add(1, 20011)
        readiness = Readiness(kind=ReadinessKind.DISCOVERY, component="backend")
        register(disc.root, 0xDEAD, 20011, mtime=time.time() - 60)  # same port, a minute old
        await until(lambda: len(disc.instances()) == 1)
        probe_target = target(host, mine)
        ready, reason = await bridge.probe(probe_target, readiness, time.monotonic() + 0.3)
        assert ready is False
        assert reason.startswith("Decode/1 registered no instance of generate within 120 s")
        register(disc.root, 0xA, 20011)
        assert await bridge.probe(probe_target, readiness, time.monotonic() + 5) == (True, "")
    finally:
        await disc.close()


async def test_probe_gives_up_when_the_process_dies(files: Any) -> None:
    host, _, bridge = files
    mine = host.add(1, 20011)
    dead = asyncio.Event()
    probe = asyncio.create_task(
        bridge.probe(
            target(host, mine, alive=lambda: not dead.is_set()),
            Readiness(kind=ReadinessKind.DISCOVERY, component="backend"),
            time.monotonic() + 60,
        )
    )
    await asyncio.sleep(0.05)
    dead.set()
    assert await asyncio.wait_for(probe, 3) == (False, "process exited during start-up")


async def test_owner_by_listening_socket_when_no_port_was_allocated(files: Any) -> None:
    host, disc, bridge = files
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        mine = host.add(1, None, pid=os.getpid())
        register(disc.root, 0xC, port)
        readiness = Readiness(kind=ReadinessKind.DISCOVERY, component="backend")
        assert await bridge.probe(target(host, mine), readiness, time.monotonic() + 5) == (True, "")
    assert bridge.ownership.known(instance_key(NS, "backend", "generate", 0xC)) == mine


async def test_drain_and_exit_remove_only_the_replicas_own_entries(files: Any) -> None:
    host, disc, bridge = files
    mine = host.add(1, 20011, phase="ready")
    host.add(2, 20012, phase="ready")
    k_mine = register(disc.root, 0xA, 20011)
    k_mine2 = register(disc.root, 0xA, 20011, "clear_kv_blocks")
    k_other = register(disc.root, 0xB, 20012)
    k_foreign = register(disc.root, 0xF, 31000)
    await until(lambda: len(disc.instances()) == 4)

    await bridge.before_stop(host.rec(mine))
    assert sorted(i.key for i in disc.instances()) == sorted([k_other, k_foreign])
    assert not file_path(disc.root, k_mine).exists()
    assert reaps(host) == [(mine, "drain", k_mine2), (mine, "drain", k_mine)]

    host.rec(mine).phase = "exited"
    await bridge.after_exit(host.rec(mine))
    assert sorted(i.key for i in disc.instances()) == sorted([k_other, k_foreign])


async def test_reaper_removes_entries_of_replicas_not_running_at_once(files: Any) -> None:
    host, disc, _ = files
    dead = host.add(1, 20011, phase="backoff")
    host.add(2, 20012, phase="ready")
    started = time.monotonic()
    k_dead = register(disc.root, 0xA, 20011)  # e.g. re-listed after a connector restart
    k_live = register(disc.root, 0xB, 20012)
    k_foreign = register(disc.root, 0xF, 31000)
    await until(lambda: not file_path(disc.root, k_dead).exists())
    assert time.monotonic() - started < 0.5
    await until(lambda: len(disc.instances()) == 2)
    assert sorted(i.key for i in disc.instances()) == sorted([k_live, k_foreign])
    # The reaper records the reap when its unlink (in a thread) returns; the watch can
    # drop the entry from the cache before that.
    await until(lambda: bool(reaps(host)))
    assert reaps(host) == [(dead, "owner not running", k_dead)]


async def test_sweep_removes_what_an_earlier_process_left(files: Any) -> None:
    host, disc, bridge = files
    spawned = time.time()
    mine = host.add(1, 20011, phase="ready", spawned_at=spawned)
    k_old = register(disc.root, 0xDEAD, 20011, mtime=spawned - 30)
    k_new = register(disc.root, 0xA, 20011)
    await until(lambda: len(disc.instances()) == 1)  # the put already reaped the old one
    assert [i.key for i in disc.instances()] == [k_new]
    await until(lambda: bool(reaps(host)))  # recorded once the unlink's thread returns
    assert reaps(host) == [(mine, "left by an earlier process of the replica", k_old)]
    assert await bridge.sweep() == 0


# ------------------------------------------------------------------- etcd


def card(lease_id: int) -> bytes:
    """Where Dynamo keeps the model card of an instance, on the same lease."""
    return f"v1/mdc/{NS}/backend/generate/{lease_id:x}".encode()


@pytest.mark.integration
async def test_etcd_exit_revokes_the_lease_and_drain_keeps_it_until_exit(etcd_server: Any) -> None:
    client = aetcd.Client(etcd_server.host, etcd_server.port, timeout=5)
    host = Host()
    disc = EtcdDiscovery(etcd_server.url)
    await disc.start()
    bridge = DiscoveryBridge(host, disc)
    await bridge.start()
    try:
        crashed = host.add(1, 20011, phase="ready")
        drained = host.add(2, 20012, phase="ready")
        leases = [await client.lease(30), await client.lease(30)]
        for lease, port in zip(leases, (20011, 20012), strict=True):
            key = instance_key(NS, "backend", "generate", lease.id)
            value = encode_value(
                instance_value(NS, "backend", "generate", lease.id, "127.0.0.1", port)
            )
            await client.put(key.encode(), value, lease=lease)
            await client.put(
                f"v1/mdc/{NS}/backend/generate/{lease.id:x}".encode(), b"{}", lease=lease
            )
        await until(lambda: len(disc.instances()) == 2)

        started = time.monotonic()
        await bridge.after_exit(host.rec(crashed))
        assert time.monotonic() - started < 0.5
        assert (await client.get_lease_info(leases[0].id)).TTL == -1  # revoked, card gone too

        await bridge.before_stop(host.rec(drained))
        assert disc.instances() == []
        info = await client.get_lease_info(leases[1].id)
        assert info.TTL > 0  # still serving in-flight work on its lease
        assert [bytes(k) for k in info.keys] == [
            f"v1/mdc/{NS}/backend/generate/{leases[1].id:x}".encode()
        ]
        await bridge.after_exit(host.rec(drained))
        assert (await client.get_lease_info(leases[1].id)).TTL == -1
        assert [e.details["revoked"] for e in host.events.since(0) if e.kind == "reap"] == [
            True,
            False,
        ]
    finally:
        await bridge.close()
        await disc.close()
        await client.close()


async def test_an_exit_while_etcd_is_away_is_cleaned_up_once_etcd_is_back_not_at_a_sweep(
    tmp_path: Path,
) -> None:
    """A replica that dies while etcd is away (or the moment it comes back, its client
    still reconnecting): the removal etcd refused is tried again soon, so its entry goes
    within a second of etcd's return, not at the next sweep (here a minute away)."""
    etcd = RestartableEtcd(tmp_path / "etcd")
    etcd.start()
    client = aetcd.Client(etcd.host, etcd.port, timeout=5, options=dict(ETCD_CLIENT_OPTIONS))
    host = Host()
    disc = EtcdDiscovery(etcd.url)
    await disc.start()
    bridge = DiscoveryBridge(host, disc, sweep_s=60.0)
    await bridge.start()
    try:
        dead = host.add(1, 20011, phase="ready")
        lease = await client.lease(60)
        key = instance_key(NS, "backend", "generate", lease.id)
        value = encode_value(
            instance_value(NS, "backend", "generate", lease.id, "127.0.0.1", 20011)
        )
        await client.put(key.encode(), value, lease=lease)
        await until(lambda: len(disc.instances()) == 1)

        await asyncio.to_thread(etcd.stop)
        host.rec(dead).phase = "backoff"
        cleanup = asyncio.ensure_future(bridge.after_exit(host.rec(dead)))
        await asyncio.sleep(0.5)
        assert not cleanup.done()  # refused while etcd is away, and tried again
        await asyncio.to_thread(etcd.start)
        back = time.monotonic()
        await asyncio.wait_for(cleanup, 10)
        assert time.monotonic() - back < 3.0
        assert (await client.get(key.encode())) is None
        assert (await client.get_lease_info(lease.id)).TTL == -1
        assert reaps(host) == [(dead, "process exited", key)]
    finally:
        await bridge.close()
        await disc.close()
        await client.close()
        etcd.stop()


async def test_stats_count_owned_instances_and_reaped_not_drained(files: Any) -> None:
    host, disc, bridge = files
    drained = host.add(1, 20011, phase="ready")
    crashed = host.add(2, 20012, phase="ready")
    register(disc.root, 0xA, 20011)
    register(disc.root, 0xB, 20012)
    register(disc.root, 0xB, 20012, "clear_kv_blocks")
    register(disc.root, 0xF, 31000)  # foreign: not counted
    await until(lambda: len(disc.instances()) == 4)
    assert bridge.stats() == {"instances": {"Decode": 3}, "stale_reaped_total": 0}
    await bridge.before_stop(host.rec(drained))
    await bridge.after_exit(host.rec(crashed))
    assert bridge.stats() == {"instances": {"Decode": 0}, "stale_reaped_total": 2}


# ------------------------------------------------- a plain DynamoGraphDeployment's worker

PLAIN = Graph(
    name="g",
    namespace=NS,
    services={
        # What a graph copied from Kubernetes loads to: no component name anywhere.
        "Decode": Service(
            name="Decode",
            role=Role.WORKER,
            command=("w",),
            readiness=Readiness(kind=ReadinessKind.DISCOVERY, default=True),
        ),
    },
)


async def test_the_component_a_worker_registers_as_is_learnt_not_guessed(
    tmp_path: Path,
) -> None:
    host = Host(graph=PLAIN)
    disc = FileDiscovery(tmp_path / "kv", poll_s=60)
    await disc.start()
    bridge = DiscoveryBridge(host, disc)
    await bridge.start()
    try:
        mine = host.add(1, 20011)
        host.add(2, 20012)
        assert bridge.dynamo_component("Decode") is None  # nothing known yet
        probe = asyncio.create_task(
            bridge.probe(
                target(host, mine), PLAIN.services["Decode"].readiness, time.monotonic() + 5
            )
        )
        register(disc.root, 0xF, 31000)  # foreign: no replica's port
        register(disc.root, 0xB, 20012)  # Decode/2's
        await asyncio.sleep(0.1)
        assert not probe.done()
        register(disc.root, 0xA, 20011)  # Dynamo's decode worker registers as `backend`
        assert await asyncio.wait_for(probe, 5) == (True, "")
        assert bridge.dynamo_component("Decode") == "backend"
        assert bridge.registered_replicas("Decode") == 2
        # Registered where expected: nothing to say about it.
        assert [e for e in host.events.since(0) if e.kind == "discovery"] == []
    finally:
        await bridge.close()
        await disc.close()


async def test_a_serving_replica_is_ready_whatever_component_the_graph_guessed(
    files: Any,
) -> None:
    host, disc, bridge = files
    mine = host.add(1, 20011)
    guessed = Readiness(kind=ReadinessKind.DISCOVERY, component="decode")  # a wrong guess
    register(disc.root, 0xA, 20011)  # it registers as `backend`
    assert await bridge.probe(target(host, mine), guessed, time.monotonic() + 5) == (True, "")
    (said,) = [e for e in host.events.since(0) if e.kind == "discovery"]
    assert said.replica == mine
    assert said.reason == (
        "Decode/1 registered dyn/backend/generate (component 'backend', not 'decode'); "
        "counted ready; set local.readiness.discovery.component: backend"
    )


async def test_the_timeout_reason_says_what_discovery_listed(files: Any) -> None:
    host, disc, bridge = files
    mine = host.add(1, 20011)
    other = host.add(2, 20012)
    register(disc.root, 0xB, 20012)
    register(disc.root, 0xF, 31000)
    await until(lambda: len(disc.instances()) == 2)
    readiness = Readiness(kind=ReadinessKind.DISCOVERY, timeout_s=0.2)
    ready, reason = await bridge.probe(target(host, mine), readiness, time.monotonic() + 0.2)
    assert ready is False
    assert reason == (
        f"{mine} registered no instance of generate within 0.2 s (expected in namespace "
        f"'dyn'); discovery lists dyn/backend/generate ({other}, foreign)"
    )


async def test_an_instance_is_owned_by_socket_whatever_the_readiness_kind(files: Any) -> None:
    """A replica that picks its own port and is not probed through discovery (readiness
    `process`): its instance is still attributed when it appears, so its exit removes it
    at once instead of leaving it for the lease TTL."""
    host, disc, bridge = files
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        mine = host.add(1, None, phase="ready", pid=os.getpid())
        key = register(disc.root, 0xC, port)
        await until(lambda: bridge.ownership.known(key) == mine)
    assert bridge.dynamo_component("Decode") == "backend"
    host.rec(mine).phase = "exited"
    await bridge.after_exit(host.rec(mine))
    assert disc.instances() == []
    assert reaps(host) == [(mine, "process exited", key)]
