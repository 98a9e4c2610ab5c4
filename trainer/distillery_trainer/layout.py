"""Where a run's artifacts live: one layout for the cluster volume and the local executor's directory.

``<root>`` is ``runs/<namespace>/<name>/`` on the run's volume, or ``<workdir>/<name>/`` locally::

    collect/shard-00000.jsonl       teacher answers (id, messages, response, finish_reason, usage)
    collect/shard-00000.logprobs.safetensors   top-k logprobs of those answers (white-box)
    collect/failures-00000.jsonl    prompts the teacher could not answer, with the reason
    collect/summary-00000.json      counts, tokens, cost, throughput of the shard
    train/checkpoints/step-000200/  resumable checkpoints
    train/progress.json             step, loss, tokens/s, ETA
    train/baseline-answers.jsonl    the untrained student's answers to the held-out prompts
    student/                        the trained student, Hugging Face format
    eval/results.json               the verdict; eval/report.md the report

Every write is atomic (:func:`atomic_write`): a temp file in the same directory, then ``os.replace``.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class RunLayout:
    root: Path

    @property
    def collect_dir(self) -> Path:
        return self.root / "collect"

    def shard_file(self, shard: int) -> Path:
        return self.collect_dir / f"shard-{shard:05d}.jsonl"

    def logprobs_file(self, shard: int) -> Path:
        return self.collect_dir / f"shard-{shard:05d}.logprobs.safetensors"

    def failures_file(self, shard: int) -> Path:
        return self.collect_dir / f"failures-{shard:05d}.jsonl"

    def summary_file(self, shard: int) -> Path:
        return self.collect_dir / f"summary-{shard:05d}.json"

    @property
    def train_dir(self) -> Path:
        return self.root / "train"

    @property
    def checkpoints_dir(self) -> Path:
        return self.train_dir / "checkpoints"

    @property
    def progress_file(self) -> Path:
        return self.train_dir / "progress.json"

    @property
    def baseline_file(self) -> Path:
        """The untrained student's answers to the held-out prompts (``evaluation.baseline``)."""
        return self.train_dir / "baseline-answers.jsonl"

    @property
    def student_dir(self) -> Path:
        return self.root / "student"

    @property
    def eval_dir(self) -> Path:
        return self.root / "eval"

    @property
    def results_file(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def status_file(self) -> Path:
        return self.root / "status.json"

    @property
    def stage_config_file(self) -> Path:
        return self.root / "stage.yaml"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def atomic_write(path: str | Path, data: bytes | str) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = data.encode("utf-8") if isinstance(data, str) else data
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; the file gets the mode open() would give it
        with os.fdopen(fd, "wb") as fh:
            fh.write(raw)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")
