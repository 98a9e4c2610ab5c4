"""The operator's Prometheus endpoint, scraped over real HTTP while the real operator process drives a run
through its stages against the API emulator: runs by phase, stage durations, reconcile errors."""

from __future__ import annotations

import asyncio
import re
import socket
import time
from collections.abc import Callable

import aiohttp
import pytest

from tests.support.kube.cluster import Cluster, path
from tests.support.kube.fixtures import StartOperator
from tests.support.reports import drive_to_evaluated

from .test_lifecycle import NAME, NS, example_run

pytestmark = pytest.mark.slow

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def parse(text: str) -> Samples:
    """The exposition's samples; every line must be a HELP/TYPE comment or a well-formed sample."""
    out: Samples = {}
    for line in text.splitlines():
        if line.startswith(("# HELP ", "# TYPE ")):
            continue
        match = SAMPLE.match(line)
        assert match, f"not a sample line: {line!r}"
        name, labels, value = match.groups()
        out[(name, frozenset(LABEL.findall(labels or "")))] = float(value)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


async def scrape_until(
    url: str, check: Callable[[Samples], bool], what: str, timeout: float = 15.0
) -> Samples:
    deadline = time.monotonic() + timeout
    last: Samples = {}
    async with aiohttp.ClientSession() as http:
        while True:
            try:
                async with http.get(url) as resp:
                    assert resp.status == 200
                    assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
                    last = parse(await resp.text())
                    if check(last):
                        return last
            except aiohttp.ClientConnectionError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last scrape: {sorted(last)}")
            await asyncio.sleep(0.1)


async def test_metrics_follow_a_run_through_its_stages_and_count_api_errors(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    # The API server fails the first creation of the collection Job: a reconcile error, then a retry.
    cluster.api.inject("create", "batch/jobs", 500, times=1)
    await start_operator("-A", "--metrics", url)
    samples = await scrape_until(
        url, lambda s: value(s, "distillery_build_info", version="0.1.0") == 1, "build info"
    )
    assert value(samples, "distillery_reconciles_total", result="success") == 0

    await cluster.apply_run(example_run())
    await cluster.wait_phase(NS, NAME, "Collecting")
    samples = await scrape_until(
        url,
        lambda s: (
            value(s, "distillery_runs", namespace=NS, phase="Collecting") == 1
            and value(s, "distillery_reconcile_errors_total", kind="temporary", reason="InternalError") >= 1
        ),
        "the run Collecting and the injected 500 counted",
    )
    assert value(samples, "distillery_reconciles_total", result="error") >= 1
    assert value(samples, "distillery_reconciles_total", result="success") >= 1

    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    await cluster.wait_phase(NS, NAME, "Succeeded")
    samples = await scrape_until(
        url,
        lambda s: value(s, "distillery_runs", namespace=NS, phase="Succeeded") == 1,
        "the run Succeeded",
    )
    assert value(samples, "distillery_runs", namespace=NS, phase="Collecting") == 0  # moved, not duplicated
    for stage in ("collect", "train", "serve", "evaluate"):
        labels = {"stage": stage, "state": "Succeeded"}
        count = value(samples, "distillery_stage_duration_seconds_count", **labels)
        assert count == 1, (stage, count)
        assert value(samples, "distillery_stage_duration_seconds_bucket", le="+Inf", **labels) == count
        assert 0 <= value(samples, "distillery_stage_duration_seconds_sum", **labels) < 120
    duration = value(samples, "distillery_reconcile_duration_seconds_count")
    reconciles = sum(value(samples, "distillery_reconciles_total", result=r) for r in ("success", "error"))
    assert duration == reconciles > 2

    # Deleted: the run drops out of the gauge.
    await cluster.request("DELETE", path("DistillationRun", NS, NAME))
    samples = await scrape_until(
        url, lambda s: not any(name == "distillery_runs" for name, _ in s), "the deleted run to drop out"
    )
    assert value(samples, "distillery_stage_duration_seconds_count", stage="train", state="Succeeded") == 1
