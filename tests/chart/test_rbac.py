"""RBAC is exactly enough: every request the operator sent to the API emulator in its integration tests
(and in the chart's own tests that start it) is allowed by the chart's rendered RBAC for the mode it ran
in, and the cluster-wide ClusterRole grants nothing the operator did not use.

The record comes from :mod:`tests.chart.audit`; these tests run after every other test of the session.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from .audit import ApiRequest, Record, operator_records
from .helm import Rendered, Tools, render

pytestmark = [
    pytest.mark.slow,
    pytest.mark.operator_audit,
]

Grant = tuple[str, str, str]  # (verb, group, resource)

# Granted for code paths the operator's integration tests do not reach yet, each with the code that
# needs it. When a test starts to reach one, test_the_cluster_role_grants_nothing_unused says to
# remove it from here.
UNEXERCISED: dict[Grant, str] = {
    ("get", "batch", "jobs"): "apply.ensure reads a Job back after a 409 Conflict",
    ("get", "kubeflow.org", "pytorchjobs"): "apply.ensure reads a PyTorchJob back after a 409 Conflict",
    ("get", "trainer.kubeflow.org", "trainjobs"): "apply.ensure reads a TrainJob back after a 409 Conflict",
    ("get", "", "persistentvolumeclaims"): "apply.ensure reads a run's claim back after a 409 Conflict",
    # Never a request of the operator's: the API server's OwnerReferencesPermissionEnforcement admission
    # plugin (OpenShift) checks that whoever creates a child whose owner reference sets
    # blockOwnerDeletion (builders/common.owner_reference) may update the owner's finalizers. The
    # emulator has no admission plugins, so no test can reach it.
    ("update", "distillery.dev", "distillationruns/finalizers"): (
        "OwnerReferencesPermissionEnforcement on creating a child with blockOwnerDeletion: true"
    ),
}


@pytest.fixture(scope="module")
def records(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> list[Record]:
    found = operator_records(request.config, tmp_path_factory.mktemp("audit"))
    assert found, "no test recorded the operator's requests"
    return found


def rules_of(out: Rendered) -> list[tuple[str | None, dict[str, Any]]]:
    """(namespace of the Role, or None for a ClusterRole; rule) for every rule the chart grants."""
    found: list[tuple[str | None, dict[str, Any]]] = []
    for role in out.of_kind("ClusterRole"):
        found += [(None, rule) for rule in role["rules"]]
    for role in out.of_kind("Role"):
        found += [(role["metadata"]["namespace"], rule) for rule in role["rules"]]
    return found


def allowed(req: ApiRequest, rules: Iterable[tuple[str | None, dict[str, Any]]]) -> bool:
    return any(
        (ns is None or ns == req.namespace)
        and req.group in rule["apiGroups"]
        and req.resource in rule["resources"]
        and req.verb in rule["verbs"]
        for ns, rule in rules
    )


def grants(rules: Iterable[tuple[str | None, dict[str, Any]]]) -> set[Grant]:
    return {
        (verb, group, resource)
        for _, rule in rules
        for verb in rule["verbs"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
    }


def chart_for(record: Record, k8s_tools: Tools, tmp: Path) -> Rendered:
    namespaces = record.watched()
    if namespaces is None:
        return render(k8s_tools, tmp)
    return render(k8s_tools, tmp, {"rbac": {"scope": "namespaced", "watchNamespaces": namespaces}})


def test_every_request_of_the_operator_is_allowed_by_the_chart(
    records: list[Record], k8s_tools: Tools, tmp_path: Path
) -> None:
    denied: list[str] = []
    modes = set()
    for record in records:
        rules = rules_of(chart_for(record, k8s_tools, tmp_path))
        modes.add("cluster" if record.watched() is None else "namespaced")
        for req in record.requests:
            if not allowed(req, rules):
                where = f"in {req.namespace}" if req.namespace else "cluster-wide"
                what = f"{req.group}/{req.resource}" if req.group else req.resource
                denied.append(f"{req.verb} {what} {where} ({record.test})")
    assert not denied, "the chart's RBAC denies requests the operator makes:\n" + "\n".join(sorted(denied))
    assert modes == {"cluster", "namespaced"}, f"the record covers only {modes}"


def _used(records: list[Record], *, namespaced: bool) -> set[Grant]:
    return {
        (req.verb, req.group, req.resource)
        for record in records
        if (record.watched() is not None) == namespaced
        for req in record.requests
    }


def test_the_cluster_role_grants_nothing_unused(
    records: list[Record], k8s_tools: Tools, tmp_path: Path
) -> None:
    failed = sorted(r.test for r in records if r.failed)
    assert not failed, "the record is incomplete: these operator tests failed:\n" + "\n".join(failed)
    granted = grants(rules_of(render(k8s_tools, tmp_path)))
    used = _used(records, namespaced=False)
    assert set(UNEXERCISED) <= granted, f"justified but not granted: {sorted(set(UNEXERCISED) - granted)}"
    unused = granted - used - set(UNEXERCISED)
    assert not unused, f"the ClusterRole grants what the operator never used: {sorted(unused)}"
    stale = set(UNEXERCISED) & used
    assert not stale, f"now exercised by the operator's tests, remove from UNEXERCISED: {sorted(stale)}"


def test_namespaced_mode_cluster_reads_are_all_used(
    records: list[Record], k8s_tools: Tools, tmp_path: Path
) -> None:
    out = render(k8s_tools, tmp_path, {"rbac": {"scope": "namespaced", "watchNamespaces": ["team-a"]}})
    cluster_wide = grants((None, rule) for role in out.of_kind("ClusterRole") for rule in role["rules"])
    assert cluster_wide <= _used(records, namespaced=True), "granted cluster-wide, never used namespaced"
