"""One small asynchronous client for OpenAI-compatible chat endpoints (student, teacher, judge).

Plain aiohttp rather than the ``openai`` package: the latency harness must timestamp the first streamed
token itself and drive hundreds of requests a second from one core, and every failure has to come back
as a value (an error kind the report can count), never as an exception that ends the evaluation.

- :meth:`ChatClient.complete` — one answer, retried as :mod:`distillery_trainer.retry` says (408/409/
  429/5xx, timeouts, dropped connections — and malformed JSON) with exponential backoff that honours
  ``Retry-After`` (about 30 s at most here: an evaluation waits on its slowest answer); other 4xx are final.
- :meth:`ChatClient.stream` — one streamed answer, never retried (a retry would hide latency), with the
  time to the first content token and to the end of the stream.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from ..redact import scrub
from ..retry import Backoff, TransientError, retryable_status, retrying, transient_kind
from ..retry_after import parse_retry_after

BACKOFF = Backoff(base=0.5, cap=10.0, max_retry_after=30.0)


@dataclass
class Completion:
    text: str | None = None
    error: str | None = None  # an error kind (http_429, timeout, connection, malformed, ...); None = ok
    detail: str | None = None
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None


@dataclass
class StreamTiming:
    start: float  # perf_counter seconds when the request was sent
    ttft: float | None = None  # seconds to the first content token
    latency: float | None = None  # seconds to the end of the stream
    output_tokens: int = 0  # from the usage chunk, else the content chunks seen
    error: str | None = None
    detail: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class _Final(Exception):
    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind, self.detail = kind, detail


def _error_detail(body: str) -> str:
    """The error message of a refused request, with any key the server echoed masked."""
    try:
        data = json.loads(body)
        msg = (
            data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        )
        return scrub(str(msg or body)[:300])
    except (ValueError, AttributeError):
        return scrub(body[:300])


class ChatClient:
    def __init__(
        self,
        base_url: str,
        model: str,
        api_key: str = "EMPTY",
        *,
        timeout: float = 120.0,
        max_retries: int = 3,
        concurrency: int = 16,
        backoff: Backoff = BACKOFF,
    ) -> None:
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.max_retries = max_retries
        self.backoff = backoff
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._concurrency = concurrency
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ChatClient:
        connector = aiohttp.TCPConnector(limit=self._concurrency, limit_per_host=self._concurrency)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("use the client as `async with ChatClient(...) as client`")
        return self._session

    def _payload(
        self, messages: list[dict[str, Any]], sampling: dict[str, Any], stream: bool
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "messages": messages, **sampling}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        return body

    async def reachable(self) -> str | None:
        """None when something answers HTTP at the base URL (any status), else why not."""
        try:
            async with self.session.get(
                self.base_url + "/models", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                await resp.read()
                return None
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            return scrub(f"{type(exc).__name__}: {exc}"[:300])

    # ------------------------------------------------------------------------------------------ one answer

    async def complete(self, messages: list[dict[str, Any]], **sampling: Any) -> Completion:
        payload = self._payload(messages, sampling, stream=False)
        attempts = 0
        try:
            async for attempt in retrying(self.backoff, self.max_retries):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    out = await self._complete_once(payload)
                    out.attempts = attempts
                    return out
        except (_Final, TransientError) as exc:
            return Completion(error=exc.kind, detail=exc.detail, attempts=attempts)
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def _complete_once(self, payload: dict[str, Any]) -> Completion:
        try:
            async with self.session.post(self.url, json=payload) as resp:
                body = await resp.text()
                if resp.status != 200:
                    kind, detail = f"http_{resp.status}", _error_detail(body)
                    if retryable_status(resp.status):
                        raise TransientError(kind, detail, parse_retry_after(resp.headers))
                    raise _Final(kind, detail)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            transport = transient_kind(exc)
            if transport == "timeout":
                raise TransientError(transport, f"no answer within {self._timeout.total:g} s") from exc
            if transport == "connection":
                raise TransientError(transport, scrub(f"{type(exc).__name__}: {exc}"[:300])) from exc
            raise _Final("connection", scrub(f"{type(exc).__name__}: {exc}"[:300])) from exc
        try:
            data = json.loads(body)
            choice = data["choices"][0]
            text = choice["message"]["content"]
            if not isinstance(text, str):
                text = "" if text is None else str(text)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TransientError("malformed", f"unreadable response: {body[:200]!r}") from exc
        usage = data.get("usage") or {}
        return Completion(
            text=text,
            finish_reason=choice.get("finish_reason"),
            prompt_tokens=usage.get("prompt_tokens"),
            completion_tokens=usage.get("completion_tokens"),
        )

    # ------------------------------------------------------------------------------------------ streamed

    async def stream(self, messages: list[dict[str, Any]], **sampling: Any) -> StreamTiming:
        payload = self._payload(messages, sampling, stream=True)
        t = StreamTiming(start=time.perf_counter())
        chunks = 0
        usage_tokens: int | None = None
        try:
            async with self.session.post(self.url, json=payload) as resp:
                if resp.status != 200:
                    t.error, t.detail = f"http_{resp.status}", _error_detail(await resp.text())
                    return t
                # Whole network reads split into lines by hand: a readline() per SSE line costs more than
                # the parsing (one await per line, blank separators included). Read to the end of the body
                # even after [DONE], or the connection cannot go back to the pool.
                buf = b""
                async for piece in resp.content.iter_any():
                    buf += piece
                    *lines, buf = buf.split(b"\n")
                    for raw in lines:
                        if not raw.startswith(b"data:"):
                            continue  # blank separators, SSE comments (pings), event names
                        data = raw[5:].strip()
                        if data == b"[DONE]":
                            continue
                        try:
                            chunk = json.loads(data.decode("utf-8", "replace"))
                        except ValueError:
                            t.error, t.detail = "malformed", f"unreadable stream chunk: {data[:200]!r}"
                            return t
                        if chunk.get("usage"):
                            usage_tokens = chunk["usage"].get("completion_tokens")
                        for choice in chunk.get("choices") or ():
                            if (choice.get("delta") or {}).get("content"):
                                chunks += 1
                                if t.ttft is None:
                                    t.ttft = time.perf_counter() - t.start
        except TimeoutError:
            t.error, t.detail = "timeout", f"no complete answer within {self._timeout.total:g} s"
            return t
        except (aiohttp.ClientError, OSError) as exc:
            t.error, t.detail = "connection", scrub(f"{type(exc).__name__}: {exc}"[:300])
            return t
        t.latency = time.perf_counter() - t.start
        t.output_tokens = usage_tokens if usage_tokens is not None else chunks
        if t.ttft is None:
            t.ttft = t.latency  # an empty answer: the first (and only) thing seen is the end
        return t


MAX_RETRIES = 3  # per quality/judge request; the latency harness never retries
T = TypeVar("T")
R = TypeVar("R")
Log = Callable[[str], None]


async def bounded(
    items: Sequence[T], fn: Callable[[T], Awaitable[R]], limit: int, label: str, log: Log
) -> list[R]:
    """``fn`` over ``items``, at most ``limit`` at a time, in order; progress every tenth."""
    sem = asyncio.Semaphore(limit)
    done = 0
    step = max(1, len(items) // 10)

    async def one(x: T) -> R:
        nonlocal done
        async with sem:
            r = await fn(x)
        done += 1
        if done % step == 0 or done == len(items):
            log(f"{label} {done}/{len(items)}")
        return r

    return list(await asyncio.gather(*(one(x) for x in items)))
