"""The train stage's rules with Kubeflow Trainer v2: which kind ``training.backend`` picks from what the
cluster serves, and what a TrainJob's conditions make of the stage (pure: the planner alone)."""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any

import pytest
from distillery_operator.errors import Rejected, translate
from distillery_operator.kube import ApiError
from distillery_operator.observe import Child, Pod, Terminated
from distillery_operator.planner import Capabilities

from tests.operator.unit.test_planner import World, iso, spec_of
from tests.support.reports import progress, results

BOTH = Capabilities(pytorchjob=True, trainjob=True)
TRAINER_ONLY = Capabilities(pytorchjob=False, trainjob=True)
NEITHER = Capabilities(pytorchjob=False, trainjob=False)
V1_ONLY = Capabilities(pytorchjob=True, trainjob=False)


def at_training(caps: Capabilities, **training: Any) -> World:
    world = World(spec_of(training={"resources": {"gpusPerNode": 4}, **training}))
    world.caps = caps
    world.plan()
    world.collect()
    world.plan()
    return world


def trained_by(world: World) -> set[str]:
    return {kind for kind, name in world.children if name == "r-train" and kind != "Service"}


@pytest.mark.parametrize(
    ("caps", "kind"),
    [(BOTH, "TrainJob"), (TRAINER_ONLY, "TrainJob"), (V1_ONLY, "PyTorchJob"), (NEITHER, "Job")],
    ids=["both", "trainer-v2", "kubeflow-v1", "neither"],
)
def test_auto_takes_the_first_kind_the_cluster_serves(caps: Capabilities, kind: str) -> None:
    world = at_training(caps)
    assert trained_by(world) == {kind}
    assert (("Service", "r-train") in world.children) == (kind == "Job")  # the Indexed Job's rendezvous
    assert world.status["phase"] == "Training"


@pytest.mark.parametrize(
    ("backend", "caps", "kind"),
    [("trainjob", BOTH, "TrainJob"), ("pytorchjob", BOTH, "PyTorchJob"), ("job", BOTH, "Job")],
)
def test_an_explicit_backend_the_cluster_serves_is_used(backend: str, caps: Capabilities, kind: str) -> None:
    assert trained_by(at_training(caps, backend=backend)) == {kind}


@pytest.mark.parametrize(
    ("backend", "caps", "words"),
    [
        ("trainjob", V1_ONLY, "trainer.kubeflow.org/v1alpha1 TrainJobs"),
        ("pytorchjob", TRAINER_ONLY, "PyTorchJobs"),
    ],
)
def test_an_explicit_backend_the_cluster_does_not_serve_fails_the_run(
    backend: str, caps: Capabilities, words: str
) -> None:
    world = at_training(caps, backend=backend)
    assert trained_by(world) == set()
    st = world.status
    assert st["phase"] == "Failed" and st["training"]["state"] == "Failed"
    assert f"training.backend is {backend}" in st["message"] and words in st["message"]
    failed = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert failed["reason"] == "TrainingBackendUnavailable"
    # Re-checked on every pass: once the cluster serves it (Kubeflow installed), the training starts.
    world.caps = BOTH
    world.plan()
    assert trained_by(world) and world.status["phase"] == "Training"


