"""The latency harness against a server with a known latency distribution: percentiles within 2 %."""

from __future__ import annotations

import asyncio
import math
import random
from statistics import NormalDist

import pytest
from distillery_trainer.evaluate.client import ChatClient
from distillery_trainer.evaluate.latency import LoadResult, run_load
from distillery_trainer.evaluate.stats import percentile

from tests.support.servers.fake_openai import fake_openai_process

N = 200
WORDS = 4
TOKEN_DELAY = 0.05  # the fake sleeps after each streamed word: the stream ends 4 x 50 ms after the first


def lognormal_quantiles(n: int, median: float, sigma: float) -> list[float]:
    """n points that ARE the distribution: its quantiles at (i + 0.5) / n, in a shuffled order."""
    values = [median * math.exp(sigma * NormalDist().inv_cdf((i + 0.5) / n)) for i in range(n)]
    random.Random(1).shuffle(values)
    return values


def test_percentiles_match_a_known_distribution_within_2_percent() -> None:
    delays = lognormal_quantiles(N, median=0.8, sigma=0.5)  # 0.2 s ... 3.3 s before the first token

    async def go(base_url: str) -> LoadResult:
        async with ChatClient(base_url, "m", concurrency=40) as client:
            return await run_load(
                client,
                [[{"role": "user", "content": "hi"}]],
                requests=N,
                concurrency=40,
                sampling={"max_tokens": 16},
            )

    # The server in its own process, as a real one is: it shares no GIL with the harness it times.
    with fake_openai_process(delays, token_delay=TOKEN_DELAY, words=WORDS) as base_url:
        result = asyncio.run(go(base_url))
    assert len(result.ok) == N and not result.errors
    ttft, e2e = result.ttfts(), result.latencies()
    for q in (50, 95, 99):
        assert percentile(ttft, q) == pytest.approx(percentile(delays, q), rel=0.02)
        expected = percentile([d + WORDS * TOKEN_DELAY for d in delays], q)
        assert percentile(e2e, q) == pytest.approx(expected, rel=0.02)
    lat = result.to_latency()
    assert lat is not None and lat.p95 == pytest.approx(1000 * percentile(e2e, 95), abs=0.001)
    assert result.output_tokens() == N * WORDS  # from the stream's usage chunk
