"""Reading replica logs: tails, rotation, merging, and never outside the log folder."""

from __future__ import annotations

import asyncio
from pathlib import Path

from connector.supervision.logs import (
    LogFileMaker,
    create_log_files,
    log_paths,
    merge_newest,
    read_replica_lines,
    tail_lines,
)


def test_tail_lines_reads_only_the_end(tmp_path: Path) -> None:
    path = tmp_path / "a.log"
    path.write_text("".join(f"line {i}\n" for i in range(100_000)))
    assert tail_lines(path, 3) == ["line 99997", "line 99998", "line 99999"]
    assert tail_lines(path, 0) == []
    assert tail_lines(tmp_path / "missing.log", 5) == []


def test_rotated_files_are_read_newest_last(tmp_path: Path) -> None:
    base = tmp_path / "r.stdout.log"
    (tmp_path / "r.stdout.log.2").write_text("a\nb\n")
    (tmp_path / "r.stdout.log.1").write_text("c\nd\n")
    base.write_text("e\n")
    assert read_replica_lines(tmp_path, base, 4) == ["b", "c", "d", "e"]
    assert read_replica_lines(tmp_path, base, 10) == ["a", "b", "c", "d", "e"]


def test_paths_outside_the_log_folder_are_never_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("password\n")
    logs = tmp_path / "logs"
    logs.mkdir()
    assert read_replica_lines(logs, secret, 10) == []
    assert read_replica_lines(logs, logs / ".." / "secret.txt", 10) == []


def test_merge_orders_by_timestamp_and_prefixes_replica() -> None:
    a = ["2026-01-01T00:00:01.000000 [1] | a1", "2026-01-01T00:00:03.000000 [1] | a3"]
    b = ["2026-01-01T00:00:02.000000 [2] | b2"]
    merged = merge_newest([("D/1", a), ("D/2", b)], 2)
    assert merged == [
        "[D/2] 2026-01-01T00:00:02.000000 [2] | b2",
        "[D/1] 2026-01-01T00:00:03.000000 [1] | a3",
    ]


def test_the_stream_class_circusd_loads_by_name_is_importable_by_that_name() -> None:
    """circusd imports the stream class from the dotted path in the watcher options, in its
    own process: a module move that forgets the string would only show as replicas without
    logs. Resolve it the way circus does (module path, then attribute)."""
    import importlib

    from circus.stream import FileStream

    from connector.supervision.logs import LogPolicy, circus_stream_options

    options = circus_stream_options({"stdout": "o.log", "stderr": "e.log"}, LogPolicy())
    for stream in ("stdout", "stderr"):
        module, _, name = options[f"{stream}_stream"]["class"].rpartition(".")
        cls = getattr(importlib.import_module(module), name)
        assert issubclass(cls, FileStream), cls


def test_create_log_files_makes_missing_files_and_keeps_existing_ones(tmp_path: Path) -> None:
    # The connector creates a replica's files before circusd opens them (creation is the
    # costly part of circusd's open): a restart must not truncate what the replica wrote.
    paths = log_paths(tmp_path, "ns.worker.3")
    Path(paths["stdout"]).write_text("kept line\n")
    create_log_files(paths)
    assert Path(paths["stdout"]).read_text() == "kept line\n"
    assert Path(paths["stderr"]).read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "ns.worker.3.stderr.log",
        "ns.worker.3.stdout.log",
    ]


async def test_log_file_maker_makes_a_moment_of_spawns_files_in_one_thread_hop(
    tmp_path: Path,
) -> None:
    log_dir = tmp_path / "logs"  # missing: made on the first request
    maker = LogFileMaker(log_dir)
    paths = [log_paths(log_dir, f"ns.worker.{i}") for i in range(40)]
    await asyncio.gather(*(maker.make(p) for p in paths))
    assert maker.hops == 1
    assert len(list(log_dir.iterdir())) == 80
    await maker.make(log_paths(log_dir, "ns.worker.40"))
    assert maker.hops == 2
    assert len(list(log_dir.iterdir())) == 82


async def test_log_file_maker_fails_only_the_request_whose_file_cannot_be_made(
    tmp_path: Path,
) -> None:
    maker = LogFileMaker(tmp_path)
    good, bad = log_paths(tmp_path, "ns.worker.1"), log_paths(tmp_path, "ns.worker.2")
    Path(bad["stderr"]).mkdir()  # a folder where the file goes
    results = await asyncio.gather(maker.make(good), maker.make(bad), return_exceptions=True)
    assert results[0] is None
    assert isinstance(results[1], IsADirectoryError)
    assert results[1].filename == bad["stderr"]
    assert Path(good["stdout"]).is_file() and Path(good["stderr"]).is_file()
    assert maker.hops == 1
