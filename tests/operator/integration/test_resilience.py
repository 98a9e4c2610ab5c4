"""The operator under stress: killed at every stage, a flaky API server, many runs at once."""

from __future__ import annotations

import asyncio
from collections import Counter
from typing import Any

import pytest

from tests.support.builders import make_run
from tests.support.kube.cluster import Cluster, now, path
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import drive_to_evaluated, progress, results, summaries

from .test_lifecycle import NAME, NS, example_run

pytestmark = pytest.mark.slow

CHILD_RESOURCES = {
    "ConfigMap": "configmaps",
    "Service": "services",
    "Job": "batch/jobs",
    "Deployment": "apps/deployments",
    "PyTorchJob": "kubeflow.org/pytorchjobs",
}


def create_requests(cluster: Cluster) -> Counter[str]:
    return Counter(e.resource for e in cluster.api.audit if e.verb == "create" and e.resource != "events")


async def test_killed_at_every_stage_the_operator_resumes_without_duplicate_children(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    # Pending: the run exists before the operator does.
    await cluster.apply_run(example_run())
    op = await start_operator()
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    await cluster.wait_phase(NS, NAME, "Collecting")

    # Killed while collecting; the Job finishes while no operator runs.
    await op.kill()
    started = now()
    await cluster.finish_collection(NS, NAME, summaries(8))
    op = await start_operator()
    await cluster.wait_for(lambda: cluster.get("PyTorchJob", NS, f"{NAME}-train"), "the PyTorchJob")
    await cluster.wait_phase(NS, NAME, "Training")

    await op.kill()
    await cluster.finish_training(NS, NAME, progress(), started=started)
    op = await start_operator()
    await cluster.wait_for(lambda: cluster.get("Deployment", NS, f"{NAME}-serve"), "the serving Deployment")
    await cluster.wait_phase(NS, NAME, "Serving")

    await op.kill()
    await cluster.roll_out(NS, f"{NAME}-serve")
    op = await start_operator()
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-eval"), "the evaluation Job")
    await cluster.wait_phase(NS, NAME, "Evaluating")

    await op.kill()
    await cluster.finish_evaluation(NS, NAME, results())
    op = await start_operator()
    status = await cluster.wait_phase(NS, NAME, "Succeeded")
    assert status["results"]["qualityRetention"] == 0.91 and status["results"]["cost"]["trainingUSD"] == 5.0

    # Restarted once more after the end: nothing to do, nothing written.
    await op.kill()
    writes = len(cluster.api.audit)
    await start_operator()
    await asyncio.sleep(1.0)
    assert [
        e
        for e in cluster.api.audit[writes:]
        if e.verb in ("create", "patch", "delete") and e.resource != "events"
    ] == []

    # Zero duplicates: each child was created once, with one create request each (no 409 retries).
    children = cluster.children(NS, NAME)
    assert len(children) == 6
    for kind, name in children:
        assert cluster.creations(kind, NS, name) == 1, (kind, name)
    assert create_requests(cluster) == Counter(
        {
            "distillery.dev/distillationruns": 1,
            "configmaps": 1,
            "batch/jobs": 2,
            "kubeflow.org/pytorchjobs": 1,
        }
        | {"apps/deployments": 1, "services": 1, "pods": 10}
    )
    reasons = Counter(e["reason"] for e in cluster.events(NS, NAME))
    assert all(count == 1 for count in reasons.values()), reasons
    assert beyond_rbac(cluster.api.audit) == {}


async def test_api_errors_during_apply_are_retried_and_leave_no_duplicates(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    run = await cluster.apply_run(example_run())
    # A ConfigMap a previous operator version left behind (owned by the run, without today's labels or
    # data): the index (which selects by label) lacks it, so the writer reads it, sees it is the run's,
    # and applies the desired one over it (server-side apply: the emulator plays the API server's).
    stale: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": f"{NAME}-config",
            "ownerReferences": [
                {
                    "apiVersion": "distillery.dev/v1alpha1",
                    "kind": "DistillationRun",
                    "name": NAME,
                    "uid": run["metadata"]["uid"],
                }
            ],
        },
        "data": {"stage.yaml": "old: true\n"},
    }
    await cluster.request("POST", path("ConfigMap", NS), stale)
    cluster.api.inject("patch", "configmaps", 409, times=1)  # a conflicting writer, once
    cluster.api.inject("create", "batch/jobs", 500, times=2)
    cluster.api.inject("patch", "distillery.dev/distillationruns/status", 503, times=1)
    cluster.api.inject("create", "apps/deployments", 500, times=2)
    cluster.api.inject("create", "kubeflow.org/pytorchjobs", 429, times=1)

    await start_operator()
    await cluster.wait_phase(NS, NAME, "Collecting", timeout=30)
    config = cluster.get("ConfigMap", NS, f"{NAME}-config")
    assert config is not None and "old: true" not in config["data"]["stage.yaml"]
    assert config["metadata"]["labels"]["distillery.dev/run"] == NAME

    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    await cluster.wait_phase(NS, NAME, "Succeeded", timeout=30)
    assert all(f.hits == f.times for f in cluster.api.faults)
    children = cluster.children(NS, NAME)
    assert len(children) == 6
    for kind, name in children:
        assert cluster.creations(kind, NS, name) == 1, (kind, name)
    # Each failure was retried: one more request than the faults injected, no more.
    creates = create_requests(cluster)
    assert creates["batch/jobs"] == 2 + 2 and creates["apps/deployments"] == 1 + 2
    assert creates["kubeflow.org/pytorchjobs"] == 1 + 1
    # Only the test's stale ConfigMap: the operator read it, and applied (409 injected) and applied again.
    # An apply that creates is authorized as a create too: the Deployment's count includes its retries.
    assert creates["configmaps"] == 1
    assert cluster.api.count("patch", "configmaps") == 2
    retrying = [e for e in cluster.events(NS, NAME) if e["reason"] == "Retrying"]
    assert retrying and all(e["type"] == "Warning" for e in retrying)
    assert any("500" in e["message"] for e in retrying)
    assert beyond_rbac(cluster.api.audit) == {}


