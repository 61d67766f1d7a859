"""Blocking work asked for by many tasks at one moment, done in one thread hop for all."""

from __future__ import annotations

import asyncio
import threading

import pytest

from connector.supervision.batched import Batched, Outcome


async def test_requests_of_a_moment_share_a_run_and_later_ones_wait_for_the_next() -> None:
    seen: list[list[int]] = []
    release = threading.Event()

    def work(batch: list[int]) -> list[Outcome[int]]:
        seen.append(batch)
        if len(seen) == 1:
            release.wait(5)  # the first run is under way while more is asked
        return [n * 10 for n in batch]

    double = Batched(work, "test")
    first = [asyncio.create_task(double(n)) for n in (1, 2, 3)]
    await asyncio.sleep(0.05)
    later = [asyncio.create_task(double(n)) for n in (4, 5)]
    await asyncio.sleep(0.05)
    release.set()
    assert await asyncio.gather(*first, *later) == [10, 20, 30, 40, 50]
    assert seen == [[1, 2, 3], [4, 5]]
    assert double.runs == 2


async def test_an_outcome_that_is_an_exception_fails_its_asker_alone() -> None:
    def work(batch: list[int]) -> list[Outcome[int]]:
        return [ValueError(f"no {n}") if n < 0 else n for n in batch]

    check = Batched(work, "test")
    results = await asyncio.gather(check(1), check(-2), check(3), return_exceptions=True)
    assert results[0] == 1 and results[2] == 3
    assert isinstance(results[1], ValueError) and str(results[1]) == "no -2"


async def test_an_exception_from_the_work_reaches_every_asker_of_that_run() -> None:
    calls = 0

    def work(batch: list[int]) -> list[Outcome[int]]:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise OSError("table unreadable")
        return batch

    read = Batched(work, "test")
    results = await asyncio.gather(read(1), read(2), return_exceptions=True)
    assert [str(r) for r in results] == ["table unreadable", "table unreadable"]
    assert await read(7) == 7  # the next run goes on


async def test_a_cancelled_asker_leaves_the_others_their_answers() -> None:
    release = threading.Event()

    def work(batch: list[int]) -> list[Outcome[int]]:
        release.wait(5)
        return batch

    echo = Batched(work, "test")
    gone = asyncio.create_task(echo(1))
    kept = asyncio.create_task(echo(2))
    await asyncio.sleep(0.05)
    gone.cancel()
    release.set()
    assert await kept == 2
    with pytest.raises(asyncio.CancelledError):
        await gone
