"""The learning-rate schedule, driven by how much of the run is done: steps, or time when a budget is set.

With ``training.maxSeconds`` the run ends when the time is up, usually before the planned steps, so the
schedule follows ``max(step fraction, time fraction)``: warm-up and decay fit the budget instead of leaving
the LR at its peak when the time runs out. The fraction is evaluated at the middle of a step, so neither the
first nor the last step runs at a learning rate of exactly 0.
"""

from __future__ import annotations

import math


def run_fraction(
    step: int, total_steps: int, elapsed_s: float = 0.0, max_seconds: float | None = None
) -> float:
    """How much of the run is done in the middle of 0-based ``step``, in [0, 1]."""
    frac = (step + 0.5) / max(total_steps, 1)
    if max_seconds:
        frac = max(frac, elapsed_s / max_seconds)
    return min(max(frac, 0.0), 1.0)


def lr_factor(fraction: float, scheduler: str, warmup_ratio: float) -> float:
    """Multiplier of the peak learning rate at ``fraction`` of the run."""
    if warmup_ratio > 0 and fraction < warmup_ratio:
        return fraction / warmup_ratio
    if scheduler == "constant":
        return 1.0
    decay = (fraction - warmup_ratio) / max(1.0 - warmup_ratio, 1e-9)
    decay = min(max(decay, 0.0), 1.0)
    if scheduler == "linear":
        return 1.0 - decay
    if scheduler == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * decay))
    raise ValueError(f"unknown lrScheduler {scheduler!r}")
