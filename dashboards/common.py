"""Building blocks every dashboard uses: the data source, variables, selectors and panels.

Each panel helper takes a title, a description and a unit as required arguments, points the
panel at the ``$datasource`` variable and gives its queries ref ids A, B, C..., so the rules
the lint (``dashboards/lint.py``) enforces hold by construction.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from grafana_foundation_sdk.builders import dashboard as gd
from grafana_foundation_sdk.builders import prometheus, stat, statetimeline, table, timeseries
from grafana_foundation_sdk.builders.common import StackingConfig
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import StackingMode
from grafana_foundation_sdk.models.dashboard import (
    DashboardCursorSync,
    DataSourceRef,
    DataTransformerConfig,
    DynamicConfigValue,
    Threshold,
    ThresholdsMode,
    ValueMap,
    ValueMappingResult,
    VariableRefresh,
    VariableSort,
)
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from dashboards.promql import metric
from exporter.catalog import COMP, NS, Kind, spec

DATASOURCE_VAR = "datasource"
PROMETHEUS = DataSourceRef(type_val="prometheus", uid="${" + DATASOURCE_VAR + "}")

# Label matchers on the dashboards' template variables. Always ``=~``: multi-value and
# "All" selections expand to regular expressions.
BY_NS = f'{NS}=~"$namespace"'
BY_COMP = f'{COMP}=~"$component"'
BY_GPU = 'gpu=~"$gpu"'

# Grafana units (https://grafana.com/docs/grafana/latest/panels-visualizations/ ...
# configure-standard-options/#unit); "suffix:" units for counts Grafana has no name for.
UNIT_COUNT = "none"
UNIT_RATIO = "percentunit"
UNIT_BYTES = "bytes"
UNIT_SECONDS = "s"
UNIT_CELSIUS = "celsius"
UNIT_WATTS = "watt"
UNIT_PER_SECOND = "cps"
UNIT_CORES = "suffix: cores"
UNIT_REPLICAS = "suffix: replicas"
UNIT_MESSAGES = "suffix: messages"


def sel(name: str, *matchers: str) -> str:
    """A vector selector for catalog metric ``name`` (checked against the catalog)."""
    full = metric(name)
    return f"{full}{{{', '.join(matchers)}}}" if matchers else full


def bucket(name: str, *matchers: str) -> str:
    """The ``_bucket`` series of catalog histogram ``name``, for ``histogram_quantile``."""
    s = spec(name)
    if s.kind is not Kind.HISTOGRAM:
        raise ValueError(f"{s.name} is a {s.kind.value}, not a histogram")
    return sel(name, *matchers).replace(s.name, s.name + "_bucket", 1)


@dataclass(frozen=True)
class Query:
    """One PromQL target: ``legend`` is Grafana's legend format (``{{label}}``)."""

    expr: str
    legend: str = ""
    instant: bool = False


def _targets(queries: Sequence[Query], table_format: bool = False) -> list[prometheus.Dataquery]:
    out: list[prometheus.Dataquery] = []
    for i, q in enumerate(queries):
        t = prometheus.Dataquery().expr(q.expr).ref_id(chr(ord("A") + i)).datasource(PROMETHEUS)
        if q.legend:
            t = t.legend_format(q.legend)
        t = t.instant() if q.instant else t.range()
        if table_format:
            t = t.format(PromQueryFormat.TABLE)
        out.append(t)
    return out


def _thresholds(steps: Sequence[tuple[float | None, str]]) -> gd.ThresholdsConfig:
    return (
        gd.ThresholdsConfig()
        .mode(ThresholdsMode.ABSOLUTE)
        .steps([Threshold(value=v, color=c) for v, c in steps])
    )


def timeseries_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 12,
    height: int = 8,
    stacked: bool = False,
    minimum: float | None = None,
    maximum: float | None = None,
) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(list(_targets(queries)))
        .span(width)
        .height(height)
        .fill_opacity(10)
    )
    if stacked:
        panel = panel.stacking(StackingConfig().mode(StackingMode.NORMAL)).fill_opacity(40)
    if minimum is not None:
        panel = panel.min(minimum)
    if maximum is not None:
        panel = panel.max(maximum)
    return panel


