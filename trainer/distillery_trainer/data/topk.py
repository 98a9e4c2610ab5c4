"""The teacher's top-k logprobs on disk: ONE module with the writer (collection) and the reader (training).

``collect/shard-XXXXX.logprobs.safetensors`` sits beside ``collect/shard-XXXXX.jsonl`` and holds, for every
answer of that shard (key: the line's ``id``, or ``<id>#<sample>`` when the line has a ``sample``, see
:func:`answer_key`)::

    <key>.tokens    int32   [n]      the tokens the teacher generated (its answer, as token ids)
    <key>.ids       int32   [n, k]   the teacher's top-k token ids at each of those n positions
    <key>.logprobs  float16 [n, k]   their log-probabilities, as the server returns them (vLLM: the raw
                                     distribution, T = 1); -inf pads positions with fewer than k entries

Row ``i`` is the teacher's distribution for ``tokens[i]`` given the prompt and ``tokens[:i]``. The file's
metadata (safetensors' string map) holds ``format`` (:data:`FORMAT`), ``topK``, and ``tokenizer``: the JSON
of :func:`tokenizer_identity` for the tokenizer that produced the ids, which the trainer compares with the
student's before training (logit KD needs the same vocabulary and ids).

The writer keeps a shard in memory and writes it atomically on :meth:`TopKWriter.close`. numpy only: no
torch import.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distillery.topk/v1"
SUFFIXES = ("tokens", "ids", "logprobs")


def answer_key(line_id: str, sample: int | None = None) -> str:
    """The key of one answer: its line's ``id``, with ``#<sample>`` when the line carries a sample number."""
    return line_id if sample is None else f"{line_id}#{sample}"


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """What identifies a tokenizer's ids: its name, size and a hash of its (token -> id) vocabulary."""
    vocab = tokenizer.get_vocab()
    blob = json.dumps(sorted(vocab.items(), key=lambda kv: kv[1]), ensure_ascii=False).encode()
    return {
        "name_or_path": str(getattr(tokenizer, "name_or_path", "") or ""),
        "vocab_size": len(tokenizer),
        "vocab_hash": hashlib.sha256(blob).hexdigest()[:16],
    }


@dataclass(frozen=True)
class TopKAnswer:
    tokens: np.ndarray  # int32 [n]
    ids: np.ndarray  # int32 [n, k]
    logprobs: np.ndarray  # float16 [n, k]

    def __len__(self) -> int:
        return int(self.tokens.shape[0])


class TopKWriter:
    """Collects answers' top-k and writes one shard file atomically. Use as a context manager or close()."""

    def __init__(self, path: str | Path, tokenizer: dict[str, Any], top_k: int) -> None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.path = Path(path)
        self.tokenizer = dict(tokenizer)
        self.top_k = top_k
        self._tensors: dict[str, np.ndarray] = {}

    def add(
        self,
        key: str,
        tokens: Sequence[int],
        ids: Sequence[Sequence[int]],
        logprobs: Sequence[Sequence[float]],
    ) -> None:
        """One answer: its tokens and, per token, up to ``top_k`` (id, logprob) alternatives."""
        n = len(tokens)
        if len(ids) != n or len(logprobs) != n:
            raise ValueError(f"{key}: {n} tokens but {len(ids)} id rows and {len(logprobs)} logprob rows")
        if f"{key}.tokens" in self._tensors:
            raise ValueError(f"{key}: answer added twice")
        id_arr = np.zeros((n, self.top_k), dtype=np.int32)
        lp_arr = np.full((n, self.top_k), -np.inf, dtype=np.float16)
        for i, (row_ids, row_lp) in enumerate(zip(ids, logprobs, strict=True)):
            if len(row_ids) != len(row_lp):
                raise ValueError(f"{key}: position {i} has {len(row_ids)} ids and {len(row_lp)} logprobs")
            m = min(len(row_ids), self.top_k)
            id_arr[i, :m] = np.asarray(row_ids[:m], dtype=np.int64)
            lp_arr[i, :m] = [(-math.inf if lp is None else lp) for lp in row_lp[:m]]
        self._tensors[f"{key}.tokens"] = np.asarray(tokens, dtype=np.int32).reshape(n)
        self._tensors[f"{key}.ids"] = id_arr
        self._tensors[f"{key}.logprobs"] = lp_arr

    def __len__(self) -> int:
        return len(self._tensors) // len(SUFFIXES)

    def close(self) -> None:
        from safetensors.numpy import save

        from ..layout import atomic_write

        metadata = {
            "format": FORMAT,
            "topK": str(self.top_k),
            "tokenizer": json.dumps(self.tokenizer, sort_keys=True),
        }
        atomic_write(self.path, save(self._tensors, metadata=metadata))

    def __enter__(self) -> TopKWriter:
        return self

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is None:
            self.close()


class TopKFile:
    """Reads one shard's top-k file lazily (answers are loaded as they are asked for)."""

    def __init__(self, path: str | Path) -> None:
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(self.path), framework="np")
        meta = self._file.metadata() or {}
        if meta.get("format") not in (None, FORMAT):
            raise ValueError(f"{self.path}: unknown top-k format {meta.get('format')!r} (expected {FORMAT})")
        self.metadata: dict[str, str] = dict(meta)
        self.top_k = int(meta["topK"]) if "topK" in meta else None
        self.tokenizer: dict[str, Any] = json.loads(meta["tokenizer"]) if "tokenizer" in meta else {}
        names = self._file.keys()  # noqa: SIM118 - a safetensors handle, not a dict
        self._keys = {name.rsplit(".", 1)[0] for name in names if name.endswith(".tokens")}

    def keys(self) -> set[str]:
        return set(self._keys)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def get(self, key: str) -> TopKAnswer | None:
        if key not in self._keys:
            return None
        tokens, ids, lps = (self._file.get_tensor(f"{key}.{s}") for s in SUFFIXES)
        if ids.shape != lps.shape or ids.shape[0] != tokens.shape[0]:
            raise ValueError(
                f"{self.path}: answer {key!r} has tokens {tokens.shape}, ids {ids.shape}, logprobs {lps.shape}"
            )
        return TopKAnswer(tokens=tokens, ids=ids, logprobs=lps)


def write_topk(
    path: str | Path,
    answers: Iterable[tuple[str, Sequence[int], Sequence[Sequence[int]], Sequence[Sequence[float]]]],
    tokenizer: dict[str, Any],
    top_k: int,
) -> None:
    """Write a whole shard at once: ``(key, tokens, ids, logprobs)`` per answer."""
    with TopKWriter(path, tokenizer, top_k) as writer:
        for key, tokens, ids, logprobs in answers:
            writer.add(key, tokens, ids, logprobs)
