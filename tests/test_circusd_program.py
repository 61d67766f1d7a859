"""The circusd the connector runs: Circus's daemon, spawning with no Python preexec (vfork).

What a replica gets must not change with the faster spawn: stdin on /dev/null, a session
of its own, exactly the env and working dir asked for, stdout and stderr through Circus's
streams. A watcher that needs Circus's preexec (a closed stdout here) still gets it.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import psutil
import pytest

from connector.supervision import circusd_program
from connector.supervision.circus import CircusChannel, start_circusd, stop_circusd
from connector.supervision.circusd_program import VforkProcess
from connector.supervision.logs import LogPolicy, circus_stream_options, log_paths
from tests.core_helpers import wait_until


def _session_of(pid: int) -> int:
    # /proc/<pid>/stat: "pid (comm) state ppid pgrp session ..."; comm may hold spaces.
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[3])


def _environ_of(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().decode()
    return dict(item.split("=", 1) for item in raw.split("\0") if item)


@pytest.mark.integration
async def test_a_replica_spawned_without_preexec_gets_what_circus_preexec_gave(
    tmp_path: Path,
) -> None:
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    logs = log_paths(tmp_path, "t.w.1")
    env = {"PATH": os.environ["PATH"], "ONLY_THIS": "1"}
    work = tmp_path / "work"
    work.mkdir()
    try:
        assert "connector.supervision.circusd_program" in psutil.Process(info.pid).cmdline()
        reply = await channel.call(
            "add",
            name="t.w.1",
            cmd="sh",
            args=["-c", "echo to-out; echo to-err >&2; exec sleep 300"],
            start=True,
            waiting=True,
            options={
                "env": env,
                "copy_env": False,
                "respawn": False,
                "close_child_stdin": True,
                "working_dir": str(work),
                **circus_stream_options(logs, LogPolicy()),
            },
        )
        pid = int(reply["started"][0])
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/1").startswith("pipe:")
        assert os.readlink(f"/proc/{pid}/fd/2").startswith("pipe:")
        assert _session_of(pid) == pid  # setsid: a session (and group) of its own
        assert os.readlink(f"/proc/{pid}/cwd") == str(work)
        # Once sh has exec'd sleep (before, the environ read is sh's own, as given): sh
        # exports PWD; nothing else is added.
        await wait_until(lambda: Path(f"/proc/{pid}/comm").read_text() == "sleep\n")
        assert _environ_of(pid) == {**env, "PWD": str(work)}
        await wait_until(
            lambda: all(Path(p).exists() and Path(p).read_text() for p in logs.values()),
            limit_s=10,
        )
        assert Path(logs["stdout"]).read_text().endswith(f"[{pid}] | to-out\n")
        assert Path(logs["stderr"]).read_text().endswith(f"[{pid}] | to-err\n")
    finally:
        await stop_circusd(info, channel)
        channel.close()


@pytest.mark.integration
async def test_a_watcher_that_needs_circus_preexec_still_gets_it(tmp_path: Path) -> None:
    # A closed stdout is one of the things only Circus's preexec does (dup2 of /dev/null
    # in the child); resource limits would be another, but Circus 0.19's add command
    # cannot take them (it validates them as ints, then takes their len()).
    info = await start_circusd(tmp_path / "circus")
    channel = CircusChannel(info.endpoint)
    try:
        reply = await channel.call(
            "add",
            name="t.w.1",
            cmd="sleep",
            args=["300"],
            start=True,
            waiting=True,
            options={"respawn": False, "close_child_stdout": True},
        )
        pid = int(reply["started"][0])
        assert os.readlink(f"/proc/{pid}/fd/1") == "/dev/null"
        assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
        assert _session_of(pid) == pid
    finally:
        await stop_circusd(info, channel)
        channel.close()


class _Recorder:
    """Stands in for ``Popen``: records the keyword arguments of the one spawn."""

    calls: list[dict[str, Any]]

    def __init__(self) -> None:
        self.calls = []

    def __call__(self, args: Any, **kwargs: Any) -> object:
        self.calls.append(kwargs)
        return object()


def _process(**options: Any) -> VforkProcess:
    return VforkProcess("t.w.1", 1, "sleep", args=["300"], spawn=False, **options)


def test_the_connector_spawn_hands_popen_no_preexec(monkeypatch: pytest.MonkeyPatch) -> None:
    # CPython starts a child with vfork() only when there is no preexec_fn: this is what
    # makes the spawn cheap, so it is pinned here.
    popen = _Recorder()
    monkeypatch.setattr(circusd_program, "Popen", popen)
    _process(env={"A": "1"}, working_dir="/").spawn()
    assert len(popen.calls) == 1
    kwargs = popen.calls[0]
    assert "preexec_fn" not in kwargs
    assert kwargs["start_new_session"] is True
    assert kwargs["stdin"] == subprocess.DEVNULL
    assert (kwargs["stdout"], kwargs["stderr"]) == (subprocess.PIPE, subprocess.PIPE)
    assert kwargs["close_fds"] is True
    assert (kwargs["env"], kwargs["cwd"]) == ({"A": "1"}, "/")


@pytest.mark.parametrize(
    "options",
    [
        {"rlimits": {"nofile": 100}},
        {"close_child_stdout": True},
        {"close_child_stderr": True},
        {"uid": os.getuid() or 1},
    ],
    ids=["rlimits", "closed-stdout", "closed-stderr", "uid"],
)
def test_what_only_circus_preexec_does_goes_through_circus_spawn(
    monkeypatch: pytest.MonkeyPatch, options: dict[str, Any]
) -> None:
    ours, circus_own = _Recorder(), _Recorder()
    monkeypatch.setattr(circusd_program, "Popen", ours)
    monkeypatch.setattr("circus.process.Popen", circus_own)
    _process(**options).spawn()
    assert ours.calls == []
    assert len(circus_own.calls) == 1
    assert callable(circus_own.calls[0]["preexec_fn"])
