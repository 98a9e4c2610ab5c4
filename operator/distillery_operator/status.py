"""Status derived from observations (pure): what the stages reported, and the run's conditions.

Stages report through their pods' termination messages (``≤ 4 KiB`` JSON, see
:mod:`distillery_trainer.termination`): each collection shard a ``CollectionSummary``, the training
master (rank 0) a ``TrainingProgress``, the evaluation pod the ``results`` shape. Workload pods need no
API access for that. While a shard or rank 0 runs, the same report comes as the latest progress line of
its log (:class:`~.observe.Live`, read by :mod:`.podlogs`); a termination message wins over it. Conditions follow the Kubernetes conventions: ``lastTransitionTime`` moves only
when a condition's status does, and every condition carries the generation it was computed for.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TypeVar

from distillery_trainer.api.base import ApiModel
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.status import (
    COND_DEGRADED,
    COND_FAILED,
    COND_PROGRESSING,
    COND_READY,
    COND_SUCCEEDED,
    PHASE_FAILED,
    PHASE_SUCCEEDED,
    REASON_AS_EXPECTED,
    CollectionStatus,
    Condition,
    Results,
    TrainingStatus,
)
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.cost import scoring_gpu_hours, tokens_usd
from distillery_trainer.progress_line import is_progress_line
from distillery_trainer.redact import scrub
from pydantic import ValidationError

from .observe import Live, Pod, Terminated

M = TypeVar("M", bound=ApiModel)


def lenient(model: type[M], data: dict[str, Any] | None) -> M | None:
    """``data`` as ``model``, ignoring top-level keys it does not know (``truncated`` from a message cut
    to 4 KiB, fields of a newer trainer); None when what is left does not validate."""
    if data is None:
        return None
    known = {f.alias or name for name, f in model.model_fields.items()} | set(model.model_fields)
    try:
        return model.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError:
        return None


# ---------------------------------------------------------------------------------------------- messages


def summaries(pods: Iterable[Pod]) -> list[CollectionSummary]:
    """One summary per shard, from the collection pods that exited 0 (a retried shard reports once)."""
    by_shard: dict[int, CollectionSummary] = {}
    for pod in pods:
        done = pod.succeeded
        summary = lenient(CollectionSummary, done.json()) if done else None
        if summary is not None:
            by_shard[summary.shard] = summary
    return [by_shard[k] for k in sorted(by_shard)]


def reported_summaries(pods: Iterable[Pod]) -> list[CollectionSummary]:
    """One summary per shard from every collection pod that ended: a shard that exited 0 reports its
    own; one that only failed (a shard past ``collection.maxFailedFraction`` exits 3 and still writes its
    summary as its termination message) reports its latest attempt's."""
    by_shard: dict[int, tuple[bool, float, CollectionSummary]] = {}
    for pod in pods:
        for term in pod.terminated:
            summary = lenient(CollectionSummary, term.json())
            if summary is None:
                continue
            key = (term.exit_code == 0, term.finished_at.timestamp() if term.finished_at else 0.0)
            old = by_shard.get(summary.shard)
            if old is None or key >= old[:2]:
                by_shard[summary.shard] = (*key, summary)
    return [by_shard[k][2] for k in sorted(by_shard)]


def finish_times(pods: Iterable[Pod]) -> list[datetime]:
    return sorted(t.finished_at for p in pods if (t := p.succeeded) is not None and t.finished_at)


def training_progress(pods: Iterable[Pod], live: Mapping[str, Live] | None = None) -> TrainingProgress | None:
    """Rank 0's last report: the PyTorchJob master's, or the Indexed Job's pod 0. With ``live`` (while the
    training runs), the latest progress line of its log counts too: whichever was seen last wins (a
    restarted master's new line over its earlier attempt's message, and the other way round)."""
    found: list[tuple[float, TrainingProgress]] = []
    for pod in pods:
        if not pod.master:
            continue
        for term in pod.terminated:
            progress = lenient(TrainingProgress, term.json())
            if progress is not None:
                found.append((term.finished_at.timestamp() if term.finished_at else 0.0, progress))
        seen = (live or {}).get(pod.name)
        if seen is not None and isinstance(seen.report, TrainingProgress):
            found.append((seen.seen_at.timestamp(), seen.report))
    return max(found, key=lambda f: f[0])[1] if found else None


