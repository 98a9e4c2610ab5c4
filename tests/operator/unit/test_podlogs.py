"""Live progress from pod logs: which pods are read, how often, and what a failed read does (nothing)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from distillery_operator.kube import ApiError
from distillery_operator.observe import Child, Observed, Pod
from distillery_operator.podlogs import TAIL_LINES, LiveProgress, Target, targets
from distillery_operator.settings import Settings
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.progress_line import format_line

KEY = ("ns", "r")


def job(kind: str, name: str, **status: Any) -> Child:
    return Child(kind=kind, name=name, uid=f"uid-{name}", status=status)


def pod(name: str, component: str, owner: Child, phase: str = "Running", **kw: Any) -> Pod:
    return Pod(name=name, component=component, phase=phase, owners=(owner.uid,), container="c", **kw)


def test_the_running_master_and_the_running_shards_of_the_current_children_are_followed() -> None:
    train = job("PyTorchJob", "r-train")
    collect = job("Job", "r-collect")
    pods = [
        pod("m", "train", train, replica_type="master"),
        pod("w", "train", train, replica_type="worker"),
        pod("s0", "collect", collect, index=0),
        pod("s1", "collect", collect, index=1, phase="Pending"),
        pod("s2", "collect", collect, index=2, phase="Succeeded"),
        Pod(name="old", component="collect", index=3, phase="Running", owners=("uid-of-a-deleted-job",)),
    ]
    observed = Observed.of([train, collect], pods)
    assert targets("r", observed) == [Target("m", "c", "train"), Target("s0", "c", "collect")]
    ended = Observed.of(
        [
            job("PyTorchJob", "r-train", conditions=[{"type": "Succeeded", "status": "True"}]),
            job("Job", "r-collect", conditions=[{"type": "Failed", "status": "True"}]),
        ],
        pods,
    )
    assert targets("r", ended) == []
    indexed = job("Job", "r-train")  # without Kubeflow: pod 0 of the Indexed Job is rank 0
    observed = Observed.of(
        [indexed], [pod("i1", "train", indexed, index=1), pod("i0", "train", indexed, index=0)]
    )
    assert targets("r", observed) == [Target("i0", "c", "train")]


class FakeApi:
    def __init__(self) -> None:
        self.logs: dict[str, str] = {}
        self.errors: dict[str, BaseException] = {}
        self.calls: list[tuple[str, str, str, int]] = []

    async def pod_log(
        self, namespace: str, name: str, container: str, *, tail_lines: int, timeout: float
    ) -> str:
        self.calls.append((namespace, name, container, tail_lines))
        await asyncio.sleep(0)
        if name in self.errors:
            raise self.errors[name]
        return self.logs.get(name, "")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def progress(step: int) -> TrainingProgress:
    return TrainingProgress(method="sft", step=step, total_steps=90, eta_seconds=float(90 - step))


def live(api: FakeApi, clock: Clock, interval: float = 30.0) -> tuple[LiveProgress, list[Any]]:
    changes: list[Any] = []
    lp = LiveProgress(api, Settings(progress_interval_seconds=interval), changes.append, clock=clock)  # type: ignore[arg-type]
    return lp, changes


async def settle(lp: LiveProgress) -> None:
    for _ in range(50):
        await asyncio.sleep(0)
        if not lp._tasks:
            return


async def test_reads_at_most_once_per_interval_and_asks_for_a_reconcile_only_on_a_new_line() -> None:
    api, clock = FakeApi(), Clock()
    lp, changes = live(api, clock)
    follow = [Target("m", "pytorch", "train")]
    api.logs["m"] = f"starting\n{format_line('train', progress(3))}\nINFO more\n"
    assert lp.poll(KEY, "ns", follow) == 30.0  # a round started; come back in 30 s
    await settle(lp)
    assert api.calls == [("ns", "m", "pytorch", TAIL_LINES)] and changes == [KEY]
    assert lp.seen(KEY)["m"].report == progress(3)

    api.logs["m"] += format_line("train", progress(4)) + "\n"
    clock.t += 10
    assert lp.poll(KEY, "ns", follow) == 20.0  # not due: no read, however many reconciles ask
    assert lp.poll(KEY, "ns", follow) == 20.0
    await settle(lp)
    assert len(api.calls) == 1 and lp.seen(KEY)["m"].report == progress(3)

    clock.t += 20
    assert lp.poll(KEY, "ns", follow) == 30.0
    await settle(lp)
    assert len(api.calls) == 2 and lp.seen(KEY)["m"].report == progress(4) and changes == [KEY, KEY]

    clock.t += 30  # the same line again: nothing changed, no reconcile asked for
    lp.poll(KEY, "ns", follow)
    await settle(lp)
    assert len(api.calls) == 3 and changes == [KEY, KEY]

    # The pod ended (nothing to follow, no timer asked for): its line stays while the pod does.
    assert lp.poll(KEY, "ns", [], {"m"}) is None and lp.seen(KEY)["m"].report == progress(4)
    assert lp.poll(KEY, "ns", [], {"another"}) is None and lp.seen(KEY) == {}


@pytest.mark.parametrize(
    "error",
    [
        ApiError(404),
        ApiError(400, 'container "c" is waiting to start'),
        ApiError(500),
        TimeoutError(),
        OSError("connection reset"),
    ],
)
async def test_a_failed_read_keeps_the_last_line_quietly(
    error: BaseException, caplog: pytest.LogCaptureFixture
) -> None:
    api, clock = FakeApi(), Clock()
    lp, changes = live(api, clock)
    follow = [Target("s0", "collect", "collect"), Target("s1", "collect", "collect")]
    report = CollectionSummary(shard=0, shards=2, total=10, done=4)
    api.logs["s0"] = format_line("collect", report)
    api.logs["s1"] = "garbage\n" + format_line("collect", report)[:30]  # a torn line: no progress yet
    lp.poll(KEY, "ns", follow)
    await settle(lp)
    assert set(lp.seen(KEY)) == {"s0"} and changes == [KEY]
    api.errors["s0"] = error
    clock.t += 30
    with caplog.at_level(logging.DEBUG, logger="distillery.operator"):
        lp.poll(KEY, "ns", follow)
        await settle(lp)
    assert lp.seen(KEY)["s0"].report == report and changes == [KEY]
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_403_is_one_warning_per_run_and_nothing_else(caplog: pytest.LogCaptureFixture) -> None:
    api, clock = FakeApi(), Clock()
    lp, changes = live(api, clock)
    api.errors["m"] = ApiError(403, "Forbidden")
    follow = [Target("m", "pytorch", "train")]
    with caplog.at_level(logging.WARNING, logger="distillery.operator"):
        for _ in range(3):
            lp.poll(KEY, "ns", follow)
            await settle(lp)
            clock.t += 30
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(api.calls) == 3 and changes == [] and lp.seen(KEY) == {}
    assert len(warnings) == 1 and "grant get on pods/log" in warnings[0]


async def test_off_with_a_zero_interval_and_forgotten_with_the_run() -> None:
    api, clock = FakeApi(), Clock()
    off, _ = live(api, clock, interval=0)
    assert off.poll(KEY, "ns", [Target("m", "c", "train")]) is None and api.calls == []

    lp, changes = live(api, clock)
    gate = asyncio.Event()

    async def slow(*_: Any, **__: Any) -> str:
        await gate.wait()
        return format_line("train", progress(1))

    api.pod_log = slow  # type: ignore[method-assign]
    lp.poll(KEY, "ns", [Target("m", "c", "train")])
    clock.t += 31
    assert lp.poll(KEY, "ns", [Target("m", "c", "train")]) == 10.0  # still reading: no second round
    lp.forget(KEY)
    gate.set()
    await settle(lp)
    assert lp.seen(KEY) == {} and changes == [] and not lp._tasks
    await lp.close()
