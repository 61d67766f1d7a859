"""One vocabulary (``connector.vocabulary``): every phase the connector assigns, every event
kind, outcome and scale source it emits is a word of it, and the exporter's catalog knows
every word, so nothing the connector says is filed under ``other``."""

from __future__ import annotations

import ast
import time
from pathlib import Path
from typing import get_args

import pytest

from connector import vocabulary
from connector.events import Event
from connector.reconcile import state
from connector.vocabulary import ComponentStatus, EventKind, Outcome, Phase, Source
from exporter import catalog
from exporter.scaling import ScalingMetrics

ROOT = Path(__file__).resolve().parent.parent


def _connector_trees() -> list[tuple[str, ast.Module]]:
    return [
        (p.relative_to(ROOT).as_posix(), ast.parse(p.read_text(encoding="utf-8")))
        for p in sorted((ROOT / "connector").rglob("*.py"))
        if "mockworker" not in p.parts
    ]


def _literal(node: ast.AST | None) -> str | None:
    return node.value if isinstance(node, ast.Constant) and isinstance(node.value, str) else None


def _emitted() -> dict[str, set[tuple[str, str]]]:
    """Literal kinds, outcomes and sources in ``*.emit(...)`` calls, and literal phases
    assigned to ``*.phase``, with where they are."""
    found: dict[str, set[tuple[str, str]]] = {
        "kind": set(),
        "outcome": set(),
        "source": set(),
        "phase": set(),
    }
    for rel, tree in _connector_trees():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                if node.func.attr != "emit":
                    continue
                if node.args and (kind := _literal(node.args[0])) is not None:
                    found["kind"].add((kind, f"{rel}:{node.lineno}"))
                for kw in node.keywords:
                    if kw.arg in ("outcome", "source") and (word := _literal(kw.value)):
                        found[kw.arg].add((word, f"{rel}:{node.lineno}"))
            elif isinstance(node, ast.Assign):
                word = _literal(node.value)
                for target in node.targets:
                    phase = isinstance(target, ast.Attribute) and target.attr == "phase"
                    if phase and word is not None:
                        found["phase"].add((word, f"{rel}:{node.lineno}"))
    return found


@pytest.mark.parametrize(
    ("what", "words"),
    [("kind", EventKind), ("outcome", Outcome), ("source", Source), ("phase", Phase)],
)
def test_every_word_the_connector_uses_is_in_the_vocabulary(
    what: str, words: type[vocabulary.StrEnum]
) -> None:
    used = _emitted()[what]
    assert used, f"found no literal {what} at all: the scan is broken"
    unknown = sorted(f"{word!r} at {where}" for word, where in used if word not in set(words))
    assert unknown == []


def test_the_persisted_phase_type_is_the_vocabularys() -> None:
    assert set(get_args(state.Phase)) == set(vocabulary.values(Phase))


def test_the_catalog_knows_every_word() -> None:
    assert set(vocabulary.values(EventKind)) <= set(catalog.EVENT_KINDS)
    assert set(vocabulary.values(Outcome)) <= set(catalog.SCALE_OUTCOMES)
    assert set(vocabulary.values(Source)) <= set(catalog.SCALE_SOURCES)
    assert set(vocabulary.values(ComponentStatus)) == set(catalog.COMPONENT_STATES)
    assert set(vocabulary.REPLICA_STATES) == set(catalog.REPLICA_STATES)


@pytest.mark.parametrize("kind", ["adopt", "supervisor", "drain", "discovery"])
def test_kinds_once_missing_from_the_catalog_are_counted_as_themselves(kind: str) -> None:
    """A circusd restart (``supervisor``) used to be counted as ``kind="other"``."""
    metrics = ScalingMetrics(lambda component: "ns")
    metrics.observe(Event(seq=1, time=time.time(), kind=kind))
    families = {f.name: f for f in metrics.collect()}
    events = families["dynamo_local_events"]
    assert [(s.labels["kind"], s.value) for s in events.samples if s.name.endswith("_total")] == [
        (kind, 1.0)
    ]
