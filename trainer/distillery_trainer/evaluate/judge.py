"""The LLM judge: pairwise, with the positions swapped, against a rubric; scores parsed robustly.

Each held-out prompt is judged twice — teacher's answer as A and student's as B, then the other way
round — and each answer's score is the mean of its two scores, which cancels the judge's preference for
a position. A prompt counts only when both judgments parse; a judge request that fails or an answer
without readable scores is reported (by kind) and never becomes a score.

Scores are on the rubric's 1-10 scale (0 is accepted, above 10 is not: that is another scale, and
guessing it would be wrong). The parser reads, in this order, the final-verdict line we ask for
(``[[A=8, B=6]]``), a bare pair (``[[8, 6]]``), a JSON object (``{"A": 8, "B": 6}``) and labelled lines
(``Assistant A: 8/10`` / ``**Score B**: 6``); the last verdict wins, since judges often restate the
format before giving theirs.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Any

from ..api.stage import StageConfig
from .client import MAX_RETRIES, ChatClient, Log, bounded

DEFAULT_RUBRIC = (
    "Judge which answer better serves the user. Correctness comes first (facts, numbers, dates, names, "
    "code that would work), then whether it does what was asked (format, length, language), then "
    "clarity. Do not reward length for its own sake, and do not let the order of the answers influence you."
)
SYSTEM = "You are an impartial, careful judge of AI assistants' answers."
TEMPLATE = """[Rubric]
{rubric}

[Conversation]
{question}

[Answer of Assistant A]
{a}
[End of Answer A]

[Answer of Assistant B]
{b}
[End of Answer B]

Rate each answer from 1 (useless) to 10 (perfect) following the rubric. Explain briefly, then end with
one line exactly in this form: [[A=<score>, B=<score>]]"""

JUDGE_SAMPLING: dict[str, Any] = {"temperature": 0.0, "max_tokens": 512}
MAX_SCORE = 10.0

_NUM = r"(\d{1,3}(?:\.\d+)?)"
_OF10 = r"(?:\s*/\s*10|\s+out\s+of\s+10)?"
_VERDICT = re.compile(
    rf"\[\[\s*A\s*[=:]\s*{_NUM}{_OF10}\s*[,;]?\s*B\s*[=:]\s*{_NUM}{_OF10}\s*\]\]", re.IGNORECASE
)
_PAIR = re.compile(rf"\[\[\s*{_NUM}{_OF10}\s*[,;/]?\s*{_NUM}{_OF10}\s*\]\]")
_JSON = re.compile(r"\{[^{}]*\}")


def _label(side: str) -> re.Pattern[str]:
    return re.compile(
        rf"^[\W_]*(?:final\s+)?(?:score\s+(?:for\s+)?)?(?:assistant|answer|response)?\s*{side}"
        rf"(?:'s)?(?:\s+score)?[\W_]{{0,3}}?\s*[:=\-]\s*\**\s*{_NUM}{_OF10}",
        re.IGNORECASE | re.MULTILINE,
    )


_LABELS = {"A": _label("A"), "B": _label("B")}


def _valid(a: float, b: float) -> tuple[float, float] | None:
    if 0.0 <= a <= MAX_SCORE and 0.0 <= b <= MAX_SCORE:
        return a, b
    return None


def _json_scores(text: str) -> tuple[float, float] | None:
    found = None
    for m in _JSON.finditer(text):
        try:
            obj = json.loads(m.group(0))
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        keys = {str(k).lower().replace("-", "_"): v for k, v in obj.items()}
        a = next((keys[k] for k in ("a", "assistant_a", "score_a", "answer_a") if k in keys), None)
        b = next((keys[k] for k in ("b", "assistant_b", "score_b", "answer_b") if k in keys), None)
        try:
            found = (float(a), float(b)) if a is not None and b is not None else found
        except (TypeError, ValueError):
            continue
    return found


def parse_scores(text: str | None) -> tuple[float, float] | None:
    """(score of A, score of B) from a judge's answer, or None when it holds no readable verdict."""
    if not text:
        return None
    for pattern in (_VERDICT, _PAIR):
        matches = pattern.findall(text)
        if matches:
            a, b = matches[-1]
            return _valid(float(a), float(b))
    pair = _json_scores(text)
    if pair is not None:
        return _valid(*pair)
    a_hits, b_hits = _LABELS["A"].findall(text), _LABELS["B"].findall(text)
    if a_hits and b_hits:
        return _valid(float(a_hits[-1]), float(b_hits[-1]))
    return None


def render_conversation(messages: list[dict[str, Any]]) -> str:
    if len(messages) == 1 and messages[0].get("role") == "user":
        return str(messages[0].get("content", ""))
    return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in messages)


def judge_messages(
    messages: list[dict[str, Any]], a: str, b: str, rubric: str | None
) -> list[dict[str, Any]]:
    prompt = TEMPLATE.format(
        rubric=rubric or DEFAULT_RUBRIC, question=render_conversation(messages), a=a, b=b
    )
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]


@dataclass
class Judgment:
    student: float | None = None  # mean of the student's two scores (1-10)
    teacher: float | None = None
    error: str | None = None  # judge_<kind> for a failed request, "unparseable" for an unreadable verdict
    consistent: bool | None = None  # the same answer preferred (or a tie) in both orders
    raw: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None


def _sign(x: float) -> int:
    return (x > 0) - (x < 0)


async def judge_pair(
    client: ChatClient,
    messages: list[dict[str, Any]],
    teacher_answer: str,
    student_answer: str,
    rubric: str | None = None,
) -> Judgment:
    first, second = await asyncio.gather(
        client.complete(judge_messages(messages, teacher_answer, student_answer, rubric), **JUDGE_SAMPLING),
        client.complete(judge_messages(messages, student_answer, teacher_answer, rubric), **JUDGE_SAMPLING),
    )
    raw = [(c.text or "")[-400:] for c in (first, second)]
    failed = next((c for c in (first, second) if not c.ok), None)
    if failed is not None:
        return Judgment(error=f"judge_{failed.error}", raw=raw)
    s1, s2 = parse_scores(first.text), parse_scores(second.text)
    if s1 is None or s2 is None:
        return Judgment(error="unparseable", raw=raw)
    teacher = (s1[0] + s2[1]) / 2.0
    student = (s1[1] + s2[0]) / 2.0
    consistent = _sign(s1[0] - s1[1]) == _sign(s2[1] - s2[0])
    return Judgment(student=student, teacher=teacher, consistent=consistent, raw=raw)


async def judge_scores(config: StageConfig, scores: list[Any], limit: int, log: Log) -> None:
    """Judge every answered item of ``scores`` (each pair in both orders), at most ``limit`` at a time."""
    judge = config.spec.evaluation.judge
    assert judge is not None
    todo = [s for s in scores if s.answer.ok and s.answer.text is not None]
    async with ChatClient(
        judge.endpoint.base_url,
        judge.endpoint.model,
        config.judge_api_key(),
        timeout=config.spec.collection.timeout_seconds,
        max_retries=MAX_RETRIES,
        concurrency=2 * limit,
    ) as client:
        log(f"judging {len(todo)} answer pairs with {judge.endpoint.model} (both orders)")

        async def one(s: Any) -> None:
            s.judgment = await judge_pair(
                client, s.item.messages, s.item.teacher, s.answer.text, judge.rubric
            )

        await bounded(todo, one, limit, "judged", log)
