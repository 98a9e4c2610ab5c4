"""The latency harness against a server with a known latency distribution: percentiles within 2 %."""

from __future__ import annotations

import asyncio
import math
import random
from statistics import NormalDist
from typing import Any

import pytest
from distillery_trainer.evaluate.client import ChatClient
from distillery_trainer.evaluate.latency import run_load
from distillery_trainer.evaluate.stats import percentile

from tests.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig, sequence_latency

N = 200
TOKENS = 4
TOKEN_DELAY = 0.05  # the fake sleeps after each streamed word: the stream ends 4 x 50 ms after the first


def lognormal_quantiles(n: int, median: float, sigma: float) -> list[float]:
    """n points that ARE the distribution: its quantiles at (i + 0.5) / n, in a shuffled order."""
    values = [median * math.exp(sigma * NormalDist().inv_cdf((i + 0.5) / n)) for i in range(n)]
    random.Random(1).shuffle(values)
    return values


def fixed_words(messages: list[dict[str, Any]], sample: int) -> str:
    return " ".join(f"w{i}" for i in range(TOKENS))


def test_percentiles_match_a_known_distribution_within_2_percent() -> None:
    delays = lognormal_quantiles(N, median=0.4, sigma=0.5)  # 0.10 s ... 1.6 s before the first token
    config = FakeOpenAIConfig(latency=sequence_latency(delays), token_delay=TOKEN_DELAY, answer=fixed_words)

    async def go() -> Any:
        async with ChatClient(server.base_url, "m", concurrency=25) as client:
            return await run_load(
                client,
                [[{"role": "user", "content": "hi"}]],
                requests=N,
                concurrency=25,
                sampling={"max_tokens": 16},
            )

    with FakeOpenAI(config) as server:
        result = asyncio.run(go())
    assert len(result.ok) == N and not result.errors
    ttft, e2e = result.ttfts(), result.latencies()
    for q in (50, 95, 99):
        assert percentile(ttft, q) == pytest.approx(percentile(delays, q), rel=0.02)
        expected = percentile([d + TOKENS * TOKEN_DELAY for d in delays], q)
        assert percentile(e2e, q) == pytest.approx(expected, rel=0.02)
    lat = result.to_latency()
    assert lat is not None and lat.p95 == pytest.approx(1000 * percentile(e2e, 95), abs=0.001)
    assert result.output_tokens() == N * TOKENS  # from the stream's usage chunk
