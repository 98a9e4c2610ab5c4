"""Training through Kubeflow Trainer v2 against the API emulator, with the real operator process.

The emulator serves ``trainer.kubeflow.org/v1alpha1`` TrainJobs and ClusterTrainingRuntimes (the
``trainer`` marker) and the tests play the Trainer controller and JobSet: they start and end the pods
of the TrainJob's node Job with the labels its runtime patch asks for, and write the TrainJob's status
conditions (Complete, Failed, Suspended) as Trainer v2.3's controller does.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.builders import make_run
from tests.support.kube.cluster import Cluster, now
from tests.support.kube.emulator import AuditEntry
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import progress, results, summaries

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "tj"


def run(**training: Any) -> dict[str, Any]:
    return (
        make_run(NAME, NS)
        .storage()
        .spec(
            {
                "collection": {"shards": 2},
                "training": {"resources": {"nodes": 2, "gpusPerNode": 4}, **training},
            }
        )
        .obj()
    )


async def to_training(cluster: Cluster, **training: Any) -> dict[str, Any]:
    """Apply the run and play the collection: the operator then creates the training child."""
    await cluster.apply_run(run(**training))
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    await cluster.finish_collection(NS, NAME, summaries(2))
    found: dict[str, Any] = await cluster.wait_for(
        lambda: cluster.get("TrainJob", NS, f"{NAME}-train"), "the TrainJob"
    )
    return found


@pytest.mark.trainer()
async def test_a_run_trains_through_a_trainjob_then_serves_and_evaluates(
    cluster: Cluster, start_operator: StartOperator, api_audit: list[AuditEntry]
) -> None:
    # Both Kubeflow generations served: `auto` (the default) takes Trainer v2. A namespaced operator.
    await start_operator("--namespace", NS)
    tj = await to_training(cluster)
    assert cluster.get("PyTorchJob", NS, f"{NAME}-train") is None
    assert (
        cluster.get("Job", NS, f"{NAME}-train") is None
        and cluster.get("Service", NS, f"{NAME}-train") is None
    )
    spec = tj["spec"]
    assert spec["runtimeRef"]["name"] == "torch-distributed"
    assert (spec["trainer"]["numNodes"], spec["trainer"]["numProcPerNode"]) == (2, 4)
    status = await cluster.wait_phase(NS, NAME, "Training")
    assert (
        f"TrainJob {NAME}-train" in status["message"]
        or "TrainJob (ClusterTrainingRuntime" in status["message"]
    )

    # Rank 0 runs and prints its progress; the operator reads it from the log.
    pod = await cluster.start_trainjob(NS, NAME)
    cluster.write_log(NS, pod, "node", 'distillery-progress {"state": "Running", "method": "sft", "step": 7}')
    await cluster.finish_trainjob(NS, NAME, progress(gpu_hours=3.0))
    status = await cluster.wait_phase(NS, NAME, "Serving")
    assert status["training"]["state"] == "Succeeded" and status["training"]["gpuHours"] == 3.0
    assert status["training"]["step"] == 300

    await cluster.wait_for(lambda: cluster.get("Deployment", NS, f"{NAME}-serve"), "the serving Deployment")
    await cluster.roll_out(NS, f"{NAME}-serve")
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-eval"), "the evaluation Job")
    await cluster.finish_evaluation(NS, NAME, results(0.93))
    status = await cluster.wait_phase(NS, NAME, "Succeeded")
    assert status["results"]["qualityRetention"] == 0.93
    assert cluster.creations("TrainJob", NS, f"{NAME}-train") == 1
    assert cluster.api.selectors["trainer.kubeflow.org/trainjobs"] == (
        "app.kubernetes.io/managed-by=distillery-operator,distillery.dev/run"
    )
    assert beyond_rbac(api_audit) == {}


@pytest.mark.trainer()
async def test_a_failed_trainjob_fails_the_stage_with_its_message_and_an_edit_retries(
    cluster: Cluster, start_operator: StartOperator, api_audit: list[AuditEntry]
) -> None:
    await start_operator()
    await to_training(cluster)
    await cluster.trainjob_conditions(
        NS,
        NAME,
        {
            "type": "Failed",
            "status": "True",
            "reason": "DeadlineExceeded",
            "message": "TrainJob exceeded its activeDeadlineSeconds",
        },
    )
    status = await cluster.wait_phase(NS, NAME, "Failed")
    assert status["training"]["state"] == "Failed"
    assert (
        f"TrainJob {NAME}-train failed (DeadlineExceeded): TrainJob exceeded its activeDeadlineSeconds"
        in status["message"]
    )
    assert "training.deadlineSeconds" in status["message"]
    # A longer deadline (how the stage runs): the failed TrainJob is replaced by a new one.
    await cluster.patch_spec(NS, NAME, {"training": {"deadlineSeconds": 999999}})
    await cluster.wait_for(
        lambda: cluster.creations("TrainJob", NS, f"{NAME}-train") == 2, "a second TrainJob", timeout=20
    )
    assert cluster.get("TrainJob", NS, f"{NAME}-train")["spec"]["activeDeadlineSeconds"] == 999999
    await cluster.wait_phase(NS, NAME, "Training")
    assert beyond_rbac(api_audit) == {}


@pytest.mark.trainer()
async def test_a_suspended_trainjob_shows_as_queued(cluster: Cluster, start_operator: StartOperator) -> None:
    await start_operator()
    await cluster.apply_run({**run(), "spec": {**run()["spec"], "scheduling": {"queueName": "gpus"}}})
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    await cluster.finish_collection(NS, NAME, summaries(2))
    tj = await cluster.wait_for(lambda: cluster.get("TrainJob", NS, f"{NAME}-train"), "the TrainJob")
    assert tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"  # Kueue's TrainJob integration
    # Kueue suspends the TrainJob until its queue admits it; the Trainer says so in a condition.
    await cluster.trainjob_conditions(
        NS,
        NAME,
        {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "TrainJob is suspended"},
    )
    status = await cluster.wait_for(
        lambda: "queued" in ((s := cluster.status(NS, NAME)).get("training") or {}).get("message", "") and s,
        "the training to show as queued",
    )
    assert status["phase"] == "Training"
    assert status["training"]["message"] == (
        f"queued: TrainJob {NAME}-train is suspended in queue gpus (TrainJob is suspended)"
    )
    # Admitted: it runs.
    await cluster.trainjob_conditions(NS, NAME, {"type": "Suspended", "status": "False", "reason": "Resumed"})
    await cluster.start_trainjob(NS, NAME)
    await cluster.wait_for(
        lambda: "queued" not in cluster.status(NS, NAME)["training"]["message"], "the queued message to go"
    )


@pytest.mark.trainer()
async def test_the_operator_restarted_mid_training_keeps_the_same_trainjob(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    op = await start_operator()
    tj = await to_training(cluster)
    await cluster.start_trainjob(NS, NAME)
    await cluster.wait_phase(NS, NAME, "Training")
    await op.kill()
    await start_operator()
    await cluster.finish_trainjob(NS, NAME, progress())
    await cluster.wait_phase(NS, NAME, "Serving")
    assert cluster.creations("TrainJob", NS, f"{NAME}-train") == 1
    assert cluster.get("TrainJob", NS, f"{NAME}-train")["metadata"]["uid"] == tj["metadata"]["uid"]


@pytest.mark.trainer(runtimes=())
async def test_a_missing_cluster_training_runtime_is_a_clear_message_until_it_is_installed(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator(env={"DISTILLERY_DISCOVERY_TTL_SECONDS": "1"})
    await cluster.apply_run(run())
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    await cluster.finish_collection(NS, NAME, summaries(2))
    status = await cluster.wait_for(
        lambda: "does not exist" in (s := cluster.status(NS, NAME)).get("message", "") and s,
        "the missing runtime in the status",
    )
    assert (
        "ClusterTrainingRuntime torch-distributed (the operator's default) does not exist"
        in status["message"]
    )
    degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "TrainingRuntimeNotFound")
    assert cluster.get("TrainJob", NS, f"{NAME}-train") is None
    # The platform team installs Kubeflow Trainer's runtimes: looked up again, the TrainJob is created.
    await cluster.create_runtime("torch-distributed")
    await cluster.wait_for(lambda: cluster.get("TrainJob", NS, f"{NAME}-train"), "the TrainJob", timeout=20)
    status = await cluster.wait_for(
        lambda: (s := cluster.status(NS, NAME))["conditions"] and s, "the status after the runtime came"
    )
    assert "does not exist" not in status["training"]["message"]


@pytest.mark.trainer()
async def test_an_explicit_pytorchjob_backend_is_kept_beside_trainer_v2(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    await cluster.apply_run(run(backend="pytorchjob"))
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    started = now()
    await cluster.finish_collection(NS, NAME, summaries(2))
    await cluster.wait_for(lambda: cluster.get("PyTorchJob", NS, f"{NAME}-train"), "the PyTorchJob")
    await cluster.finish_training(NS, NAME, progress(), started=started)
    await cluster.wait_phase(NS, NAME, "Serving")
    assert cluster.get("TrainJob", NS, f"{NAME}-train") is None


@pytest.mark.kubeflow(False)
async def test_auto_trains_with_an_indexed_job_where_no_kubeflow_is_served(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await start_operator()
    await cluster.apply_run(run())
    await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-collect"), "the collection Job")
    await cluster.finish_collection(NS, NAME, summaries(2))
    job = await cluster.wait_for(lambda: cluster.get("Job", NS, f"{NAME}-train"), "the Indexed Job")
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["completions"] == 2
    assert cluster.get("Service", NS, f"{NAME}-train") is not None
