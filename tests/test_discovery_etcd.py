"""etcd discovery against a real etcd 3.4."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from typing import Any

import aetcd
import pytest

from connector.dynamo.discovery.etcd import EtcdDiscovery, etcd_endpoint
from connector.dynamo.discovery.keys import encode_value, instance_key, instance_value
from connector.errors import DiscoveryUnavailable

pytestmark = pytest.mark.integration

BIG_ID = 0xFEDCBA9876543210  # a u64 above 2**63


def value(iid: int, port: int, ns: str = "dyn", comp: str = "backend") -> bytes:
    return encode_value(instance_value(ns, comp, "generate", iid, "127.0.0.1", port))


@pytest.fixture
async def client(etcd_server: Any) -> AsyncIterator[Any]:
    c = aetcd.Client(etcd_server.host, etcd_server.port, timeout=5)
    yield c
    await c.close()


@pytest.fixture
async def disc(etcd_server: Any) -> AsyncIterator[EtcdDiscovery]:
    d = EtcdDiscovery(etcd_server.url, namespaces=["dyn"])
    await d.start()
    yield d
    await d.close()


def test_endpoint_forms() -> None:
    assert etcd_endpoint("http://127.0.0.1:2379") == ("127.0.0.1", 2379)
    assert etcd_endpoint("127.0.0.1:23790,127.0.0.2:23790") == ("127.0.0.1", 23790)
    assert etcd_endpoint("https://etcd.local") == ("etcd.local", 2379)


async def test_start_fails_clearly_when_etcd_is_down() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    d = EtcdDiscovery(f"http://127.0.0.1:{port}")
    with pytest.raises(DiscoveryUnavailable) as err:
        await d.start()
    assert err.value.message.startswith(
        f"etcd discovery at http://127.0.0.1:{port} is not reachable: "
    )
    assert err.value.details == {"url": f"http://127.0.0.1:{port}"}
    assert not await d.healthy()


async def test_existing_and_new_registrations(client: Any, etcd_server: Any) -> None:
    lease = await client.lease(30)
    key = instance_key("dyn", "backend", "generate", lease.id)
    await client.put(key.encode(), value(lease.id, 24001), lease=lease)
    big_key = instance_key("dyn", "backend", "generate", BIG_ID)
    await client.put(big_key.encode(), value(BIG_ID, 24002))

    d = EtcdDiscovery(etcd_server.url)
    await d.start()
    try:
        assert [i.key for i in d.instances()] == sorted([key, big_key])
        big = d.get(big_key)
        assert big is not None
        assert big.instance_id == 18364758544493064720
        assert big.value["instance_id"] == 18364758544493064720
        assert d.lease_of(key) == lease.id
        assert await d.healthy()

        events: list[tuple[str, str]] = []
        d.subscribe(lambda kind, inst: events.append((kind, inst.key)))
        lease2 = await client.lease(30)
        key2 = instance_key("dyn", "prefill", "generate", lease2.id)
        waiter = asyncio.create_task(d.wait_for(lambda i: i.component == "prefill", timeout=5))
        await asyncio.sleep(0)
        started = time.monotonic()
        await client.put(key2.encode(), value(lease2.id, 24003, comp="prefill"), lease=lease2)
        found = await waiter
        elapsed = time.monotonic() - started
        assert found is not None
        assert (found.instance_id, found.address, found.backend, found.format) == (
            lease2.id,
            ("127.0.0.1", 24003),
            "etcd",
            "v1",
        )
        assert elapsed < 0.5, f"seen after {elapsed:.3f} s"
        await client.delete(key2.encode())
        await asyncio.wait_for(_until(lambda: d.get(key2) is None), 5)
        assert events == [("put", key2), ("delete", key2)]
    finally:
        await d.close()


async def test_older_formats_including_namespaces_seen(client: Any, disc: EtcdDiscovery) -> None:
    await client.put(b"instances/dyn/vllm/generate:1f", b'{"transport":{"nats_tcp":"h:1/x"}}')
    await client.put(b"dyn/components/Prefill/generate:2e", b"{}")
    await _until_async(disc, lambda: len(disc.instances()) == 2)
    # A namespace first seen in a current-format key gets its early-2025 prefix read too.
    await client.put(b"other/components/x/generate:3d", b"{}")  # already there when seen
    await client.put(instance_key("other", "w", "generate", 5).encode(), value(5, 1, ns="other"))
    await _until_async(disc, lambda: disc.get("other/components/x/generate:3d") is not None)
    formats = sorted((i.key, i.format) for i in disc.instances())
    assert formats == [
        ("dyn/components/Prefill/generate:2e", "early-2025"),
        ("instances/dyn/vllm/generate:1f", "2025"),
        ("other/components/x/generate:3d", "early-2025"),
        ("v1/instances/other/w/generate/5", "v1"),
    ]


async def test_remove_with_revoke_drops_the_whole_lease_at_once(
    client: Any, disc: EtcdDiscovery
) -> None:
    lease = await client.lease(30)
    key = instance_key("dyn", "backend", "generate", lease.id)
    card = f"v1/mdc/dyn/backend/generate/{lease.id:x}".encode()
    await client.put(key.encode(), value(lease.id, 24001), lease=lease)
    await client.put(card, b"{}", lease=lease)
    inst = await disc.wait_for(lambda i: i.key == key, timeout=5)
    assert inst is not None
    started = time.monotonic()
    await disc.remove(inst)
    assert time.monotonic() - started < 0.5
    assert await client.get(key.encode()) is None
    assert await client.get(card) is None  # the model card went with the lease
    assert (await client.get_lease_info(lease.id)).TTL == -1  # revoked
    assert disc.get(key) is None


async def test_remove_without_revoke_keeps_the_lease(client: Any, disc: EtcdDiscovery) -> None:
    lease = await client.lease(30)
    gen = instance_key("dyn", "backend", "generate", lease.id)
    other = instance_key("dyn", "backend", "clear_kv_blocks", lease.id)
    await client.put(gen.encode(), value(lease.id, 24001), lease=lease)
    await client.put(other.encode(), value(lease.id, 24001), lease=lease)
    inst = await disc.wait_for(lambda i: i.key == gen, timeout=5)
    assert inst is not None
    await disc.remove(inst, revoke=False)  # draining: out of discovery, process keeps its lease
    assert await client.get(gen.encode()) is None
    assert await client.get(other.encode()) is not None
    assert (await client.get_lease_info(lease.id)).TTL > 0


async def test_unparseable_value_is_skipped_with_one_log(
    client: Any, disc: EtcdDiscovery, caplog: pytest.LogCaptureFixture
) -> None:
    key = instance_key("dyn", "backend", "generate", 0xBAD)
    with caplog.at_level(logging.WARNING, logger="connector.dynamo.discovery.cache"):
        await client.put(key.encode(), b"not json")
        good = instance_key("dyn", "backend", "generate", 0x600D)
        await client.put(good.encode(), value(0x600D, 1))
        assert await disc.wait_for(lambda i: i.key == good, timeout=5) is not None
    assert disc.get(key) is None
    assert [r.getMessage() for r in caplog.records] == [
        f"discovery (etcd): skipping {key}: its value is not a JSON object: b'not json'"
    ]


async def _until(cond: Any) -> None:
    while not cond():
        await asyncio.sleep(0.01)


async def _until_async(disc: EtcdDiscovery, cond: Any, timeout: float = 5.0) -> None:
    await asyncio.wait_for(_until(cond), timeout)
