"""Reading what the collection stage wrote: ``collect/shard-XXXXX.jsonl`` lines (and their top-k files).

One JSON object a line: ``{"id", "messages", "response", "finish_reason", "usage", "split", "sample"?,
"meanLogprob"?, "reference"?, "category"?}``. The trainer reads the ``train`` split only; ``eval`` lines
belong to the evaluation stage.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from ..layout import RunLayout
from .topk import entry_key

SHARD_RE = re.compile(r"^shard-(\d+)\.jsonl$")


class DataError(ValueError):
    """The collected data cannot be trained on; the message names the file and the fix."""


@dataclass(frozen=True)
class Answer:
    id: str
    messages: list[dict[str, Any]]
    response: str
    finish_reason: str = "stop"
    split: str = "train"
    sample: int | None = None
    mean_logprob: float | None = None
    shard: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        """The answer's key in its shard's top-k file."""
        return entry_key(self.id, self.sample)

    @property
    def finished(self) -> bool:
        """The teacher ended its answer itself (rather than hitting maxTokens)."""
        return self.finish_reason not in ("length", "max_tokens")


def shard_indices(layout: RunLayout) -> list[int]:
    if not layout.collect_dir.is_dir():
        return []
    found = (SHARD_RE.match(p.name) for p in layout.collect_dir.iterdir())
    return sorted(int(m.group(1)) for m in found if m)


def parse_line(raw: str, where: str, shard: int) -> Answer:
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: not JSON ({exc.msg})") from None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object")
    missing = [k for k in ("id", "messages", "response") if k not in obj]
    if missing:
        raise DataError(f"{where}: missing {', '.join(missing)}")
    messages = obj["messages"]
    if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
        raise DataError(f"{where}: messages must be a list of {{role, content}} objects")
    sample = obj.get("sample")
    return Answer(
        id=str(obj["id"]),
        messages=messages,
        response=str(obj["response"] or ""),
        finish_reason=str(obj.get("finish_reason") or "stop"),
        split=str(obj.get("split") or "train"),
        sample=int(sample) if sample is not None else None,
        mean_logprob=obj.get("meanLogprob"),
        shard=shard,
        extra={k: obj[k] for k in ("reference", "category") if k in obj},
    )


def read_answers(layout: RunLayout, split: str = "train") -> list[Answer]:
    """Every answer of ``split`` ordered by (prompt id, sample); empty answers are left out.

    A shard's lines are in the order the teacher finished them, which depends on its timing: ordering by
    the prompts' ids makes what training sees (and so the student, with the seed) a function of the
    collection's content only.
    """
    out: list[Answer] = []
    for shard in shard_indices(layout):
        path = layout.shard_file(shard)
        with path.open(encoding="utf-8") as fh:
            for n, raw in enumerate(fh, 1):
                if not raw.strip():
                    continue
                answer = parse_line(raw, f"{path}:{n}", shard)
                if answer.split == split and answer.response.strip():
                    out.append(answer)
    out.sort(key=lambda a: (a.id, -1 if a.sample is None else a.sample))
    return out


def select_seqkd(answers: Iterable[Answer], selection: str) -> list[Answer]:
    """SeqKD: every sample (``all``), or per prompt the sample with the highest mean logprob."""
    answers = list(answers)
    if selection == "all":
        return answers
    best: dict[str, Answer] = {}
    for a in answers:
        cur = best.get(a.id)
        if cur is None or _score(a) > _score(cur):
            best[a.id] = a
    order = {id_: i for i, id_ in enumerate(dict.fromkeys(a.id for a in answers))}
    return sorted(best.values(), key=lambda a: order[a.id])


def _score(a: Answer) -> float:
    return float(a.mean_logprob) if a.mean_logprob is not None else float("-inf")
