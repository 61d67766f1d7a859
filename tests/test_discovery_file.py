"""File discovery (Dynamo's ``DYN_FILE_KV``) on a real directory with real inotify."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest

from connector.dynamo.discovery import file as discovery_file
from connector.dynamo.discovery.cache import Instance
from connector.dynamo.discovery.file import FileDiscovery
from connector.dynamo.discovery.keys import encode_value, file_path, instance_key, instance_value


def write_instance(root: Path, iid: int, port: int, comp: str = "backend") -> str:
    key = instance_key("ns", comp, "generate", iid)
    path = file_path(root, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name("." + path.name + ".tmp")
    tmp.write_bytes(encode_value(instance_value("ns", comp, "generate", iid, "127.0.0.1", port)))
    os.replace(tmp, path)  # atomic, as a careful writer does
    return key


async def until(cond: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met before the deadline"
        await asyncio.sleep(0.01)


@pytest.fixture
async def disc(tmp_path: Path) -> AsyncIterator[FileDiscovery]:
    # A one-minute poll: anything seen within the test was seen through inotify.
    d = FileDiscovery(tmp_path / "kv", poll_s=60)
    await d.start()
    yield d
    await d.close()


async def test_start_creates_the_directory_and_watches_it(disc: FileDiscovery) -> None:
    assert disc.dir.is_dir()
    assert disc.inotify_active
    assert await disc.healthy()
    assert disc.instances() == []


async def test_registration_is_seen_by_inotify_not_by_polling(disc: FileDiscovery) -> None:
    events: list[tuple[str, str]] = []
    disc.subscribe(lambda kind, inst: events.append((kind, inst.key)))
    waiter = asyncio.create_task(disc.wait_for(lambda i: i.instance_id == 0xBEEF, timeout=5))
    await asyncio.sleep(0)
    started = time.monotonic()
    key = await asyncio.to_thread(write_instance, disc.root, 0xBEEF, 24001)
    inst = await waiter
    elapsed = time.monotonic() - started
    assert inst is not None
    assert (inst.key, inst.instance_id, inst.address, inst.backend) == (
        "v1/instances/ns/backend/generate/beef",
        0xBEEF,
        ("127.0.0.1", 24001),
        "file",
    )
    assert elapsed < 0.5, f"seen after {elapsed:.3f} s"
    assert events == [("put", key)]  # the temp file never showed up as an instance

    started = time.monotonic()
    file_path(disc.root, key).unlink()
    await until(lambda: disc.instances() == [])
    assert time.monotonic() - started < 0.5
    assert events == [("put", key), ("delete", key)]


async def test_existing_entries_are_listed_at_start(tmp_path: Path) -> None:
    root = tmp_path / "kv"
    k1 = write_instance(root, 0x1, 24001)
    k2 = write_instance(root, 0x2, 24002, comp="prefill")
    (root / "v1" / "instances" / "README").write_text("not an instance")
    d = FileDiscovery(root, poll_s=60)
    await d.start()
    try:
        assert [i.key for i in d.instances()] == sorted([k1, k2])
    finally:
        await d.close()


async def test_remove_deletes_the_file_at_once(disc: FileDiscovery) -> None:
    key = write_instance(disc.root, 0x77, 24077)
    inst = await disc.wait_for(lambda i: i.key == key, timeout=5)
    assert inst is not None
    events: list[str] = []
    disc.subscribe(lambda kind, i: events.append(kind))
    await disc.remove(inst)
    assert not file_path(disc.root, key).exists()
    assert disc.instances() == []
    await asyncio.sleep(0.05)  # the inotify echo of our own delete adds nothing
    assert events == ["delete"]


async def test_rewritten_value_is_a_put_and_torn_write_keeps_previous(
    disc: FileDiscovery,
) -> None:
    key = write_instance(disc.root, 0x5, 24005)
    await until(lambda: len(disc.instances()) == 1)
    write_instance(disc.root, 0x5, 24105)  # same key, new port
    await until(lambda: disc.instances()[0].address == ("127.0.0.1", 24105))
    file_path(disc.root, key).write_bytes(b'{"type": "Endp')  # garbage, closed
    await asyncio.sleep(0.1)
    [inst] = disc.instances()
    assert inst.address == ("127.0.0.1", 24105)


async def test_directory_removed_and_recreated_is_watched_again(tmp_path: Path) -> None:
    d = FileDiscovery(tmp_path / "kv", poll_s=0.05)
    await d.start()
    try:
        write_instance(d.root, 0x1, 24001)
        await until(lambda: len(d.instances()) == 1)
        # Moved away (atomic, unlike rmtree, which would race the re-creation).
        await asyncio.to_thread(os.rename, d.root / "v1", tmp_path / "old-v1")
        await until(lambda: d.instances() == [])
        await until(lambda: d.inotify_active and d.dir.is_dir())
        started = time.monotonic()
        write_instance(d.root, 0x2, 24002)
        found = await d.wait_for(lambda i: i.instance_id == 0x2, timeout=5)
        assert found is not None
        assert time.monotonic() - started < 0.5
    finally:
        await d.close()


async def test_polls_when_inotify_is_unavailable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_inotify() -> None:
        raise OSError(38, "Function not implemented")

    monkeypatch.setattr(discovery_file, "Inotify", no_inotify)
    d = FileDiscovery(tmp_path / "kv", poll_s=60, poll_without_inotify_s=0.02)
    await d.start()
    try:
        assert not d.inotify_active
        write_instance(d.root, 0x9, 24009)
        inst: Instance | None = await d.wait_for(lambda i: i.instance_id == 0x9, timeout=5)
        assert inst is not None
        file_path(d.root, inst.key).unlink()
        await until(lambda: d.instances() == [])
    finally:
        await d.close()
    assert not await d.healthy()


async def test_registered_at_is_the_files_mtime(disc: FileDiscovery) -> None:
    key = write_instance(disc.root, 0x3, 24003)
    stamp = time.time() - 42.0
    await until(lambda: disc.get(key) is not None)
    os.utime(file_path(disc.root, key), (stamp, stamp))
    disc._rescan = True  # what the periodic poll does: pick up changed stats
    await disc._sync_once()
    registered = disc.registered_at(key)
    assert registered is not None
    assert abs(registered - stamp) < 1e-6
