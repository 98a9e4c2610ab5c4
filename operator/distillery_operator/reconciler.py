"""The reconcile loop's bookkeeping: one reconcile per run at a time, coalesced requests, retries.

Watch events (a run's, or any of its children's) *request* a reconcile of the run; nothing polls. A
request while that run's reconcile is running marks it dirty, so it runs once more afterwards, however
many events arrived. A failed attempt is retried after the delay :mod:`.errors` chose (a one-shot timer,
backing off to a minute; a bug backs off to five). There is no thread or long-lived task per run: a
reconcile is a short task that reads kopf's indices, calls the pure planner and applies its result
through the one writer.

While training or collection runs, the run is also reconciled on a timer, and the tail of its pods' logs
is read in the background (:mod:`.podlogs`, at most once per ``progress_interval_seconds``), so the
status shows live progress without waiting for the pods to end.

It also feeds the operator's metrics (:mod:`.metrics`): every attempt's result, duration and error, each
stage's duration when a status write ends it, and the runs by phase when scraped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import kopf
from distillery_trainer.api.status import PHASE_PENDING, REASON_RETRYING

from . import apply, errors
from .kube import Api
from .metrics import OperatorMetrics
from .naming import claim_to_create
from .observe import Child, Key, Observed, Pod, RunView, child_view
from .planner import Capabilities, Plan, plan, prior_status, rejected
from .podlogs import LiveProgress, targets
from .settings import Settings

logger = logging.getLogger("distillery.operator")

RUN_INDEX = "distillery_runs"
POD_INDEX = "distillery_pods"
# Every PersistentVolumeClaim by (namespace, claim name): a run's claim may be one the operator did not make.
CLAIM_INDEX = "distillery_claims"
CHILD_INDICES = (
    "distillery_configmaps",
    "distillery_services",
    "distillery_jobs",
    "distillery_deployments",
    "distillery_pytorchjobs",
)
MAX_DELAY = 60.0
MAX_BUG_DELAY = 300.0


EXPECTATION_TTL = 30.0


def _version(child: Child) -> int | None:
    try:
        return int(child.resource_version)
    except ValueError:
        return None


@dataclass(frozen=True)
class Expectation:
    """A write of this process's that the watch may not have delivered yet (client-go calls these
    expectations): the child as written, or None for one deleted (``gone_uid``)."""

    child: Child | None
    gone_uid: str
    since: float

    def caught_up(self, seen: Child | None) -> bool:
        if self.child is None:
            return seen is None or seen.uid != self.gone_uid
        if seen is None or seen.uid != self.child.uid:
            return False
        if seen.resource_version == self.child.resource_version:
            return True
        mine, theirs = _version(self.child), _version(seen)
        return mine is not None and theirs is not None and theirs > mine


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def run_ref(view: RunView) -> kopf.RawBody:
    """Enough of the run for kopf to post an Event about it."""
    return {
        "apiVersion": "distillery.dev/v1alpha1",
        "kind": "DistillationRun",
        "metadata": {"name": view.name, "namespace": view.namespace, "uid": view.uid},
    }


class Reconciler:
    def __init__(
        self,
        api: Api,
        settings: Settings,
        *,
        clock: Callable[[], datetime] = utcnow,
        post_event: Callable[..., None] | None = None,
        metrics: OperatorMetrics | None = None,
    ) -> None:
        self.api = api
        self.metrics = metrics or OperatorMetrics()
        self.metrics.count_runs(self.run_phases)  # read when scraped
        self.settings = settings
        self.clock = clock
        self.post_event = post_event or kopf.event
        self.indices: Mapping[str, Any] = {}
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._timers: dict[Key, asyncio.TimerHandle] = {}
        self._failures: dict[Key, int] = {}
        self._warned: dict[Key, str] = {}
        self._written: dict[str, str] = {}  # run uid -> the status last written (JSON)
        self._phases: dict[str, str] = {}  # run uid -> the phase last written
        self._tasks: set[asyncio.Task[None]] = set()
        self._expected: dict[Key, dict[tuple[str, str], Expectation]] = {}
        self.live = LiveProgress(api, settings, self.request)

    # ------------------------------------------------------------------------------------------ requests

    def bind(self, kwargs: Mapping[str, Any]) -> None:
        """Remember kopf's indices (handlers receive them as keyword arguments; they are live views)."""
        if not self.indices and RUN_INDEX in kwargs:
            self.indices = {
                k: kwargs[k] for k in (RUN_INDEX, POD_INDEX, CLAIM_INDEX, *CHILD_INDICES) if k in kwargs
            }

    def request(self, key: Key) -> None:
        if key in self._running or (key in self._timers and self._failures.get(key)):
            self._dirty.add(key)  # runs after the current attempt, or when the retry timer fires
            return
        self._start(key)

    def _start(self, key: Key) -> None:
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._running.add(key)
        task = asyncio.get_running_loop().create_task(self._loop(key), name=f"reconcile {key[0]}/{key[1]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _later(self, key: Key, delay: float) -> None:
        old = self._timers.pop(key, None)
        if old is not None:
            old.cancel()
        self._timers[key] = asyncio.get_running_loop().call_later(delay, self._fire, key)

    def _fire(self, key: Key) -> None:
        self._timers.pop(key, None)
        if key not in self._running:
            self._start(key)
        else:
            self._dirty.add(key)

    def forget(self, key: Key, uid: str | None) -> None:
        """The run is gone: drop what is kept about it."""
        timer = self._timers.pop(key, None)
        if timer is not None:
            timer.cancel()
        self._failures.pop(key, None)
        self._warned.pop(key, None)
        self._dirty.discard(key)
        self._expected.pop(key, None)
        self.live.forget(key)
        if uid:
            self._written.pop(uid, None)
            self._phases.pop(uid, None)

    async def close(self) -> None:
        for timer in self._timers.values():
            timer.cancel()
        self._timers.clear()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.live.close()
        await self.api.close()

    async def _loop(self, key: Key) -> None:
        try:
            while True:
                self._dirty.discard(key)
                ok, delay = await self._attempt(key)
                if not ok:
                    self._dirty.discard(key)
                    if delay is not None:
                        self._later(key, delay)
                    return
                if key in self._dirty:
                    continue
                if delay is not None:
                    self._later(key, delay)
                return
        finally:
            self._running.discard(key)

    async def _attempt(self, key: Key) -> tuple[bool, float | None]:
        """(succeeded, when to run again)."""
        started = time.monotonic()

        def failed(kind: str, exc: BaseException) -> None:
            self.metrics.reconciled(time.monotonic() - started, (kind, errors.reason(exc)))

        try:
            requeue = await self.reconcile(key)
        except kopf.TemporaryError as exc:
            failed("temporary", exc)
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(MAX_DELAY, (exc.delay or 1.0) * 2 ** (n - 1))
            self._warn(key, f"{exc} (attempt {n}, retrying in {delay:.0f}s)", str(exc))
            return False, delay
        except kopf.PermanentError as exc:
            failed("permanent", exc)
            self._failures.pop(key, None)
            if not (isinstance(exc, errors.Rejected) and exc.reported):  # else the status and an Event say so
                self._warn(key, f"{exc} (not retried until the run or a child changes)", str(exc))
            return False, None
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: log it, back off, never crash-loop
            failed("internal", exc)
            n = self._failures[key] = self._failures.get(key, 0) + 1
            delay = min(MAX_BUG_DELAY, 2.0**n)
            logger.exception("reconcile %s/%s failed", *key)
            self._warn(
                key, f"internal error: {type(exc).__name__}: {exc} (retrying in {delay:.0f}s)", repr(exc)
            )
            return False, delay
        self.metrics.reconciled(time.monotonic() - started)
        self._failures.pop(key, None)
        self._warned.pop(key, None)
        return True, requeue

    def _warn(self, key: Key, message: str, dedupe: str) -> None:
        logger.warning("%s/%s: %s", key[0], key[1], message)
        view = self._view(key)
        if view is not None and self._warned.get(key) != dedupe:
            self._warned[key] = dedupe
            self._event(view, "Warning", REASON_RETRYING, message)

    def _event(self, view: RunView, type_: str, reason: str, message: str) -> None:
        try:
            self.post_event(kopf.Body(run_ref(view)), type=type_, reason=reason, message=message[:1024])
        except LookupError:  # outside an operator (unit tests without kopf's posting context)
            logger.info("event %s %s: %s", type_, reason, message)

    # ------------------------------------------------------------------------------------------ reconcile

    def _view(self, key: Key) -> RunView | None:
        store = self.indices.get(RUN_INDEX, {}).get(key)
        return next(iter(store), None) if store else None

    def observe(self, key: Key) -> Observed:
        """The run's children as the indices show them (and the claim it has the operator create),
        corrected by this process's own recent writes the watch has not delivered yet (a just-created
        child is not created twice)."""
        children: dict[tuple[str, str], Child] = {}
        for name in CHILD_INDICES:
            for child in self.indices.get(name, {}).get(key) or ():
                children[(child.kind, child.name)] = child
        view = self._view(key)
        claim = claim_to_create(view.spec) if view is not None else None
        if claim is not None:
            for child in self.indices.get(CLAIM_INDEX, {}).get((key[0], claim)) or ():
                children[(child.kind, child.name)] = child
        pending = self._expected.get(key)
        if pending:
            clock = time.monotonic()
            for ref, exp in list(pending.items()):
                seen = children.get(ref)
                if clock - exp.since > EXPECTATION_TTL or exp.caught_up(seen):
                    del pending[ref]
                elif exp.child is None:
                    children.pop(ref, None)
                else:
                    children[ref] = exp.child
        pods: list[Pod] = list(self.indices.get(POD_INDEX, {}).get(key) or ())
        return Observed(children, tuple(pods), self.live.seen(key))

    def _expect(self, key: Key, ref: tuple[str, str], child: Child | None, gone_uid: str = "") -> None:
        self._expected.setdefault(key, {})[ref] = Expectation(child, gone_uid, time.monotonic())

    async def reconcile(self, key: Key) -> float | None:
        view = self._view(key)
        if view is None:
            return None
        written = self._written.get(view.uid)
        if written is not None:
            view = dataclasses.replace(view, status_json=written)
        observed = self.observe(key)
        follow = self.live.poll(
            key, view.namespace, targets(view.name, observed), {p.name for p in observed.pods}
        )
        caps = Capabilities(
            pytorchjob=await self._discover("kubeflow.org/v1", "pytorchjobs"),
            binding_modes=await self._binding_modes(view, observed),
        )
        result = plan(view, observed, self.clock(), settings=self.settings, caps=caps)
        await self.execute(view, result)
        delays = [d for d in (result.requeue_after, follow) if d is not None]
        return min(delays) if delays else None

    async def _binding_modes(self, view: RunView, observed: Observed) -> dict[str, str]:
        """The binding mode of the StorageClass of the run's claim while it is not bound: the planner
        waits for an Immediate claim, not for one that binds when its first pod is scheduled."""
        name = claim_to_create(view.spec)
        found = observed.child("PersistentVolumeClaim", name) if name else None
        if found is None or not found.storage_class or found.status.get("phase") == "Bound":
            return {}
        try:
            mode = await self.api.binding_mode(found.storage_class, self.settings.discovery_ttl_seconds)
        except Exception as exc:
            from .errors import translate

            raise translate(exc, f"get StorageClass {found.storage_class}") from exc
        return {found.storage_class: mode} if mode is not None else {}

    async def _discover(self, api_version: str, plural: str) -> bool:
        try:
            return await self.api.has_resource(api_version, plural, self.settings.discovery_ttl_seconds)
        except Exception as exc:
            from .errors import translate

            raise translate(exc, f"discover {api_version}/{plural}") from exc

    async def execute(self, view: RunView, result: Plan) -> None:
        """Apply a plan: deletions only after the status that explains them is written. A child the API
        server rejects (422) fails the run with its message (:func:`.planner.rejected`) and is not retried
        until the run or a child changes."""
        key = (view.namespace, view.name)
        observed = self.observe(key)
        try:
            if result.delete:
                await self._write_status(view, result)
                for kind, name in result.delete:
                    gone = observed.child(kind, name)
                    await apply.remove(self.api, kind, view.namespace, name)
                    logger.info("%s/%s: deleted %s %s", view.namespace, view.name, kind, name)
                    self._expect(key, (kind, name), None, gone.uid if gone is not None else "")
                await self._ensure_all(view, result, observed)
            else:
                await self._ensure_all(view, result, observed)
                await self._write_status(view, result)
        except errors.Rejected as exc:
            if written := self._written.get(view.uid):
                view = dataclasses.replace(view, status_json=written)
            result = rejected(view, result, exc.what, exc.detail, self.clock())
            await self._write_status(view, result)
            for event in result.events:
                self._event(view, event.type, event.reason, event.message)
            exc.reported = True
            raise
        for event in result.events:
            self._event(view, event.type, event.reason, event.message)

    async def _ensure_all(self, view: RunView, result: Plan, observed: Observed) -> None:
        calls: list[Awaitable[dict[str, Any] | None]] = [
            apply.ensure(self.api, view.uid, d, observed.child(d.kind, d.name)) for d in result.apply
        ]
        outcomes = await asyncio.gather(*calls, return_exceptions=True)
        key = (view.namespace, view.name)
        for desired, outcome in zip(result.apply, outcomes, strict=True):
            if isinstance(outcome, dict):
                self._expect(key, (desired.kind, desired.name), child_view(outcome))
                logger.info("%s/%s: applied %s %s", view.namespace, view.name, desired.kind, desired.name)
        # What a retry may cure first; a rejection (422) is the run's to report once nothing else failed.
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        for outcome in sorted(failures, key=lambda o: isinstance(o, errors.Rejected)):
            raise outcome

    async def _write_status(self, view: RunView, result: Plan) -> None:
        new = result.status.to_dict()
        written = self._written.get(view.uid)
        old = (
            json.loads(written)
            if written is not None
            else prior_status(view.status).to_dict()
            if view.status
            else {}
        )
        if await apply.write_status(self.api, view.namespace, view.name, old, new) and old.get(
            "phase"
        ) != new.get("phase"):
            logger.info("%s/%s: %s -> %s", view.namespace, view.name, old.get("phase", "-"), new.get("phase"))
        self._written[view.uid] = json.dumps(new, separators=(",", ":"))
        self._phases[view.uid] = str(new.get("phase") or PHASE_PENDING)
        self.metrics.status_written(old, new)

    # ------------------------------------------------------------------------------------------ metrics

    def run_phases(self) -> Counter[tuple[str, str]]:
        """(namespace, phase) -> runs, over the runs in the index (a deleted run is gone from it): the phase
        this process last wrote, else the one the run's status shows."""
        out: Counter[tuple[str, str]] = Counter()
        for store in self.indices.get(RUN_INDEX, {}).values():
            for view in store:
                phase = self._phases.get(view.uid)
                if phase is None:
                    try:
                        phase = str(json.loads(view.status_json).get("phase") or PHASE_PENDING)
                    except (ValueError, AttributeError):
                        phase = PHASE_PENDING
                out[(view.namespace, phase)] += 1
        return out
