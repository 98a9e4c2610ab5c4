"""``evaluate``: quality, latency and cost of the served student, and the gate verdict.

Reads the held-out prompts and the teacher's answers from ``collect/``, asks the student (and the judge),
runs the latency harness against the student (and the teacher, when asked and reachable), prices the run
from ``collect/summary-*.json`` and ``train/progress.json``, then writes, in this order:
``eval/items.jsonl`` (every prompt's answers and scores), the report (``eval/report.md`` + PNGs),
``eval/results.json`` (the commit point) and the termination message (the status ``Results``, ≤ 4 KiB).
With ``evaluation.baseline``, the untrained student's answers that training left in
``train/baseline-answers.jsonl`` are scored the same way (``baselineScore``, ``baselineRetention``).
Latency: each endpoint gets ``evaluation.load.warmupRequests`` first (not counted), then the same load.

Nothing that goes wrong with a request ends the evaluation: failures are counted by kind and left out
of every score, and their share (``errorFraction``) is held against ``evaluation.maxErrorFraction`` by
the gate. The exit code is 0 when a retention figure came out (the gate verdict is in the
results, pass or fail), 1 when it could not (no held-out prompts, no student, nothing scored) — the
results are written either way.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .. import outputs, provenance
from ..api.base import API_GROUP, API_VERSION
from ..api.spec import DistillationRunSpec, Evaluation, Load
from ..api.stage import StageConfig
from ..api.stages import verdict
from ..api.status import Results
from ..api.summaries import CollectionSummary, TrainingProgress
from ..cost import run_cost, scoring_of
from ..layout import RunLayout, atomic_write, atomic_write_json
from ..redact import scrub_obj
from ..termination import write_termination_message
from .baseline import read_baseline, score_baseline
from .client import MAX_RETRIES, ChatClient, Completion, Log, bounded
from .data import EvalData, load_eval_items
from .judge import judge_scores
from .latency import LoadResult, run_load
from .quality import (
    Retention,
    by_category,
    choose_mode,
    judge_summary,
    metric_means,
    retention,
    score_items,
)
from .report import write_report


def _stderr(msg: str) -> None:
    print(f"evaluate: {msg}", file=sys.stderr, flush=True)


@dataclass
class Outcome:
    doc: dict[str, Any]  # what results.json holds
    results: Results  # the status shape (the termination message)
    exit_code: int
    rows: list[dict[str, Any]]  # eval/items.jsonl
    examples: list[dict[str, Any]]  # a few answers side by side, for the report


def sampling_of(spec: DistillationRunSpec) -> dict[str, Any]:
    """The student is sampled exactly as the teacher was for the collection."""
    s = spec.teacher.sampling
    out: dict[str, Any] = {"temperature": s.temperature, "top_p": s.top_p, "max_tokens": s.max_tokens}
    if s.seed is not None:
        out["seed"] = s.seed
    return out


def gate_of(results: Results, evaluation: Evaluation, problem: str | None) -> dict[str, Any]:
    """results.json's ``gate``: the verdict (:func:`~distillery_trainer.api.stages.verdict`) and its parts."""
    v = verdict(results, evaluation)
    out: dict[str, Any] = {
        "threshold": evaluation.min_quality_retention,
        "retention": results.quality_retention,
        "passed": v.passed,
        "conclusive": v.conclusive,
    }
    if results.retention_interval is not None:
        out["interval"] = results.retention_interval.to_dict()
    why = f" ({problem})" if results.quality_retention is None and problem else ""
    out["verdict"] = f"{'PASSED' if v.passed else 'FAILED'}: {v.message}{why}"
    return out


def _read_cost_inputs(
    layout: RunLayout, notes: list[str]
) -> tuple[list[CollectionSummary], TrainingProgress | None]:
    summaries = []
    for path in sorted(layout.collect_dir.glob("summary-*.json")):
        try:
            summaries.append(CollectionSummary.model_validate(json.loads(path.read_text(encoding="utf-8"))))
        except ValueError as exc:
            notes.append(f"{path.name} is unreadable and was left out of the cost: {str(exc)[:200]}")
    progress = None
    if layout.progress_file.exists():
        try:
            progress = TrainingProgress.model_validate(
                json.loads(layout.progress_file.read_text(encoding="utf-8"))
            )
        except ValueError as exc:
            notes.append(f"train/progress.json is unreadable, training cost unknown: {str(exc)[:200]}")
    return summaries, progress


async def measured_load(
    client: ChatClient,
    prompts: list[list[dict[str, Any]]],
    load: Load,
    sampling: dict[str, Any],
    who: str,
    log: Log,
) -> LoadResult:
    """One endpoint's latency, measured as every endpoint's is: ``load.warmup()`` requests first (at the
    same concurrency, prompts and sampling; not counted: a server's first requests pay for compilation,
    CUDA graphs and caches), then ``load.requests`` streamed requests at ``load.concurrency``."""
    warm = load.warmup()
    if warm:
        log(f"{who} latency: {warm} warm-up requests (not counted)")
        await run_load(client, prompts, requests=warm, concurrency=load.concurrency, sampling=sampling)
    log(f"{who} latency: {load.requests} streamed requests at concurrency {load.concurrency}")
    return await run_load(
        client, prompts, requests=load.requests, concurrency=load.concurrency, sampling=sampling
    )


