"""Exporter health: is the connector scraped, are its sources read, are snapshots fresh."""

from __future__ import annotations

from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd

from dashboards.common import (
    UNIT_COUNT,
    UNIT_PER_SECOND,
    UNIT_RATIO,
    UNIT_SECONDS,
    Query,
    dashboard,
    render,
    stat_panel,
    state_timeline_panel,
    timeseries_panel,
)
from dashboards.promql import JOB, metric

UID = "dynamo-local-exporter"
TITLE = "dynamo-local / Exporter health"
TARGET = f'job="{JOB}"'
UP_DOWN = {0: ("down", "red"), 1: ("up", "green")}


def build() -> dict[str, Any]:
    board = (
        dashboard(
            UID,
            TITLE,
            "The connector's /metrics as Prometheus sees it, and the exporter's own health: "
            "per-source reads, snapshot freshness and collection cost.",
            ["exporter"],
        )
        .with_row(gd.Row("Scrape"))
        .with_panel(
            stat_panel(
                "Target up",
                "Whether Prometheus' last scrape of the connector's /metrics succeeded.",
                UNIT_COUNT,
                [Query(f"up{{{TARGET}}}", "{{instance}}")],
                width=6,
                thresholds=((None, "red"), (1.0, "green")),
                mappings=UP_DOWN,
            )
        )
        .with_panel(
            stat_panel(
                "Snapshot age",
                "Age of the snapshot the last scrape rendered; scrapes never sample, so a "
                "growing age means the sampler is stuck (DynamoLocalExporterStale alert).",
                UNIT_SECONDS,
                [Query(metric("exporter_snapshot_age_seconds"))],
                width=6,
                thresholds=((None, "green"), (5.0, "orange"), (30.0, "red")),
            )
        )
        .with_panel(
            timeseries_panel(
                "Scrape duration",
                "How long Prometheus took to scrape the connector's /metrics.",
                UNIT_SECONDS,
                [Query(f"scrape_duration_seconds{{{TARGET}}}", "{{instance}}")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Samples per scrape",
                "Samples in each scrape of /metrics; grows with components, replicas and GPUs.",
                UNIT_COUNT,
                [Query(f"scrape_samples_scraped{{{TARGET}}}", "{{instance}}")],
                minimum=0,
            )
        )
        .with_row(gd.Row("Sources"))
        .with_panel(
            state_timeline_panel(
                "Source up",
                "Whether the exporter's last read of each source succeeded: processes "
                "(connector state, process trees), nvml (GPUs), discovery (etcd or file "
                "backend), prefill_queue (NATS JetStream or a /metrics gauge), resources "
                "(allocation), planner (the Planner executor's decisions).",
                [Query(metric("exporter_source_up"), "{{source}}")],
                UP_DOWN,
                width=24,
                height=6,
            )
        )
        .with_panel(
            timeseries_panel(
                "Time since last successful read",
                "Seconds since each source was last read successfully.",
                UNIT_SECONDS,
                [
                    Query(
                        f"time() - {metric('exporter_source_last_success_timestamp_seconds')}",
                        "{{source}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Read duration",
                "Wall time of each source's last read.",
                UNIT_SECONDS,
                [Query(metric("exporter_source_collection_duration_seconds"), "{{source}}")],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Read errors",
                "Failed reads of each source per rate interval.",
                UNIT_COUNT,
                [
                    Query(
                        f"increase({metric('exporter_source_errors_total')}[$__rate_interval])",
                        "{{source}}",
                    )
                ],
                minimum=0,
            )
        )
        .with_row(gd.Row("Sampler"))
        .with_panel(
            timeseries_panel(
                "Snapshots per second",
                "Snapshots the sampler produced per second (one per sampling interval).",
                UNIT_PER_SECOND,
                [
                    Query(
                        f"rate({metric('exporter_snapshots_total')}[$__rate_interval])",
                        "snapshots",
                    )
                ],
                minimum=0,
            )
        )
        .with_panel(
            timeseries_panel(
                "Collection CPU",
                "CPU the sampler threads spend reading process trees and NVML, as a share "
                "of one core.",
                UNIT_RATIO,
                [
                    Query(
                        f"rate({metric('exporter_collection_cpu_seconds_total')}"
                        "[$__rate_interval])",
                        "sampler",
                    )
                ],
                minimum=0,
            )
        )
    )
    return render(board)
