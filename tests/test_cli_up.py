"""``dynamo-local up`` as a real foreground process: it serves the API, /metrics and the
status page, and SIGINT, SIGTERM or ``dynamo-local down`` stop it with no process left."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import psutil
import pytest

from tests.test_cli import cli, cli_env
from tests.test_resources import bindable

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent

GRAPH = """\
apiVersion: nvidia.com/v1alpha1
kind: DynamoGraphDeployment
metadata: {name: uptest}
spec:
  services:
    Front:
      componentType: frontend
      replicas: 1
      extraPodSpec: {mainContainer: {command: [sleep, "300"]}}
      local:
        maxReplicas: 1
        readiness: {process: {startupGraceSeconds: 0.2}}
        gracefulStopSeconds: 2
    Work:
      componentType: worker
      subComponentType: decode
      replicas: 1
      extraPodSpec: {mainContainer: {command: ["{python}", "-c", "import time; time.sleep(300)"]}}
      local:
        maxReplicas: 3
        ports: [{name: system, env: DYN_SYSTEM_PORT}]
        readiness: {process: {startupGraceSeconds: 0.2}}
        gracefulStopSeconds: 2
"""


@dataclass
class Up:
    proc: asyncio.subprocess.Process
    url: str
    working_dir: Path
    lines: list[str]

    async def rest_of_output(self) -> list[str]:
        assert self.proc.stdout is not None
        rest = await asyncio.wait_for(self.proc.stdout.read(), 60)
        return self.lines + rest.decode().splitlines()


def _graph(tmp_path: Path) -> Path:
    path = tmp_path / "graph.yaml"
    path.write_text(GRAPH)
    return path


async def start_up(tmp_path: Path, *extra: str, env: dict[str, str] | None = None) -> Up:
    working_dir = tmp_path / "wd"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "connector",
        "up",
        str(_graph(tmp_path)),
        "--port",
        "0",
        "--working-dir",
        str(working_dir),
        "--discovery",
        "none",
        "--gpu-backend",
        "none",
        "--log-level",
        "warning",
        *extra,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env or cli_env(),
        cwd=ROOT,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    url = None
    while url is None or not lines[-1].strip().startswith("Ctrl-C"):
        raw = await asyncio.wait_for(proc.stdout.readline(), 60)
        if not raw:
            assert proc.stderr is not None
            err = (await proc.stderr.read()).decode()
            raise AssertionError(f"up exited early: {lines} {err}")
        lines.append(raw.decode().rstrip("\n"))
        if lines[-1].strip().startswith("API"):
            url = lines[-1].split()[1].removesuffix("/v1")
    return Up(proc, url, working_dir, lines)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def _wait_ready(http: aiohttp.ClientSession, url: str, component: str, n: int) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        async with http.get(f"{url}/v1/components/{component}/replicas") as resp:
            body = await resp.json()
        if body["ready"] == n == body["desired"]:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{component} not at {n} ready replicas")


def _our_processes(working_dir: Path, pids: set[int]) -> list[str]:
    """Processes still alive that belong to this run: known pids, or anything whose
    command line names the working dir (circusd, its config)."""
    left = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        try:
            if proc.info["status"] == psutil.STATUS_ZOMBIE:
                continue
            cmdline = " ".join(proc.info["cmdline"] or [])
        except psutil.Error:
            continue
        if proc.info["pid"] in pids or str(working_dir) in cmdline:
            left.append(f"{proc.info['pid']} {cmdline}")
    return left


async def _pids(http: aiohttp.ClientSession, url: str, working_dir: Path) -> set[int]:
    pids: set[int] = set()
    for name in ("Front", "Work"):
        async with http.get(f"{url}/v1/components/{name}") as resp:
            body = await resp.json()
        pids |= {r["pid"] for r in body["replicas"] if r["pid"]}
    state = json.loads((working_dir / "state.json").read_text())
    pids.add(state["circusd"]["pid"])
    return pids


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_up_serves_then_a_signal_stops_everything(
    tmp_path: Path, http: aiohttp.ClientSession, sig: signal.Signals
) -> None:
    up = await start_up(tmp_path)
    try:
        assert up.lines[0] == (
            f"dynamo-local: graph 'uptest' (2 components) in namespace 'uptest', "
            f"working dir {up.working_dir}"
        )
        assert [line.split()[0] for line in up.lines[1:]] == [
            "API",
            "metrics",
            "status",
            "Ctrl-C",
        ]
        assert f"{up.url}/metrics" in up.lines[2] and f"{up.url}/" in up.lines[3]
        await _wait_ready(http, up.url, "Work", 1)
        scaled = await cli("scale", "Work", "3", "--wait", "--url", up.url)
        assert scaled.code == 0, scaled.err
        async with http.get(up.url + "/metrics") as resp:
            assert resp.status == 200
            assert "dynamo_local_" in await resp.text()
        async with http.get(up.url + "/") as resp:
            assert resp.status == 200 and resp.content_type == "text/html"
        # Front starts beside Work, on its own task: Work being ready says nothing of it.
        await _wait_ready(http, up.url, "Front", 1)
        pids = await _pids(http, up.url, up.working_dir)
        assert len(pids) == 5  # 4 replicas and circusd
    finally:
        if up.proc.returncode is None:
            up.proc.send_signal(sig)
    assert await asyncio.wait_for(up.proc.wait(), 60) == 0
    output = await up.rest_of_output()
    assert f"dynamo-local: {sig.name} received, shutting down" in output
    assert "dynamo-local: stopping 4 replica(s)" in output
    assert output[-1] == "dynamo-local: stopped"
    assert _our_processes(up.working_dir, pids) == []


async def test_up_hands_out_ports_from_the_range_it_is_given(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    # Below Dynamo's 32767 limit, and away from the default range other tests use.
    # Thirteen ports: the frontend's default `http`, and each of three workers' `system`
    # (declared) plus its default `rpc`, `fpm` and `nixl` (connector.graph.dynamo_defaults).
    first = next(p for p in range(30000, 32760, 13) if all(bindable(p + i) for i in range(13)))
    last = first + 12
    up = await start_up(tmp_path, "--port-range", f"{first}-{last}", "--release-timeout", "5")
    try:
        scaled = await cli("scale", "Work", "3", "--wait", "--url", up.url)
        assert scaled.code == 0, scaled.err
        async with http.get(up.url + "/v1/resources") as resp:
            body = await resp.json()
        assert body["port_range"] == [first, last]
        held = body["ports"]
        assert {r: sorted(p) for r, p in held.items()} == {
            "Front/1": ["http"],
            "Work/1": ["fpm", "nixl", "rpc", "system"],
            "Work/2": ["fpm", "nixl", "rpc", "system"],
            "Work/3": ["fpm", "nixl", "rpc", "system"],
        }
        numbers = sorted(n for ports in held.values() for n in ports.values())
        assert numbers == list(range(first, last + 1))
    finally:
        up.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.proc.wait(), 60) == 0


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--port-range", "2000", "must look like 20000-29999, got '2000'"),
        (
            "--port-range",
            "30000-40000",
            "must be LOW-HIGH with 1024 <= LOW <= HIGH <= 32767 (Dynamo reads ports as signed "
            "16-bit numbers), got '30000-40000'",
        ),
        (
            "--gpu-foreign-threshold",
            "lots",
            "invalid quantity 'lots': expected a number with an optional suffix (Ki, Mi, Gi, "
            "Ti, Pi, Ei, n, u, m, k, M, G, T, P, E), e.g. '512Mi'",
        ),
        ("--release-timeout", "0", "must be > 0, got 0"),
    ],
)
async def test_up_resource_flags_refuse_bad_values_with_exit_2(
    tmp_path: Path, flag: str, value: str, message: str
) -> None:
    result = await cli("up", str(_graph(tmp_path)), flag, value)
    assert result.code == 2
    assert result.err.strip().splitlines()[-1].endswith(f"argument {flag}: {message}")


async def test_down_stops_a_running_up(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    env = cli_env(DYNAMO_LOCAL_TOKEN="up-token")
    up = await start_up(tmp_path, "--auth-all", env=env)
    try:
        assert up.lines[-2].split() == [
            "auth",
            "bearer",
            "token",
            "required",
            "on",
            "every",
            "route",
        ]
        async with http.get(up.url + "/v1/components") as resp:
            assert resp.status == 401
        listing = await cli("ps", "--json", "--url", up.url, env=env)
        assert listing.code == 0, listing.err
        assert [c["name"] for c in json.loads(listing.out)["components"]] == ["Front", "Work"]
        refused = await cli("down", "--url", up.url)
        assert refused.code == 1  # no token: the server keeps running
        down = await cli("down", "--url", up.url, env=env)
        assert down.code == 0, down.err
        assert down.err.splitlines()[-1] == "dynamo-local: stopped"
        # `down` returns once every replica is gone; the process exits right after.
        assert await asyncio.wait_for(up.proc.wait(), 30) == 0
    finally:
        if up.proc.returncode is None:
            up.proc.send_signal(signal.SIGINT)
    assert await asyncio.wait_for(up.proc.wait(), 60) == 0
    assert (await up.rest_of_output())[-1] == "dynamo-local: stopped"
    assert _our_processes(up.working_dir, set()) == []


async def test_up_refuses_a_public_address_without_a_token(tmp_path: Path) -> None:
    result = await cli("up", str(_graph(tmp_path)), "--host", "0.0.0.0", "--port", "0")
    assert result.code == 2
    assert result.err.strip() == (
        "dynamo-local: error: refusing to listen on 0.0.0.0: the API can scale and stop "
        "processes, so a non-loopback address needs a token (--token or DYNAMO_LOCAL_TOKEN); "
        "or listen on 127.0.0.1 and reach it through an SSH tunnel"
    )


async def test_up_with_a_missing_graph_is_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    result = await cli("up", str(missing), "--port", "0", "--working-dir", str(tmp_path / "w"))
    assert result.code == 1
    assert "Traceback" not in result.err
    last = result.err.strip().splitlines()[-1]
    assert last.startswith("dynamo-local: error: ") and "nope.yaml" in last


async def test_up_on_a_busy_port_says_so(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = await cli(
            "up",
            str(_graph(tmp_path)),
            "--port",
            str(port),
            "--working-dir",
            str(tmp_path / "w"),
            "--discovery",
            "none",
            "--gpu-backend",
            "none",
        )
    assert result.code == 1
    assert result.err.strip().splitlines()[-1] == (
        f"dynamo-local: error: cannot listen on 127.0.0.1:{port}: Address already in use"
    )
    assert _our_processes(tmp_path / "w", set()) == []
