"""Alert and recording rules: promtool check and unit tests, a firing and a quiet test for
every alert, catalog names in rules and tests, annotations and runbook sections."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.promql import check_expr, selectors
from dashboards.rules import RULE_TESTS_DIR, RULES_FILE, Rule, load_rules, recorded_names
from tests.servers import PrometheusFactory

REPO = Path(__file__).resolve().parent.parent
RUNBOOK = REPO / "docs" / "alerts.md"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool (Debian prometheus) missing")

# The issue's list, each item with the alert(s) that cover it.
REQUIRED = {
    "exporter down": ["DynamoLocalExporterDown"],
    "exporter stale": ["DynamoLocalExporterStale", "DynamoLocalExporterSourceDown"],
    "replicas below desired for N minutes": [
        "DynamoLocalReplicasBelowDesired",
        "DynamoLocalComponentDown",
    ],
    "crash loop": ["DynamoLocalCrashLoop"],
    "restart spike": ["DynamoLocalRestartSpike"],
    # resources.limits.memory is enforced by a kill: warn before a replica reaches it.
    "replica near its memory limit": ["DynamoLocalReplicaNearMemoryLimit"],
    "GPU memory near full": ["DynamoLocalGPUMemoryNearFull"],
    "GPU hot or throttling": ["DynamoLocalGPUHot", "DynamoLocalGPUThrottling"],
    "prefill queue backlog": ["DynamoLocalPrefillQueueBacklog"],
    "scaling flapping": ["DynamoLocalScalingFlapping"],
    "Planner decision not acknowledged": ["DynamoLocalPlannerDecisionNotAcknowledged"],
    "stale discovery entries": ["DynamoLocalDiscoveryStaleEntries"],
    "failed scale operations": ["DynamoLocalScaleOperationsFailing"],
    "refused allocations": ["DynamoLocalAllocationRefused"],
    # Resources held after a stop (the resources issue: leaked GPUs, processes outliving it).
    "leaked GPU": ["DynamoLocalGPULeaked"],
    "replica processes outliving their stop": ["DynamoLocalReplicaOutlivedStop"],
}
SEVERITIES = {"critical", "warning"}
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def alerts() -> list[Rule]:
    return [r for r in load_rules() if r.is_alert]


def rule_tests() -> dict[str, Any]:
    """File name -> parsed promtool unit-test file."""
    return {p.name: yaml.safe_load(p.read_text()) for p in sorted(RULE_TESTS_DIR.glob("*.yaml"))}


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], cwd=REPO, capture_output=True, text=True, timeout=120)


def github_anchor(heading: str) -> str:
    """The anchor GitHub gives a Markdown heading."""
    slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return slug.replace(" ", "-")


# --------------------------------------------------------------------------- promtool


@needs_promtool
def test_promtool_check_rules_is_clean() -> None:
    result = run_promtool("check", "rules", str(RULES_FILE.relative_to(REPO)))
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout == (
        f"Checking {RULES_FILE.relative_to(REPO)}\n  SUCCESS: {len(load_rules())} rules found\n\n"
    )
    assert result.stderr == ""


@needs_promtool
def test_promtool_unit_tests_pass() -> None:
    files = [str(p.relative_to(REPO)) for p in sorted(RULE_TESTS_DIR.glob("*.yaml"))]
    assert len(files) == 4
    result = run_promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("SUCCESS") == len(files)


@needs_promtool
def test_promtool_unit_tests_fail_when_a_rule_changes(tmp_path: Path) -> None:
    # The unit tests pin behaviour: a rule with another threshold fails them.
    rules = tmp_path / "dynamo-local.rules.yaml"
    rules.write_text(RULES_FILE.read_text().replace("> 85", "> 95"))
    tests = tmp_path / "tests"
    tests.mkdir()
    shutil.copy(RULE_TESTS_DIR / "gpus.test.yaml", tests / "gpus.test.yaml")
    result = subprocess.run(
        [str(PROMTOOL), "test", "rules", "tests/gpus.test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "alertname: DynamoLocalGPUHot, time: 6m" in result.stdout + result.stderr


@pytest.mark.integration
async def test_a_real_prometheus_loads_the_rules(prometheus_server: PrometheusFactory) -> None:
    prom = prometheus_server([], rule_files=[RULES_FILE])
    data = await prom._api("/api/v1/rules")
    loaded = [(g["name"], r["name"]) for g in data["groups"] for r in g["rules"]]
    assert sorted(loaded) == sorted((r.group, r.name) for r in load_rules())
    assert all(r["health"] != "err" for g in data["groups"] for r in g["rules"])


# --------------------------------------------------------------------------- coverage


def test_the_issue_list_is_covered() -> None:
    names = [r.name for r in alerts()]
    assert len(names) == len(set(names))
    assert sorted(names) == sorted(a for group in REQUIRED.values() for a in group)


def test_every_alert_has_a_firing_and_a_quiet_unit_test() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for name, data in rule_tests().items():
        assert data["rule_files"] == ["../dynamo-local.rules.yaml"], name
        for test in data["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {r.name for r in alerts()}
    assert firing == names
    assert quiet == names


def test_unit_test_series_use_catalog_names_and_labels() -> None:
    recorded = recorded_names()
    for name, data in rule_tests().items():
        for test in data["tests"]:
            for series in test.get("input_series", []):
                assert check_expr(series["series"], recorded) == [], (name, series["series"])


# --------------------------------------------------------------------------- contents


@pytest.mark.parametrize("rule", load_rules(), ids=lambda r: r.name)
def test_rule_expression_uses_catalog_names(rule: Rule) -> None:
    assert check_expr(rule.expr, recorded_names()) == []


def test_recording_rules_follow_the_naming_convention() -> None:
    records = [r.name for r in load_rules() if not r.is_alert]
    assert records == [
        "gpu:dynamo_local_gpu_memory_used_bytes:ratio",
        "dynamo_namespace:dynamo_local_prefill_queue_pending_messages:per_ready_prefill_replica",
    ]
    for name in records:
        assert RECORD_NAME.match(name), name  # level:metric:operation, never a bare metric


@pytest.mark.parametrize("rule", alerts(), ids=lambda r: r.name)
def test_alert_has_severity_summary_description_and_runbook(rule: Rule) -> None:
    assert rule.name.startswith("DynamoLocal")
    assert rule.labels == {"severity": rule.labels["severity"]}
    assert rule.labels["severity"] in SEVERITIES
    assert set(rule.annotations) == {"summary", "description", "runbook_url"}
    assert rule.annotations["summary"].strip()
    assert rule.annotations["description"].strip().endswith(".")
    assert rule.annotations["runbook_url"] == f"docs/alerts.md#{rule.name.lower()}"


def test_every_runbook_link_resolves_to_one_section_and_every_section_to_an_alert() -> None:
    headings = [
        line.removeprefix("## ")
        for line in RUNBOOK.read_text().splitlines()
        if line.startswith("## ")
    ]
    anchors = [github_anchor(h) for h in headings]
    assert len(anchors) == len(set(anchors))
    links = [r.annotations["runbook_url"].partition("#")[2] for r in alerts()]
    assert sorted(links) == sorted(anchors)
    # Sections in the order of the rules file, so the runbook reads like the rules.
    assert headings == [r.name for r in alerts()]


def test_runbook_names_each_alerts_severity_and_condition() -> None:
    text = RUNBOOK.read_text()
    sections = dict((part.split("\n", 1)[0].strip(), part) for part in text.split("\n## ")[1:])
    for rule in alerts():
        body = " ".join(sections[rule.name].split())
        assert f"Severity {rule.labels['severity']}." in body, rule.name
        assert "**Fires when**" in body and "**Diagnose**" in body and "**Fix**" in body


def test_crash_loop_alert_reads_the_component_state() -> None:
    # dynamo_local_component_replicas_crashloop stays 0 (the core marks crash-looping
    # replicas "exited"); the component state is what changes.
    [rule] = [r for r in alerts() if r.name == "DynamoLocalCrashLoop"]
    assert [s.name for s in selectors(rule.expr)] == ["dynamo_local_component_state"]
    assert rule.expr.strip() == 'dynamo_local_component_state{state="crashloop"} == 1'
    assert rule.for_ == "1m"
