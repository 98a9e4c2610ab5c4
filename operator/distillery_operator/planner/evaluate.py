"""Evaluate: a Job that measures the served student against the teacher on held-out prompts; its pod's
results (a JSON termination message) are the run's ``status.results``, which the verdict reads.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.status import REASON_RETRYING

from .. import status as derive
from ..builders.evaluate import eval_job
from ..naming import EVAL
from ..observe import parse_time
from . import stalls
from .model import Outcome

if TYPE_CHECKING:
    from .walk import Walk


def evaluate(w: Walk) -> Outcome:
    st = w.st.evaluation
    name = w.run.child(EVAL)
    job = w.observed.child("Job", name)
    if (held := stalls.held(w, "evaluate")) is not None:
        return held
    if (held := w.superseded("evaluate", job)) is not None:
        return held
    if job is None or job.deleting:
        if job is None and st.state == "Succeeded" and w.st.results is not None:
            return Outcome.DONE
        w.start("evaluate", "evaluating the student against the teacher")
        return w.create_or_wait("evaluate", job, eval_job(w.run, w.settings, w.fp["evaluate"]))
    pods = w.observed.pods_of(EVAL, job)
    if job.is_true("Complete"):
        if st.state == "Succeeded" and w.st.results is not None:
            return Outcome.DONE
        found = derive.results(pods)
        completed = parse_time(job.status.get("completionTime"))
        if found is None:
            if w.waiting_for_reports(completed):
                st.message = f"Job {name} complete; reading its results"
                return Outcome.RUNNING
            return w.fail(
                "evaluate",
                f"Job {name} completed but its pod left no results (a JSON termination message)",
                completed,
            )
        w.st.results = found
        w.succeed("evaluate", completed)
        st.done = st.total = found.samples or 0
        st.message = f"{found.samples or 0} held-out prompts evaluated"
        return Outcome.DONE
    if job.is_true("Failed"):
        return stalls.failed(w, "evaluate", job, pods)
    w.start("evaluate", "evaluating the student against the teacher")
    if int(job.status.get("failed") or 0):
        w.degraded = (
            REASON_RETRYING,
            f"Job {name} is retrying. {derive.failure_detail(pods)}".strip(),
        )
    return stalls.stalled(w, "evaluate", pods, ("Job", name)) or Outcome.RUNNING
