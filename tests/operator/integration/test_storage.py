"""The operator provisions a run's volume (``storage.pvc.create``) against the API emulator: the claim is
created once with the operator's default StorageClass, the run waits in Pending while the claim is, and
goes on when the claim is bound. Run in both RBAC modes (cluster-wide and namespaced), so the chart's
rules for claims and StorageClasses are checked against what the operator really asks for."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.kube.cluster import Cluster, path
from tests.support.kube.emulator import AuditEntry, rbac_rules
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import drive_to_evaluated

from .test_lifecycle import conditions, example_run

pytestmark = pytest.mark.slow

NS = "team-a"
NAME = "contracts-8b"
CLAIM = "contracts-data"
PVC = "PersistentVolumeClaim"


async def create_storage_class(cluster: Cluster, name: str, binding: str) -> None:
    await cluster.request(
        "POST",
        "/apis/storage.k8s.io/v1/storageclasses",
        {
            "apiVersion": "storage.k8s.io/v1",
            "kind": "StorageClass",
            "metadata": {"name": name},
            "provisioner": "example.com/nfs",
            "volumeBindingMode": binding,
        },
    )


@pytest.mark.parametrize("scope", [("-A",), ("--namespace", NS)], ids=["cluster", "namespaced"])
async def test_the_operator_creates_the_runs_claim_once_and_starts_when_it_is_bound(
    scope: tuple[str, ...], cluster: Cluster, start_operator: StartOperator, api_audit: list[AuditEntry]
) -> None:
    await create_storage_class(cluster, "standard", "Immediate")
    await start_operator(*scope, env={"DISTILLERY_STORAGE_CLASS": "standard"})
    run = example_run()
    run["spec"]["storage"] = {"pvc": {"claimName": CLAIM, "create": {"size": "200Gi"}}}
    await cluster.apply_run(run)

    # The claim comes first, with the operator's default class; the run waits for it in Pending.
    claim = await cluster.wait_for(lambda: cluster.get(PVC, NS, CLAIM), "the claim")
    assert claim["spec"]["storageClassName"] == "standard"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]  # example run: one training node
    assert claim["spec"]["resources"] == {"requests": {"storage": "200Gi"}}
    assert claim["metadata"]["labels"]["distillery.dev/run"] == NAME
    assert "ownerReferences" not in claim["metadata"]  # deleting the run keeps its data
    status = await cluster.wait_for(
        lambda: (s := cluster.status(NS, NAME)).get("message", "").startswith("waiting") and s,
        "the run to wait for its claim",
    )
    assert status["phase"] == "Pending" and conditions(status)["Progressing"] == ("True", "WaitingForStorage")
    assert f"PersistentVolumeClaim {CLAIM} to be bound" in status["message"]
    await asyncio.sleep(1.0)  # the claim's events (and the run's own) change nothing while it is Pending
    assert cluster.status(NS, NAME)["phase"] == "Pending"
    assert not cluster.get("Job", NS, f"{NAME}-collect")
    assert cluster.creations(PVC, NS, CLAIM) == 1

    # The storage provisioner binds it: the claim's event wakes the run, which goes on.
    await cluster.patch_status(PVC, NS, CLAIM, {"phase": "Bound", "accessModes": ["ReadWriteOnce"]})
    status = await cluster.wait_phase(NS, NAME, "Collecting")
    job = cluster.get("Job", NS, f"{NAME}-collect")
    volumes = job["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": CLAIM}} in volumes
    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    await cluster.wait_phase(NS, NAME, "Succeeded")
    reasons = [e["reason"] for e in cluster.events(NS, NAME)]
    assert reasons[:2] == ["WaitingForStorage", "Collecting"]

    # Created once, never patched or deleted; the StorageClass was read (not written) to know to wait.
    assert cluster.creations(PVC, NS, CLAIM) == 1
    mine = [e for e in api_audit if e.agent == "distillery-operator"]
    assert {e.verb for e in mine if e.resource == "persistentvolumeclaims"} == {"create"}
    assert {e.verb for e in mine if e.resource == "storage.k8s.io/storageclasses"} == {"get"}
    assert beyond_rbac(api_audit) == {}
    claims = rbac_rules([e for e in api_audit if e.agent.startswith("kopf")])["persistentvolumeclaims"]
    assert claims == {"list", "watch"}
    # Claims are watched without a label selector: a run may name one the operator did not create.
    assert cluster.api.selectors["persistentvolumeclaims"] is None


async def test_a_claim_that_binds_on_first_consumer_does_not_hold_the_run(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    await create_storage_class(cluster, "local", "WaitForFirstConsumer")
    await start_operator()
    run = example_run()
    run["spec"]["storage"] = {
        "pvc": {"claimName": CLAIM, "create": {"size": "50Gi", "storageClassName": "local"}}
    }
    await cluster.apply_run(run)
    # The claim stays Pending until a pod uses it: the collection's pods are what binds it.
    await cluster.wait_phase(NS, NAME, "Collecting")
    assert cluster.get(PVC, NS, CLAIM)["spec"]["storageClassName"] == "local"
    assert cluster.get("Job", NS, f"{NAME}-collect") is not None


async def test_a_claim_someone_else_made_is_used_as_it_is(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": PVC,
        "metadata": {"name": CLAIM, "namespace": NS},
        "spec": {"accessModes": ["ReadWriteMany"], "resources": {"requests": {"storage": "1Ti"}}},
    }
    await cluster.request("POST", path(PVC, NS), theirs)
    await cluster.patch_status(PVC, NS, CLAIM, {"phase": "Bound"})
    await start_operator()
    run = example_run()
    run["spec"]["storage"] = {"pvc": {"claimName": CLAIM, "create": {"size": "200Gi"}}}
    await cluster.apply_run(run)
    await cluster.wait_phase(NS, NAME, "Collecting")
    claim = cluster.get(PVC, NS, CLAIM)
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti" and "labels" not in claim["metadata"]
    assert cluster.creations(PVC, NS, CLAIM) == 1
    assert beyond_rbac(cluster.api.audit) == {}