async def _teacher_load(
    config: StageConfig, prompts: list[list[dict[str, Any]]], sampling: dict[str, Any], log: Log
) -> tuple[LoadResult | None, str | None]:
    load = config.spec.evaluation.load
    try:
        endpoint = config.teacher_endpoint()
    except ValueError as exc:
        return None, f"not measured: {exc}"
    async with ChatClient(
        endpoint.base_url,
        endpoint.model,
        config.teacher_api_key(),
        timeout=config.spec.collection.timeout_seconds,
        concurrency=load.concurrency,
    ) as client:
        why = await client.reachable()
        if why is not None:
            return None, f"not measured: the teacher endpoint {endpoint.base_url} is unreachable ({why})"
        return await measured_load(client, prompts, load, sampling, "teacher", log), None


async def _measure(config: StageConfig, log: Log) -> Outcome:
    started = time.monotonic()
    spec, ev = config.spec, config.spec.evaluation
    layout = RunLayout(Path(config.artifacts))
    notes: list[str] = []
    data: EvalData = load_eval_items(layout, ev.max_samples)
    if data.bad_lines:
        notes.append(f"{data.bad_lines} unreadable line(s) in collect/shard-*.jsonl were skipped")
    if data.duplicates:
        notes.append(f"{data.duplicates} duplicate held-out prompt(s) counted once")
    items = data.items
    sampling = sampling_of(spec)
    load_sampling = dict(sampling, max_tokens=ev.load.max_tokens or sampling["max_tokens"])
    limit = ev.load.concurrency
    timeout = spec.collection.timeout_seconds

    problem = None
    if not items:
        problem = (
            f'no held-out prompts: {layout.collect_dir}/shard-*.jsonl has no lines with "split": "eval" '
            f"({data.shards} shard file(s) read; data.evalFraction decides the split at collection)"
        )
    elif config.student is None:
        problem = (
            "the stage config has no student endpoint: set `student: {baseURL, model}` (the served student)"
        )

    answers: list[Completion] = []
    student_load: LoadResult | None = None
    teacher_load: LoadResult | None = None
    teacher_note: str | None = None
    scores = score_items([], [], ev.metrics)
    prompts = [it.messages for it in items]
    if problem is None and config.student is not None:
        async with ChatClient(
            config.student.base_url,
            config.student.model,
            timeout=timeout,
            max_retries=MAX_RETRIES,
            concurrency=limit,
        ) as student:
            why = await student.reachable()
            if why is not None:
                problem = (
                    f"the student endpoint {config.student.base_url} does not answer ({why}): is it served?"
                )
            else:
                log(f"{len(items)} held-out prompts; asking the student ({config.student.model})")
                answers = await bounded(
                    items, lambda it: student.complete(it.messages, **sampling), limit, "student answers", log
                )
                scores = score_items(items, answers, ev.metrics)
                if ev.judge is not None:
                    await judge_scores(config, scores, limit, log)
                student_load = await measured_load(student, prompts, ev.load, load_sampling, "student", log)
        if problem is not None:
            pass
        elif ev.load.compare_teacher:
            teacher_load, teacher_note = await _teacher_load(config, prompts, load_sampling, log)
        else:
            teacher_note = "not measured (evaluation.load.compareTeacher is false)"

    mode = choose_mode(scores, ev.judge is not None)
    r = retention(scores, mode, ev.metrics[0], resamples=ev.bootstrap_samples, confidence=ev.confidence)
    baseline: Retention | None = None
    baseline_doc: dict[str, Any] | None = None
    if ev.baseline and problem is None:
        baseline, baseline_doc = await score_baseline(config, layout, items, mode, sampling, notes, log)
    if problem is not None:
        r.problem = problem
    student_errors = Counter(a.error for a in answers if a.error is not None)
    judge = judge_summary(scores) if ev.judge is not None else None
    judge_request_failures = sum(
        v for k, v in (judge or {}).get("failures", {}).items() if k != "unparseable"
    )
    load_errors = sum(student_load.errors.values()) if student_load else 0
    asked = len(answers) + (student_load.requests if student_load else 0)
    error_fraction = round((sum(student_errors.values()) + load_errors) / asked, 4) if asked else None
    summaries, progress = _read_cost_inputs(layout, notes)
    scored, teacher_hours = scoring_of(spec, progress)
    gpu_hours = progress.gpu_hours if progress else None
    cost = run_cost(
        spec,
        summaries,
        gpu_hours,
        scored_tokens=scored,
        teacher_gpu_hours=teacher_hours,
    )
    results = Results(
        quality_retention=r.retention,
        retention_interval=r.interval,
        student_score=r.student_score,
        teacher_score=r.teacher_score,
        baseline_score=baseline.student_score if baseline else None,
        baseline_retention=baseline.retention if baseline else None,
        metric=r.metric,
        samples=r.samples,
        latency_ms=student_load.to_latency() if student_load else None,
        teacher_latency_ms=teacher_load.to_latency() if teacher_load else None,
        throughput_tokens_per_sec=_round(student_load.tokens_per_second()) if student_load else None,
        errors=sum(student_errors.values()) + judge_request_failures + load_errors,
        error_fraction=error_fraction,
        cost=cost,
    )
    gate = gate_of(results, ev, r.problem)
    results.gate_passed = gate["passed"]
    if student_errors:
        notes.append(
            f"{sum(student_errors.values())} of {len(items)} student answers failed ({dict(student_errors)}): "
            "left out of every score"
        )
    if judge and judge["failures"]:
        notes.append(
            f"{judge['requested'] - judge['scored']} judgment(s) unusable ({judge['failures']}): left out"
        )
    doc: dict[str, Any] = {
        "apiVersion": f"{API_GROUP}/{API_VERSION}",
        "kind": "EvaluationResults",
        "run": {"name": config.run.name, "namespace": config.run.namespace},
        "finishedAt": datetime.now(UTC).isoformat(timespec="seconds"),
        "durationSeconds": round(time.monotonic() - started, 3),
        "results": {},
        "gate": gate,
        "quality": {
            "mode": r.mode,
            "metric": r.metric,
            "formula": r.formula,
            "prompts": len(items),
            "answered": sum(1 for a in answers if a.ok),
            "scored": r.samples,
            "studentErrors": dict(student_errors),
            "problem": r.problem,
            "metrics": metric_means(scores, ev.metrics),
            "judge": judge,
            "baseline": baseline_doc,
            "categories": by_category(
                scores, mode, ev.metrics[0], resamples=ev.bootstrap_samples, confidence=ev.confidence
            ),
        },
        "latency": {
            "student": student_load.summary() if student_load else None,
            "teacher": teacher_load.summary() if teacher_load else None,
            "teacherNote": teacher_note,
            "sampling": load_sampling,
            # How it was measured, the same for both endpoints.
            "warmupRequests": ev.load.warmup(),
            "requests": ev.load.requests,
            "concurrency": ev.load.concurrency,
        },
        "cost": {
            **cost.to_dict(),
            "gpuHours": gpu_hours,
            "collectionShards": len(summaries),
            **({"teacherTokensScored": scored} if scored is not None else {}),
            **({"teacherGpuHours": teacher_hours} if teacher_hours is not None else {}),
        },
        "data": {
            "shards": data.shards,
            "heldOut": len(items),
            "badLines": data.bad_lines,
            "duplicates": data.duplicates,
        },
        "notes": notes,
    }
    baseline_answers = (
        {i.id: a.text for i, a in zip(*read_baseline(layout, items)[:2], strict=True)}
        if baseline is not None
        else {}
    )
    examples = [
        {
            "prompt": s.item.messages[-1].get("content", ""),
            "teacher": s.item.teacher,
            "student": s.answer.text,
            "baseline": baseline_answers.get(s.item.id),
        }
        for s in scores[:5]
    ]
    ok = problem is None and r.retention is not None
    return Outcome(doc, results, 0 if ok else 1, [s.to_row() for s in scores], examples)


