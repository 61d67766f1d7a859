"""The mock worker as a real subprocess, checked by reading etcd keys, files, HTTP and NATS."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aetcd
import aiohttp
import nats
import psutil
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connector.dynamo.discovery.keys import file_path, instance_key
from connector.mockworker.config import ConfigError, parse_config
from tests.servers import (
    EtcdServer,
    NatsServer,
    free_port,
    stop_process_tree,
    wait_until,
    wait_until_async,
)

pytestmark = pytest.mark.integration

REGISTERED = re.compile(r"registered instance ([0-9a-f]+) as ")
# Variables a developer's shell may carry that would change what the worker does.
_INHERITED = ("DYN_", "ETCD_", "NATS_SERVER")


@dataclass
class Worker:
    proc: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def instance_id(self, timeout: float = 10.0) -> int:
        def registered() -> int | None:
            m = REGISTERED.search(self.log())
            if m:
                return int(m.group(1), 16)
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited {self.proc.returncode}:\n{self.log()}")
            return None

        value = wait_until(registered, timeout=timeout, interval=0.02)
        assert value is not None
        return value

    def stop(self, sig: signal.Signals = signal.SIGTERM, timeout: float = 10.0) -> int:
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Any]:
    workers: list[Worker] = []

    def start(*args: str, **env: str) -> Worker:
        base = {k: v for k, v in os.environ.items() if not k.startswith(_INHERITED)}
        log_path = tmp_path / f"worker{len(workers)}.log"
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "connector.mockworker", *args],
                env={**base, "PYTHONUNBUFFERED": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=Path(__file__).resolve().parent.parent,
            )
        worker = Worker(proc, log_path)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        if worker.proc.poll() is None:
            stop_process_tree(worker.proc)


def _file_env(root: Path, **extra: str) -> dict[str, str]:
    return {"DYN_DISCOVERY_BACKEND": "file", "DYN_FILE_KV": str(root), **extra}


# --------------------------------------------------------------------------- file backend


def test_file_backend_writes_exact_entries_refreshes_them_and_removes_them_on_sigterm(
    spawn: Any, tmp_path: Path
) -> None:
    root = tmp_path / "kv"
    rpc_port = free_port()
    big_id = 2**63 + 0x1234  # above 2^63: must survive JSON as an exact int
    worker = spawn(
        "--endpoint",
        "generate",
        "--endpoint",
        "prefill",
        "--instance-id",
        f"{big_id:x}",
        **_file_env(
            root, DYN_NAMESPACE="ns", DYN_COMPONENT="backend", DYN_TCP_RPC_PORT=str(rpc_port)
        ),
    )
    assert worker.instance_id() == big_id
    files = sorted((root / "v1" / "instances").iterdir())
    assert [f.name for f in files] == [
        f"ns%2Fbackend%2Fgenerate%2F{big_id:x}",
        f"ns%2Fbackend%2Fprefill%2F{big_id:x}",
    ]
    assert files[0] == file_path(root, instance_key("ns", "backend", "generate", big_id))
    raw = files[0].read_text()
    assert f'"instance_id":{big_id},' in raw
    assert json.loads(raw) == {
        "type": "Endpoint",
        "namespace": "ns",
        "component": "backend",
        "endpoint": "generate",
        "instance_id": 9223372036854780468,
        "transport": {"tcp": f"127.0.0.1:{rpc_port}/{big_id:x}/ns/backend/generate"},
        "device_type": "cpu",
        "request_plane_codec": "msgpack",
    }
    # The advertised request-plane port accepts connections.
    socket.create_connection(("127.0.0.1", rpc_port), timeout=2).close()
    # Alive means a fresh mtime: it moves within the 2 s refresh period.
    first = files[0].stat().st_mtime_ns
    wait_until(lambda: files[0].stat().st_mtime_ns > first, timeout=4)

    assert worker.stop(signal.SIGTERM) == 0
    assert list((root / "v1" / "instances").iterdir()) == []
    log = worker.log()
    assert f"deregistering instance {big_id:x}: received SIGTERM" in log
    assert f"deregistered instance {big_id:x}" in log


def test_random_instance_ids_are_u64_and_match_the_file_name(spawn: Any, tmp_path: Path) -> None:
    root = tmp_path / "kv"
    worker = spawn(**_file_env(root))
    iid = worker.instance_id()
    assert 0 < iid < 2**64
    path = file_path(root, instance_key("dynamo", "backend", "generate", iid))
    assert json.loads(path.read_text())["instance_id"] == iid
    assert worker.stop(signal.SIGINT) == 0
    assert not path.exists()


def test_sigkill_leaves_the_file_behind(spawn: Any, tmp_path: Path) -> None:
    root = tmp_path / "kv"
    worker = spawn(**_file_env(root))
    iid = worker.instance_id()
    path = file_path(root, instance_key("dynamo", "backend", "generate", iid))
    assert worker.stop(signal.SIGKILL) == -signal.SIGKILL
    assert json.loads(path.read_text())["instance_id"] == iid


def test_a_removed_file_is_not_written_again(spawn: Any, tmp_path: Path) -> None:
    # The connector drains a replica by deleting its entry; the refresh must not undo that.
    root = tmp_path / "kv"
    worker = spawn(**_file_env(root))
    iid = worker.instance_id()
    path = file_path(root, instance_key("dynamo", "backend", "generate", iid))
    path.unlink()
    wait_until(lambda: "was removed; not writing it again" in worker.log(), timeout=4)
    assert not path.exists()
    assert worker.stop() == 0


def test_exit_after_with_a_code_is_a_crash_that_leaves_the_entry(
    spawn: Any, tmp_path: Path
) -> None:
    root = tmp_path / "kv"
    worker = spawn("--exit-after", "0.5", "--exit-code", "3", **_file_env(root))
    iid = worker.instance_id()
    assert worker.proc.wait(timeout=10) == 3
    path = file_path(root, instance_key("dynamo", "backend", "generate", iid))
    assert path.exists()
    assert (
        f"exiting with code 3 after 0.5s without deregistering instance {iid:x} (simulated crash)"
        in worker.log()
    )


def test_exit_after_with_code_zero_deregisters(spawn: Any, tmp_path: Path) -> None:
    root = tmp_path / "kv"
    worker = spawn("--exit-after", "0.5", **_file_env(root))
    iid = worker.instance_id()
    assert worker.proc.wait(timeout=10) == 0
    assert list((root / "v1" / "instances").iterdir()) == []
    assert f"deregistering instance {iid:x}: --exit-after 0.5" in worker.log()


# --------------------------------------------------------------------------- etcd


async def test_etcd_registers_keys_under_its_lease_and_revokes_it_on_sigterm(
    spawn: Any, etcd_server: EtcdServer
) -> None:
    worker = spawn(
        "--endpoint",
        "generate",
        "--endpoint",
        "clear_kv_blocks",
        DYN_DISCOVERY_BACKEND="etcd",
        ETCD_ENDPOINTS=etcd_server.url,
        ETCD_LEASE_TTL="5",
        DYN_NAMESPACE="ns",
        DYN_COMPONENT="decode",
    )
    iid = await asyncio.to_thread(worker.instance_id)
    keys = [instance_key("ns", "decode", ep, iid) for ep in ("generate", "clear_kv_blocks")]
    async with aetcd.Client(etcd_server.host, etcd_server.port, timeout=5) as client:
        got = await client.get(keys[0].encode())
        assert got is not None
        assert got.lease == iid  # the instance id is the lease id
        value = json.loads(got.value)
        assert value["instance_id"] == iid
        assert value["transport"]["tcp"].startswith("127.0.0.1:")
        assert value["transport"]["tcp"].endswith(f"/{iid:x}/ns/decode/generate")
        info = await client.get_lease_info(iid, keys=True)
        assert info.grantedTTL == 5
        assert 0 < info.TTL <= 5
        assert sorted(k.decode() for k in info.keys) == sorted(keys)

        assert await asyncio.to_thread(worker.stop, signal.SIGTERM) == 0
        for key in keys:
            assert await client.get(key.encode()) is None
        assert (await client.get_lease_info(iid)).TTL == -1  # revoked


async def test_etcd_lease_is_kept_alive_and_a_killed_worker_stays_until_expiry(
    spawn: Any, etcd_server: EtcdServer
) -> None:
    worker = spawn(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=etcd_server.url, ETCD_LEASE_TTL="2")
    iid = await asyncio.to_thread(worker.instance_id)
    key = instance_key("dynamo", "backend", "generate", iid).encode()
    async with aetcd.Client(etcd_server.host, etcd_server.port, timeout=5) as client:
        # Alive past its TTL: the lease is being refreshed.
        await asyncio.sleep(2.5)
        assert await client.get(key) is not None
        assert await asyncio.to_thread(worker.stop, signal.SIGKILL) == -signal.SIGKILL
        assert await client.get(key) is not None  # left behind, like a killed runtime

        async def gone() -> bool:
            return await client.get(key) is None

        await wait_until_async(gone, timeout=6)


async def test_unreachable_etcd_fails_with_a_clear_message(spawn: Any) -> None:
    port = free_port()
    worker = spawn(DYN_DISCOVERY_BACKEND="etcd", ETCD_ENDPOINTS=f"http://127.0.0.1:{port}")
    assert await asyncio.to_thread(worker.proc.wait, 15) == 1
    assert f"ERROR mockworker: cannot register in etcd at http://127.0.0.1:{port}: " in worker.log()


# --------------------------------------------------------------------------- HTTP


async def _get(session: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with session.get(url) as resp:
        return resp.status, await resp.text()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_health_is_503_until_registered_then_metrics_move(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    worker = spawn(
        "--startup-delay",
        "1.0",
        "--request-rate",
        "50",
        **_file_env(tmp_path / "kv", DYN_SYSTEM_PORT=str(port), DYN_NAMESPACE="ns"),
    )
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as session:

        async def answers() -> tuple[int, str] | None:
            try:
                return await _get(session, f"{base}/health")
            except aiohttp.ClientConnectionError:
                return None

        answered = await wait_until_async(answers, timeout=10)
        assert answered is not None
        status, body = answered
        assert status == 503
        assert json.loads(body)["status"] == "notready"
        assert await _get(session, f"{base}/live") == (200, '{"status": "live"}')

        iid = await asyncio.to_thread(worker.instance_id)
        status, body = await _get(session, f"{base}/health")
        assert status == 200
        health = json.loads(body)
        assert health["status"] == "ready"
        assert health["instance_id"] == f"{iid:x}"
        assert health["endpoints"] == {"generate": "ready"}

        labels = (
            ("dynamo_component", "backend"),
            ("dynamo_endpoint", "generate"),
            ("dynamo_namespace", "ns"),
            ("worker_id", f"{iid:x}"),
        )
        async with session.get(f"{base}/metrics") as resp:
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            first = _samples(await resp.text())
        assert ("dynamo_component_inflight_requests", labels) in first
        assert ("dynamo_component_request_duration_seconds_count", labels) in first
        assert ("dynamo_component_uptime_seconds", (("worker_id", f"{iid:x}"),)) in first
        assert not [name for name, _ in first if name.endswith("_created")]
        assert not [name for name, _ in first if name.startswith("dynamo_frontend_")]
        before = first[("dynamo_component_requests_total", labels)]

        async def moved() -> bool:
            _, text = await _get(session, f"{base}/metrics")
            return _samples(text)[("dynamo_component_requests_total", labels)] > before

        await wait_until_async(moved, timeout=5)
    assert worker.stop() == 0


async def test_frontend_role_exports_frontend_series(spawn: Any) -> None:
    port, http_port = free_port(), free_port()
    worker = spawn(
        "--role",
        "frontend",
        "--model",
        "m1",
        DYN_SYSTEM_PORT=str(port),
        DYN_HTTP_PORT=str(http_port),
    )
    iid = await asyncio.to_thread(worker.instance_id)
    async with aiohttp.ClientSession() as session:

        async def ttft_observed() -> dict[Any, float] | None:
            _, text = await _get(session, f"http://127.0.0.1:{port}/metrics")
            samples = _samples(text)
            count = samples[
                ("dynamo_frontend_time_to_first_token_seconds_count", (("model", "m1"),))
            ]
            return samples if count > 0 else None

        samples = await wait_until_async(ttft_observed, timeout=5)
        # The same registry on the HTTP port, where the real frontend serves /metrics.
        status, text = await _get(session, f"http://127.0.0.1:{http_port}/metrics")
        assert status == 200
        assert ("dynamo_frontend_queued_requests", (("model", "m1"),)) in _samples(text)
    assert isinstance(samples, dict)
    assert ("dynamo_frontend_queued_requests", (("model", "m1"),)) in samples
    assert ("dynamo_frontend_inflight_requests", (("model", "m1"),)) in samples
    fe_requests = (
        ("endpoint", "chat_completions"),
        ("model", "m1"),
        ("request_type", "stream"),
        ("status", "success"),
    )
    assert ("dynamo_frontend_requests_total", fe_requests) in samples
    component = (
        ("dynamo_component", "frontend"),
        ("dynamo_endpoint", "generate"),
        ("dynamo_namespace", "dynamo"),
        ("worker_id", f"{iid:x}"),
    )
    assert ("dynamo_component_requests_total", component) in samples
    assert worker.stop() == 0


# --------------------------------------------------------------------------- load


def test_memory_ballast_is_resident_and_cpu_burn_uses_cpu(spawn: Any) -> None:
    worker = spawn("--memory-mb", "200", "--cpu-burn", "0.8", "--request-rate", "0")
    worker.instance_id()
    proc = psutil.Process(worker.pid)
    assert proc.memory_info().rss >= 200 * 1024 * 1024
    before = proc.cpu_times()
    t0 = time.monotonic()
    time.sleep(1.0)
    after = proc.cpu_times()
    elapsed = time.monotonic() - t0
    used = (after.user + after.system) - (before.user + before.system)
    # 0.8 of a core asked; the machine is shared, so only demand clearly more than idle.
    assert used >= 0.25 * elapsed, used
    assert worker.stop() == 0


# --------------------------------------------------------------------------- queue


async def test_producer_fills_the_queue_and_consumer_drains_it(
    spawn: Any, nats_server: NatsServer
) -> None:
    producer = spawn(
        "--queue", "producer", "--messages", "5", "--rate", "100", NATS_SERVER=nats_server.url
    )
    await asyncio.to_thread(producer.instance_id)
    await wait_until_async(lambda: "published 5 messages" in producer.log(), timeout=10)
    nc = await nats.connect(nats_server.url)
    try:
        js = nc.jetstream()
        info = await js.consumer_info("dynamo_prefill_queue", "worker-group")
        assert info.num_pending == 5
        assert info.config.filter_subject == "dynamo_prefill_queue.queue"
        msg = await js.get_msg("dynamo_prefill_queue", 1)
        assert json.loads(msg.data or b"")["seq"] == 1

        consumer = spawn("--queue", "consumer", "--rate", "100", NATS_SERVER=nats_server.url)
        await asyncio.to_thread(consumer.instance_id)

        async def drained() -> bool:
            info = await js.consumer_info("dynamo_prefill_queue", "worker-group")
            return bool(
                info.num_pending == 0
                and info.num_ack_pending == 0
                and info.ack_floor.stream_seq == 5
            )

        await wait_until_async(drained, timeout=10)
    finally:
        await nc.close()
    assert producer.stop() == 0
    assert consumer.stop() == 0


async def test_unreachable_nats_ends_the_worker_with_code_1(spawn: Any, tmp_path: Path) -> None:
    port = free_port()
    worker = spawn(
        "--queue",
        "consumer",
        "--nats-url",
        f"nats://127.0.0.1:{port}",
        **_file_env(tmp_path / "kv"),
    )
    iid = await asyncio.to_thread(worker.instance_id)
    assert await asyncio.to_thread(worker.proc.wait, 15) == 1
    assert (
        f"deregistering instance {iid:x}: prefill queue failed: cannot connect to NATS at "
        f"nats://127.0.0.1:{port}: " in worker.log()
    )
    assert list((tmp_path / "kv" / "v1" / "instances").iterdir()) == []


# --------------------------------------------------------------------------- config


def test_configuration_comes_from_dynamo_env_and_flags_override() -> None:
    env = {
        "DYN_NAMESPACE": "ns",
        "DYN_COMPONENT": "prefill",
        "DYN_FILE_KV": "/kv",
        "DYN_SYSTEM_PORT": "9100",
        "DYN_TCP_RPC_PORT": "9200",
        "ETCD_LEASE_TTL": "7",
        "NATS_SERVER": "nats://127.0.0.1:4333",
    }
    cfg = parse_config([], env)
    assert (cfg.namespace, cfg.component, cfg.endpoints) == ("ns", "prefill", ("generate",))
    assert (cfg.discovery, cfg.file_kv, cfg.lease_ttl_s) == ("file", "/kv", 7)
    assert (cfg.system_port, cfg.rpc_host, cfg.rpc_port) == (9100, "127.0.0.1", 9200)
    assert (cfg.nats_url, cfg.stream) == ("nats://127.0.0.1:4333", "ns_prefill_queue")
    flagged = parse_config(["--component", "decode", "--discovery", "none"], env)
    assert (flagged.component, flagged.discovery) == ("decode", "none")
    assert parse_config([], {}).discovery == "none"
    assert parse_config([], {"ETCD_ENDPOINTS": "http://127.0.0.1:1"}).discovery == "etcd"
    assert parse_config(["--role", "frontend"], {}).component == "frontend"
    # Only a frontend serves on its HTTP port, as only the real frontend has one.
    http = {"DYN_HTTP_PORT": "9300", "DYN_HTTP_HOST": "127.0.0.2"}
    frontend = parse_config(["--role", "frontend"], http)
    assert (frontend.http_host, frontend.http_port) == ("127.0.0.2", 9300)
    assert parse_config([], http).http_port == 0


@pytest.mark.parametrize(
    ("argv", "env", "message"),
    [
        (
            ["--discovery", "file"],
            {},
            "file discovery needs a root directory: set DYN_FILE_KV or --file-kv",
        ),
        (
            [],
            {"DYN_DISCOVERY_BACKEND": "kubernetes"},
            "DYN_DISCOVERY_BACKEND='kubernetes': the mock worker supports file, etcd or none",
        ),
        ([], {"ETCD_LEASE_TTL": "soon"}, "ETCD_LEASE_TTL='soon': not an integer"),
        (["--cpu-burn", "1.5"], {}, "--cpu-burn must be within 0..1, got 1.5"),
        (
            ["--use-dynamo-runtime"],
            {"DYN_SYSTEM_PORT": "40000"},
            "DYN_SYSTEM_PORT=40000: ai-dynamo-runtime 1.6.1 reads it as a signed 16-bit "
            "number, so it must be <= 32767",
        ),
        (["--component", "a/b"], {}, "component 'a/b': only letters, digits, '_' and '-' allowed"),
        (
            ["--instance-id", "ff"],
            {"DYN_DISCOVERY_BACKEND": "etcd"},
            "--instance-id works only with the file or no backend: with etcd the id is the "
            "lease id, and the real runtime picks its own",
        ),
    ],
)
def test_bad_configuration_is_named(argv: list[str], env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(argv, env)
    assert str(err.value) == message


def test_bad_configuration_exits_2_with_the_message(spawn: Any) -> None:
    worker = spawn("--discovery", "file")
    assert worker.proc.wait(timeout=10) == 2
    assert worker.log() == (
        "mockworker: error: file discovery needs a root directory: set DYN_FILE_KV or --file-kv\n"
    )


# --------------------------------------------------------------------------- real runtime


async def test_real_dynamo_runtime_registers_serves_metrics_and_deregisters(
    spawn: Any, tmp_path: Path
) -> None:
    pytest.importorskip("dynamo.runtime", reason="ai-dynamo-runtime is not installed")
    root = tmp_path / "kv"
    port, rpc_port = free_port(below=32768), free_port()
    worker = spawn(
        "--use-dynamo-runtime",
        "--request-rate",
        "20",
        **_file_env(
            root, DYN_NAMESPACE="ns", DYN_SYSTEM_PORT=str(port), DYN_TCP_RPC_PORT=str(rpc_port)
        ),
    )
    iid = await asyncio.to_thread(worker.instance_id, 30)
    path = file_path(root, instance_key("ns", "backend", "generate", iid))
    value = json.loads(path.read_text())
    assert value["instance_id"] == iid
    assert value["transport"] == {"tcp": f"127.0.0.1:{rpc_port}/{iid:x}/ns/backend/generate"}
    labels = (
        ("dynamo_component", "backend"),
        ("dynamo_endpoint", "generate"),
        ("dynamo_namespace", "ns"),
        ("worker_id", f"{iid:x}"),
    )
    async with aiohttp.ClientSession() as session:
        status, body = await _get(session, f"http://127.0.0.1:{port}/health")
        assert status == 200, body
        assert json.loads(body)["status"] == "ready"

        async def served() -> bool:
            _, text = await _get(session, f"http://127.0.0.1:{port}/metrics")
            return _samples(text).get(("dynamo_component_requests_total", labels), 0) > 0

        await wait_until_async(served, timeout=10)
    assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 15) == 0
    assert not path.exists()


async def test_real_dynamo_runtime_registers_in_etcd_under_its_lease(
    spawn: Any, etcd_server: EtcdServer
) -> None:
    pytest.importorskip("dynamo.runtime", reason="ai-dynamo-runtime is not installed")
    worker = spawn(
        "--use-dynamo-runtime",
        DYN_DISCOVERY_BACKEND="etcd",
        ETCD_ENDPOINTS=etcd_server.url,
        ETCD_LEASE_TTL="5",
    )
    iid = await asyncio.to_thread(worker.instance_id, 30)
    key = instance_key("dynamo", "backend", "generate", iid).encode()
    async with aetcd.Client(etcd_server.host, etcd_server.port, timeout=5) as client:
        got = await client.get(key)
        assert got is not None
        assert got.lease == iid
        assert json.loads(got.value)["instance_id"] == iid
        assert (await client.get_lease_info(iid)).grantedTTL == 5
        assert await asyncio.to_thread(worker.stop, signal.SIGTERM, 15) == 0
        assert await client.get(key) is None
