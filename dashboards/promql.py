"""PromQL names and checks shared by the dashboards, the alert rules and their tests.

Dashboards and rules name ``dynamo_local_*`` metrics through :func:`metric`, which asks the
catalog (``exporter/catalog.py``), so a metric that is renamed or removed there fails the
generator instead of leaving an empty panel. :func:`check_expr` reads an expression the
other way round (metric names and label matchers out of the text) and reports every name,
label or enum value the catalog does not have; the tests run it on every committed panel
and rule.

The parsing is deliberately small: it knows enough PromQL to find vector selectors and
grouping labels (strings, label matchers and ``by``/``on`` lists are taken out first), not
to evaluate anything. A real Prometheus parses every expression in
``tests/test_prometheus_proof.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from exporter.catalog import BY_NAME, PREFIX, Kind, MetricSpec, spec

# The scrape job of the connector's /metrics in deploy/prometheus/prometheus.yml; dashboards
# and rules select ``up`` and scrape metadata by it.
JOB = "dynamo-local"
# The jobs that scrape Dynamo's own frontend (``dynamo_frontend_*``) and its workers,
# routers and Planner (``dynamo_component_*``), found through the connector's
# ``/v1/prometheus/targets``.
DYNAMO_FRONTEND_JOB = "dynamo-frontend"
DYNAMO_COMPONENTS_JOB = "dynamo-components"

# Labels Prometheus adds to every scraped series.
TARGET_LABELS = frozenset({"job", "instance"})

# Series that are not ours but that dashboards and rules may read: Prometheus' own scrape
# metadata, and the families Dynamo 1.6.1's frontend (``dynamo_frontend_*``, on its HTTP
# port) and workers (``dynamo_component_*``, on their system port) expose, allowed by name
# (Dynamo's ``lib/runtime/src/metrics/prometheus_names.rs``, ``dynamo.prometheus_names`` in
# the 1.6.1 wheel; histograms by base name). An explicit list: a name outside it is taken
# for a typo until it is added here.
# Their labels are Dynamo's plus the targets' from the connector's service discovery
# (dynamo_namespace, dynamo_component, replica, role), so matchers on them are not checked.
PROMETHEUS_SERIES = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})
DYNAMO_SERIES: dict[str, Kind] = {
    "dynamo_frontend_requests_total": Kind.COUNTER,
    "dynamo_frontend_inflight_requests": Kind.GAUGE,
    "dynamo_frontend_queued_requests": Kind.GAUGE,
    "dynamo_frontend_request_duration_seconds": Kind.HISTOGRAM,
    "dynamo_frontend_time_to_first_token_seconds": Kind.HISTOGRAM,
    "dynamo_frontend_inter_token_latency_seconds": Kind.HISTOGRAM,
    "dynamo_frontend_output_tokens_total": Kind.COUNTER,
    "dynamo_component_requests_total": Kind.COUNTER,
    "dynamo_component_inflight_requests": Kind.GAUGE,
    "dynamo_component_request_duration_seconds": Kind.HISTOGRAM,
    "dynamo_component_errors_total": Kind.COUNTER,
}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_SELECTOR = re.compile(r"(?<![\w:$])([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
_BRACES = re.compile(r"(?<!\$)\{([^}]*)\}")
_MATCHER = re.compile(r'\s*([a-zA-Z_]\w*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"\s*,?')
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_IDENT = re.compile(r"(?<![\w:$.])([a-zA-Z_:][\w:]*)(?![\w:])(?!\s*\()")
_RANGE = re.compile(r"\[[^\]]*\]")
_ENUM_WORD = re.compile(r"^[a-z0-9_]+$")


def metric(name: str) -> str:
    """The exposed name of a catalog metric (``"gpu_power_watts"`` or the full name).

    Raises ``KeyError`` naming the catalog when it has no such metric, so a dashboard or
    rule can never be generated against a metric the exporter does not publish.
    """
    return spec(name).name


@dataclass(frozen=True)
class Matcher:
    label: str
    op: str
    value: str


@dataclass(frozen=True)
class Selector:
    """A vector selector: metric name and its label matchers."""

    name: str
    matchers: tuple[Matcher, ...]


def _blank_strings(expr: str) -> str:
    # Same length, so offsets still line up; string contents never look like names.
    return _STRING.sub(lambda m: '"' + " " * (len(m.group(0)) - 2) + '"', expr)


def _parse_matchers(text: str) -> tuple[Matcher, ...]:
    out: list[Matcher] = []
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _MATCHER.match(text, pos)
        if m is None:
            raise ValueError(f"cannot read label matchers {text!r} at {text[pos:]!r}")
        out.append(Matcher(m.group(1), m.group(2), m.group(3)))
        pos = m.end()
    return tuple(out)


def selectors(expr: str) -> list[Selector]:
    """Every vector selector in ``expr``, in order (a bare ``name`` has no matchers)."""
    blanked = _blank_strings(expr)
    found: list[tuple[int, Selector]] = []
    covered: list[tuple[int, int]] = []
    for m in _SELECTOR.finditer(blanked):
        if m.group(1) in _KEYWORDS:
            continue
        # Matchers are read from the original text (the values were blanked above).
        inner = expr[m.start(2) : m.end(2)]
        found.append((m.start(), Selector(m.group(1), _parse_matchers(inner))))
        covered.append((m.start(), m.end()))
    for m in _BRACES.finditer(blanked):
        if any(start <= m.start(1) < end for start, end in covered):
            continue
        inner = expr[m.start(1) : m.end(1)]
        matchers = _parse_matchers(inner)
        names = [x.value for x in matchers if x.label == "__name__" and x.op == "="]
        found.append((m.start(), Selector(names[0] if names else "", matchers)))
    stripped = _RANGE.sub(lambda m: " " * len(m.group(0)), blanked)
    stripped = re.sub(r"\{[^}]*\}", lambda m: " " * len(m.group(0)), stripped)
    stripped = _GROUPING.sub(lambda m: " " * len(m.group(0)), stripped)
    stripped = re.sub(r"\$\{?\w+\}?", lambda m: " " * len(m.group(0)), stripped)
    taken = {start for start, _ in covered}
    for m in _IDENT.finditer(stripped):
        name = m.group(1)
        if name in _KEYWORDS or m.start() in taken:
            continue
        found.append((m.start(), Selector(name, ())))
    return [s for _, s in sorted(found, key=lambda item: item[0])]


def series_names(expr: str) -> set[str]:
    """The metric names ``expr`` reads."""
    return {s.name for s in selectors(expr) if s.name}


def grouping_labels(expr: str) -> set[str]:
    """Labels named in ``by``/``without``/``on``/``ignoring``/``group_*`` clauses."""
    blanked = _blank_strings(expr)
    labels: set[str] = set()
    for m in _GROUPING.finditer(blanked):
        labels.update(x.strip() for x in m.group(2).split(",") if x.strip())
    return labels


def catalog_spec(name: str) -> MetricSpec | None:
    """The catalog entry behind a series name (histogram ``_bucket`` etc. included)."""
    if name in BY_NAME:
        return BY_NAME[name]
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and base in BY_NAME and BY_NAME[base].kind is Kind.HISTOGRAM:
            return BY_NAME[base]
    return None


def _dynamo_known(name: str) -> bool:
    if name in DYNAMO_SERIES:
        return DYNAMO_SERIES[name] is not Kind.HISTOGRAM
    for suffix in HISTOGRAM_SUFFIXES:
        base = name.removesuffix(suffix)
        if base != name and DYNAMO_SERIES.get(base) is Kind.HISTOGRAM:
            return True
    return False


def _enum_problems(s: MetricSpec, m: Matcher) -> list[str]:
    allowed = s.enum_values(m.label)
    if allowed is None or "$" in m.value:
        return []
    if m.op in ("=", "!="):
        values = [m.value] if m.value else []
    else:
        values = [v for v in m.value.split("|") if _ENUM_WORD.match(v)]
    return [
        f"{s.name}: {m.label}={v!r} is not one of {', '.join(allowed)}"
        for v in values
        if v not in allowed
    ]


def check_expr(expr: str, recorded: frozenset[str] = frozenset()) -> list[str]:
    """Problems with ``expr`` against the catalog; empty when it is fine.

    A ``dynamo_local_*`` name must be in the catalog, its matchers must use its labels
    (or ``job``/``instance``, and ``le`` on a histogram bucket) and enum values the catalog
    lists. Other names must be Prometheus scrape metadata, a known Dynamo series, or a
    recording rule from ``recorded``. Labels in ``by``/``on`` clauses must belong to some
    metric the expression reads.
    """
    problems: list[str] = []
    try:
        found = selectors(expr)
    except ValueError as exc:
        return [str(exc)]
    known_labels: set[str] = set(TARGET_LABELS)
    open_labels = False  # a series whose labels we do not know: skip the grouping check
    for sel in found:
        name = sel.name
        if not name:
            problems.append(f"selector without a metric name: {sel}")
            continue
        if name.startswith(PREFIX):
            s = catalog_spec(name)
            if s is None:
                problems.append(f"{name} is not in the catalog (exporter/catalog.py)")
                continue
            labels = set(s.labels) | TARGET_LABELS | {"__name__"}
            if name.endswith("_bucket") and s.kind is Kind.HISTOGRAM:
                labels.add("le")
            known_labels |= labels
            for m in sel.matchers:
                if m.label not in labels:
                    problems.append(f"{name} has no label {m.label!r}")
                problems += _enum_problems(s, m)
        elif name in recorded or name in PROMETHEUS_SERIES or _dynamo_known(name):
            open_labels = True
        elif ":" in name:
            problems.append(f"{name} looks like a recording rule but no rule records it")
        else:
            problems.append(f"{name} is neither in the catalog nor a known Dynamo series")
    if not open_labels:
        for label in sorted(grouping_labels(expr) - known_labels):
            problems.append(f"grouping label {label!r} belongs to no metric the query reads")
    return problems


__all__ = [
    "DYNAMO_COMPONENTS_JOB",
    "DYNAMO_FRONTEND_JOB",
    "DYNAMO_SERIES",
    "JOB",
    "PROMETHEUS_SERIES",
    "Matcher",
    "Selector",
    "catalog_spec",
    "check_expr",
    "grouping_labels",
    "metric",
    "selectors",
    "series_names",
]
