"""The reconcile of one run: observe, plan, execute, write status.

Watch events (a run's, or any of its children's) *request* a reconcile of the run; nothing polls. The
requests go through a work queue keyed by run (:mod:`.workqueue`: one reconcile per run at a time,
requests during one coalesced into one more, one-shot retry timers). A reconcile is a short task: it
observes the run's children in kopf's indices, corrected by this process's writes the watch has not
delivered yet (:mod:`.expectations`), calls the pure planner, applies its result through the one writer
(:mod:`.apply`), writes the status and posts the plan's events.

A failed attempt is retried after the delay :mod:`.errors` chose, doubled for each failure in a row, up to
:data:`MAX_DELAY`; a bug (an unexpected exception) backs off to :data:`MAX_BUG_DELAY`; an error that will
not go away by itself is not retried until the run or a child changes. Each distinct failure is one
Warning event (``Retrying``).

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
from datetime import UTC, datetime
from typing import Any

import kopf
from distillery_trainer.api.status import PHASE_PENDING, REASON_RETRYING

from . import apply, errors
from .expectations import Expectations
from .kube import Api
from .metrics import OperatorMetrics
from .naming import TRAIN, child_name, claim_name, claim_to_create
from .observe import Child, Key, Observed, Pod, RunView, child_view
from .observe_training import ended, training_child
from .planner import Capabilities, Plan, plan, prior_status, rejected
from .podlogs import LiveProgress, targets
from .settings import Settings
from .workqueue import Outcome, WorkQueue, backoff

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
    "distillery_trainjobs",
)
MAX_DELAY = 60.0  # the longest wait before retrying an API error
MAX_BUG_DELAY = 300.0  # the longest wait before retrying after a bug (an unexpected exception)


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
        self.queue: WorkQueue[Key] = WorkQueue(self._attempt, name=lambda key: f"reconcile {key[0]}/{key[1]}")
        self.expectations = Expectations()
        self._warned: dict[Key, str] = {}  # run -> the failure last posted as a Warning
        self._written: dict[str, str] = {}  # run uid -> the status last written (JSON)
        self._phases: dict[str, str] = {}  # run uid -> the phase last written
        self.live = LiveProgress(api, settings, self.request)

    # ------------------------------------------------------------------------------------------ requests

    def bind(self, kwargs: Mapping[str, Any]) -> None:
        """Remember kopf's indices (handlers receive them as keyword arguments; they are live views)."""
        if not self.indices and RUN_INDEX in kwargs:
            self.indices = {
                k: kwargs[k] for k in (RUN_INDEX, POD_INDEX, CLAIM_INDEX, *CHILD_INDICES) if k in kwargs
            }

    def request(self, key: Key) -> None:
        """Reconcile the run soon (see :meth:`.WorkQueue.request`)."""
        self.queue.request(key)

    def forget(self, key: Key, uid: str | None) -> None:
        """The run is gone: drop what is kept about it."""
        self.queue.forget(key)
        self._warned.pop(key, None)
        self.expectations.forget(key)
        self.live.forget(key)
        if uid:
            self._written.pop(uid, None)
            self._phases.pop(uid, None)

    async def close(self) -> None:
        await self.queue.close()
        await self.live.close()
        await self.api.close()

    async def _attempt(self, key: Key) -> Outcome:
        """One reconcile as the work queue runs it: its metrics, its Warning, and when to retry."""
        started = time.monotonic()

        def failed(kind: str, exc: BaseException) -> None:
            self.metrics.reconciled(time.monotonic() - started, (kind, errors.reason(exc)))

        try:
            requeue = await self.reconcile(key)
        except kopf.TemporaryError as exc:
            failed("temporary", exc)
            n = self.queue.failures(key) + 1
            delay = backoff(exc.delay or 1.0, n, MAX_DELAY)
            self._warn(key, f"{exc} (attempt {n}, retrying in {delay:.0f}s)", str(exc))
            return Outcome(ok=False, after=delay)
        except kopf.PermanentError as exc:
            failed("permanent", exc)
            if not (isinstance(exc, errors.Rejected) and exc.reported):  # else the status and an Event say so
                self._warn(key, f"{exc} (not retried until the run or a child changes)", str(exc))
            return Outcome(ok=False)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug: log it, back off, never crash-loop
            failed("internal", exc)
            delay = backoff(2.0, self.queue.failures(key) + 1, MAX_BUG_DELAY)
            logger.exception("reconcile %s/%s failed", *key)
            self._warn(
                key, f"internal error: {type(exc).__name__}: {exc} (retrying in {delay:.0f}s)", repr(exc)
            )
            return Outcome(ok=False, after=delay)
        self.metrics.reconciled(time.monotonic() - started)
        self._warned.pop(key, None)
        return Outcome(ok=True, after=requeue)

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
        """The run's children as the indices show them (and its claim: the planner waits for one it has
        the operator create, and reads the access modes of any),
        corrected by this process's own recent writes the watch has not delivered yet (a just-created
        child is not created twice)."""
        children: dict[tuple[str, str], Child] = {}
        for name in CHILD_INDICES:
            for child in self.indices.get(name, {}).get(key) or ():
                children[(child.kind, child.name)] = child
        view = self._view(key)
        claim = claim_name(view.spec) if view is not None else None
        if claim is not None:
            for child in self.indices.get(CLAIM_INDEX, {}).get((key[0], claim)) or ():
                children[(child.kind, child.name)] = child
        self.expectations.correct(key, children)
        pods: list[Pod] = list(self.indices.get(POD_INDEX, {}).get(key) or ())
        return Observed(children, tuple(pods), self.live.seen(key))

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
        trainjob = await self._discover("trainer.kubeflow.org/v1alpha1", "trainjobs")
        caps = Capabilities(
            pytorchjob=await self._discover("kubeflow.org/v1", "pytorchjobs"),
            trainjob=trainjob,
            runtimes=await self._runtimes(view, observed) if trainjob else {},
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

    async def _runtimes(self, view: RunView, observed: Observed) -> dict[str, bool]:
        """Whether the ClusterTrainingRuntime the run's TrainJob references (or would) exists, while its
        training is to come or runs as a TrainJob: a missing one is a status message, not a TrainJob
        that never starts. Not looked up for a run whose training is done or uses another kind."""
        training = view.spec.get("training") or {}
        if training.get("backend") in ("pytorchjob", "job"):
            return {}
        train = training_child(observed, child_name(view.name, TRAIN))
        if train is not None and (train.kind != "TrainJob" or ended(train)):
            return {}
        if (view.status.get("training") or {}).get("state") == "Succeeded":
            return {}
        name = training.get("runtime") or self.settings.training_runtime
        try:
            found = await self.api.cluster_object_exists(
                "ClusterTrainingRuntime", name, self.settings.discovery_ttl_seconds
            )
        except Exception as exc:
            from .errors import translate

            raise translate(exc, f"get ClusterTrainingRuntime {name}") from exc
        return {name: found} if found is not None else {}

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
                    self.expectations.deleted(key, (kind, name), gone.uid if gone is not None else "")
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
                self.expectations.written(key, (desired.kind, desired.name), child_view(outcome))
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
