"""Live progress while a stage runs, from the tail of its pods' logs.

Stage pods have no Kubernetes API access; their reports reach the operator as termination messages, when
they exit. While training or collection runs, rank 0 and every shard also print a progress line to their
log (:mod:`distillery_trainer.progress_line`), and this module reads it: ``GET pods/{name}/log?tailLines=``
of the training master (the PyTorchJob's Master, the Indexed Job's or the TrainJob's pod 0) and of every running
collection pod, keeping the latest line of each as a :class:`~.observe.Live` observation that the
(pure) planner merges into the status.

- Only with ``settings.live_progress`` (the chart's ``operator.liveProgress``, which also decides whether
  the operator is granted ``get pods/log``): without it no log is read.
- At most one round of reads per run every ``settings.progress_interval_seconds`` (30 s), so the status
  changes at most that often, however many events arrive; :meth:`LiveProgress.poll` also says when to
  reconcile the run again, so progress moves without any event.
- The reads run in the background: a reconcile never waits for one. A round that saw a new line asks for
  a reconcile; a round that saw nothing new asks for nothing.
- A failed read (403 without ``get`` on ``pods/log``, 404, 400 for a container not started yet, 500, a
  timeout) or a log without a valid line leaves the observation as it was: progress stays where it was
  and the run goes on. A 403 is a warning once per run; anything else is logged at debug level.
- Few requests: ``MAX_READS`` at a time over all runs, ``TAIL_LINES`` lines each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

import aiohttp
from distillery_trainer.api.base import ApiModel
from distillery_trainer.progress_line import latest
from distillery_trainer.redact import scrub

from .kube import Api, ApiError
from .naming import COLLECT, TRAIN, child_name
from .observe import Key, Live, Observed
from .observe_training import ended, training_child
from .settings import Settings

logger = logging.getLogger("distillery.operator")

TAIL_LINES = 200  # a progress line comes every 10 s; other output between two of them rarely fills this
READ_TIMEOUT = 10.0  # seconds for one log read
MAX_READS = 8  # log reads in flight, all runs together


@dataclass(frozen=True)
class Target:
    """A running pod whose log carries its stage's progress."""

    pod: str
    container: str
    stage: str  # "train" or "collect": the stage of the lines to take


def targets(run: str, observed: Observed) -> list[Target]:
    """The pods to read for a run: the running training master, and every running collection pod, of
    the stage's current child while it has not ended."""
    out: list[Target] = []
    train = training_child(observed, child_name(run, TRAIN))
    if train is not None and not train.deleting and not ended(train):
        out += [
            Target(p.name, p.container, "train")
            for p in observed.pods_of(TRAIN, train)
            if p.running and p.master
        ]
    collect = observed.child("Job", child_name(run, COLLECT))
    if collect is not None and not collect.deleting and not ended(collect):
        out += [
            Target(p.name, p.container, "collect") for p in observed.pods_of(COLLECT, collect) if p.running
        ]
    return out


def utcnow() -> datetime:
    return datetime.now(UTC)


class LiveProgress:
    """The latest progress line of each followed pod, per run, and the rate-limited reads that find them."""

    def __init__(
        self,
        api: Api,
        settings: Settings,
        on_change: Callable[[Key], None],
        *,
        clock: Callable[[], float] = time.monotonic,
        now: Callable[[], datetime] = utcnow,
    ) -> None:
        self.api = api
        # The chart's operator.liveProgress: false grants no pods/log, so no read is even tried.
        self.interval = settings.progress_interval_seconds if settings.live_progress else 0.0
        self.on_change = on_change
        self.clock = clock
        self.now = now
        self._seen: dict[Key, dict[str, Live]] = {}
        self._last: dict[Key, float] = {}  # when the run's last round of reads started (clock)
        self._tasks: dict[Key, asyncio.Task[None]] = {}
        self._warned: set[Key] = set()
        self._slots: asyncio.Semaphore | None = None

    def seen(self, key: Key) -> Mapping[str, Live]:
        """Pod name -> its latest progress line, for the run's observation (a copy: the planner's)."""
        return dict(self._seen.get(key) or {})

    def poll(
        self, key: Key, namespace: str, follow: Sequence[Target], present: Collection[str] = ()
    ) -> float | None:
        """Start a round of reads of ``follow`` when one is due; returns in how many seconds the run should
        be reconciled again to follow its progress (None: nothing to follow). The lines of pods no longer
        ``present`` are dropped; an ended pod's last line stays while the pod does (a failed shard's
        answers are on disk: its count holds until its retry prints a newer one)."""
        seen = self._seen.get(key)
        if seen is not None:
            keep = set(present) | {t.pod for t in follow}
            for pod in [p for p in seen if p not in keep]:
                del seen[pod]
        if self.interval <= 0 or not follow:
            return None
        now = self.clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            return self.interval - (now - last)
        if key in self._tasks:  # the previous round is still reading: check again shortly
            return min(self.interval, READ_TIMEOUT)
        self._last[key] = now
        task = asyncio.get_running_loop().create_task(
            self._round(key, namespace, list(follow)), name=f"progress {key[0]}/{key[1]}"
        )
        self._tasks[key] = task
        task.add_done_callback(lambda done: self._done(key, done))
        return self.interval

    def _done(self, key: Key, task: asyncio.Task[None]) -> None:
        if self._tasks.get(key) is task:
            del self._tasks[key]

    def forget(self, key: Key) -> None:
        self._seen.pop(key, None)
        self._last.pop(key, None)
        self._warned.discard(key)
        task = self._tasks.pop(key, None)
        if task is not None:
            task.cancel()

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _round(self, key: Key, namespace: str, follow: list[Target]) -> None:
        found = await asyncio.gather(*(self._read(key, namespace, t) for t in follow))
        seen = self._seen.setdefault(key, {})
        changed = False
        for target, report in zip(follow, found, strict=True):
            if report is None:
                continue
            old = seen.get(target.pod)
            if old is None or old.report != report:
                seen[target.pod] = Live(report, self.now())
                changed = True
        if changed and key in self._last:  # not forgotten meanwhile
            self.on_change(key)

    async def _read(self, key: Key, namespace: str, target: Target) -> ApiModel | None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(MAX_READS)
        try:
            async with self._slots:
                text = await asyncio.wait_for(
                    self.api.pod_log(
                        namespace, target.pod, target.container, tail_lines=TAIL_LINES, timeout=READ_TIMEOUT
                    ),
                    READ_TIMEOUT + 1,
                )
        except ApiError as exc:
            if exc.status == 403 and key not in self._warned:
                self._warned.add(key)
                logger.warning(
                    "%s/%s: may not read the log of pod %s (403; grant get on pods/log): its live progress "
                    "is not shown; the stage's report still arrives when its pods end",
                    namespace,
                    key[1],
                    target.pod,
                )
            else:
                logger.debug(
                    "%s/%s: reading the log of pod %s: %s", namespace, key[1], target.pod, exc.status
                )
            return None
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            logger.debug("%s/%s: reading the log of pod %s: %r", namespace, key[1], target.pod, exc)
            return None
        return latest(scrub(text), target.stage)
