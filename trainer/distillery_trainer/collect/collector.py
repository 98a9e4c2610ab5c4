"""The collection engine: ``concurrency`` workers ask the teacher, one writer puts answers on disk.

A worker takes the next prompt, looks it up in the cache, else waits for the rate limiter and calls the
teacher — retrying what :mod:`.verdict` calls retryable, in :mod:`distillery_trainer.retry`'s loop — and
hands the answer (or the failure) to the writer. The writer flushes a chunk every ``chunk_lines`` answers
or ``flush_seconds``, whichever comes first, off the event loop. An answer is in the cache as soon as it
arrives, so a kill loses only the requests in flight: the answers waiting for a flush come back from the
cache on resume, for free.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from tenacity import RetryCallState

from ..data.topk import entry_key
from ..retry import Backoff, TransientError, error_of, retrying, unreachable
from .cache import AnswerCache, cache_key
from .prompts import Prompt
from .ratelimit import RateLimiter
from .store import Failure, Record, ShardStore
from .teacher import Completion, RequestSpec, Teacher, TokenIds, parse_completion
from .verdict import FAIL, FATAL, Verdict, classify

log = logging.getLogger("distillery.collect")

Selection = Literal["first", "bestLogprob", "all"]


class FatalError(RuntimeError):
    """Every prompt would fail the same way (the key, the URL, the model): stop the shard."""


class _Again(TransientError):
    """A failure the verdict says to retry, on its way through the retry loop."""

    def __init__(self, verdict: Verdict, reason: str) -> None:
        super().__init__(verdict.kind, reason, verdict.retry_after)
        self.verdict = verdict


@dataclass(frozen=True)
class Settings:
    request: RequestSpec
    model_identity: str  # what keys the cache: the weights, not the served name
    # An endpoint teacher's base URL keys the cache too: two servers may serve different models under one
    # name. None for a self-hosted teacher, keyed by its weights wherever it is served.
    endpoint: str | None = None
    top_k: int | None = None  # white-box: keep top-k arrays
    selection: Selection = "first"
    concurrency: int = 16
    max_retries: int = 8
    backoff: Backoff = field(default_factory=Backoff)
    chunk_lines: int = 256
    flush_seconds: float = 2.0


@dataclass
class Counters:
    """This attempt's numbers. ``done``/``failed`` count what reached the disk."""

    done: int = 0
    failed: int = 0
    failed_retryable: int = 0
    cached: int = 0
    requests: int = 0
    retries: int = 0
    input_tokens: int = 0  # paid: answers from the teacher, not from the cache
    output_tokens: int = 0
    unmapped_tokens: int = 0
    processed: int = 0  # answered or failed, flushed or not (for the progress display)
    processed_failed: int = 0
    processed_cached: int = 0
    last_error: str | None = None  # the latest error a request met that is retried (for the progress)


def build_record(
    prompt: Prompt, completion: Completion, selection: Selection, top_k: int | None, cached: bool
) -> Record:
    """The JSONL line(s) of one prompt: the chosen sample, or every sample (seqkd ``all``)."""
    base: dict[str, Any] = {"id": prompt.id, "messages": prompt.messages}
    extra: dict[str, Any] = {"split": prompt.split}
    if prompt.reference is not None:
        extra["reference"] = prompt.reference
    if prompt.category is not None:
        extra["category"] = prompt.category
    choices = completion.choices
    n = len(choices)

    def line(i: int, sample: int | None) -> dict[str, Any]:
        c = choices[i]
        if n == 1:
            out_tokens = completion.completion_tokens
        else:
            out_tokens = c.tokens if c.tokens is not None else round(completion.completion_tokens / n)
        obj = {
            **base,
            "response": c.text,
            "finish_reason": c.finish_reason,
            "usage": {"prompt_tokens": completion.prompt_tokens, "completion_tokens": out_tokens},
            **extra,
        }
        if c.mean_logprob is not None:
            obj["meanLogprob"] = round(c.mean_logprob, 6)
        if sample is not None:
            obj["sample"] = sample
        return obj

    if selection == "all" and n > 1:
        picks: list[tuple[int, int | None]] = [(i, i) for i in range(n)]
    elif selection == "bestLogprob" and n > 1:
        scores = [c.mean_logprob if c.mean_logprob is not None else float("-inf") for c in choices]
        picks = [(max(range(n), key=lambda i: (scores[i], -i)), None)]
    else:
        picks = [(0, None)]
    lines = [line(i, s) for i, s in picks]
    arrays = {}
    if top_k:
        for i, s in picks:
            arr = choices[i].topk
            if arr is None:
                raise ValueError(f"{prompt.id}: white-box answer without top-k arrays")
            arrays[entry_key(prompt.id, s)] = arr
    return Record(
        id=prompt.id,
        lines=lines,
        arrays=arrays,
        cached=cached,
        paid_input_tokens=0 if cached else completion.prompt_tokens,
        paid_output_tokens=0 if cached else completion.completion_tokens,
    )


