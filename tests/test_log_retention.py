"""Stopped replicas' log files: the newest few per component stay, older ones go.

A replica's files outlive it (for a look after a crash or a scale-down), but not every
replica's ever: ordinals are never reused, so a graph scaled up and down all day would
leave two files (and their rotations) per replica it ever started.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector.supervision.logs import LogPolicy, stopped_log_files
from tests.core_helpers import make_graph, running, svc, wait_until


def _files(watcher: str, *suffixes: str) -> list[str]:
    return [f"{watcher}.{suffix}" for suffix in suffixes]


def test_stopped_log_files_keeps_the_newest_stopped_of_each_component() -> None:
    both = ("stdout.log", "stderr.log")
    names = [
        *_files("t.decode.1", *both, "stdout.log.1", "stdout.log.2"),
        *_files("t.decode.2", *both),
        *_files("t.decode.3", *both),
        *_files("t.decode.10", *both),  # ordinals compare as numbers, not text
        *_files("t.decode.11", *both),  # live
        *_files("t.prefill.1", *both),
        *_files("other.decode.1", *both),  # another namespace's
        "t.decode.x.stdout.log",  # no ordinal: not a replica's
        "notes.txt",
        "t.decode.4.stdout.log.old",
    ]
    doomed = stopped_log_files(names, "t.", {"t.decode.11"}, keep=2)
    assert doomed == sorted(
        [
            *_files("t.decode.1", *both, "stdout.log.1", "stdout.log.2"),
            *_files("t.decode.2", *both),
        ]
    )
    assert stopped_log_files(names, "t.", {"t.decode.11"}, keep=0) == sorted(
        [
            *_files("t.decode.1", *both, "stdout.log.1", "stdout.log.2"),
            *_files("t.decode.2", *both),
            *_files("t.decode.3", *both),
            *_files("t.decode.10", *both),
            *_files("t.prefill.1", *both),
        ]
    )
    assert stopped_log_files(names, "t.", set(), keep=16) == []


@pytest.mark.integration
async def test_scaling_up_and_down_keeps_live_and_newest_stopped_logs_only(
    tmp_path: Path,
) -> None:
    graph = make_graph(svc("Decode"), svc("Prefill"))
    async with running(graph, tmp_path) as conn:
        reconciler = conn.reconciler
        assert reconciler is not None
        reconciler.log_policy = LogPolicy(stopped_kept=2)
        reconciler.LOG_PRUNE_S = 0.0
        logs = tmp_path / "logs"
        await conn.scale_component("Prefill", 1, timeout_s=20)
        for _ in range(3):  # Decode/1-3, /4-6, /7-9 started and stopped
            assert await conn.scale_component("Decode", 3, timeout_s=20)
            assert await conn.scale_component("Decode", 0, timeout_s=20)
        assert await conn.scale_component("Decode", 2, timeout_s=20)  # Decode/10, /11
        reconciler.wake()

        def left() -> list[str]:
            return sorted(p.name for p in logs.iterdir())

        expected = sorted(
            f"t.{name}.{stream}.log"
            for name in ("decode.8", "decode.9", "decode.10", "decode.11", "prefill.1")
            for stream in ("stdout", "stderr")
        )
        await wait_until(lambda: left() == expected, limit_s=10)
        # Nothing more goes while nothing stops.
        reconciler.wake()
        await conn.scale_component("Prefill", 1, timeout_s=20)
        assert left() == expected