def live_summaries(pods: Iterable[Pod], live: Mapping[str, Live]) -> list[CollectionSummary]:
    """One summary per shard from the latest progress lines of the collection pods' logs (a retried
    shard's newest pod wins: its count includes what the earlier attempts answered)."""
    by_shard: dict[int, tuple[datetime, CollectionSummary]] = {}
    for pod in pods:
        seen = live.get(pod.name)
        if seen is None or not isinstance(seen.report, CollectionSummary):
            continue
        old = by_shard.get(seen.report.shard)
        if old is None or seen.seen_at >= old[0]:
            by_shard[seen.report.shard] = (seen.seen_at, seen.report)
    return [by_shard[k][1] for k in sorted(by_shard)]


def results(pods: Iterable[Pod]) -> Results | None:
    for pod in pods:
        done = pod.succeeded
        found = lenient(Results, done.json()) if done else None
        if found is not None:
            return found
    return None


def failure_detail(pods: Sequence[Pod]) -> str:
    """The last failed container's reason and message, for a failed stage's message."""
    failed: list[tuple[str, Terminated]] = [(p.name, t) for p in pods if (t := p.failed) is not None]
    if not failed:
        return ""
    name, term = failed[-1]
    text = _why(term)
    return f"pod {name} exited {term.exit_code} ({term.reason or 'Error'}){': ' + text if text else ''}"


# The fields of a stage's report (its termination message) that say why it stopped, in order.
WHY_FIELDS = ("stopped", "message", "error", "reason")


def _why(term: Terminated) -> str:
    """Why a container ended, in words: the reason its report gives (a shard stopped on a refused key
    says so, not its counts as JSON), else the last line of the log's tail the kubelet took
    (FallbackToLogsOnError), progress lines skipped. Anything shaped like a key is masked."""
    report = term.json()
    if report is not None:
        why = next((v for k in WHY_FIELDS if isinstance(v := report.get(k), str) and v.strip()), "")
        return scrub(why.strip())[:300]
    lines = [ln for ln in term.message.strip().splitlines() if not is_progress_line(ln)]
    return scrub(lines[-1])[:300] if lines else ""


# ---------------------------------------------------------------------------------------------- collection


def apply_collection(
    status: CollectionStatus,
    found: Sequence[CollectionSummary],
    shards: int,
    live: Sequence[CollectionSummary] = (),
) -> None:
    """Sum the shards' summaries into the stage's status: the finished shards' (``found``), and for the
    others the latest progress line of their running pod (``live``). ``total`` is known once every shard
    has reported one way or the other."""
    every = _merged(found, live)
    status.done = sum(s.done for s in every)
    status.failed = sum(s.failed for s in every)
    status.cached = sum(s.cached for s in every)
    status.input_tokens = sum(s.input_tokens for s in every)
    status.output_tokens = sum(s.output_tokens for s in every)
    status.retries = sum(s.retries for s in every)
    status.last_error = next((s.last_error for s in reversed(every) if s.last_error), None)
    status.total = sum(s.total for s in every) if len(every) == shards else None


def _merged(found: Sequence[CollectionSummary], live: Sequence[CollectionSummary]) -> list[CollectionSummary]:
    by_shard = {s.shard: s for s in live}
    by_shard.update({s.shard: s for s in found})  # a finished shard's own report wins
    return [by_shard[k] for k in sorted(by_shard)]


