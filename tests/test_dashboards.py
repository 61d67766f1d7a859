"""Dashboards: byte-identical regeneration, the lint on every dashboard (and the lint itself),
catalog coverage, PromQL name extraction, and the Grafana provisioning files."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards import generate
from dashboards.lint import lint, queries, substitute
from dashboards.promql import (
    DYNAMO_FRONTEND_JOB,
    JOB,
    catalog_spec,
    check_expr,
    grouping_labels,
    metric,
    selectors,
    series_names,
)
from dashboards.rules import recorded_names
from exporter.catalog import CATALOG
from tests.servers import PrometheusFactory

REPO = Path(__file__).resolve().parent.parent
JSON_DIR = REPO / "dashboards" / "json"
PROVISIONING = REPO / "dashboards" / "provisioning"

EXPECTED = {
    "dynamo-local-overview": "dynamo-local / Overview",
    "dynamo-local-component": "dynamo-local / Component",
    "dynamo-local-gpus": "dynamo-local / GPUs",
    "dynamo-local-scaling": "dynamo-local / Scaling",
    "dynamo-local-exporter": "dynamo-local / Exporter health",
}

# Catalog metrics no dashboard shows, each with the reason. Everything else must be on one.
NOT_SHOWN = {
    "dynamo_local_component_replicas_crashloop": (
        "always 0 today: the core marks crash-looping replicas 'exited', so the dashboards "
        'use dynamo_local_component_state{state="crashloop"}'
    ),
    "dynamo_local_replica_ready": "the replica state timeline shows ready (state=ready)",
    "dynamo_local_exporter_snapshot_timestamp_seconds": (
        "the same information as dynamo_local_exporter_snapshot_age_seconds, which is shown"
    ),
}


def load(uid: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((JSON_DIR / f"{uid}.json").read_text())
    return data


def all_dashboards() -> list[dict[str, Any]]:
    return [load(uid) for uid in EXPECTED]


# --------------------------------------------------------------------------- generation


def test_committed_json_is_what_the_generator_writes() -> None:
    assert generate.stale_files() == []
    assert sorted(p.name for p in JSON_DIR.glob("*.json")) == sorted(f"{u}.json" for u in EXPECTED)


def test_check_command_exits_0_on_the_committed_files() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dashboards.generate", "--check"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert (result.returncode, result.stderr) == (0, "")


def test_check_names_changed_missing_and_leftover_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    written = generate.write(tmp_path)
    assert sorted(p.name for p in written) == sorted(f"{u}.json" for u in EXPECTED)
    assert generate.main(["--check", "--output", str(tmp_path)]) == 0

    changed = tmp_path / "dynamo-local-gpus.json"
    changed.write_text(changed.read_text().replace('"GPUs free"', '"GPUs gratis"'))
    (tmp_path / "dynamo-local-scaling.json").unlink()
    (tmp_path / "old-dashboard.json").write_text("{}")

    assert generate.main(["--check", "--output", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == (
        f"dashboards out of date in {tmp_path}: dynamo-local-gpus.json, "
        "dynamo-local-scaling.json, old-dashboard.json; run `python -m dashboards.generate` "
        "and commit the result\n"
    )
    generate.write(tmp_path)  # rewrites the changed one, removes the leftover
    assert generate.stale_files(tmp_path) == []


def test_generation_is_deterministic() -> None:
    assert generate.rendered() == generate.rendered()


def test_a_dashboard_failing_the_lint_is_never_written(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = generate.DASHBOARDS["dynamo-local-exporter"]

    def broken() -> dict[str, Any]:
        data = good()
        data["panels"][1]["description"] = ""
        return data

    monkeypatch.setitem(generate.DASHBOARDS, "dynamo-local-exporter", broken)
    assert generate.main(["--output", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (
        "dashboard dynamo-local-exporter fails the lint:\n"
        "  dynamo-local-exporter: panel 'Target up': no description\n"
    )
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- contents


def test_five_dashboards_with_stable_uids_and_titles() -> None:
    assert {d["uid"]: d["title"] for d in all_dashboards()} == EXPECTED


@pytest.mark.parametrize("uid", list(EXPECTED))
def test_dashboard_passes_the_lint(uid: str) -> None:
    assert lint(load(uid), recorded_names()) == []


@pytest.mark.parametrize("uid", list(EXPECTED))
def test_every_panel_has_queries_and_the_datasource_variable(uid: str) -> None:
    data = load(uid)
    variables = {v["name"]: v for v in data["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = [p for p in data["panels"] if p["type"] != "row"]
    assert panels
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["description"].endswith("."), panel["title"]
    assert [p["id"] for p in data["panels"]] == list(range(1, len(data["panels"]) + 1))


def test_component_dashboard_has_namespace_and_component_variables() -> None:
    variables = {v["name"]: v for v in load("dynamo-local-component")["templating"]["list"]}
    assert list(variables) == ["datasource", "namespace", "component"]
    assert variables["namespace"]["query"] == (
        "label_values(dynamo_local_component_info, dynamo_namespace)"
    )
    assert variables["component"]["query"] == (
        'label_values(dynamo_local_component_info{dynamo_namespace=~"$namespace"}, '
        "dynamo_component)"
    )
    for name in ("namespace", "component"):
        assert variables[name]["includeAll"] is True
        assert variables[name]["multi"] is True
        assert variables[name]["allValue"] == ".*"


def test_overview_marks_scale_targets_and_crash_loops_as_annotations() -> None:
    annotations = load("dynamo-local-overview")["annotations"]["list"]
    assert [(a["name"], a["expr"], a["titleFormat"]) for a in annotations] == [
        (
            "Scale targets",
            "sum by (dynamo_namespace, dynamo_component) (changes("
            'dynamo_local_component_replicas_desired{dynamo_namespace=~"$namespace"}[1m])) > 0',
            "scale {{dynamo_component}}",
        ),
        (
            "Crash loops",
            'dynamo_local_component_state{dynamo_namespace=~"$namespace", state="crashloop"} == 1',
            "crash loop {{dynamo_component}}",
        ),
    ]


def test_scaling_dashboard_reads_dynamo_frontend_latency() -> None:
    exprs = [q.expr for q in queries(load("dynamo-local-scaling"))]
    assert (
        "histogram_quantile(0.95, sum by (le, model) (rate("
        f'dynamo_frontend_time_to_first_token_seconds_bucket{{job="{DYNAMO_FRONTEND_JOB}"}}'
        "[$__rate_interval])))"
    ) in exprs
    assert any("dynamo_frontend_inter_token_latency_seconds_bucket" in e for e in exprs)


def test_overview_reads_dynamo_frontend_by_namespace() -> None:
    """Dynamo's series have no namespace of their own: the filter works on the label the
    connector's service discovery gives each target."""
    panels = load("dynamo-local-overview")["panels"]
    row = [p["title"] for p in panels].index("Dynamo frontend")
    ns = 'dynamo_namespace=~"$namespace"'

    def quantiles(family: str) -> list[tuple[str, str]]:
        return [
            (
                f"histogram_quantile({q}, sum by (dynamo_namespace, le) "
                f"(rate({family}_bucket{{{ns}}}[$__rate_interval])))",
                f"p{p} {{{{dynamo_namespace}}}}",
            )
            for q, p in (("0.5", 50), ("0.99", 99))
        ]

    assert [
        (p["title"], [(t["expr"], t["legendFormat"]) for t in p["targets"]])
        for p in panels[row + 1 : row + 5]
    ] == [
        (
            "Frontend requests",
            [
                (
                    "sum by (dynamo_namespace) (rate(dynamo_frontend_requests_total"
                    f"{{{ns}}}[$__rate_interval]))",
                    "{{dynamo_namespace}}",
                )
            ],
        ),
        ("Time to first token", quantiles("dynamo_frontend_time_to_first_token_seconds")),
        ("Inter-token latency", quantiles("dynamo_frontend_inter_token_latency_seconds")),
        (
            "Frontend queued requests",
            [
                (
                    f"sum by (dynamo_namespace) (dynamo_frontend_queued_requests{{{ns}}})",
                    "{{dynamo_namespace}}",
                )
            ],
        ),
    ]
    assert panels[row + 5]["title"] == "Components"  # the next row


