"""Reference metrics against hand-worked examples (SQuAD's EM/F1; ROUGE-L's examples from Lin, 2004)."""

from __future__ import annotations

import random

import pytest
from distillery_trainer.evaluate.metrics import exact_match, lcs_length, normalize, rouge_l, token_f1


def test_exact_match_compares_normalised_text() -> None:
    assert normalize("  The  Paris. ") == "paris"
    assert exact_match("The Paris.", "paris") == 1.0
    assert exact_match("Paris, France", "Paris") == 0.0
    assert exact_match("", "") == 1.0


def test_token_f1_by_hand() -> None:
    # "the cat sat on the mat" -> cat sat on mat; "a cat sat on a red mat" -> cat sat on red mat
    # common 4: P = 4/4, R = 4/5, F1 = 2 * 1 * 0.8 / 1.8
    assert token_f1("the cat sat on the mat", "a cat sat on a red mat") == pytest.approx(8 / 9)
    # repeated tokens count as often as they appear in both: common {x: 1}, P = 1/3, R = 1/1
    assert token_f1("x x y", "x") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert token_f1("Paris", "London") == 0.0
    assert token_f1("", "Paris") == 0.0 and token_f1("", "") == 1.0


def test_rouge_l_examples_from_the_rouge_paper() -> None:
    reference = "police killed the gunman"
    # S2 "police kill the gunman": LCS "police the gunman" = 3 of 4 either way -> 3/4
    assert rouge_l("police kill the gunman", reference) == pytest.approx(0.75)
    # S3 "the gunman kill police": LCS "the gunman" = 2 -> 1/2
    assert rouge_l("the gunman kill police", reference) == pytest.approx(0.5)
    # different lengths: LCS 2 ("a c"), P = 2/2, R = 2/4 -> F1 = 2/3
    assert rouge_l("A, c!", "a b c d") == pytest.approx(2 / 3)
    assert rouge_l("", "") == 1.0 and rouge_l("x", "") == 0.0


def _lcs_dp(a: list[str], b: list[str]) -> int:
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def test_bit_parallel_lcs_matches_the_textbook_programme() -> None:
    rng = random.Random(7)
    for _ in range(300):
        a = [rng.choice("abcde") for _ in range(rng.randint(0, 40))]
        b = [rng.choice("abcde") for _ in range(rng.randint(0, 90))]
        assert lcs_length(a, b) == _lcs_dp(a, b)
