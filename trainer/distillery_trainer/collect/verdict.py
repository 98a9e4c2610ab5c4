"""What a failed teacher call means for the collection: retry it, record it, or stop the shard.

- retry: what :mod:`distillery_trainer.retry` calls retryable — 408, 409, 429, 5xx (with the server's
  ``Retry-After``), timeouts, dropped connections — and malformed bodies; the collector waits per its
  :class:`~distillery_trainer.retry.Backoff`, at most ``maxRetries`` times;
- record in the failures file: other 4xx — 400/413/422 (a context too long, a parameter the endpoint
  rejects) and refusals: retrying cannot fix those;
- stop the shard: 401/403 (the API key), 404 (the model or URL), white-box answers that cannot be had —
  every other prompt would fail the same.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import openai

from ..retry import retryable_status, transient_kind
from ..retry_after import parse_retry_after

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
    transport = transient_kind(exc)
    if transport == "timeout":
        return Verdict(RETRY, "timeout", "request timed out")
    if transport == "connection":
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
        if retryable_status(status):
            kind = "rate_limited" if status == 429 else "server_error"
            return Verdict(RETRY, kind, text, status, parse_retry_after(exc.response.headers))
        if status in (401, 403):
            refused = f"the teacher refused the API key ({status} {'Unauthorized' if status == 401 else 'Forbidden'})"
            return Verdict(
                FATAL,
                "auth",
                f"{refused}: {message} — check the teacher's API key (its Secret or apiKeyEnv)",
                status,
            )
        if status == 404:
            return Verdict(FATAL, "not_found", f"{text} — check teacher baseURL and model", status)
        lowered = message.lower()
        if code == "context_length_exceeded" or "context length" in lowered or "too long" in lowered:
            return Verdict(FAIL, "context_length", text, status)
        return Verdict(FAIL, "bad_request", text, status)
    raise exc  # a bug of ours, not the endpoint's: let it surface
