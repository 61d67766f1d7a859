"""The ``dynamo-local`` command: its parser, ``up`` and the entry point.

``up GRAPH`` runs a graph in the foreground (the composition root is :mod:`connector.cli.up`);
every other command (:mod:`connector.cli.commands`) talks to a running server over HTTP
(``--url``, ``--token``; defaults from ``DYNAMO_LOCAL_URL`` / ``DYNAMO_LOCAL_TOKEN``).

Exit codes: 0 ok, 1 error, 2 usage, 3 no server at the URL, 4 scale or restart did not
converge (timed out or superseded). Errors are one line on stderr, never a traceback
(``--debug`` shows it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from connector import defaults
from connector.cli.commands import (
    EXIT_ERROR,
    EXIT_NOT_CONVERGED,
    EXIT_OK,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
    NOT_CONVERGED_CODES,
    Command,
    cmd_down,
    cmd_events,
    cmd_experiment,
    cmd_logs,
    cmd_ps,
    cmd_resources,
    cmd_restart,
    cmd_scale,
    cmd_top,
    cmd_topology,
    fail,
)
from connector.client import (
    TOKEN_ENV,
    URL_ENV,
    ApiError,
    Client,
    Unreachable,
    default_token,
    default_url,
)
from connector.graph.quantities import format_memory


def cmd_up(args: argparse.Namespace) -> int:
    from connector.api.server import BindRefused, check_bind
    from connector.cli.up import UpConfig, describe_failure, run_up

    token = args.token or default_token()
    try:
        check_bind(args.host, token)
    except BindRefused as exc:
        fail(str(exc))
        return EXIT_USAGE
    if args.auth_all and not token:
        fail("--auth-all needs a token (--token or DYNAMO_LOCAL_TOKEN)")
        return EXIT_USAGE
    if args.dry_run and not args.scaledobject:
        fail("--dry-run applies to the policies: give them with --scaledobject FILE")
        return EXIT_USAGE
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    config = UpConfig(
        graph=args.graph,
        namespace=args.namespace,
        host=args.host,
        port=args.port,
        token=token,
        auth_all=args.auth_all,
        discovery=args.discovery,
        etcd_url=args.etcd_url,
        nats_url=args.nats_url,
        planner_executor=args.planner_executor,
        working_dir=Path(args.working_dir) if args.working_dir else None,
        gpu_backend=args.gpu_backend,
        metrics=not args.no_metrics,
        port_range=args.port_range,
        gpu_foreign_memory_threshold_bytes=args.gpu_foreign_threshold,
        gpu_release_timeout_s=args.release_timeout,
        max_replicas=args.max_replicas,
        log_max_bytes=args.log_max_size,
        log_backups=args.log_backups,
        stopped_logs_kept=args.keep_stopped_logs,
        scaledobjects=tuple(args.scaledobject),
        dry_run=args.dry_run,
    )

    def say(line: str) -> None:
        print(line, flush=True)

    try:
        return asyncio.run(run_up(config, out=say))
    except KeyboardInterrupt:
        return EXIT_ERROR
    except Exception as exc:
        if args.debug:
            raise
        fail(describe_failure(exc))
        return EXIT_ERROR


# ----------------------------------------------------------------------- parser


def _client_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--url", default=None, help=f"server URL (default: ${URL_ENV} or {default_url()})"
    )
    common.add_argument("--token", default=None, help=f"bearer token (default: ${TOKEN_ENV})")
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    return common


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return parse


def _port_range(text: str) -> tuple[int, int]:
    lo_text, sep, hi_text = text.partition("-")
    try:
        lo, hi = int(lo_text), int(hi_text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must look like 20000-29999, got {text!r}") from None
    if not sep or not 1024 <= lo <= hi <= defaults.HIGHEST_REPLICA_PORT:
        raise argparse.ArgumentTypeError(
            f"must be LOW-HIGH with 1024 <= LOW <= HIGH <= {defaults.HIGHEST_REPLICA_PORT} "
            f"(Dynamo reads ports as signed 16-bit numbers), got {text!r}"
        )
    return lo, hi


def _memory(text: str) -> int:
    from connector.graph.quantities import parse_memory

    try:
        return parse_memory(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dynamo-local",
        description="Run, scale and watch a Dynamo graph on one machine.",
        epilog="exit codes: 0 ok, 1 error, 2 usage, 3 server unreachable, 4 not converged",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    client = _client_options()

    up = sub.add_parser("up", help="run a graph in the foreground (Ctrl-C stops it)")
    up.add_argument("graph", metavar="GRAPH", help="graph YAML file, directory or module:attr")
    up.add_argument(
        "--namespace",
        help="Dynamo namespace the whole graph runs in: every replica's DYN_NAMESPACE, the "
        "Planner executor's keys and the working dir (default: the graph's)",
    )
    up.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    up.add_argument("--port", type=int, default=8787, help="listen port (0: any free port)")
    up.add_argument("--token", default=None, help=f"API bearer token (default: ${TOKEN_ENV})")
    up.add_argument("--auth-all", action="store_true", help="require the token on reads too")
    up.add_argument(
        "--discovery",
        choices=("file", "etcd", "none"),
        default=None,
        help="Dynamo discovery backend (default: etcd when there is an etcd, else file)",
    )
    up.add_argument(
        "--etcd-url",
        default=None,
        help="etcd endpoint(s), comma-separated (default: a private etcd when the graph "
        "has a Planner or --discovery etcd asks for one)",
    )
    up.add_argument("--nats-url", default=None, help="NATS URL for the prefill queue")
    up.add_argument(
        "--planner-executor",
        action="store_true",
        help="apply the Planner's etcd decisions (always on for a graph with a Planner)",
    )
    up.add_argument("--working-dir", default=None, help="state, logs, sockets (default ~/.dynamo)")
    up.add_argument("--gpu-backend", default="auto", help="auto, nvml, none or fake:<capture.json>")
    up.add_argument(
        "--port-range",
        type=_port_range,
        default=defaults.PORT_RANGE,
        metavar="LOW-HIGH",
        help="ports handed to replicas (default {}-{})".format(*defaults.PORT_RANGE),
    )
    up.add_argument(
        "--gpu-foreign-threshold",
        type=_memory,
        default=defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES,
        metavar="MEMORY",
        help="skip GPUs that processes not ours use beyond this (default "
        f"{format_memory(defaults.GPU_FOREIGN_MEMORY_THRESHOLD_BYTES)})",
    )
    up.add_argument(
        "--release-timeout",
        type=_positive(float),
        default=defaults.RELEASE_TIMEOUT_S,
        metavar="SECONDS",
        help="wait this long for a stopped replica's processes and GPUs to be free, "
        "then hold them as lingering/leaked (default %(default)s)",
    )
    up.add_argument(
        "--max-replicas",
        type=_positive(int),
        default=None,
        metavar="N",
        help="replicas the whole graph may run at once (default: "
        f"{defaults.REPLICAS_PER_CORE} per core, at least {defaults.MIN_REPLICA_BUDGET})",
    )
    up.add_argument(
        "--log-max-size",
        type=_memory,
        default=defaults.LOG_MAX_BYTES,
        metavar="MEMORY",
        help="rotate each replica log file at this size, 0 for never (default "
        f"{format_memory(defaults.LOG_MAX_BYTES)})",
    )
    up.add_argument(
        "--log-backups",
        type=_positive(int),
        default=defaults.LOG_BACKUPS,
        metavar="N",
        help="rotated files kept per replica log, at least 1 (default %(default)s)",
    )
    up.add_argument(
        "--keep-stopped-logs",
        type=_count,
        default=defaults.STOPPED_LOGS_KEPT,
        metavar="N",
        help="stopped replicas per component whose log files stay; older ones are deleted "
        "(default %(default)s)",
    )
    up.add_argument(
        "--scaledobject",
        action="append",
        default=[],
        metavar="FILE",
        help="a KEDA ScaledObject (keda.sh/v1alpha1, prometheus triggers) whose policy drives "
        "the graph service it targets; repeatable",
    )
    up.add_argument(
        "--dry-run",
        action="store_true",
        help="with --scaledobject: evaluate the policies and record what they would do "
        "(events, metrics) without scaling",
    )
    up.add_argument("--no-metrics", action="store_true", help="do not serve /metrics")
    up.add_argument("--log-level", default="info", choices=("debug", "info", "warning", "error"))
    up.add_argument("--debug", action="store_true", help="show tracebacks")
    up.set_defaults(run=None)

    down = sub.add_parser("down", parents=[client], help="shut a running server down")
    down.add_argument("--no-wait", dest="wait", action="store_false", help="do not wait")
    down.add_argument("--timeout", type=_positive(float), default=120.0, help="seconds")
    down.set_defaults(run=cmd_down)

    ps = sub.add_parser("ps", parents=[client], help="components (or one's replicas)")
    ps.add_argument("component", nargs="?", metavar="COMPONENT")
    ps.add_argument("--json", action="store_true")
    ps.set_defaults(run=cmd_ps)

    scale = sub.add_parser("scale", parents=[client], help="set a component's replicas")
    scale.add_argument("component", metavar="COMPONENT")
    scale.add_argument("replicas", metavar="N", type=_count)
    scale.add_argument("--wait", action="store_true", help="wait until all are ready")
    scale.add_argument("--timeout", type=_positive(float), default=None, help="seconds")
    scale.add_argument("--json", action="store_true")
    scale.set_defaults(run=cmd_scale)

    restart = sub.add_parser("restart", parents=[client], help="replace every replica")
    restart.add_argument("component", metavar="COMPONENT")
    restart.add_argument("--wait", action="store_true", help="wait until all are ready")
    restart.add_argument("--timeout", type=_positive(float), default=None, help="seconds")
    restart.add_argument("--json", action="store_true")
    restart.set_defaults(run=cmd_restart)

    logs = sub.add_parser("logs", parents=[client], help="a component's log lines")
    logs.add_argument("component", metavar="COMPONENT")
    logs.add_argument("-n", "--lines", type=_count, default=100)
    logs.add_argument("-f", "--follow", action="store_true")
    logs.add_argument("--replica", default=None, help="only this replica (ordinal)")
    logs.add_argument("--stream", choices=("stdout", "stderr", "both"), default="both")
    logs.add_argument("--interval", type=_positive(float), default=1.0, help=argparse.SUPPRESS)
    logs.add_argument("--json", action="store_true")
    logs.set_defaults(run=cmd_logs)

    top = sub.add_parser("top", parents=[client], help="live usage table")
    top.add_argument("--once", action="store_true", help="print one table and exit")
    top.add_argument("--interval", type=_positive(float), default=2.0, help="seconds")
    top.add_argument("--json", action="store_true", help="with --once: the data as JSON")
    top.set_defaults(run=cmd_top)

    resources = sub.add_parser(
        "resources", parents=[client], help="GPUs, CPU, memory, ports: who holds what"
    )
    resources.add_argument("--json", action="store_true")
    resources.set_defaults(run=cmd_resources)

    topology = sub.add_parser("topology", parents=[client], help="the graph's topology")
    topology.add_argument("--format", choices=("json", "dot", "mermaid"), default="json")
    topology.add_argument("--json", action="store_true", help="same as --format json")
    topology.set_defaults(run=cmd_topology)

    events = sub.add_parser("events", parents=[client], help="scale, crash, Planner events")
    events.add_argument("-f", "--follow", action="store_true", help="stream new events")
    events.add_argument("--since", type=_count, default=0, help="only events after this seq")
    events.add_argument("--limit", type=_positive(int), default=None)
    events.add_argument("--json", action="store_true", help="one JSON object per line")
    events.set_defaults(run=cmd_events)

    from connector.experiment.command import add_arguments as experiment_arguments

    experiment = sub.add_parser(
        "experiment",
        parents=[client],
        help="drive load phases with aiperf and record how the graph scales",
    )
    experiment_arguments(experiment)
    experiment.set_defaults(run=cmd_experiment)
    return parser


async def _run_client(command: Command, args: argparse.Namespace) -> int:
    async with Client(args.url, args.token or default_token()) as api:
        return await command(api, args)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse printed the usage error (or --help)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "up":
        return cmd_up(args)
    if getattr(args, "format", None) and getattr(args, "json", False):
        args.format = "json"
    command: Command = args.run
    try:
        return asyncio.run(_run_client(command, args))
    except KeyboardInterrupt:
        return EXIT_OK  # Ctrl-C is how -f and top end
    except Unreachable as exc:
        fail(f"{exc} (start one with `dynamo-local up GRAPH`, or pass --url)")
        return EXIT_UNREACHABLE
    except ApiError as exc:
        fail(f"{exc.message} [{exc.code}]")
        return EXIT_NOT_CONVERGED if exc.code in NOT_CONVERGED_CODES else EXIT_ERROR
    except Exception as exc:
        if args.debug or os.environ.get("DYNAMO_LOCAL_DEBUG"):
            raise
        fail(f"{type(exc).__name__}: {exc}")
        return EXIT_ERROR
