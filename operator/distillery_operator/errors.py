"""The one place where API failures become intent: retry later (``kopf.TemporaryError``) or give up
(``kopf.PermanentError``). Everything that talks to the API server goes through :func:`translate`;
:func:`reason` names what went wrong for the operator's error metric.

A 422 (``Invalid``), or a 403 whose admission webhook "denied the request", is the API server refusing what was sent, for a reason in it (a field of the spec the
child was built from): :class:`Rejected`, which the reconciler turns into a failed run with the API
server's message when the refused request was a child's (retrying would stall the run on the same
answer); a later spec edit, or any change of a child, reconciles the run again."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import kopf
from distillery_trainer.retry_after import parse_retry_after

from .kube import ApiError

RETRYABLE = {408, 425, 429, 500, 502, 503, 504}
# First delays; the reconciler doubles them on every failure in a row (``workqueue.backoff``), up to a minute.
DEFAULT_DELAY = 0.5
CONFLICT_DELAY = 0.2
NOT_FOUND_DELAY = 2.0
FORBIDDEN_DELAY = 30.0
# The longest a Retry-After holds a handler back: the reconciler's own backoff tops out at a minute too.
MAX_RETRY_AFTER = 60.0
# The API server's own words for these statuses (Kubernetes' metav1.StatusReason where it has one).
STATUS_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    408: "RequestTimeout",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    425: "TooEarly",
    429: "TooManyRequests",
    500: "InternalError",
    502: "BadGateway",
    503: "ServiceUnavailable",
    504: "Timeout",
}


def _message(exc: ApiError) -> str:
    try:
        body = json.loads(exc.body or "")
        return str(body.get("message") or exc.reason or "")
    except (TypeError, ValueError, AttributeError):
        return str(exc.reason or "")


def _retry_after(exc: ApiError) -> float | None:
    """The server's Retry-After (seconds or an HTTP-date, as the clients of the teacher read it), at most
    :data:`MAX_RETRY_AFTER`; None (the default delay) when absent, unreadable or zero."""
    return parse_retry_after(exc.headers, cap=MAX_RETRY_AFTER) or None


class Rejected(kopf.PermanentError):
    """The API server refused the request as invalid (422): ``what`` was sent, ``detail`` is its answer,
    which names the field. ``reported`` once the run's status and an Event say so."""

    def __init__(self, what: str, detail: str, status: int = 422) -> None:
        super().__init__(f"{what}: {status} {detail}: rejected by the API server")
        self.what = what
        self.detail = detail
        self.reported = False


def translate(exc: BaseException, what: str) -> kopf.TemporaryError | kopf.PermanentError:
    """``what`` names the request ("create Job team-a/x-collect"); the result says what to do, and keeps
    ``exc`` as its cause (what :func:`reason` reads)."""
    if isinstance(exc, (kopf.TemporaryError, kopf.PermanentError)):
        return exc
    out = _intent(exc, what)
    out.__cause__ = exc
    return out


def _intent(exc: BaseException, what: str) -> kopf.TemporaryError | kopf.PermanentError:
    if isinstance(exc, ApiError):
        status = int(exc.status or 0)
        detail = f"{what}: {status} {_message(exc)}".rstrip()
        if status in RETRYABLE:
            return kopf.TemporaryError(detail, delay=_retry_after(exc) or DEFAULT_DELAY)
        if status == 409:
            return kopf.TemporaryError(
                f"{detail} (conflict; retrying with the latest version)", delay=CONFLICT_DELAY
            )
        if status == 403 and "denied the request" in _message(exc):
            # An admission webhook refused the object (the Trainer's, for a TrainJob whose runtime does
            # not exist): the object's fault, not the operator's permissions. Its words fail the run.
            return Rejected(what, _message(exc), status)
        if status in (401, 403):
            return kopf.TemporaryError(
                f"{detail}: the operator's ServiceAccount lacks this permission (see the chart's RBAC)",
                delay=FORBIDDEN_DELAY,
            )
        if status == 404:
            return kopf.TemporaryError(f"{detail} (not found; retrying)", delay=NOT_FOUND_DELAY)
        if status == 422:
            return Rejected(what, _message(exc))
        return kopf.PermanentError(f"{detail}: rejected by the API server")
    if isinstance(exc, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
        return kopf.TemporaryError(
            f"{what}: API server unreachable ({type(exc).__name__}: {exc})", delay=DEFAULT_DELAY
        )
    return kopf.PermanentError(f"{what}: {type(exc).__name__}: {exc}")


def reason(exc: BaseException) -> str:
    """What a failed reconcile ran into, in few words (a metric label: a small, fixed vocabulary): the API
    server's status reason, ``Unreachable``, ``Other`` for the operator's own kopf errors (a child
    someone else owns, no credentials), or the exception's type for a bug."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, ApiError):
            status = int(seen.status or 0)
            return STATUS_REASONS.get(status, f"HTTP{status}")
        if isinstance(seen, (aiohttp.ClientError, asyncio.TimeoutError, OSError)):
            return "Unreachable"
        seen = seen.__cause__
    if isinstance(exc, (kopf.TemporaryError, kopf.PermanentError)):
        return "Other"
    return type(exc).__name__
