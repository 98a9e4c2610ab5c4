"""Requests-per-minute and tokens-per-minute limits: token buckets that callers wait on, first come first served.

Each bucket holds one second's worth of its per-minute rate (at least one request), so traffic is smooth
rather than a burst at the top of every minute. A request costs its estimated tokens up front (prompt plus
``max_tokens`` × samples, as OpenAI counts it against the limit) and :meth:`RateLimiter.settle` refunds or
charges the difference once the usage is known. A cost larger than a bucket waits for a full bucket and
leaves it in debt, so a single huge request is never blocked forever.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


class TokenBucket:
    def __init__(
        self, per_minute: float, capacity: float | None = None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        if per_minute <= 0:
            raise ValueError("a rate limit must be positive")
        self.rate = per_minute / 60.0
        self.capacity = capacity if capacity is not None else max(1.0, self.rate)
        self.level = self.capacity
        self._clock = clock
        self._stamp = clock()

    def _refill(self) -> None:
        now = self._clock()
        self.level = min(self.capacity, self.level + (now - self._stamp) * self.rate)
        self._stamp = now

    def wait_time(self, amount: float) -> float:
        """Seconds until ``amount`` can be taken (0 now)."""
        self._refill()
        need = min(amount, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate

    def take(self, amount: float) -> None:
        self._refill()
        self.level -= amount

    def give(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


class RateLimiter:
    """Waits until both limits (either may be absent) admit a request; waiters are served in order."""

    def __init__(
        self,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.requests = TokenBucket(requests_per_minute, clock=clock) if requests_per_minute else None
        self.tokens = TokenBucket(tokens_per_minute, clock=clock) if tokens_per_minute else None
        self._sleep = sleep
        self._lock = asyncio.Lock()
        self.waited = 0.0  # seconds spent waiting, summed over callers

    @property
    def active(self) -> bool:
        return self.requests is not None or self.tokens is not None

    async def acquire(self, tokens: int = 0) -> None:
        if not self.active:
            return
        async with self._lock:  # one waiter at a time: the others queue behind it, in order
            while True:
                wait = max(
                    self.requests.wait_time(1) if self.requests else 0.0,
                    self.tokens.wait_time(tokens) if self.tokens else 0.0,
                )
                if wait <= 0:
                    break
                self.waited += wait
                await self._sleep(wait)
            if self.requests:
                self.requests.take(1)
            if self.tokens:
                self.tokens.take(tokens)

    def settle(self, estimated: int, actual: int) -> None:
        """Correct a request's token cost once its usage is known."""
        if self.tokens is None or actual == estimated:
            return
        if actual < estimated:
            self.tokens.give(estimated - actual)
        else:
            self.tokens.take(actual - estimated)
