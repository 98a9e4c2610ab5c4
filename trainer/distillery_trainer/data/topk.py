"""The teacher's top-k logprobs on disk: the ONE module that writes them (collection) and reads them (training).

Files, beside ``collect/shard-XXXXX.jsonl`` (``XXXXX`` the shard index)::

    shard-XXXXX.logprobs.safetensors        the shard's entries, written when the shard completes
    shard-XXXXX.logprobs-NNNN.safetensors   chunks written while it runs (each atomic; merged, then removed)

A shard that was killed before it completed has only chunks; a shard resumed after completing may have
both. :class:`TopKReader` reads whatever is there (later chunks win over earlier files for a repeated key,
and a chunk may hold an entry whose JSONL line was never written: look entries up by the lines' ids).

Each file is plain safetensors. Per JSONL line, with ``key = entry_key(line["id"], line.get("sample"))``
(the id, or ``"<id>@<sample>"`` for seqkd lines that carry ``"sample"``)::

    "<key>.tokens"    int32   [n]      the sampled token ids of the answer
    "<key>.ids"       int32   [n, k]   the top-k token ids at each position, most likely first
    "<key>.logprobs"  float16 [n, k]   their log-probabilities (natural log, temperature-1 distribution)

A position where the endpoint returned fewer than k alternatives is padded with id ``-1`` and logprob
``-inf``: mask ``ids < 0`` before gathering. Metadata (safetensors ``__metadata__``, strings):
``format`` = ``distillery-topk/1``, ``topK`` = k, ``model`` = the served model name, and ``tokenizer`` =
JSON of :func:`tokenizer_identity` (``name_or_path``, ``vocab_size``, ``vocab_sha256``; when the teacher's
tokenizer could not be loaded where collection ran, ``loaded: false`` with the served model name and a
``note``). Training compares it with the student's tokenizer through :func:`same_vocab`.

Cost: 4 + 6k bytes a token (124 B for k = 20) plus ~90 bytes of header a tensor. int32 tensors come first
and float16 ones after, so every tensor is aligned to its element size.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

FORMAT = "distillery-topk/1"
SUFFIXES = ("tokens", "ids", "logprobs")
_DTYPES = {"tokens": ("I32", np.int32), "ids": ("I32", np.int32), "logprobs": ("F16", np.float16)}
_CHUNK_RE = re.compile(r"^shard-(\d{5})\.logprobs-(\d{4,})\.safetensors$")


@dataclass(frozen=True)
class TopK:
    """One answer's logprobs: ``tokens[n]``, ``ids[n, k]``, ``logprobs[n, k]``."""

    tokens: np.ndarray
    ids: np.ndarray
    logprobs: np.ndarray

    def __post_init__(self) -> None:
        n = self.tokens.shape[0]
        if self.ids.shape != self.logprobs.shape or self.ids.ndim != 2 or self.ids.shape[0] != n:
            raise ValueError(
                f"inconsistent top-k shapes: tokens {self.tokens.shape}, ids {self.ids.shape}, "
                f"logprobs {self.logprobs.shape}"
            )

    @property
    def k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @classmethod
    def from_lists(
        cls, tokens: Sequence[int], alternatives: Sequence[Sequence[tuple[int, float]]], k: int
    ) -> TopK:
        """From per-position ``[(token id, logprob), ...]`` lists, padded/truncated to ``k``."""
        n = len(tokens)
        ids = np.full((n, k), -1, dtype=np.int32)
        lps = np.full((n, k), -np.inf, dtype=np.float32)
        for i, alts in enumerate(alternatives):
            for j, (tid, lp) in enumerate(alts[:k]):
                ids[i, j] = tid
                lps[i, j] = lp
        return cls(np.asarray(tokens, dtype=np.int32).reshape(n), ids, to_float16(lps))

    def equals(self, other: TopK) -> bool:
        return (
            np.array_equal(self.tokens, other.tokens)
            and np.array_equal(self.ids, other.ids)
            and np.array_equal(self.logprobs, other.logprobs)
        )


def to_float16(logprobs: np.ndarray) -> np.ndarray:
    """float16 without overflow warnings: very negative logprobs clip to float16's lowest, -inf stays."""
    finfo = np.finfo(np.float16)
    out = np.where(np.isneginf(logprobs), logprobs, np.clip(logprobs, float(finfo.min), 0.0))
    return out.astype(np.float16)


