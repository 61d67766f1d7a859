"""The private etcd ``dynamo-local up`` runs for a graph that needs one (Debian's etcd).

It must serve on loopback within a second, record itself, be adopted (not restarted) by the
next start in the same folder while it still serves (a killed ``up`` left it for the
replicas that outlive it), start on empty data when its record names a process that is
gone, and be stopped by PID with its data removed. Without an ``etcd`` program, ``up``
fails with one line naming the Debian package and ``--etcd-url``, before starting anything.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import psutil
import pytest

from connector.dynamo.private_etcd import PACKAGE, EtcdNotInstalled, PrivateEtcd
from tests.test_cli import cli_env

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent


def _require_etcd() -> None:
    if shutil.which("etcd") is None:
        pytest.skip(f"etcd is not installed (Debian package {PACKAGE}; scripts/setup.sh)")


def _healthy(url: str) -> bool:
    with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
        return bool(json.loads(resp.read())["health"] == "true")


def _put_get(url: str, key: str, value: str) -> str:
    def post(path: str, body: dict[str, str]) -> dict[str, object]:
        request = urllib.request.Request(
            f"{url}{path}", data=json.dumps(body).encode(), method="POST"
        )
        with urllib.request.urlopen(request, timeout=2) as resp:
            answer: dict[str, object] = json.loads(resp.read())
            return answer

    b64 = base64.b64encode
    post("/v3/kv/put", {"key": b64(key.encode()).decode(), "value": b64(value.encode()).decode()})
    got = post("/v3/kv/range", {"key": b64(key.encode()).decode()})
    kvs = got.get("kvs")
    assert isinstance(kvs, list)
    return base64.b64decode(kvs[0]["value"]).decode() if kvs else ""


async def test_start_adopt_and_stop_by_pid(tmp_path: Path) -> None:
    _require_etcd()
    root = tmp_path / "etcd"
    first = PrivateEtcd(root)
    started = time.monotonic()
    url = await first.start()
    assert time.monotonic() - started < 5
    try:
        assert url.startswith("http://127.0.0.1:") and _healthy(url)
        assert first.pid is not None and not first.reused
        proc = psutil.Process(first.pid)
        assert proc.name() == "etcd"
        # Its own session: a terminal's Ctrl-C (sent to up's process group) misses it.
        assert os.getsid(proc.pid) == proc.pid
        record = json.loads((root / "etcd.json").read_text())
        assert (record["pid"], record["url"]) == (first.pid, url)
        assert _put_get(url, "k", "v") == "v"

        # A killed `up` left it serving: the next start in the same folder adopts it, data
        # and all, instead of starting a second one.
        second = PrivateEtcd(root)
        assert await second.start() == url
        assert second.reused and second.pid == first.pid
        assert _put_get(url, "k", "v") == "v"
        await second.stop()
        assert _zombie_or_gone(first.pid)  # a zombie until its parent (this test) reaps it
        assert not (root / "etcd.json").exists()
        assert not (root / "data").exists()
    finally:
        await first.stop()  # reaps our child; a no-op when already stopped


def _zombie_or_gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_record_of_a_dead_server_starts_afresh_on_empty_data(tmp_path: Path) -> None:
    _require_etcd()
    root = tmp_path / "etcd"
    (root / "data").mkdir(parents=True)
    (root / "data" / "stale").write_text("from a previous run")
    # A PID that is certainly not an etcd started at that time.
    (root / "etcd.json").write_text(
        json.dumps({"pid": 1, "create_time": 1.0, "url": "http://127.0.0.1:9"})
    )
    etcd = PrivateEtcd(root)
    try:
        url = await etcd.start()
        assert not etcd.reused and etcd.pid != 1 and _healthy(url)
        assert not (root / "data" / "stale").exists()
        assert json.loads((root / "etcd.json").read_text())["pid"] == etcd.pid
    finally:
        await etcd.stop()


async def test_no_etcd_program_is_named_with_its_package(tmp_path: Path) -> None:
    etcd = PrivateEtcd(tmp_path / "etcd", binary="etcd-that-is-not-installed")
    with pytest.raises(EtcdNotInstalled, match=r"Debian package etcd-server"):
        await etcd.start()
    await etcd.stop()  # nothing to stop: still fine


def test_up_without_etcd_fails_with_one_line_naming_package_and_flag(tmp_path: Path) -> None:
    empty = tmp_path / "bin"
    empty.mkdir()
    work = tmp_path / "wd"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "connector",
            "up",
            str(ROOT / "examples" / "dynamo.yaml"),
            *("--port", "0", "--working-dir", str(work), "--gpu-backend", "none"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=cli_env(PATH=str(empty)),  # no etcd (nor anything else) on PATH
    )
    assert result.returncode == 1, result
    assert result.stdout == ""
    assert result.stderr.strip() == (
        "dynamo-local: error: graph 'dynamo-demo' has a Planner (service Planner), which needs "
        "etcd, and etcd is not installed (no 'etcd' on PATH; Debian package etcd-server): "
        "install it (apt-get install etcd-server) or pass --etcd-url URL"
    )
    assert not (work / "state.json").exists()  # nothing was started
