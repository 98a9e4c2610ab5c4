"""Status derivation helpers, the operator's settings, and `distillery operator`'s command line."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from distillery_operator.cli import build_parser
from distillery_operator.observe import Pod, Terminated, pod_view
from distillery_operator.settings import Settings, parse_node_selector, parse_tolerations
from distillery_operator.status import (
    conditions,
    failure_detail,
    lenient,
    results,
    summaries,
    training_progress,
)
from distillery_trainer.api.status import Condition, Results
from distillery_trainer.api.summaries import CollectionSummary
from distillery_trainer.termination import compact

from tests.support.reports import progress
from tests.support.reports import results as results_message
from tests.support.reports import summaries as summary_messages

T0 = datetime(2026, 3, 1, tzinfo=UTC)


def pod(name: str, message: str, exit_code: int = 0, **kw: object) -> Pod:
    return Pod(name=name, component="x", terminated=(Terminated("c", exit_code, "", message, T0),), **kw)  # type: ignore[arg-type]


def test_reports_are_read_from_termination_messages_even_cut_to_4_kib() -> None:
    import json

    shards = summary_messages(3)
    pods = [pod(f"p{i}", json.dumps(s)) for i, s in enumerate(shards)]
    pods.append(pod("retry-of-0", json.dumps(shards[0])))  # a retried shard reports once
    pods.append(pod("failed", "Traceback...\nOSError: disk full", exit_code=1))
    assert [s.shard for s in summaries(pods)] == [0, 1, 2]
    big = {**results_message(), "report": "x" * 5000}
    cut = compact(big)  # what the evaluation pod writes: the biggest field dropped, "truncated" added
    found = results([pod("eval", cut)])
    assert isinstance(found, Results) and found.quality_retention == 0.91 and found.report is None
    assert found.provenance_digest == "sha256:" + "ab" * 32  # the student's provenance, into the status
    assert len(cut.encode()) <= 4096
    assert failure_detail(pods) == "pod failed exited 1 (Error): OSError: disk full"
    assert lenient(Results, {"qualityRetention": "not a number"}) is None


def test_rank_zero_reports_training() -> None:
    import json

    worker = pod("w", json.dumps(progress(gpu_hours=1.0)), replica_type="worker")
    master = pod("m", json.dumps(progress(gpu_hours=2.5)), replica_type="master")
    assert training_progress([worker, master]).gpu_hours == 2.5  # type: ignore[union-attr]
    indexed = pod("i0", json.dumps(progress(gpu_hours=4.0)), index=0)
    other = pod("i1", json.dumps(progress(gpu_hours=9.0)), index=1)
    assert training_progress([other, indexed]).gpu_hours == 4.0  # type: ignore[union-attr]


def test_a_pod_is_observed_from_its_status() -> None:
    body = {
        "metadata": {
            "name": "r-collect-3-abcde",
            "labels": {
                "app.kubernetes.io/component": "collect",
                "batch.kubernetes.io/job-completion-index": "3",
            },
            "ownerReferences": [{"uid": "job-uid"}],
        },
        "status": {
            "phase": "Failed",
            "containerStatuses": [
                {
                    "name": "collect",
                    "state": {
                        "terminated": {
                            "exitCode": 2,
                            "reason": "Error",
                            "message": "m",
                            "finishedAt": "2026-03-01T00:00:00Z",
                        }
                    },
                }
            ],
        },
    }
    seen = pod_view(body)
    assert (seen.index, seen.component, seen.owners, seen.failed.exit_code) == (3, "collect", ("job-uid",), 2)  # type: ignore[union-attr]
    assert seen.container == "" and not seen.running and not seen.master  # index 3 is not rank 0
    body["spec"] = {"containers": [{"name": "istio-proxy"}, {"name": "pytorch", "image": "trainer"}]}
    body["metadata"]["labels"]["training.kubeflow.org/replica-type"] = "Master"
    body["status"] = {"phase": "Running"}
    seen = pod_view(body)
    assert (seen.container, seen.running, seen.master) == ("pytorch", True, True)


def test_a_failure_detail_skips_the_progress_lines_of_a_log_tail() -> None:
    import json

    from distillery_trainer.progress_line import format_line

    from tests.support.reports import summaries as shard_reports

    line = format_line("collect", CollectionSummary.model_validate(shard_reports(1)[0]))
    tail = f"Traceback (most recent call last):\nOSError: disk full\n{line}"  # FallbackToLogsOnError
    assert failure_detail([pod("p", tail, exit_code=1)]) == "pod p exited 1 (Error): OSError: disk full"
    assert failure_detail([pod("p", line, exit_code=1)]) == "pod p exited 1 (Error)"
    assert json.loads(line.split(" ", 1)[1])["stage"] == "collect"


def test_conditions_move_their_transition_time_only_on_a_change() -> None:
    first = conditions(
        [],
        phase="Training",
        reason="Training",
        message="a",
        degraded=None,
        ready=(False, "Training", "a"),
        generation=1,
        now=T0,
    )
    later = T0 + timedelta(minutes=5)
    again = conditions(
        first,
        phase="Serving",
        reason="Serving",
        message="b",
        degraded=None,
        ready=(False, "Serving", "b"),
        generation=2,
        now=later,
    )
    by_type = {c.type: c for c in again}
    assert by_type["Progressing"].last_transition_time == T0  # still True
    assert by_type["Progressing"].reason == "Serving" and by_type["Progressing"].observed_generation == 2
    done = conditions(
        again,
        phase="Succeeded",
        reason="QualityGatePassed",
        message="c",
        degraded=None,
        ready=(True, "QualityGatePassed", "c"),
        generation=2,
        now=later,
    )
    by_type = {c.type: c for c in done}
    assert by_type["Ready"].status == "True" and by_type["Ready"].last_transition_time == later
    assert by_type["Succeeded"].status == "True" and "Failed" not in by_type
    assert all(isinstance(c, Condition) for c in done)


def test_settings_come_from_the_environment() -> None:
    s = Settings.from_env(
        {
            "DISTILLERY_TRAINER_IMAGE": "reg/trainer:1",
            "DISTILLERY_NODE_SELECTOR": "pool=gpu, zone=a",
            "DISTILLERY_TOLERATIONS": '[{"key": "gpu", "operator": "Exists"}]',
            "DISTILLERY_QUEUE_NAME": "q",
            "DISTILLERY_RUN_AS_USER": "2000",
            "DISTILLERY_RESULTS_GRACE_SECONDS": "5",
            "DISTILLERY_PROGRESS_INTERVAL_SECONDS": "0",
        }
    )
    assert s.progress_interval_seconds == 0.0 and Settings().progress_interval_seconds == 30.0
    assert (s.trainer_image, s.queue_name, s.run_as_user, s.results_grace_seconds) == (
        "reg/trainer:1",
        "q",
        2000,
        5.0,
    )
    assert s.node_selector == {"pool": "gpu", "zone": "a"} and s.tolerations == (
        {"key": "gpu", "operator": "Exists"},
    )
    assert Settings.from_env({}) == Settings()
    assert s.with_overrides(queue_name="other", trainer_image=None).queue_name == "other"
    assert parse_node_selector('{"a": "b"}') == {"a": "b"}
    with pytest.raises(ValueError, match="label=value"):
        parse_node_selector("nonsense")
    with pytest.raises(ValueError, match="JSON list"):
        parse_tolerations('{"key": "x"}')


def test_the_operator_command_line() -> None:
    parser = build_parser()
    args = parser.parse_args(["operator", "-n", "a", "--namespace", "b", "--queue-name", "q"])
    assert args.namespace == ["a", "b"] and args.queue_name == "q" and args.peering is None
    assert parser.parse_args(["operator", "-A"]).all_namespaces is True
    with pytest.raises(SystemExit):
        parser.parse_args(["operator", "-A", "-n", "a"])


def test_the_local_final_table_shows_the_score_before_training(tmp_path: Path) -> None:
    import io

    from distillery_operator.local.ui import Ui
    from distillery_trainer.api.status import DistillationRunStatus, Results
    from rich.console import Console

    buf = io.StringIO()
    ui = Ui(Console(file=buf, width=120, force_terminal=False))
    results = Results(
        quality_retention=0.97,
        student_score=0.94,
        teacher_score=0.97,
        baseline_score=0.0,
        baseline_retention=0.0,
    )
    ui.summary("r", DistillationRunStatus(phase="Succeeded", results=results), tmp_path / "status.json")
    row = next(line for line in buf.getvalue().splitlines() if "score before training" in line)
    assert "0.000 (retention 0.000)" in row
    buf.truncate(0)
    ui.summary(
        "r", DistillationRunStatus(phase="Succeeded", results=Results(student_score=0.9)), tmp_path / "s.json"
    )
    assert "before training" not in buf.getvalue()  # not measured: no row


def test_retries_and_the_last_error_of_the_shards_reach_the_status_and_the_local_progress() -> None:
    """While requests are retried, the collection's status (and `distillery run`'s progress line) says
    how many and the last error, from the shards' summaries and their running pods' progress lines."""
    from distillery_operator.local.ui import Ui
    from distillery_operator.status import apply_collection
    from distillery_trainer.api.status import CollectionStatus

    finished = CollectionSummary(
        shard=0, shards=2, total=5, done=5, retries=1, last_error="HTTP 429: slow down"
    )
    running = CollectionSummary(
        shard=1, shards=2, total=5, done=0, retries=6, last_error="HTTP 503: overloaded"
    )
    st = CollectionStatus(state="Running")
    apply_collection(st, [finished], 2, [running])
    assert (st.retries, st.last_error, st.done, st.total) == (7, "HTTP 503: overloaded", 5, 10)
    assert Ui().progress_line("collect", st) == "5/10, 7 retries (last: HTTP 503: overloaded)"
    apply_collection(st, [finished, running.model_copy(update={"retries": 0, "last_error": None})], 2)
    assert (st.retries, st.last_error) == (1, "HTTP 429: slow down")


def test_the_local_summary_says_whether_the_student_is_worth_it(tmp_path: Path) -> None:
    """`distillery run`'s final table has the break-even traffic, and the summary says which is cheaper
    at the spec's traffic, in words."""
    import io

    from distillery_operator.local.ui import Ui
    from distillery_trainer.api.status import CostResults, DistillationRunStatus, Results
    from rich.console import Console

    buf = io.StringIO()
    cost = CostResults(
        serving_usd_per_month=1460.0,
        teacher_usd_per_month=1088.71,
        requests_per_month=270_000,
        student_to_teacher_cost=1.341,
        break_even_requests_per_month=362_080,
        teacher_usd_per_million_output_tokens=13.33,
        student_usd_per_million_output_tokens=17.88,
    )
    Ui(Console(file=buf, width=400, force_terminal=False)).summary(
        "r", DistillationRunStatus(phase="Succeeded", results=Results(cost=cost)), tmp_path / "s.json"
    )
    out = buf.getvalue()
    assert "break-even (requests a month)" in out and "362,080" in out
    assert "the teacher API is cheaper: $1,089 a month against $1,460 for the student" in out
    assert "The student is cheaper above 362,080 requests a month." in out
