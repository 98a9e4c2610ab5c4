"""A pod's termination message: the compact JSON a stage leaves for the operator (≤ 4 KiB)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from .redact import scrub_obj

TERMINATION_LOG = "/dev/termination-log"
LIMIT = 4096
ENV = "DISTILLERY_TERMINATION_LOG"


def compact(obj: dict[str, Any], limit: int = LIMIT) -> str:
    """Compact JSON within ``limit`` bytes: drops the largest top-level entries until it fits."""
    data = dict(obj)
    while True:
        text = json.dumps(data, separators=(",", ":"), sort_keys=True)
        if len(text.encode()) <= limit:
            return text
        if not data:
            return "{}"
        biggest = max(data, key=lambda k: len(json.dumps(data[k])))
        data.pop(biggest)
        data["truncated"] = True


def write_termination_message(obj: dict[str, Any], path: str | None = None) -> bool:
    """Write ``obj`` where Kubernetes reads termination messages; False when there is no such file here
    (outside a pod), unless ``path`` or ``$DISTILLERY_TERMINATION_LOG`` names one."""
    target = path or os.environ.get(ENV)
    if target is None:
        if not os.path.exists(TERMINATION_LOG) or not os.access(TERMINATION_LOG, os.W_OK):
            return False
        target = TERMINATION_LOG
    # The operator copies it into the status and Events: no key may be in it, whoever put it there.
    Path(target).write_text(compact(scrub_obj(obj)), encoding="utf-8")
    return True
