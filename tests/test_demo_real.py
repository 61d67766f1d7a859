"""The real demo, as ``make demo`` runs it: ``dynamo-local up examples/dynamo.yaml``.

A plain DynamoGraphDeployment of the real Dynamo 1.6.1 (frontend, mocker prefill and decode
workers, the load-based Planner in virtual mode) must come up under ``up`` with nothing but
the file: a private etcd started for the Planner and announced, every component 1/1 ready,
the instances of both workers registered in that etcd, and a printed ``curl`` that, pasted,
gets a chat answer from the frontend. SIGINT must then stop everything (exit code 0) with
no process of the run left.

The graph is the example file itself, copied next to a tiny model folder in the test's
temporary directory: its ``workingDir: .`` resolves against the file's folder, so its
``--model-path models/tiny-llama`` finds the copy's model and nothing is written into the
repository. ``--port 0`` and a working dir of its own keep it apart from other runs.
"""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil
import pytest

from connector.dynamo.tiny_model import write_tiny_model
from tests.dynamo_helpers import TINY_MODEL_NAME, etcd_prefix, require_dynamo
from tests.test_cli import cli_env

pytestmark = [pytest.mark.integration, pytest.mark.e2e]

ROOT = Path(__file__).resolve().parent.parent
GRAPH = ROOT / "examples" / "dynamo.yaml"
NAMESPACE = "dynamo-demo"  # the graph's dynamoNamespace
SERVING_DEADLINE_S = 90.0
PASTE_RETRIES = 3  # a 503 right after the line, tried again a second later
STOP_DEADLINE_S = 60.0
COMPONENTS = ("Frontend", "Prefill", "Decode", "Planner")
ETCD_LINE = re.compile(
    r"^dynamo-local: started a private etcd at (http://127\.0\.0\.1:\d+) \(data in (.+)\)$"
)
# What a developer's shell may set that would point the run's Dynamo processes elsewhere.
_FOREIGN_ENV = ("DYN_", "ETCD_", "NATS_", "HF_", "TRANSFORMERS_")


def _env() -> dict[str, str]:
    env = cli_env()
    return {k: v for k, v in env.items() if not k.startswith(_FOREIGN_ENV)}


def _get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


def _paste(curl_line: str) -> tuple[int, Any]:
    """Run the printed curl line as curl would (URL, headers, body), with urllib."""
    argv = shlex.split(curl_line)
    assert argv[:2] == ["curl", "-s"], argv
    url = argv[2]
    headers = dict(
        h.split(": ", 1) for flag, h in zip(argv[3::2], argv[4::2], strict=False) if flag == "-H"
    )
    body = argv[argv.index("-d") + 1].encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:  # the frontend's own words, for the failure
        return exc.code, exc.read().decode(errors="replace")


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(procs: list[psutil.Process]) -> list[str]:
    left = []
    for p in procs:
        try:
            # is_running() compares the start time too: a recycled PID is not ours.
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            continue
    return left