def test_a_missing_cluster_training_runtime_is_a_clear_wait_not_a_trainjob() -> None:
    world = at_training(Capabilities(trainjob=True, runtimes={"torch-distributed": False}))
    assert trained_by(world) == set()
    st = world.status
    assert st["phase"] == "Training" and "ClusterTrainingRuntime torch-distributed" in st["message"]
    assert "does not exist" in st["training"]["message"] and "training.runtime" in st["training"]["message"]
    degraded = next(c for c in st["conditions"] if c["type"] == "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "TrainingRuntimeNotFound")
    out = world.plan()
    assert out.requeue_after is not None  # looked up again after the discovery TTL
    world.caps = Capabilities(trainjob=True, runtimes={"torch-distributed": True})
    world.plan()
    assert trained_by(world) == {"TrainJob"}


def test_the_runs_own_runtime_is_the_one_looked_up() -> None:
    caps = Capabilities(trainjob=True, runtimes={"torch-distributed": False, "torch-tuned": True})
    world = at_training(caps, runtime="torch-tuned")
    assert trained_by(world) == {"TrainJob"}
    assert "ClusterTrainingRuntime torch-tuned" in world.status["training"]["message"]


def tj_pod(world: World, name: str, index: int, message: Any = None, *, running: bool = False) -> None:
    """A pod of the TrainJob's JobSet: owned by a Job, found by the TrainJob's workload label."""
    tj = world.child("TrainJob", "train")
    text = message if isinstance(message, str) or message is None else json.dumps(message)
    terminated = () if running or text is None else (Terminated("node", 0, "Completed", text, world.now),)
    world.pods.append(
        Pod(
            name=name,
            component="train",
            index=index,
            phase="Running" if running else "Succeeded",
            terminated=terminated,
            owners=("uid-of-the-jobsets-job",),
            container="node",
            workload=tj.workload,
        )
    )


def test_a_complete_trainjob_finishes_the_stage_from_rank_0s_report() -> None:
    world = at_training(BOTH)
    tj_pod(world, "r-train-node-0-0", 0, progress(gpu_hours=1.5))
    tj_pod(world, "r-train-node-0-1", 1, {"not": "rank 0"})
    world.set_status(
        "TrainJob",
        "train",
        conditions=[{"type": "Complete", "status": "True", "lastTransitionTime": iso(world.now)}],
    )
    world.plan()
    st = world.status
    assert st["training"]["state"] == "Succeeded" and st["training"]["gpuHours"] == 1.5
    assert st["phase"] == "Serving"
    world.roll_out()
    world.plan()
    world.evaluate(results(0.93))
    world.plan()
    assert world.status["phase"] == "Succeeded"


def test_a_predecessors_pods_are_not_this_trainjobs() -> None:
    world = at_training(BOTH)
    tj = world.child("TrainJob", "train")
    world.pods.append(
        Pod(
            name="old",
            component="train",
            index=0,
            terminated=(Terminated("node", 0, "Completed", json.dumps(progress()), world.now),),
            workload="i2-other.g1",
        )
    )
    assert world.pods[0].workload != tj.workload
    world.set_status("TrainJob", "train", conditions=[{"type": "Complete", "status": "True"}])
    world.plan()
    assert "reading rank 0's report" in world.status["training"]["message"]


def test_a_failed_trainjob_fails_the_stage_with_its_message() -> None:
    world = at_training(BOTH)
    tj_pod(world, "r-train-node-0-0", 0, "Traceback ...\nRuntimeError: CUDA out of memory")
    world.set_status(
        "TrainJob",
        "train",
        conditions=[
            {
                "type": "Failed",
                "status": "True",
                "reason": "JobSetFailed",
                "message": "jobset r-train: job r-train-node-0 has failed",
                "lastTransitionTime": iso(world.now),
            }
        ],
    )
    world.plan()
    st = world.status
    assert st["phase"] == "Failed" and st["training"]["state"] == "Failed"
    assert (
        "TrainJob r-train failed (JobSetFailed): jobset r-train: job r-train-node-0 has failed"
        in st["message"]
    )


def test_a_suspended_trainjob_shows_as_queued() -> None:
    world = at_training(BOTH, backend="trainjob")
    world.set_status(
        "TrainJob",
        "train",
        conditions=[
            {"type": "Suspended", "status": "True", "reason": "Suspended", "message": "TrainJob is suspended"}
        ],
    )
    world.plan()
    st = world.status
    assert st["phase"] == "Training" and st["training"]["message"].startswith(
        "queued: TrainJob r-train is suspended"
    )
    # Admitted (Kueue unsuspends it): it runs.
    world.set_status(
        "TrainJob", "train", conditions=[{"type": "Suspended", "status": "False", "reason": "Resumed"}]
    )
    tj_pod(world, "r-train-node-0-0", 0, running=True)
    world.plan(advance=5)
    assert "queued" not in world.status["training"]["message"]


def test_an_existing_child_is_followed_whatever_backend_auto_would_pick_now() -> None:
    """Kubeflow Trainer installed while a PyTorchJob trains: the PyTorchJob goes on (no second child)."""
    world = at_training(V1_ONLY)
    world.caps = BOTH
    world.plan(advance=timedelta(minutes=5).total_seconds())
    assert trained_by(world) == {"PyTorchJob"}


def test_a_webhook_denial_is_the_objects_fault_not_a_missing_permission() -> None:
    """The Trainer's admission webhook answers 403 'denied the request' (a runtime that does not exist):
    the run fails with its words instead of retrying as if RBAC were missing."""
    body = (
        '{"message": "admission webhook \\"validate.trainjob.trainer.kubeflow.org\\" denied the request: '
        "spec.RuntimeRef: Invalid value: ...: specified clusterTrainingRuntime must be created before the "
        'TrainJob is created"}'
    )
    out = translate(ApiError(403, "Forbidden", body), "create TrainJob team-a/r-train")
    assert isinstance(out, Rejected) and "must be created before the TrainJob" in out.detail
    rbac = translate(ApiError(403, "Forbidden", '{"message": "forbidden: User cannot create"}'), "create x")
    assert not isinstance(rbac, Rejected) and "lacks this permission" in str(rbac)


def test_the_trainjob_child_view_keeps_its_workload_label() -> None:
    from distillery_operator.builders.common import Run
    from distillery_operator.builders.train import trainjob
    from distillery_operator.observe import child_view
    from distillery_operator.settings import Settings
    from distillery_trainer.api.spec import DistillationRunSpec

    manifest = trainjob(
        Run("r", "ns", "u", DistillationRunSpec.model_validate(spec_of())), Settings(), "i2-x", 2
    )
    manifest["status"] = {"conditions": [{"type": "Complete", "status": "True"}], "jobsStatus": []}
    seen: Child = child_view(manifest)
    assert seen.workload == "i2-x.g2" and seen.is_true("Complete") and "jobsStatus" not in seen.status