def test_state_timelines_map_every_enum_state_to_a_code() -> None:
    panel = next(
        p for p in load("dynamo-local-overview")["panels"] if p["title"] == "Component state"
    )
    options = panel["fieldConfig"]["defaults"]["mappings"][0]["options"]
    assert {code: o["text"] for code, o in options.items()} == {
        "1": "starting",
        "2": "running",
        "3": "degraded",
        "4": "crashloop",
        "5": "stopped",
    }
    assert 'state="crashloop"} * 4' in panel["targets"][0]["expr"]


def test_every_catalog_metric_is_on_a_dashboard_or_listed_with_a_reason() -> None:
    shown: set[str] = set()
    for data in all_dashboards():
        for q in queries(data):
            for name in series_names(q.expr):
                spec = catalog_spec(name)
                if spec is not None:
                    shown.add(spec.name)
    catalog = {s.name for s in CATALOG}
    assert shown <= catalog
    assert catalog - shown == set(NOT_SHOWN)


# --------------------------------------------------------------------------- the lint


def _exporter_copy() -> dict[str, Any]:
    return copy.deepcopy(load("dynamo-local-exporter"))


def _first_panel(data: dict[str, Any]) -> dict[str, Any]:
    panel: dict[str, Any] = next(p for p in data["panels"] if p["type"] != "row")
    return panel


