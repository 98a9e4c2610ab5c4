"""The teacher-answer cache: content-addressed by (model, sampling, messages), shared by every run on a volume.

``<cacheDir>/<key[:2]>/<key>.json`` holds the answers and usage; ``<key>.safetensors`` beside it the top-k
arrays of a white-box answer (written first, so a JSON file always has its arrays). Files are renamed
into place, so a reader never sees a torn entry; an unreadable entry is a miss, never an error. The key is
the hash of the request without its secrets, so a re-run of the same spec costs no teacher call at all.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from ..data.topk import FORMAT, TopKReader, write_entries
from .prompts import canonical
from .teacher import Choice, Completion

VERSION = 1


def cache_key(model_identity: str, request: dict[str, Any], messages: list[dict[str, Any]]) -> str:
    """``request`` is the request's shape without messages (sampling, n, logprobs); ``model_identity``
    names the weights (a self-hosted teacher's model ref, not its served name "teacher")."""
    payload = {"v": VERSION, "model": model_identity, "request": request, "messages": messages}
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


class AnswerCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def _paths(self, key: str) -> tuple[Path, Path]:
        d = self.root / key[:2]
        return d / f"{key}.json", d / f"{key}.safetensors"

    def get(self, key: str) -> Completion | None:
        meta_path, arrays_path = self._paths(key)
        try:
            data = json.loads(meta_path.read_text(encoding="utf-8"))
            reader = TopKReader([arrays_path]) if data.get("topk") else None
            choices = [
                Choice(
                    text=c["text"],
                    finish_reason=c["finishReason"],
                    mean_logprob=c.get("meanLogprob"),
                    tokens=c.get("tokens"),
                    topk=reader[str(i)] if reader is not None else None,
                )
                for i, c in enumerate(data["choices"])
            ]
            return Completion(
                choices=choices,
                prompt_tokens=int(data["usage"]["prompt_tokens"]),
                completion_tokens=int(data["usage"]["completion_tokens"]),
            )
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def put(self, key: str, completion: Completion, metadata: dict[str, str] | None = None) -> None:
        meta_path, arrays_path = self._paths(key)
        meta_path.parent.mkdir(parents=True, exist_ok=True)
        topk = [c.topk for c in completion.choices]
        has_topk = all(t is not None for t in topk)
        if has_topk:
            entries = {str(i): t for i, t in enumerate(topk) if t is not None}
            write_entries(arrays_path, entries, {**(metadata or {}), "format": FORMAT}, fsync=False)
        data = {
            "choices": [
                {
                    "text": c.text,
                    "finishReason": c.finish_reason,
                    "meanLogprob": c.mean_logprob,
                    "tokens": c.tokens,
                }
                for c in completion.choices
            ],
            "usage": {
                "prompt_tokens": completion.prompt_tokens,
                "completion_tokens": completion.completion_tokens,
            },
            "topk": has_topk,
        }
        # Renamed into place without fsync: a lost entry after a power cut is only a cache miss.
        fd, tmp = tempfile.mkstemp(prefix=f".{meta_path.name}.", suffix=".tmp", dir=meta_path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, separators=(",", ":"))
            os.replace(tmp, meta_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
