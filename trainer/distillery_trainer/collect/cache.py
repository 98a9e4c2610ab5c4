"""The teacher-answer cache: content-addressed by (endpoint, model, sampling, messages), shared by every run
on a volume. An API teacher is known by its base URL and model name (two servers may serve different
weights under one name); a self-hosted teacher by its model reference alone, not the in-cluster URL it
happens to be served at, so its answers are reused by every run of the same weights.

``<cacheDir>/<key[:2]>/<key>.json`` holds the answers and usage; ``<key>.safetensors`` beside it the top-k
arrays of a white-box answer (written first, so a JSON file always has its arrays). Files are renamed
into place, so a reader never sees a torn entry; an unreadable entry is a miss, never an error. The key is
the hash of the request without its secrets, so a re-run of the same spec costs no teacher call at all.

One file per entry, not a database: shards on other pods write to the same volume at the same time (a
ReadWriteMany volume, often NFS, where SQLite's locking is unsafe), and a rename is atomic everywhere.
The collector checks which keys exist once, before its run, and reads and writes entries off the event loop.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..data.topk import FORMAT, TopKReader, write_entries
from .prompts import canonical
from .teacher import Choice, Completion

VERSION = 1


def cache_key(
    model_identity: str,
    request: dict[str, Any],
    messages: list[dict[str, Any]],
    *,
    endpoint: str | None = None,
) -> str:
    """``request`` is the request's shape without messages (sampling, n, logprobs); ``model_identity``
    names the weights (a self-hosted teacher's model ref, not its served name "teacher"); ``endpoint``
    is an API teacher's base URL (None for a self-hosted one)."""
    payload: dict[str, Any] = {
        "v": VERSION,
        "model": model_identity,
        "request": request,
        "messages": messages,
    }
    if endpoint is not None:
        payload["endpoint"] = endpoint.rstrip("/")
    return hashlib.sha256(canonical(payload).encode()).hexdigest()


class AnswerCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self._dirs: set[str] = set()
        self._tmp_tag = f"{socket.gethostname()}-{os.getpid()}"  # pods on one volume all run as pid 1

    def _paths(self, key: str) -> tuple[str, str]:
        base = os.path.join(self.root, key[:2], key)
        return base + ".json", base + ".safetensors"

    def existing(self, keys: Iterable[str]) -> set[str]:
        """The keys with an entry (one pass, before the run, so a miss costs nothing later)."""
        return {k for k in keys if os.path.exists(self._paths(k)[0])}

    def get(self, key: str) -> Completion | None:
        meta_path, arrays_path = self._paths(key)
        try:
            with open(meta_path, encoding="utf-8") as fh:
                data = json.load(fh)
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

    def put(self, key: str, completion: Completion) -> None:
        meta_path, arrays_path = self._paths(key)
        d = os.path.dirname(meta_path)
        if d not in self._dirs:
            os.makedirs(d, exist_ok=True)
            self._dirs.add(d)
        topk = [c.topk for c in completion.choices]
        has_topk = all(t is not None for t in topk)
        if has_topk:
            entries = {str(i): t for i, t in enumerate(topk) if t is not None}
            write_entries(arrays_path, entries, {"format": FORMAT}, fsync=False)
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
        raw = json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        # Renamed into place without fsync: a lost entry after a power cut is only a cache miss. The temp
        # name is unique per host, process and thread, so writers of the same entry never share one.
        tmp = f"{meta_path}.{self._tmp_tag}-{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, raw)
        finally:
            os.close(fd)
        os.replace(tmp, meta_path)
