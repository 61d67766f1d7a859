"""Driving the load with aiperf (NVIDIA's load generator, the one Dynamo's own Planner tests
use), as a subprocess.

aiperf lives in a virtualenv of its own (``.venv-aiperf``, made by ``scripts/setup.sh``):
it requires ``huggingface-hub<2`` and the Dynamo set pins 2.x, so the two cannot share one.
It is found at ``--aiperf PATH``, else ``$AIPERF``, else ``.venv-aiperf/bin/aiperf`` next to
the virtualenv running dynamo-local, else on ``PATH``.

aiperf 0.13 runs several load phases back to back in one process (its YAML config's
``benchmark.phases``, each phase after the first ``seamless``), so a plan's phases follow
each other without the ~20 s aiperf needs to start. Its synthetic dataset is one per run,
though: consecutive phases with the same ``inputTokens`` / ``outputTokens`` share one run
(a *segment*); where the lengths change, a new aiperf process starts, and the timeline shows
its start-up as a gap in the load.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import sys
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from connector.experiment.plan import Phase, Plan, Tokens

AIPERF_ENV = "AIPERF"
VENV_NAME = ".venv-aiperf"
# aiperf 0.13 with HF_HUB_OFFLINE=1 takes a local tokenizer folder for a hub id and fails;
# the folder is read locally without them. PYTHONPATH/PYTHONHOME would mix our virtualenv's
# packages into aiperf's.
_DROPPED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH", "PYTHONHOME")
DATASET_ENTRIES = 100
# aiperf's start-up (services, tokenizer, dataset) and shutdown, beyond the phases: the
# ceiling of one segment's run is its phases + grace + this.
STARTUP_ALLOWANCE_S = 180.0
STOP_GRACE_S = 10.0
# "22:09:42.294 NOTICE   Phase burst (profiling) started | phase_index=0 ..."
_PHASE_LINE = re.compile(r"\bPhase (\S+) \(profiling\) (started|sending complete|complete)\b")


class AiperfMissing(RuntimeError):
    """No aiperf executable where it was looked for."""


class AiperfFailed(RuntimeError):
    """aiperf exited with an error or ran past its ceiling."""


def find_aiperf(explicit: str | None = None, env: Mapping[str, str] | None = None) -> Path:
    """The aiperf executable: ``explicit`` (``--aiperf``), ``$AIPERF``, the sibling
    virtualenv ``.venv-aiperf``, then ``PATH``."""
    env = os.environ if env is None else env
    tried: list[str] = []
    for given, label in ((explicit, "--aiperf"), (env.get(AIPERF_ENV), f"${AIPERF_ENV}")):
        if given:
            path = Path(given).expanduser().absolute()  # aiperf runs in the run folder
            if path.is_file() and os.access(path, os.X_OK):
                return path
            raise AiperfMissing(f"{label} names {given}, which is not an executable file")
    sibling = Path(sys.prefix).parent / VENV_NAME / "bin" / "aiperf"
    tried.append(str(sibling))
    if sibling.is_file() and os.access(sibling, os.X_OK):
        return sibling
    on_path = shutil.which("aiperf")
    if on_path:
        return Path(on_path)
    tried.append("PATH")
    raise AiperfMissing(
        "aiperf is not installed (looked at " + ", ".join(tried) + "): scripts/setup.sh "
        f"installs it into {VENV_NAME}; or point --aiperf or ${AIPERF_ENV} at one"
    )


@dataclass(frozen=True)
class Segment:
    """Consecutive phases that share their token lengths: one aiperf run."""

    index: int
    phases: tuple[Phase, ...]

    @property
    def name(self) -> str:
        return f"segment{self.index + 1}"

    @property
    def load_seconds(self) -> float:
        return sum(p.duration_s for p in self.phases)


def segments(plan: Plan) -> list[Segment]:
    groups: list[list[Phase]] = []
    for phase in plan.phases:
        if groups and _lengths(groups[-1][-1]) == _lengths(phase):
            groups[-1].append(phase)
        else:
            groups.append([phase])
    return [Segment(i, tuple(g)) for i, g in enumerate(groups)]


def _lengths(phase: Phase) -> tuple[Tokens, Tokens]:
    return phase.input_tokens, phase.output_tokens


def _distribution(tokens: Tokens) -> dict[str, float | int]:
    out: dict[str, float | int] = {"mean": tokens.mean}
    if tokens.stddev:
        out["stddev"] = tokens.stddev
    return out


def config(
    plan: Plan, segment: Segment, *, url: str, model: str, artifact_dir: Path
) -> dict[str, Any]:
    """aiperf's YAML config (schema 2.0) for one segment."""
    first = segment.phases[0]
    phases: list[dict[str, Any]] = []
    for i, phase in enumerate(segment.phases):
        entry: dict[str, Any] = {
            "name": phase.name,
            "kind": "profiling",
            "duration": phase.duration_s,
            "gracePeriod": plan.grace_period_s,
        }
        if phase.request_rate is not None:
            entry["type"] = phase.arrival
            entry["rate"] = phase.request_rate
            if phase.concurrency is not None:
                entry["concurrency"] = phase.concurrency
        else:
            entry["type"] = "concurrency"
            entry["concurrency"] = phase.concurrency
        if i:
            entry["seamless"] = True  # the load changes at once, as a burst would
        phases.append(entry)
    return {
        "schemaVersion": "2.0",
        "randomSeed": plan.seed,
        "benchmark": {
            "model": model,
            "endpoint": {"url": url, "type": "chat", "streaming": True},
            "tokenizer": {"name": plan.tokenizer},
            "dataset": {
                "type": "synthetic",
                "entries": DATASET_ENTRIES,
                "prompts": {
                    "isl": _distribution(first.input_tokens),
                    "osl": _distribution(first.output_tokens),
                },
            },
            "phases": phases,
            "artifacts": {"dir": str(artifact_dir)},
            # The experiment samples the graph itself; aiperf's DCGM and server scrapers
            # would only add load (and probe ports nothing listens on).
            "gpuTelemetry": {"enabled": False},
            "serverMetrics": {"enabled": False},
        },
    }


