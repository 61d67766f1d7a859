"""GPUs: per device utilization, memory, temperature, power and throttling; who holds it."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd

from dashboards.common import (
    BY_GPU,
    UNIT_BYTES,
    UNIT_CELSIUS,
    UNIT_CORES,
    UNIT_COUNT,
    UNIT_RATIO,
    UNIT_WATTS,
    Query,
    dashboard,
    gpu_variable,
    render,
    sel,
    stat_panel,
    state_code_expr,
    state_codes,
    state_timeline_panel,
    table_panel,
    timeseries_panel,
)
from dashboards.promql import metric
from exporter.catalog import COMP, GPU, GPU_ALLOCATION_STATES

UID = "dynamo-local-gpus"
TITLE = "dynamo-local / GPUs"
GPU_LEGEND = "GPU {{index}}"
# Recording rule (alerts/dynamo-local.rules.yaml): used / total memory per GPU.
GPU_MEMORY_RATIO = "gpu:dynamo_local_gpu_memory_used_bytes:ratio"
# Throttle reasons that mean the GPU runs slower than asked; idle and the application
# clock setting are normal.
SLOWDOWN_REASONS = (
    "sw_power_cap",
    "hw_slowdown",
    "sw_thermal_slowdown",
    "hw_thermal_slowdown",
    "hw_power_brake_slowdown",
)
SLOWDOWN = sel("gpu_throttle_reason", BY_GPU, f'reason=~"{"|".join(SLOWDOWN_REASONS)}"')


def _with_index(expr: str) -> str:
    """``expr`` (one series per GPU) labelled with the GPU's NVML index for legends."""
    return f"{expr} * on ({GPU}) group_left (index) {metric('gpu_info')}"


