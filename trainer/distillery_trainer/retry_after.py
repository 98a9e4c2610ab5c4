"""The server's wish: how long a ``Retry-After`` (or OpenAI's ``retry-after-ms``) asks a client to wait.

One reading for the trainer's clients (:mod:`.retry`: the collector, the evaluator, the on-policy scorer)
and the operator's calls to the Kubernetes API. The standard library only: the operator's image installs
none of the trainer's dependencies.
"""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping

MAX_RETRY_AFTER = 600.0
"""No server's wish waits longer than ten minutes: more is a quota reset, not a slowdown, and a worker
asleep for longer looks hung."""

_SECONDS = re.compile(r"\s*\d+(?:\.\d+)?\s*")


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)  # httpx's and aiohttp's headers ignore case
    if value is None and isinstance(headers, dict):  # a plain dict does not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value


def parse_retry_after(
    headers: Mapping[str, str] | None, *, cap: float = MAX_RETRY_AFTER, now: float | None = None
) -> float | None:
    """Seconds the server asks us to wait: ``retry-after-ms``, else ``Retry-After`` (seconds or an
    HTTP-date), at most ``cap``; None when neither is there or readable (a negative number is not)."""
    if headers is None:
        return None
    ms = _header(headers, "retry-after-ms")
    if ms is not None and _SECONDS.fullmatch(ms):
        return min(cap, float(ms) / 1000.0)
    value = _header(headers, "retry-after")
    if value is None:
        return None
    if _SECONDS.fullmatch(value):
        return min(cap, float(value))
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    try:
        when = email.utils.mktime_tz(parsed)
    except (OverflowError, ValueError):
        return cap
    return min(cap, max(0.0, when - (time.time() if now is None else now)))
