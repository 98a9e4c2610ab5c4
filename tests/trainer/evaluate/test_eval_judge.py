"""The judge's verdicts are read robustly, and anything unreadable is None (never a guessed score)."""

from __future__ import annotations

import pytest
from distillery_trainer.evaluate.judge import judge_messages, parse_scores


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Both fine, A is terser.\n[[A=8, B=6]]", (8.0, 6.0)),
        ("[[A: 7.5/10; B: 9/10]]", (7.5, 9.0)),
        ("format: [[A=<score>, B=<score>]]\nverdict: [[A=3, B=4]]", (3.0, 4.0)),  # the last verdict wins
        ("[[9, 2]]", (9.0, 2.0)),
        ('Here you go: {"A": 6, "B": 10}', (6.0, 10.0)),
        ('{"assistant_a": "5", "assistant_b": 7}', (5.0, 7.0)),
        ("**Assistant A**: 8/10\n**Assistant B**: 4 out of 10", (8.0, 4.0)),
        ("Score A: 6\nScore B = 7", (6.0, 7.0)),
        ("- A: 0\n- B: 10", (0.0, 10.0)),
    ],
)
def test_parse_scores_reads_common_verdict_forms(text: str, expected: tuple[float, float]) -> None:
    assert parse_scores(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        None,
        "",
        "Both answers are good; I cannot decide.",
        "[[A=11, B=5]]",  # out of the 1-10 scale: another scale, not guessed
        "Assistant A: 8",  # B missing
        "Assistant A's answer mentions 3 facts and B's mentions 2.",  # numbers, not scores
        '{"A": "good", "B": "bad"}',
    ],
)
def test_unreadable_verdicts_are_none(text: str | None) -> None:
    assert parse_scores(text) is None


def test_judge_prompt_carries_rubric_conversation_and_both_answers() -> None:
    msgs = judge_messages([{"role": "user", "content": "Q?"}], "ans-a", "ans-b", "Be strict.")
    body = msgs[-1]["content"]
    assert "Be strict." in body and "Q?" in body
    assert body.index("ans-a") < body.index("ans-b") and "[[A=<score>, B=<score>]]" in body
