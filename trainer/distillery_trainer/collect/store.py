"""A shard's output files, and picking up where a killed attempt stopped.

- ``collect/shard-XXXXX.jsonl``: answers, appended in chunks — one ``write`` and an ``fsync`` per chunk.
  A kill can only tear the last line; :meth:`ShardStore.recover` cuts it off, and the ids in the file
  are the ones never asked again. Lines are in completion order, not input order.
- top-k logprobs (white-box): a chunk file per JSONL chunk, written (atomically) *before* its lines, so
  every line has its arrays on disk; merged into one file when the shard completes
  (:mod:`distillery_trainer.data.topk`).
- ``collect/failures-XXXXX.jsonl``: one line per prompt that failed, with the reason. On resume the
  failures retrying could fix (retries exhausted) are dropped from the file and asked again; the others
  (400, context too long, refusals) stay, and their prompts are not asked again.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..data import topk
from ..data.topk import TopK
from ..layout import RunLayout, atomic_write


@dataclass
class Record:
    """One prompt's answer: its JSONL line(s) and their top-k arrays by entry key."""

    id: str
    lines: list[dict[str, Any]]
    arrays: dict[str, TopK] = field(default_factory=dict)
    cached: bool = False
    paid_input_tokens: int = 0
    paid_output_tokens: int = 0


@dataclass
class Failure:
    id: str
    kind: str
    reason: str
    retryable: bool
    status: int | None = None
    attempts: int = 0

    def line(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "reason": self.reason,
            "retryable": self.retryable,
            "status": self.status,
            "attempts": self.attempts,
        }


@dataclass
class Recovered:
    done: set[str]  # ids with an answer in the shard file
    failed: set[str]  # ids with a failure retrying cannot fix
    retrying: set[str]  # ids whose earlier failure was retryable: asked again
    lines: int  # lines in the shard file (several per id for seqkd "all")
    torn_bytes: int  # bytes of a torn last line cut off


class ShardStore:
    def __init__(self, layout: RunLayout, shard: int, metadata: dict[str, str] | None = None) -> None:
        self.layout = layout
        self.shard = shard
        self.metadata = metadata  # top-k file metadata; None for black-box collection
        self.answers = layout.shard_file(shard)
        self.failures = layout.failures_file(shard)
        self._next_chunk = 0

    # ------------------------------------------------------------------------------------------ resume

    def recover(self) -> Recovered:
        self.layout.collect_dir.mkdir(parents=True, exist_ok=True)
        torn = _cut_torn_tail(self.answers)
        done: set[str] = set()
        lines = 0
        if self.answers.exists():
            with self.answers.open(encoding="utf-8") as fh:
                for n, line in enumerate(fh, 1):
                    try:
                        done.add(str(json.loads(line)["id"]))
                    except (json.JSONDecodeError, KeyError, TypeError):
                        raise RuntimeError(
                            f"{self.answers}:{n}: a complete line that is not an answer; the file was changed "
                            "by something else: move it away to collect this shard again"
                        ) from None
                    lines += 1
        failed: dict[str, dict[str, Any]] = {}
        retrying: set[str] = set()
        if self.failures.exists():
            _cut_torn_tail(self.failures)
            for line in self.failures.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                pid = str(entry.get("id"))
                if pid in done:
                    continue
                if entry.get("retryable"):
                    retrying.add(pid)
                else:
                    failed[pid] = entry
            retrying -= set(failed)
            atomic_write(
                self.failures, "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in failed.values())
            )
        chunks = topk.chunk_files(self.layout.collect_dir, self.shard)
        self._next_chunk = int(chunks[-1].name.rsplit("-", 1)[1].split(".")[0]) + 1 if chunks else 0
        return Recovered(done, set(failed), retrying, lines, torn)

    # ------------------------------------------------------------------------------------------ writing

    def append(self, records: list[Record]) -> None:
        """Arrays first (one atomic chunk file), then the lines (one append, fsync'd)."""
        if not records:
            return
        arrays = {k: v for r in records for k, v in r.arrays.items()}
        if arrays:
            if self.metadata is None:
                raise ValueError("top-k arrays for a black-box collection")
            path = topk.chunk_path(self.layout.collect_dir, self.shard, self._next_chunk)
            topk.write_entries(path, arrays, self.metadata)
            self._next_chunk += 1
        text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for r in records for line in r.lines)
        _append(self.answers, text)

    def fail(self, failures: list[Failure]) -> None:
        if failures:
            _append(self.failures, "".join(json.dumps(f.line(), ensure_ascii=False) + "\n" for f in failures))

    def finalize_arrays(self) -> Path | None:
        """Merge the chunk files into ``shard-XXXXX.logprobs.safetensors``, keeping the entries of the
        shard file's lines only; then remove the chunks. A no-op when there are no chunks."""
        chunks = topk.chunk_files(self.layout.collect_dir, self.shard)
        if not chunks:
            return None
        keys: set[str] = set()
        with self.answers.open(encoding="utf-8") as fh:
            for line in fh:
                obj = json.loads(line)
                keys.add(topk.entry_key(str(obj["id"]), obj.get("sample")))
        dest = topk.merged_path(self.layout.collect_dir, self.shard)
        topk.merge_files(
            topk.shard_files(self.layout.collect_dir, self.shard), dest, keep=keys, metadata=self.metadata
        )
        for chunk in chunks:
            chunk.unlink()
        return dest


def _append(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = text.encode("utf-8")
        while data:
            written = os.write(fd, data)
            data = data[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def _cut_torn_tail(path: Path) -> int:
    """Truncate ``path`` after its last newline; the bytes cut (a line a kill interrupted)."""
    if not path.exists():
        return 0
    size = path.stat().st_size
    if size == 0:
        return 0
    with path.open("rb+") as fh:
        block = 1 << 16
        end = size
        while end > 0:
            start = max(0, end - block)
            fh.seek(start)
            chunk = fh.read(end - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            end = start
        else:
            keep = 0
        if keep < size:
            fh.truncate(keep)
            fh.flush()
            os.fsync(fh.fileno())
    return size - keep
