"""The held-out prompts and the teacher's answers to them: the ``"split": "eval"`` lines of
``collect/shard-XXXXX.jsonl`` (``{"id", "messages", "response", "finish_reason", "usage", "split",
"reference"?, "category"?}``).

A line that does not parse (a shard torn by a crash) is skipped and counted, never fatal; a prompt seen
twice (a resumed shard) counts once. ``evaluation.maxSamples`` keeps a deterministic pseudo-random
subset (ordered by a hash of the id), so a cap does not just keep the first rows of the data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..layout import RunLayout


@dataclass
class EvalItem:
    id: str
    messages: list[dict[str, Any]]
    teacher: str  # the teacher's collected answer
    reference: str | None = None
    category: str | None = None


@dataclass
class EvalData:
    items: list[EvalItem] = field(default_factory=list)
    shards: int = 0
    bad_lines: int = 0
    duplicates: int = 0
    train_lines: int = 0


def _item(row: dict[str, Any]) -> EvalItem | None:
    messages, response = row.get("messages"), row.get("response")
    if not isinstance(messages, list) or not messages or not isinstance(response, str):
        return None
    ref, cat = row.get("reference"), row.get("category")
    return EvalItem(
        id=str(row.get("id", "")),
        messages=messages,
        teacher=response,
        reference=ref if isinstance(ref, str) else None,
        category=str(cat) if cat not in (None, "") else None,
    )


def load_eval_items(layout: RunLayout, max_samples: int | None = None) -> EvalData:
    out = EvalData()
    seen: set[str] = set()
    for path in sorted(Path(layout.collect_dir).glob("shard-*.jsonl")):
        out.shards += 1
        with path.open(encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    out.bad_lines += 1
                    continue
                if not isinstance(row, dict):
                    out.bad_lines += 1
                    continue
                if row.get("split") != "eval":
                    out.train_lines += 1
                    continue
                if row.get("sample") not in (None, 0):
                    continue  # seqkd's other samples of the same prompt: the first is the teacher's answer
                item = _item(row)
                if item is None:
                    out.bad_lines += 1
                elif item.id in seen:
                    out.duplicates += 1
                else:
                    seen.add(item.id)
                    out.items.append(item)
    if max_samples is not None and len(out.items) > max_samples:
        out.items.sort(key=lambda it: hashlib.sha256(it.id.encode()).hexdigest())
        out.items = out.items[:max_samples]
    return out
