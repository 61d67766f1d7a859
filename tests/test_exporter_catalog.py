"""The metric catalog follows the naming rules, and docs/metrics.md is generated from it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from exporter.catalog import CATALOG, OTEL_ATTRIBUTES, PREFIX, Kind, spec
from exporter.catalog_docs import render_markdown

ROOT = Path(__file__).resolve().parent.parent
BASE_UNITS = {"seconds", "bytes", "ratio", "celsius", "watts", "joules", "cores", ""}
KNOWN_LABELS = set(OTEL_ATTRIBUTES)


@pytest.mark.parametrize("s", CATALOG, ids=lambda s: s.name)
def test_names_units_and_labels_follow_the_rules(s: object) -> None:
    from exporter.catalog import MetricSpec

    assert isinstance(s, MetricSpec)
    assert re.fullmatch(r"dynamo_local_[a-z0-9_]+", s.name)
    assert s.unit in BASE_UNITS
    stem = s.name
    if s.kind is Kind.COUNTER:
        assert stem.endswith("_total")
        stem = stem.removesuffix("_total")
    else:
        assert not stem.endswith("_total")
    if s.kind is Kind.INFO:
        assert stem.endswith("_info") and s.unit == ""
    if s.unit:
        assert stem.endswith("_" + s.unit), "the unit is the last word before _total"
    for word in ("milliseconds", "_ms", "percent", "kilobytes", "celcius"):
        assert word not in s.name
    assert set(s.labels) <= KNOWN_LABELS
    assert len(set(s.labels)) == len(s.labels)
    if "pid" in s.labels or "command" in s.labels:
        assert s.kind is Kind.INFO, "process identity only in an _info metric"
    assert s.help.endswith(".") and len(s.help) > 20


def test_names_and_otel_names_are_unique() -> None:
    assert len({s.name for s in CATALOG}) == len(CATALOG)
    assert len({s.otel_name for s in CATALOG}) == len(CATALOG)


def test_spec_lookup_names_the_missing_metric() -> None:
    assert spec("gpu_power_watts").name == PREFIX + "gpu_power_watts"
    with pytest.raises(KeyError, match="'dynamo_local_gpu_fan_ratio' is not in the catalog"):
        spec("gpu_fan_ratio")


def test_docs_metrics_md_is_up_to_date() -> None:
    committed = (ROOT / "docs" / "metrics.md").read_text(encoding="utf-8")
    assert committed == render_markdown(), (
        "docs/metrics.md is stale: run "
        "`python -m exporter.catalog_docs --markdown > docs/metrics.md`"
    )


def test_markdown_command_prints_the_docs_without_warnings() -> None:
    out = subprocess.run(
        [sys.executable, "-W", "error", "-m", "exporter.catalog_docs", "--markdown"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stderr == ""
    assert out.stdout == render_markdown()
    for s in CATALOG:
        assert f"| `{s.name}` |" in out.stdout
