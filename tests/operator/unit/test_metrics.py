"""The operator's metrics, scraped over HTTP from a real aiohttp server on port 0 and read with
prometheus_client's parser: every name, help text, type and label set, the values the reconciler feeds
them, the stage durations read from statuses and the error reasons."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import aiohttp
import kopf
import pytest
from distillery_operator import errors
from distillery_operator.cli import main
from distillery_operator.metrics import (
    CONTENT_TYPE,
    STAGE_BUCKETS,
    MetricsServer,
    OperatorMetrics,
    finished_stages,
    parse_url,
)
from distillery_operator.observe import RunView
from distillery_operator.planner import Plan
from distillery_trainer.api.status import DistillationRunStatus
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from tests.operator.unit.test_planner import spec_of
from tests.operator.unit.test_writer import Harness, api_error

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

# Today's metrics: (type, help, label names), by family name as the parser names it (a counter without
# its _total); docs/install.md's table says the same.
FAMILIES = {
    "distillery_build_info": ("gauge", "The operator's version; always 1.", {"version"}),
    "distillery_runs": (
        "gauge",
        "DistillationRuns the operator knows, by namespace and phase.",
        {"namespace", "phase"},
    ),
    "distillery_reconciles": ("counter", "Reconciles of a run, by result (success or error).", {"result"}),
    "distillery_reconcile_errors": (
        "counter",
        "Failed reconciles, by kind (temporary: retried; permanent: until the run changes; internal: a "
        "bug) and reason (the API server's status reason, Unreachable, or the exception's type).",
        {"kind", "reason"},
    ),
    "distillery_reconcile_duration_seconds": (
        "histogram",
        "How long one reconcile of a run took, API calls included.",
        set(),
    ),
    "distillery_stage_duration_seconds": (
        "histogram",
        "How long a stage of a run took, from its startTime to its completionTime, observed when it ends.",
        {"stage", "state"},
    ),
}
STAGE_LE = tuple(f"{b:.1f}" for b in STAGE_BUCKETS) + ("+Inf",)  # "60.0": how the library writes le


def samples_of(families: list[Metric]) -> Samples:
    return {(s.name, frozenset(s.labels.items())): s.value for f in families for s in f.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def scrape(metrics: OperatorMetrics) -> tuple[str, list[Metric]]:
    """``GET /metrics`` of a real server on port 0: the content type, and the families as parsed."""
    server = MetricsServer("http://127.0.0.1:0/metrics", metrics.registry)
    await server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as resp:
            assert resp.status == 200
            return resp.headers["Content-Type"], list(text_string_to_metric_families(await resp.text()))
    finally:
        await server.stop()


# ---------------------------------------------------------------------------------------------- the exposition


async def test_every_metric_is_scraped_with_its_name_help_type_and_labels() -> None:
    runs = {("team-a", "Training"): 2, ("team-b", "Pending"): 1}
    metrics = OperatorMetrics(version="9.9.9", runs=lambda: runs)
    metrics.reconciled(0.02)
    metrics.reconciled(0.3, ("temporary", "InternalError"))
    metrics.status_written({}, {"collection": stage("Succeeded", end="2026-11-28T10:00:42Z")})
    content_type, families = await scrape(metrics)
    assert content_type == CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"
    # The six families, in this order, and nothing else (no _created series, no process collectors).
    assert [f.name for f in families] == list(FAMILIES)
    for family in families:
        kind, help_text, label_names = FAMILIES[family.name]
        assert (family.type, family.documentation) == (kind, help_text), family.name
        assert family.samples, family.name
        for sample in family.samples:
            assert set(sample.labels) - {"le"} == label_names, sample
    samples = samples_of(families)
    assert value(samples, "distillery_build_info", version="9.9.9") == 1
    assert value(samples, "distillery_runs", namespace="team-a", phase="Training") == 2
    assert value(samples, "distillery_runs", namespace="team-b", phase="Pending") == 1
    assert value(samples, "distillery_reconciles_total", result="success") == 1
    assert value(samples, "distillery_reconciles_total", result="error") == 1
    assert value(samples, "distillery_reconcile_errors_total", kind="temporary", reason="InternalError") == 1
    assert value(samples, "distillery_reconcile_duration_seconds_count") == 2
    assert value(samples, "distillery_reconcile_duration_seconds_sum") == pytest.approx(0.32)
    assert value(samples, "distillery_reconcile_duration_seconds_bucket", le="0.025") == 1
    assert value(samples, "distillery_reconcile_duration_seconds_bucket", le="0.5") == 2
    done = {"stage": "collect", "state": "Succeeded"}
    assert value(samples, "distillery_stage_duration_seconds_bucket", le="30.0", **done) == 0
    assert value(samples, "distillery_stage_duration_seconds_bucket", le="60.0", **done) == 1
    assert value(samples, "distillery_stage_duration_seconds_sum", **done) == 42
    assert value(samples, "distillery_stage_duration_seconds_count", **done) == 1


async def test_families_without_samples_still_say_what_they_are() -> None:
    _, families = await scrape(OperatorMetrics())
    assert [f.name for f in families] == list(FAMILIES)
    by_name = {f.name: f for f in families}
    for name in ("distillery_runs", "distillery_reconciles", "distillery_reconcile_errors"):
        assert by_name[name].samples == [], name
    assert by_name["distillery_stage_duration_seconds"].samples == []
    # Without labels, the reconcile histogram shows its zeros from the start.
    assert value(samples_of(families), "distillery_reconcile_duration_seconds_count") == 0


async def test_stage_buckets_are_cumulative_per_label_set_and_end_at_the_count() -> None:
    metrics = OperatorMetrics()
    for seconds in (0.5, 1, 1.5, 5, 20, 100):  # a value equal to a bound belongs to that bucket (le)
        metrics.stage_duration.labels(stage="train", state="Succeeded").observe(seconds)
    metrics.stage_duration.labels(stage="collect", state="Failed").observe(2)
    _, families = await scrape(metrics)
    samples = samples_of(families)
    train = {"stage": "train", "state": "Succeeded"}
    buckets = [value(samples, "distillery_stage_duration_seconds_bucket", le=le, **train) for le in STAGE_LE]
    assert buckets == [2, 4, 4, 5, 5, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6, 6]
    assert value(samples, "distillery_stage_duration_seconds_count", **train) == 6
    assert value(samples, "distillery_stage_duration_seconds_sum", **train) == 128
    failed = {"stage": "collect", "state": "Failed"}
    assert [
        value(samples, "distillery_stage_duration_seconds_bucket", le=le, **failed) for le in STAGE_LE[:3]
    ] == [
        0,
        1,
        1,
    ]
    assert value(samples, "distillery_stage_duration_seconds_count", stage="serve", state="Succeeded") is None


async def test_label_values_survive_the_exposition() -> None:
    metrics = OperatorMetrics(version='1.0+"local"')
    reason = 'C:\\dir\n"quoted"'
    metrics.reconciled(1, ("internal", reason))
    _, families = await scrape(metrics)
    samples = samples_of(families)
    assert value(samples, "distillery_reconcile_errors_total", kind="internal", reason=reason) == 1
    assert value(samples, "distillery_build_info", version='1.0+"local"') == 1


def test_the_runs_are_read_when_scraped_and_a_deleted_run_drops_out() -> None:
    runs = {("a", "Training"): 2, ("b", "Pending"): 1}
    metrics = OperatorMetrics(runs=lambda: runs)
    assert metrics.value("distillery_runs", namespace="a", phase="Training") == 2
    runs = {("a", "Succeeded"): 2}
    assert metrics.value("distillery_runs", namespace="a", phase="Succeeded") == 2
    assert metrics.value("distillery_runs", namespace="a", phase="Training") is None
    assert metrics.value("distillery_runs", namespace="b", phase="Pending") is None


def test_each_instance_has_a_registry_of_its_own() -> None:
    one, two = OperatorMetrics(version="1"), OperatorMetrics(version="2")
    one.reconciled(0.1)
    assert one.value("distillery_reconciles_total", result="success") == 1
    assert two.value("distillery_reconciles_total", result="success") is None
    assert two.value("distillery_build_info", version="2") == 1
    assert two.value("distillery_build_info", version="1") is None


def test_updates_from_many_threads_are_all_counted() -> None:
    metrics = OperatorMetrics()

    def work() -> None:
        for _ in range(5000):
            metrics.reconciled(0.5, ("temporary", "Conflict"))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert metrics.value("distillery_reconcile_errors_total", kind="temporary", reason="Conflict") == 20000
    assert metrics.value("distillery_reconcile_duration_seconds_count") == 20000


# ---------------------------------------------------------------------------------------------- stage durations


def stage(state: str, start: str | None = "2026-11-28T10:00:00Z", end: str | None = None) -> dict[str, Any]:
    out = {"state": state}
    if start:
        out["startTime"] = start
    if end:
        out["completionTime"] = end
    return out


def test_a_stage_is_observed_once_when_it_ends() -> None:
    running = {"phase": "Collecting", "collection": stage("Running")}
    done = {
        "phase": "Training",
        "collection": stage("Succeeded", end="2026-11-28T10:02:30Z"),
        "training": stage("Running", start="2026-11-28T10:02:31Z"),
    }
    assert finished_stages(running, done) == [("collect", "Succeeded", 150.0)]
    assert finished_stages(done, done) == []  # the same status again: nothing new ended
    failed = {
        **done,
        "phase": "Failed",
        "training": stage("Failed", "2026-11-28T10:02:31Z", "2026-11-28T11:02:31Z"),
    }
    assert finished_stages(done, failed) == [("train", "Failed", 3600.0)]
    # Restarted by a spec change and ended again, at another time: a second observation.
    again = {**done, "collection": stage("Succeeded", "2026-11-28T12:00:00Z", "2026-11-28T12:00:10Z")}
    assert finished_stages(done, again) == [("collect", "Succeeded", 10.0)]
    # A first status that already shows ended stages (a run the operator had not written yet).
    assert [s for s, _, _ in finished_stages({}, failed)] == ["collect", "train"]


def test_skipped_stages_and_stages_without_times_are_not_observed() -> None:
    new = {
        "serving": stage("Skipped", end="2026-11-28T10:00:00Z"),
        "evaluation": stage("Succeeded", start=None, end="2026-11-28T10:00:00Z"),
        "collection": stage("Succeeded", end="not a time"),
    }
    assert finished_stages({}, new) == []


# ---------------------------------------------------------------------------------------------- error reasons


def test_error_reasons_are_the_api_servers_words() -> None:
    assert errors.reason(errors.translate(api_error(500), "create Job")) == "InternalError"
    assert errors.reason(errors.translate(api_error(409), "patch ConfigMap")) == "Conflict"
    assert errors.reason(errors.translate(api_error(403), "create Job")) == "Forbidden"
    assert errors.reason(errors.translate(api_error(429), "create Job")) == "TooManyRequests"
    assert errors.reason(errors.translate(api_error(418), "create Job")) == "HTTP418"
    # translate is used as `raise translate(exc) from exc`: the cause carries the status.
    try:
        try:
            raise api_error(503)
        except Exception as exc:
            raise errors.translate(exc, "patch status") from exc
    except kopf.TemporaryError as raised:
        assert errors.reason(raised) == "ServiceUnavailable"
    try:
        try:
            raise aiohttp.ClientConnectionError("refused")
        except Exception as exc:
            raise errors.translate(exc, "create Job") from exc
    except kopf.TemporaryError as raised:
        assert errors.reason(raised) == "Unreachable"
    assert errors.reason(kopf.TemporaryError("exists and does not belong to this run")) == "Other"
    assert errors.reason(KeyError("spec")) == "KeyError"


# ---------------------------------------------------------------------------------------------- the reconciler


async def test_the_reconciler_counts_reconciles_errors_and_runs_by_phase() -> None:
    h = Harness()
    metrics = h.reconciler.metrics
    assert h.reconciler.run_phases() == {("ns", "Pending"): 1}  # not reconciled yet: its status says nothing
    h.api.fail[("apply", "ConfigMap")] = [api_error(500)]
    h.reconciler.request(("ns", "r"))
    for _ in range(100):  # fails once, retried after 0.5 s
        await asyncio.sleep(0.05)
        if metrics.value("distillery_reconciles_total", result="success"):
            break
    assert metrics.value("distillery_reconcile_errors_total", kind="temporary", reason="InternalError") == 1
    assert metrics.value("distillery_reconciles_total", result="error") == 1
    assert metrics.value("distillery_reconciles_total", result="success") == 1
    assert metrics.value("distillery_reconcile_duration_seconds_count") == 2
    assert h.reconciler.run_phases() == {("ns", "Collecting"): 1}
    # The reconciler is where the gauge reads the runs, when scraped.
    assert metrics.value("distillery_runs", namespace="ns", phase="Collecting") == 1
    assert metrics.value("distillery_build_info", version="0.1.0") == 1
    # Deleted: kopf's index drops the run, the reconciler forgets it, and the gauge loses it.
    h.reconciler.indices["distillery_runs"].clear()  # type: ignore[attr-defined]
    h.reconciler.forget(("ns", "r"), "run-uid")
    assert b"distillery_runs{" not in metrics.render()
    await h.reconciler.close()


async def test_a_status_write_that_ends_a_stage_observes_its_duration() -> None:
    h = Harness()
    status = {"phase": "Collecting", "collection": stage("Running", start="2026-11-28T10:00:00Z")}
    view = RunView.of("r", "ns", "run-uid", 1, spec_of(), status)
    h.reconciler.indices["distillery_runs"][("ns", "r")] = [view]  # type: ignore[index]
    await h.reconciler._write_status(
        view, _plan_with(status | {"collection": stage("Succeeded", end="2026-11-28T10:00:42Z")})
    )
    metrics, done = h.reconciler.metrics, {"stage": "collect", "state": "Succeeded"}
    assert metrics.value("distillery_stage_duration_seconds_count", **done) == 1
    assert metrics.value("distillery_stage_duration_seconds_bucket", le="30.0", **done) == 0
    assert metrics.value("distillery_stage_duration_seconds_bucket", le="60.0", **done) == 1
    assert metrics.value("distillery_stage_duration_seconds_sum", **done) == 42


def _plan_with(status: dict[str, Any]) -> Plan:
    """A plan whose only content that matters is the status it writes."""
    return Plan(status=DistillationRunStatus.model_validate(status))


# ---------------------------------------------------------------------------------------------- the endpoint


class Flaky(Collector):
    """Fails its ``fail``-th collection."""

    def __init__(self, fail: int) -> None:
        self.calls, self.fail = 0, fail

    def collect(self) -> Iterator[Metric]:
        self.calls += 1
        if self.calls == self.fail:
            raise RuntimeError("broken collector")
        return iter(())


async def test_the_endpoint_serves_the_exposition_and_nothing_else() -> None:
    metrics = OperatorMetrics(version="9.9.9", runs=lambda: {("team-a", "Training"): 2})
    metrics.reconciled(0.02, ("permanent", "Invalid"))
    metrics.registry.register(Flaky(fail=3))
    server = MetricsServer("http://127.0.0.1:0/metrics", metrics.registry)
    await server.start()
    try:
        assert server.port > 0
        base = f"http://127.0.0.1:{server.port}"
        async with aiohttp.ClientSession() as http:
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200 and resp.headers["Content-Type"] == CONTENT_TYPE
                text = await resp.text()
            async with http.get(f"{base}/other") as resp:
                assert resp.status == 404
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
            async with http.get(f"{base}/metrics") as resp:  # the collector fails: 500, the server lives
                assert resp.status == 500
            async with http.get(f"{base}/metrics") as resp:
                assert resp.status == 200
    finally:
        await server.stop()
    samples = samples_of(list(text_string_to_metric_families(text)))
    assert value(samples, "distillery_build_info", version="9.9.9") == 1
    assert value(samples, "distillery_runs", namespace="team-a", phase="Training") == 2
    assert value(samples, "distillery_reconciles_total", result="error") == 1
    assert value(samples, "distillery_reconcile_errors_total", kind="permanent", reason="Invalid") == 1
    assert "# TYPE distillery_stage_duration_seconds histogram\n" in text


def test_metrics_urls_are_checked_before_the_operator_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_url("http://0.0.0.0:8081/metrics") == ("0.0.0.0", 8081, "/metrics")
    assert parse_url("http://[::]:9000") == ("::", 9000, "/metrics")
    for bad in ("0.0.0.0:8081", "https://0.0.0.0:8081/metrics", "http://0.0.0.0/metrics", "http://h:99999/"):
        with pytest.raises(ValueError, match="metrics URL"):
            parse_url(bad)
    assert main(["operator", "--metrics", "localhost:8081"]) == 2
    assert "expected http://HOST:PORT/PATH" in capsys.readouterr().err