def stat_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 4,
    height: int = 4,
    thresholds: Sequence[tuple[float | None, str]] = ((None, "green"),),
    mappings: Mapping[int, tuple[str, str]] | None = None,
) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(list(_targets(queries)))
        .span(width)
        .height(height)
        .thresholds(_thresholds(thresholds))
        .mappings(_value_mappings(mappings or {}))
    )


# Columns a table of label sets never needs: scrape identity and the instant's timestamp.
_HIDDEN_COLUMNS = {"Time": True, "__name__": True, "job": True, "instance": True}


def table_panel(
    title: str,
    description: str,
    unit: str,
    queries: Sequence[Query],
    *,
    width: int = 12,
    height: int = 8,
    columns: Mapping[str, str] | None = None,
    state_column: tuple[str, Mapping[int, tuple[str, str]]] | None = None,
) -> table.Panel:
    """A table of instant queries; several queries are merged on their common labels
    (so give them the same label sets).

    ``columns`` renames columns (``"Value #A"`` is query A's value); ``state_column`` is a
    (column after renaming, codes) pair whose numeric codes are shown as text (see
    :func:`state_codes`).
    """
    transformations = (
        [DataTransformerConfig(id_val="merge", options={})] if len(queries) > 1 else []
    )
    organize: dict[str, Any] = {"excludeByName": dict(_HIDDEN_COLUMNS)}
    if columns:
        organize["renameByName"] = dict(columns)
    transformations.append(DataTransformerConfig(id_val="organize", options=organize))
    instant = [Query(q.expr, q.legend, instant=True) for q in queries]
    panel = (
        table.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(list(_targets(instant, table_format=True)))
        .transformations(transformations)
        .span(width)
        .height(height)
    )
    if state_column is not None:
        column, codes = state_column
        panel = panel.override_by_name(
            column, [DynamicConfigValue(id_val="mappings", value=_value_mappings(codes))]
        )
    return panel


# Colours for enum states, by the state's name; anything else is blue.
_STATE_COLORS = {
    "ready": "green",
    "running": "green",
    "free": "green",
    "allocated": "blue",
    "starting": "blue",
    "spawning": "blue",
    "degraded": "orange",
    "stopping": "yellow",
    "backoff": "orange",
    "exited": "red",
    "crashloop": "red",
    "leaked": "red",
    "stopped": "text",
}


def state_codes(states: Sequence[str]) -> dict[int, tuple[str, str]]:
    """Codes 1..n for an enum's states (in catalog order), with their text and colour."""
    return {i: (state, _STATE_COLORS.get(state, "blue")) for i, state in enumerate(states, 1)}


def state_code_expr(selector: str, states: Sequence[str], by: Sequence[str]) -> str:
    """PromQL turning a one-hot ``state`` gauge into one series per ``by`` with the code of
    its current state (see :func:`state_codes`): each state's series is multiplied by its
    code (0 where the state is not current), then the maximum is taken."""
    name, _, rest = selector.partition("{")
    matchers = rest.rstrip("}")
    parts = []
    for code, state in state_codes(states).items():
        inner = ", ".join(x for x in (matchers, f'state="{state[0]}"') if x)
        parts.append(f"{name}{{{inner}}} * {code}")
    return f"max by ({', '.join(by)}) ({' or '.join(parts)})"


def _value_mappings(mappings: Mapping[int, tuple[str, str]]) -> list[Any]:
    if not mappings:
        return []
    return [
        ValueMap(
            options={
                str(code): ValueMappingResult(text=text, color=color, index=i)
                for i, (code, (text, color)) in enumerate(sorted(mappings.items()))
            }
        )
    ]


def state_timeline_panel(
    title: str,
    description: str,
    queries: Sequence[Query],
    mappings: Mapping[int, tuple[str, str]],
    *,
    unit: str = UNIT_COUNT,
    width: int = 12,
    height: int = 8,
) -> statetimeline.Panel:
    """A state timeline: one row per series, coloured by the mapped value."""
    return (
        statetimeline.Panel()
        .title(title)
        .description(description)
        .unit(unit)
        .datasource(PROMETHEUS)
        .targets(list(_targets(queries)))
        .mappings(_value_mappings(mappings))
        .span(width)
        .height(height)
    )


