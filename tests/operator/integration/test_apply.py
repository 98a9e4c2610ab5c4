"""Children written with server-side apply: a field dropped from the spec leaves the child, a hand edit of
an operator-owned field is undone, a steady run writes nothing.

The API server here is the emulator (``tests/support/kube/emulator.py``), and server-side apply is the emulator's
model of it (:class:`tests.support.kube.emulator.Apply`: kmock has none, and no real API server runs on these
machines): a manager's applied fields are recorded in ``managedFields`` (lists atomic), fields it stops
applying are removed, other writers' fields are kept, and a non-apply write takes over the fields it
changes. What these tests show holds as far as that model matches the API server's.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from distillery_operator.owned import applied_shape, shape_digest

from tests.support.kube.cluster import Cluster, path
from tests.support.kube.fixtures import StartOperator
from tests.support.kube.rbac import beyond_rbac
from tests.support.reports import drive_to_evaluated

from .test_lifecycle import NAME, NS, example_run

GPU = "nvidia.com/gpu"
SERVE = f"{NAME}-serve"


def config_map(data: dict[str, str], labels: dict[str, str] | None = None) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "c", "namespace": NS, "labels": labels or {"a": "1"}},
        "data": data,
    }


async def raw_apply(
    cluster: Cluster, body: dict[str, Any], params: dict[str, str], name: str | None = None
) -> tuple[int, Any]:
    url = path("ConfigMap", NS, name or body["metadata"]["name"])
    headers = {"Content-Type": "application/apply-patch+yaml"}
    async with cluster.http.patch(url, json=body, params=params, headers=headers) as resp:
        return resp.status, await resp.json()


# ---------------------------------------------------------------------------------------------- the model


async def test_the_emulator_plays_server_side_apply(cluster: Cluster) -> None:
    """The emulator's server-side apply, with the operator's field manager and force (the emulator plays
    the API server's SSA here: these are its rules, not a real API server's behaviour). The requests are
    the test's own, so the chart's RBAC audit does not count them as the operator's."""

    async def ssa(body: dict[str, Any]) -> dict[str, Any]:
        status, answer = await raw_apply(cluster, body, {"fieldManager": "distillery", "force": "true"})
        assert status in (200, 201), answer
        return dict(answer)

    # Missing: created from the body, authorized as patch and as create.
    made = await ssa(config_map({"x": "1", "y": "2"}))
    assert made["data"] == {"x": "1", "y": "2"} and made["metadata"]["uid"]
    assert [e.verb for e in cluster.api.audit if e.resource == "configmaps"] == ["patch", "create"]
    assert applied_shape(made) == shape_digest(config_map({"x": "1", "y": "2"}))

    # Another writer adds a key: it is its own, and an apply leaves it alone.
    await cluster.request("PATCH", path("ConfigMap", NS, "c"), {"data": {"z": "3"}})
    # Dropping "y" from the apply removes it; "x" changes; a label is added; the other writer's "z" stays.
    body = config_map({"x": "10"}, labels={"a": "1", "b": "2"})
    after = await ssa(body)
    assert after["data"] == {"x": "10", "z": "3"}
    assert after["metadata"]["labels"] == {"a": "1", "b": "2"}
    assert applied_shape(after) == shape_digest(body)

    # The same apply again changes nothing: no write, no new resourceVersion.
    again = await ssa(body)
    assert again["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"]

    # A hand edit of an applied field takes it over (the operator's owned fields no longer match).
    await cluster.request("PATCH", path("ConfigMap", NS, "c"), {"data": {"x": "hand"}})
    edited = cluster.get("ConfigMap", NS, "c")
    assert edited is not None and applied_shape(edited) != applied_shape(after)
    managers = {e["manager"]: e["operation"] for e in edited["metadata"]["managedFields"]}
    assert managers == {"distillery": "Apply", "kmock": "Update"}
    # Without force, applying over it is a conflict; with force (the operator's), it is taken back.
    status, answer = await raw_apply(cluster, body, {"fieldManager": "distillery"})
    assert status == 409 and "conflict" in answer["message"]
    back = await ssa(body)
    assert back["data"] == {"x": "10", "z": "3"} and applied_shape(back) == applied_shape(after)

    # An apply without a field manager, or of another object than the URL's, is refused.
    assert (await raw_apply(cluster, body, {}))[0] == 400
    other = {**body, "metadata": {**body["metadata"], "name": "other"}}
    assert (await raw_apply(cluster, other, {"fieldManager": "distillery"}, name="c"))[0] == 400


# ---------------------------------------------------------------------------------------------- the operator


def gpu_limit(deployment: dict[str, Any]) -> str | None:
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    limits: dict[str, str] = (container.get("resources") or {}).get("limits") or {}
    return limits.get(GPU)


def child_writes(cluster: Cluster, since: int) -> list[Any]:
    return [
        e
        for e in cluster.api.audit[since:]
        if e.agent == "distillery-operator"
        and e.verb in ("create", "patch", "delete")
        and not e.resource.endswith("/status")
        and e.resource != "events"
    ]


