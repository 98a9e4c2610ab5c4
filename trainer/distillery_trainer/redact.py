"""API keys never leave a stage in clear: not in a log line, a traceback, an uncaught exception, a file
of results, nor the termination message the operator copies into the status and Events.

Two layers:

- **The keys themselves.** A stage knows the keys it was given (``DISTILLERY_TEACHER_API_KEY``,
  ``DISTILLERY_JUDGE_API_KEY``, the variables a spec's ``apiKeyEnv`` names); :func:`install` registers
  them and puts a scrubber in front of ``sys.stdout``/``sys.stderr`` (tracebacks of uncaught exceptions
  and ``print`` included) and on every logging handler (a logged exception's traceback included);
  :func:`scrub` replaces them in any text, :func:`scrub_obj` in any JSON-shaped value.
- **What looks like a key.** The operator never has the keys, yet copies a pod's termination message into
  the status; a careless server echoes the key it was sent (``Incorrect API key provided: sk-...``).
  :func:`scrub` also masks what has the shape of a credential: ``Bearer <token>``, ``sk-...`` and
  ``hf_...`` tokens, ``api_key=...``-style assignments.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Iterable
from typing import Any, TextIO

MASK = "[redacted]"
MIN_LENGTH = 6  # shorter "keys" (EMPTY, test, none) would mask ordinary words
NOT_SECRETS = frozenset({"EMPTY", "none", "None", "null", "dummy"})

# Environment variables that carry keys into a stage pod (api/stage.py), and Hugging Face's token.
KEY_ENVS = ("DISTILLERY_TEACHER_API_KEY", "DISTILLERY_JUDGE_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"(?i)\b(bearer\s+)[A-Za-z0-9._~+/=-]{6,}"), r"\1" + MASK),
    (re.compile(r"\bsk-[A-Za-z0-9_-]{8,}"), MASK),
    (re.compile(r"\bhf_[A-Za-z0-9]{8,}"), MASK),
    (re.compile(r"(?i)(incorrect api key provided:?\s*)\S+"), r"\1" + MASK),
    (
        re.compile(
            r"(?i)\b((?:api[_-]?key|access[_-]?token|auth[_-]?token|secret|password)"
            r"[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}]{6,}"
        ),
        r"\1" + MASK,
    ),
)

_secrets: set[str] = set()


def register(values: Iterable[str | None]) -> None:
    """Remember these keys: every later :func:`scrub` masks them."""
    for value in values:
        if value and value.strip() not in NOT_SECRETS and len(value.strip()) >= MIN_LENGTH:
            _secrets.add(value.strip())


def secrets_from_env(extra_envs: Iterable[str | None] = ()) -> list[str]:
    """The keys this process was given: the pod's key variables and the ones the spec names."""
    names = [*KEY_ENVS, *(e for e in extra_envs if e)]
    return [os.environ[n] for n in names if os.environ.get(n)]


def scrub(text: str) -> str:
    """``text`` with every registered key, and everything shaped like a credential, masked."""
    if not text:
        return text
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in text:
            text = text.replace(secret, MASK)
    for pattern, repl in _PATTERNS:
        text = pattern.sub(repl, text)
    return text


def scrub_obj(value: Any) -> Any:
    """A JSON-shaped value with every string in it scrubbed (keys of mappings included)."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {scrub(k) if isinstance(k, str) else k: scrub_obj(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub_obj(v) for v in value]
    return value


class ScrubbingStream:
    """A text stream that scrubs what is written through it (``sys.stderr``: tracebacks, warnings)."""

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner

    def write(self, text: str) -> int:
        self._inner.write(scrub(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, fileno, isatty, encoding, buffer...
        return getattr(self._inner, name)


class ScrubbingFilter(logging.Filter):
    """Scrubs a record's message and its exception's traceback before any handler formats it."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


def install(secrets: Iterable[str | None] = ()) -> None:
    """Register ``secrets`` (and the key variables of this process) and scrub this process's output:
    ``sys.stdout``, ``sys.stderr`` and every handler of the root logger (call it after
    ``logging.basicConfig``; handlers added later get the filter from :func:`scrub_handlers`)."""
    register([*secrets, *secrets_from_env()])
    if not isinstance(sys.stdout, ScrubbingStream):
        sys.stdout = ScrubbingStream(sys.stdout)
    if not isinstance(sys.stderr, ScrubbingStream):
        sys.stderr = ScrubbingStream(sys.stderr)
    scrub_handlers()


def scrub_handlers(logger: logging.Logger | None = None) -> None:
    for handler in (logger or logging.getLogger()).handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())
