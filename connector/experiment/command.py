"""``dynamo-local experiment PLAN.yaml [--out DIR] [--aiperf PATH] [--prometheus URL]``:
the command's body (the parser lives in :mod:`connector.cli.program`). A progress bar on stderr
while it runs, the run folder and the headline figures on stdout at the end.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console

from connector.client import Client

if TYPE_CHECKING:  # the CLI builds its parser with add_arguments: nothing heavy at import
    from connector.experiment.runner import PhaseTracker
    from connector.experiment.timeline import Sample

EXIT_OK = 0
EXIT_ERROR = 1

HEADLINES = (
    ("time_to_scale_up_s", "time to first new ready replica", "s"),
    ("time_to_scale_down_s", "time to scale back down", "s"),
    ("seconds_over_slo", "seconds over the SLO", "s"),
    ("replica_seconds", "replica-seconds", ""),
    ("requests_total", "requests sent", ""),
    ("requests_failed", "requests failed", ""),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("plan", metavar="PLAN.yaml", help="the experiment plan")
    parser.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help="run folder (default: experiments/<plan name>-<date>-<time>)",
    )
    parser.add_argument(
        "--aiperf",
        default=None,
        metavar="PATH",
        help="the aiperf executable (default: $AIPERF, else .venv-aiperf/bin/aiperf)",
    )
    parser.add_argument(
        "--remote",
        action="store_true",
        help="run it inside the server (POST /v1/experiments) and follow it; the run folder "
        "is then under the server's working dir (--out and --aiperf do not apply)",
    )
    parser.add_argument(
        "--prometheus",
        default=None,
        metavar="URL",
        help="read the frontend's metrics from this Prometheus (overrides the plan's)",
    )


def _status(sample: Sample) -> str:
    def count(n: int | None) -> str:
        return "?" if n is None else str(n)

    replicas = " ".join(
        f"{name} {count(c.ready)}/{count(c.desired)}" for name, c in sample.components.items()
    )
    parts = [replicas]
    if sample.request_rate is not None:
        parts.append(f"{sample.request_rate:.1f} req/s")
    if sample.ttft_p99_s is not None:
        parts.append(f"TTFT p99 {sample.ttft_p99_s:.3f} s")
    return " · ".join(parts)


def _headline(summary: dict[str, Any]) -> list[str]:
    lines = []
    for key, label, unit in HEADLINES:
        value = summary.get(key)
        shown = "—" if value is None else f"{value:g}{' ' + unit if unit else ''}"
        lines.append(f"  {label:<34} {shown}")
    return lines


def _remote_document(args: argparse.Namespace) -> dict[str, Any]:
    """The plan file's document as the server gets it: checked here first (errors name this
    file), the tokenizer folder made absolute (the server resolves relative paths against
    its own directory, not this file's)."""
    from connector.experiment.plan import PlanError, decode_yaml, parse_plan

    path = Path(args.plan)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"{args.plan}: cannot read: {exc}") from None
    document = decode_yaml(text, args.plan)
    plan = parse_plan(document, origin=args.plan, base_dir=path.resolve().parent)
    assert isinstance(document, dict)  # parse_plan refused anything else
    document = {**document, "tokenizer": plan.tokenizer}
    if args.prometheus:
        document["prometheus"] = args.prometheus.rstrip("/")
    return document


async def run_remote(api: Client, args: argparse.Namespace, out: Console, err: Console) -> int:
    """``--remote``: the server runs the experiment; this follows it (``GET`` every second)
    and cancels it (``DELETE``) on Ctrl-C."""
    import asyncio

    from connector.client import ApiError
    from connector.experiment.plan import PlanError

    try:
        document = _remote_document(args)
    except PlanError as exc:
        err.print(f"dynamo-local: error: {exc}", markup=False)
        return EXIT_ERROR
    try:
        run = await api.start_experiment(document)
    except ApiError as exc:
        err.print(f"dynamo-local: error: {exc.message}", markup=False)
        return EXIT_ERROR
    err.print(
        f"dynamo-local: experiment {run['id']} runs on the server; run folder {run['folder']}",
        markup=False,
    )
    last = None
    try:
        while run["state"] == "running":
            said = run["phase"]
            if said != last and not err.is_terminal:
                err.print(f"dynamo-local: {run['id']}: {said}", markup=False)
            last = said
            await asyncio.sleep(1.0)
            run = await api.experiment(run["id"])
    except (KeyboardInterrupt, asyncio.CancelledError):
        err.print(f"dynamo-local: cancelling {run['id']}", markup=False)
        run = await api.cancel_experiment(run["id"])
    out.print(f"run folder: {run['folder']} ({run['state']})", markup=False)
    for line in _headline(run.get("summary") or {}):
        out.print(line, markup=False)
    if run.get("report"):
        out.print(f"report: {api.url}{run['report']}", markup=False)
    if run.get("error"):
        err.print(f"dynamo-local: error: {run['error']}", markup=False)
    return EXIT_OK if run["state"] == "succeeded" else EXIT_ERROR


async def run_command(api: Client, args: argparse.Namespace, out: Console, err: Console) -> int:
    if getattr(args, "remote", False):
        return await run_remote(api, args, out, err)
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from connector.experiment.aiperf import AiperfMissing, find_aiperf
    from connector.experiment.plan import PlanError, Prometheus, load_plan
    from connector.experiment.runner import ExperimentError, run_experiment

    try:
        plan = load_plan(Path(args.plan), display=args.plan)
        if args.prometheus:
            plan = dataclasses.replace(plan, prometheus=Prometheus(args.prometheus.rstrip("/")))
        executable = find_aiperf(args.aiperf)
    except (PlanError, AiperfMissing) as exc:
        err.print(f"dynamo-local: error: {exc}", markup=False)
        return EXIT_ERROR
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = Path(args.out) if args.out else Path("experiments") / f"{plan.name}-{stamp}"
    total = plan.load_seconds + plan.cooldown_s
    err.print(
        f"dynamo-local: experiment {plan.name!r}: {len(plan.phases)} phase(s), "
        f"{plan.load_seconds:g} s of load + {plan.cooldown_s:g} s cool-down; run folder {folder}",
        markup=False,
    )
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        TextColumn("{task.completed:>4.0f}/{task.total:.0f} s"),
        TimeElapsedColumn(),
        TextColumn("{task.fields[status]}"),
        console=err,
        disable=not err.is_terminal,  # a log gets the phase lines instead
    )
    task = progress.add_task("connecting", total=total, status="")

    def on_sample(sample: Sample, tracker: PhaseTracker) -> None:
        done, label = tracker.progress(sample.time)
        progress.update(task, completed=done, description=label, status=_status(sample))

    def on_phase(name: str, what: str) -> None:
        if not err.is_terminal:
            err.print(f"dynamo-local: phase {name} {what}", markup=False)

    try:
        with progress:
            outcome = await run_experiment(
                plan, api, folder, executable=executable, on_sample=on_sample, on_phase=on_phase
            )
    except ExperimentError as exc:
        err.print(f"dynamo-local: error: {exc}", markup=False)
        return EXIT_ERROR
    out.print(f"run folder: {outcome.folder}", markup=False)
    for line in _headline(outcome.summary):
        out.print(line, markup=False)
    out.print(f"report: {outcome.folder / 'report.html'}", markup=False)
    for problem in outcome.errors:
        err.print(f"dynamo-local: error: {problem}", markup=False)
    return EXIT_ERROR if outcome.errors else EXIT_OK
