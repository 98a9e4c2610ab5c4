"""The baseline: the untrained student's answers, which training leaves in ``train/baseline-answers.jsonl``
before its first step, scored exactly as the student's are (the same metric, mode and judge): what
distillation started from."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..api.stage import StageConfig
from ..layout import RunLayout
from .client import Completion, Log
from .data import EvalItem
from .judge import judge_scores
from .quality import Mode, Retention, retention, score_items


def read_baseline(
    layout: RunLayout, items: Sequence[EvalItem]
) -> tuple[list[EvalItem], list[Completion], int | None]:
    """The held-out prompts the untrained student answered (``train/baseline-answers.jsonl``), its
    answers, and the new tokens it was allowed."""
    answers: dict[str, str] = {}
    limit = None
    for line in layout.baseline_file.read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
            answers[str(row["id"])] = str(row["answer"])
            limit = int(row.get("maxNewTokens") or 0) or limit
        except (ValueError, KeyError, TypeError):
            continue
    covered = [it for it in items if it.id in answers]
    return covered, [Completion(text=answers[it.id]) for it in covered], limit


async def score_baseline(
    config: StageConfig,
    layout: RunLayout,
    items: Sequence[EvalItem],
    mode: Mode,
    sampling: dict[str, Any],
    notes: list[str],
    log: Log,
) -> tuple[Retention | None, dict[str, Any]]:
    """The untrained student's answers, scored exactly as the student's are (the same metric, mode and
    judge): what distillation started from."""
    ev = config.spec.evaluation
    if not layout.baseline_file.exists():
        why = (
            f"{layout.baseline_file.relative_to(layout.root)} is absent: training writes it before its first "
            "step when evaluation.baseline is on (not under FSDP with several ranks); train again to have it"
        )
        notes.append(f"no baseline score: {why}")
        return None, {"note": why}
    covered, answers, limit = read_baseline(layout, items)
    doc: dict[str, Any] = {"prompts": len(covered), "maxNewTokens": limit}
    if not covered:
        doc["note"] = "the baseline answers cover none of these held-out prompts"
        notes.append(f"no baseline score: {doc['note']}")
        return None, doc
    if len(covered) < len(items):
        notes.append(
            f"the baseline answers cover {len(covered)} of {len(items)} held-out prompts: scored on those"
        )
    if limit is not None and limit < sampling["max_tokens"]:
        notes.append(
            f"the untrained student answered with at most {limit} new tokens (evaluation.load.maxTokens), "
            f"the student with {sampling['max_tokens']}"
        )
    log(f"scoring the untrained student's answers to {len(covered)} held-out prompts")
    scores = score_items(covered, answers, ev.metrics)
    if ev.judge is not None:
        await judge_scores(config, scores, ev.load.concurrency, log)
    r = retention(scores, mode, ev.metrics[0], resamples=ev.bootstrap_samples, confidence=ev.confidence)
    doc.update(scored=r.samples, score=r.student_score, teacherScore=r.teacher_score, retention=r.retention)
    return r, doc
