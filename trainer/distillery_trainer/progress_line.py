"""Live progress in a pod's log: one machine-readable line per report, beside the human ones.

Workload pods have no Kubernetes API access; their final report reaches the operator as their termination
message, when they exit. While they run, the operator reads the tail of a pod's log instead (``GET
pods/{name}/log?tailLines=...``) and takes the last line of this form::

    distillery-progress {"stage":"train","step":12,"totalSteps":90,"loss":1.23,...}

``stage`` and then the stage's report as :mod:`.api.summaries` defines it, camelCase, as one line of compact
JSON: :class:`TrainingProgress` for ``train`` (rank 0 only), :class:`CollectionSummary` for ``collect`` (each
shard). The line is written only when the stream is not a terminal (a person gets the bar instead), with one
``write`` of less than ``PIPE_BUF`` bytes, so the lines of other ranks sharing the pod's stderr cannot cut into
it. The parser forgives what a log tail holds: a first line cut in half, other programs' output, fields of a
newer trainer (ignored), a line that does not validate (skipped). Light: no torch, only the API models.
"""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO

from pydantic import ValidationError

from .api.base import ApiModel
from .api.summaries import CollectionSummary, TrainingProgress

PREFIX = "distillery-progress "
# Under PIPE_BUF (4096 on Linux): a write this size to a pipe is never interleaved with another's.
MAX_BYTES = 4000
STAGE_MODELS: dict[str, type[ApiModel]] = {"train": TrainingProgress, "collect": CollectionSummary}


def format_line(stage: str, report: ApiModel) -> str:
    """The line (without its newline) for ``report``; a long ``message`` is shortened to fit."""
    data: dict[str, Any] = {"stage": stage, **report.to_dict()}
    text = PREFIX + json.dumps(data, separators=(",", ":"))
    while len(text) > MAX_BYTES and data.get("message"):  # ASCII (json escapes the rest): chars are bytes
        data["message"] = data["message"][: len(data["message"]) // 2]
        text = PREFIX + json.dumps(data, separators=(",", ":"))
    return text


def is_tty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def emit(stage: str, report: ApiModel, stream: TextIO | None = None) -> bool:
    """Write the line for ``report`` to ``stream`` (stderr) unless it is a terminal; True when written."""
    out = stream if stream is not None else sys.stderr
    if is_tty(out):
        return False
    try:
        out.write(format_line(stage, report) + "\n")
        out.flush()
    except (OSError, ValueError):  # a closed or broken stream: progress is not worth failing a stage
        return False
    return True


def is_progress_line(line: str) -> bool:
    return PREFIX + "{" in line


def parse_line(line: str) -> tuple[str, ApiModel] | None:
    """``(stage, report)`` from one log line, or None when it holds no valid progress line. The prefix may
    follow other text (a timestamp the runtime or ``kubectl logs --timestamps`` adds)."""
    at = line.find(PREFIX + "{")
    if at < 0:
        return None
    try:
        data = json.loads(line[at + len(PREFIX) :].strip())
    except ValueError:
        return None
    if not isinstance(data, dict):
        return None
    stage = data.pop("stage", None)
    model = STAGE_MODELS.get(stage) if isinstance(stage, str) else None
    if model is None:
        return None
    known = {f.alias or name for name, f in model.model_fields.items()}
    try:
        return stage, model.model_validate({k: v for k, v in data.items() if k in known})
    except ValidationError:
        return None


def latest(text: str, stage: str) -> ApiModel | None:
    """The last valid progress line of ``stage`` in ``text`` (a log, or its tail), or None."""
    for line in reversed(text.splitlines()):
        found = parse_line(line)
        if found is not None and found[0] == stage:
            return found[1]
    return None


def latest_training(text: str) -> TrainingProgress | None:
    found = latest(text, "train")
    return found if isinstance(found, TrainingProgress) else None


def latest_collection(text: str) -> CollectionSummary | None:
    found = latest(text, "collect")
    return found if isinstance(found, CollectionSummary) else None
