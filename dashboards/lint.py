"""Rules every generated dashboard follows, checked on the JSON Grafana loads.

- a stable uid ``dynamo-local-*`` (Grafana's limit is 40 characters);
- a ``datasource`` variable of type prometheus, and every panel, target and annotation
  querying through it (``${datasource}``), so a dashboard works against any Prometheus;
- every panel but rows has a title, a description and a unit;
- ``rate``/``irate`` ranges are ``$__rate_interval`` (``increase`` may also span the
  dashboard's ``$__range``), so a range always holds enough scrapes whatever the zoom;
- dashboard variables appear only in ``=~`` matchers (multi-value and "All" expand to
  regular expressions) and only defined ones;
- every expression passes :func:`dashboards.promql.check_expr`: catalog names, labels and
  enum values, known Dynamo series, recording rules that exist.

:func:`queries` lists every PromQL expression of a dashboard (panels, annotations and
variables), for the lint and for the proof against a real Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from dashboards.common import DATASOURCE_VAR
from dashboards.promql import check_expr

UID_PATTERN = re.compile(r"^dynamo-local-[a-z0-9-]+$")
UID_MAX = 40
DATASOURCE_UID = "${" + DATASOURCE_VAR + "}"
# Grafana's global variables that may appear in an expression.
GLOBAL_VARIABLES = frozenset(
    {"__rate_interval", "__interval", "__interval_ms", "__range", "__range_s", "__range_ms"}
)
_RANGED_CALL = re.compile(r"\b(rate|irate|increase)\s*\(")
_VARIABLE = re.compile(r"\$\{?(\w+)\}?")
_VAR_MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"[^"]*\$')
_LABEL_VALUES = re.compile(r"^\s*label_values\(\s*(.*),\s*(\w+)\s*\)\s*$", re.DOTALL)
ALLOWED_RANGES = {
    "rate": {"$__rate_interval"},
    "irate": {"$__rate_interval"},
    "increase": {"$__rate_interval", "$__range"},
}


@dataclass(frozen=True)
class DashboardQuery:
    """One PromQL expression of a dashboard; ``where`` says which panel or variable."""

    dashboard: str
    where: str
    expr: str


def queries(data: dict[str, Any]) -> list[DashboardQuery]:
    """Every PromQL expression in the dashboard: panel targets, annotations and the series
    selector of each ``label_values`` variable."""
    uid = str(data.get("uid"))
    out: list[DashboardQuery] = []
    for panel in _panels(data):
        for target in panel.get("targets", []):
            where = f"panel {panel.get('title')!r} target {target.get('refId')}"
            out.append(DashboardQuery(uid, where, str(target.get("expr", ""))))
    for annotation in data.get("annotations", {}).get("list", []):
        if "expr" in annotation:
            where = f"annotation {annotation.get('name')!r}"
            out.append(DashboardQuery(uid, where, str(annotation["expr"])))
    for variable in data.get("templating", {}).get("list", []):
        if variable.get("type") == "query":
            m = _LABEL_VALUES.match(str(variable.get("query", "")))
            if m:
                out.append(DashboardQuery(uid, f"variable {variable['name']!r}", m.group(1)))
    return out


def substitute(
    expr: str, *, rate_interval: str, range_: str, interval: str = "1s", all_value: str = ".*"
) -> str:
    """``expr`` as Grafana sends it to Prometheus: global variables replaced by the given
    durations, dashboard variables by their "All" value (they only occur in ``=~``)."""

    def one(m: re.Match[str]) -> str:
        name = m.group(1)
        globals_ = {
            "__rate_interval": rate_interval,
            "__range": range_,
            "__interval": interval,
        }
        if name in globals_:
            return globals_[name]
        if name.startswith("__"):
            raise ValueError(f"${name}: no value for this Grafana global variable")
        return all_value

    return _VARIABLE.sub(one, expr)


def _panels(data: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for panel in data.get("panels", []):
        yield panel
        yield from panel.get("panels", [])  # panels inside collapsed rows


def _call_ranges(expr: str) -> Iterator[tuple[str, str]]:
    """(function, range) for each rate/irate/increase call: the ``[...]`` that closes the
    call's argument."""
    for m in _RANGED_CALL.finditer(expr):
        depth, i = 1, m.end()
        last_range = ""
        while i < len(expr) and depth:
            ch = expr[i]
            if ch == "(":
                depth += 1
            elif ch == ")":
                depth -= 1
            elif ch == "[" and depth == 1:
                end = expr.index("]", i)
                last_range = expr[i + 1 : end].strip()
                i = end
            i += 1
        yield m.group(1), last_range


