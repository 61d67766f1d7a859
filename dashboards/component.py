"""Component: one component's replicas, their CPU, memory, GPU use and restarts."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd

from dashboards.common import (
    BY_COMP,
    BY_NS,
    UNIT_BYTES,
    UNIT_CORES,
    UNIT_COUNT,
    UNIT_RATIO,
    UNIT_REPLICAS,
    UNIT_SECONDS,
    Query,
    component_variable,
    dashboard,
    namespace_variable,
    render,
    sel,
    stat_panel,
    state_code_expr,
    state_codes,
    state_timeline_panel,
    table_panel,
    timeseries_panel,
)
from exporter.catalog import COMP, COMPONENT_STATES, NS, REPLICA, REPLICA_STATES

UID = "dynamo-local-component"
TITLE = "dynamo-local / Component"
REPLICA_LEGEND = "{{dynamo_component}}/{{replica}}"
GPU_LEGEND = "{{dynamo_component}}/{{replica}} on {{gpu}}"


def _m(name: str) -> str:
    """Catalog metric ``name`` filtered by the namespace and component variables."""
    return sel(name, BY_NS, BY_COMP)


def build() -> dict[str, Any]:
    board = (
        dashboard(
            UID,
            TITLE,
            "One component of the graph: replica counts and state, and per replica CPU, "
            "memory, GPU memory and utilization, restarts and process identity.",
            ["component"],
        )
        .with_variable(namespace_variable())
        .with_variable(component_variable())
        .with_row(gd.Row("Component"))
        .with_panel(
            stat_panel(
                "Desired",
                "Replicas the connector is asked to run (graph, API or Planner target).",
                UNIT_REPLICAS,
                [Query(f"sum({_m('component_replicas_desired')})")],
            )
        )
        .with_panel(
            stat_panel(
                "Running",
                "Replicas whose process is alive.",
                UNIT_REPLICAS,
                [Query(f"sum({_m('component_replicas_running')})")],
            )
        )
        .with_panel(
            stat_panel(
                "Ready",
                "Replicas that passed their readiness probe.",
                UNIT_REPLICAS,
                [Query(f"sum({_m('component_replicas_ready')})")],
            )
        )
        .with_panel(
            stat_panel(
                "Restarts in range",
                "Replica restarts within the dashboard's time range.",
                UNIT_COUNT,
                [Query(f"sum(increase({_m('component_restarts_total')}[$__range]))")],
                thresholds=((None, "green"), (1.0, "orange")),
            )
        )
        .with_panel(
            stat_panel(
                "State",
                "Current state of the component (of the first one when several are selected).",
                UNIT_COUNT,
                [
                    Query(
                        state_code_expr(_m("component_state"), COMPONENT_STATES, (NS, COMP)),
                        "{{dynamo_component}}",
                    )
                ],
                width=8,
                mappings=state_codes(COMPONENT_STATES),
            )
        )
        .with_row(gd.Row("Replicas"))
        .with_panel(
            state_timeline_panel(
                "Replica state",
                "State of each replica over time: spawning, starting, ready, stopping, "
                "backoff (waiting to restart), exited, crashloop.",
                [
                    Query(
                        state_code_expr(_m("replica_state"), REPLICA_STATES, (NS, COMP, REPLICA)),
                        REPLICA_LEGEND,
                    )
                ],
                state_codes(REPLICA_STATES),
                width=24,
            )
        )
        .with_panel(
            timeseries_panel(
                "CPU utilization",
                "CPU time of each replica's whole process tree over the last sampling "
                "interval, divided by the CPUs available to the replica.",
                UNIT_RATIO,
                [Query(_m("replica_cpu_utilization_ratio"), REPLICA_LEGEND)],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "CPU cores used",
                "CPU seconds per second of each replica's process tree (user + system, "
                "reaped children included; 1 is one core busy), and the cores reserved for "
                "it when it asked for some.",
                UNIT_CORES,
                [
                    Query(
                        f"rate({_m('replica_cpu_seconds_total')}[$__rate_interval])",
                        REPLICA_LEGEND,
                    ),
                    Query(_m("replica_cpu_reserved_cores"), f"{REPLICA_LEGEND} reserved"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Memory (RSS), reservation and limit",
                "Resident set size summed over each replica's process tree (shared pages "
                "count once per process), the memory reserved for it when it asked for "
                "some, and its memory limit (resources.limits.memory) when its service sets "
                "one: the connector kills a replica whose RSS goes above its limit.",
                UNIT_BYTES,
                [
                    Query(_m("replica_memory_rss_bytes"), REPLICA_LEGEND),
                    Query(_m("replica_memory_reserved_bytes"), f"{REPLICA_LEGEND} reserved"),
                    Query(_m("replica_memory_limit_bytes"), f"{REPLICA_LEGEND} limit"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Memory (PSS, USS)",
                "Proportional set size (shared pages split among their users) and unique "
                "set size (what would be freed if the replica exited), summed over each "
                "replica's process tree.",
                UNIT_BYTES,
                [
                    Query(_m("replica_memory_pss_bytes"), f"{REPLICA_LEGEND} PSS"),
                    Query(_m("replica_memory_uss_bytes"), f"{REPLICA_LEGEND} USS"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "GPU memory",
                "GPU memory used by each replica's processes, per GPU (NVML per-process "
                "accounting).",
                UNIT_BYTES,
                [Query(_m("replica_gpu_memory_used_bytes"), GPU_LEGEND)],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "GPU SM utilization",
                "SM utilization of each GPU by each replica's processes (NVML per-process "
                "samples).",
                UNIT_RATIO,
                [Query(_m("replica_gpu_sm_utilization_ratio"), GPU_LEGEND)],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Restarts",
                "Restarts of each replica slot within each rate interval.",
                UNIT_COUNT,
                [
                    Query(
                        f"increase({_m('replica_restarts_total')}[$__rate_interval])",
                        REPLICA_LEGEND,
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Uptime",
                "Time since each replica's current process started; drops to zero at every "
                "restart.",
                UNIT_SECONDS,
                [Query(f"time() - {_m('replica_start_time_seconds')}", REPLICA_LEGEND)],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Processes",
                "Processes in each replica's tree (the root Circus started and all its "
                "descendants).",
                UNIT_COUNT,
                [Query(_m("replica_processes"), REPLICA_LEGEND)],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Discovery instances vs ready replicas",
                "Instances registered in Dynamo discovery for the component against its "
                "ready replicas. More instances than running replicas means stale entries.",
                UNIT_COUNT,
                [
                    Query(_m("discovery_instances"), "{{dynamo_component}} instances"),
                    Query(_m("component_replicas_ready"), "{{dynamo_component}} ready"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            table_panel(
                "Replica processes",
                "Process identity of each replica: root pid and command line.",
                UNIT_COUNT,
                [Query(_m("replica_info"))],
                width=24,
                columns={"Value": "info"},
            )
        )
    )
    return render(board)
