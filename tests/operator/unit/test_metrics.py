"""The operator's metrics: the exposition format to the byte, the stage durations read from statuses, the
error reasons, the reconciler feeding them, and the HTTP endpoint (a real aiohttp server on port 0)."""

from __future__ import annotations

import asyncio
import math
import threading
from typing import Any

import aiohttp
import kopf
import pytest
from distillery_operator import errors
from distillery_operator.cli import main
from distillery_operator.metrics import (
    CONTENT_TYPE,
    Counter,
    Gauge,
    Histogram,
    MetricsServer,
    OperatorMetrics,
    finished_stages,
    format_value,
    parse_url,
    render,
)
from distillery_operator.observe import RunView
from distillery_operator.planner import Plan
from distillery_trainer.api.status import DistillationRunStatus

from tests.operator.unit.test_planner import spec_of
from tests.operator.unit.test_writer import Harness, api_error

# ---------------------------------------------------------------------------------------------- the format


def test_a_small_registry_renders_exactly_the_exposition_format() -> None:
    requests = Counter("app_requests_total", "Requests served.", ("code", "method"))
    requests.inc(code="200", method="get")
    requests.inc(2, code="200", method="get")
    requests.inc(code="500", method="post")
    temperature = Gauge("app_temperature_celsius", "Current temperature.")
    temperature.set(21.5)
    latency = Histogram("app_latency_seconds", "Request latency.", buckets=(0.1, 1))
    for value in (0.05, 0.1, 0.5, 3):
        latency.observe(value)
    assert render([requests, temperature, latency]) == (
        "# HELP app_requests_total Requests served.\n"
        "# TYPE app_requests_total counter\n"
        'app_requests_total{code="200",method="get"} 3\n'
        'app_requests_total{code="500",method="post"} 1\n'
        "# HELP app_temperature_celsius Current temperature.\n"
        "# TYPE app_temperature_celsius gauge\n"
        "app_temperature_celsius 21.5\n"
        "# HELP app_latency_seconds Request latency.\n"
        "# TYPE app_latency_seconds histogram\n"
        'app_latency_seconds_bucket{le="0.1"} 2\n'
        'app_latency_seconds_bucket{le="1"} 3\n'
        'app_latency_seconds_bucket{le="+Inf"} 4\n'
        "app_latency_seconds_sum 3.65\n"
        "app_latency_seconds_count 4\n"
    )


def test_a_family_without_samples_still_says_what_it_is() -> None:
    errors_ = Counter("app_errors_total", "Errors.", ("reason",))
    assert errors_.render() == "# HELP app_errors_total Errors.\n# TYPE app_errors_total counter\n"


def test_label_values_and_help_text_are_escaped() -> None:
    gauge = Gauge("app_info", 'Help with a \\ backslash\nand a "quote".', ("path",))
    gauge.set(1, path='C:\\dir\n"quoted"')
    assert gauge.render() == (
        '# HELP app_info Help with a \\\\ backslash\\nand a "quote".\n'
        "# TYPE app_info gauge\n"
        'app_info{path="C:\\\\dir\\n\\"quoted\\""} 1\n'
    )


def test_histogram_buckets_are_cumulative_per_label_set_and_end_at_the_count() -> None:
    hist = Histogram("stage_seconds", "Stage durations.", ("stage",), buckets=(1, 5, 15))
    for value in (0.5, 1, 1.5, 5, 20, 100):  # a value equal to a bound belongs to that bucket (le)
        hist.observe(value, stage="train")
    hist.observe(2, stage="collect")
    samples = {(name, tuple(labels)): value for name, labels, value in hist.samples()}
    train = [
        samples[("stage_seconds_bucket", (("stage", "train"), ("le", le)))] for le in ("1", "5", "15", "+Inf")
    ]
    assert train == [2, 4, 4, 6]
    assert samples[("stage_seconds_count", (("stage", "train"),))] == 6
    assert samples[("stage_seconds_sum", (("stage", "train"),))] == 128.0
    collect = [
        samples[("stage_seconds_bucket", (("stage", "collect"), ("le", le)))]
        for le in ("1", "5", "15", "+Inf")
    ]
    assert collect == [0, 1, 1, 1]
    assert hist.count(stage="train") == 6 and hist.count(stage="serve") == 0
    # le comes last, after the family's own labels; collect sorts before train.
    first = hist.render().splitlines()[2]
    assert first == 'stage_seconds_bucket{stage="collect",le="1"} 0'


def test_values_render_as_prometheus_parses_them() -> None:
    assert [format_value(v) for v in (0, 3.0, -2, 0.25, 1e-05, math.inf, -math.inf, math.nan)] == [
        "0",
        "3",
        "-2",
        "0.25",
        "1e-05",
        "+Inf",
        "-Inf",
        "NaN",
    ]


def test_bad_names_labels_and_values_are_refused() -> None:
    with pytest.raises(ValueError, match="metric name"):
        Counter("app-requests", "x")
    with pytest.raises(ValueError, match="label name 'le'"):
        Histogram("h", "x", ("le",), buckets=(1,))
    with pytest.raises(ValueError, match="increasing"):
        Histogram("h", "x", buckets=(5, 1))
    counter = Counter("c_total", "x", ("kind",))
    with pytest.raises(ValueError, match="expected"):
        counter.inc(reason="x")
    with pytest.raises(ValueError, match="cannot go down"):
        counter.inc(-1, kind="x")


