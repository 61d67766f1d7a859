"""API fuzz at scale: schemathesis against a real ``dynamo-local up``, from its own
``/openapi.json``.

A ``python -m connector up`` process (the exporter behind ``/metrics``, ``--token`` on) runs
a small graph of ``sleep`` replicas. Every operation the served document lists gets its share
of the cases (valid and invalid requests, hypothesis-generated; a component name in the path
is mostly a real one, so requests get past the 404), sent with the token; every answer is
validated against the document (status, content type, schema). Meanwhile the connector
process's RSS is sampled every 0.1 s. Afterwards each component is scaled back to the
replicas its graph file asks for, and the counts are read back three ways: the API, state.json
and the live processes.

What it prints: cases (per operation too), answers by status class, 5xx, conformance
failures, the connector's RSS (at start, max, at the end), wall time, and the replica counts
after the restore. Bounds it checks (exit code 1 when one fails): no 5xx, no conformance
failure, RSS <= 200 MB at every sample, every component exactly at its spec.

Operations left out are :data:`EXCLUDED`, each with the reason; every other one in the
document is fuzzed, routes added later included.

    python -m bench.api_fuzz [--cases 5000] [--seed N] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Err

from bench.chaos import UpProcess

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "api-fuzz-token"
NAMESPACE = "fuzz"
MARKER_ENV = "API_FUZZ_RUN_ID"  # every replica carries it: how its processes are found
PORT_RANGE = "28000-29999"  # ports are checked free; this keeps clear of the chaos suite
RSS_LIMIT_BYTES = 200 * 2**20
RSS_INTERVAL_S = 0.1
STARTUP_LIMIT_S = 60.0
DEFAULT_CASES = 5000
# What `up` runs: the graph file's replicas are the spec the fuzz must leave the graph at.
SPEC = {"Frontend": 1, "Prefill": 0, "Decode": 1, "Talker": 1}

# Left out of the fuzz, with the reason. Everything else /openapi.json lists is fuzzed,
# routes added later included: a new route that starts real work belongs here.
EXCLUDED = {
    "POST /v1/shutdown": "stops every replica and the server: the cases after it would "
    "find no server (tests/test_api.py covers it)",
    "POST /v1/experiments": "a valid plan starts aiperf load against the frontend for "
    "minutes; with it left out, the other /v1/experiments routes only ever see ids of no "
    "run (cancel, report: 404)",
}


def excluded_why(method: str, path: str) -> str | None:
    """Why the fuzz leaves ``method path`` out, or None when it fuzzes it."""
    return EXCLUDED.get(f"{method.upper()} {path}")


# One line on each stream, then quiet: logs to read. One write per line (Circus stamps each
# chunk it reads).
TALKER = """\
import sys, time
sys.stdout.write("hello from talker\\n"); sys.stdout.flush()
sys.stderr.write("oops on stderr\\n"); sys.stderr.flush()
time.sleep(3600)
"""


def graph_yaml(run_id: str, talker: Path) -> str:

    def service(name: str, kind: str, sub: str | None, command: str, max_replicas: int) -> str:
        return f"""\
    {name}:
      componentType: {kind}{f"{chr(10)}      subComponentType: {sub}" if sub else ""}
      replicas: {SPEC[name]}
      envs:
        - {{name: {MARKER_ENV}, value: "{run_id}"}}
      extraPodSpec:
        mainContainer:
          command: {command}
      local:
        minReplicas: 0
        maxReplicas: {max_replicas}
        readiness: {{process: {{startupGraceSeconds: 0.2}}, timeoutSeconds: 30}}
        gracefulStopSeconds: 2
        restart: {{backoffBaseSeconds: 0.05, backoffMaxSeconds: 0.25}}
"""

    sleep = '["sleep", "3600"]'
    return (
        "apiVersion: nvidia.com/v1alpha1\n"
        "kind: DynamoGraphDeployment\n"
        "metadata: {name: fuzz}\n"
        "spec:\n"
        "  services:\n"
        + service("Frontend", "frontend", None, sleep, 2)
        + service("Prefill", "worker", "prefill", sleep, 2)
        + service("Decode", "worker", "decode", sleep, 2)
        + service("Talker", "worker", None, f'["{{python}}", "{talker}"]', 1)
    )


# ------------------------------------------------------------------------ up, as a process


def fuzz_up(graph: Path, working_dir: Path) -> UpProcess:
    """``up`` on the fuzz graph, with the token and the exporter (``/metrics`` is fuzzed
    too), started and stopped as the chaos suite's is."""
    flags = [
        *("--namespace", NAMESPACE, "--discovery", "none", "--gpu-backend", "none"),
        *("--port-range", PORT_RANGE, "--token", TOKEN, "--log-level", "warning"),
    ]
    return UpProcess(graph, working_dir, flags, working_dir.parent / "up.log")


