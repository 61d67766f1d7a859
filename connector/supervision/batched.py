"""Blocking work asked for by many tasks at one moment, done in one thread hop for all.

Used where many replica tasks ask for the same kind of blocking work at once (a scale's
stops walking the process table, its spawns making log files): each asker waits for a run
that begins after it asked, and every request made while a run is under way goes into the
next one, so N askers at once cost a few thread hops, not N.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Generic, TypeAlias, TypeVar

T = TypeVar("T")
R = TypeVar("R")

# What a run gives each request: its result, or the exception to raise in its asker.
Outcome: TypeAlias = R | BaseException


class Batched(Generic[T, R]):
    """Runs ``work`` (blocking) in a thread over every request waiting at the time.

    ``work`` gets the requests in the order they were made and returns one outcome per
    request, in that order: a result, or an exception for that asker alone. An exception
    ``work`` raises reaches every asker of that run.
    """

    def __init__(self, work: Callable[[list[T]], list[Outcome[R]]], name: str) -> None:
        self._work = work
        self._name = name
        self._waiting: list[tuple[T, asyncio.Future[R]]] = []
        self._runner: asyncio.Task[None] | None = None
        self.runs = 0  # thread hops so far (tests count them)

    async def __call__(self, request: T) -> R:
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[R] = loop.create_future()
        self._waiting.append((request, answer))
        if self._runner is None or self._runner.done():
            self._runner = loop.create_task(self._run(), name=self._name)
        return await answer

    async def _run(self) -> None:
        while self._waiting:
            batch, self._waiting = self._waiting, []
            self.runs += 1
            try:
                outcomes = await asyncio.to_thread(self._work, [request for request, _ in batch])
            except Exception as exc:  # every asker of this run hears of it
                outcomes = [exc] * len(batch)
            for (_, answer), outcome in zip(batch, outcomes, strict=True):
                if answer.done():  # its asker was cancelled
                    continue
                if isinstance(outcome, BaseException):
                    answer.set_exception(outcome)
                else:
                    answer.set_result(outcome)
