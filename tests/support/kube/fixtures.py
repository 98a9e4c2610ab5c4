"""pytest fixtures for tests that need a Kubernetes API: ``cluster`` (the emulator over HTTP, with the
controllers it lacks), ``start_operator`` (``distillery operator`` as a real process against it) and
``api_audit`` (every request as ``(verb, group/resource, namespace)``: what the chart's RBAC must allow).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable

import kmock
import pytest
import pytest_asyncio

from .cluster import Cluster, Operator, write_kubeconfig
from .emulator import ApiServer, AuditEntry, declare_resources

NAMESPACES = {"team-a", "ns-1", "ns-2", "ns-a", "ns-b"}
WATCHED = (
    "distillery.dev/distillationruns",
    "configmaps",
    "services",
    "batch/jobs",
    "apps/deployments",
    "pods",
    "persistentvolumeclaims",
)


@pytest_asyncio.fixture
async def cluster(tmp_path, request: pytest.FixtureRequest) -> AsyncIterator[Cluster]:
    marker = request.node.get_closest_marker("kubeflow")
    pytorchjobs = marker.args[0] if marker else True
    trainer = request.node.get_closest_marker("trainer")
    async with ApiServer() as api, kmock.Server(api) as server:
        declare_resources(api, pytorchjobs=pytorchjobs, trainjobs=trainer is not None)
        api.namespaces |= NAMESPACES
        found = Cluster(api, server, tmp_path)
        # Kubeflow Trainer installed: its TrainJob CRD and the runtimes it ships (or those the marker names).
        for runtime in trainer.kwargs.get("runtimes", ("torch-distributed",)) if trainer else ():
            await found.create_runtime(runtime)
        try:
            yield found
        finally:
            for op in found.operators:
                await op.stop()


StartOperator = Callable[..., Awaitable[Operator]]


@pytest.fixture
def start_operator(cluster: Cluster) -> StartOperator:
    async def start(*args: str, env: dict[str, str] | None = None) -> Operator:
        n = len(cluster.operators)
        kubeconfig = write_kubeconfig(cluster.workdir / "kubeconfig.yaml", cluster.url)
        op = Operator(kubeconfig, cluster.workdir / f"operator-{n}.log", args or ("-A",), env or {})
        cluster.operators.append(op)
        since = len(cluster.api.audit)
        await op.start()
        await cluster.wait_for(
            lambda: {e.resource for e in cluster.api.audit[since:] if e.verb == "watch"} >= set(WATCHED),
            "the operator to watch its resources",
            timeout=30,
        )
        return op

    return start


@pytest.fixture
def api_audit(cluster: Cluster) -> list[AuditEntry]:
    return cluster.api.audit