def build() -> dict[str, Any]:
    board = (
        dashboard(
            UID,
            TITLE,
            "Every GPU NVML reports: utilization, memory, temperature, power, throttling "
            "and ECC errors, which component holds it, and free against allocated.",
            ["gpu"],
        )
        .with_variable(gpu_variable())
        .with_row(gd.Row("Allocation"))
        .with_panel(
            stat_panel(
                "GPUs allocatable",
                "GPUs the connector may hand out (NVML inventory limited by CUDA_VISIBLE_DEVICES).",
                UNIT_COUNT,
                [Query(metric("gpus_allocatable"))],
            )
        )
        .with_panel(
            stat_panel(
                "GPUs free",
                "Allocatable GPUs no replica holds.",
                UNIT_COUNT,
                [Query(metric("gpus_free"))],
                thresholds=((None, "orange"), (1.0, "green")),
            )
        )
        .with_panel(
            stat_panel(
                "Stopped replicas still running",
                "Stopped replicas whose processes outlived the release timeout; their GPUs, "
                "cores, memory and ports stay held until the processes exit.",
                UNIT_COUNT,
                [Query(metric("replicas_lingering"))],
                thresholds=((None, "green"), (1.0, "orange")),
            )
        )
        .with_panel(
            stat_panel(
                "CPU cores reserved",
                "CPU cores reserved by replicas, of the cores the connector may reserve.",
                UNIT_CORES,
                [Query(metric("cpu_reserved_cores"))],
                width=3,  # four budgets in half a row: GPU counts take the other half
            )
        )
        .with_panel(
            stat_panel(
                "CPU cores allocatable",
                "CPU cores the connector may reserve for replicas.",
                UNIT_CORES,
                [Query(metric("cpu_allocatable_cores"))],
                width=3,  # four budgets in half a row: GPU counts take the other half
            )
        )
        .with_panel(
            stat_panel(
                "Memory reserved",
                "Memory reserved by replicas.",
                UNIT_BYTES,
                [Query(metric("memory_reserved_bytes"))],
                width=3,  # four budgets in half a row: GPU counts take the other half
            )
        )
        .with_panel(
            stat_panel(
                "Memory allocatable",
                "Memory the connector may reserve for replicas.",
                UNIT_BYTES,
                [Query(metric("memory_allocatable_bytes"))],
                width=3,  # four budgets in half a row: GPU counts take the other half
            )
        )
        .with_panel(
            table_panel(
                "Who holds each GPU",
                "Share of each GPU allocated to each replica: 1 for a whole GPU, the "
                "fraction for a shared one.",
                UNIT_RATIO,
                [Query(sel("replica_gpu_allocated_ratio", BY_GPU))],
                columns={"Value": "share"},
            )
        )
        .with_panel(
            state_timeline_panel(
                "Allocation state",
                "Allocation state of each GPU over time: free, allocated, or leaked (held "
                "by a replica that no longer exists).",
                [
                    Query(
                        _with_index(
                            state_code_expr(
                                sel("gpu_allocation_state", BY_GPU), GPU_ALLOCATION_STATES, (GPU,)
                            )
                        ),
                        GPU_LEGEND,
                    )
                ],
                state_codes(GPU_ALLOCATION_STATES),
            )
        )
        .with_row(gd.Row("Devices"))
        .with_panel(
            table_panel(
                "GPUs",
                "GPUs NVML reports: NVML index, product name and UUID.",
                UNIT_COUNT,
                [Query(sel("gpu_info", BY_GPU))],
                width=24,
                height=6,
                columns={"Value": "info"},
            )
        )
        .with_panel(
            timeseries_panel(
                "Utilization",
                "Fraction of the last sample period during which a kernel ran on the GPU.",
                UNIT_RATIO,
                [Query(_with_index(sel("gpu_utilization_ratio", BY_GPU)), GPU_LEGEND)],
                minimum=0,
                maximum=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Memory used",
                "GPU memory in use by all processes (foreign ones included) against the "
                "memory installed.",
                UNIT_BYTES,
                [
                    Query(_with_index(sel("gpu_memory_used_bytes", BY_GPU)), f"{GPU_LEGEND} used"),
                    Query(
                        _with_index(sel("gpu_memory_total_bytes", BY_GPU)),
                        f"{GPU_LEGEND} total",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Memory used (share)",
                "GPU memory in use as a share of the memory installed (recording rule "
                f"{GPU_MEMORY_RATIO}); the DynamoLocalGPUMemoryNearFull alert fires above 95%.",
                UNIT_RATIO,
                [Query(_with_index(f"{GPU_MEMORY_RATIO}{{{BY_GPU}}}"), GPU_LEGEND)],
                minimum=0,
                maximum=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "GPU memory by component",
                "GPU memory used by each component's replicas on each GPU (NVML per-process "
                "accounting).",
                UNIT_BYTES,
                [
                    Query(
                        f"sum by ({GPU}, {COMP}) ({sel('replica_gpu_memory_used_bytes', BY_GPU)})",
                        "{{dynamo_component}} on {{gpu}}",
                    )
                ],
                stacked=True,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Temperature",
                "GPU core temperature; the DynamoLocalGPUHot alert fires above 85 °C.",
                UNIT_CELSIUS,
                [Query(_with_index(sel("gpu_temperature_celsius", BY_GPU)), GPU_LEGEND)],
            )
        )
        .with_panel(
            timeseries_panel(
                "Power",
                "Board power draw as NVML reports it, and the average over each rate "
                "interval from the energy counter.",
                UNIT_WATTS,
                [
                    Query(_with_index(sel("gpu_power_watts", BY_GPU)), f"{GPU_LEGEND} draw"),
                    Query(
                        _with_index(
                            f"rate({sel('gpu_energy_joules_total', BY_GPU)}[$__rate_interval])"
                        ),
                        f"{GPU_LEGEND} from energy",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Slowdown reasons active",
                "Clock-event (throttle) reasons that slow the GPU down (power cap, thermal, "
                "hardware slowdown, power brake) active on each GPU.",
                UNIT_COUNT,
                [
                    Query(
                        _with_index(f"sum by ({GPU}) ({SLOWDOWN})"),
                        GPU_LEGEND,
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            table_panel(
                "Throttle reasons now",
                "Clock-event (throttle) reasons NVML reports active right now, per GPU "
                "(gpu_idle is normal on an idle GPU).",
                UNIT_COUNT,
                [Query(f"{sel('gpu_throttle_reason', BY_GPU)} == 1")],
                columns={"Value": "active"},
            )
        )
        .with_panel(
            timeseries_panel(
                "Uncorrected ECC errors",
                "Uncorrected ECC errors within each rate interval (volatile counter, since "
                "the driver loaded).",
                UNIT_COUNT,
                [
                    Query(
                        _with_index(
                            f"increase({sel('gpu_ecc_uncorrected_errors_total', BY_GPU)}"
                            "[$__rate_interval])"
                        ),
                        GPU_LEGEND,
                    )
                ],
                minimum=0,
            )
        )
    )
    return render(board)