def collection_eta(
    found: Sequence[CollectionSummary], live: Sequence[CollectionSummary], shards: int
) -> float | None:
    """Seconds until the slowest running shard is done at its rate so far, once every shard has reported
    (finished, or a progress line); None before, or while a running shard has no rate yet."""
    every = _merged(found, live)
    finished = {s.shard for s in found}
    running = [s for s in every if s.shard not in finished]
    if not running or len(every) < shards or any(s.prompts_per_second <= 0 for s in running):
        return None
    return round(max(max(0, s.total - s.done - s.failed) / s.prompts_per_second for s in running), 1)


def apply_on_policy(st: TrainingStatus, progress: TrainingProgress, spec: DistillationRunSpec) -> None:
    """An ``onPolicy`` training's figures from rank 0's progress (its line or its report) into the training
    status, with the self-hosted teacher's GPU-hours for the cost; the other methods report none of them
    (the fields stay absent)."""
    if progress.teacher_tokens_scored is None:
        return
    st.teacher_tokens_scored = progress.teacher_tokens_scored
    st.teacher_scoring_seconds = _rounded(progress.teacher_scoring_seconds, 1)
    st.samples_per_second = _rounded(progress.samples_per_second, 3)
    st.divergence = _rounded(progress.divergence, 6)
    st.samples_ended = _rounded(progress.samples_ended, 4)
    st.teacher_logprob = _rounded(progress.teacher_logprob, 4)
    st.teacher_gpu_hours = _rounded(scoring_gpu_hours(spec, progress.elapsed_seconds), 4)


def _rounded(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def collection_summary(status: CollectionStatus, spec: DistillationRunSpec) -> CollectionSummary:
    """The whole collection as one summary, for the cost model (``run_cost``) once the shards are gone."""
    return CollectionSummary(
        shard=0,
        shards=1,
        total=status.total or status.done + status.failed,
        done=status.done,
        failed=status.failed,
        cached=status.cached,
        input_tokens=status.input_tokens,
        output_tokens=status.output_tokens,
        cost_usd=tokens_usd(status.input_tokens, status.output_tokens, spec.teacher.pricing),
    )


# ---------------------------------------------------------------------------------------------- conditions


def _condition(
    prior: Iterable[Condition],
    type_: str,
    status: str,
    reason: str,
    message: str,
    generation: int,
    now: datetime,
) -> Condition:
    old = next((c for c in prior if c.type == type_), None)
    since = old.last_transition_time if old is not None and old.status == status else now
    return Condition(
        type=type_,
        status=status,
        reason=reason,
        message=message,
        last_transition_time=since,
        observed_generation=generation,
    )


def conditions(
    prior: Sequence[Condition],
    *,
    phase: str,
    reason: str,
    message: str,
    degraded: tuple[str, str] | None,
    ready: tuple[bool, str, str],
    generation: int,
    now: datetime,
) -> list[Condition]:
    """Ready / Progressing / Degraded always; Succeeded or Failed once the run has ended.

    ``reason``/``message`` describe the phase (the running stage, or why the run ended); ``degraded`` is
    a retrying child's (reason, message) while the run goes on; ``ready`` is (status, reason, message).
    """
    terminal = phase in (PHASE_SUCCEEDED, PHASE_FAILED)
    out = [
        _condition(prior, COND_READY, "True" if ready[0] else "False", ready[1], ready[2], generation, now),
        _condition(
            prior, COND_PROGRESSING, "False" if terminal else "True", reason, message, generation, now
        ),
    ]
    if phase == PHASE_FAILED:
        out.append(_condition(prior, COND_DEGRADED, "True", reason, message, generation, now))
    elif degraded is not None:
        out.append(_condition(prior, COND_DEGRADED, "True", degraded[0], degraded[1], generation, now))
    else:
        out.append(_condition(prior, COND_DEGRADED, "False", REASON_AS_EXPECTED, "", generation, now))
    if phase == PHASE_SUCCEEDED:
        out.append(_condition(prior, COND_SUCCEEDED, "True", reason, message, generation, now))
    if phase == PHASE_FAILED:
        out.append(_condition(prior, COND_FAILED, "True", reason, message, generation, now))
    return out
