"""Resources through a real LocalConnector and circusd: GPUs from the NVML fake replaying the
H100 capture, ports bound by the mock worker, refusals before anything spawns, partial
scale-ups; and (``-m gpu``) a real CUDA replica released only after it exits."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema_rs
import psutil
import pytest

from connector.api.schemas import MACHINE_RESOURCES, NAMED
from connector.errors import ResourcesExhausted
from connector.graph.model import (
    PortSpec,
    Readiness,
    ReadinessKind,
    ResourceRequest,
    RestartPolicy,
    SocketSpec,
)
from connector.resources.nvml import open_gpu_backend
from tests.core_helpers import (
    alive,
    kinds,
    make_graph,
    phases,
    pids,
    python_cmd,
    replica_ids,
    running,
    svc,
    wait_until,
)
from tests.nvml_fakes import H100_CAPTURED_PID_MEMORY, H100_UUID, capture_path, idle_capture

pytestmark = pytest.mark.integration

# dynamo-local's mock worker, not Dynamo's mocker: these tests need a process that binds
# exactly the ports and sockets it is handed and proves it (readiness), many replicas per
# test, and no Dynamo behaviour at all.
MOCK_WORKER = (sys.executable, "-m", "connector.mockworker", "--discovery", "none")
# The mock worker serves /health on DYN_SYSTEM_PORT and listens on DYN_TCP_RPC_PORT: its
# readiness proves it bound the port it was given.
DECODE = svc(
    "Decode",
    MOCK_WORKER,
    max_replicas=4,
    resources=ResourceRequest(gpu=1),
    ports=(PortSpec("system", env="DYN_SYSTEM_PORT"), PortSpec("rpc", env="DYN_TCP_RPC_PORT")),
    readiness=Readiness(
        kind=ReadinessKind.HTTP,
        url="http://127.0.0.1:{port.system}/health",
        timeout_s=30,
        period_s=0.05,
    ),
)
HALF = svc(
    "Half",
    python_cmd("import time; time.sleep(300)"),
    max_replicas=4,
    resources=ResourceRequest(gpu=0.5),
)


def conforms(machine: dict[str, Any]) -> None:
    """``machine`` is what the API documents for GET /v1/resources (its OpenAPI schema)."""
    document = {**MACHINE_RESOURCES, "components": {"schemas": NAMED}}
    jsonschema_rs.Draft202012Validator(document).validate(machine)


def environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().split("=", 1) for item in raw if b"=" in item)


def listening(pid: int) -> set[int]:
    conns = psutil.Process(pid).net_connections(kind="inet")
    return {c.laddr.port for c in conns if c.status == psutil.CONN_LISTEN}


@pytest.fixture
def idle_h100(tmp_path: Path) -> str:
    """The H100 capture with its load process removed: one free GPU."""
    return f"fake:{idle_capture(tmp_path)}"


async def test_a_gpu_replica_gets_the_uuid_and_a_second_is_refused_before_spawning(
    tmp_path: Path, idle_h100: str
) -> None:
    async with running(make_graph(DECODE), tmp_path / "wd", gpu_backend=idle_h100) as conn:
        assert await conn.scale_component("Decode", 1, timeout_s=30) is True
        (rec,) = conn.state.replicas_of("Decode")
        assert rec.pid is not None and rec.reservation is not None
        ports = rec.reservation["ports"]
        env = environ(rec.pid)
        assert {k: env[k] for k in ("CUDA_VISIBLE_DEVICES", "DYNAMO_LOCAL_GPUS")} == {
            "CUDA_VISIBLE_DEVICES": H100_UUID,
            "DYNAMO_LOCAL_GPUS": H100_UUID,
        }
        assert env["DYNAMO_LOCAL_REPLICA"] == "Decode/1"
        assert (env["DYN_SYSTEM_PORT"], env["DYN_TCP_RPC_PORT"]) == (
            str(ports["system"]),
            str(ports["rpc"]),
        )
        assert {ports["system"], ports["rpc"]} <= listening(rec.pid)

        with pytest.raises(ResourcesExhausted) as info:
            await conn.scale_component("Decode", 2, timeout_s=30)
        assert info.value.message == (
            "Decode replica 2 needs 1 GPU, 0 free; GPU-3916acbf… held by Decode/1"
        )
        assert info.value.details == {
            "needed": 1,
            "free": 0,
            "holders": {H100_UUID: ["Decode/1"]},
            "component": "Decode",
            "requested": 2,
            "before": 1,
            "started": [],
            "target": 1,
        }
        assert conn.state.components["Decode"].target == 1
        assert await conn.get_component_replicas("Decode") == 1
        assert replica_ids(conn, "Decode") == ["Decode/1"]
        (refused,) = kinds(conn, "allocate", "Decode")
        assert (refused.outcome, refused.details["started"]) == ("refused", [])
        machine = await conn.get_machine_resources()
        conforms(machine)
        (gpu,) = machine["gpus"]
        assert (gpu["state"], gpu["owners"], gpu["fraction_used"]) == (
            "allocated",
            ["Decode/1"],
            1.0,
        )

        pid = rec.pid
        assert await conn.scale_component("Decode", 0, timeout_s=30) is True
        assert not alive(pid)
        machine = await conn.get_machine_resources()
        assert (machine["gpus"][0]["state"], machine["gpus"][0]["owners"]) == ("free", [])
        assert machine["ports"] == {}
        # The GPU is free again: the next replica gets it.
        assert await conn.scale_component("Decode", 1, timeout_s=30) is True
        assert replica_ids(conn, "Decode") == ["Decode/2"]


async def test_gpu_templates_reach_the_command_and_the_env(tmp_path: Path, idle_h100: str) -> None:
    # Two GPUs (the idle capture twice): a tensor-parallel replica names its GPU count.
    two = f"{idle_h100},{idle_h100.removeprefix('fake:')}"
    tp = svc(
        "Tp",
        (
            *python_cmd("import time; time.sleep(300)"),
            *("--tensor-parallel-size", "{gpu.count}", "--gpus", "{gpu.uuids}"),
        ),
        max_replicas=1,
        resources=ResourceRequest(gpu=2),
        envs=(("MEM_UTIL", "{gpu.fraction}"),),
    )
    async with running(make_graph(tp, HALF), tmp_path / "wd", gpu_backend=two) as conn:
        assert await conn.scale_component("Tp", 1, timeout_s=30) is True
        (rec,) = conn.state.replicas_of("Tp")
        assert rec.pid is not None and rec.reservation is not None
        uuids = ",".join(rec.reservation["gpus"])
        assert len(rec.reservation["gpus"]) == 2
        assert psutil.Process(rec.pid).cmdline()[-4:] == [
            "--tensor-parallel-size", "2", "--gpus", uuids,
        ]  # fmt: skip
        assert environ(rec.pid)["MEM_UTIL"] == "1"


async def test_half_gpu_replicas_share_one_gpu_and_a_third_is_refused(
    tmp_path: Path, idle_h100: str
) -> None:
    async with running(make_graph(HALF), tmp_path / "wd", gpu_backend=idle_h100) as conn:
        assert await conn.scale_component("Half", 2, timeout_s=30) is True
        for pid in pids(conn, "Half").values():
            assert pid is not None
            env = environ(pid)
            assert (env["CUDA_VISIBLE_DEVICES"], env["DYNAMO_LOCAL_GPU_MEMORY_FRACTION"]) == (
                H100_UUID,
                "0.5",
            )
        with pytest.raises(ResourcesExhausted) as info:
            await conn.scale_component("Half", 3, timeout_s=30)
        assert info.value.message == (
            "Half replica 3 needs 0.5 of a GPU, 0 free; GPU-3916acbf… held by Half/1, Half/2"
        )
        assert (info.value.details["started"], info.value.details["target"]) == ([], 2)
        assert replica_ids(conn, "Half") == ["Half/1", "Half/2"]
        (gpu,) = (await conn.get_machine_resources())["gpus"]
        assert (gpu["owners"], gpu["fraction_used"]) == (["Half/1", "Half/2"], 1.0)


async def test_a_partial_scale_up_starts_what_fits_and_says_which(
    tmp_path: Path, idle_h100: str
) -> None:
    async with running(make_graph(HALF), tmp_path / "wd", gpu_backend=idle_h100) as conn:
        with pytest.raises(ResourcesExhausted) as info:
            await conn.scale_component("Half", 3, timeout_s=30)
        assert info.value.details == {
            "needed": 0.5,
            "free": 0,
            "holders": {H100_UUID: ["Half/1", "Half/2"]},
            "component": "Half",
            "requested": 3,
            "before": 0,
            "started": ["Half/1", "Half/2"],
            "target": 2,
        }
        assert conn.state.components["Half"].target == 2
        await wait_until(lambda: phases(conn, "Half") == {"Half/1": "ready", "Half/2": "ready"}, 20)
        assert all(alive(p) for p in pids(conn, "Half").values())
        (refused,) = kinds(conn, "allocate", "Half")
        assert refused.details["started"] == ["Half/1", "Half/2"]


async def test_the_capture_as_is_has_its_gpu_held_by_a_foreign_process(tmp_path: Path) -> None:
    spec = f"fake:{capture_path()}"
    async with running(make_graph(DECODE), tmp_path / "wd", gpu_backend=spec) as conn:
        with pytest.raises(ResourcesExhausted) as info:
            await conn.scale_component("Decode", 1, timeout_s=30)
        assert info.value.message == (
            "Decode replica 1 needs 1 GPU, 0 free; "
            "GPU-3916acbf… busy with foreign processes (3.1Gi of GPU memory)"
        )
        assert (info.value.details["started"], info.value.details["target"]) == ([], 0)
        assert replica_ids(conn, "Decode") == []
        (gpu,) = (await conn.get_machine_resources())["gpus"]
        assert (gpu["owners"], gpu["foreign_memory_bytes"]) == ([], H100_CAPTURED_PID_MEMORY)


LISTENER = svc(
    "Api",
    python_cmd(
        "import os, socket, time\n"
        "s = socket.socket(); s.bind(('127.0.0.1', int(os.environ['PORT']))); s.listen()\n"
        "time.sleep(300)\n"
    ),
    max_replicas=1,
    ports=(PortSpec("main", env="PORT"),),
    readiness=Readiness(kind=ReadinessKind.TCP, port="main", timeout_s=30, period_s=0.05),
    # A second of backoff: time for the test to take the port before the restart.
    restart=RestartPolicy(backoff_base_s=1.0, backoff_max_s=1.0),
)


async def test_a_port_taken_while_a_replica_was_down_moves_before_it_restarts(
    tmp_path: Path,
) -> None:
    async with running(make_graph(LISTENER), tmp_path / "wd") as conn:
        assert await conn.scale_component("Api", 1, timeout_s=30) is True
        (rec,) = conn.state.replicas_of("Api")
        assert rec.pid is not None and rec.reservation is not None
        old_pid, old_port = rec.pid, rec.reservation["ports"]["main"]
        os.kill(old_pid, signal.SIGKILL)
        await wait_until(lambda: not alive(old_pid), 10)
        squatter = socket.socket()
        squatter.bind(("127.0.0.1", old_port))  # someone else takes the port meanwhile
        squatter.listen()
        with squatter:
            await wait_until(lambda: phases(conn, "Api") == {"Api/1": "ready"}
                             and pids(conn, "Api")["Api/1"] != old_pid, 20)  # fmt: skip
            (rec,) = conn.state.replicas_of("Api")
            assert rec.reservation is not None and rec.pid is not None
            new_port = rec.reservation["ports"]["main"]
            assert new_port != old_port
            assert environ(rec.pid)["PORT"] == str(new_port)
            assert new_port in listening(rec.pid)
            me = psutil.Process().name()
            (moved,) = [e for e in kinds(conn, "allocate", "Api") if e.outcome == "ok"]
            assert moved.reason == (
                f"Api/1: port main {old_port} is taken by pid {os.getpid()} ({me}); "
                f"moved to {new_port}"
            )
            assert (await conn.get_machine_resources())["ports"] == {"Api/1": {"main": new_port}}
            assert rec.restarts == 1


UNIX_SERVER = svc(
    "Kv",
    python_cmd(
        "import os, socket, time\n"
        "s = socket.socket(socket.AF_UNIX); s.bind(os.environ['KV_SOCKET']); s.listen()\n"
        "time.sleep(300)\n"
    ),
    max_replicas=1,
    sockets=(SocketSpec("kv", env="KV_SOCKET"),),
    readiness=Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.5),
    restart=RestartPolicy(backoff_base_s=0.1, backoff_max_s=0.1),
)


async def test_a_killed_replica_restarts_although_it_left_its_socket_file(
    tmp_path: Path,
) -> None:
    wd = Path(tempfile.mkdtemp(prefix="kv-", dir="/tmp"))  # short: Unix socket paths
    try:
        async with running(make_graph(UNIX_SERVER), wd) as conn:
            assert await conn.scale_component("Kv", 1, timeout_s=30) is True
            (rec,) = conn.state.replicas_of("Kv")
            assert rec.pid is not None and rec.reservation is not None
            path, old_pid = rec.reservation["sockets"]["kv"], rec.pid
            os.kill(old_pid, signal.SIGKILL)  # no chance to unlink its socket file
            await wait_until(lambda: not alive(old_pid), 10)
            assert os.path.exists(path)
            await wait_until(
                lambda: (
                    phases(conn, "Kv") == {"Kv/1": "ready"} and pids(conn, "Kv")["Kv/1"] != old_pid
                ),
                20,
            )
            (rec,) = conn.state.replicas_of("Kv")
            assert (rec.restarts, rec.reservation and rec.reservation["sockets"]["kv"]) == (
                1,
                path,
            )
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(path)  # the new process bound the same path
            # One exit (the kill): the restart did not fail on a leftover socket file.
            assert [e.replica for e in kinds(conn, "exit", "Kv")] == ["Kv/1"]
    finally:
        shutil.rmtree(wd, ignore_errors=True)


async def test_a_replica_above_its_memory_limit_is_killed_with_the_reason(
    tmp_path: Path,
) -> None:
    limit = ResourceRequest(memory_limit_bytes=100 << 20)
    quick = Readiness(kind=ReadinessKind.PROCESS, startup_grace_s=0.1)
    hog = svc(
        "Hog",
        # Ready first, then 300 MiB really written (bytes, not a lazily zeroed buffer).
        python_cmd("import time\ntime.sleep(0.5)\nx = b'1' * (300 << 20)\ntime.sleep(300)\n"),
        max_replicas=1,
        resources=limit,
        readiness=quick,
        restart=RestartPolicy(backoff_base_s=30.0, backoff_max_s=30.0),  # stays down: one exit
    )
    calm = svc("Calm", max_replicas=1, resources=limit, readiness=quick)
    graph = make_graph(hog, calm)
    async with running(graph, tmp_path / "wd", resync_s=0.1) as conn:
        assert await conn.scale_component("Calm", 1, timeout_s=30) is True
        assert await conn.scale_component("Hog", 1, timeout_s=30) is True
        calm_pid = pids(conn, "Calm")["Calm/1"]
        await wait_until(lambda: bool(kinds(conn, "exit", "Hog")), 20)
        (exited,) = kinds(conn, "exit", "Hog")
        # Caught somewhere above the limit, possibly while it was still writing its 300 MiB.
        match = re.fullmatch(
            r"killed: memory (\d+(?:\.\d)?)Mi above its limit 100Mi \(resources\.limits\.memory\)",
            exited.reason or "",
        )
        assert match is not None and 100 < float(match[1]) <= 350, exited.reason
        assert exited.details["exit_code"] == -9
        (rec,) = conn.state.replicas_of("Hog")
        assert (rec.phase, rec.last_exit and rec.last_exit.code) == ("backoff", -9)
        # A replica within its limit is left alone, pass after pass.
        await asyncio.sleep(1.0)
        assert kinds(conn, "exit", "Calm") == []
        assert pids(conn, "Calm")["Calm/1"] == calm_pid and alive(calm_pid)


async def test_a_restarted_connector_keeps_holding_what_a_stopped_replica_still_uses(
    tmp_path: Path, idle_h100: str
) -> None:
    # What an earlier connector persisted: Decode/1 stopped, but its process (stuck in the
    # driver, say) outlived the release and still holds the GPU.
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        reservation = {"replica_id": "Decode/1", "component": "Decode", "gpus": [H100_UUID]}
        wd = tmp_path / "wd"
        wd.mkdir()
        (wd / "state.json").write_text(
            json.dumps(
                {
                    "version": 1,
                    "namespace": "t",
                    "held_after_stop": [
                        {
                            "kind": "lingering",
                            "reservation": reservation,
                            "processes": {str(stuck.pid): psutil.Process(stuck.pid).create_time()},
                            "pids": [stuck.pid],
                        }
                    ],
                }
            )
        )
        async with running(make_graph(DECODE), wd, gpu_backend=idle_h100) as conn:
            holder = "Decode/1 (stopped; processes still running)"
            with pytest.raises(ResourcesExhausted) as info:
                await conn.scale_component("Decode", 1, timeout_s=30)
            assert info.value.message == (
                f"Decode replica 1 needs 1 GPU, 0 free; GPU-3916acbf… held by {holder}"
            )
            machine = await conn.get_machine_resources()
            conforms(machine)
            assert [entry["pids"] for entry in machine["lingering"]] == [[stuck.pid]]
            persisted = json.loads((wd / "state.json").read_text())["held_after_stop"]
            assert [entry["pids"] for entry in persisted] == [[stuck.pid]]

            stuck.kill()
            stuck.wait()
            manager = conn.resources
            assert manager is not None
            await wait_until(lambda: manager.machine_view()["lingering"] == [], 10)
            assert await conn.scale_component("Decode", 1, timeout_s=30) is True
            assert replica_ids(conn, "Decode") == ["Decode/1"]
            await wait_until(
                lambda: json.loads((wd / "state.json").read_text())["held_after_stop"] == [], 10
            )
            (done,) = [e for e in kinds(conn, "leak") if e.outcome == "ok"]
            assert done.reason == "Decode/1's processes exited; its resources are released"
    finally:
        stuck.kill()
        stuck.wait()


# --------------------------------------------------------------------------- real GPU (-m gpu)

# Holds 512 MiB on its GPU; on SIGTERM it takes a second to let go, as an engine does.
CUDA_HOLDER = (
    "import signal, sys, time, torch\n"
    "x = torch.empty(512 << 20, dtype=torch.uint8, device='cuda'); x.fill_(1)\n"
    "torch.cuda.synchronize()\n"
    "def bye(*_):\n"
    "    time.sleep(1.0)\n"
    "    sys.exit(0)\n"
    "signal.signal(signal.SIGTERM, bye)\n"
    "while True:\n"
    "    time.sleep(1)\n"
)


@pytest.mark.gpu
async def test_a_cuda_replica_is_attributed_by_pid_and_released_only_after_exit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    probe, reason = open_gpu_backend("nvml")
    if probe is None:
        pytest.skip(f"no NVML GPU: {reason}")
    # One GPU for the connector to hand out, whatever the machine has.
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", probe.devices()[0].uuid)
    probe.close()
    graph = make_graph(
        svc(
            "Cuda",
            python_cmd(CUDA_HOLDER),
            max_replicas=1,
            resources=ResourceRequest(gpu=1),
            graceful_stop_s=20,
        )
    )
    async with running(graph, tmp_path / "wd", gpu_backend="nvml") as conn:
        manager: Any = conn.resource_manager
        uuid = manager.inventory.gpus[0].uuid
        assert await conn.scale_component("Cuda", 1, timeout_s=60) is True
        pid = pids(conn, "Cuda")["Cuda/1"]
        assert pid is not None
        assert environ(pid)["CUDA_VISIBLE_DEVICES"] == uuid

        async def used_by_pid() -> int | None:
            samples = await asyncio.to_thread(manager.gpu_backend.sample)
            mine = [p for s in samples if s.uuid == uuid for p in s.processes if p.pid == pid]
            return mine[0].used_memory_bytes if mine else None

        for _ in range(600):  # up to 60 s for CUDA to start and allocate
            used = await used_by_pid()
            if used is not None and used >= 512 << 20:
                break
            await asyncio.sleep(0.1)
        assert used is not None and used >= 512 << 20, f"NVML lists {used} bytes for {pid}"

        # When the reservation goes, the process is gone and NVML no longer lists it.
        original = manager.release
        at_release: dict[str, Any] = {}

        async def release(replica_id: str, release_pids: Any) -> Any:
            result = await original(replica_id, release_pids)
            at_release.update(alive=alive(pid), listed=await used_by_pid() is not None)
            return result

        monkeypatch.setattr(manager, "release", release)
        assert await conn.scale_component("Cuda", 0, blocking=False) is True
        held_while_alive = 0
        while alive(pid):
            (gpu,) = [g for g in manager.machine_view()["gpus"] if g["uuid"] == uuid]
            if alive(pid):
                assert gpu["owners"] == ["Cuda/1"]
                held_while_alive += 1
            await asyncio.sleep(0.05)
        assert held_while_alive > 0  # seen held during its one-second exit
        await wait_until(lambda: replica_ids(conn, "Cuda") == [], 30)
        assert at_release == {"alive": False, "listed": False}
        (gpu,) = [g for g in manager.machine_view()["gpus"] if g["uuid"] == uuid]
        assert (gpu["state"], gpu["owners"]) == ("free", [])