class Collector:
    def __init__(
        self,
        settings: Settings,
        teacher: Teacher,
        store: ShardStore,
        *,
        cache: AnswerCache | None = None,
        limiter: RateLimiter | None = None,
        token_ids: TokenIds | None = None,
        redact: Callable[[str], str] = lambda s: s,
        on_flush: Callable[[Counters], None] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.settings = settings
        self.teacher = teacher
        self.store = store
        self.cache = cache
        self.limiter = limiter or RateLimiter()
        self.token_ids = token_ids
        self.redact = redact
        self.on_flush = on_flush
        self.rng = rng or random.Random()
        self.counters = Counters()
        self.fatal: str | None = None
        self.reached = False  # the teacher has answered a request (with anything, an error included)
        self._keys: dict[str, str] = {}
        self._hits: set[str] = set()
        self._request_shape = {
            k: v for k, v in settings.request.body([]).items() if k not in ("messages", "model")
        }

    # ------------------------------------------------------------------------------------------ one prompt

    async def _ask(self, prompt: Prompt) -> Completion | Failure:
        """The teacher's answer, or why there is none: the attempts run in the shared retry loop, each
        waiting for the rate limiter first; a worker sleeps between them holding its slot."""
        s = self.settings
        body = s.request.body(prompt.messages)
        estimate = s.request.estimated_tokens(prompt.messages)

        def retried(state: RetryCallState) -> None:
            self.counters.retries += 1
            log.debug(
                "retry %d of %s in %.2fs: %s",
                state.attempt_number,
                prompt.id,
                state.upcoming_sleep,
                error_of(state),
            )

        attempts = 0
        try:
            async for attempt in retrying(s.backoff, s.max_retries, rng=self.rng, before_sleep=retried):
                with attempt:
                    attempts = attempt.retry_state.attempt_number
                    return await self._attempt(prompt, body, estimate, attempts)
        except _Again as exc:
            return Failure(
                prompt.id,
                exc.kind,
                f"gave up after {attempts} attempts (collection.maxRetries={s.max_retries}): {exc.detail}",
                True,
                exc.verdict.status,
                attempts,
            )
        raise AssertionError("unreachable: the retry loop returns or raises")

    async def _attempt(
        self, prompt: Prompt, body: dict[str, Any], estimate: int, attempts: int
    ) -> Completion | Failure:
        """One request; raises :class:`_Again` when the failure is worth another attempt."""
        s = self.settings
        await self.limiter.acquire(estimate)
        self.counters.requests += 1
        try:
            data = await self.teacher.complete(body)
            completion = parse_completion(data, top_k=s.top_k, token_ids=self.token_ids)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - classify() re-raises what it does not know
            verdict = classify(exc)
            self.limiter.settle(estimate, 0)
            if not self.reached and (cause := unreachable(exc, self._url())):
                # No request has ever reached the teacher and this one could not connect: a wrong
                # baseURL (or a teacher that is not running), not load. Retrying would only hide it.
                fix = (
                    "check teacher.endpoint.baseURL" if s.endpoint else "is the self-hosted teacher serving?"
                )
                raise FatalError(f"{self.redact(cause)}: the teacher cannot be reached — {fix}") from None
            if verdict.kind not in ("timeout", "connection"):
                self.reached = True
            reason = self.redact(verdict.reason)
            if verdict.action == FATAL:
                raise FatalError(reason) from None
            if verdict.action == FAIL:
                return Failure(prompt.id, verdict.kind, reason, False, verdict.status, attempts)
            self.counters.last_error = reason[:300]
            raise _Again(verdict, reason) from None
        self.reached = True
        self.limiter.settle(estimate, completion.prompt_tokens + completion.completion_tokens)
        self.counters.unmapped_tokens += completion.unmapped_tokens
        return completion

    def _url(self) -> str:
        return str(getattr(self.teacher, "base_url", None) or self.settings.endpoint or "the teacher")

    async def _one(self, prompt: Prompt) -> Record | Failure:
        s = self.settings
        key = self._keys.get(prompt.id, "")
        completion = None
        if self.cache is not None and key in self._hits:
            completion = await asyncio.to_thread(self.cache.get, key)
            if completion is not None and s.top_k and any(c.topk is None for c in completion.choices):
                completion = None  # an entry without its arrays: ask again
        cached = completion is not None
        if completion is None:
            outcome = await self._ask(prompt)
            if isinstance(outcome, Failure):
                return outcome
            completion = outcome
            if self.cache is not None:  # before the worker moves on: a kill loses at most what is in flight
                await asyncio.to_thread(self.cache.put, key, completion)
        return build_record(prompt, completion, s.selection, s.top_k, cached)

    # ------------------------------------------------------------------------------------------ the run

    async def run(self, prompts: list[Prompt], stop: asyncio.Event | None = None) -> Counters:
        """Collect ``prompts`` (those not done yet); returns when all are answered or failed, on a fatal
        error (``self.fatal`` set), or when ``stop`` is set (in-flight requests are dropped)."""
        pending = deque(prompts)
        out: asyncio.Queue[Record | Failure | None] = asyncio.Queue()
        stop = stop or asyncio.Event()
        if self.cache is not None:
            shape, model = self._request_shape, self.settings.model_identity
            endpoint = self.settings.endpoint
            self._keys = {p.id: cache_key(model, shape, p.messages, endpoint=endpoint) for p in prompts}
            self._hits = await asyncio.to_thread(self.cache.existing, self._keys.values())

        async def worker() -> None:
            while pending and not stop.is_set():
                prompt = pending.popleft()
                try:
                    result = await self._one(prompt)
                except FatalError as exc:
                    if self.fatal is None:
                        self.fatal = str(exc)
                    stop.set()
                    return
                c = self.counters
                c.processed += 1
                if isinstance(result, Failure):
                    c.processed_failed += 1
                elif result.cached:
                    c.processed_cached += 1
                out.put_nowait(result)

        writer = asyncio.create_task(self._writer(out))
        workers = [
            asyncio.create_task(worker()) for _ in range(min(self.settings.concurrency, max(1, len(prompts))))
        ]
        stopper = asyncio.create_task(stop.wait())
        try:
            remaining = set(workers)
            while remaining:
                finished, _ = await asyncio.wait(remaining | {stopper}, return_when=asyncio.FIRST_COMPLETED)
                remaining -= finished
                for task in finished & set(workers):
                    task.result()  # a bug in a worker surfaces here
                if stopper in finished:
                    for task in remaining:
                        task.cancel()
                    await asyncio.gather(*remaining, return_exceptions=True)
                    break
        finally:
            stopper.cancel()
            for task in workers:
                task.cancel()
            out.put_nowait(None)
            await writer
        return self.counters

    async def _writer(self, out: asyncio.Queue[Record | Failure | None]) -> None:
        s = self.settings
        records: list[Record] = []
        failures: list[Failure] = []
        last = time.monotonic()
        finished = False
        while not finished:
            timeout = max(0.0, s.flush_seconds - (time.monotonic() - last))
            try:
                item = await asyncio.wait_for(out.get(), timeout=timeout)
                if item is None:
                    finished = True
                elif isinstance(item, Failure):
                    failures.append(item)
                else:
                    records.append(item)
            except TimeoutError:
                pass  # nothing new: time to flush what there is
            due = len(records) >= s.chunk_lines or time.monotonic() - last >= s.flush_seconds
            if finished or due:
                if records or failures:
                    batch, fails = records, failures
                    records, failures = [], []
                    await asyncio.to_thread(self._flush, batch, fails)
                last = time.monotonic()

    def _flush(self, records: list[Record], failures: list[Failure]) -> None:
        self.store.append(records)
        self.store.fail(failures)
        c = self.counters
        for r in records:
            c.done += 1
            c.cached += r.cached
            c.input_tokens += r.paid_input_tokens
            c.output_tokens += r.paid_output_tokens
        for f in failures:
            c.failed += 1
            c.failed_retryable += f.retryable
        if self.on_flush is not None:
            self.on_flush(c)
