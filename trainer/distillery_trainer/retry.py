"""Retrying a request to an OpenAI-compatible endpoint, decided in ONE place for the whole trainer.

Used by the collector (:mod:`.collect.collector`, the teacher through the ``openai`` client) and the
evaluator's client (:mod:`.evaluate.client`, the student, the teacher and the judge through aiohttp). Each
caller sees its own transport's errors and names them in its own words; what this module owns is:

- **what is worth another attempt** (:func:`retryable_status`, :func:`transient_kind`): HTTP 408
  (request timeout), 409 (OpenAI's answer to a lock timeout), 429 (rate limited) and every 5xx, plus
  timeouts and dropped or refused connections. A malformed 200 body is retried too, but only the caller
  can tell one (it raises :class:`TransientError` ``"malformed"`` itself). All 5xx rather than only
  500/502/503/504: the collector has always retried them, as the ``openai`` client does when its own
  retries are on (ours are off: this module decides), and proxies and providers use others for load —
  520-524 behind Cloudflare, 529 "overloaded" — that a collection would otherwise record as failures for
  good. Retrying a real 501 costs a few attempts; losing a prompt to a busy gateway costs a rerun. Other
  4xx are final: a retry sends the same request and gets the same answer.
- **the server's wish** (:func:`.retry_after.parse_retry_after`, a module of the standard library only,
  which the operator reads the API server's ``Retry-After`` with too): ``retry-after-ms`` (OpenAI's), else
  ``Retry-After`` as delta-seconds (a fraction allowed, as OpenAI-compatible servers send) or an
  HTTP-date; a negative or unreadable value is ignored, a date in the past means now, and anything is
  capped at :data:`MAX_RETRY_AFTER`.
- **how long to wait** (:class:`Backoff`): exponential with "equal jitter" (a wait in [d/2, d],
  d = base × 2^attempt, capped), so retries of many workers do not arrive together; a ``Retry-After``,
  when sent, is what the server asked for and is honoured as sent (plus up to 10 % jitter), up to the
  caller's ``max_retry_after`` — smaller than our backoff included, which is what both callers did before
  (a server that says "in 0.1 s" is idle enough to answer then).
- **the loop** (:func:`retrying`): ``tenacity``'s ``AsyncRetrying`` that retries :class:`TransientError`
  only, at most ``max_retries`` times, waiting per :class:`Backoff`, and re-raises the last error when
  the retries are spent. Both callers run their attempts in it::

      async for attempt in retrying(policy, max_retries):
          with attempt:
              return await once()  # raises TransientError(kind, detail, retry_after) to retry

  The collector fits it as it is: it sleeps in place (the worker holds its slot, as before; nothing is
  requeued), refunds its rate-limit tokens (:mod:`.collect.ratelimit`, the project's own bucket, not a
  tenacity concern) inside the attempt before raising, and counts retries in ``before_sleep``. tenacity
  adds ~45 µs to a request (measured: 1 attempt, 20,000 calls), < 3 % of a core at 500 requests/s.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, stop_after_attempt
from tenacity.wait import wait_base

from .retry_after import MAX_RETRY_AFTER


class TransientError(Exception):
    """A failure another attempt may not meet. ``kind`` names it for the caller's counts (``timeout``,
    ``connection``, ``malformed``, ``http_503``, ...); ``retry_after`` is the server's wish in seconds."""

    def __init__(self, kind: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.kind, self.detail, self.retry_after = kind, detail, retry_after


def retryable_status(status: int) -> bool:
    """Whether an HTTP status is worth another attempt (see the module's docstring for why these)."""
    return status in (408, 409, 429) or 500 <= status <= 599


def transient_kind(exc: BaseException) -> str | None:
    """``"timeout"`` or ``"connection"`` when ``exc`` is a transport failure worth another attempt (the
    ``openai`` client's, aiohttp's, the socket's), else None."""
    if type(exc).__module__.partition(".")[0] == "openai":
        import openai  # loaded already, since it raised: the evaluator need not pay its import

        if isinstance(exc, openai.APITimeoutError):
            return "timeout"
        return "connection" if isinstance(exc, openai.APIConnectionError) else None
    if isinstance(exc, TimeoutError):  # asyncio's too, and aiohttp's ServerTimeoutError
        return "timeout"
    if isinstance(exc, OSError):  # refused, reset, unreachable
        return "connection"
    if type(exc).__module__.partition(".")[0] == "aiohttp":
        import aiohttp

        # disconnected servers, truncated bodies; a ClientResponseError carries a status instead
        if isinstance(exc, aiohttp.ClientError) and not isinstance(exc, aiohttp.ClientResponseError):
            return "connection"
    return None


def unreachable(exc: BaseException, url: str) -> str | None:
    """Why ``url`` cannot be reached at all, in words, when ``exc`` (or what caused it) is a refused
    connection (``"connection refused to URL"``) or a name no resolver knows (``"unknown host HOST"``);
    None for anything else (a timeout, a reset, an HTTP error: load, not configuration)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError):
            return f"connection refused to {url}"
        if isinstance(cur, socket.gaierror):
            from urllib.parse import urlparse

            return f"unknown host {urlparse(url).hostname or url} ({url})"
        cur = cur.__cause__ or cur.__context__
    return None


@dataclass(frozen=True)
class Backoff:
    """The wait before retry ``attempt`` (0 for the first retry): d = ``base`` × 2^attempt capped at
    ``cap``, jittered into [d/2, d]; or the server's ``Retry-After`` plus up to 10 %, capped at
    ``max_retry_after``."""

    base: float = 0.5
    cap: float = 30.0
    max_retry_after: float = MAX_RETRY_AFTER

    def delay(
        self, attempt: int, retry_after: float | None = None, rng: random.Random | None = None
    ) -> float:
        r = float((rng or random).random())
        if retry_after is not None and retry_after >= 0:
            return min(retry_after, self.max_retry_after) * (1 + 0.1 * r)
        d = min(self.cap, self.base * 2.0 ** min(attempt, 64))
        return d / 2 + d / 2 * r


def error_of(retry_state: RetryCallState) -> BaseException | None:
    """The exception the last attempt raised (for ``before_sleep`` hooks), None after a success."""
    return retry_state.outcome.exception() if retry_state.outcome is not None else None


class wait_backoff(wait_base):
    """tenacity's wait from a :class:`Backoff`, reading ``retry_after`` off the last
    :class:`TransientError`."""

    def __init__(self, policy: Backoff, rng: random.Random | None = None) -> None:
        self.policy, self.rng = policy, rng

    def __call__(self, retry_state: RetryCallState) -> float:
        exc = error_of(retry_state)
        retry_after = exc.retry_after if isinstance(exc, TransientError) else None
        return self.policy.delay(retry_state.attempt_number - 1, retry_after, self.rng)


def retrying(
    policy: Backoff,
    max_retries: int,
    *,
    rng: random.Random | None = None,
    before_sleep: Callable[[RetryCallState], Awaitable[None] | None] | None = None,
    sleep: Callable[[float], Awaitable[None]] | None = None,
) -> AsyncRetrying:
    """At most ``1 + max_retries`` attempts; :class:`TransientError` is retried after ``policy``'s wait,
    anything else ends the loop at once, and the last error is re-raised when the retries are spent."""
    extra: dict[str, Any] = {} if sleep is None else {"sleep": sleep}
    return AsyncRetrying(
        retry=retry_if_exception_type(TransientError),
        stop=stop_after_attempt(max_retries + 1),
        wait=wait_backoff(policy, rng),
        before_sleep=before_sleep,
        reraise=True,
        **extra,
    )
