"""The commands that talk to a running server (``ps``, ``scale``, ``restart``, ``logs``,
``top``, ``resources``, ``topology``, ``events``, ``down``, ``experiment``): each takes the
:class:`~connector.client.Client` and the parsed arguments and returns the exit code. The
parser and ``up`` live in :mod:`connector.cli.program`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from rich.console import Console
from rich.live import Live

from connector.cli import render
from connector.client import (
    ApiError,
    Client,
    Unreachable,
)

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
EXIT_NOT_CONVERGED = 4

NOT_CONVERGED_CODES = frozenset({"scale_timeout", "superseded"})

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Command = Callable[[Client, argparse.Namespace], Awaitable[int]]


def fail(message: str) -> None:
    err.print(f"dynamo-local: error: {message}", markup=False)


def print_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    sys.stdout.flush()


# ------------------------------------------------------------------------- commands


async def cmd_ps(api: Client, args: argparse.Namespace) -> int:
    if args.component:
        detail = await api.component(args.component)
        if args.json:
            print_json(detail)
        else:
            out.print(render.replicas_table(detail))
        return EXIT_OK
    data = await api.components()
    if args.json:
        print_json(data)
    else:
        out.print(render.components_table(data))
    return EXIT_OK


async def _watch_progress(
    api: Client, name: str, target: int, task: asyncio.Task[dict[str, Any]], verb: str
) -> None:
    """Show ready/desired while ``task`` (a waiting scale or restart) runs."""
    live = err.is_terminal
    last = ""
    status = err.status(f"{verb} {name} to {target}…") if live else None
    if status is not None:
        status.start()
    try:
        while not task.done():
            try:
                rs = await api.replicas(name)
                line = f"{verb} {name} to {target}: {rs['ready']}/{rs['desired']} ready"
            except (ApiError, Unreachable):
                line = f"{verb} {name} to {target}: waiting"
            if status is not None:
                status.update(line)
            elif line != last:
                err.print(line, markup=False)
            last = line
            await asyncio.wait({task}, timeout=0.5)
    finally:
        if status is not None:
            status.stop()


def _summary(result: dict[str, Any]) -> str:
    state = result["state"]
    r = state["replicas"]
    done = "converged" if result["converged"] else "converging"
    return (
        f"{result['component']}: {result['operation']} to {result['target']} {done} "
        f"({r['ready']}/{r['desired']} ready, {state['status']})"
    )


async def _waiting_call(
    api: Client,
    args: argparse.Namespace,
    target: int,
    verb: str,
    call: Awaitable[dict[str, Any]],
) -> int:
    task: asyncio.Task[dict[str, Any]] = asyncio.ensure_future(call)
    if args.wait and not args.json:
        await _watch_progress(api, args.component, target, task, verb)
    try:
        result = await task
    except ApiError as exc:
        if exc.code in NOT_CONVERGED_CODES:
            fail(exc.message)
            return EXIT_NOT_CONVERGED
        raise
    if args.json:
        print_json(result)
    else:
        out.print(_summary(result), markup=False)
    if args.wait and not result.get("converged", True):
        fail(str(result.get("reason", "did not converge")))
        return EXIT_NOT_CONVERGED
    return EXIT_OK


async def cmd_scale(api: Client, args: argparse.Namespace) -> int:
    return await _waiting_call(
        api,
        args,
        args.replicas,
        "scaling",
        api.scale(args.component, args.replicas, wait=args.wait, timeout_s=args.timeout),
    )


async def cmd_restart(api: Client, args: argparse.Namespace) -> int:
    target = (await api.replicas(args.component))["desired"] if args.wait else 0
    return await _waiting_call(
        api,
        args,
        target,
        "restarting",
        api.restart(args.component, wait=args.wait, timeout_s=args.timeout),
    )


def new_lines(previous: Sequence[str], current: Sequence[str]) -> list[str]:
    """Lines of ``current`` after the last line already printed (all when it scrolled out)."""
    if not previous:
        return list(current)
    last = previous[-1]
    for i in range(len(current) - 1, -1, -1):
        if current[i] == last:
            return list(current[i + 1 :])
    return list(current)


async def cmd_logs(api: Client, args: argparse.Namespace) -> int:
    lines = await api.logs(args.component, args.lines, args.replica, args.stream)
    emit = print_json if args.json else (lambda line: out.print(line, markup=False))
    if args.json and not args.follow:
        print_json({"component": args.component, "lines": lines})
        return EXIT_OK
    for line in lines:
        emit(line)
    if not args.follow:
        return EXIT_OK
    seen = lines
    while True:
        await asyncio.sleep(args.interval)
        batch = await api.logs(args.component, 1000, args.replica, args.stream)
        for line in new_lines(seen, batch):
            emit(line)
        if batch:
            seen = batch


async def _top_data(api: Client) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    components = await api.components()
    names = [c["name"] for c in components["components"]]

    async def usage_of(name: str) -> dict[str, Any]:
        try:
            return await api.metrics(name)
        except ApiError:
            return {}

    usages = await asyncio.gather(*(usage_of(n) for n in names))
    try:
        queue: dict[str, Any] | None = await api.prefill_queue()
    except ApiError as exc:
        queue = {"status": "unavailable", "reason": exc.message}
    return components, dict(zip(names, usages, strict=True)), queue


async def cmd_top(api: Client, args: argparse.Namespace) -> int:
    components, usage, queue = await _top_data(api)
    if args.once:
        if args.json:
            print_json({"components": components, "usage": usage, "prefill_queue": queue})
        else:
            out.print(render.top_table(components, usage, queue))
        return EXIT_OK
    with Live(render.top_table(components, usage, queue), console=out, auto_refresh=False) as live:
        while True:
            await asyncio.sleep(args.interval)
            components, usage, queue = await _top_data(api)
            live.update(render.top_table(components, usage, queue), refresh=True)


async def cmd_resources(api: Client, args: argparse.Namespace) -> int:
    data = await api.resources()
    if args.json:
        print_json(data)
    else:
        for table in render.resources_tables(data):
            out.print(table)
    return EXIT_OK


async def cmd_topology(api: Client, args: argparse.Namespace) -> int:
    result = await api.topology(args.format)
    if args.format == "json":
        print_json(result)
    else:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")
    return EXIT_OK


async def cmd_events(api: Client, args: argparse.Namespace) -> int:
    data = await api.events(args.since, args.limit)
    if args.json:
        for event in data["events"]:
            sys.stdout.write(json.dumps(event) + "\n")
        sys.stdout.flush()
    elif args.follow:
        for event in data["events"]:
            out.print(render.event_line(event))
    else:
        out.print(render.events_table(data["events"]))
    if not args.follow:
        return EXIT_OK
    async for event in api.stream_events(since=data["last_seq"]):
        if event.get("kind") == "_overflow":
            fail("the server dropped this stream (too slow); run `events -f` again")
            return EXIT_ERROR
        if args.json:
            sys.stdout.write(json.dumps(event) + "\n")
            sys.stdout.flush()
        else:
            out.print(render.event_line(event))
    err.print("dynamo-local: the server stopped", markup=False)
    return EXIT_OK


async def cmd_down(api: Client, args: argparse.Namespace) -> int:
    await api.shutdown()
    err.print(f"dynamo-local: {api.url} is shutting down", markup=False)
    if not args.wait:
        return EXIT_OK
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            await api.health()
        except Unreachable:
            err.print("dynamo-local: stopped", markup=False)
            return EXIT_OK
        except ApiError:
            pass  # still answering while it drains
        await asyncio.sleep(0.2)
    fail(f"the server still answers after {args.timeout:g} s")
    return EXIT_ERROR


async def cmd_experiment(api: Client, args: argparse.Namespace) -> int:
    from connector.experiment.command import run_command

    return await run_command(api, args, out, err)


# --------------------------------------------------------------------------- up
