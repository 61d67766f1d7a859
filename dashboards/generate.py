"""Write the Grafana dashboards as JSON into ``dashboards/json/`` (one file per uid).

    python -m dashboards.generate           # (re)write the files
    python -m dashboards.generate --check   # exit 1 if a committed file differs

The JSON is committed so Grafana's file provisioning (``dashboards/provisioning/``) and the
compose stack use it without Python; ``--check`` (run by the tests) keeps it identical to
what the code generates. Output is deterministic: sorted keys, two-space indent, trailing
newline.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dashboards import component, exporter_health, gpus, overview, scaling
from dashboards.lint import lint
from dashboards.rules import recorded_names

OUTPUT_DIR = Path(__file__).resolve().parent / "json"

# uid -> builder, in the order Grafana lists them.
DASHBOARDS: dict[str, Callable[[], dict[str, Any]]] = {
    overview.UID: overview.build,
    component.UID: component.build,
    gpus.UID: gpus.build,
    scaling.UID: scaling.build,
    exporter_health.UID: exporter_health.build,
}


def encode(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


class DashboardError(ValueError):
    """A dashboard breaks the rules of ``dashboards/lint.py``; the message lists how."""


def rendered() -> dict[str, str]:
    """File name -> JSON text of every dashboard; raises :class:`DashboardError` when one
    fails the lint, so nothing broken is ever written."""
    recorded = recorded_names()
    out: dict[str, str] = {}
    for uid, build in DASHBOARDS.items():
        data = build()
        if data.get("uid") != uid:
            raise DashboardError(f"dashboard {uid}: built with uid {data.get('uid')!r}")
        problems = lint(data, recorded)
        if problems:
            raise DashboardError(f"dashboard {uid} fails the lint:\n  " + "\n  ".join(problems))
        out[f"{uid}.json"] = encode(data)
    return out


def stale_files(output_dir: Path = OUTPUT_DIR) -> list[str]:
    """Names of files that are missing, differ from the generated text, or are left over."""
    expected = rendered()
    problems = [
        name
        for name, text in expected.items()
        if not (output_dir / name).is_file() or (output_dir / name).read_text() != text
    ]
    if output_dir.is_dir():
        problems += sorted(p.name for p in output_dir.glob("*.json") if p.name not in expected)
    return problems


def write(output_dir: Path = OUTPUT_DIR) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    expected = rendered()
    for leftover in output_dir.glob("*.json"):
        if leftover.name not in expected:
            leftover.unlink()
    written: list[Path] = []
    for name, text in expected.items():
        path = output_dir / name
        path.write_text(text)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dashboards.generate", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON is not up to date"
    )
    parser.add_argument("--output", type=Path, default=OUTPUT_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        return _run(args.check, args.output)
    except DashboardError as exc:
        sys.stderr.write(f"{exc}\n")
        return 2


def _run(check: bool, output: Path) -> int:
    if check:
        stale = stale_files(output)
        if stale:
            sys.stderr.write(
                f"dashboards out of date in {output}: {', '.join(stale)}; "
                "run `python -m dashboards.generate` and commit the result\n"
            )
            return 1
        return 0
    for path in write(output):
        sys.stdout.write(f"wrote {path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