@pytest.mark.parametrize(
    ("expr", "problem"),
    [
        (
            "rate(dynamo_local_exporter_snapshots_total[5m])",
            "rate() over [5m]: use $__rate_interval",
        ),
        (
            "increase(dynamo_local_exporter_snapshots_total[1h])",
            "increase() over [1h]: use $__range or $__rate_interval",
        ),
        (
            "dynamo_local_exporter_snapshots",
            "dynamo_local_exporter_snapshots is not in the catalog (exporter/catalog.py)",
        ),
        (
            'dynamo_local_exporter_source_up{source="redis"}',
            "dynamo_local_exporter_source_up: source='redis' is not one of "
            "processes, nvml, discovery, prefill_queue, resources, planner, autoscaler",
        ),
        (
            'dynamo_local_gpu_power_watts{dynamo_component="x"}',
            "dynamo_local_gpu_power_watts has no label 'dynamo_component'",
        ),
        (
            'dynamo_local_gpu_power_watts{gpu=~"$gpu"}',
            "$gpu is not a variable of the dashboard",
        ),
        (
            "sum by (replica) (dynamo_local_gpu_power_watts)",
            "grouping label 'replica' belongs to no metric the query reads",
        ),
        (
            "gpu:dynamo_local_gpu_power_watts:avg",
            "gpu:dynamo_local_gpu_power_watts:avg looks like a recording rule "
            "but no rule records it",
        ),
        (
            "process_cpu_seconds_total",
            "process_cpu_seconds_total is neither in the catalog nor a known Dynamo series",
        ),
    ],
)
def test_lint_names_a_bad_expression(expr: str, problem: str) -> None:
    data = _exporter_copy()
    panel = _first_panel(data)
    panel["targets"][0]["expr"] = expr
    assert lint(data, recorded_names()) == [
        f"dynamo-local-exporter: panel 'Target up' target A: {problem}"
    ]


def test_lint_wants_variables_in_regex_matchers() -> None:
    data = copy.deepcopy(load("dynamo-local-component"))
    panel = _first_panel(data)
    panel["targets"][0]["expr"] = (
        'sum(dynamo_local_component_replicas_desired{dynamo_component="$component"})'
    )
    assert lint(data, recorded_names()) == [
        "dynamo-local-component: panel 'Desired' target A: "
        "variable in dynamo_component=: use =~ (multi-value selections)"
    ]


def test_lint_names_panel_and_dashboard_problems() -> None:
    data = _exporter_copy()
    panel = _first_panel(data)
    del panel["description"]
    panel["fieldConfig"]["defaults"].pop("unit")
    panel["datasource"] = {"type": "prometheus", "uid": "prometheus"}
    panel["targets"].append(dict(panel["targets"][0]))
    data["panels"][2]["id"] = panel["id"]
    data["uid"] = "Exporter"
    data["templating"]["list"] = []
    assert lint(data) == [
        "uid 'Exporter': want dynamo-local-<name>, at most 40 characters",
        "Exporter: no prometheus datasource variable $datasource",
        "Exporter: panel 'Target up': no description",
        "Exporter: panel 'Target up': no unit",
        "Exporter: panel 'Target up': datasource is not ${datasource}",
        "Exporter: panel 'Target up': refIds ['A', 'A'] missing or repeated",
        "Exporter: panel 'Snapshot age': id 2 missing or not unique",
    ]


# --------------------------------------------------------------------------- PromQL helpers


def test_metric_comes_from_the_catalog() -> None:
    assert metric("gpu_power_watts") == "dynamo_local_gpu_power_watts"
    assert metric("dynamo_local_gpu_power_watts") == "dynamo_local_gpu_power_watts"
    with pytest.raises(KeyError, match="'dynamo_local_gpu_fan_speed' is not in the catalog"):
        metric("gpu_fan_speed")