def entry_key(line_id: str, sample: int | None = None) -> str:
    """The tensor-name prefix of a JSONL line: its id, or ``<id>@<sample>`` for a line with ``sample``."""
    return line_id if sample is None else f"{line_id}@{sample}"


# ---------------------------------------------------------------------------------------------- tokenizers


def tokenizer_identity(tokenizer: Any, name_or_path: str | None = None) -> dict[str, Any]:
    """What identifies a tokenizer for KD: its name, its size, and a hash of its token → id map."""
    vocab = tokenizer.get_vocab()
    ordered = sorted(vocab.items(), key=lambda kv: (kv[1], kv[0]))
    digest = hashlib.sha256(
        json.dumps(ordered, ensure_ascii=False, separators=(",", ":")).encode()
    ).hexdigest()
    return {
        "name_or_path": name_or_path or str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "vocab_sha256": digest,
        "loaded": True,
    }


def unloaded_identity(served_model: str, note: str) -> dict[str, Any]:
    """The identity recorded when the teacher's tokenizer cannot be loaded where collection runs."""
    return {
        "name_or_path": served_model,
        "vocab_size": None,
        "vocab_sha256": None,
        "loaded": False,
        "served_model": served_model,
        "note": note,
    }


def same_vocab(recorded: Mapping[str, Any], tokenizer: Any) -> bool | None:
    """True/False when the recorded identity can be compared with ``tokenizer``; None when it cannot."""
    if not recorded.get("vocab_sha256"):
        return None
    return bool(tokenizer_identity(tokenizer)["vocab_sha256"] == recorded["vocab_sha256"])


# ---------------------------------------------------------------------------------------------- writing


def file_metadata(tokenizer: Mapping[str, Any], top_k: int, model: str) -> dict[str, str]:
    return {
        "format": FORMAT,
        "topK": str(top_k),
        "model": model,
        "tokenizer": json.dumps(dict(tokenizer), sort_keys=True),
    }


def chunk_path(collect_dir: str | Path, shard: int, chunk: int) -> Path:
    return Path(collect_dir) / f"shard-{shard:05d}.logprobs-{chunk:04d}.safetensors"


def merged_path(collect_dir: str | Path, shard: int) -> Path:
    return Path(collect_dir) / f"shard-{shard:05d}.logprobs.safetensors"


def chunk_files(collect_dir: str | Path, shard: int) -> list[Path]:
    """The shard's chunk files, in the order they were written."""
    found: list[tuple[int, Path]] = []
    d = Path(collect_dir)
    if d.is_dir():
        for p in d.iterdir():
            m = _CHUNK_RE.match(p.name)
            if m and int(m.group(1)) == shard:
                found.append((int(m.group(2)), p))
    return [p for _, p in sorted(found)]


def shard_files(collect_dir: str | Path, shard: int) -> list[Path]:
    """Every file holding the shard's entries, oldest first (the merged file, then chunks)."""
    merged = merged_path(collect_dir, shard)
    return ([merged] if merged.exists() else []) + chunk_files(collect_dir, shard)


def write_entries(
    path: str | Path, entries: Mapping[str, TopK], metadata: Mapping[str, str], *, fsync: bool = True
) -> int:
    """Write ``entries`` to ``path`` atomically; returns the file's size in bytes."""
    sources = [(key, _Resident(value)) for key, value in entries.items()]
    return _write_stream(Path(path), sources, metadata, fsync=fsync)