@pytest.mark.timeout(240)
async def test_the_real_demo_serves_a_chat_answer_and_stops_clean(tmp_path: Path) -> None:
    require_dynamo()
    if shutil.which("etcd") is None:
        pytest.skip("etcd is not installed (Debian package etcd-server; scripts/setup.sh)")
    write_tiny_model(tmp_path / "models", TINY_MODEL_NAME)
    graph = tmp_path / "dynamo.yaml"
    shutil.copyfile(GRAPH, graph)
    working_dir = tmp_path / "wd"
    stderr_path = tmp_path / "up.stderr"

    started = time.monotonic()
    with stderr_path.open("wb") as stderr:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "connector",
            "up",
            str(graph),
            "--port",
            "0",
            "--working-dir",
            str(working_dir),
            "--log-level",
            "warning",
            stdout=asyncio.subprocess.PIPE,
            stderr=stderr,
            env=_env(),
            cwd=tmp_path,  # any directory: the graph finds its model through workingDir
        )
    assert proc.stdout is not None
    lines: list[str] = []

    def why() -> str:
        tail = "\n".join(stderr_path.read_text(errors="replace").splitlines()[-30:])
        return f"stdout so far: {lines}\nstderr tail:\n{tail}"

    procs: list[psutil.Process] = []
    try:
        curl = None
        while curl is None:
            left = SERVING_DEADLINE_S - (time.monotonic() - started)
            assert left > 0, f"no curl line within {SERVING_DEADLINE_S:g} s; {why()}"
            raw = await asyncio.wait_for(proc.stdout.readline(), left)
            assert raw, f"up exited (code {await proc.wait()}) before serving; {why()}"
            lines.append(raw.decode().rstrip("\n"))
            if lines[-1].strip().startswith("curl -s "):
                curl = lines[-1].strip()
        serving_s = time.monotonic() - started

        etcd_lines = [m for m in map(ETCD_LINE.match, lines) if m]
        assert len(etcd_lines) == 1, why()
        etcd_url, data_dir = etcd_lines[0].groups()
        assert Path(data_dir) == working_dir / "etcd" / "data"
        api = next(line.split()[1] for line in lines if line.strip().startswith("API"))

        # The line is printed once the frontend lists the model; its router can learn of
        # the workers' instances a moment later (once in CI a paste made within
        # milliseconds got 503): a person pasting it is answered, so is a paste a second on.
        status, answer = await asyncio.to_thread(_paste, curl)
        for _ in range(PASTE_RETRIES):
            if status != 503:
                break
            await asyncio.sleep(1.0)
            status, answer = await asyncio.to_thread(_paste, curl)
        assert status == 200, answer
        content = answer["choices"][0]["message"]["content"]
        assert isinstance(content, str) and content.strip(), answer
        assert answer["model"] == TINY_MODEL_NAME

        components = (await asyncio.to_thread(_get_json, f"{api}/components"))["components"]
        assert {
            c["name"]: f"{c['replicas']['ready']}/{c['replicas']['desired']}" for c in components
        } == dict.fromkeys(COMPONENTS, "1/1")

        for component in ("backend", "prefill"):  # Decode and Prefill, as Dynamo names them
            keys = await asyncio.to_thread(
                etcd_prefix, etcd_url, f"v1/instances/{NAMESPACE}/{component}/generate/"
            )
            assert len(keys) == 1, (component, sorted(keys))

        # Every process of the run, collected before the signal: up's own tree (the etcd is
        # its child), circusd's tree (the replicas and whatever they started) and the etcd.
        state = json.loads((working_dir / "state.json").read_text())
        record = json.loads((working_dir / "etcd" / "etcd.json").read_text())
        for pid in (proc.pid, state["circusd"]["pid"], record["pid"]):
            procs += _tree(pid)
        replica_pids = {
            r["pid"]
            for name in COMPONENTS
            for r in (await asyncio.to_thread(_get_json, f"{api}/components/{name}"))["replicas"]
        }
        assert replica_pids <= {p.pid for p in procs}, (replica_pids, procs)
        assert record["pid"] in {p.pid for p in procs}
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
    code = await asyncio.wait_for(proc.wait(), STOP_DEADLINE_S)
    rest = (await proc.stdout.read()).decode().splitlines()
    assert code == 0, why()
    assert "dynamo-local: SIGINT received, shutting down" in rest, rest
    assert rest[-1] == "dynamo-local: stopped", rest
    deadline = time.monotonic() + 10  # processes already gone; a last reap may lag
    while _alive(procs) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert _alive(procs) == [], "left running after up exited"
    assert not (working_dir / "etcd" / "etcd.json").exists()
    assert not (working_dir / "etcd" / "data").exists()
    print(f"serving after {serving_s:.1f} s; {len(procs)} processes, all stopped")