def _tolerations(job: dict[str, Any]) -> list[dict[str, Any]]:
    return ((job.get("spec") or {}).get("template") or {}).get("spec", {}).get("tolerations") or []


def _invalid_toleration(job: dict[str, Any]) -> bool:
    return any("tolerationSeconds" in t and t.get("effect") != "NoExecute" for t in _tolerations(job))


async def test_a_child_the_api_server_rejects_fails_the_run_until_the_spec_is_fixed(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    run = example_run()
    bad = {"key": "team", "operator": "Exists", "effect": "NoSchedule", "tolerationSeconds": 60}
    run["spec"]["scheduling"] = {"tolerations": [bad]}
    # The emulator plays the API server's validation of a pod template (Kubernetes' validateTolerations):
    # a toleration with tolerationSeconds must have effect NoExecute. The model does not check this one,
    # so the Job's create is answered 422 with the API server's message, which names the field.
    said = (
        f'Job.batch "{NAME}-collect" is invalid: spec.template.spec.tolerations[0].effect: Invalid value: '
        "\"NoSchedule\": effect must be 'NoExecute' when `tolerationSeconds` is set"
    )
    fault = cluster.api.inject("create", "batch/jobs", 422, times=100, message=said, when=_invalid_toleration)
    await cluster.apply_run(run)
    # The platform's policy allows tolerations here: the API server, not the policy, refuses this one.
    await start_operator(env={"DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "true"})

    # Not a stall: the run fails, with the API server's words in its status and an Event.
    status = await cluster.wait_phase(NS, NAME, "Failed")
    assert said in status["message"] and f"create Job {NS}/{NAME}-collect" in status["message"]
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "ChildRejected") and said in failed["message"]
    rejected = await cluster.wait_for(
        lambda: [e for e in cluster.events(NS, NAME) if e["reason"] == "ChildRejected"], "the Event"
    )
    assert rejected[0]["type"] == "Warning" and said in rejected[0]["message"]
    # Not retried on a timer: once the reconcile its own status write causes is done, nothing is sent.
    await asyncio.sleep(1.0)
    attempts = fault.hits
    await asyncio.sleep(1.5)
    assert fault.hits == attempts <= 3
    reasons = Counter(e["reason"] for e in cluster.events(NS, NAME))
    assert reasons["ChildRejected"] == 1 and reasons["Retrying"] == 0, reasons

    # The spec is fixed: level-triggered, the run goes on from where it is.
    await cluster.patch_spec(NS, NAME, {"scheduling": {"tolerations": [{**bad, "tolerationSeconds": None}]}})
    await cluster.wait_phase(NS, NAME, "Collecting")
    job = cluster.get("Job", NS, f"{NAME}-collect")
    assert job is not None and not _invalid_toleration(job)
    status = cluster.status(NS, NAME)
    assert "Failed" not in {c["type"] for c in status["conditions"]}
    assert beyond_rbac(cluster.api.audit) == {}


async def test_twenty_runs_in_two_namespaces(cluster: Cluster, start_operator: StartOperator) -> None:
    await start_operator()
    runs = [
        make_run(f"run-{i:02d}", ns).storage().spec({"collection": {"shards": 2}}).obj()
        for ns in ("ns-a", "ns-b")
        for i in range(10)
    ]
    created = await asyncio.gather(*(cluster.apply_run(r) for r in runs))
    uids = {(r["metadata"]["namespace"], r["metadata"]["name"]): r["metadata"]["uid"] for r in created}
    await asyncio.gather(
        *(
            drive_to_evaluated(
                cluster, r["metadata"]["namespace"], r["metadata"]["name"], shards=2, retention=0.9 + i / 200
            )
            for i, r in enumerate(runs)
        )
    )
    for i, r in enumerate(runs):
        ns, name = r["metadata"]["namespace"], r["metadata"]["name"]
        status = await cluster.wait_phase(ns, name, "Succeeded", timeout=30)
        assert status["results"]["qualityRetention"] == pytest.approx(0.9 + i / 200)
        dep = cluster.get("Deployment", ns, f"{name}-serve")
        assert status["endpoint"] == f"http://{name}-serve.{ns}.svc:8000/v1"
        assert dep is not None and dep["metadata"]["generation"] == 1
        children = cluster.children(ns, name)
        assert len(children) == 6
        for (kind, child), obj in children.items():
            assert [o["uid"] for o in obj["metadata"]["ownerReferences"]] == [uids[(ns, name)]]
            assert cluster.creations(kind, ns, child) == 1
    assert create_requests(cluster)["batch/jobs"] == 40
