"""The Prometheus rules in ``alerts/dynamo-local.rules.yaml``, read as data.

Dashboards may query the recorded series these rules define; the generator, the lint and
the tests read the rules through here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
RULES_FILE = REPO / "alerts" / "dynamo-local.rules.yaml"
RULE_TESTS_DIR = REPO / "alerts" / "tests"


@dataclass(frozen=True)
class Rule:
    """One alerting or recording rule; ``name`` is the alert name or the recorded series."""

    group: str
    name: str
    is_alert: bool
    expr: str
    for_: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)


def load_rules(path: Path = RULES_FILE) -> list[Rule]:
    data: Any = yaml.safe_load(path.read_text())
    rules: list[Rule] = []
    for group in data["groups"]:
        for raw in group["rules"]:
            is_alert = "alert" in raw
            rules.append(
                Rule(
                    group=str(group["name"]),
                    name=str(raw["alert"] if is_alert else raw["record"]),
                    is_alert=is_alert,
                    expr=str(raw["expr"]),
                    for_=str(raw["for"]) if "for" in raw else None,
                    labels={str(k): str(v) for k, v in (raw.get("labels") or {}).items()},
                    annotations={str(k): str(v) for k, v in (raw.get("annotations") or {}).items()},
                )
            )
    return rules


def recorded_names(rules: list[Rule] | None = None) -> frozenset[str]:
    """Series the recording rules define."""
    return frozenset(
        r.name for r in (rules if rules is not None else load_rules()) if not r.is_alert
    )


__all__ = ["RULES_FILE", "RULE_TESTS_DIR", "Rule", "load_rules", "recorded_names"]
