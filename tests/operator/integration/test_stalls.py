"""A stage pod that cannot be scheduled, against the API emulator with the real operator process: the
run's status says so within a reconcile (Degraded, reason PodUnschedulable, the pod and the scheduler's
words, a Warning Event), and once the operator's stall timeout has passed the stage fails with that
reason and its Job is deleted. The emulator has no scheduler: the test plays it, writing the pod's
``PodScheduled`` condition as kube-scheduler does for a pod no node fits."""

from __future__ import annotations

import pytest

from tests.support.kube.cluster import Cluster, now, path, pod_name
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac

from .test_lifecycle import conditions, example_run

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "contracts-8b"
SCHEDULER_SAYS = (
    "0/4 nodes are available: 4 Insufficient nvidia.com/gpu. preemption: 0/4 nodes are available."
)


def degraded(status: dict[str, object]) -> dict[str, str] | None:
    found = [c for c in status.get("conditions") or () if isinstance(c, dict) and c.get("type") == "Degraded"]
    return found[0] if found and found[0].get("status") == "True" else None


async def test_an_unschedulable_collection_pod_is_reported_then_fails_the_stage(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator(env={"DISTILLERY_STALL_TIMEOUT_SECONDS": "4"})
    await cluster.apply_run(example_run())
    await cluster.wait_phase(NS, NAME, "Collecting")
    job_name = f"{NAME}-collect"
    job = cluster.get("Job", NS, job_name)
    assert job is not None and job["spec"]["activeDeadlineSeconds"] == 86400  # the operator's default

    # The Job controller makes shard 0's pod; the scheduler (played here) finds no node for it.
    pod = pod_name(f"{job_name}-0")
    index = {"batch.kubernetes.io/job-completion-index": "0"}
    await cluster.request(
        "POST",
        path("Pod", NS),
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod,
                "labels": {**cluster.template_labels("Job", NS, job_name), **index},
                "annotations": index,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": job_name,
                        "uid": job["metadata"]["uid"],
                        "controller": True,
                    }
                ],
            },
            "spec": {"containers": [{"name": "collect", "image": "trainer"}]},
        },
    )
    await cluster.patch_status(
        "Pod",
        NS,
        pod,
        {
            "phase": "Pending",
            "conditions": [
                {
                    "type": "PodScheduled",
                    "status": "False",
                    "reason": "Unschedulable",
                    "message": SCHEDULER_SAYS,
                    "lastTransitionTime": now(),
                }
            ],
        },
    )

    status = await cluster.wait_for(lambda: degraded(s := cluster.status(NS, NAME)) and s, "Degraded")
    cond = degraded(status)
    assert cond is not None and cond["reason"] == "PodUnschedulable"
    assert pod in cond["message"] and "Insufficient nvidia.com/gpu" in cond["message"]
    assert status["phase"] == "Collecting" and status["collection"]["stalled"]["pod"] == pod
    event = await cluster.wait_for(
        lambda: next((e for e in cluster.events(NS, NAME) if e.get("reason") == "PodUnschedulable"), None),
        "a PodUnschedulable Event",
    )
    assert event["type"] == "Warning" and pod in event["message"]

    # No watch event marks the timeout: the operator's own timer brings the verdict.
    status = await cluster.wait_phase(NS, NAME, "Failed", timeout=20)
    assert conditions(status)["Failed"] == ("True", "PodUnschedulable")
    assert status["collection"]["state"] == "Failed" and "stallTimeoutSeconds" in status["message"]
    await cluster.wait_for(lambda: cluster.get("Job", NS, job_name) is None, "the stalled Job to be deleted")
    assert beyond_rbac(cluster.api.audit) == {}  # pod status is all it read: no Events, no new rules
