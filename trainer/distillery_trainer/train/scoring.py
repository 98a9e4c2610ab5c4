"""The teacher's scores of a sequence it did not write: its top-k log-probabilities at every token of a
student's sample, from the teacher's vLLM server (on-policy distillation, :mod:`.onpolicy`).

One request per sequence, as TRL's ``VLLMClient.get_sequence_logprobs`` and its async distillation worker
send it: ``POST /v1/completions`` with the prompt *as token ids* (prompt + sample: no text round trip, so
no tokenizer can split it differently), ``max_tokens: 1`` (vLLM has to generate something; the token is
thrown away), ``prompt_logprobs: k`` and ``return_token_ids: true``. vLLM's ``prompt_logprobs[i]`` holds
the distribution of token ``i`` given tokens ``< i``: its top-k ids and, always, token ``i`` itself (at
whatever rank). So the rows of the sample's tokens are entries ``len(prompt) .. len(sequence) - 1``, and
row ``j`` is the teacher's prediction of sample token ``j`` — exactly what the student's logits at the
position before it predict (the loss's shifted rows).

Alignment is checked on every answer, not assumed: the server must echo the very ids it was sent
(``prompt_token_ids``), return one entry per token, and every entry must hold its own token; anything else
is a :class:`ScoringError` (an off-by-one here would train on garbage without a visible symptom).

Temperature: vLLM reports prompt logprobs *as the model computes them* (its default ``--logprobs-mode
raw_logprobs``: before temperature, penalties or top-p), so they are at T = 1 whatever the request's
temperature; the loss softens them by ``onPolicy.temperature`` itself (:mod:`.divergences`).

Each row has ``k + 1`` columns: the teacher's top-k by rank, then the sampled token when it is not among
them (the loss then always sees the teacher's judgement of the token the student chose), padding
otherwise (id 0, logprob ``-inf``, which the loss ignores). Requests are retried as
:mod:`distillery_trainer.retry` decides (408/409/429/5xx, timeouts, dropped connections, malformed bodies);
other answers are final and stop the run with the server's message. The server needs ``--max-logprobs``
of at least k (:meth:`~distillery_trainer.serve.args.VllmServer.for_teacher` sets it for a self-hosted
teacher).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import numpy as np

from ..redact import scrub
from ..retry import Backoff, TransientError, retryable_status, retrying, transient_kind
from ..retry_after import parse_retry_after

BACKOFF = Backoff(base=0.5, cap=30.0)


class ScoringError(RuntimeError):
    """The teacher could not score a sequence (a refused request, retries spent, or a misaligned answer)."""


@dataclass(frozen=True)
class Scores:
    """The teacher's judgement of one sample: row ``j`` is its distribution of sample token ``j``.

    ``ids`` int64 ``[n, k + 1]`` and ``logprobs`` float32 ``[n, k + 1]`` (T = 1; ``-inf``: padding);
    ``sampled`` float32 ``[n]``: the teacher's logprob of each sampled token."""

    ids: np.ndarray
    logprobs: np.ndarray
    sampled: np.ndarray

    def __len__(self) -> int:
        return int(self.ids.shape[0])


@dataclass
class ScoringStats:
    requests: int = 0
    retries: int = 0
    tokens: int = 0  # sequence tokens the teacher processed (prompt + sample)
    seconds: float = 0.0  # wall time spent waiting for scores
    failures: dict[str, int] = field(default_factory=dict)


def parse_prompt_logprobs(
    choice: dict[str, Any], sequence: Sequence[int], n_prompt: int, top_k: int
) -> Scores:
    """The sample's rows of one ``/v1/completions`` choice scored over ``sequence`` (prompt + sample)."""
    echoed = choice.get("prompt_token_ids")
    if echoed is not None and list(echoed) != list(sequence):
        raise ScoringError(
            f"the teacher scored other tokens than it was sent ({len(echoed)} ids back for {len(sequence)} "
            "sent, or different ones): is the endpoint a vLLM server taking token-id prompts?"
        )
    entries = choice.get("prompt_logprobs")
    if not isinstance(entries, list):
        raise ScoringError(
            "the teacher's answer has no prompt_logprobs: training.method onPolicy needs a vLLM server "
            "(an OpenAI-compatible API without prompt_logprobs cannot score the student's samples)"
        )
    if len(entries) != len(sequence):
        raise ScoringError(
            f"the teacher returned {len(entries)} prompt logprobs for a sequence of {len(sequence)} tokens"
        )
    n = len(sequence) - n_prompt
    ids = np.zeros((n, top_k + 1), dtype=np.int64)
    lps = np.full((n, top_k + 1), -np.inf, dtype=np.float32)
    sampled = np.empty(n, dtype=np.float32)
    for j in range(n):
        entry = entries[n_prompt + j]
        token = int(sequence[n_prompt + j])
        if not isinstance(entry, dict) or str(token) not in entry:
            raise ScoringError(
                f"the teacher's prompt_logprobs at position {n_prompt + j} do not include that position's "
                f"token {token}: the scores are not aligned to the sample"
            )
        ranked = sorted(
            ((int(t), v) for t, v in entry.items()), key=lambda kv: (int(kv[1].get("rank") or 1 << 30), kv[0])
        )
        top = [(t, _logprob(v)) for t, v in ranked[:top_k]]
        for c, (t, lp) in enumerate(top):
            ids[j, c], lps[j, c] = t, lp
        own = _logprob(entry[str(token)])
        sampled[j] = own
        if token not in {t for t, _ in top}:
            ids[j, top_k], lps[j, top_k] = token, own
    return Scores(ids, lps, sampled)


