"""Prometheus metrics of the operator: counters, gauges and histograms, the text exposition format
(version 0.0.4) they render to, and the HTTP endpoint that serves it (``distillery operator --metrics``).

Hand-written rather than ``prometheus_client``: the operator needs three metric types and one renderer,
the operator image stays one dependency lighter, and the endpoint is an aiohttp server (kopf's own
dependency) on the operator's event loop: no thread. Every metric guards its values with a lock, so
code on other threads (kopf runs synchronous handlers in a pool) may update them too.

The operator's own metrics are :class:`OperatorMetrics`; the reconciler (:mod:`.reconciler`) feeds it.
"""

from __future__ import annotations

import abc
import bisect
import logging
import math
import re
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web
from distillery_trainer import __version__
from distillery_trainer.api.stages import STAGES

from .observe import parse_time

logger = logging.getLogger("distillery.operator")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")

LabelValues = tuple[str, ...]
Sample = tuple[str, Sequence[tuple[str, str]], float]  # (name, label pairs, value)


# ---------------------------------------------------------------------------------------------- format


def format_value(value: float) -> str:
    """A sample value as Prometheus parses it: integers without a fraction, ``+Inf``, ``NaN``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 2**53:
        return str(int(value))
    return repr(float(value))


def escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def sample_line(name: str, labels: Sequence[tuple[str, str]], value: float) -> str:
    if not labels:
        return f"{name} {format_value(value)}"
    pairs = ",".join(f'{k}="{escape_label(v)}"' for k, v in labels)
    return f"{name}{{{pairs}}} {format_value(value)}"


# ---------------------------------------------------------------------------------------------- metrics


class Metric(abc.ABC):
    """One metric family: a name, its help text, its label names, and a value per label set."""

    type = "untyped"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        if not NAME.match(name):
            raise ValueError(f"metric name {name!r}: expected [a-zA-Z_:][a-zA-Z0-9_:]*")
        for label in labels:
            if not LABEL.match(label) or label.startswith("__") or label == "le":
                raise ValueError(f"metric {name}: label name {label!r} is not allowed")
        self.name = name
        self.help = help
        self.labels = tuple(labels)
        self._lock = threading.Lock()

    def _key(self, labels: Mapping[str, str]) -> LabelValues:
        if set(labels) != set(self.labels):
            raise ValueError(f"metric {self.name}: labels {sorted(labels)}, expected {sorted(self.labels)}")
        return tuple(str(labels[k]) for k in self.labels)

    @abc.abstractmethod
    def samples(self) -> list[Sample]:
        """(name, labels, value) of every sample, in exposition order."""

    def render(self) -> str:
        lines = [f"# HELP {self.name} {escape_help(self.help)}", f"# TYPE {self.name} {self.type}"]
        lines += [sample_line(*s) for s in self.samples()]
        return "\n".join(lines) + "\n"


class Counter(Metric):
    """Only goes up; by convention its name ends in ``_total``."""

    type = "counter"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        if amount < 0:
            raise ValueError(f"counter {self.name} cannot go down (inc by {amount})")
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        with self._lock:
            return self._values.get(self._key(labels), 0.0)

    def samples(self) -> list[Sample]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, list(zip(self.labels, key, strict=True)), v) for key, v in items]


class Gauge(Metric):
    type = "gauge"

    def __init__(self, name: str, help: str, labels: Sequence[str] = ()) -> None:
        super().__init__(name, help, labels)
        self._values: dict[LabelValues, float] = {}

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)

    def replace(self, values: Mapping[LabelValues, float]) -> None:
        """Every label set at once: those not given are dropped (a deleted run's phase goes away)."""
        for key in values:
            if len(key) != len(self.labels):
                raise ValueError(f"gauge {self.name}: {key} does not match the labels {self.labels}")
        with self._lock:
            self._values = {tuple(map(str, k)): float(v) for k, v in values.items()}

    def value(self, **labels: str) -> float | None:
        with self._lock:
            return self._values.get(self._key(labels))

    def samples(self) -> list[Sample]:
        with self._lock:
            items = sorted(self._values.items())
        return [(self.name, list(zip(self.labels, key, strict=True)), v) for key, v in items]


class Histogram(Metric):
    """Observations counted into buckets (``le``: less than or equal), with their sum and count.

    Rendered the Prometheus way: cumulative ``_bucket`` samples ending in ``le="+Inf"`` (which equals
    ``_count``), then ``_sum`` and ``_count``.
    """

    type = "histogram"

    def __init__(self, name: str, help: str, labels: Sequence[str] = (), *, buckets: Sequence[float]) -> None:
        super().__init__(name, help, labels)
        bounds = [float(b) for b in buckets if not math.isinf(b)]
        if not bounds or bounds != sorted(set(bounds)):
            raise ValueError(
                f"histogram {name}: buckets must be increasing and distinct, got {list(buckets)}"
            )
        self.buckets = tuple(bounds)
        # per label set: [count in each bucket (not cumulative), then above the last], and the sum
        self._counts: dict[LabelValues, list[int]] = {}
        self._sums: dict[LabelValues, float] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        slot = bisect.bisect_left(self.buckets, value)  # the first bound >= value
        with self._lock:
            counts = self._counts.setdefault(key, [0] * (len(self.buckets) + 1))
            counts[slot] += 1
            self._sums[key] = self._sums.get(key, 0.0) + value

    def count(self, **labels: str) -> int:
        with self._lock:
            return sum(self._counts.get(self._key(labels), ()))

    def samples(self) -> list[Sample]:
        with self._lock:
            items = sorted((k, list(c), self._sums[k]) for k, c in self._counts.items())
        out: list[Sample] = []
        for key, counts, total in items:
            pairs = list(zip(self.labels, key, strict=True))
            running = 0
            for bound, n in zip((*self.buckets, math.inf), counts, strict=True):
                running += n
                out.append((f"{self.name}_bucket", [*pairs, ("le", format_value(bound))], running))
            out.append((f"{self.name}_sum", pairs, total))
            out.append((f"{self.name}_count", pairs, running))
        return out


def render(metrics: Iterable[Metric]) -> str:
    """The text exposition format: each family's HELP and TYPE, then its samples."""
    return "".join(m.render() for m in metrics)


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


class OperatorMetrics:
    """What ``/metrics`` shows. The run counts are read when scraped (from the operator's index of runs,
    so a deleted run drops out); the rest is counted as it happens."""

    def __init__(self, version: str = __version__) -> None:
        self.runs = Gauge(
            "distillery_runs",
            "DistillationRuns the operator knows, by namespace and phase.",
            ("namespace", "phase"),
        )
        self.stage_duration = Histogram(
            "distillery_stage_duration_seconds",
            "How long a stage of a run took, from its startTime to its completionTime, observed when it ends.",
            ("stage", "state"),
            buckets=STAGE_BUCKETS,
        )
        self.reconciles = Counter(
            "distillery_reconciles_total", "Reconciles of a run, by result (success or error).", ("result",)
        )
        self.reconcile_errors = Counter(
            "distillery_reconcile_errors_total",
            "Failed reconciles, by kind (temporary: retried; permanent: until the run changes; internal: a "
            "bug) and reason (the API server's status reason, Unreachable, or the exception's type).",
            ("kind", "reason"),
        )
        self.reconcile_duration = Histogram(
            "distillery_reconcile_duration_seconds",
            "How long one reconcile of a run took, API calls included.",
            buckets=RECONCILE_BUCKETS,
        )
        self.build_info = Gauge("distillery_build_info", "The operator's version; always 1.", ("version",))
        self.build_info.set(1, version=version)

    def all(self) -> tuple[Metric, ...]:
        return (
            self.build_info,
            self.runs,
            self.reconciles,
            self.reconcile_errors,
            self.reconcile_duration,
            self.stage_duration,
        )

    def reconciled(self, seconds: float, error: tuple[str, str] | None = None) -> None:
        """One reconcile that took ``seconds``; ``error`` is its (kind, reason) when it failed."""
        self.reconcile_duration.observe(seconds)
        self.reconciles.inc(result="error" if error else "success")
        if error is not None:
            self.reconcile_errors.inc(kind=error[0], reason=error[1])

    def status_written(self, old: Mapping[str, Any], new: Mapping[str, Any]) -> None:
        for stage, state, seconds in finished_stages(old, new):
            self.stage_duration.observe(seconds, stage=stage, state=state)

    def render(self, runs: Mapping[tuple[str, str], int] | None = None) -> str:
        """``runs``: (namespace, phase) -> how many, as of now."""
        if runs is not None:
            self.runs.replace({tuple(key): count for key, count in runs.items()})
        return render(self.all())


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
    """``GET PATH`` answers ``render()`` in the exposition format; other paths 404."""

    def __init__(self, url: str, render: Callable[[], str]) -> None:
        self.host, self.port, self.path = parse_url(url)
        self._render = render
        self._runner: web.AppRunner | None = None

    async def _serve(self, request: web.Request) -> web.Response:
        try:
            body = self._render()
        except Exception:  # a scrape must never take the operator down; say it failed
            logger.exception("rendering the metrics failed")
            return web.Response(status=500, text="rendering the metrics failed; see the operator's log\n")
        return web.Response(body=body.encode("utf-8"), headers={"Content-Type": CONTENT_TYPE})

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
