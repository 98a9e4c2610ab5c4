"""Quality retention from per-prompt scores: which score decides, the formula, the interval, categories.

Three modes, chosen in this order (``results.metric`` says which one decided):

- **judge** (``evaluation.judge`` set): per prompt, the student's and the teacher's mean pairwise score
  (1-10, both orders); retention = Σ student / Σ teacher over the prompts the judge scored. Reported
  scores are means / 10.
- **reference** (some held-out prompts carry a ``reference`` answer): the first of
  ``evaluation.metrics`` of the student's answer and of the teacher's collected answer, each against the
  reference; retention = Σ student / Σ teacher over the prompts with a reference (the teacher answered
  them all; a prompt the student failed to answer is left out of both sums).
- **agreement** (no reference anywhere): the teacher's answer is the reference, so the teacher scores
  1.0 against itself by definition; retention = the student's mean agreement with the teacher
  (= Σ agreement / Σ 1), teacherScore 1.0, and ``metric`` ends in "agreement with teacher".

The interval is the paired bootstrap of the same ratio (:func:`.stats.bootstrap_ratio`). A failed
request is never a score: prompts whose student answer (or judgment) failed are left out and counted.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from ..api.status import Interval
from .client import Completion
from .data import EvalItem
from .judge import MAX_SCORE, Judgment
from .metrics import METRIC_FUNCTIONS
from .stats import bootstrap_ratio, ratio_of_means

Mode = Literal["judge", "reference", "agreement"]


@dataclass
class ItemScore:
    item: EvalItem
    answer: Completion
    vs_reference: dict[str, float] = field(default_factory=dict)  # student vs reference
    teacher_vs_reference: dict[str, float] = field(default_factory=dict)
    agreement: dict[str, float] = field(default_factory=dict)  # student vs teacher
    judgment: Judgment | None = None

    def to_row(self) -> dict[str, Any]:
        row: dict[str, Any] = {
            "id": self.item.id,
            "category": self.item.category,
            "student": self.answer.text,
            "teacher": self.item.teacher,
            "reference": self.item.reference,
            "error": self.answer.error,
            "vsReference": self.vs_reference or None,
            "teacherVsReference": self.teacher_vs_reference or None,
            "agreement": self.agreement or None,
        }
        if self.judgment is not None:
            row["judge"] = {
                "student": self.judgment.student,
                "teacher": self.judgment.teacher,
                "error": self.judgment.error,
                "consistent": self.judgment.consistent,
                "raw": self.judgment.raw,
            }
        return {k: v for k, v in row.items() if v is not None}


def score_items(
    items: Sequence[EvalItem], answers: Sequence[Completion], metrics: Sequence[str]
) -> list[ItemScore]:
    out = []
    for item, answer in zip(items, answers, strict=True):
        s = ItemScore(item=item, answer=answer)
        if answer.ok and answer.text is not None:
            for name in metrics:
                fn = METRIC_FUNCTIONS[name]
                s.agreement[name] = fn(answer.text, item.teacher)
                if item.reference is not None:
                    s.vs_reference[name] = fn(answer.text, item.reference)
                    s.teacher_vs_reference[name] = fn(item.teacher, item.reference)
        out.append(s)
    return out


@dataclass
class Retention:
    mode: Mode
    metric: str
    formula: str
    student: list[float]  # the per-prompt pairs the ratio is over
    teacher: list[float]
    scale: float = 1.0  # divides reported scores (the judge's 1-10 → 0-1)
    retention: float | None = None
    interval: Interval | None = None
    problem: str | None = None

    @property
    def samples(self) -> int:
        return len(self.student)

    @property
    def student_score(self) -> float | None:
        return round(sum(self.student) / len(self.student) / self.scale, 6) if self.student else None

    @property
    def teacher_score(self) -> float | None:
        return round(sum(self.teacher) / len(self.teacher) / self.scale, 6) if self.teacher else None


def choose_mode(scores: Sequence[ItemScore], judged: bool) -> Mode:
    if judged:
        return "judge"
    return "reference" if any(s.item.reference is not None for s in scores) else "agreement"


def pairs(scores: Sequence[ItemScore], mode: Mode, metric: str) -> tuple[list[float], list[float]]:
    student: list[float] = []
    teacher: list[float] = []
    for s in scores:
        if mode == "judge":
            j = s.judgment
            if j is not None and j.ok and j.student is not None and j.teacher is not None:
                student.append(j.student)
                teacher.append(j.teacher)
        elif mode == "reference":
            if metric in s.vs_reference:
                student.append(s.vs_reference[metric])
                teacher.append(s.teacher_vs_reference[metric])
        elif metric in s.agreement:
            student.append(s.agreement[metric])
            teacher.append(1.0)
    return student, teacher


def retention(
    scores: Sequence[ItemScore],
    mode: Mode,
    metric: str,
    *,
    resamples: int,
    confidence: float,
) -> Retention:
    student, teacher = pairs(scores, mode, metric)
    if mode == "judge":
        r = Retention(
            mode, "llm-judge pairwise, score/10", "Σ student score / Σ teacher score (judge, both orders)",
            student, teacher, scale=MAX_SCORE,
        )  # fmt: skip
    elif mode == "reference":
        r = Retention(
            mode, f"{metric} vs reference", f"Σ {metric}(student, reference) / Σ {metric}(teacher, reference)",
            student, teacher,
        )  # fmt: skip
    else:
        r = Retention(
            mode, f"{metric} agreement with teacher", f"mean {metric}(student, teacher answer); teacher = 1",
            student, teacher,
        )  # fmt: skip
    if not student:
        r.problem = "no prompt has a usable score (every student answer or judgment failed)"
        return r
    value = ratio_of_means(student, teacher)
    if value is None:
        r.problem = f"the teacher scores 0 on {metric} against the references: retention is undefined"
        return r
    r.retention = round(value, 6)
    r.interval = bootstrap_ratio(student, teacher, resamples=resamples, confidence=confidence)
    return r


def by_category(
    scores: Sequence[ItemScore], mode: Mode, metric: str, *, resamples: int, confidence: float
) -> dict[str, dict[str, Any]]:
    """The same retention per ``category``, for prompts that carry one."""
    groups: dict[str, list[ItemScore]] = {}
    for s in scores:
        if s.item.category is not None:
            groups.setdefault(s.item.category, []).append(s)
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(groups):
        r = retention(groups[name], mode, metric, resamples=resamples, confidence=confidence)
        out[name] = {
            "prompts": len(groups[name]),
            "samples": r.samples,
            "retention": r.retention,
            "interval": r.interval.to_dict() if r.interval else None,
            "studentScore": r.student_score,
            "teacherScore": r.teacher_score,
        }
    return out


def metric_means(scores: Sequence[ItemScore], metrics: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for name in metrics:
        agree = [s.agreement[name] for s in scores if name in s.agreement]
        vs_ref = [s.vs_reference[name] for s in scores if name in s.vs_reference]
        t_ref = [s.teacher_vs_reference[name] for s in scores if name in s.teacher_vs_reference]
        out[name] = {
            "agreementWithTeacher": _mean(agree),
            "studentVsReference": _mean(vs_ref),
            "teacherVsReference": _mean(t_ref),
            "samples": len(agree),
        }
    return out


def judge_summary(scores: Sequence[ItemScore]) -> dict[str, Any]:
    judged = [s.judgment for s in scores if s.judgment is not None]
    ok = [j for j in judged if j.ok and j.student is not None and j.teacher is not None]
    margins = [(j.student or 0.0) - (j.teacher or 0.0) for j in ok]
    failures = Counter(j.error for j in judged if j.error is not None)
    return {
        "requested": len(judged),
        "scored": len(ok),
        "failures": dict(failures),
        "studentWins": sum(1 for m in margins if m > 0),
        "ties": sum(1 for m in margins if m == 0),
        "teacherWins": sum(1 for m in margins if m < 0),
        "positionConsistency": _mean([1.0 if j.consistent else 0.0 for j in ok]),
        "unreadableSamples": [j.raw for j in judged if j.error == "unparseable"][:3],
    }


def _mean(values: Sequence[float]) -> float | None:
    return round(sum(values) / len(values), 6) if values else None
