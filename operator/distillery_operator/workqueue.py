"""A work queue: one worker per key at a time, coalesced requests, one-shot retry timers.

Generic: it knows keys and what the worker says about an attempt, not what a key names. The reconciler
(:mod:`.reconciler`) keys it by run; the watch events of a run and of its children *request* that key.

- A request while the key's worker is running marks the key dirty: it runs once more afterwards, however
  many requests arrived.
- An attempt ends with an :class:`Outcome`. A success may ask to run again after a delay (a one-shot timer
  that a request in the meantime makes moot). A failure with a delay is retried after it, and requests
  during that back-off wait for the timer; the queue counts the failures in a row (:meth:`failures`), and
  :func:`backoff` turns that count into a delay. A failure without a delay is not retried until the key is
  requested again.
- There is no thread or long-lived task per key: a worker is a short task, started by a request or a timer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)

# Past this many doublings every delay is at its cap anyway; stopping there keeps a long outage (a
# thousand failures in a row) from overflowing the float.
_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class Outcome:
    """How an attempt ended: ``ok``, and ``after`` seconds when to run again (None: only when requested).
    A failure with ``after`` is a retry, counted in :meth:`WorkQueue.failures`; one without it is not."""

    ok: bool
    after: float | None = None


def backoff(first: float, attempt: int, cap: float) -> float:
    """The delay before retrying the ``attempt``-th failure in a row: ``first``, doubled for each failure
    before it, at most ``cap``."""
    return min(cap, first * 2.0 ** min(attempt - 1, _MAX_DOUBLINGS))


class WorkQueue(Generic[K]):
    """Runs ``work(key)`` for requested keys, one at a time per key, coalescing and retrying."""

    def __init__(self, work: Callable[[K], Awaitable[Outcome]], *, name: Callable[[K], str] = str) -> None:
        self._work = work
        self._name = name  # a task's name, for debugging
        self._running: set[K] = set()
        self._dirty: set[K] = set()
        self._timers: dict[K, asyncio.TimerHandle] = {}
        self._failures: dict[K, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------------------------------------ queries

    def failures(self, key: K) -> int:
        """Failed attempts in a row that were retried (0 after a success or a failure not retried)."""
        return self._failures.get(key, 0)

    def running(self, key: K) -> bool:
        return key in self._running

    def scheduled(self, key: K) -> bool:
        """A timer will run the key (a retry, or a success's ``after``)."""
        return key in self._timers

    def idle(self) -> bool:
        """No worker is running (timers may be pending)."""
        return not self._running and not self._tasks

    # ------------------------------------------------------------------------------------------ requests

    def request(self, key: K) -> None:
        if key in self._running or (key in self._timers and self._failures.get(key)):
            self._dirty.add(key)  # runs after the current attempt, or when the retry timer fires
            return
        self._start(key)

    def forget(self, key: K) -> None:
        """Drop the key's timer, failure count and pending request (a running attempt runs to its end)."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._failures.pop(key, None)
        self._dirty.discard(key)

    async def close(self) -> None:
        """Cancel every timer and running worker, and wait for the workers to end."""
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------------------------------ workers

    def _start(self, key: K) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._loop(key), name=self._name(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _later(self, key: K, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: K) -> None:
        self._timers.pop(key, None)
        if key not in self._running:
            self._start(key)
        else:
            self._dirty.add(key)

    async def _loop(self, key: K) -> None:
        try:
            while True:
                self._dirty.discard(key)
                outcome = await self._work(key)
                if not outcome.ok:
                    self._dirty.discard(key)
                    if outcome.after is None:
                        self._failures.pop(key, None)
                    else:
                        self._failures[key] = self._failures.get(key, 0) + 1
                        self._later(key, outcome.after)
                    return
                self._failures.pop(key, None)
                if key in self._dirty:
                    continue
                if outcome.after is not None:
                    self._later(key, outcome.after)
                return
        finally:
            self._running.discard(key)
