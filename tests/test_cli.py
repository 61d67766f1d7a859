"""``dynamo-local`` client commands, run as real subprocesses (``python -m connector``)
against a real server: output, ``--json``, exit codes, tokens, following, ``down``."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio

from connector.api.server import RunningServer
from connector.graph.model import PortSpec, ResourceRequest
from tests.api_helpers import Served, serve
from tests.core_helpers import make_graph, svc, wait_until
from tests.nvml_fakes import idle_capture
from tests.servers import wait_until_async

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DYNAMO_LOCAL_")}
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env.update({"COLUMNS": "200", "PYTHONPATH": path, "NO_COLOR": "1"}, **extra)
    return env


async def cli(*args: str, env: dict[str, str] | None = None, timeout_s: float = 60) -> Result:
    """Runs the CLI without blocking the loop the server lives on."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
        cwd=ROOT,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode is not None
    return Result(proc.returncode, out.decode(), err.decode())


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def api(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Served]:
    async with serve(Path(tmp_path_factory.mktemp("cli"))) as served:
        view = served.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        yield served


def _url(api: Served) -> tuple[str, str]:
    return "--url", api.url


def cells(line: str) -> list[str]:
    """The words of a rich table row, box drawing removed."""
    for box in "┃│":
        line = line.replace(box, " ")
    return line.split()


# ------------------------------------------------------------------------- reading


async def test_ps_table_and_json(api: Served) -> None:
    result = await cli("ps", *_url(api))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert lines[0].strip() == "namespace t"
    header = next(line for line in lines if "COMPONENT" in line)
    assert cells(header) == [
        "COMPONENT",
        "ROLE",
        "STATUS",
        "READY",
        "RUNNING",
        "RESTARTS",
        "REASON",
    ]
    decode = next(line for line in lines if line.strip("│ ").startswith("Decode"))
    assert [c.strip() for c in decode.strip("│ ").split("│")][:6] == [
        "Decode",
        "worker (decode)",
        "running",
        "1/1",
        "1",
        "0",
    ]
    as_json = await cli("ps", "--json", *_url(api))
    assert as_json.code == 0
    assert json.loads(as_json.out) == (await api.call("GET", "/v1/components"))[1]


async def test_ps_of_one_component_lists_its_replicas(api: Served) -> None:
    result = await cli("ps", "Decode", *_url(api))
    assert result.code == 0, result.err
    assert "REPLICA" in result.out and "STATE" in result.out
    pid = api.connector.view().replicas_of("Decode")[0].pid
    row = next(line for line in result.out.splitlines() if f"│ {pid}" in line)
    assert [c.strip() for c in row.strip("│ ").split("│")][:3] == ["1", "ready", str(pid)]
    missing = await cli("ps", "Nope", *_url(api))
    assert missing.code == 1
    assert missing.err.strip() == (
        "dynamo-local: error: no component 'Nope' in graph 'apitest' (components: Crashy, "
        "Decode, Frontend, Prefill, Slow, Talker) [component_not_found]"
    )


async def _talker_logged_both_lines(api: Served) -> None:
    """Ready is "alive for its start-up grace"; its two lines reach the log files through
    circusd later, so a test reading them waits for them (stderr's is written last)."""
    await wait_until(lambda: api.connector.view().component("Talker").ready == 1)  # type: ignore[union-attr]

    async def both_lines() -> bool:
        lines = await api.connector.get_component_logs("Talker", lines=5)
        return len(lines) >= 2 and lines[-1].endswith("| oops on stderr")

    await wait_until_async(both_lines)


async def test_logs_lines_stream_and_json(api: Served) -> None:
    await _talker_logged_both_lines(api)
    result = await cli("logs", "Talker", "-n", "5", *_url(api))
    assert result.code == 0, result.err
    lines = result.out.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("[Talker/1 stdout] ") and lines[0].endswith("| hello from talker")
    only_err = await cli("logs", "Talker", "--stream", "stderr", *_url(api))
    assert only_err.out.splitlines()[0].endswith("| oops on stderr")
    as_json = await cli("logs", "Talker", "--json", "-n", "1", *_url(api))
    assert json.loads(as_json.out) == {"component": "Talker", "lines": lines[-1:]}


async def test_logs_follow_prints_new_lines_until_interrupted(api: Served) -> None:
    await _talker_logged_both_lines(api)  # the last line is then stderr's
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "logs",
        "Talker",
        "-f",
        "-n",
        "1",
        "--interval",
        "0.1",
        *_url(api),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=cli_env(),
    )
    assert proc.stdout is not None
    first = await asyncio.wait_for(proc.stdout.readline(), 30)
    assert first.decode().rstrip().endswith("| oops on stderr")
    status, _, _ = await api.call(
        "POST", "/v1/components/Talker/restart", body={"wait": True, "timeout_s": 20}
    )
    assert status == 200
    fresh = [(await asyncio.wait_for(proc.stdout.readline(), 30)).decode() for _ in range(2)]
    assert sorted(line.rstrip().rsplit("| ", 1)[1] for line in fresh) == [
        "hello from talker",
        "oops on stderr",
    ]
    proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(proc.wait(), 10) == 0


