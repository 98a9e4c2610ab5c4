"""The trainer's one retry policy: what is retryable, Retry-After, backoff, and the tenacity loop."""

from __future__ import annotations

import email.utils
import random
import time

import aiohttp
import httpx2
import openai
import pytest
from distillery_trainer.retry import (
    Backoff,
    TransientError,
    error_of,
    retryable_status,
    retrying,
    transient_kind,
)
from distillery_trainer.retry_after import MAX_RETRY_AFTER, parse_retry_after
from multidict import CIMultiDict
from tenacity import RetryCallState

# ------------------------------------------------------------------------------------------- classification


@pytest.mark.parametrize(
    ("status", "retry"),
    [
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
        (422, False),
        (408, True),
        (409, True),
        (429, True),
        (500, True),
        (501, True),
        (502, True),
        (503, True),
        (504, True),
        (520, True),
        (529, True),
        (302, False),
        (600, False),
    ],
)
def test_which_statuses_are_retried(status: int, retry: bool) -> None:
    assert retryable_status(status) is retry


_REQUEST = httpx2.Request("POST", "http://teacher/v1/chat/completions")


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (TimeoutError(), "timeout"),
        (aiohttp.ServerTimeoutError(), "timeout"),
        (ConnectionResetError(), "connection"),
        (ConnectionRefusedError(), "connection"),
        (OSError(113, "No route to host"), "connection"),
        (aiohttp.ServerDisconnectedError(), "connection"),
        (aiohttp.ClientPayloadError("truncated"), "connection"),
        (openai.APITimeoutError(_REQUEST), "timeout"),
        (openai.APIConnectionError(request=_REQUEST), "connection"),
        (openai.RateLimitError("x", response=httpx2.Response(429, request=_REQUEST), body=None), None),
        (ValueError("ours"), None),
        (KeyError("choices"), None),
    ],
)
def test_which_transport_failures_are_retried(exc: BaseException, kind: str | None) -> None:
    assert transient_kind(exc) == kind


# ---------------------------------------------------------------------------------------------- Retry-After


def _date(t: float) -> str:
    return email.utils.formatdate(t, usegmt=True)


NOW = 1_700_000_000.0


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "2"}, 2.0),
        ({"retry-after": " 1.5 "}, 1.5),
        ({"Retry-After": "3"}, 3.0),  # a plain dict, not lower-cased
        ({"retry-after-ms": "250", "retry-after": "9"}, 0.25),  # OpenAI's milliseconds win
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0),
        ({"retry-after": _date(NOW + 30)}, 30.0),
        ({"retry-after": _date(NOW - 30)}, 0.0),  # a date past: now
        ({"retry-after": "soon"}, None),
        ({"retry-after": ""}, None),
        ({"retry-after": "-5"}, None),
        ({"retry-after": "inf"}, None),
        ({"retry-after": "nan"}, None),
        ({"retry-after": "1e3"}, None),
        ({"retry-after": "99999999999"}, MAX_RETRY_AFTER),
        ({"retry-after-ms": "99999999999"}, MAX_RETRY_AFTER),
        ({"retry-after": _date(NOW + 86_400)}, MAX_RETRY_AFTER),
        ({"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"}, MAX_RETRY_AFTER),
        ({}, None),
        (None, None),
    ],
)
def test_retry_after_as_seconds_or_a_date_capped(
    headers: dict[str, str] | None, seconds: float | None
) -> None:
    assert parse_retry_after(headers, now=NOW) == (pytest.approx(seconds) if seconds is not None else None)


def test_retry_after_reads_case_insensitive_headers_and_a_caller_cap() -> None:
    assert parse_retry_after(CIMultiDict({"Retry-After": "7"})) == 7.0
    assert parse_retry_after({"retry-after": "120"}, cap=30.0) == 30.0
    assert 25 < (parse_retry_after({"retry-after": _date(time.time() + 30)}) or 0) <= 31


# ---------------------------------------------------------------------------------------------- backoff


def test_delay_grows_exponentially_with_jitter_and_is_capped() -> None:
    b = Backoff(base=0.5, cap=8.0)
    rng = random.Random(1)
    for attempt in range(12):
        d = min(8.0, 0.5 * 2**attempt)
        delays = [b.delay(attempt, None, rng) for _ in range(200)]
        assert all(d / 2 <= x <= d for x in delays)
        assert max(delays) - min(delays) > d / 4  # jittered, not a constant
    assert b.delay(10_000, None, rng) <= 8.0  # no overflow far out


def test_retry_after_is_honoured_smaller_or_larger_and_capped() -> None:
    b = Backoff(base=0.5, cap=8.0, max_retry_after=30.0)
    rng = random.Random(2)
    assert all(3.0 <= b.delay(5, 3.0, rng) <= 3.3 for _ in range(50))  # below the 4-8 s backoff
    assert all(20.0 <= b.delay(0, 20.0, rng) <= 22.0 for _ in range(50))  # above the 0.25-0.5 s one
    assert all(30.0 <= b.delay(0, 10_000.0, rng) <= 33.0 for _ in range(50))
    assert b.delay(0, 0.0, rng) == 0.0


# ---------------------------------------------------------------------------------------------- the loop


class Recorder:
    def __init__(self) -> None:
        self.sleeps: list[float] = []
        self.hooked: list[str] = []

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def before_sleep(self, state: RetryCallState) -> None:
        exc = error_of(state)
        assert isinstance(exc, TransientError)
        self.hooked.append(exc.kind)


async def _run(outcomes: list[BaseException | str], max_retries: int, rec: Recorder) -> tuple[str, int]:
    attempts = 0
    async for attempt in retrying(
        Backoff(base=1.0, cap=4.0),
        max_retries,
        rng=random.Random(0),
        before_sleep=rec.before_sleep,
        sleep=rec.sleep,
    ):
        with attempt:
            attempts = attempt.retry_state.attempt_number
            outcome = outcomes.pop(0)
            if isinstance(outcome, BaseException):
                raise outcome
            return outcome, attempts
    raise AssertionError("unreachable")


async def test_retrying_retries_transient_errors_honouring_retry_after() -> None:
    rec = Recorder()
    outcomes: list[BaseException | str] = [
        TransientError("http_429", "slow down", retry_after=2.0),
        TransientError("timeout", "no answer"),
        "ok",
    ]
    assert await _run(outcomes, 3, rec) == ("ok", 3)
    assert rec.hooked == ["http_429", "timeout"]
    assert 2.0 <= rec.sleeps[0] <= 2.2 and 1.0 <= rec.sleeps[1] <= 2.0  # Retry-After, then backoff #1


async def test_retrying_gives_up_with_the_last_error_and_never_retries_others() -> None:
    rec = Recorder()
    with pytest.raises(TransientError, match="third"):
        await _run(
            [TransientError("a", "first"), TransientError("b", "second"), TransientError("c", "third")],
            2,
            rec,
        )
    assert len(rec.sleeps) == 2
    rec = Recorder()
    with pytest.raises(ValueError, match="final"):
        await _run([ValueError("final"), "never"], 5, rec)
    assert rec.sleeps == []
    with pytest.raises(TransientError):
        await _run([TransientError("a", "only")], 0, Recorder())  # max_retries 0: one attempt