@dataclass(frozen=True)
class Annotation:
    """A Prometheus annotation: an event mark wherever ``expr`` has a non-zero value.

    ``title`` and ``text`` are Grafana's ``titleFormat``/``textFormat`` (``{{label}}``).
    """

    name: str
    expr: str
    title: str
    text: str
    color: str
    step: str = "30s"

    def builder(self) -> gd.AnnotationQuery:
        return (
            gd.AnnotationQuery()
            .name(self.name)
            .datasource(PROMETHEUS)
            .enable(True)
            .icon_color(self.color)
            .expr(self.expr)
        )

    def extra_fields(self) -> dict[str, Any]:
        # Fields of Grafana's Prometheus annotation query that the SDK's generic
        # AnnotationQuery does not model; the generator adds them to the JSON.
        return {
            "step": self.step,
            "titleFormat": self.title,
            "textFormat": self.text,
            "useValueForTime": False,
        }


# ----------------------------------------------------------------------------- variables


def datasource_variable() -> gd.DatasourceVariable:
    return (
        gd.DatasourceVariable(DATASOURCE_VAR)
        .label("Data source")
        .type("prometheus")
        .description("Prometheus that scrapes the dynamo-local connector")
    )


def query_variable(
    name: str, label: str, query: str, description: str, *, multi: bool = True
) -> gd.QueryVariable:
    """A variable filled from ``label_values(...)``; "All" selects every value."""
    return (
        gd.QueryVariable(name)
        .label(label)
        .description(description)
        .datasource(PROMETHEUS)
        .query(query)
        .refresh(VariableRefresh.ON_TIME_RANGE_CHANGED)
        .sort(VariableSort.ALPHABETICAL_CASE_INSENSITIVE_ASC)
        .multi(multi)
        .include_all(True)
        .all_value(".*")
    )


def namespace_variable() -> gd.QueryVariable:
    return query_variable(
        "namespace",
        "Namespace",
        f"label_values({metric('component_info')}, {NS})",
        "Dynamo namespace of the graph",
    )


def component_variable() -> gd.QueryVariable:
    return query_variable(
        "component",
        "Component",
        f"label_values({sel('component_info', BY_NS)}, {COMP})",
        "Component of the graph",
    )


def gpu_variable() -> gd.QueryVariable:
    return query_variable(
        "gpu", "GPU", f"label_values({metric('gpu_info')}, gpu)", "GPU UUID as NVML reports it"
    )


def dashboard(uid: str, title: str, description: str, tags: Sequence[str]) -> gd.Dashboard:
    """A dashboard with the shared settings: stable uid, browser time, 10 s refresh."""
    return (
        gd.Dashboard(title)
        .uid(uid)
        .description(description)
        .tags(["dynamo-local", *tags])
        .time("now-1h", "now")
        .refresh("10s")
        .timezone("browser")
        .tooltip(DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_variable())
    )


def render(board: gd.Dashboard, annotations: Sequence[Annotation] = ()) -> dict[str, Any]:
    """The dashboard as plain JSON data, annotations included, panel ids numbered 1..n."""
    for annotation in annotations:
        board = board.annotation(annotation.builder())
    data: dict[str, Any] = json.loads(json.dumps(board.build(), cls=JSONEncoder))
    listed = data.get("annotations", {}).get("list", [])
    for entry, annotation in zip(listed, annotations, strict=True):
        entry.update(annotation.extra_fields())
    # Ids by position: stable across regenerations, unique within the dashboard.
    for i, panel in enumerate(data.get("panels", []), 1):
        panel["id"] = i
    return data


__all__ = [
    "BY_COMP",
    "BY_GPU",
    "BY_NS",
    "PROMETHEUS",
    "Annotation",
    "Query",
    "bucket",
    "component_variable",
    "dashboard",
    "datasource_variable",
    "gpu_variable",
    "namespace_variable",
    "query_variable",
    "render",
    "sel",
    "stat_panel",
    "state_code_expr",
    "state_codes",
    "state_timeline_panel",
    "table_panel",
    "timeseries_panel",
]