# ------------------------------------------------------------------------ RSS


class RssSampler:
    """The RSS of one process every ``interval_s``, in a thread, while it runs."""

    def __init__(self, pid: int, interval_s: float = RSS_INTERVAL_S) -> None:
        self.process = psutil.Process(pid)
        self.interval_s = interval_s
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(psutil.Error):
                self.samples.append(self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


# ------------------------------------------------------------------------ the fuzz


@dataclass
class FuzzReport:
    cases: Counter[str] = field(default_factory=Counter)  # operation label -> cases sent
    seconds: dict[str, float] = field(default_factory=dict)  # operation label -> wall s
    statuses: dict[str, set[int]] = field(default_factory=dict)
    status_classes: Counter[str] = field(default_factory=Counter)  # "2xx" -> answers
    server_errors: list[str] = field(default_factory=list)  # every 5xx, in words
    failures: dict[str, list[str]] = field(default_factory=dict)  # label -> check failures
    excluded: dict[str, str] = field(default_factory=dict)  # label -> why

    @property
    def total(self) -> int:
        return sum(self.cases.values())

    @property
    def failure_count(self) -> int:
        return sum(len(v) for v in self.failures.values())


def fuzz(base_url: str, names: list[str], *, cases: int, seed: int) -> FuzzReport:
    """``cases`` generated requests in all, shared evenly among the operations of the
    document ``base_url`` serves (less those excluded), half valid, half not."""
    with requests.get(base_url + "/openapi.json", timeout=30) as answer:
        answer.raise_for_status()
        document = answer.json()
    schema = schemathesis.openapi.from_dict(document)
    report = FuzzReport()
    operations = []
    for result in schema.get_all_operations():
        if isinstance(result, Err):
            raise result.err()  # the document itself is broken: nothing to fuzz
        operation = result.ok()
        why = excluded_why(operation.method, operation.path)
        if why is not None:
            report.excluded[operation.label] = why
        else:
            operations.append(operation)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with requests.Session() as session:
        # Rounds: each gives every operation that still has inputs to generate an even share
        # of what is left; an operation that ends before its share (its input space is
        # small: no parameters at all, say) sits out the next rounds.
        active = list(operations)
        round_no = 0
        while active and report.total < cases:
            left = cases - report.total
            share = math.ceil(left / len(active))
            still = []
            for operation in active:
                before = report.cases[operation.label]
                t0 = time.monotonic()
                _fuzz_operation(
                    operation,
                    names,
                    report,
                    session,
                    base_url,
                    headers,
                    examples=share,
                    seed=seed + 1000 * round_no + operations.index(operation),
                )
                spent = time.monotonic() - t0
                report.seconds[operation.label] = report.seconds.get(operation.label, 0.0) + spent
                if report.cases[operation.label] - before >= share:
                    still.append(operation)
                if report.total >= cases:
                    break
            active = still
            round_no += 1
    return report


def _fuzz_operation(
    operation: Any,
    names: list[str],
    report: FuzzReport,
    session: requests.Session,
    base_url: str,
    headers: dict[str, str],
    *,
    examples: int,
    seed: int,
) -> None:
    """Up to ``examples`` generated requests to one operation, valid and invalid."""
    strategies = []
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategies.append(operation.as_strategy(mode))
        if any(p.name == "name" for p in operation.path_parameters):
            # Mostly real components, so that requests get past the 404.
            strategies += [operation.as_strategy(mode, path_parameters={"name": n}) for n in names]

    @hypothesis_seed(seed)
    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(case=st.one_of(strategies))
    def check(case: schemathesis.Case[Any]) -> None:
        label = case.operation.label
        response = case.call(base_url=base_url, session=session, headers=headers, timeout=60)
        status = response.status_code
        report.cases[label] += 1
        report.statuses.setdefault(label, set()).add(status)
        report.status_classes[f"{status // 100}xx"] += 1
        if status >= 500:
            report.server_errors.append(
                f"{case.method} {case.formatted_path} -> {status}: {response.text[:300]}"
            )
        try:
            case.validate_response(response, headers=headers)
        except (Exception, BaseExceptionGroup) as exc:  # a failed check is the finding
            report.failures.setdefault(label, []).append(f"{exc}"[:3000])

    check()


# ------------------------------------------------------------------------ back to spec


def restore_spec(base_url: str, spec: dict[str, int]) -> dict[str, dict[str, Any]]:
    """Scale every component back to ``spec`` (waiting until ready) and read back
    ``desired``, ``running`` and ``ready`` per component from the API."""
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with requests.Session() as session:
        for name, replicas in spec.items():
            body = {"replicas": replicas, "wait": True, "timeout_s": 60}
            with session.put(
                f"{base_url}/v1/components/{name}/replicas", json=body, headers=headers, timeout=90
            ) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(
                        f"restoring {name} to {replicas}: {resp.status_code} {resp.text}"
                    )
        out: dict[str, dict[str, Any]] = {}
        for name in spec:
            with session.get(f"{base_url}/v1/components/{name}/replicas", timeout=30) as resp:
                resp.raise_for_status()
                data = resp.json()
            out[name] = {k: data[k] for k in ("desired", "running", "ready")}
    return out


def state_counts(working_dir: Path) -> dict[str, dict[str, int]]:
    """Per component in state.json: its target and its records by phase."""
    state = json.loads((working_dir / "state.json").read_text())
    out: dict[str, dict[str, int]] = {
        name: {"target": comp["target"]} for name, comp in state["components"].items()
    }
    for rec in state["replicas"].values():
        phases = out.setdefault(rec["component"], {"target": 0})
        phases[rec["phase"]] = phases.get(rec["phase"], 0) + 1
    return out


def live_replicas(run_id: str) -> Counter[str]:
    """Live replica processes of this run, by component (process group leaders only: a
    replica's children are not replicas)."""
    found: Counter[str] = Counter()
    for proc in psutil.process_iter(["pid", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            env = proc.environ()
            if env.get(MARKER_ENV) != run_id or os.getpgid(proc.pid) != proc.pid:
                continue
        except (psutil.Error, OSError):
            continue
        found[env.get("DYNAMO_LOCAL_REPLICA", "?/?").split("/", 1)[0]] += 1
    return found


def kill_leftovers(run_id: str) -> list[int]:
    """Safety net: SIGKILL, by PID, any replica process of this run still alive."""
    left = []
    for proc in psutil.process_iter(["pid"]):
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if proc.environ().get(MARKER_ENV) == run_id:
                os.kill(proc.pid, signal.SIGKILL)
                left.append(proc.pid)
    return left


# ------------------------------------------------------------------------ one run


@dataclass
class FuzzRun:
    report: FuzzReport
    rss_samples: list[int]
    fuzz_s: float
    wall_s: float
    restored: dict[str, dict[str, Any]]  # component -> desired/running/ready from the API
    on_disk: dict[str, dict[str, int]]  # component -> target and phases in state.json
    processes: Counter[str]  # component -> live replica processes
    up_exit_code: int | None = None
    left_after_shutdown: list[int] = field(default_factory=list)

    @property
    def rss_max(self) -> int:
        return max(self.rss_samples, default=0)

    def spec_problems(self) -> list[str]:
        out = []
        for name, want in SPEC.items():
            api = self.restored.get(name, {})
            if (api.get("desired"), api.get("running"), api.get("ready")) != (want, want, want):
                out.append(f"{name}: the API says {api}, the spec {want}")
            disk = self.on_disk.get(name, {})
            if (
                disk.get("target") != want
                or disk.get("ready", 0) != want
                or sum(n for phase, n in disk.items() if phase != "target") != want
            ):
                out.append(f"{name}: state.json says {disk}, the spec {want}")
            if self.processes.get(name, 0) != want:
                out.append(f"{name}: {self.processes.get(name, 0)} live processes, the spec {want}")
        return out

    def problems(self) -> list[str]:
        out = [f"5xx: {line}" for line in self.report.server_errors]
        out += [f"{label}: {f}" for label, fs in self.report.failures.items() for f in fs[:3]]
        over = [s for s in self.rss_samples if s > RSS_LIMIT_BYTES]
        if over:
            out.append(
                f"RSS above {_mb(RSS_LIMIT_BYTES)} in {len(over)} samples, max {_mb(max(over))}"
            )
        if not self.rss_samples:
            out.append("no RSS sample")
        out += self.spec_problems()
        if self.up_exit_code != 0:
            out.append(f"up answered Ctrl-C with exit code {self.up_exit_code}")
        if self.left_after_shutdown:
            out.append(f"left running after shutdown: pids {self.left_after_shutdown}")
        return out


def run_fuzz(tmp: Path, *, cases: int, seed: int) -> FuzzRun:
    """Start ``up`` on the fuzz graph, fuzz it with ``cases`` cases while sampling its RSS,
    restore the spec, read the counts back, Ctrl-C."""
    started = time.monotonic()
    run_id = f"fuzz-{uuid.uuid4().hex[:10]}"
    folder = tmp / "fuzz"
    folder.mkdir(parents=True, exist_ok=True)
    talker = folder / "talker.py"
    talker.write_text(TALKER)
    graph = folder / "graph.yaml"
    graph.write_text(graph_yaml(run_id, talker))
    working_dir = folder / "wd"
    up = fuzz_up(graph, working_dir)
    asyncio.run(up.start(STARTUP_LIMIT_S))
    try:
        with RssSampler(up.pid) as rss:
            t0 = time.monotonic()
            report = fuzz(up.url, sorted(SPEC), cases=cases, seed=seed)
            fuzz_s = time.monotonic() - t0
            restored = restore_spec(up.url, SPEC)
        on_disk = state_counts(working_dir)
        processes = live_replicas(run_id)
    finally:
        code = asyncio.run(up.interrupt())
        left = kill_leftovers(run_id)
    return FuzzRun(
        report,
        rss.samples,
        fuzz_s,
        time.monotonic() - started,
        restored,
        on_disk,
        processes,
        up_exit_code=code,
        left_after_shutdown=left,
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:.1f} MB"


def print_run(run: FuzzRun, *, verbose: bool = False) -> None:
    r = run.report
    print(f"  {'operations fuzzed':<34} {len(r.cases)}")
    for label, why in sorted(r.excluded.items()):
        print(f"  {'  left out: ' + label:<34} {why}")
    print(
        f"  {'cases':<34} {r.total} in {run.fuzz_s:.1f} s ({r.total / max(run.fuzz_s, 1e-9):.0f}/s)"
    )
    if verbose:
        for label, n in sorted(r.cases.items()):
            got = ", ".join(str(s) for s in sorted(r.statuses.get(label, ())))
            secs = r.seconds.get(label, 0.0)
            print(f"    {label:<38} {n:>5} in {secs:5.1f} s  statuses {got}")
    classes = ", ".join(f"{k} {v}" for k, v in sorted(r.status_classes.items()))
    print(f"  {'answers':<34} {classes}")
    print(f"  {'5xx':<34} {len(r.server_errors)}")
    print(f"  {'conformance failures':<34} {r.failure_count}")
    samples = run.rss_samples
    if samples:
        print(
            f"  {'connector RSS (up process)':<34} start {_mb(samples[0])}, "
            f"max {_mb(run.rss_max)}, end {_mb(samples[-1])} "
            f"({len(samples)} samples, limit {_mb(RSS_LIMIT_BYTES)})"
        )
    for name, want in SPEC.items():
        api = run.restored.get(name, {})
        print(
            f"  {'after: ' + name:<34} spec {want}; API desired/running/ready "
            f"{api.get('desired')}/{api.get('running')}/{api.get('ready')}; "
            f"state.json {run.on_disk.get(name)}; processes {run.processes.get(name, 0)}"
        )
    print(f"  {'wall time':<34} {run.wall_s:.1f} s (fuzz {run.fuzz_s:.1f} s)")
    problems = run.problems()
    print(f"  {'bounds':<34} {'OK' if not problems else f'VIOLATED ({len(problems)})'}")
    for line in problems[:20]:
        print(f"    - {line}")
    sys.stdout.flush()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", type=int, default=DEFAULT_CASES, help="generated requests in all")
    ap.add_argument("--seed", type=int, default=None, help="default: a random one, printed")
    ap.add_argument("--verbose", action="store_true", help="cases and statuses per operation")
    args = ap.parse_args(argv)
    if args.seed is None:
        args.seed = random.SystemRandom().randrange(1_000_000)
    cores = len(os.sched_getaffinity(0))
    print(
        f"api fuzz: {args.cases} cases, seed {args.seed} (replay: --seed {args.seed}), "
        f"{cores} cores, schemathesis {schemathesis.__version__}, Python {sys.version.split()[0]}"
    )
    with tempfile.TemporaryDirectory(prefix="dl-fuzz-") as d:
        run = run_fuzz(Path(d), cases=args.cases, seed=args.seed)
    print_run(run, verbose=args.verbose)
    return 1 if run.problems() else 0


if __name__ == "__main__":
    raise SystemExit(main())