def test_replacing_a_gauge_drops_the_label_sets_not_given() -> None:
    runs = Gauge("runs", "Runs.", ("namespace", "phase"))
    runs.replace({("a", "Training"): 2, ("b", "Pending"): 1})
    runs.replace({("a", "Succeeded"): 2})
    assert runs.value(namespace="a", phase="Succeeded") == 2
    assert runs.value(namespace="a", phase="Training") is None
    assert runs.value(namespace="b", phase="Pending") is None


def test_updates_from_many_threads_are_all_counted() -> None:
    counter = Counter("c_total", "x", ("kind",))
    hist = Histogram("h", "x", buckets=(1,))

    def work() -> None:
        for _ in range(5000):
            counter.inc(kind="a")
            hist.observe(0.5)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert counter.value(kind="a") == 20000 and hist.count() == 20000


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
        if metrics.reconciles.value(result="success"):
            break
    assert metrics.reconcile_errors.value(kind="temporary", reason="InternalError") == 1
    assert metrics.reconciles.value(result="error") == 1 and metrics.reconciles.value(result="success") == 1
    assert metrics.reconcile_duration.count() == 2
    assert h.reconciler.run_phases() == {("ns", "Collecting"): 1}
    text = metrics.render(runs=h.reconciler.run_phases())
    assert 'distillery_runs{namespace="ns",phase="Collecting"} 1\n' in text
    assert 'distillery_reconcile_errors_total{kind="temporary",reason="InternalError"} 1\n' in text
    assert 'distillery_build_info{version="0.1.0"} 1\n' in text
    # Deleted: kopf's index drops the run, the reconciler forgets it, and the gauge loses it.
    h.reconciler.indices["distillery_runs"].clear()  # type: ignore[attr-defined]
    h.reconciler.forget(("ns", "r"), "run-uid")
    assert "distillery_runs{" not in metrics.render(runs=h.reconciler.run_phases())
    await h.reconciler.close()


async def test_a_status_write_that_ends_a_stage_observes_its_duration() -> None:
    h = Harness()
    status = {"phase": "Collecting", "collection": stage("Running", start="2026-11-28T10:00:00Z")}
    view = RunView.of("r", "ns", "run-uid", 1, spec_of(), status)
    h.reconciler.indices["distillery_runs"][("ns", "r")] = [view]  # type: ignore[index]
    await h.reconciler._write_status(
        view, _plan_with(status | {"collection": stage("Succeeded", end="2026-11-28T10:00:42Z")})
    )
    hist = h.reconciler.metrics.stage_duration
    assert hist.count(stage="collect", state="Succeeded") == 1
    assert (
        'distillery_stage_duration_seconds_bucket{stage="collect",state="Succeeded",le="60"} 1'
        in hist.render()
    )
    assert 'distillery_stage_duration_seconds_sum{stage="collect",state="Succeeded"} 42' in hist.render()


def _plan_with(status: dict[str, Any]) -> Plan:
    """A plan whose only content that matters is the status it writes."""
    return Plan(status=DistillationRunStatus.model_validate(status))


# ---------------------------------------------------------------------------------------------- the endpoint


async def test_the_endpoint_serves_the_exposition_and_nothing_else() -> None:
    metrics = OperatorMetrics(version="9.9.9")
    metrics.reconciled(0.02, ("permanent", "Invalid"))
    calls = 0

    def render_now() -> str:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise RuntimeError("broken collector")
        return metrics.render(runs={("team-a", "Training"): 2})

    server = MetricsServer("http://127.0.0.1:0/metrics", render_now)
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
    assert 'distillery_build_info{version="9.9.9"} 1\n' in text
    assert 'distillery_runs{namespace="team-a",phase="Training"} 2\n' in text
    assert 'distillery_reconciles_total{result="error"} 1\n' in text
    assert 'distillery_reconcile_errors_total{kind="permanent",reason="Invalid"} 1\n' in text
    assert "# TYPE distillery_stage_duration_seconds histogram\n" in text
    for line in text.splitlines():  # every line a comment or `name{labels} value`
        assert line.startswith("# ") or line.split(" ")[-1].replace(".", "").replace("e-", "").isdigit(), line


def test_metrics_urls_are_checked_before_the_operator_starts(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_url("http://0.0.0.0:8081/metrics") == ("0.0.0.0", 8081, "/metrics")
    assert parse_url("http://[::]:9000") == ("::", 9000, "/metrics")
    for bad in ("0.0.0.0:8081", "https://0.0.0.0:8081/metrics", "http://0.0.0.0/metrics", "http://h:99999/"):
        with pytest.raises(ValueError, match="metrics URL"):
            parse_url(bad)
    assert main(["operator", "--metrics", "localhost:8081"]) == 2
    assert "expected http://HOST:PORT/PATH" in capsys.readouterr().err