def aiperf_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in _DROPPED_ENV:
        env.pop(key, None)
    env.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    # Its log lines are read as they come (a phase's start marks the timeline): unbuffered.
    env["PYTHONUNBUFFERED"] = "1"
    return env


@dataclass(frozen=True)
class PhaseLine:
    phase: str
    what: str  # started | sending complete | complete


def parse_phase_line(line: str) -> PhaseLine | None:
    m = _PHASE_LINE.search(line)
    return PhaseLine(m.group(1), m.group(2)) if m else None


@dataclass
class PhaseResult:
    """aiperf's count of one phase's requests."""

    name: str
    total: int = 0
    succeeded: int = 0
    failed: int = 0


@dataclass
class SegmentResult:
    segment: str
    exit_code: int | None
    artifact_dir: Path
    phases: list[PhaseResult] = field(default_factory=list)
    error: str | None = None


def read_results(artifact_dir: Path, phase_names: Sequence[str]) -> list[PhaseResult]:
    """Per-phase request counts from aiperf's exports: ``phase_manifest.json`` when the run
    had several phases, else the run's ``profile_export_aiperf.json``."""
    manifest = artifact_dir / "phase_manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text(encoding="utf-8"))
        return [
            PhaseResult(
                name=str(p["phase_name"]),
                total=int(p.get("total_request_count") or 0),
                succeeded=int(p.get("successful_request_count") or 0),
                failed=int(p.get("error_request_count") or 0),
            )
            for p in data.get("phases", [])
        ]
    export = artifact_dir / "profile_export_aiperf.json"
    if not export.is_file() or not phase_names:
        return []
    data = json.loads(export.read_text(encoding="utf-8"))
    failed = _avg(data.get("error_request_count"))
    if failed is None:
        failed = sum(int(e.get("count") or 0) for e in data.get("error_summary") or [])
    succeeded = int(_avg(data.get("request_count")) or 0)
    return [PhaseResult(phase_names[0], succeeded + int(failed), succeeded, int(failed))]


