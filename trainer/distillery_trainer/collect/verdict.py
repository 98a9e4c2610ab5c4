"""What to do about a failed teacher call, decided in ONE place: retry (after how long), record, or stop.

- retry: 429 (after ``Retry-After``/``retry-after-ms`` when sent), 408, 409, 5xx, timeouts, dropped
  connections, malformed bodies — with exponential backoff and jitter, at most ``maxRetries`` times;
- record in the failures file: 400/413/422 (a context too long, a parameter the endpoint rejects) —
  retrying cannot fix those;
- stop the shard: 401/403 (the API key), 404 (the model or URL) — every other prompt would fail the same.
"""

from __future__ import annotations

import email.utils
import json
import random
import time
from dataclasses import dataclass
from typing import Any

import openai

RETRY = "retry"
FAIL = "fail"
FATAL = "fatal"


@dataclass(frozen=True)
class Verdict:
    action: str  # RETRY | FAIL | FATAL
    kind: str  # rate_limited, server_error, timeout, connection, malformed, context_length, bad_request, ...
    reason: str
    status: int | None = None
    retry_after: float | None = None


class MalformedResponse(ValueError):
    """A 200 whose body is not a chat completion."""


class Refusal(ValueError):
    """The teacher declined to answer (OpenAI's ``message.refusal``): retrying will not change that."""


class TokenIdsUnavailable(RuntimeError):
    """White-box answers whose tokens cannot be turned into ids here: no prompt can succeed."""


class LogprobsUnsupported(RuntimeError):
    """Logprobs were asked for and the endpoint answered without them: no prompt can succeed."""


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with "equal jitter": a wait in [d/2, d], d = base × 2^attempt capped at ``cap``;
    a server's ``Retry-After`` is honoured (plus up to 10 % jitter so retries do not arrive together)."""

    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = 600.0

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        r = float((rng or random).random())
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after) * (1 + 0.1 * r)
        d = min(self.cap, self.base * 2.0**attempt)
        return d / 2 + d / 2 * r


def parse_retry_after(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` (OpenAI), or ``Retry-After`` as seconds or an HTTP date."""
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    parsed = email.utils.parsedate_tz(value)
    if parsed is None:
        return None
    return max(0.0, email.utils.mktime_tz(parsed) - time.time())


def _message(exc: openai.APIStatusError) -> tuple[str, str | None]:
    body = exc.body
    if isinstance(body, dict):
        err = body.get("error", body)
        if isinstance(err, dict):
            return str(err.get("message") or exc.message), (str(err["code"]) if err.get("code") else None)
        if isinstance(err, str):
            return err, None
    return str(exc.message), None


def classify(exc: BaseException) -> Verdict:
    if isinstance(exc, openai.APITimeoutError):
        return Verdict(RETRY, "timeout", "request timed out")
    if isinstance(exc, openai.APIConnectionError):
        return Verdict(RETRY, "connection", f"connection error: {exc.__cause__ or exc}")
    if isinstance(exc, (MalformedResponse, json.JSONDecodeError, openai.APIResponseValidationError)):
        return Verdict(RETRY, "malformed", f"malformed response: {exc}")
    if isinstance(exc, Refusal):
        return Verdict(FAIL, "refused", str(exc))
    if isinstance(exc, LogprobsUnsupported):
        return Verdict(FATAL, "no_logprobs", str(exc))
    if isinstance(exc, TokenIdsUnavailable):
        return Verdict(FATAL, "token_ids", str(exc))
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        message, code = _message(exc)
        text = f"HTTP {status}: {message}"
        if status == 429:
            return Verdict(RETRY, "rate_limited", text, status, parse_retry_after(exc.response.headers))
        if status in (408, 409) or status >= 500:
            return Verdict(RETRY, "server_error", text, status, parse_retry_after(exc.response.headers))
        if status in (401, 403):
            return Verdict(
                FATAL, "auth", f"{text} — check the teacher's API key (its Secret or apiKeyEnv)", status
            )
        if status == 404:
            return Verdict(FATAL, "not_found", f"{text} — check teacher baseURL and model", status)
        lowered = message.lower()
        if code == "context_length_exceeded" or "context length" in lowered or "too long" in lowered:
            return Verdict(FAIL, "context_length", text, status)
        return Verdict(FAIL, "bad_request", text, status)
    raise exc  # a bug of ours, not the endpoint's: let it surface
