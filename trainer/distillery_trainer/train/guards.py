"""Checks that stop a run early and say why: a teacher whose token ids mean something else to the student
(refused before the first step), and a loss that is no longer finite (stopped at that step)."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from ..data.shards import DataError
from ..data.topk import TopKReader, tokenizer_identity

KD_ALTERNATIVE = (
    "use training.method: sft or seqkd (they learn from the teacher's text, any tokenizer), or a student "
    "from the teacher's model family (same tokenizer)"
)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message names the cause and the fix."""


class TokenizerMismatch(TrainingError, DataError):
    pass


class NonFiniteLoss(TrainingError):
    def __init__(self, step: int, loss: float) -> None:
        self.step = step
        super().__init__(
            f"the loss is {loss} at step {step}: training stopped before applying that step's update "
            "(the last checkpoint is intact). Lower training.learningRate, use precision fp32 or bf16 rather "
            "than fp16, or check the student model's weights and the collected data"
        )


def _describe(identity: dict[str, Any]) -> str:
    return (
        f"{identity.get('name_or_path') or '?'} (vocabulary {identity.get('vocab_size', '?')}, "
        f"hash {identity.get('vocab_sha256', '?')})"
    )


def check_topk_tokenizer(files: Iterable[TopKReader], student_tokenizer: Any, model_vocab: int) -> None:
    """The top-k files' tokenizer must be the student's: same vocabulary, same ids."""
    student = tokenizer_identity(student_tokenizer)
    for f in files:
        teacher = f.tokenizer
        same_hash = teacher.get("vocab_sha256") == student["vocab_sha256"]
        if teacher.get("vocab_sha256") and not same_hash:
            raise TokenizerMismatch(
                f"training.method kd: the teacher's logprobs in {f.files[-1].name} were made with tokenizer "
                f"{_describe(teacher)}, but the student's tokenizer is {_describe(student)}. Logit KD compares "
                f"the two distributions token id by token id, so both models must share a tokenizer: "
                f"{KD_ALTERNATIVE}"
            )
        top = _max_id(f)
        if top >= min(model_vocab, student["vocab_size"]) or (
            not teacher.get("vocab_sha256") and teacher.get("vocab_size") not in (None, student["vocab_size"])
        ):
            raise TokenizerMismatch(
                f"training.method kd: the teacher's logprobs in {f.files[-1].name} use token ids up to {top} "
                f"(tokenizer {_describe(teacher)}), beyond or unlike the student's vocabulary of "
                f"{student['vocab_size']} ({_describe(student)}): {KD_ALTERNATIVE}"
            )


def _max_id(f: TopKReader, sample: int = 64) -> int:
    top = -1
    for key in sorted(f.keys())[:sample]:
        answer = f.get(key)
        if answer is not None and len(answer):
            top = max(top, int(answer.tokens.max()), int(answer.ids.max()))
    return top


def check_text_agrees(decoded: str, response: str, key: str) -> None:
    """Without a tokenizer hash: the teacher's token ids must decode (with the student's tokenizer) to its
    answer; if not, the ids mean something else to the student."""
    a, b = "".join(decoded.split()), "".join(response.split())
    if a and b and a[: len(b)] != b[: len(a)]:
        raise TokenizerMismatch(
            f"training.method kd: answer {key!r}: the teacher's token ids decode with the student's tokenizer "
            f"to {decoded[:60]!r}, not to the teacher's text {response[:60]!r}; the two tokenizers differ: "
            f"{KD_ALTERNATIVE}"
        )


def check_online_tokenizer(
    teacher_tokenizer: Any, student_tokenizer: Any, what: str = "training.kd.source online"
) -> None:
    """The teacher's tokenizer must be the student's (online KD, and on-policy: ``what`` names the setting)."""
    teacher, student = tokenizer_identity(teacher_tokenizer), tokenizer_identity(student_tokenizer)
    if teacher["vocab_sha256"] != student["vocab_sha256"]:
        raise TokenizerMismatch(
            f"{what}: the teacher's tokenizer {_describe(teacher)} differs from the "
            f"student's {_describe(student)}; the teacher's token scores need one tokenizer: {KD_ALTERNATIVE}"
        )


def check_finite(step: int, loss: float) -> None:
    if not math.isfinite(loss):
        raise NonFiniteLoss(step, loss)