async def test_top_once_table_and_json(api: Served) -> None:
    result = await cli("top", "--once", *_url(api))
    assert result.code == 0, result.err
    header = next(line for line in result.out.splitlines() if "COMPONENT" in line)
    assert cells(header) == [
        "COMPONENT",
        "STATUS",
        "READY",
        "CPU",
        "RSS",
        "GPU",
        "MEM",
        "RESTARTS",
    ]
    assert "prefill queue:" in result.out
    as_json = await cli("top", "--once", "--json", *_url(api))
    data = json.loads(as_json.out)
    assert set(data) == {"components", "usage", "prefill_queue"}
    assert data["usage"]["Decode"]["component"] == "Decode"


async def test_topology_formats(api: Served) -> None:
    as_json = await cli("topology", *_url(api))
    assert as_json.code == 0, as_json.err
    assert json.loads(as_json.out) == (await api.call("GET", "/v1/topology"))[1]
    dot = await cli("topology", "--format", "dot", *_url(api))
    assert dot.code == 0 and dot.out.startswith("digraph")
    mermaid = await cli("topology", "--format", "mermaid", *_url(api))
    assert mermaid.code == 0 and mermaid.out.split()[0] in ("graph", "flowchart")


async def test_events_table_and_json_lines(api: Served) -> None:
    result = await cli("events", *_url(api))
    assert result.code == 0, result.err
    assert "SEQ" in result.out and "KIND" in result.out
    as_json = await cli("events", "--json", "--since", "1", "--limit", "3", *_url(api))
    events = [json.loads(line) for line in as_json.out.splitlines()]
    last = api.connector.events.last_seq
    assert [e["seq"] for e in events] == list(range(max(2, last - 2), last + 1))


# ------------------------------------------------------------------------ changing


async def test_scale_with_wait_reports_progress_and_converges(api: Served) -> None:
    result = await cli("scale", "Prefill", "2", "--wait", "--timeout", "30", *_url(api))
    assert result.code == 0, result.err
    assert result.out.strip() == "Prefill: scale to 2 converged (2/2 ready, running)"
    assert "scaling Prefill to 2: " in result.err  # progress while waiting
    events = [e for e in api.connector.recent_events(0) if e.kind == "scale"]
    assert (events[-1].component, events[-1].source, events[-1].outcome) == (
        "Prefill",
        "cli",
        "ok",
    )
    back = await cli("scale", "Prefill", "0", "--json", *_url(api))
    assert back.code == 0
    assert json.loads(back.out)["target"] == 0
    await wait_until(lambda: not api.connector.view().replicas_of("Prefill"))


async def test_restart_with_wait(api: Served) -> None:
    before = api.connector.view().replicas_of("Frontend")[0].pid
    result = await cli("restart", "Frontend", "--wait", *_url(api))
    assert result.code == 0, result.err
    assert result.out.strip() == "Frontend: restart to 1 converged (1/1 ready, running)"
    assert api.connector.view().replicas_of("Frontend")[0].pid != before


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (
            ("scale", "Decode", "9"),
            1,
            "Decode: 9 replicas is outside minReplicas..maxReplicas (0..3) [replica_limit]",
        ),
        (
            ("scale", "Slow", "1", "--wait", "--timeout", "0.3"),
            4,
            "Slow did not converge to 1 ready replicas within 0.3 s (0 ready, status starting)",
        ),
    ],
)
async def test_scale_failures_have_meaningful_exit_codes(
    api: Served, args: tuple[str, ...], code: int, message: str
) -> None:
    result = await cli(*args, *_url(api))
    assert result.code == code
    assert result.err.strip().splitlines()[-1] == f"dynamo-local: error: {message}"
    assert "Traceback" not in result.err
    if args[1] == "Slow":
        await api.call("PUT", "/v1/components/Slow/replicas", body={"replicas": 0})


async def test_unreachable_server_is_exit_3(api: Served) -> None:
    from connector.supervision.circus import free_loopback_port

    url = f"http://127.0.0.1:{free_loopback_port()}"
    result = await cli("ps", "--url", url)
    assert result.code == 3
    assert result.err.startswith(f"dynamo-local: error: no dynamo-local server answers at {url}: ")
    assert result.err.rstrip().endswith("(start one with `dynamo-local up GRAPH`, or pass --url)")
    assert "Traceback" not in result.err


async def test_url_from_the_environment(api: Served) -> None:
    result = await cli("ps", "--json", env=cli_env(DYNAMO_LOCAL_URL=api.url))
    assert result.code == 0, result.err
    assert json.loads(result.out)["namespace"] == "t"


