"""Collected answers → token sequences the loss can use: the student's chat template around the prompt, the
teacher's answer as the only supervised part (the prompt and padding are masked out of every loss).

- sft / seqkd: the answer text is tokenized with the student's tokenizer, followed by the tokens that close an
  assistant turn in its chat template (up to its end-of-turn/EOS token), so the student learns to stop. An
  answer cut by ``maxTokens`` gets no end-of-turn: the student should not learn to stop there.
- kd from top-k: the answer is the teacher's own token ids from the top-k file (the rows describe exactly
  those positions); closing tokens the teacher did not emit are supervised by a one-hot teacher row.
- kd online: the same tokens; the teacher sees the prompt through its own chat template.

Examples longer than ``maxSeqLength`` lose the end of their answer; a prompt that leaves no room for an
answer drops the example (counted and reported).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..data.shards import Answer, DataError
from ..data.topk import TopKReader
from .guards import check_text_agrees

log = logging.getLogger(__name__)

# ChatML: set on a student tokenizer that has no chat template (a base model), and saved with the student,
# so training and serving (vLLM reads the template from the tokenizer) format prompts the same way.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_PLACEHOLDER = "\u2063DISTILLERY-ANSWER\u2063"


@dataclass
class Example:
    input_ids: np.ndarray  # int64 [L]: prompt then answer
    n_prompt: int
    topk_ids: np.ndarray | None = None  # int32 [L - n_prompt, k], one row per answer token
    topk_logprobs: np.ndarray | None = None  # float16 [L - n_prompt, k]
    teacher_prompt: np.ndarray | None = None  # int64: the prompt in the teacher's template (online KD)

    @property
    def n_answer(self) -> int:
        return int(self.input_ids.shape[0]) - self.n_prompt

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def teacher_length(self) -> int:
        tp = self.teacher_prompt
        return (len(tp) if tp is not None else self.n_prompt) + self.n_answer


@dataclass
class BuildStats:
    answers: int = 0
    examples: int = 0
    dropped_long_prompt: int = 0
    truncated: int = 0
    missing_topk: int = 0
    notes: list[str] = field(default_factory=list)


class ChatFormat:
    """One tokenizer's chat template: prompt ids and the tokens that close an assistant turn."""

    def __init__(self, tokenizer: Any, end_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        if not getattr(tokenizer, "chat_template", None):
            tokenizer.chat_template = CHATML_TEMPLATE
        ends = set(end_ids)
        if tokenizer.eos_token_id is not None:
            ends.add(int(tokenizer.eos_token_id))
        self.end_ids = ends
        self._closing: list[int] | None = None

    def render(self, messages: list[dict[str, Any]], generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
        return str(text)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        return self.encode(self.render(messages, True))

    def closing(self) -> list[int]:
        """The tokens after an assistant message's content, up to and including the first end token."""
        if self._closing is None:
            probe = [{"role": "user", "content": "x"}]
            head = self.render(probe, True)
            full = self.render([*probe, {"role": "assistant", "content": _PLACEHOLDER}], False)
            _, found, tail = full.partition(_PLACEHOLDER)
            ids = self.encode(tail) if found and full.startswith(head) else []
            cut = next((i for i, t in enumerate(ids) if t in self.end_ids), None)
            if cut is not None:
                ids = ids[: cut + 1]
            elif self.tokenizer.eos_token_id is not None:
                ids = [*self.encode(tail.rstrip()), int(self.tokenizer.eos_token_id)] if found else []
                ids = ids or [int(self.tokenizer.eos_token_id)]
            self._closing = ids
        return list(self._closing)

    def answer(self, text: str, finished: bool) -> list[int]:
        return self.encode(text) + (self.closing() if finished else [])


def build_examples(
    answers: Sequence[Answer],
    student: ChatFormat,
    *,
    max_len: int,
    topk: dict[int, TopKReader] | None = None,
    teacher: ChatFormat | None = None,
) -> tuple[list[Example], BuildStats]:
    stats = BuildStats(answers=len(answers))
    out: list[Example] = []
    checked_text = 0
    for a in answers:
        prompt = student.prompt(a.messages)
        if len(prompt) >= max_len - 1:
            stats.dropped_long_prompt += 1
            continue
        ids_rows = lp_rows = None
        if topk is not None:
            file = topk.get(a.shard)
            got = file.get(a.key) if file is not None else None
            if got is None or len(got) == 0 or bool((got.tokens < 0).any()):
                # (a token id of -1: the teacher answered with text its tokenizer does not know)
                stats.missing_topk += 1
                continue
            if file is not None and not file.tokenizer.get("vocab_sha256") and checked_text < 8:
                check_text_agrees(student.tokenizer.decode(got.tokens.tolist()), a.response, a.key)
                checked_text += 1
            answer = got.tokens.astype(np.int64).tolist()
            # Positions with fewer than k alternatives are padded with id -1 and logprob -inf: point the
            # padding at id 0 (a valid index); its -inf logprob keeps it out of the loss.
            ids_rows, lp_rows = np.where(got.ids < 0, 0, got.ids), got.logprobs
            closing = student.closing() if a.finished and answer[-1] not in student.end_ids else []
            if closing:
                answer += closing
                ids_rows, lp_rows = _append_onehot(ids_rows, lp_rows, closing)
        else:
            answer = student.answer(a.response, a.finished)
        room = max_len - len(prompt)
        if len(answer) > room:
            stats.truncated += 1
            answer = answer[:room]
            if ids_rows is not None and lp_rows is not None:
                ids_rows, lp_rows = ids_rows[:room], lp_rows[:room]
        out.append(
            Example(
                input_ids=np.asarray(prompt + answer, dtype=np.int64),
                n_prompt=len(prompt),
                topk_ids=ids_rows,
                topk_logprobs=lp_rows,
                teacher_prompt=np.asarray(teacher.prompt(a.messages), dtype=np.int64) if teacher else None,
            )
        )
    stats.examples = len(out)
    if stats.dropped_long_prompt:
        stats.notes.append(
            f"{stats.dropped_long_prompt} answers dropped: their prompt leaves no room within "
            f"training.maxSeqLength={max_len}"
        )
    if stats.truncated:
        stats.notes.append(f"{stats.truncated} answers truncated to training.maxSeqLength={max_len}")
    if stats.missing_topk:
        stats.notes.append(f"{stats.missing_topk} answers have no top-k logprobs and were left out")
    if not out and answers:
        raise DataError(
            f"none of the {len(answers)} training answers can be used: "
            + "; ".join(stats.notes)
            + (" (did collection run with teacher.logprobs set?)" if stats.missing_topk else "")
        )
    return out, stats


def _append_onehot(ids: np.ndarray, lps: np.ndarray, tokens: list[int]) -> tuple[np.ndarray, np.ndarray]:
    k = ids.shape[1]
    extra_ids = np.zeros((len(tokens), k), dtype=ids.dtype)
    extra_lp = np.full((len(tokens), k), -np.inf, dtype=lps.dtype)
    extra_ids[:, 0] = tokens
    extra_lp[:, 0] = 0.0
    return np.concatenate([ids, extra_ids]), np.concatenate([lps, extra_lp])
