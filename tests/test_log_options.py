"""Replica log options: rotation size, rotated files kept, stopped replicas' files kept.

From ``up``'s flags through ``ConnectorOptions`` to the files circusd writes and the loop
prunes; out-of-range values are refused by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from connector import defaults
from connector.cli.program import build_parser
from connector.cli.up import UpConfig
from connector.errors import InvalidOptions
from connector.local import LocalConnector
from tests.core_helpers import make_graph, options, python_cmd, running, svc, wait_until


def test_up_flags_reach_the_connector_options() -> None:
    args = build_parser().parse_args(
        ["up", "g.yaml", "--log-max-size", "1Mi", "--log-backups", "2", "--keep-stopped-logs", "0"]
    )
    assert (args.log_max_size, args.log_backups, args.keep_stopped_logs) == (1 << 20, 2, 0)
    config = UpConfig(
        graph="g.yaml",
        log_max_bytes=args.log_max_size,
        log_backups=args.log_backups,
        stopped_logs_kept=args.keep_stopped_logs,
    )
    opts = config.options()
    assert (opts.log_max_bytes, opts.log_backups, opts.stopped_logs_kept) == (1 << 20, 2, 0)
    plain = build_parser().parse_args(["up", "g.yaml"])
    assert (plain.log_max_size, plain.log_backups, plain.keep_stopped_logs) == (
        defaults.LOG_MAX_BYTES,
        defaults.LOG_BACKUPS,
        defaults.STOPPED_LOGS_KEPT,
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--log-max-size", "-1", "memory must not be negative"),
        ("--log-backups", "0", "must be > 0, got 0"),
        ("--keep-stopped-logs", "-1", "must be >= 0, got -1"),
    ],
)
def test_up_refuses_out_of_range_log_flags(
    flag: str, value: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args(["up", "g.yaml", flag, value])
    assert exit_.value.code == 2
    assert f"argument {flag}: {message}" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("option", "value", "least"),
    [("log_max_bytes", -1, 0), ("log_backups", 0, 1), ("stopped_logs_kept", -2, 0)],
)
def test_the_library_refuses_out_of_range_log_options_by_name(
    tmp_path: Path, option: str, value: int, least: int
) -> None:
    with pytest.raises(InvalidOptions) as refused:
        LocalConnector("t", make_graph(svc("Decode")), tmp_path, options(**{option: value}))
    assert refused.value.message == f"{option} must be an integer >= {least}, got {value}"
    assert refused.value.details == {option: value}
    assert refused.value.http_status == 422


@pytest.mark.integration
async def test_log_options_decide_rotation_and_what_stays_after_a_stop(tmp_path: Path) -> None:
    # 40 lines of 20 bytes each (57 with the timestamp prefix, 2,280 in all), 20 ms apart:
    # circusd reads them as chunks of a line or a few (a chunk is written whole, after the
    # rotation check).
    talker = python_cmd(
        "import time\nfor i in range(40):\n"
        "    print(f'line {i:03d} ' + 'x' * 10, flush=True); time.sleep(0.02)\n"
        "time.sleep(300)"
    )
    graph = make_graph(svc("Decode", talker))
    opts = {"log_max_bytes": 256, "log_backups": 1, "stopped_logs_kept": 0}
    async with running(graph, tmp_path, **opts) as conn:
        assert conn.reconciler is not None
        conn.reconciler.LOG_PRUNE_S = 0.0
        logs = tmp_path / "logs"
        stdout = logs / "t.decode.1.stdout.log"
        assert await conn.scale_component("Decode", 1, timeout_s=20)
        await wait_until(lambda: "line 039" in stdout.read_text(), limit_s=15)
        # Rotated at 256 bytes (checked before a chunk is written, so a file may pass it by
        # one chunk), one old file kept: the newest lines, in order, the rest gone.
        rotated = logs / "t.decode.1.stdout.log.1"
        assert not (logs / "t.decode.1.stdout.log.2").exists()
        kept = [
            line.split(" | ", 1)[1]
            for line in (rotated.read_text() + stdout.read_text()).splitlines()
        ]
        assert 4 <= len(kept) < 20
        assert kept == [f"line {i:03d} " + "x" * 10 for i in range(40 - len(kept), 40)]
        assert max(stdout.stat().st_size, rotated.stat().st_size) < 1024
        assert await conn.scale_component("Decode", 0, timeout_s=20)
        conn.reconciler.wake()
        # No stopped replica's files are kept.
        await wait_until(lambda: list(logs.iterdir()) == [], limit_s=10)
