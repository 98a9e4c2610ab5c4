"""The work queue (``workqueue``) on its own: one worker per key at a time, coalesced requests, retry
timers with back-off, forget and close. Workers here are scripted; the reconciler's use of the queue is
tested in test_writer.py."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from distillery_operator.workqueue import Outcome, WorkQueue, backoff


class Worker:
    """Runs the outcomes scripted for each key in turn (then succeeds); a key with a gate waits for it.
    Records every start (key, loop time), and the keys whose attempt was cancelled."""

    def __init__(
        self,
        script: dict[str, list[Outcome]] | None = None,
        gates: dict[str, asyncio.Event] | None = None,
    ) -> None:
        self.script = script or {}
        self.gates = gates or {}
        self.calls: list[tuple[str, float]] = []
        self.cancelled: list[str] = []
        self.cleaned: list[str] = []

    async def __call__(self, key: str) -> Outcome:
        self.calls.append((key, asyncio.get_running_loop().time()))
        gate = self.gates.get(key)
        if gate is not None:
            try:
                await gate.wait()
            except asyncio.CancelledError:
                self.cancelled.append(key)
                await asyncio.sleep(0.05)  # cleaning up takes a moment; close() must wait for it
                self.cleaned.append(key)
                raise
        outcomes = self.script.get(key)
        return outcomes.pop(0) if outcomes else Outcome(ok=True)

    def runs(self, key: str) -> int:
        return sum(1 for k, _ in self.calls if k == key)


async def until(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_backoff_doubles_from_the_first_delay_up_to_the_cap() -> None:
    assert [backoff(0.5, n, 60.0) for n in range(1, 10)] == [0.5, 1, 2, 4, 8, 16, 32, 60, 60]
    assert [backoff(2.0, n, 300.0) for n in range(1, 10)] == [2, 4, 8, 16, 32, 64, 128, 256, 300]


def test_backoff_stays_at_the_cap_through_a_long_outage() -> None:
    # An API server that fails for a day at one try a minute is ~1440 failures in a row: the delay must
    # stay at the cap. It overflowed the float past ~1024 failures, and the OverflowError, raised while
    # handling the failure, ended the run's retries until the next watch event.
    assert backoff(1.0, 1440, 60.0) == 60.0
    assert backoff(2.0, 10_000, 300.0) == 300.0


async def test_requests_while_a_key_runs_coalesce_into_exactly_one_more_run() -> None:
    gate = asyncio.Event()
    work = Worker(gates={"a": gate})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(lambda: work.runs("a") == 1)
    for _ in range(10):
        queue.request("a")
    assert work.runs("a") == 1 and queue.running("a")  # never two at once for a key
    queue.request("b")  # another key is not held back by it
    await until(lambda: work.runs("b") == 1)
    gate.set()
    await until(queue.idle)
    await asyncio.sleep(0.05)
    assert work.runs("a") == 2 and work.runs("b") == 1
    queue.request("a")  # once idle, a request runs at once
    await until(lambda: work.runs("a") == 3)
    await queue.close()


async def test_a_failed_attempt_is_retried_after_its_delay_and_requests_wait_for_the_timer() -> None:
    work = Worker({"a": [Outcome(ok=False, after=0.3), Outcome(ok=False, after=0.1)]})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(lambda: queue.scheduled("a"))
    assert queue.failures("a") == 1 and not queue.running("a")
    for _ in range(5):
        queue.request("a")  # during the back-off: held for the timer, not run now
    await asyncio.sleep(0.1)
    assert work.runs("a") == 1
    await until(lambda: work.runs("a") == 2)
    await until(lambda: queue.failures("a") == 2)  # failures in a row are counted
    await until(lambda: work.runs("a") == 3)
    await until(queue.idle)
    (_, first), (_, second), (_, third) = work.calls
    assert second - first >= 0.3 - 0.02 and third - second >= 0.1 - 0.02
    assert queue.failures("a") == 0 and not queue.scheduled("a")  # the success reset the count
    await asyncio.sleep(0.2)
    assert work.runs("a") == 3  # the requests made during the back-off were that one retry
    await queue.close()


async def test_a_failure_without_a_delay_is_not_retried_until_requested() -> None:
    work = Worker({"a": [Outcome(ok=False, after=0.05), Outcome(ok=False)]})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(lambda: work.runs("a") == 2 and queue.idle())
    assert queue.failures("a") == 0 and not queue.scheduled("a")
    await asyncio.sleep(0.2)
    assert work.runs("a") == 2
    queue.request("a")
    await until(lambda: work.runs("a") == 3)
    await queue.close()


async def test_a_success_may_ask_to_run_again_and_a_request_meanwhile_runs_at_once() -> None:
    work = Worker({"a": [Outcome(ok=True, after=0.2), Outcome(ok=True, after=30.0)]})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(lambda: work.runs("a") == 2)  # the timer ran it again
    (_, first), (_, second) = work.calls
    assert second - first >= 0.2 - 0.02
    await until(lambda: queue.scheduled("a") and queue.idle())
    queue.request("a")  # a wait after a success does not hold requests back
    await until(lambda: work.runs("a") == 3)
    await until(queue.idle)
    assert not queue.scheduled("a")  # that run's timer was replaced: it asked for nothing more
    await queue.close()


async def test_forget_cancels_a_pending_retry() -> None:
    work = Worker({"a": [Outcome(ok=False, after=0.2)]})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(lambda: queue.scheduled("a"))
    queue.forget("a")
    assert not queue.scheduled("a") and queue.failures("a") == 0
    await asyncio.sleep(0.4)
    assert work.runs("a") == 1
    queue.request("a")  # the key is as new: a request runs at once
    await until(lambda: work.runs("a") == 2)
    await queue.close()


async def test_close_cancels_timers_and_running_workers_and_waits_for_them() -> None:
    work = Worker({"b": [Outcome(ok=False, after=0.2)]}, gates={"a": asyncio.Event()})
    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    queue.request("b")
    await until(lambda: queue.running("a") and queue.scheduled("b"))
    await queue.close()
    assert work.cancelled == ["a"] and work.cleaned == ["a"]  # it waited for the worker to end
    assert queue.idle() and not queue.scheduled("b")
    await asyncio.sleep(0.4)
    assert len(work.calls) == 2  # the retry timer of "b" never fired


async def test_a_worker_that_raises_leaves_the_key_free_to_run_again() -> None:
    """A worker reports failures as outcomes; one that raises anyway must not leave its key running."""
    calls = 0

    async def work(key: str) -> Outcome:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("boom")
        return Outcome(ok=True)

    queue: WorkQueue[str] = WorkQueue(work)
    queue.request("a")
    await until(queue.idle)
    assert not queue.running("a")
    queue.request("a")
    await until(lambda: calls == 2)
    await queue.close()
