"""NVML behind its small interface: the fake replaying real captures, the real backend over a
scripted ``pynvml``, ``open_gpu_backend``'s reasons, and (``-m gpu``) the real NVML."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from connector.resources.nvml import (
    FakeGpuBackend,
    GpuDevice,
    GpuProcess,
    GpuSample,
    NvmlBackend,
    open_gpu_backend,
)
from tests.nvml_fakes import (
    H100_CAPTURE,
    H100_CAPTURED_PID,
    H100_CAPTURED_PID_MEMORY,
    H100_MEMORY_TOTAL,
    H100_NAME,
    H100_UUID,
    H200_CAPTURE,
    NVMLError,
    NVMLError_LibraryNotFound,
    ScriptedNvml,
    capture_path,
    h100_backend,
    scripted_devices,
)

H100_USED = 3794599936  # the capture's memory.used, its load process included
H100_BASE_USED = H100_USED - H100_CAPTURED_PID_MEMORY  # what is left with no process
H100_DEVICE = GpuDevice(
    index=0,
    uuid=H100_UUID,
    name=H100_NAME,
    memory_total_bytes=H100_MEMORY_TOTAL,
    mig_mode=False,
    numa_node=None,  # NVMLError_NotSupported in the VM
    cpu_affinity=tuple(range(16)),  # mask word 65535
    nvlink_peers=None,  # NVMLError_NotSupported in the VM
)


def h100_sample(pid: int = H100_CAPTURED_PID, sm: float | None = 0.96) -> GpuSample:
    return GpuSample(
        uuid=H100_UUID,
        index=0,
        utilization_ratio=1.0,
        memory_used_bytes=H100_USED,
        memory_total_bytes=H100_MEMORY_TOTAL,
        temperature_celsius=60.0,
        power_watts=663.924,
        energy_joules=7568.798,
        throttle_reasons=0,
        ecc_uncorrected_volatile=0,
        processes=(GpuProcess(pid, H100_CAPTURED_PID_MEMORY, sm),),
    )


# --------------------------------------------------------------------------- fixtures


def test_the_captures_are_read_from_inside_the_repository() -> None:
    # A fresh clone has nothing beside it: every capture a test replays is a file of the clone.
    repo = Path(__file__).resolve().parent.parent
    for name in (H100_CAPTURE, H200_CAPTURE):
        path = capture_path(name)
        assert path == repo / "tests" / "fixtures" / "nvml" / name
        assert json.loads(path.read_text())["devices"]
    # A capture that is not there fails the test that needs it rather than skipping it.
    with pytest.raises(FileNotFoundError, match=r"NVML capture missing\.json"):
        capture_path("missing.json")


# --------------------------------------------------------------------------- fake replay


def test_fake_replays_the_h100_device_facts() -> None:
    assert h100_backend().devices() == [H100_DEVICE]


def test_fake_replays_the_h100_sample_with_pids_rewritten() -> None:
    backend = h100_backend(pid_map={H100_CAPTURED_PID: os.getpid()})
    assert backend.sample() == [h100_sample(pid=os.getpid())]
    # Without a map the captured PID stays.
    assert h100_backend().sample() == [h100_sample()]


def test_a_callable_pid_map_is_read_at_each_sample() -> None:
    current = {H100_CAPTURED_PID: 1001}
    backend = h100_backend(pid_map=lambda: current)
    assert [p.pid for p in backend.sample()[0].processes] == [1001]
    current = {H100_CAPTURED_PID: 1002}
    assert [p.pid for p in backend.sample()[0].processes] == [1002]


def test_processes_are_set_added_and_removed_at_run_time() -> None:
    backend = h100_backend(keep_captured_processes=False)
    (sample,) = backend.sample()
    assert sample.processes == ()
    assert sample.memory_used_bytes == H100_BASE_USED  # the capture minus its load process
    backend.add_process(0, 4242, 1 << 30, 0.5)
    backend.add_process(0, 4343, 2 << 30)
    (sample,) = backend.sample()
    assert sample.processes == (GpuProcess(4242, 1 << 30, 0.5), GpuProcess(4343, 2 << 30, 0.0))
    assert sample.memory_used_bytes == H100_BASE_USED + (3 << 30)
    backend.remove_pid(4242)
    assert backend.sample()[0].processes == (GpuProcess(4343, 2 << 30, 0.0),)
    backend.set_processes(0, [GpuProcess(7, 100, None)])
    (sample,) = backend.sample()
    assert sample.processes == (GpuProcess(7, 100, None),)
    assert sample.memory_used_bytes == H100_BASE_USED + 100


def test_copies_get_distinct_stable_uuids() -> None:
    devices = h100_backend(copies=3).devices()
    assert [d.uuid for d in devices] == [
        H100_UUID,
        "GPU-3916acc0-4032-fd78-3a4f-848162f95acf",
        "GPU-3916acc1-4032-fd78-3a4f-848162f95acf",
    ]
    assert [d.index for d in devices] == [0, 1, 2]
    assert [d.uuid for d in h100_backend(copies=3).devices()] == [d.uuid for d in devices]
    assert [s.uuid for s in h100_backend(copies=3).sample()] == [d.uuid for d in devices]


def test_nvlink_pairs_and_numa_nodes_are_synthesized() -> None:
    devices = h100_backend(copies=4, nvlink_pairs=[(0, 1), (2, 3)], numa_nodes={0: 0, 3: 1})
    d = devices.devices()
    uuids = [x.uuid for x in d]
    assert [x.nvlink_peers for x in d] == [
        frozenset({uuids[1]}),
        frozenset({uuids[0]}),
        frozenset({uuids[3]}),
        frozenset({uuids[2]}),
    ]
    # Index 1 and 2 are not named: the capture's own answer (NotSupported) stays.
    assert [x.numa_node for x in d] == [0, None, None, 1]


def test_two_captures_make_a_two_gpu_machine() -> None:
    backend = FakeGpuBackend([capture_path(H100_CAPTURE), capture_path(H200_CAPTURE)])
    assert [(d.index, d.uuid, d.name, d.memory_total_bytes) for d in backend.devices()] == [
        (0, H100_UUID, H100_NAME, H100_MEMORY_TOTAL),
        (1, "GPU-ab37c448-7aae-b3a1-6cf5-679804eb2b53", "NVIDIA H200", 150754820096),
    ]
    h200 = backend.sample()[1]
    assert (h200.power_watts, h200.energy_joules, h200.processes) == (
        665.532,
        4824.191,
        (GpuProcess(418, 3282042880, 0.84),),
    )


# --------------------------------------------------------------------------- open_gpu_backend


def test_open_none_is_disabled_with_a_reason() -> None:
    assert open_gpu_backend("none") == (None, "GPU backend disabled (gpu backend 'none')")


def test_open_auto_without_a_driver_says_so() -> None:
    backend, reason = open_gpu_backend("auto")
    if backend is not None:
        backend.close()
        pytest.skip("this machine has an NVIDIA driver and a GPU")
    assert reason == "NVML library not found (no NVIDIA driver)"


def test_open_unknown_spec_names_the_choices() -> None:
    assert open_gpu_backend("cuda") == (
        None,
        "unknown GPU backend 'cuda' (auto, nvml, none or fake:<capture.json>)",
    )


def test_open_fake_replays_one_or_more_captures() -> None:
    h100, h200 = capture_path(H100_CAPTURE), capture_path(H200_CAPTURE)
    backend, reason = open_gpu_backend(f"fake:{h100}")
    assert reason is None and isinstance(backend, FakeGpuBackend)
    assert backend.devices() == [H100_DEVICE]
    both, reason = open_gpu_backend(f"fake:{h100},{h200}")
    assert reason is None and both is not None
    assert [d.name for d in both.devices()] == [H100_NAME, "NVIDIA H200"]


def test_open_fake_with_unreadable_captures_says_which_and_why(tmp_path: Path) -> None:
    missing = tmp_path / "missing.json"
    assert open_gpu_backend(f"fake:{missing}") == (
        None,
        f"cannot read NVML capture {missing}: [Errno 2] No such file or directory: '{missing}'",
    )
    garbage = tmp_path / "garbage.json"
    garbage.write_text("not json")
    assert open_gpu_backend(f"fake:{garbage}") == (
        None,
        f"cannot read NVML capture {garbage}: Expecting value: line 1 column 1 (char 0)",
    )
    shapeless = tmp_path / "shapeless.json"
    shapeless.write_text(json.dumps({"count": 1}))
    assert open_gpu_backend(f"fake:{shapeless}") == (
        None,
        f"cannot read NVML capture {shapeless}: 'devices'",
    )
    assert open_gpu_backend("fake:") == (
        None,
        "GPU backend 'fake:' names no capture file (fake:<capture.json>)",
    )


# --------------------------------------------------------------------------- real backend, scripted


@pytest.fixture
def nvml(monkeypatch: pytest.MonkeyPatch) -> ScriptedNvml:
    """A scripted pynvml with the H100 capture's device, installed as ``pynvml``."""
    scripted = ScriptedNvml(scripted_devices(1))
    monkeypatch.setitem(sys.modules, "pynvml", scripted.module())
    return scripted


