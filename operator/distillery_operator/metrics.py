"""Prometheus metrics of the operator, on ``prometheus_client``, and the HTTP endpoint that serves them
(``distillery operator --metrics``).

Every :class:`OperatorMetrics` has a registry of its own (not the library's global one), so tests can make
several. The library's metrics are thread-safe: code on other threads (kopf runs synchronous handlers in a
pool) may update them too. The runs by phase are a collector read when scraped; the rest is counted as it
happens. The endpoint is an aiohttp server (kopf's own dependency) on the operator's event loop: no thread.

The reconciler (:mod:`.reconciler`) feeds :class:`OperatorMetrics`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from distillery_trainer import __version__
from distillery_trainer.api.stages import STAGES
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector

from .observe import parse_time

logger = logging.getLogger("distillery.operator")

# What generate_latest writes is the text format 0.0.4 (names escaped with underscores), and the library's
# own server says so unless a scraper asks for more. Its CONTENT_TYPE_LATEST names version 1.0.0 since
# prometheus_client 0.22 (and 0.0.4 before), so it is not used here.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# No `<name>_created` series beside the counters and histograms: the endpoint shows the metrics below and
# nothing else. A switch of the whole library, for the whole process: the operator's is its only registry.
disable_created_metrics()

RunCounts = Mapping[tuple[str, str], int]  # (namespace, phase) -> how many runs


# ---------------------------------------------------------------------------------------------- the operator's

# A stage lasts from seconds (an emulator, a cached collection) to days (training a large student).
STAGE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 28800, 86400, 259200)
# One reconcile: a read of the indices, the pure planner, a few API calls.
RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
ENDED = ("Succeeded", "Failed")


def finished_stages(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, str, float]]:
    """The stages that ended between two statuses of a run, as ``(stage, state, seconds)``: a stage that
    is Succeeded or Failed in ``new`` and was not (or ended at another time) in ``old``. A stage a spec
    change restarted ends again, and counts again."""
    out: list[tuple[str, str, float]] = []
    for st in STAGES:
        stage = st.name
        before = old.get(st.status_field) or {}
        after = new.get(st.status_field) or {}
        state = after.get("state")
        if state not in ENDED:
            continue
        if before.get("state") == state and before.get("completionTime") == after.get("completionTime"):
            continue
        start, end = parse_time(after.get("startTime")), parse_time(after.get("completionTime"))
        if start is None or end is None:
            continue
        out.append((stage, str(state), max(0.0, (end - start).total_seconds())))
    return out


class RunsByPhase(Collector):
    """``distillery_runs``, read when scraped from ``source`` (the reconciler's count over kopf's index of
    runs), so a deleted run drops out; no source yet: no runs."""

    name = "distillery_runs"
    help = "DistillationRuns the operator knows, by namespace and phase."
    labels = ("namespace", "phase")

    def __init__(self, source: Callable[[], RunCounts] | None = None) -> None:
        self.source = source

    def describe(self) -> list[GaugeMetricFamily]:  # the name, for the registry, without reading the runs
        return [GaugeMetricFamily(self.name, self.help, labels=self.labels)]

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.help, labels=self.labels)
        counts = self.source() if self.source is not None else {}
        for (namespace, phase), count in sorted(counts.items()):
            family.add_metric([namespace, phase], count)
        yield family


class OperatorMetrics:
    """What ``/metrics`` shows, in :attr:`registry`."""

    def __init__(self, version: str = __version__, runs: Callable[[], RunCounts] | None = None) -> None:
        self.registry = registry = CollectorRegistry()
        self.build_info = Gauge(
            "distillery_build_info", "The operator's version; always 1.", ("version",), registry=registry
        )
        self.build_info.labels(version=version).set(1)
        self.runs = RunsByPhase(runs)
        registry.register(self.runs)
        self.reconciles = Counter(
            "distillery_reconciles_total",
            "Reconciles of a run, by result (success or error).",
            ("result",),
            registry=registry,
        )
        self.reconcile_errors = Counter(
            "distillery_reconcile_errors_total",
            "Failed reconciles, by kind (temporary: retried; permanent: until the run changes; internal: a "
            "bug) and reason (the API server's status reason, Unreachable, or the exception's type).",
            ("kind", "reason"),
            registry=registry,
        )
        self.reconcile_duration = Histogram(
            "distillery_reconcile_duration_seconds",
            "How long one reconcile of a run took, API calls included.",
            buckets=RECONCILE_BUCKETS,
            registry=registry,
        )
        self.stage_duration = Histogram(
            "distillery_stage_duration_seconds",
            "How long a stage of a run took, from its startTime to its completionTime, observed when it ends.",
            ("stage", "state"),
            buckets=STAGE_BUCKETS,
            registry=registry,
        )

    def count_runs(self, source: Callable[[], RunCounts]) -> None:
        """Where ``distillery_runs`` reads the runs by (namespace, phase) when scraped."""
        self.runs.source = source

    def reconciled(self, seconds: float, error: tuple[str, str] | None = None) -> None:
        """One reconcile that took ``seconds``; ``error`` is its (kind, reason) when it failed."""
        self.reconcile_duration.observe(seconds)
        self.reconciles.labels(result="error" if error else "success").inc()
        if error is not None:
            self.reconcile_errors.labels(kind=error[0], reason=error[1]).inc()

    def status_written(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        for stage, state, seconds in finished_stages(old, new):
            self.stage_duration.labels(stage=stage, state=state).observe(seconds)

    def render(self) -> bytes:
        """The exposition, as ``/metrics`` answers it."""
        return generate_latest(self.registry)

    def value(self, name: str, **labels: str) -> float | None:
        """One sample's value as scraped now (``name`` with its suffix: ``_total``, ``_bucket``, ...);
        None when there is no such sample."""
        return self.registry.get_sample_value(name, labels)


# ---------------------------------------------------------------------------------------------- the endpoint


def parse_url(url: str) -> tuple[str, int, str]:
    """``http://HOST:PORT/PATH`` -> (host, port, path); the path defaults to ``/metrics``."""
    example = "e.g. http://0.0.0.0:8081/metrics"
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"metrics URL {url!r}: expected http://HOST:PORT/PATH, {example}")
    try:
        port = parts.port
    except ValueError as exc:
        raise ValueError(f"metrics URL {url!r}: {exc}, {example}") from None
    if port is None:
        raise ValueError(f"metrics URL {url!r}: no port, {example}")
    return parts.hostname, port, parts.path if parts.path not in ("", "/") else "/metrics"


class MetricsServer:
    """``GET PATH`` answers what ``registry`` collects, in the text exposition format; other paths 404."""

    def __init__(self, url: str, registry: Collector) -> None:
        self.host, self.port, self.path = parse_url(url)
        self.registry = registry
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        try:
            body = generate_latest(self.registry)
        except Exception:  # a scrape must never take the operator down; say it failed
            logger.exception("rendering the metrics failed")
            return web.Response(status=500, text="rendering the metrics failed; see the operator's log\n")
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(self.path, self._serve)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        if runner.addresses:  # the port a port of 0 got
            self.port = int(runner.addresses[0][1])
        logger.info("serving metrics on http://%s:%d%s", self.host, self.port, self.path)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