@pytest.mark.parametrize(
    "args",
    [(), ("frobnicate",), ("scale", "Decode"), ("scale", "Decode", "-1"), ("logs",)],
)
async def test_usage_errors_are_exit_2(args: tuple[str, ...]) -> None:
    result = await cli(*args)
    assert result.code == 2
    assert "usage: dynamo-local" in result.err
    assert "Traceback" not in result.err


async def test_help_is_exit_0() -> None:
    result = await cli("--help")
    assert result.code == 0
    for command in ("up", "down", "ps", "scale", "logs", "restart", "top", "topology", "events"):
        assert command in result.out


# ----------------------------------------------------------- servers of their own


async def test_token_from_flag_or_environment(tmp_path: Path) -> None:
    async with serve(tmp_path, token="cli-token") as api:
        refused = await cli("scale", "Decode", "1", *_url(api))
        assert refused.code == 1
        assert refused.err.strip() == (
            "dynamo-local: error: PUT /v1/components/Decode/replicas needs a bearer token "
            "(Authorization: Bearer <token>; the CLI reads --token or DYNAMO_LOCAL_TOKEN) "
            "[unauthorized]"
        )
        wrong = await cli("scale", "Decode", "1", "--token", "nope", *_url(api))
        assert wrong.code == 1 and "the bearer token is wrong" in wrong.err
        by_flag = await cli("scale", "Decode", "1", "--token", "cli-token", *_url(api))
        assert by_flag.code == 0, by_flag.err
        by_env = await cli(
            "scale", "Decode", "1", *_url(api), env=cli_env(DYNAMO_LOCAL_TOKEN="cli-token")
        )
        assert by_env.code == 0, by_env.err


async def test_events_follow_streams_until_the_server_stops(tmp_path: Path) -> None:
    async with serve(tmp_path) as api:
        view = api.connector.view
        await wait_until(lambda: all(c.ready == c.desired for c in view().components))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connector",
            "events",
            "-f",
            "--json",
            "--since",
            str(api.connector.events.last_seq),
            *_url(api),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=cli_env(),
        )
        assert proc.stdout is not None
        await wait_until(lambda: len(api.connector.events._subscribers) >= 1, limit_s=30)
        probe = api.connector.events.emit("probe", component="Decode")
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert json.loads(line) == probe.to_dict()
        await api.server.stop()
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        assert (await proc.stderr.read()).decode().strip() == "dynamo-local: the server stopped"


async def test_down_asks_the_server_to_stop_and_waits(tmp_path: Path) -> None:
    server: list[RunningServer] = []

    def stop_soon() -> None:
        asyncio.get_running_loop().create_task(server[0].stop())

    async with serve(tmp_path, on_shutdown=stop_soon) as api:
        server.append(api.server)
        result = await cli("down", *_url(api))
        assert result.code == 0, result.err
        assert result.err.splitlines() == [
            f"dynamo-local: {api.url} is shutting down",
            "dynamo-local: stopped",
        ]
        assert len(api.shutdown_calls) == 1


# ------------------------------------------------------------------------- resources


async def test_resources_shows_who_holds_each_gpu_and_port(tmp_path: Path) -> None:
    graph = make_graph(
        svc(
            "Decode",
            replicas=1,
            max_replicas=1,
            resources=ResourceRequest(gpu=1, cpu=1, memory_bytes=1 << 30),
            ports=(PortSpec("system", env="DYN_SYSTEM_PORT"),),
        ),
        name="restest",
    )
    gpu_backend = f"fake:{idle_capture(tmp_path)}"
    async with serve(tmp_path / "wd", graph, gpu_backend=gpu_backend) as api:
        await wait_until(lambda: api.connector.view().components[0].ready == 1, 30)
        (rec,) = api.connector.state.replicas_of("Decode")
        assert rec.reservation is not None
        port = rec.reservation["ports"]["system"]
        result = await cli("resources", *_url(api))
        assert result.code == 0, result.err
        lines = result.out.splitlines()
        header = next(i for i, line in enumerate(lines) if "OWNERS" in line)
        assert cells(lines[header]) == [
            "GPU", "UUID", "NAME", "STATE", "OWNERS", "MEMORY", "FOREIGN",
        ]  # fmt: skip
        assert cells(lines[header + 2])[:2] == ["0", "GPU-3916acbf"]
        assert cells(lines[header + 2])[-8:] == [
            "allocated", "Decode/1", "3.5", "GiB", "/", "79.6", "GiB", "-",
        ]  # fmt: skip
        budgets = next(cells(line) for line in lines if line.startswith("CPU"))
        assert budgets[:9] == ["CPU", "1/2", "cores", "reserved", "·", "memory", "1.0", "GiB", "/"]
        assert ["Decode/1", f"system={port}", "-"] in [cells(line) for line in lines]
        as_json = json.loads((await cli("resources", "--json", *_url(api))).out)
        assert as_json == await api.connector.get_machine_resources()
