"""Overview: every component of the graph at a glance, Dynamo's frontend traffic and
latency beside it, with scale events as annotations."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd

from dashboards.common import (
    BY_NS,
    UNIT_COUNT,
    UNIT_PER_SECOND,
    UNIT_REPLICAS,
    UNIT_SECONDS,
    Annotation,
    Query,
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
from exporter.catalog import COMP, COMPONENT_STATES, NS

UID = "dynamo-local-overview"
TITLE = "dynamo-local / Overview"
BY_COMPONENT = (NS, COMP)
LEGEND = "{{dynamo_component}}"
RED_FROM_1 = ((None, "green"), (1.0, "red"))
NOT_RUNNING = sel("component_state", BY_NS, 'state!="running"')
CRASHLOOP = sel("component_state", BY_NS, 'state="crashloop"')


# Dynamo's own frontend series (dashboards.promql.DYNAMO_SERIES). They carry no namespace
# of their own: the connector's service discovery labels each target with its
# dynamo_namespace, so they filter on the same variable as our series.
FRONTEND_NS = f"{{{BY_NS}}}"
FRONTEND_LEGEND = "{{dynamo_namespace}}"


def _frontend_quantiles(family: str) -> list[Query]:
    bucket = f"{family}_bucket{FRONTEND_NS}"
    return [
        Query(
            f"histogram_quantile({q}, sum by ({NS}, le) (rate({bucket}[$__rate_interval])))",
            f"p{round(q * 100)} {FRONTEND_LEGEND}",
        )
        for q in (0.5, 0.99)
    ]


def _per_component(name: str) -> str:
    # The same labels as the state query, so the table's merge joins them row by row.
    return f"max by ({NS}, {COMP}) ({sel(name, BY_NS)})"


def _state_expr() -> str:
    return state_code_expr(sel("component_state", BY_NS), COMPONENT_STATES, BY_COMPONENT)


def build() -> dict[str, Any]:
    board = (
        dashboard(
            UID,
            TITLE,
            "Components of the graph: replicas desired and ready, Dynamo frontend requests, "
            "latency and queue, states, restarts, crash loops and scale operations.",
            ["overview"],
        )
        .with_variable(namespace_variable())
        .with_row(gd.Row("Graph"))
        .with_panel(
            stat_panel(
                "Components",
                "Components of the graph the connector runs.",
                UNIT_COUNT,
                [Query(f"count({sel('component_info', BY_NS)})")],
            )
        )
        .with_panel(
            stat_panel(
                "Replicas desired",
                "Replicas the connector is asked to run, all components together (graph, "
                "API or Planner targets).",
                UNIT_REPLICAS,
                [Query(f"sum({sel('component_replicas_desired', BY_NS)})")],
            )
        )
        .with_panel(
            stat_panel(
                "Replicas ready",
                "Replicas that passed their readiness probe, all components together.",
                UNIT_REPLICAS,
                [Query(f"sum({sel('component_replicas_ready', BY_NS)})")],
            )
        )
        .with_panel(
            stat_panel(
                "Components not running",
                "Components whose state is anything but running (starting, degraded, "
                "crashloop, stopped).",
                UNIT_COUNT,
                [Query(f"count({NOT_RUNNING} == 1) or vector(0)")],
                thresholds=((None, "green"), (1.0, "orange")),
            )
        )
        .with_panel(
            stat_panel(
                "Components in crash loop",
                "Components held in the crash-loop state (too many failures within the "
                "crash-loop window; restarts stopped). See the DynamoLocalCrashLoop alert.",
                UNIT_COUNT,
                [Query(f"count({CRASHLOOP} == 1) or vector(0)")],
                thresholds=RED_FROM_1,
            )
        )
        .with_panel(
            stat_panel(
                "Restarts in range",
                "Replica restarts (crashes and restart requests) within the dashboard's time "
                "range, all components together.",
                UNIT_COUNT,
                [Query(f"sum(increase({sel('component_restarts_total', BY_NS)}[$__range]))")],
                thresholds=((None, "green"), (1.0, "orange")),
            )
        )
        .with_row(gd.Row("Dynamo frontend"))
        .with_panel(
            timeseries_panel(
                "Frontend requests",
                "Requests per second Dynamo's frontend handled, per namespace "
                "(dynamo_frontend_requests_total).",
                UNIT_PER_SECOND,
                [
                    Query(
                        f"sum by ({NS}) (rate(dynamo_frontend_requests_total{FRONTEND_NS}"
                        "[$__rate_interval]))",
                        FRONTEND_LEGEND,
                    )
                ],
                width=6,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Time to first token",
                "Dynamo frontend's time to first token, median and 99th percentile per "
                "namespace (dynamo_frontend_time_to_first_token_seconds).",
                UNIT_SECONDS,
                _frontend_quantiles("dynamo_frontend_time_to_first_token_seconds"),
                width=6,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Inter-token latency",
                "Dynamo frontend's inter-token latency, median and 99th percentile per "
                "namespace (dynamo_frontend_inter_token_latency_seconds).",
                UNIT_SECONDS,
                _frontend_quantiles("dynamo_frontend_inter_token_latency_seconds"),
                width=6,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Frontend queued requests",
                "Requests waiting in Dynamo's frontend for their first response, per "
                "namespace (dynamo_frontend_queued_requests).",
                UNIT_COUNT,
                [
                    Query(
                        f"sum by ({NS}) (dynamo_frontend_queued_requests{FRONTEND_NS})",
                        FRONTEND_LEGEND,
                    )
                ],
                width=6,
                minimum=0,
            )
        )
        .with_row(gd.Row("Components"))
        .with_panel(
            table_panel(
                "Components",
                "One row per component: replicas desired, running and ready, scale bounds "
                "(max is empty when unbounded) and current state.",
                UNIT_COUNT,
                [
                    Query(_per_component("component_replicas_desired")),
                    Query(_per_component("component_replicas_running")),
                    Query(_per_component("component_replicas_ready")),
                    Query(_per_component("component_replicas_min")),
                    Query(_per_component("component_replicas_max")),
                    Query(_state_expr()),
                ],
                width=24,
                columns={
                    "Value #A": "desired",
                    "Value #B": "running",
                    "Value #C": "ready",
                    "Value #D": "min",
                    "Value #E": "max",
                    "Value #F": "state",
                },
                state_column=("state", state_codes(COMPONENT_STATES)),
            )
        )
        .with_panel(
            timeseries_panel(
                "Replicas desired vs ready",
                "Desired replicas (dashed in the legend as 'desired') against ready ones, per "
                "component. A gap that lasts means replicas cannot start or become ready.",
                UNIT_REPLICAS,
                [
                    Query(sel("component_replicas_desired", BY_NS), f"{LEGEND} desired"),
                    Query(sel("component_replicas_ready", BY_NS), f"{LEGEND} ready"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            state_timeline_panel(
                "Component state",
                "State of each component over time: starting, running, degraded (fewer "
                "ready replicas than desired), crashloop, stopped.",
                [Query(_state_expr(), LEGEND)],
                state_codes(COMPONENT_STATES),
            )
        )
        .with_panel(
            timeseries_panel(
                "Restarts",
                "Replica restarts per component within each rate interval.",
                UNIT_COUNT,
                [
                    Query(
                        f"sum by ({NS}, {COMP}) "
                        f"(increase({sel('component_restarts_total', BY_NS)}[$__rate_interval]))",
                        LEGEND,
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Crash loops entered",
                "Times a component entered the crash-loop state within each rate interval; "
                "the connector stops restarting its replicas until it is restarted or "
                "rescaled.",
                UNIT_COUNT,
                [
                    Query(
                        f"sum by ({NS}, {COMP}) "
                        f"(increase({sel('crashloops_total', BY_NS)}[$__rate_interval]))",
                        LEGEND,
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Scale operations in flight",
                "1 while a scale operation on the component has not converged.",
                UNIT_COUNT,
                [Query(sel("component_scale_in_flight", BY_NS), LEGEND)],
                minimum=0,
                maximum=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "GPUs allocated",
                "GPUs allocated to each component's replicas (fractional shares add up).",
                UNIT_COUNT,
                [Query(sel("component_gpus_allocated", BY_NS), LEGEND)],
                stacked=True,
                minimum=0,
            )
        )
    )
    annotations = [
        Annotation(
            "Scale targets",
            f"sum by ({NS}, {COMP}) (changes({sel('component_replicas_desired', BY_NS)}[1m])) > 0",
            "scale {{dynamo_component}}",
            "The replica target of {{dynamo_component}} changed",
            "blue",
        ),
        Annotation(
            "Crash loops",
            f"{CRASHLOOP} == 1",
            "crash loop {{dynamo_component}}",
            "{{dynamo_component}} is in crash loop",
            "red",
        ),
    ]
    return render(board, annotations)
