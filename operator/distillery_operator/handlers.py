"""kopf handlers, kept thin: index what exists, and ask for a reconcile when something changes.

- ``@kopf.index`` keeps one small observation per run and per child (ConfigMap, Service, Job,
  Deployment, PyTorchJob, TrainJob, Pod) in memory, keyed by ``(namespace, run)``, and one per
  PersistentVolumeClaim keyed by ``(namespace, claim)``, with the runs that have the operator create each
  claim (a claim's change wakes them). kopf fills the indices before any handler runs, so a restarted
  operator sees every child it made before it plans anything.
- ``@kopf.on.event`` on runs and on children (matched by the ``app.kubernetes.io/managed-by`` and
  ``distillery.dev/run`` labels: a label selector on the watch, and the same filter again here for API
  servers that ignore selectors) requests a reconcile of the run; the
  :class:`~distillery_operator.reconciler.Reconciler`'s work queue (:mod:`.workqueue`) coalesces and retries.
- One ``@kopf.on.startup`` holds every setting, and starts the metrics endpoint when ``--metrics`` asked
  for one (:mod:`.metrics`; the memo's ``metrics_url``).

Every handler is ``async``: kopf runs synchronous ones in a thread pool, a thread hop per watch event.

Load with ``kopf run -m distillery_operator.handlers``, or ``distillery operator``.
"""

from __future__ import annotations

import functools
import logging
from typing import Any

import kopf

from .kube import Api
from .metrics import MetricsServer, OperatorMetrics
from .naming import MANAGED_LABEL, RUN_LABEL, claim_to_create
from .observe import Child, Key, Pod, RunView, child_view, pod_view, run_view
from .reconciler import CLAIM_INDEX, POD_INDEX, RUN_INDEX, Reconciler
from .settings import MANAGED_BY, Settings

RUN_RESOURCE = ("distillery.dev", "v1alpha1", "distillationruns")
CHILD_RESOURCES = {
    "distillery_configmaps": ("", "v1", "configmaps"),
    "distillery_services": ("", "v1", "services"),
    "distillery_jobs": ("batch", "v1", "jobs"),
    "distillery_deployments": ("apps", "v1", "deployments"),
    "distillery_pytorchjobs": ("kubeflow.org", "v1", "pytorchjobs"),
    "distillery_trainjobs": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}
POD_RESOURCE = ("", "v1", "pods")
# Claims are watched without a label selector: a run may ask for a claim that someone else created.
CLAIM_RESOURCE = ("", "v1", "persistentvolumeclaims")
# (namespace, claim name) -> the runs that have the operator create that claim: whom a claim's change wakes.
CLAIM_USERS_INDEX = "distillery_claim_users"
MANAGED: dict[str, Any] = {MANAGED_LABEL: MANAGED_BY, RUN_LABEL: kopf.PRESENT}
CHILD_SELECTOR = f"{MANAGED_LABEL}={MANAGED_BY},{RUN_LABEL}"


def login(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo | None:
    """In-cluster service account first, then the kubeconfig (kopf's own parsers: no extra client)."""
    info: kopf.ConnectionInfo | None = kopf.login_with_service_account(settings=settings)
    return info or kopf.login_with_kubeconfig(settings=settings)


@kopf.on.login()
def authenticate(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    return login(settings)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    config: Settings = memo.get("config") or Settings.from_env()
    settings.posting.enabled = True
    settings.posting.level = logging.INFO
    # Real API servers end watches after a while; reconnect before that rather than hang on a dead one.
    settings.watching.server_timeout = 600
    settings.watching.client_timeout = 660
    settings.watching.connect_timeout = 30
    settings.networking.request_timeout = 60
    # Events of one object closer than this are handled together (kopf's default is 0.1 s).
    settings.batching.batch_window = 0.05
    # Only the children of runs, filtered by the API server (a cluster's other pods never reach the
    # operator); the handlers' label filters say the same, for API servers that ignore selectors.
    for resource in (*CHILD_RESOURCES.values(), POD_RESOURCE):
        settings.watching.label_selectors[resource] = CHILD_SELECTOR
    memo["config"] = config
    metrics = OperatorMetrics()
    memo["reconciler"] = Reconciler(Api(functools.partial(login, settings)), config, metrics=metrics)
    url: str | None = memo.get("metrics_url")
    if url:
        server = MetricsServer(url, metrics.registry)
        try:
            await server.start()
        except OSError as exc:
            raise kopf.PermanentError(f"cannot serve metrics on {url}: {exc}") from exc
        memo["metrics_server"] = server


@kopf.on.cleanup()
async def shutdown(memo: kopf.Memo, **_: Any) -> None:
    server: MetricsServer | None = memo.get("metrics_server")
    if server is not None:
        await server.stop()
    reconciler: Reconciler | None = memo.get("reconciler")
    if reconciler is not None:
        await reconciler.close()


# ---------------------------------------------------------------------------------------------- indices


@kopf.index(*RUN_RESOURCE, id=RUN_INDEX)
async def index_run(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Key, RunView]:
    return {(namespace or "", name): run_view(body)}


async def index_child(
    body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any
) -> dict[Key, Child]:
    return {(namespace or "", labels[RUN_LABEL]): child_view(body)}


for _index_id, _resource in CHILD_RESOURCES.items():
    kopf.index(*_resource, id=_index_id, labels=MANAGED)(index_child)


@kopf.index(*POD_RESOURCE, id=POD_INDEX, labels=MANAGED)
async def index_pod(body: kopf.Body, namespace: str | None, labels: kopf.Labels, **_: Any) -> dict[Key, Pod]:
    return {(namespace or "", labels[RUN_LABEL]): pod_view(body)}


@kopf.index(*CLAIM_RESOURCE, id=CLAIM_INDEX)
async def index_claim(body: kopf.Body, namespace: str | None, name: str, **_: Any) -> dict[Key, Child]:
    return {(namespace or "", name): child_view(body)}


@kopf.index(*RUN_RESOURCE, id=CLAIM_USERS_INDEX)
async def index_claim_user(spec: kopf.Spec, namespace: str | None, name: str, **_: Any) -> dict[Key, str]:
    claim = claim_to_create(spec)
    return {(namespace or "", claim): name} if claim else {}  # {} (not None) drops a stale entry


# ---------------------------------------------------------------------------------------------- events


@kopf.on.event(*RUN_RESOURCE)
async def run_changed(
    type: str | None, namespace: str | None, name: str, uid: str, memo: kopf.Memo, **kwargs: Any
) -> None:
    reconciler: Reconciler = memo["reconciler"]
    key = (namespace or "", name)
    if type == "DELETED":
        reconciler.forget(key, uid)
        return
    reconciler.bind(kwargs)
    reconciler.request(key)


async def child_changed(namespace: str | None, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    reconciler: Reconciler = memo["reconciler"]
    reconciler.bind(kwargs)
    reconciler.request((namespace or "", labels[RUN_LABEL]))


for _index_id, _resource in {**CHILD_RESOURCES, POD_INDEX: POD_RESOURCE}.items():
    kopf.on.event(*_resource, id=f"{_index_id}_changed", labels=MANAGED)(child_changed)


@kopf.on.event(*CLAIM_RESOURCE, id="distillery_claims_changed")
async def claim_changed(namespace: str | None, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
    reconciler: Reconciler = memo["reconciler"]
    reconciler.bind(kwargs)
    for run in kwargs[CLAIM_USERS_INDEX].get((namespace or "", name)) or ():
        reconciler.request((namespace or "", run))