def lint_expr(expr: str, variables: set[str], recorded: frozenset[str]) -> list[str]:
    """Problems with one dashboard expression."""
    problems: list[str] = []
    if not expr.strip():
        return ["empty expression"]
    for fn, rng in _call_ranges(expr):
        allowed = ALLOWED_RANGES[fn]
        if rng not in allowed:
            problems.append(f"{fn}() over [{rng}]: use {' or '.join(sorted(allowed))}")
    for name in _VARIABLE.findall(expr):
        if name not in variables and name not in GLOBAL_VARIABLES:
            problems.append(f"${name} is not a variable of the dashboard")
    for label, op in _VAR_MATCHER.findall(expr):
        if op != "=~":
            problems.append(f"variable in {label}{op}: use =~ (multi-value selections)")
    problems += check_expr(expr, recorded)
    return problems


def lint(data: dict[str, Any], recorded: frozenset[str] = frozenset()) -> list[str]:
    """Every rule the dashboard breaks, one line each naming where; empty when clean."""
    problems: list[str] = []
    uid = data.get("uid")
    if not isinstance(uid, str) or not UID_PATTERN.match(uid) or len(uid) > UID_MAX:
        problems.append(f"uid {uid!r}: want dynamo-local-<name>, at most {UID_MAX} characters")
    name = uid if isinstance(uid, str) else "<no uid>"
    variables = {str(v.get("name")) for v in data.get("templating", {}).get("list", [])}
    ds_vars = [
        v
        for v in data.get("templating", {}).get("list", [])
        if v.get("type") == "datasource" and v.get("name") == DATASOURCE_VAR
    ]
    if not ds_vars or ds_vars[0].get("query") != "prometheus":
        problems.append(f"{name}: no prometheus datasource variable ${DATASOURCE_VAR}")
    ids: set[int] = set()
    for panel in _panels(data):
        title = panel.get("title")
        where = f"{name}: panel {title!r}"
        pid = panel.get("id")
        if not isinstance(pid, int) or pid in ids:
            problems.append(f"{where}: id {pid!r} missing or not unique")
        else:
            ids.add(pid)
        grid = panel.get("gridPos", {})
        if grid.get("x", 0) + grid.get("w", 0) > 24:
            problems.append(f"{where}: wider than the 24-column grid")
        if panel.get("type") == "row":
            continue
        if not title:
            problems.append(f"{where}: no title")
        if not str(panel.get("description", "")).strip():
            problems.append(f"{where}: no description")
        if not panel.get("fieldConfig", {}).get("defaults", {}).get("unit"):
            problems.append(f"{where}: no unit")
        if panel.get("datasource", {}).get("uid") != DATASOURCE_UID:
            problems.append(f"{where}: datasource is not {DATASOURCE_UID}")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: no queries")
        ref_ids = [t.get("refId") for t in targets]
        if len(set(ref_ids)) != len(ref_ids) or not all(ref_ids):
            problems.append(f"{where}: refIds {ref_ids} missing or repeated")
        for target in targets:
            if target.get("datasource", {}).get("uid") != DATASOURCE_UID:
                problems.append(f"{where} {target.get('refId')}: datasource not {DATASOURCE_UID}")
    for annotation in data.get("annotations", {}).get("list", []):
        if annotation.get("builtIn"):
            continue
        if annotation.get("datasource", {}).get("uid") != DATASOURCE_UID:
            problems.append(f"{name}: annotation {annotation.get('name')!r}: datasource")
    for q in queries(data):
        problems += [f"{name}: {q.where}: {p}" for p in lint_expr(q.expr, variables, recorded)]
    return problems


__all__ = ["DashboardQuery", "lint", "lint_expr", "queries", "substitute"]