def _avg(metric: object) -> float | None:
    if isinstance(metric, Mapping) and isinstance(metric.get("avg"), int | float):
        return float(metric["avg"])
    return None


async def run_segment(
    executable: Path,
    plan: Plan,
    segment: Segment,
    *,
    url: str,
    model: str,
    folder: Path,
    on_phase: Callable[[PhaseLine, float], None],
) -> SegmentResult:
    """Run aiperf for one segment in ``folder`` (its config, log and artifacts), calling
    ``on_phase`` with each phase's start and end as aiperf reports them. Bounded: past its
    phases, grace and :data:`STARTUP_ALLOWANCE_S`, aiperf's process group is stopped."""
    artifact_dir = folder / "artifacts"
    document = config(plan, segment, url=url, model=model, artifact_dir=artifact_dir)
    config_path = folder / "aiperf.yaml"
    await asyncio.to_thread(_write, config_path, yaml.safe_dump(document, sort_keys=False))
    log_path = folder / "aiperf.log"
    log = await asyncio.to_thread(log_path.open, "wb")
    ceiling = segment.load_seconds + plan.grace_period_s + STARTUP_ALLOWANCE_S
    result = SegmentResult(segment.name, None, artifact_dir)
    tail: deque[str] = deque(maxlen=40)
    try:
        try:
            proc = await _start(executable, config_path, folder)
        except OSError as exc:
            result.error = f"cannot start {executable}: {exc.strerror or exc}"
            return result
        try:
            await asyncio.wait_for(_follow(proc, log, on_phase, tail), ceiling)
            result.exit_code = await proc.wait()
        except TimeoutError:
            result.error = f"aiperf ran past {ceiling:g} s and was stopped"
            result.exit_code = await _stop(proc)
        except BaseException:
            await asyncio.shield(_stop(proc))
            raise
    finally:
        await asyncio.to_thread(log.close)
    if result.error is None and result.exit_code != 0:
        why = _last_error(tail)
        result.error = f"aiperf exited with code {result.exit_code}{why}; its log: {log_path}"
    names = [p.name for p in segment.phases]
    try:
        result.phases = await asyncio.to_thread(read_results, artifact_dir, names)
    except (OSError, ValueError, KeyError, TypeError) as exc:
        result.error = result.error or f"aiperf's exports are unreadable: {exc}"
    if result.error is None and not result.phases:
        result.error = (
            f"aiperf exited without results for {', '.join(names)} (nothing in "
            f"{artifact_dir}); its log: {log_path}"
        )
    return result


async def _start(executable: Path, config_path: Path, folder: Path) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        str(executable),
        "profile",
        "--config",
        str(config_path),
        "--ui-type",
        "none",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=aiperf_env(),
        cwd=folder,
        start_new_session=True,  # its services are its children: stopped as a group
    )


async def _follow(
    proc: asyncio.subprocess.Process,
    log: Any,
    on_phase: Callable[[PhaseLine, float], None],
    tail: deque[str],
) -> None:
    assert proc.stdout is not None
    while True:
        raw = await proc.stdout.readline()
        if not raw:
            return
        await asyncio.to_thread(log.write, raw)
        text = raw.decode("utf-8", errors="replace").strip()
        if text:
            tail.append(text)
        line = parse_phase_line(text)
        if line is not None:
            on_phase(line, time.time())


def _last_error(tail: Sequence[str]) -> str:
    """``: <the last line that names an error>`` from aiperf's output, else nothing."""
    for text in reversed(tail):
        if "error" in text.lower() and not set(text) <= set("─│╭╮╰╯ "):
            return ": " + " ".join(text.strip("│ ").split())[:300]
    return ""


async def _stop(proc: asyncio.subprocess.Process) -> int | None:
    """SIGTERM aiperf's process group (it was started in a session of its own: the group id
    is its PID), SIGKILL after :data:`STOP_GRACE_S`."""
    if proc.returncode is not None:
        return proc.returncode
    for sig in (signal.SIGTERM, signal.SIGKILL):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            return await asyncio.wait_for(proc.wait(), STOP_GRACE_S)
        except TimeoutError:
            continue
    return proc.returncode


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
