"""What the operator may ask of the API server, in RBAC terms: the chart's Role must grant this, and the
operator's tests check (through the emulator's audit) that it never asks for more.

Keys are ``group/resource[/subresource]`` (the core group without a prefix), values the verbs.
"""

from __future__ import annotations

from .emulator import AuditEntry, rbac_rules

CHILD_VERBS = {"get", "list", "watch", "create", "patch", "delete"}

OPERATOR_RBAC: dict[str, set[str]] = {
    # kopf discovers custom resources as their CRDs come and go (optional: without it, at start-up only).
    "apiextensions.k8s.io/customresourcedefinitions": {"list", "watch"},
    # A namespaced operator (--namespace) lists namespaces (optional: kopf falls back to the names given).
    "namespaces": {"list", "watch"},
    "distillery.dev/distillationruns": {"list", "watch"},
    "distillery.dev/distillationruns/status": {"patch"},
    "configmaps": CHILD_VERBS,
    "services": CHILD_VERBS,
    "batch/jobs": CHILD_VERBS,
    "apps/deployments": CHILD_VERBS,
    "kubeflow.org/pytorchjobs": CHILD_VERBS,
    "trainer.kubeflow.org/trainjobs": CHILD_VERBS,
    # Whether the runtime a TrainJob references exists (cluster-scoped, read-only).
    "trainer.kubeflow.org/clustertrainingruntimes": {"get"},
    # The claim a run has the operator create: created, read back after a 409, watched; never changed.
    "persistentvolumeclaims": {"get", "list", "watch", "create"},
    # How a pending claim binds (cluster-scoped, read-only).
    "storage.k8s.io/storageclasses": {"get"},
    # Results come from the pods' termination messages: read only, and never a Secret.
    "pods": {"list", "watch"},
    # Live progress while training or collection runs: the tail of rank 0's and the shards' logs.
    "pods/log": {"get"},
    "events": {"create"},
}

TEST_AGENT = "kmock/"  # the tests' own requests (creating runs, playing the controllers)


def beyond_rbac(entries: list[AuditEntry], *, since: int = 0) -> dict[str, set[str]]:
    """The operator's requests (the tests' own are told apart by their User-Agent) that OPERATOR_RBAC
    does not allow; empty when all are allowed."""
    mine = [e for e in entries[since:] if not e.agent.startswith(TEST_AGENT)]
    assert mine, "no request of the operator's was recorded"
    extra: dict[str, set[str]] = {}
    for resource, verbs in rbac_rules(mine).items():
        missing = verbs - OPERATOR_RBAC.get(resource, set())
        if missing:
            extra[resource] = missing
    return extra