def test_real_backend_reads_the_same_facts_as_the_capture(nvml: ScriptedNvml) -> None:
    backend = NvmlBackend()
    assert backend.devices() == [H100_DEVICE]
    words = max(1, (os.cpu_count() or 64) // 64 + 1)
    assert ("nvmlDeviceGetCpuAffinity", (words,)) in nvml.calls


def test_real_backend_sample_and_process_utilization_cursor(nvml: ScriptedNvml) -> None:
    backend = NvmlBackend()
    assert backend.sample() == [h100_sample()]
    # The next call asks only for newer samples; none is newer, so SM utilization is unknown.
    assert backend.sample() == [h100_sample(sm=None)]
    cursors = [args for name, args in nvml.calls if name == "nvmlDeviceGetProcessUtilization"]
    assert cursors == [(0,), (1795839918115915,)]


def test_real_backend_not_supported_fields_are_none(nvml: ScriptedNvml) -> None:
    dev = nvml.devices[0]
    for key in ("temperature", "power_mw", "energy_mj", "throttle", "utilization", "mig_mode"):
        dev[key] = None
    dev["ecc_volatile_uncorrected"] = None
    dev["cpu_affinity"] = None
    # NVML's "not available" per-process memory is a sentinel, not a number of bytes.
    dev["compute_procs"] = [{"pid": 9, "usedGpuMemory": (1 << 64) - 1}]
    dev["process_utilization"] = []
    backend = NvmlBackend()
    (device,) = backend.devices()
    assert (device.mig_mode, device.cpu_affinity, device.numa_node) == (None, None, None)
    (sample,) = backend.sample()
    assert sample == GpuSample(
        uuid=H100_UUID,
        index=0,
        utilization_ratio=None,
        memory_used_bytes=H100_USED,
        memory_total_bytes=H100_MEMORY_TOTAL,
        temperature_celsius=None,
        power_watts=None,
        energy_joules=None,
        throttle_reasons=None,
        ecc_uncorrected_volatile=None,
        processes=(GpuProcess(9, None, None),),
    )


def test_real_backend_a_failed_process_listing_is_unknown_not_empty(nvml: ScriptedNvml) -> None:
    nvml.devices[0]["compute_procs"] = None  # the driver fails the call (GPU_IS_LOST, say)
    (sample,) = NvmlBackend().sample()
    assert (sample.processes, sample.processes_known) == ((), False)
    nvml.devices[0]["compute_procs"] = []
    (sample,) = NvmlBackend().sample()
    assert (sample.processes, sample.processes_known) == ((), True)


def test_fake_process_listing_and_sampling_can_fail() -> None:
    backend = h100_backend(keep_captured_processes=False)
    backend.add_process(0, 4242, 1 << 30)
    backend.fail_process_listing(0)
    (sample,) = backend.sample()
    # Unknown processes still use their memory; only the listing is missing.
    assert (sample.processes, sample.processes_known) == ((), False)
    assert sample.memory_used_bytes == H100_BASE_USED + (1 << 30)
    backend.fail_process_listing(0, failing=False)
    assert backend.sample()[0].processes == (GpuProcess(4242, 1 << 30, 0.0),)
    backend.fail_sampling(RuntimeError("NVML Shared Library Not Found"))
    with pytest.raises(RuntimeError, match="Library Not Found"):
        backend.sample()
    backend.fail_sampling(None)
    assert backend.sample()[0].processes_known is True


def test_real_backend_maps_nvlink_remotes_to_peer_uuids(monkeypatch: pytest.MonkeyPatch) -> None:
    # 0 <-> 1 on link 0, 1 <-> 2 on link 2; 2 answers with no active link; 3 NotSupported.
    scripted = ScriptedNvml(
        scripted_devices(4), nvlinks={0: {0: 1}, 1: {0: 0, 2: 2}, 2: {2: 1}, 3: {}}
    )
    monkeypatch.setitem(sys.modules, "pynvml", scripted.module())
    uuids = [d["uuid"] for d in scripted.devices]
    peers = [d.nvlink_peers for d in NvmlBackend().devices()]
    assert peers == [
        frozenset({uuids[1]}),
        frozenset({uuids[0], uuids[2]}),
        frozenset({uuids[1]}),
        frozenset(),  # the driver answered: no link is up
    ]
    del scripted.nvlinks[3]
    assert NvmlBackend().devices()[3].nvlink_peers is None  # NotSupported: unknown


def test_real_backend_sees_peers_behind_an_nvswitch(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every link of GPUs 0-2 ends at the switch; P2P over NVLink says who reaches whom.
    # GPU 3 has no link up, and P2P says "not supported" for its pairs.
    scripted = ScriptedNvml(
        scripted_devices(4),
        nvlinks={0: {0: None, 1: None}, 1: {0: None}, 2: {0: None}, 3: {}},
        p2p={frozenset(pair) for pair in ((0, 1), (0, 2), (1, 2))},
    )
    monkeypatch.setitem(sys.modules, "pynvml", scripted.module())
    uuids = [d["uuid"] for d in scripted.devices]
    peers = [d.nvlink_peers for d in NvmlBackend().devices()]
    assert peers == [
        frozenset({uuids[1], uuids[2]}),
        frozenset({uuids[0], uuids[2]}),
        frozenset({uuids[0], uuids[1]}),
        frozenset(),
    ]
    p2p_calls = [args for name, args in scripted.calls if name == "nvmlDeviceGetP2PStatus"]
    assert p2p_calls == [(0, 1, 2), (0, 2, 2), (0, 3, 2), (1, 2, 2), (1, 3, 2), (2, 3, 2)]


def test_real_backend_p2p_answers_alone_make_the_topology_known(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Link state NotSupported everywhere, but P2P status answers (a VM with passed-through
    # NVLink-connected GPUs): peers come from P2P alone.
    scripted = ScriptedNvml(scripted_devices(3), p2p={frozenset((0, 2))})
    monkeypatch.setitem(sys.modules, "pynvml", scripted.module())
    uuids = [d["uuid"] for d in scripted.devices]
    assert [d.nvlink_peers for d in NvmlBackend().devices()] == [
        frozenset({uuids[2]}),
        frozenset(),
        frozenset({uuids[0]}),
    ]


def test_real_backend_close_shuts_nvml_down_and_tolerates_errors(nvml: ScriptedNvml) -> None:
    backend = NvmlBackend()
    backend.close()
    assert [name for name, _ in nvml.calls].count("nvmlShutdown") == 1

    def failing_shutdown() -> None:
        raise NVMLError("Uninitialized")

    backend._nvml.nvmlShutdown = failing_shutdown
    backend.close()  # no exception


def test_open_nvml_reasons_from_the_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    def install(scripted: ScriptedNvml) -> ScriptedNvml:
        monkeypatch.setitem(sys.modules, "pynvml", scripted.module())
        return scripted

    install(ScriptedNvml([], init_error=NVMLError_LibraryNotFound()))
    assert open_gpu_backend("nvml") == (None, "NVML library not found (no NVIDIA driver)")
    install(ScriptedNvml([], init_error=NVMLError("Driver Not Loaded")))
    assert open_gpu_backend("auto") == (None, "NVML failed to start: Driver Not Loaded")
    empty = install(ScriptedNvml([]))
    assert open_gpu_backend("nvml") == (None, "NVML found no GPU")
    assert [name for name, _ in empty.calls] == ["nvmlInit", "nvmlShutdown"]
    # A driver that fails after init: NVML is shut down again and the reason says so.
    broken = install(ScriptedNvml(scripted_devices(1)))
    broken.devices[0]["memory"] = None
    assert open_gpu_backend("auto") == (None, "NVML failed to list the GPUs: Not Supported")
    assert [name for name, _ in broken.calls][-1] == "nvmlShutdown"
    no_uuid = install(ScriptedNvml(scripted_devices(1)))
    no_uuid.devices[0]["uuid"] = None
    assert open_gpu_backend("nvml") == (None, "NVML failed to start: Not Supported")
    assert [name for name, _ in no_uuid.calls] == ["nvmlInit", "nvmlShutdown"]
    install(ScriptedNvml(scripted_devices(1)))
    backend, reason = open_gpu_backend("auto")
    assert reason is None and isinstance(backend, NvmlBackend)
    assert [d.uuid for d in backend.devices()] == [H100_UUID]
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml -> ImportError
    assert open_gpu_backend("nvml") == (None, "nvidia-ml-py is not installed")


# --------------------------------------------------------------------------- real GPU (-m gpu)

ALLOCATE = (
    "import sys, time, torch\n"
    "x = torch.empty(512 << 20, dtype=torch.uint8, device='cuda')\n"
    "torch.cuda.synchronize()\n"
    "print('ready', flush=True)\n"
    "time.sleep(120)\n"
)


def real_backend() -> NvmlBackend:
    backend, reason = open_gpu_backend("nvml")
    if backend is None:
        pytest.skip(f"no NVML GPU: {reason}")
    assert isinstance(backend, NvmlBackend)
    return backend


@pytest.mark.gpu
def test_real_nvml_devices_and_sample() -> None:
    backend = real_backend()
    try:
        devices = backend.devices()
        assert [d.index for d in devices] == list(range(len(devices)))
        for d in devices:
            assert d.uuid.startswith(("GPU-", "MIG-")) and d.name.startswith("NVIDIA")
            assert d.memory_total_bytes > 0
        samples = backend.sample()
        assert [s.uuid for s in samples] == [d.uuid for d in devices]
        for s in samples:
            assert s.memory_total_bytes == devices[s.index].memory_total_bytes
            assert s.memory_used_bytes is not None and s.memory_used_bytes >= 0
            assert s.utilization_ratio is None or 0.0 <= s.utilization_ratio <= 1.0
    finally:
        backend.close()


@pytest.mark.gpu
def test_real_nvml_sees_a_cuda_process_by_pid() -> None:
    if importlib.util.find_spec("torch") is None:
        pytest.skip("torch is not installed")
    backend = real_backend()
    uuid = backend.devices()[0].uuid
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": uuid}
    proc = subprocess.Popen(
        [sys.executable, "-c", ALLOCATE], stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 30
        while True:
            (sample,) = [s for s in backend.sample() if s.uuid == uuid]
            mine = [p for p in sample.processes if p.pid == proc.pid]
            if mine or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert len(mine) == 1, f"NVML lists {sample.processes}, not PID {proc.pid}"
        assert mine[0].used_memory_bytes is not None
        assert mine[0].used_memory_bytes >= 512 << 20
    finally:
        proc.kill()
        proc.wait()
        backend.close()
