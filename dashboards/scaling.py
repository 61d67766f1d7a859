"""Scaling: scale operations and their outcomes, durations, Planner decisions against the
replicas that really run, the prefill queue, and Dynamo's own frontend latency."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd

from dashboards.common import (
    BY_COMP,
    BY_NS,
    UNIT_BYTES,
    UNIT_COUNT,
    UNIT_MESSAGES,
    UNIT_PER_SECOND,
    UNIT_REPLICAS,
    UNIT_SECONDS,
    Annotation,
    Query,
    bucket,
    component_variable,
    dashboard,
    namespace_variable,
    render,
    sel,
    stat_panel,
    timeseries_panel,
)
from dashboards.promql import DYNAMO_FRONTEND_JOB
from exporter.catalog import COMP, NS

UID = "dynamo-local-scaling"
TITLE = "dynamo-local / Scaling"
# Outcomes of a scale operation that did not get what was asked.
BAD_OUTCOMES = 'outcome=~"failed|timeout|partial|refused"'
# Recording rule (alerts/dynamo-local.rules.yaml): prefill queue depth per ready prefill
# replica, the number the old Planner scaled prefill on.
PENDING_PER_PREFILL = (
    "dynamo_namespace:dynamo_local_prefill_queue_pending_messages:per_ready_prefill_replica"
)
FRONTEND = f'job="{DYNAMO_FRONTEND_JOB}"'
DECISIONS = sel("events_total", BY_NS, 'kind="decision"')
# The ScaledObject policies' decisions and trigger failures (connector.policy).
POLICY_EVENTS = sel("events_total", BY_NS, 'kind="autoscale"')


def _m(name: str, *extra: str) -> str:
    return sel(name, BY_NS, BY_COMP, *extra)


def _by_sub_type(name: str, sub_types: str) -> str:
    """Per-component ``name`` for the Planner-managed components, labelled with their
    sub-component type (prefill or decode)."""
    info = sel("component_info", BY_NS, f'sub_component_type=~"{sub_types}"')
    return f"{sel(name, BY_NS)} * on ({NS}, {COMP}) group_left (sub_component_type) {info}"


def _quantile(q: float, bucket: str) -> str:
    return f"histogram_quantile({q}, sum by (le) (rate({bucket}[$__rate_interval])))"


def _frontend_quantiles(name: str) -> list[Query]:
    bucket = f"{name}_bucket{{{FRONTEND}}}"
    return [
        Query(
            f"histogram_quantile({q}, sum by (le, model) (rate({bucket}[$__rate_interval])))",
            f"p{round(q * 100)} {{{{model}}}}",
        )
        for q in (0.5, 0.95)
    ]


def build() -> dict[str, Any]:
    duration_bucket = bucket("scale_duration_seconds", BY_NS, BY_COMP)
    board = (
        dashboard(
            UID,
            TITLE,
            "Scale operations and outcomes, how long they take, Planner targets against "
            "ready replicas, the prefill queue, and Dynamo's frontend latency.",
            ["scaling", "planner"],
        )
        .with_variable(namespace_variable())
        .with_variable(component_variable())
        .with_row(gd.Row("Scale operations"))
        .with_panel(
            stat_panel(
                "Scale operations in range",
                "Finished scale operations within the dashboard's time range.",
                UNIT_COUNT,
                [Query(f"sum(increase({_m('scale_operations_total')}[$__range])) or vector(0)")],
                width=6,
            )
        )
        .with_panel(
            stat_panel(
                "Not met in range",
                "Scale operations within the time range that failed, timed out, were met "
                "only in part or were refused for lack of resources.",
                UNIT_COUNT,
                [
                    Query(
                        f"sum(increase({_m('scale_operations_total', BAD_OUTCOMES)}"
                        "[$__range])) or vector(0)"
                    )
                ],
                width=6,
                thresholds=((None, "green"), (1.0, "red")),
            )
        )
        .with_panel(
            stat_panel(
                "In flight",
                "Components with a scale operation that has not converged yet.",
                UNIT_COUNT,
                [Query(f"sum({_m('component_scale_in_flight')})")],
                width=6,
            )
        )
        .with_panel(
            stat_panel(
                "Target changes in range",
                "How often replica targets changed within the time range, all selected "
                "components together (the DynamoLocalScalingFlapping alert watches this).",
                UNIT_COUNT,
                [Query(f"sum(changes({_m('component_replicas_desired')}[$__range]))")],
                width=6,
            )
        )
        .with_panel(
            timeseries_panel(
                "Operations by outcome",
                "Finished scale operations per rate interval by outcome: ok, partial, "
                "failed, timeout, refused, superseded.",
                UNIT_COUNT,
                [
                    Query(
                        "sum by (outcome) "
                        f"(increase({_m('scale_operations_total')}[$__rate_interval]))",
                        "{{outcome}}",
                    )
                ],
                stacked=True,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Operations by source and direction",
                "Finished scale operations per rate interval by who asked (api, planner, "
                "cli, reconcile) and direction (up, down).",
                UNIT_COUNT,
                [
                    Query(
                        "sum by (source, direction) "
                        f"(increase({_m('scale_operations_total')}[$__rate_interval]))",
                        "{{source}} {{direction}}",
                    )
                ],
                stacked=True,
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Scale duration",
                "Time from a scale request to convergence (or its timeout), percentiles "
                "over each rate interval. Exemplars link to the operation's trace.",
                UNIT_SECONDS,
                [
                    Query(_quantile(q, duration_bucket), f"p{round(q * 100)}")
                    for q in (0.5, 0.9, 0.99)
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Replica targets",
                "Replica target of each component: a line that keeps moving is a scaling "
                "policy flapping.",
                UNIT_REPLICAS,
                [Query(_m("component_replicas_desired"), "{{dynamo_component}}")],
                minimum=0,
            )
        )
        .with_row(gd.Row("Planner"))
        .with_panel(
            timeseries_panel(
                "Planner targets vs ready replicas",
                "Replica targets of the prefill and decode components (what the Planner "
                "decided, or the graph/API when no Planner runs) against their ready "
                "replicas.",
                UNIT_REPLICAS,
                [
                    Query(
                        _by_sub_type("component_replicas_desired", "prefill|decode"),
                        "{{sub_component_type}} target",
                    ),
                    Query(
                        _by_sub_type("component_replicas_ready", "prefill|decode"),
                        "{{sub_component_type}} ready",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Planner decisions",
                "Planner decisions the connector applied (and acknowledged) per rate interval.",
                UNIT_COUNT,
                [
                    Query(
                        f"sum by ({NS}) (increase({DECISIONS}[$__rate_interval]))",
                        "{{dynamo_namespace}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Planner decision seen vs acknowledged",
                "Newest decision id the Planner executor has seen in etcd against the newest "
                "one it acknowledged (scaled_decision_id); the Planner waits while seen is "
                "above acknowledged. The DynamoLocalPlannerDecisionNotAcknowledged alert "
                "fires when that lasts 5 minutes. Only while an executor runs.",
                UNIT_COUNT,
                [
                    Query(sel("planner_decision_id", BY_NS), "{{dynamo_namespace}} seen"),
                    Query(
                        sel("planner_decision_acknowledged_id", BY_NS),
                        "{{dynamo_namespace}} acknowledged",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Since the newest decision was seen",
                "Time since the Planner executor first saw the newest decision: how long "
                "the Planner has waited when that decision is not acknowledged yet.",
                UNIT_SECONDS,
                [
                    Query(
                        f"time() - {sel('planner_decision_seen_timestamp_seconds', BY_NS)}",
                        "{{dynamo_namespace}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill queue vs prefill replicas",
                "Messages waiting in the prefill queue against ready prefill replicas.",
                UNIT_COUNT,
                [
                    Query(sel("prefill_queue_pending_messages", BY_NS), "pending"),
                    Query(
                        f"sum by ({NS}) ({_by_sub_type('component_replicas_ready', 'prefill')})",
                        "prefill replicas ready",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Pending per prefill replica",
                "Prefill queue depth per ready prefill replica (recording rule); the "
                "DynamoLocalPrefillQueueBacklog alert fires above 5 for 5 minutes.",
                UNIT_MESSAGES,
                [Query(f"{PENDING_PER_PREFILL}{{{BY_NS}}}", "{{dynamo_namespace}}")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill queue flow",
                "Messages added to and taken from the prefill queue per second, over the "
                "queue reader's last window.",
                UNIT_PER_SECOND,
                [
                    Query(sel("prefill_queue_enqueued_per_second", BY_NS), "enqueued"),
                    Query(sel("prefill_queue_dequeued_per_second", BY_NS), "dequeued"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill queue in progress",
                "Messages delivered to a prefill worker and not yet acknowledged, and those "
                "delivered more than once.",
                UNIT_MESSAGES,
                [
                    Query(sel("prefill_queue_ack_pending_messages", BY_NS), "ack pending"),
                    Query(sel("prefill_queue_redelivered_messages", BY_NS), "redelivered"),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Oldest pending message",
                "Age of the oldest message waiting in the prefill queue (absent when the "
                "queue is empty).",
                UNIT_SECONDS,
                [Query(sel("prefill_queue_oldest_pending_age_seconds", BY_NS), "age")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill queue consumers",
                "Consumers bound to the prefill stream: 0 while messages wait means no "
                "prefill worker takes work.",
                UNIT_COUNT,
                [Query(sel("prefill_queue_consumers", BY_NS), "consumers")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill stream messages",
                "Messages stored in the prefill stream (pending, in progress and retained).",
                UNIT_MESSAGES,
                [Query(sel("prefill_queue_stream_messages", BY_NS), "messages")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Prefill stream size",
                "Bytes stored in the prefill stream.",
                UNIT_BYTES,
                [Query(sel("prefill_queue_stream_bytes", BY_NS), "bytes")],
                minimum=0,
            )
        )
        .with_row(gd.Row("Policies (KEDA ScaledObjects)"))
        .with_panel(
            timeseries_panel(
                "Policy count vs replica target",
                "What each ScaledObject policy's last evaluation gave its component (with up "
                "--dry-run, what it would set) against the component's replica target.",
                UNIT_REPLICAS,
                [
                    Query(
                        _m("autoscaler_desired_replicas"),
                        "{{dynamo_component}} policy {{scaled_object}}",
                    ),
                    Query(
                        f"{_m('component_replicas_desired')} and on ({NS}, {COMP}) "
                        f"{_m('autoscaler_desired_replicas')}",
                        "{{dynamo_component}} target",
                    ),
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Trigger values",
                "What each trigger's query returned at its last evaluation; a gap is a "
                "failed query (never read as 0).",
                UNIT_COUNT,
                [
                    Query(
                        _m("autoscaler_metric_value"),
                        "{{scaled_object}} trigger {{trigger}}",
                    )
                ],
            )
        )
        .with_panel(
            timeseries_panel(
                "Triggers active",
                "1 while a trigger is above its activationThreshold: KEDA scales from zero "
                "when one is, and to zero only after cooldownPeriod with none.",
                UNIT_COUNT,
                [
                    Query(
                        _m("autoscaler_active"),
                        "{{scaled_object}} trigger {{trigger}}",
                    )
                ],
                minimum=0,
                maximum=1,
            )
        )
        .with_panel(
            timeseries_panel(
                "Trigger query failures",
                "Failed trigger queries per rate interval; while one fails its policy does "
                "not scale down for it, and falls back after fallback.failureThreshold.",
                UNIT_COUNT,
                [
                    Query(
                        f"increase({_m('autoscaler_errors_total')}[$__rate_interval])",
                        "{{scaled_object}} trigger {{trigger}}",
                    ),
                    Query(
                        f"sum by ({NS}) (increase({POLICY_EVENTS}[$__rate_interval]))",
                        "policy events",
                    ),
                ],
                minimum=0,
            )
        )
        .with_row(gd.Row("Dynamo frontend"))
        .with_panel(
            timeseries_panel(
                "Time to first token",
                "Dynamo frontend's time to first token, median and 95th percentile per "
                "model (dynamo_frontend_time_to_first_token_seconds).",
                UNIT_SECONDS,
                _frontend_quantiles("dynamo_frontend_time_to_first_token_seconds"),
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Inter-token latency",
                "Dynamo frontend's inter-token latency, median and 95th percentile per model "
                "(dynamo_frontend_inter_token_latency_seconds).",
                UNIT_SECONDS,
                _frontend_quantiles("dynamo_frontend_inter_token_latency_seconds"),
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Frontend requests",
                "Requests per second the Dynamo frontend handled, per model "
                "(dynamo_frontend_requests_total).",
                UNIT_PER_SECOND,
                [
                    Query(
                        "sum by (model) "
                        f"(rate(dynamo_frontend_requests_total{{{FRONTEND}}}[$__rate_interval]))",
                        "{{model}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Frontend requests in flight",
                "Requests the Dynamo frontend is working on, and those waiting for their "
                "first response.",
                UNIT_COUNT,
                [
                    Query(
                        f"sum by (model) (dynamo_frontend_inflight_requests{{{FRONTEND}}})",
                        "{{model}} in flight",
                    ),
                    Query(
                        f"sum by (model) (dynamo_frontend_queued_requests{{{FRONTEND}}})",
                        "{{model}} queued",
                    ),
                ],
                minimum=0,
            )
        )
        .with_row(gd.Row("Discovery"))
        .with_panel(
            timeseries_panel(
                "Stale discovery entries reaped",
                "Discovery entries whose owner died, removed by the connector's reaper, per "
                "rate interval. Steady reaping means replicas die without deregistering.",
                UNIT_COUNT,
                [
                    Query(
                        f"increase({sel('discovery_stale_reaped_total', BY_NS)}[$__rate_interval])",
                        "{{dynamo_namespace}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Discovery instances vs running replicas",
                "Instances registered in discovery against replicas whose process is "
                "alive; more instances than replicas for long is the "
                "DynamoLocalDiscoveryStaleEntries alert.",
                UNIT_COUNT,
                [
                    Query(_m("discovery_instances"), "{{dynamo_component}} instances"),
                    Query(_m("component_replicas_running"), "{{dynamo_component}} running"),
                ],
                minimum=0,
            )
        )
    )
    annotations = [
        Annotation(
            "Scale targets",
            f"sum by ({NS}, {COMP}) (changes({_m('component_replicas_desired')}[1m])) > 0",
            "scale {{dynamo_component}}",
            "The replica target of {{dynamo_component}} changed",
            "blue",
        ),
    ]
    return render(board, annotations)