def _round(v: float | None) -> float | None:
    return round(v, 3) if v is not None else None


async def evaluate_async(
    config: StageConfig, *, log: Log = _stderr, termination_path: str | None = None
) -> Outcome:
    """The whole evaluation, its outputs written; never raises for a failed request. For callers that
    already run an event loop; :func:`evaluate` is the synchronous entry point."""
    layout = RunLayout(Path(config.artifacts))
    outputs.require(layout, "collect", config.spec, by="evaluate")
    outputs.require(layout, "train", config.spec, by="evaluate")
    outputs.claim(layout, "evaluate", config.spec, log)
    out = await _measure(config, log)
    atomic_write(layout.eval_dir / "items.jsonl", "".join(json.dumps(r) + "\n" for r in out.rows))
    out.doc["results"] = out.results.to_dict()
    out.results.report = str(write_report(layout, out.doc, out.examples))
    if layout.student_dir.is_dir():  # the model card and provenance beside the student, completed
        out.results.provenance_digest = provenance.record_evaluation(
            layout, config.run, config.spec, out.results, out.doc["gate"]
        )
    out.doc["results"] = out.results.to_dict()
    atomic_write_json(layout.results_file, scrub_obj(out.doc))
    write_termination_message(out.results.to_dict(), termination_path)
    log(out.doc["gate"]["verdict"])
    return out


def evaluate(config: StageConfig, *, log: Log = _stderr, termination_path: str | None = None) -> Outcome:
    """Run the whole evaluation and write its outputs; never raises for a failed request."""
    return asyncio.run(evaluate_async(config, log=log, termination_path=termination_path))
