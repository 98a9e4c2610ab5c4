"""The latency harness: N streamed requests at concurrency C, timed from this side of the wire.

C workers pull request numbers from one counter (no task per request), so the harness itself stays
cheap: on 2 cores it drives far more requests a second than a CPU vLLM can answer (see bench/). Each
request is streamed, so the time to the first content token (TTFT) is measured as well as the end to
end latency. Failed requests are counted by kind and never enter the percentiles.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..api.status import Latency
from .client import ChatClient, StreamTiming
from .stats import percentile

Messages = list[dict[str, Any]]
HISTOGRAM_SAMPLES = 10_000


@dataclass
class LoadResult:
    requests: int
    concurrency: int
    wall_seconds: float = 0.0
    timings: list[StreamTiming] = field(default_factory=list)

    @property
    def ok(self) -> list[StreamTiming]:
        return [t for t in self.timings if t.ok]

    @property
    def errors(self) -> Counter[str]:
        return Counter(t.error for t in self.timings if t.error is not None)

    def latencies(self) -> list[float]:
        return [t.latency for t in self.ok if t.latency is not None]

    def ttfts(self) -> list[float]:
        return [t.ttft for t in self.ok if t.ttft is not None]

    def output_tokens(self) -> int:
        return sum(t.output_tokens for t in self.ok)

    def tokens_per_second(self) -> float | None:
        return self.output_tokens() / self.wall_seconds if self.wall_seconds > 0 and self.ok else None

    def to_latency(self) -> Latency | None:
        lat, ttft = self.latencies(), self.ttfts()
        if not lat:
            return None
        return Latency(
            p50=_ms(percentile(lat, 50)),
            p95=_ms(percentile(lat, 95)),
            p99=_ms(percentile(lat, 99)),
            ttft_p50=_ms(percentile(ttft, 50)) if ttft else None,
            ttft_p95=_ms(percentile(ttft, 95)) if ttft else None,
        )

    def summary(self) -> dict[str, Any]:
        """Everything results.json keeps about one endpoint's load run (times in ms)."""
        lat, ttft = self.latencies(), self.ttfts()
        tpot = [
            (t.latency - t.ttft) / (t.output_tokens - 1)
            for t in self.ok
            if t.latency is not None and t.ttft is not None and t.output_tokens > 1
        ]
        out: dict[str, Any] = {
            "requests": self.requests,
            "concurrency": self.concurrency,
            "succeeded": len(self.ok),
            "errors": dict(self.errors),
            "errorSamples": [f"{t.error}: {t.detail}" for t in self.timings if t.error][:5],
            "wallSeconds": round(self.wall_seconds, 3),
            "requestsPerSecond": round(len(self.ok) / self.wall_seconds, 3) if self.wall_seconds else None,
            "outputTokens": self.output_tokens(),
            "outputTokensPerSecond": _round(self.tokens_per_second()),
        }
        for name, values in (("latencyMs", lat), ("ttftMs", ttft), ("tpotMs", tpot)):
            out[name] = (
                {
                    "mean": _ms(sum(values) / len(values)),
                    "p50": _ms(percentile(values, 50)),
                    "p95": _ms(percentile(values, 95)),
                    "p99": _ms(percentile(values, 99)),
                    "max": _ms(max(values)),
                }
                if values
                else None
            )
        # for the histogram: every request's latency, or an even subsample of 10,000 of them
        step = max(1, len(lat) // HISTOGRAM_SAMPLES)
        out["latencySeconds"] = [round(v, 5) for v in lat[::step]]
        return out


def _ms(seconds: float) -> float:
    return round(seconds * 1000.0, 3)


def _round(v: float | None) -> float | None:
    return round(v, 3) if v is not None else None


async def run_load(
    client: ChatClient,
    prompts: Sequence[Messages],
    *,
    requests: int,
    concurrency: int,
    sampling: dict[str, Any],
    per_prompt: Sequence[dict[str, Any]] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LoadResult:
    """``requests`` streamed chat completions, ``concurrency`` at a time, cycling through ``prompts``.

    ``per_prompt`` (one dict per prompt) overrides ``sampling`` for that prompt, e.g. its own output
    length, as vLLM's benchmark datasets carry one per prompt.
    """
    import asyncio

    if not prompts:
        raise ValueError("the latency harness needs at least one prompt")
    if per_prompt is not None and len(per_prompt) != len(prompts):
        raise ValueError("per_prompt needs one entry per prompt")
    params = [dict(sampling, **(per_prompt[i] if per_prompt else {})) for i in range(len(prompts))]
    result = LoadResult(requests=requests, concurrency=concurrency)
    timings: list[StreamTiming | None] = [None] * requests
    next_index = 0
    done = 0

    async def worker() -> None:
        nonlocal next_index, done
        while next_index < requests:
            i = next_index
            next_index += 1
            timings[i] = await client.stream(prompts[i % len(prompts)], **params[i % len(prompts)])
            done += 1
            if progress is not None:
                progress(done, requests)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(min(concurrency, requests))))
    result.wall_seconds = time.perf_counter() - start
    result.timings = [t for t in timings if t is not None]
    return result