def merge_files(
    sources: Sequence[str | Path],
    dest: str | Path,
    *,
    keep: Iterable[str] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> int:
    """Merge entry files into one, streaming (one tensor in memory at a time); a key in a later source
    wins. ``keep`` restricts the output to those keys. Metadata: ``metadata``, else the last source's."""
    from safetensors import safe_open

    handles: list[Any] = [safe_open(str(p), framework="numpy") for p in sources]
    where: dict[str, Any] = {}
    meta: dict[str, str] = {}
    for handle in handles:
        meta = dict(handle.metadata() or {}) or meta
        for key in _keys_of(handle):
            where[key] = handle
    wanted = set(keep) if keep is not None else None
    chosen = [
        (key, _Lazy(handle, key)) for key, handle in sorted(where.items()) if wanted is None or key in wanted
    ]
    return _write_stream(Path(dest), chosen, dict(metadata) if metadata is not None else meta)


class _Resident:
    def __init__(self, value: TopK) -> None:
        self.value = value

    def shape(self, suffix: str) -> list[int]:
        return list(getattr(self.value, suffix).shape)

    def array(self, suffix: str) -> np.ndarray:
        return np.asarray(getattr(self.value, suffix))


class _Lazy:
    def __init__(self, handle: Any, key: str) -> None:
        self.handle, self.key = handle, key

    def shape(self, suffix: str) -> list[int]:
        return list(self.handle.get_slice(f"{self.key}.{suffix}").get_shape())

    def array(self, suffix: str) -> np.ndarray:
        return np.asarray(self.handle.get_tensor(f"{self.key}.{suffix}"))


def _write_stream(
    path: Path, entries: Sequence[tuple[str, Any]], metadata: Mapping[str, str], *, fsync: bool = True
) -> int:
    """safetensors, written by hand so a merge never holds more than one tensor: int32 tensors first,
    float16 ones after (so each is aligned), the header padded to 8 bytes as the format requires."""
    order = [(key, src, suffix) for suffix in ("tokens", "ids") for key, src in entries] + [
        (key, src, "logprobs") for key, src in entries
    ]
    header: dict[str, Any] = {"__metadata__": dict(metadata)}
    offset = 0
    for key, src, suffix in order:
        dtype, np_dtype = _DTYPES[suffix]
        shape = src.shape(suffix)
        size = math.prod(shape) * np.dtype(np_dtype).itemsize
        header[f"{key}.{suffix}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw_header = json.dumps(header, separators=(",", ":")).encode()
    raw_header += b" " * (-len(raw_header) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; other pods (other uids) read these files
        with os.fdopen(fd, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw_header)))
            fh.write(raw_header)
            for key, src, suffix in order:
                arr = np.ascontiguousarray(src.array(suffix), dtype=_DTYPES[suffix][1])
                expected = header[f"{key}.{suffix}"]["shape"]
                if list(arr.shape) != expected:
                    raise ValueError(f"{key}.{suffix}: shape {list(arr.shape)} != {expected}")
                fh.write(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
            fh.flush()
            if fsync:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return 8 + len(raw_header) + offset


def _umask() -> int:
    mask = os.umask(0o022)  # read once, at import, before any thread could create a file meanwhile
    os.umask(mask)
    return mask


_UMASK = _umask()


def _keys_of(handle: Any) -> list[str]:
    names: list[str] = handle.keys()  # a safetensors handle is not iterable itself
    return sorted({name.rsplit(".", 1)[0] for name in names if name.rsplit(".", 1)[-1] in SUFFIXES})


# ---------------------------------------------------------------------------------------------- reading


class TopKReader:
    """Entries of one shard (or any entry files): lazy, memory-mapped, later files win for a repeated key.

    ``TopKReader.for_shard(layout.collect_dir, shard)``; then ``reader[entry_key(line["id"])]`` → :class:`TopK`.
    """

    def __init__(self, files: Sequence[str | Path]) -> None:
        from safetensors import safe_open

        self.files = [Path(f) for f in files]
        self._handles: list[Any] = [safe_open(str(f), framework="numpy") for f in self.files]
        self._where: dict[str, Any] = {}
        self.metadata: dict[str, str] = {}
        for handle in self._handles:
            self.metadata = dict(handle.metadata() or {}) or self.metadata
            for key in _keys_of(handle):
                self._where[key] = handle
        if self._handles and self.metadata.get("format") != FORMAT:
            raise ValueError(
                f"{self.files[-1]}: not a {FORMAT} file (metadata format={self.metadata.get('format')!r})"
            )

    @classmethod
    def for_shard(cls, collect_dir: str | Path, shard: int) -> TopKReader:
        files = shard_files(collect_dir, shard)
        if not files:
            raise FileNotFoundError(
                f"no logprobs for shard {shard} in {collect_dir}: collect with teacher.logprobs set"
            )
        return cls(files)

    @property
    def tokenizer(self) -> dict[str, Any]:
        raw = self.metadata.get("tokenizer")
        return dict(json.loads(raw)) if raw else {}

    @property
    def top_k(self) -> int:
        return int(self.metadata.get("topK", "0"))

    def keys(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, key: object) -> bool:
        return key in self._where

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def __len__(self) -> int:
        return len(self._where)

    def __getitem__(self, key: str) -> TopK:
        handle = self._where.get(key)
        if handle is None:
            raise KeyError(f"no logprobs for entry {key!r} in {[str(f) for f in self.files]}")
        return TopK(*(np.asarray(handle.get_tensor(f"{key}.{s}")) for s in SUFFIXES))

    def get(self, key: str) -> TopK | None:
        return self[key] if key in self._where else None
