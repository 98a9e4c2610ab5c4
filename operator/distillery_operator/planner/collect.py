"""Collect: the teacher's answers, an Indexed Job of ``collection.shards`` shards.

Before its Job is created the run's claim must be ready (:func:`.storage.claim`). A self-hosted teacher
(``teacher.selfHosted``) is a vLLM Deployment and Service that the Job waits for, torn down once the
collection ends, whether it succeeded or failed, unless the training scores with it (``onPolicy``:
:mod:`.teacher`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.stages import collection_failures
from distillery_trainer.api.status import REASON_RETRYING

from .. import status as derive
from ..builders.collect import collect_job
from ..naming import COLLECT, TEACHER
from ..observe import parse_time
from . import stalls, teacher
from .model import Outcome
from .storage import claim

if TYPE_CHECKING:
    from .walk import Walk


def collect(w: Walk) -> Outcome:
    st = w.st.collection
    shards = w.spec.collection.shards
    name = w.run.child(COLLECT)
    job = w.observed.child("Job", name)
    self_hosted = w.spec.teacher.self_hosted is not None
    if (held := stalls.held(w, "collect")) is not None:
        teacher.teardown(w)
        return held
    if (held := w.superseded("collect", job)) is not None:
        return held
    if job is None or job.deleting:
        if job is None and st.state == "Succeeded":
            teacher.after_collection(w)
            return Outcome.DONE
        hold = claim(w)
        if hold is not None:
            st.message = w.storage_wait = hold
            return Outcome.RUNNING
        w.start("collect", f"0/{shards} shards done")
        if self_hosted and (waiting := teacher.ready(w, "collect")) is not None:
            return waiting
        return w.create_or_wait("collect", job, collect_job(w.run, w.settings, w.fp["collect"]))

    pods = w.observed.pods_of(COLLECT, job)
    found = derive.summaries(pods)
    if job.is_true("Complete"):
        if st.state == "Succeeded":
            teacher.after_collection(w)
            return Outcome.DONE
        derive.apply_collection(st, found, shards)
        completed = parse_time(job.status.get("completionTime"))
        if len(found) < shards and w.waiting_for_reports(completed):
            st.message = f"Job {name} complete; reading the shards' summaries ({len(found)}/{shards})"
            return Outcome.RUNNING
        too_many = collection_failures(found, w.spec.collection)
        if too_many is not None:  # the shards' own check, held to the totals: no training on what is left
            teacher.teardown(w)
            return w.fail("collect", f"Job {name} complete, but {too_many}", completed)
        w.succeed("collect", completed)
        missing = f" ({shards - len(found)} shard summaries missing)" if len(found) < shards else ""
        st.message = (
            f"{st.done} answers from {shards} shards, {st.failed} prompts failed, {st.cached} cached{missing}"
        )
        teacher.after_collection(w)
        return Outcome.DONE
    live = derive.live_summaries(pods, w.observed.live)
    derive.apply_collection(st, found, shards, live)
    if job.is_true("Failed"):
        teacher.teardown(w)
        too_many = collection_failures(derive.reported_summaries(pods), w.spec.collection)
        if too_many is not None:
            cond = job.condition("Failed") or {}
            return w.fail(
                "collect", f"Job {name} failed: {too_many}", parse_time(cond.get("lastTransitionTime"))
            )
        shards_failed = job.status.get("failedIndexes")
        return stalls.failed(
            w, "collect", job, pods, f"failed shards: {shards_failed}" if shards_failed else ""
        )
    answered = f"; {st.done}/{st.total if st.total is not None else '?'} answered" if live else ""
    w.start("collect", f"{len(found)}/{shards} shards done{answered}")
    troubled = [*pods, *w.observed.pods_of(TEACHER)] if self_hosted else pods
    if (stalled := stalls.stalled(w, "collect", troubled, ("Job", name))) is not None:
        teacher.teardown(w)
        return stalled
    if self_hosted:
        teacher.want(w)
    eta = derive.collection_eta(found, live, shards)
    times = derive.finish_times(pods)
    if eta is not None:
        st.eta_seconds = eta
    elif found and times and st.start_time is not None:
        per_shard = (times[-1] - st.start_time).total_seconds() / len(found)
        st.eta_seconds = round(max(0.0, per_shard * (shards - len(found))), 1)
    failed = int(job.status.get("failed") or 0)
    if failed and w.degraded is None:
        w.degraded = (
            REASON_RETRYING,
            f"{failed} collection pod(s) failed; each shard is retried up to "
            f"{w.spec.collection.backoff_limit_per_index} times. {derive.failure_detail(pods)}".strip(),
        )
    return Outcome.RUNNING
