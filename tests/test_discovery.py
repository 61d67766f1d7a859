"""Discovery building blocks without a backend: parsing, the watch cache, ownership."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from pathlib import Path

import pytest

from connector.dynamo.discovery.backends import open_discovery
from connector.dynamo.discovery.cache import (
    Instance,
    InstanceCache,
    ReplicaAddress,
    listening_ports,
    match_instance,
    parse_instance,
)
from connector.dynamo.discovery.keys import encode_value, instance_key, instance_value

BIG_ID = 0xFEDCBA9876543210  # above 2**63: a float would lose it


def v1(ns: str = "ns", comp: str = "backend", ep: str = "generate", iid: int = 0x1A2B, port=4100):
    key = instance_key(ns, comp, ep, iid)
    return key, encode_value(instance_value(ns, comp, ep, iid, "127.0.0.1", port))


def test_parse_current_key_keeps_u64_exact() -> None:
    key, raw = v1(iid=BIG_ID, port=42599)
    inst = parse_instance(key, raw, "etcd")
    assert inst == Instance(
        key="v1/instances/ns/backend/generate/fedcba9876543210",
        namespace="ns",
        component="backend",
        endpoint="generate",
        instance_id=18364758544493064720,
        address=("127.0.0.1", 42599),
        value={
            "type": "Endpoint",
            "namespace": "ns",
            "component": "backend",
            "endpoint": "generate",
            "instance_id": 18364758544493064720,
            "transport": {"tcp": "127.0.0.1:42599/fedcba9876543210/ns/backend/generate"},
            "device_type": "cpu",
            "request_plane_codec": "msgpack",
        },
        backend="etcd",
        format="v1",
    )
    assert type(inst.value["instance_id"]) is int
    assert inst.instance_hex == "fedcba9876543210"


def test_parse_older_formats_with_nats_transport() -> None:
    value = b'{"transport": {"nats_tcp": "10.0.0.5:4222/x"}}'
    old = parse_instance("instances/dyn/vllm/generate:694d9a1b2c", value, "etcd")
    assert old is not None
    assert (old.namespace, old.component, old.endpoint, old.instance_id, old.format) == (
        "dyn",
        "vllm",
        "generate",
        0x694D9A1B2C,
        "2025",
    )
    assert old.address == ("10.0.0.5", 4222)
    early = parse_instance("dyn/components/Prefill/load_metrics:7f", b"{}", "etcd")
    assert early is not None
    assert (early.component, early.endpoint, early.instance_id, early.format) == (
        "Prefill",
        "load_metrics",
        0x7F,
        "early-2025",
    )
    assert early.address is None


def test_parse_rejects_unknown_keys_and_bad_values() -> None:
    assert parse_instance("v1/mdc/ns/backend/generate/1a", b"{}", "etcd") is None
    assert parse_instance("v1/instances/ns/backend/generate/1a", b"not json", "etcd") is None
    assert parse_instance("v1/instances/ns/backend/generate/1a", b"[1, 2]", "etcd") is None


async def test_cache_events_waiters_and_dedup() -> None:
    cache = InstanceCache("etcd")
    seen: list[tuple[str, str]] = []
    unsubscribe = cache.subscribe(lambda kind, inst: seen.append((kind, inst.key)))
    key_a, raw_a = v1(iid=0xA)
    key_b, raw_b = v1(iid=0xB, port=4200)

    cache._put(key_a, raw_a)
    cache._put(key_a, raw_a)  # same value: no event
    assert seen == [("put", key_a)]

    # Present now: answered at once.
    found = await cache.wait_for(lambda i: i.instance_id == 0xA, timeout=0.01)
    assert found is not None and found.key == key_a

    # Arriving later: the waiter is woken by the put itself.
    waiter = asyncio.create_task(cache.wait_for(lambda i: i.instance_id == 0xB, timeout=5))
    await asyncio.sleep(0)
    cache._put(key_b, raw_b)
    found_b = await waiter
    assert found_b is not None and found_b.address == ("127.0.0.1", 4200)
    assert cache._waiters == []

    assert await cache.wait_for(lambda i: i.component == "nope", timeout=0.01) is None
    assert cache._waiters == []

    cache._delete(key_a)
    cache._delete(key_a)  # already gone: no event
    assert seen == [("put", key_a), ("put", key_b), ("delete", key_a)]
    assert [i.key for i in cache.instances()] == [key_b]

    unsubscribe()
    cache._delete(key_b)
    assert len(seen) == 3


async def test_replace_all_drops_vanished_keys_only_in_scope() -> None:
    cache = InstanceCache("etcd")
    key_a, raw_a = v1(iid=0xA)
    cache._put(key_a, raw_a)
    cache._put("instances/ns/backend/generate:b", raw_a)
    key_c, raw_c = v1(iid=0xC)
    cache._replace_all({key_c: raw_c}, prefixes=("v1/instances/",))
    assert [i.key for i in cache.instances()] == [
        "instances/ns/backend/generate:b",
        key_c,
    ]


def test_bad_value_is_skipped_logged_once_and_previous_kept(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cache = InstanceCache("file")
    key, raw = v1()
    cache._put(key, raw)
    with caplog.at_level(logging.WARNING, logger="connector.dynamo.discovery.cache"):
        assert cache._put(key, b'{"torn": ') is None
        assert cache._put(key, b'{"torn": ') is None
        assert cache._put(key, b"") is None  # empty: a file mid-rewrite, not worth a warning
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "discovery (file): skipping v1/instances/ns/backend/generate/1a2b: "
        "its value is not a JSON object: b'{\"torn\": '"
    ]
    assert [i.key for i in cache.instances()] == [key]


def test_broken_subscriber_does_not_stop_others() -> None:
    cache = InstanceCache("etcd")
    seen: list[str] = []

    def broken(kind: str, inst: Instance) -> None:
        raise RuntimeError("boom")

    cache.subscribe(broken)
    cache.subscribe(lambda kind, inst: seen.append(kind))
    key, raw = v1()
    cache._put(key, raw)
    assert seen == ["put"]


def _inst(port: int | None, host: str = "127.0.0.1") -> Instance:
    key, raw = v1(port=port or 1)
    inst = parse_instance(key, raw, "file")
    assert inst is not None
    if port is None:
        return Instance(**{**inst.__dict__, "address": None})
    return Instance(**{**inst.__dict__, "address": (host, port)})


def test_match_by_allocated_port_then_listener_pid() -> None:
    replicas = [
        ReplicaAddress("Decode/1", frozenset({20001, 20002}), frozenset({101, 102})),
        ReplicaAddress("Decode/2", frozenset({20003, 20004}), frozenset({201})),
    ]
    assert match_instance(_inst(20004), replicas) == "Decode/2"
    assert match_instance(_inst(20001), replicas) == "Decode/1"
    # Not an allocated port: the pid listening on it decides.
    assert match_instance(_inst(31000), replicas, listeners={31000: 102}) == "Decode/1"
    # Listener outside every replica tree, or nothing listening: foreign.
    assert match_instance(_inst(31000), replicas, listeners={31000: 999}) is None
    assert match_instance(_inst(31000), replicas) is None
    assert match_instance(_inst(None), replicas) is None


def test_match_ignores_other_hosts_when_local_hosts_given() -> None:
    replicas = [ReplicaAddress("Decode/1", frozenset({20001}), frozenset())]
    local = frozenset({"192.168.1.7"})
    assert match_instance(_inst(20001, "10.9.9.9"), replicas, local_hosts=local) is None
    assert match_instance(_inst(20001, "192.168.1.7"), replicas, local_hosts=local) == "Decode/1"
    assert match_instance(_inst(20001, "127.0.0.1"), replicas, local_hosts=local) == "Decode/1"
    assert match_instance(_inst(20001, "10.9.9.9"), replicas) == "Decode/1"


def test_listening_ports_of_own_process() -> None:
    with socket.socket() as listener, socket.socket() as unbound:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        unbound.bind(("127.0.0.1", 0))  # bound, not listening: not a listener
        unbound_port = unbound.getsockname()[1]
        ports = listening_ports([os.getpid(), 999_999_999])
    assert ports[port] == os.getpid()
    assert unbound_port not in ports


def test_open_discovery_validates_arguments(tmp_path: Path) -> None:
    no_root = r"^file discovery needs a root directory \(DYN_FILE_KV\)$"
    with pytest.raises(ValueError, match=no_root):
        open_discovery("file")
    with pytest.raises(ValueError, match=r"^etcd discovery needs an etcd URL \(ETCD_ENDPOINTS\)$"):
        open_discovery("etcd")
    with pytest.raises(ValueError, match=r"^unknown discovery backend 'k8s': expected"):
        open_discovery("k8s")
    disc = open_discovery("file", file_root=tmp_path)
    assert disc.replica_env() == {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(tmp_path)}
    etcd = open_discovery("etcd", etcd_url="127.0.0.1:23790")
    assert etcd.replica_env() == {
        "DYN_DISCOVERY_BACKEND": "etcd",
        "ETCD_ENDPOINTS": "http://127.0.0.1:23790",
    }


def test_registered_at_is_when_the_cache_first_saw_the_key() -> None:
    cache = InstanceCache("etcd")
    key, raw = v1()
    assert cache.registered_at(key) is None
    before = time.time()
    cache._put(key, raw)
    seen = cache.registered_at(key)
    assert seen is not None and before <= seen <= time.time()
    _, raw2 = v1(port=9999)
    cache._put(key, raw2)  # a new value for the same key: same registration
    assert cache.registered_at(key) == seen
    cache._delete(key)
    assert cache.registered_at(key) is None
