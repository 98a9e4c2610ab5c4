"""A small asyncio Kubernetes REST client for the one writer (:mod:`.apply`): plain dicts in and out.

It shares kopf's credentials (its login handlers parse the service account or the kubeconfig) and raises
its own :class:`ApiError` on HTTP errors, which :mod:`.errors` maps to kopf's temporary and permanent
errors. The operator's requests stay on its one event loop: no thread per call.

Why hand-written, not a client library: the operator makes nine kinds of request (get, create, a merge
patch of a run's status, a server-side apply, delete, a pod's log, discovery) on a dozen resources, with
kopf's credentials, on kopf's event loop. The ``kubernetes`` package was imported only for its exception
class (its client is synchronous); ``kubernetes_asyncio``, ``lightkube`` and ``kr8s`` would each bring a
second credentials loader and a model layer the writer does not want (it sends and reads plain dicts),
for requests that are one line each here. So the client stays, with its own error type, and the
operator no longer depends on ``kubernetes``.

Server-side apply (:meth:`Api.apply`) is a ``PATCH`` with ``application/apply-patch+yaml`` (the body is
JSON, which is YAML), ``fieldManager=distillery`` and ``force=true``: the operator is the one authority
on the fields it sets. Every other write names the same field manager.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import kopf

from .naming import CLASS_NOT_FOUND, IMMEDIATE

logger = logging.getLogger("distillery.operator")


@dataclass(frozen=True)
class Kind:
    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, sub: str | None = None) -> str:
        root = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        out = f"{root}/namespaces/{namespace}/{self.plural}" if namespace else f"{root}/{self.plural}"
        if name:
            out += f"/{name}"
        if sub:
            out += f"/{sub}"
        return out


KINDS: dict[str, Kind] = {
    k.kind: k
    for k in (
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "Service", "services"),
        Kind("v1", "Pod", "pods"),
        Kind("v1", "PersistentVolumeClaim", "persistentvolumeclaims"),
        Kind("storage.k8s.io/v1", "StorageClass", "storageclasses"),
        Kind("batch/v1", "Job", "jobs"),
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("kubeflow.org/v1", "PyTorchJob", "pytorchjobs"),
        Kind("trainer.kubeflow.org/v1alpha1", "TrainJob", "trainjobs"),
        Kind("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime", "clustertrainingruntimes"),
        Kind("distillery.dev/v1alpha1", "DistillationRun", "distillationruns"),
    )
}

MERGE_PATCH = "application/merge-patch+json"
APPLY_PATCH = "application/apply-patch+yaml"
FIELD_MANAGER = "distillery"
WRITE_PARAMS = {"fieldManager": FIELD_MANAGER}


class ApiError(Exception):
    """An HTTP error answer of the API server: ``status``, ``reason``, the body (a ``Status`` object as
    JSON, usually) and the response headers (``Retry-After``)."""

    def __init__(
        self, status: int, reason: str = "", body: str = "", headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(f"{status} {reason}".strip())
        self.status = status
        self.reason = reason
        self.body = body
        self.headers: dict[str, str] = dict(headers or {})


class Api:
    """Requests with kopf's ConnectionInfo; logs in again once on a 401 (rotated service-account tokens)."""

    def __init__(self, login: Callable[[], kopf.ConnectionInfo | None], timeout: float = 60.0) -> None:
        self._login = login
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._server = ""
        self._discovered: dict[str, tuple[float, bool]] = {}
        self._bindings: dict[str, tuple[float, str | None]] = {}
        self._found: dict[tuple[str, str], tuple[float, bool | None]] = {}

    def _connect(self) -> aiohttp.ClientSession:
        info = self._login()
        if info is None:
            raise kopf.PermanentError(
                "no Kubernetes credentials: run in a pod with a service account, or set KUBECONFIG"
            )
        self._server = info.server.rstrip("/")
        return aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(ssl=info.as_ssl_context(), limit=64),
            headers={**info.as_http_headers(), "User-Agent": "distillery-operator"},
            timeout=self._timeout,
            trust_env=info.trust_env,
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any]:
        text = await self.request_text(method, path, body=body, params=params, content_type=content_type)
        return json.loads(text) if text else {}

    async def request_text(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        content_type: str = "application/json",
        timeout: float | None = None,
    ) -> str:
        """The response body as text (JSON for objects; plain text for a pod's log)."""
        for attempt in (1, 2):
            if self._session is None:
                self._session = self._connect()
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            extra: dict[str, Any] = {}
            if timeout is not None:  # else the session's (passing None would mean no limit at all)
                extra["timeout"] = aiohttp.ClientTimeout(total=timeout)
            async with self._session.request(
                method, self._server + path, data=data, params=params, headers=headers, **extra
            ) as resp:
                text = await resp.text(errors="replace")
                if resp.status == 401 and attempt == 1:
                    await self.close()
                    continue
                if resp.status >= 400:
                    raise ApiError(resp.status, resp.reason or "", text, dict(resp.headers))
                return text
        raise AssertionError("unreachable")

    async def pod_log(
        self, namespace: str, name: str, container: str, *, tail_lines: int, timeout: float
    ) -> str:
        """The last ``tail_lines`` lines of a running container's log (``get`` on ``pods/log``)."""
        params = {"tailLines": str(tail_lines)}
        if container:
            params["container"] = container
        return await self.request_text(
            "GET", KINDS["Pod"].path(namespace, name, "log"), params=params, timeout=timeout
        )

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self.request("GET", KINDS[kind].path(namespace, name))

    async def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        return await self.request(
            "POST", KINDS[manifest["kind"]].path(namespace), body=manifest, params=WRITE_PARAMS
        )

    async def patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, sub: str | None = None
    ) -> dict[str, Any]:
        """A JSON merge patch (the run's status)."""
        return await self.request(
            "PATCH",
            KINDS[kind].path(namespace, name, sub),
            body=patch,
            params=WRITE_PARAMS,
            content_type=MERGE_PATCH,
        )

    async def apply(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        """Server-side apply of the whole desired object: created when missing; otherwise the fields this
        manager applied before and ``manifest`` lacks are removed, the others set, and fields other
        writers own and ``manifest`` does not mention are kept (``force``: ours win a conflict)."""
        return await self.request(
            "PATCH",
            KINDS[manifest["kind"]].path(namespace, manifest["metadata"]["name"]),
            body=manifest,
            params={**WRITE_PARAMS, "force": "true"},
            content_type=APPLY_PATCH,
        )

    async def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        return await self.request(
            "DELETE", KINDS[kind].path(namespace, name), body={"propagationPolicy": "Background"}
        )

    async def has_resource(self, api_version: str, plural: str, ttl: float) -> bool:
        """Discovery, cached for ``ttl`` seconds: does the cluster serve ``api_version``/``plural``?"""
        key = f"{api_version}/{plural}"
        cached = self._discovered.get(key)
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        try:
            doc = await self.request("GET", f"/apis/{api_version}")
            found = any(r.get("name") == plural for r in doc.get("resources") or ())
        except ApiError as exc:
            if exc.status != 404:
                raise
            found = False
        self._discovered[key] = (time.monotonic(), found)
        return found

    async def binding_mode(self, storage_class: str, ttl: float) -> str | None:
        """A StorageClass's ``volumeBindingMode`` (``CLASS_NOT_FOUND`` when there is no such class; None
        when it may not be read). Cached: a class's binding mode is immutable, while a missing or
        unreadable class is asked about again after ``ttl`` seconds."""
        cached = self._bindings.get(storage_class)
        if cached is not None and (
            cached[1] not in (None, CLASS_NOT_FOUND) or time.monotonic() - cached[0] < ttl
        ):
            return cached[1]
        mode: str | None
        try:
            doc = await self.get("StorageClass", "", storage_class)
            mode = str(doc.get("volumeBindingMode") or IMMEDIATE)
        except ApiError as exc:
            if exc.status == 404:
                mode = CLASS_NOT_FOUND
            elif exc.status == 403:
                logger.warning(
                    "may not read StorageClass %s (grant get on storage.k8s.io/storageclasses): runs "
                    "whose claim it provisions start without waiting for the claim to be bound",
                    storage_class,
                )
                mode = None
            else:
                raise
        self._bindings[storage_class] = (time.monotonic(), mode)
        return mode

    async def cluster_object_exists(self, kind: str, name: str, ttl: float) -> bool | None:
        """Whether a cluster-scoped object (a ClusterTrainingRuntime) exists; None when it may not be
        read. Cached for ``ttl`` seconds either way: one installed or removed later is seen then."""
        key = (kind, name)
        cached = self._found.get(key)
        if cached is not None and time.monotonic() - cached[0] < ttl:
            return cached[1]
        found: bool | None
        try:
            await self.get(kind, "", name)
            found = True
        except ApiError as exc:
            if exc.status == 404:
                found = False
            elif exc.status == 403:
                logger.warning(
                    "may not read %s %s (grant get on %s): TrainJobs are created without checking it",
                    kind,
                    name,
                    KINDS[kind].plural,
                )
                found = None
            else:
                raise
        self._found[key] = (time.monotonic(), found)
        return found