def _logprob(value: Any) -> float:
    lp = float(value["logprob"] if isinstance(value, dict) else value)
    return -math.inf if math.isnan(lp) else lp


class TeacherScorer:
    """Scores student samples with the teacher's vLLM server; synchronous for the training loop (each call
    runs its requests concurrently on a private event loop)."""

    def __init__(
        self,
        base_url: str,
        model: str,
        top_k: int,
        api_key: str = "EMPTY",
        *,
        timeout: float = 120.0,
        max_retries: int = 8,
        concurrency: int = 16,
        backoff: Backoff = BACKOFF,
    ) -> None:
        self.url = base_url.rstrip("/") + "/completions"
        self.model = model
        self.top_k = top_k
        self.max_retries = max_retries
        self.backoff = backoff
        self.concurrency = concurrency
        self._headers = {"Authorization": f"Bearer {api_key}", "Content-Type": "application/json"}
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self.stats = ScoringStats()

    def score(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scores]:
        """``[(prompt ids, sample ids), ...]`` → each sample's :class:`Scores`, in order."""
        if not sequences:
            return []
        started = time.monotonic()
        try:
            return asyncio.run(self._score_all(sequences))
        finally:
            self.stats.seconds += time.monotonic() - started

    async def _score_all(self, sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> list[Scores]:
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(
            connector=connector, timeout=self._timeout, headers=self._headers
        ) as session:
            gate = asyncio.Semaphore(self.concurrency)

            async def one(prompt: Sequence[int], sample: Sequence[int]) -> Scores:
                async with gate:
                    return await self._score_one(session, list(prompt), list(sample))

            return list(await asyncio.gather(*(one(p, s) for p, s in sequences)))

    async def _score_one(
        self, session: aiohttp.ClientSession, prompt: list[int], sample: list[int]
    ) -> Scores:
        sequence = prompt + sample
        payload = {
            "model": self.model,
            "prompt": sequence,
            "max_tokens": 1,
            "temperature": 1.0,
            "prompt_logprobs": self.top_k,
            "return_token_ids": True,
        }
        try:
            async for attempt in retrying(self.backoff, self.max_retries, before_sleep=self._count_retry):
                with attempt:
                    self.stats.requests += 1
                    choice = await self._post(session, payload)
                    scores = parse_prompt_logprobs(choice, sequence, len(prompt), self.top_k)
                    self.stats.tokens += len(sequence)
                    return scores
        except TransientError as exc:
            raise ScoringError(
                f"the teacher at {self.url} did not score a sample after {self.max_retries} retries "
                f"({exc.kind}: {exc.detail})"
            ) from None
        raise AssertionError("unreachable: the retry loop returns or raises")

    def _count_retry(self, state: Any) -> None:
        self.stats.retries += 1
        exc = state.outcome.exception() if state.outcome is not None else None
        kind = exc.kind if isinstance(exc, TransientError) else "other"
        self.stats.failures[kind] = self.stats.failures.get(kind, 0) + 1

    async def _post(self, session: aiohttp.ClientSession, payload: dict[str, Any]) -> dict[str, Any]:
        try:
            async with session.post(self.url, json=payload) as resp:
                body = await resp.text()
                if resp.status != 200:
                    detail = scrub(body[:400])
                    if retryable_status(resp.status):
                        raise TransientError(f"http_{resp.status}", detail, parse_retry_after(resp.headers))
                    raise ScoringError(
                        f"the teacher at {self.url} refused to score a sample (HTTP {resp.status}: {detail}); "
                        "a vLLM server needs --max-logprobs >= training.onPolicy.topK"
                    )
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            kind = transient_kind(exc)
            if kind is None:
                raise ScoringError(scrub(f"{type(exc).__name__}: {exc}"[:300])) from exc
            raise TransientError(kind, scrub(f"{type(exc).__name__}: {exc}"[:300])) from exc
        try:
            choice = json.loads(body)["choices"][0]
            if not isinstance(choice, dict):
                raise TypeError("choice is not an object")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise TransientError("malformed", f"unreadable response: {body[:200]!r}") from exc
        return choice