async def serving(
    cluster: Cluster,
    start_operator: StartOperator,
    run: dict[str, Any] | None = None,
    env: dict[str, str] | None = None,
) -> dict[str, Any]:
    await start_operator(env=env)
    await cluster.apply_run(run or example_run())
    await drive_to_evaluated(cluster, NS, NAME, shards=8)
    await cluster.wait_phase(NS, NAME, "Succeeded")
    dep = cluster.get("Deployment", NS, SERVE)
    assert dep is not None
    return dep


@pytest.mark.slow
async def test_a_field_removed_from_the_spec_is_removed_from_the_child(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    """serving.gpus 1 -> 0 drops the GPU limit from the serving Deployment, and a nodeSelector dropped
    from the spec leaves its pods (a merge patch of what differs never removed a map's key) -- the
    emulator plays the API server's server-side apply here."""
    run = example_run()
    run["spec"]["scheduling"] = {"nodeSelector": {"pool": "a100"}}
    # A run's own node selector needs the chart's policy.allowSchedulingOverrides.
    dep = await serving(cluster, start_operator, run, {"DISTILLERY_ALLOW_SCHEDULING_OVERRIDES": "true"})
    assert gpu_limit(dep) == "1"
    assert dep["spec"]["template"]["spec"]["nodeSelector"] == {"pool": "a100"}
    await cluster.patch_spec(NS, NAME, {"serving": {"gpus": 0}, "scheduling": {"nodeSelector": None}})
    dep = await cluster.wait_for(
        lambda: (d := cluster.get("Deployment", NS, SERVE)) and gpu_limit(d) is None and d,
        "the GPU limit to leave the serving Deployment",
    )
    pod = dep["spec"]["template"]["spec"]
    assert GPU not in ((pod["containers"][0].get("resources") or {}).get("requests") or {})
    assert "nodeSelector" not in pod
    assert cluster.creations("Deployment", NS, SERVE) == 1  # applied in place, not re-created
    assert beyond_rbac(cluster.api.audit) == {}


@pytest.mark.slow
async def test_a_hand_edit_of_an_owned_field_is_reverted_and_other_fields_are_kept(
    cluster: Cluster, start_operator: StartOperator
) -> None:
    """Someone else (another field manager, a merge patch) edits the image and the replicas: the next
    reconcile takes both back; an annotation the operator does not set stays (the emulator plays the
    API server's server-side apply here)."""
    dep = await serving(cluster, start_operator)
    image = dep["spec"]["template"]["spec"]["containers"][0]["image"]
    containers = dep["spec"]["template"]["spec"]["containers"]
    edited = [{**containers[0], "image": "someone/else:latest"}, *containers[1:]]
    await cluster.request(
        "PATCH",
        path("Deployment", NS, SERVE),
        {
            "metadata": {"annotations": {"example.com/owner": "platform-team"}},
            "spec": {"replicas": 3, "template": {"spec": {"containers": edited}}},
        },
    )
    dep = await cluster.wait_for(
        lambda: (
            (d := cluster.get("Deployment", NS, SERVE))
            and d["spec"]["replicas"] == 1
            and d["spec"]["template"]["spec"]["containers"][0]["image"] == image
            and d
        ),
        "the hand edit to be reverted",
    )
    assert dep["metadata"]["annotations"]["example.com/owner"] == "platform-team"
    assert {e["manager"] for e in dep["metadata"]["managedFields"]} == {"distillery", "kmock"}
    assert beyond_rbac(cluster.api.audit) == {}


@pytest.mark.slow
async def test_an_unchanged_spec_makes_no_write(cluster: Cluster, start_operator: StartOperator) -> None:
    """Events on the run and its children reconcile it; with nothing changed, no child is written (the
    emulator plays the API server's server-side apply here: its managedFields are what is compared)."""
    await serving(cluster, start_operator)
    await asyncio.sleep(0.5)
    since = len(cluster.api.audit)
    await cluster.roll_out(NS, SERVE)  # a status event on the Deployment
    await cluster.request(
        "PATCH", path("DistillationRun", NS, NAME), {"metadata": {"labels": {"team": "search"}}}
    )
    await cluster.patch_status("Service", NS, SERVE, {"loadBalancer": {}})
    await asyncio.sleep(1.5)
    assert child_writes(cluster, since) == []

    # The same events do reconcile: a hand edit is seen and undone with one apply, and that is all.
    await cluster.request("PATCH", path("Deployment", NS, SERVE), {"spec": {"replicas": 2}})
    await cluster.wait_for(
        lambda: cluster.get("Deployment", NS, SERVE)["spec"]["replicas"] == 1, "the replicas to be reverted"
    )
    await asyncio.sleep(1.0)
    assert [(e.verb, e.resource) for e in child_writes(cluster, since)] == [("patch", "apps/deployments")]
    assert cluster.creations("Deployment", NS, SERVE) == 1