def test_selectors_read_names_matchers_and_grouping() -> None:
    expr = (
        "sum by (dynamo_namespace, dynamo_component) (increase("
        'dynamo_local_scale_operations_total{outcome=~"failed|timeout"}[15m])) > 0 '
        'or label_replace(up{job="dynamo-local"}, "x", "$1", "instance", "(.*)") '
        "unless dynamo_local_gpu_info offset 15m * on (gpu) group_left (index) gpu:x:ratio"
    )
    assert [(s.name, [(m.label, m.op, m.value) for m in s.matchers]) for s in selectors(expr)] == [
        ("dynamo_local_scale_operations_total", [("outcome", "=~", "failed|timeout")]),
        ("up", [("job", "=", "dynamo-local")]),
        ("dynamo_local_gpu_info", []),
        ("gpu:x:ratio", []),
    ]
    assert grouping_labels(expr) == {"dynamo_namespace", "dynamo_component", "gpu", "index"}


def test_check_expr_accepts_histogram_buckets_and_known_series() -> None:
    assert (
        check_expr(
            "histogram_quantile(0.9, sum by (le) "
            "(rate(dynamo_local_scale_duration_seconds_bucket[$__rate_interval])))"
        )
        == []
    )
    assert check_expr(f'up{{job="{JOB}"}} == 0') == []
    assert check_expr("dynamo_frontend_requests_total") == []
    assert check_expr("dynamo_frontend_time_to_first_token_seconds") == [
        "dynamo_frontend_time_to_first_token_seconds is neither in the catalog "
        "nor a known Dynamo series"
    ]


# --------------------------------------------------------------------------- provisioning


def test_datasources_provision_prometheus_jaeger_and_alertmanager() -> None:
    data = yaml.safe_load((PROVISIONING / "datasources" / "datasources.yaml").read_text())
    sources = {d["uid"]: d for d in data["datasources"]}
    assert {uid: (d["type"], d["url"]) for uid, d in sources.items()} == {
        "prometheus": ("prometheus", "http://prometheus:9090"),
        "jaeger": ("jaeger", "http://jaeger:16686"),
        "alertmanager": ("alertmanager", "http://alertmanager:9093"),
    }
    assert sources["prometheus"]["isDefault"] is True
    assert sources["prometheus"]["jsonData"]["exemplarTraceIdDestinations"] == [
        {"name": "trace_id", "datasourceUid": "jaeger"}
    ]
    # $__rate_interval is computed from this; it must be the real scrape interval.
    prometheus = yaml.safe_load((REPO / "deploy" / "prometheus" / "prometheus.yml").read_text())
    assert (
        sources["prometheus"]["jsonData"]["timeInterval"]
        == (prometheus["global"]["scrape_interval"])
    )


def test_dashboard_provider_reads_the_folder_compose_mounts() -> None:
    data = yaml.safe_load((PROVISIONING / "dashboards" / "dynamo-local.yaml").read_text())
    [provider] = data["providers"]
    assert provider["type"] == "file"
    assert provider["allowUiUpdates"] is False
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    mounts = dict(
        (v.split(":")[1], v.split(":")[0]) for v in compose["services"]["grafana"]["volumes"]
    )
    assert mounts[provider["options"]["path"]] == "./dashboards/json"
    assert mounts["/etc/grafana/provisioning"] == "./dashboards/provisioning"


# --------------------------------------------------------------------------- real Prometheus


@pytest.mark.integration
async def test_every_dashboard_expression_parses_on_a_real_prometheus(
    prometheus_server: PrometheusFactory,
) -> None:
    """What Grafana would send (variables substituted) is valid PromQL for Prometheus
    itself; whether each returns data is tests/test_prometheus_proof.py's business."""
    prom = prometheus_server([])
    errors = []
    count = 0
    for data in all_dashboards():
        for q in queries(data):
            expr = substitute(q.expr, rate_interval="4s", range_="1h")
            count += 1
            try:
                await prom.query(expr)
            except AssertionError as exc:
                errors.append(f"{q.dashboard}: {q.where}: {exc}")
    assert errors == []
    assert count > 90


def test_substitute_replaces_grafana_variables() -> None:
    expr = 'sum(increase(x{a=~"$namespace", b=~"${component}"}[$__rate_interval])) + y[$__range]'
    assert substitute(expr, rate_interval="4s", range_="1m") == (
        'sum(increase(x{a=~".*", b=~".*"}[4s])) + y[1m]'
    )
    with pytest.raises(ValueError, match=r"\$__range_ms: no value"):
        substitute("x[$__range_ms]", rate_interval="4s", range_="1m")
