"""A Kubernetes API emulator for the operator's tests: kmock's, plus what a real API server does.

kmock 0.8 stores objects, serves list/watch/get/create/patch/delete over real HTTP and streams watch
events. A real API server also stamps every object (``uid``, ``resourceVersion``, ``generation``
bumped on spec changes, ``creationTimestamp``, the URL's namespace), honours ``generateName`` (kopf's
Events use it), keeps ``status`` behind the status subresource and answers a stale
``resourceVersion`` with 409. :class:`ApiServer` adds exactly that, and two things for the tests:

- ``audit``: every request as ``(verb, group/resource[/subresource], namespace)`` in RBAC terms, so the
  chart's Role can be checked against what the operator really did;
- ``inject``: answer the next N matching requests with an error (500, 409, ...) before they touch
  the store, to test the operator's handling of a flaky API server;
- ``pods/log``: a container's log, as text the test writes (``write_log``), served as ``text/plain``
  the way the kubelet serves it through the API server (``container``, ``tailLines``, ``limitBytes``;
  400 for a container that has not started, 404 for a pod that does not exist). kmock has no logs.
- server-side apply, which kmock lacks (it would merge an apply body like a merge patch): this emulator
  plays the API server's part, as a thin model of what the operator relies on -- see :class:`Apply`.

Label selectors, garbage collection and admission are still absent: the operator must not rely on
them (it filters by labels itself; deletion cascading is asserted through owner references).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import datetime
import gzip
import importlib.resources
import itertools
import json
import re
import secrets
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import aiohttp.web
import attrs
import kmock
import yaml
from kmock._internal import dicts as kmock_dicts
from kmock._internal.enums import action
from kmock._internal.rendering import Request

_CURRENT: contextvars.ContextVar[Request | None] = contextvars.ContextVar("kmock_request", default=None)
NAMESPACES_PATH = re.compile(r"^/api/v1/namespaces/?$")

VERBS = {
    action.LIST: "list",
    action.WATCH: "watch",
    action.FETCH: "get",
    action.CREATE: "create",
    action.UPDATE: "patch",
    action.DELETE: "delete",
}


class AuditEntry(NamedTuple):
    verb: str
    resource: str  # "batch/jobs", "pods", "distillery.dev/distillationruns/status"
    namespace: str | None
    agent: str = ""  # the User-Agent: kopf/..., distillery-operator, or kmock/... for the tests' own requests


@dataclass
class Fault:
    verb: str
    resource: str
    status: int
    times: int
    namespace: str | None = None
    hits: int = 0
    # The API server's words (a 422 names the field it refused), and which request bodies it refuses
    # (None: any): a test that plays the API server's validation says what it checks.
    message: str | None = None
    when: Callable[[dict[str, Any]], bool] | None = None


def _body(request: Request) -> dict[str, Any]:
    """A request's body as an object (JSON, or the YAML of an apply), ``{}`` when it has none."""
    data = request.data
    if isinstance(data, (str, bytes)):
        with contextlib.suppress(yaml.YAMLError):
            data = yaml.safe_load(data)
    return data if isinstance(data, dict) else {}


def rbac_rules(entries: list[AuditEntry]) -> dict[str, set[str]]:
    """What a Role must allow for the requests seen: ``{"batch/jobs": {"create", "list", ...}, ...}``."""
    rules: dict[str, set[str]] = {}
    for entry in entries:
        rules.setdefault(entry.resource, set()).add(entry.verb)
    return rules


def rbac_resource(group: str, plural: str, subresource: str | None = None) -> str:
    out = f"{group}/{plural}" if group else plural
    return f"{out}/{subresource}" if subresource else out


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


APPLY_PATCH = "application/apply-patch+yaml"
Path = tuple[str, ...]
MISSING: Any = object()
# Not a manager's field: set from the URL, or by the API server itself.
UNTRACKED = {"apiVersion", "kind"}
UNTRACKED_META = {
    "name",
    "namespace",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "managedFields",
    "generateName",
}


def _leaves(obj: Any) -> set[Path]:
    """The field paths an object sets: a map's keys, recursively; a list, a scalar or an empty map is one
    field (lists are atomic here, where the real API server merges some lists by key)."""
    out: set[Path] = set()

    def walk(value: Any, path: Path) -> None:
        if isinstance(value, dict) and value:
            for key, sub in value.items():
                walk(sub, (*path, key))
        elif path:
            out.add(path)

    for key, value in (obj or {}).items():
        if key in UNTRACKED or key == "status":
            continue
        if key == "metadata" and isinstance(value, dict):
            for mkey, mvalue in value.items():
                if mkey not in UNTRACKED_META:
                    walk(mvalue, ("metadata", mkey))
        else:
            walk(value, (key,))
    return out


def _at(obj: Any, path: Path) -> Any:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return MISSING
        obj = obj[key]
    return obj


def _put(obj: dict[str, Any], path: Path, value: Any) -> None:
    for key in path[:-1]:
        if not isinstance(obj.get(key), dict):
            obj[key] = {}
        obj = obj[key]
    obj[path[-1]] = copy.deepcopy(value)


def _drop(obj: dict[str, Any], path: Path, keep: Callable[[Path], bool]) -> None:
    """Remove a field, then the maps it leaves empty (unless ``keep`` says someone owns one of them)."""
    parents = [obj]
    for key in path[:-1]:
        nxt = parents[-1].get(key)
        if not isinstance(nxt, dict):
            return
        parents.append(nxt)
    parents[-1].pop(path[-1], None)
    for depth in range(len(path) - 1, 0, -1):
        if parents[depth] or keep(path[:depth]):
            break
        parents[depth - 1].pop(path[depth - 1], None)


def _fields_v1(paths: Iterable[Path]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for path in sorted(paths):
        node = tree
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return tree


def _paths(fields: dict[str, Any], prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for key, sub in fields.items():
        if not key.startswith("f:"):
            continue
        path = (*prefix, key[2:])
        inner = _paths(sub, path) if isinstance(sub, dict) else set()
        out |= inner or {path}
    return out


@dataclass
class Manager:
    """One ``metadata.managedFields`` entry: who wrote which fields, by apply or by another write."""

    manager: str
    operation: str  # Apply | Update
    fields: set[Path]
    api_version: str = ""
    subresource: str = ""
    time: str = ""

    @classmethod
    def read(cls, obj: dict[str, Any]) -> list[Manager]:
        return [
            cls(
                manager=e.get("manager", ""),
                operation=e.get("operation", ""),
                fields=_paths(e.get("fieldsV1") or {}),
                api_version=e.get("apiVersion", ""),
                subresource=e.get("subresource", ""),
                time=e.get("time", ""),
            )
            for e in (obj.get("metadata") or {}).get("managedFields") or ()
        ]

    def key(self) -> tuple[str, str, str]:
        return (self.manager, self.operation, self.subresource)

    def render(self) -> dict[str, Any]:
        out = {
            "manager": self.manager,
            "operation": self.operation,
            "apiVersion": self.api_version,
            "time": self.time,
            "fieldsType": "FieldsV1",
            "fieldsV1": _fields_v1(self.fields),
        }
        if self.subresource:
            out["subresource"] = self.subresource
        return out


class Apply:
    """Server-side apply, as the emulator plays it (kmock has none), after the API server's rules for
    what the operator does with it:

    - ``PATCH`` with ``Content-Type: application/apply-patch+yaml`` (YAML or JSON) and ``fieldManager``
      (required: 400 without); the body must name the object of the URL;
    - a missing object is created from the body (authorized as ``create`` too, as the API server does:
      the audit records both verbs);
    - an existing one: the fields this manager applied before and the body lacks are removed, unless
      another manager owns them too; the body's fields are set; the fields of other writers are kept.
      A field another manager owns with another value is a conflict (409) unless ``force=true``, which
      takes it over;
    - ``metadata.managedFields`` records the field paths each manager owns (``FieldsV1`` with ``f:`` keys
      only: lists are atomic here, where the API server merges some lists by key). A non-apply write to
      an object that has managedFields takes over the fields it changed, as on the API server: that is
      how a hand edit of an applied field shows. Objects no apply has touched carry no managedFields (the
      API server records every writer from the create on; nothing here needs it);
    - an apply that changes nothing writes nothing (no new resourceVersion, no watch event).
    """

    @staticmethod
    def wanted(request: Request) -> bool:
        content_type = request.headers.get("Content-Type", "").split(";")[0].strip()
        return request.action == action.UPDATE and content_type == APPLY_PATCH

    @staticmethod
    def body(request: Request) -> dict[str, Any]:
        data = request.data
        if not isinstance(data, dict):
            try:
                data = yaml.safe_load(request.text)
            except yaml.YAMLError:
                data = None
        if not isinstance(data, dict) or not data.get("apiVersion") or not data.get("kind"):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="an apply body is an object with apiVersion and kind"
            )
        meta = data.get("metadata") or {}
        if meta.get("name") != request.name or meta.get("namespace") not in (None, request.namespace):
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="the name of the object does not match the URL"
            )
        return data

    @staticmethod
    def merge(current: dict[str, Any], body: dict[str, Any], manager: str, force: bool) -> dict[str, Any]:
        """The object after ``manager`` applied ``body`` to ``current``."""
        applied = _leaves(body)
        entries = Manager.read(current)
        mine = next(
            (e for e in entries if e.key() == (manager, "Apply", "")),
            Manager(manager, "Apply", set(), body.get("apiVersion", "")),
        )
        others = [e for e in entries if e is not mine and not e.subresource]
        conflicts = {
            (e.manager, path)
            for e in others
            for path in applied & e.fields
            if _at(current, path) != _at(body, path)
        }
        if conflicts and not force:
            listed = "; ".join(f'conflict with "{m}": .{".".join(p)}' for m, p in sorted(conflicts))
            raise kmock.KubernetesError(
                status=409,
                reason="Conflict",
                message=f"Apply failed with {len(conflicts)} conflicts: {listed}",
            )
        new = copy.deepcopy(current)
        owned_elsewhere = set().union(*(e.fields for e in others)) if others else set()
        for path in sorted(mine.fields - applied, key=len, reverse=True):
            if path not in owned_elsewhere:
                _drop(new, path, keep=lambda p: p in owned_elsewhere or p in applied)
        for path in applied:
            _put(new, path, _at(body, path))
        taken = {path for _, path in conflicts}
        for e in others:
            e.fields = {p for p in e.fields - taken if _at(new, p) is not MISSING}
        if mine.fields != applied:
            mine.fields, mine.time = set(applied), _now()
        if all(e is not mine for e in entries):
            entries.append(mine)
        new["metadata"]["managedFields"] = [e.render() for e in entries if e.fields]
        return new

    @staticmethod
    def track(
        current: dict[str, Any], new: dict[str, Any], manager: str, subresource: str
    ) -> list[Any] | None:
        """The managedFields after a non-apply write by ``manager``: it owns the fields it changed, which
        every other manager loses; removed fields leave every entry. None when nothing is tracked."""
        if not (current.get("metadata") or {}).get("managedFields"):
            return None
        changed = {p for p in _leaves(new) if _at(current, p) != _at(new, p)}
        entries = Manager.read(current)
        key = (manager, "Update", subresource)
        for e in entries:
            e.fields = {p for p in e.fields - changed if _at(new, p) is not MISSING}
        if changed:
            mine = next((e for e in entries if e.key() == key), None)
            if mine is None:
                mine = Manager(manager, "Update", set(), new.get("apiVersion", ""), subresource)
                entries.append(mine)
            mine.fields |= changed
            mine.time = _now()
        return [e.render() for e in entries if e.fields]


def _merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch from ``old`` to ``new``."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out = {k: _merge_patch(old.get(k), v) for k, v in new.items() if old.get(k, MISSING) != v}
    out.update({k: None for k in old if k not in new})
    return out


def _manager(request: Request) -> str:
    """The field manager of a write: ``?fieldManager=``, else the User-Agent up to its first ``/``."""
    agent = request.headers.get("User-Agent", "")
    return request.params.get("fieldManager") or agent.split("/")[0] or "unknown"


def _essence(obj: Any) -> dict[str, Any]:
    """What a change of bumps ``metadata.generation``: everything but metadata and status."""
    return {k: v for k, v in (obj or {}).items() if k not in ("metadata", "status")}


@attrs.define(kw_only=True)
class ApiServer(kmock.KubernetesEmulator):
    audit: list[AuditEntry] = attrs.field(factory=list, init=False)
    faults: list[Fault] = attrs.field(factory=list, init=False)
    namespaces: set[str] = attrs.field(factory=lambda: {"default", "kube-system"})
    # The label selector of the last list or watch of each resource (kmock ignores them).
    selectors: dict[str, str | None] = attrs.field(factory=dict, init=False)
    # Called after every write that went through: (the audit entry, the request).
    listeners: list[Callable[[AuditEntry, Request], None]] = attrs.field(factory=list, init=False)
    # (namespace, pod, container) -> the container's log so far (``write_log``).
    logs: dict[tuple[str, str, str], str] = attrs.field(factory=dict, init=False)
    _versions: Any = attrs.field(factory=lambda: itertools.count(1), init=False)
    _mutations: asyncio.Lock = attrs.field(factory=asyncio.Lock, init=False)

    # ------------------------------------------------------------------------------------------ the tests' API

    def inject(
        self,
        verb: str,
        resource: str,
        status: int,
        times: int = 1,
        namespace: str | None = None,
        *,
        message: str | None = None,
        when: Callable[[dict[str, Any]], bool] | None = None,
    ) -> Fault:
        """Answer the next ``times`` requests ``verb resource`` (RBAC terms) with HTTP ``status`` (and
        ``message``), only those whose body ``when`` picks if given."""
        fault = Fault(
            verb=verb,
            resource=resource,
            status=status,
            times=times,
            namespace=namespace,
            message=message,
            when=when,
        )
        self.faults.append(fault)
        return fault

    def count(self, verb: str, resource: str) -> int:
        return sum(1 for e in self.audit if e.verb == verb and e.resource == resource)

    def write_log(self, namespace: str, pod: str, container: str, text: str) -> None:
        """Append ``text`` to a container's log (what the process printed; the pod need not exist yet)."""
        key = (namespace, pod, container)
        self.logs[key] = self.logs.get(key, "") + text

    # ------------------------------------------------------------------------------------------ the server

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        # kmock cannot parse the cluster-scoped /api/v1/namespaces (a namespaced operator lists them).
        if NAMESPACES_PATH.match(raw_request.path):
            return await self._serve_namespaces(raw_request)
        return await super().__call__(raw_request)

    def _namespace_objects(self) -> list[dict[str, Any]]:
        names = set(self.namespaces) | {ns for (_, ns, _) in self.objects if ns}
        return [
            {
                "apiVersion": "v1",
                "kind": "Namespace",
                "metadata": {"name": n, "uid": f"ns-{n}"},
                "status": {"phase": "Active"},
            }
            for n in sorted(names)
        ]

    async def _serve_namespaces(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        await raw_request.read()
        watch = raw_request.query.get("watch") == "true"
        agent = raw_request.headers.get("User-Agent", "")
        self.audit.append(AuditEntry("watch" if watch else "list", "namespaces", None, agent))
        if not watch:
            return aiohttp.web.json_response(
                {
                    "apiVersion": "v1",
                    "kind": "NamespaceList",
                    "metadata": {"resourceVersion": "1"},
                    "items": self._namespace_objects(),
                }
            )
        response = aiohttp.web.StreamResponse(headers={"Content-Type": "application/json"})
        await response.prepare(raw_request)
        for obj in self._namespace_objects():
            await response.write(json.dumps({"type": "ADDED", "object": obj}).encode() + b"\n")
        timeout = float(raw_request.query.get("timeoutSeconds") or 3600)
        deadline = asyncio.get_running_loop().time() + timeout
        while asyncio.get_running_loop().time() < deadline and self.active:
            transport = raw_request.transport
            if transport is None or transport.is_closing():
                break
            await asyncio.sleep(0.2)
        return response

    # kmock matches a request to its reactions by asking each reaction whether the request is among the
    # requests it has seen, which walks every request received so far: quadratic in the requests served.
    # While a request is handled, the root yields that request alone (a context variable: aiohttp runs
    # each request in its own task), and only the requests in flight are kept (the audit keeps the
    # history): the matching is constant time. Nothing here reads kmock's request history.
    def __iter__(self) -> Iterator[Request]:
        current = _CURRENT.get()
        if current is not None:
            yield current
        else:
            yield from super().__iter__()

    async def _handle(self, request: Request) -> Any:
        token = _CURRENT.set(request)
        try:
            return await self._serve(request)
        finally:
            _CURRENT.reset(token)
            with contextlib.suppress(ValueError):
                self._requests.remove(request)

    # kmock finds an object by scanning all of them; a real API server (and this one) looks it up.
    def _lookup(self, request: Request) -> Any:
        obj = self.objects._objects.get((request.resource, request.namespace, request.name))
        return obj

    async def _serve_fetch(self, request: Request) -> Any:
        obj = self._lookup(request)
        if obj is None or obj.deleted:
            raise kmock.KubernetesObjectNotFoundError()
        return obj.raw

    async def _serve_create(self, request: Request) -> Any:
        meta = request.data.get("metadata", {}) if isinstance(request.data, dict) else {}
        key = (request.resource, request.namespace or meta.get("namespace"), request.name or meta.get("name"))
        return self.objects._objects[key].last.raw

    async def _serve_update(self, request: Request) -> Any:
        return self._lookup(request).last.raw

    async def _serve_delete(self, request: Request) -> Any:
        return self._lookup(request).last.raw

    async def _serve(self, request: Request) -> Any:
        entry = self._audit(request)
        if entry is not None:
            self._inject(entry, request)
        if entry is not None and entry.resource == "pods/log" and request.action == action.FETCH:
            return self._serve_log(request)
        if request.resource is None or request.action not in (action.CREATE, action.UPDATE, action.DELETE):
            return await super()._handle(request)
        async with self._mutations:  # the bookkeeping below reads the object before kmock changes it
            if Apply.wanted(request):
                applied = self._apply(request, entry)
                if isinstance(applied, dict):
                    return aiohttp.web.json_response(applied)  # nothing changed: nothing written
                request = applied
            if request.action == action.CREATE:
                self._stamp_create(request)
            elif request.action == action.UPDATE:
                self._stamp_update(request)
            response = await super()._handle(request)
        if entry is not None:
            for listener in self.listeners:
                listener(entry, request)
        return response

    def _apply(self, request: Request, entry: AuditEntry | None) -> Request | dict[str, Any]:
        """Server-side apply (:class:`Apply`): the request as the create or the merge patch it amounts to,
        or the object as it is when the apply changes nothing."""
        manager = request.params.get("fieldManager")
        if not manager:
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message="fieldManager is required for apply requests"
            )
        body = Apply.body(request)
        current = self._current(request)
        if current is None:
            data = copy.deepcopy(body)
            fields = Manager(manager, "Apply", _leaves(body), body["apiVersion"], time=_now())
            data.setdefault("metadata", {})["managedFields"] = [fields.render()]
            created_request = attrs.evolve(request, action=action.CREATE, data=data)
            # The API server authorizes an apply that creates as a create too: audited (and refused when a
            # test injected a fault) as one.
            created = self._audit(created_request) if entry is not None else None
            if created is not None:
                self._inject(created, created_request)
            _CURRENT.set(created_request)  # kmock's matching finds the request being served here
            return created_request
        new = Apply.merge(current, body, manager, force=request.params.get("force") == "true")
        if new == current:
            return current
        patch = _merge_patch(current, new)
        if isinstance(request.data, dict):  # kmock's handlers read the body as the merge patch
            request.data.clear()
            request.data.update(patch)
            return request
        patched = attrs.evolve(request, data=patch)  # the body was YAML
        _CURRENT.set(patched)
        return patched

    def _serve_log(self, request: Request) -> aiohttp.web.Response:
        """``GET .../pods/{name}/log``: the container's log as text, its last ``tailLines`` lines, at most
        ``limitBytes`` bytes of them (counted from the start of what is returned, as the kubelet does)."""
        pod = self._current(request)
        if pod is None:
            raise kmock.KubernetesObjectNotFoundError()
        containers = [c.get("name") for c in (pod.get("spec") or {}).get("containers") or ()]
        container = request.params.get("container") or (containers[0] if len(containers) == 1 else None)
        if container is None or container not in containers:
            what = (
                f'container "{container}" is not valid' if container else "a container name must be specified"
            )
            raise kmock.KubernetesError(
                status=400, reason="BadRequest", message=f"{what} for pod {request.name}"
            )
        key = (request.namespace or "", request.name or "", container)
        statuses = {c.get("name"): c for c in (pod.get("status") or {}).get("containerStatuses") or ()}
        state = (statuses.get(container) or {}).get("state") or {}
        if key not in self.logs and not ("running" in state or "terminated" in state):
            raise kmock.KubernetesError(
                status=400,
                reason="BadRequest",
                message=f'container "{container}" in pod "{request.name}" is waiting to start: ContainerCreating',
            )
        text = self.logs.get(key, "")
        tail = request.params.get("tailLines")
        if tail is not None:
            lines = text.splitlines(keepends=True)
            text = "".join(lines[-int(tail) :]) if int(tail) > 0 else ""
        limit = request.params.get("limitBytes")
        body = text.encode()[: int(limit)] if limit is not None else text.encode()
        return aiohttp.web.Response(body=body, content_type="text/plain", charset="utf-8")

    def _audit(self, request: Request) -> AuditEntry | None:
        if request.resource is None or request.action is None or not request.resource.plural:
            return None  # discovery (/api, /apis/<group>/<version>): non-resource URLs
        verb = VERBS[request.action]
        if request.action == action.DELETE and request.name is None:
            verb = "deletecollection"
        res = rbac_resource(request.resource.group or "", request.resource.plural or "", request.subresource)
        entry = AuditEntry(verb, res, request.namespace, request.headers.get("User-Agent", ""))
        self.audit.append(entry)
        if verb in ("list", "watch"):
            self.selectors[res] = request.params.get("labelSelector")
        return entry

    def _inject(self, entry: AuditEntry, request: Request) -> None:
        """Answer with the error a test injected for this request, if any is left."""
        fault = self._fault(entry, request)
        if fault is not None:
            raise kmock.KubernetesError(
                status=fault.status,
                reason="Invalid" if fault.status == 422 else "InjectedFault",
                message=fault.message
                or f"injected by the test: {entry.verb} {entry.resource} -> {fault.status}",
            )

    def _fault(self, entry: AuditEntry, request: Request) -> Fault | None:
        for fault in self.faults:
            if (
                fault.hits < fault.times
                and fault.verb == entry.verb
                and fault.resource == entry.resource
                and fault.namespace in (None, entry.namespace)
                and (fault.when is None or fault.when(_body(request)))
            ):
                fault.hits += 1
                return fault
        return None

    def _info(self, request: Request) -> Any:
        for res in self.resources:
            if res == request.resource:
                return self.resources[res]
        return None

    def _has_status(self, request: Request) -> bool:
        info = self._info(request)
        return info is not None and "status" in info.subresources

    def _current(self, request: Request) -> dict[str, Any] | None:
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects:
            return None
        obj = self.objects[key]
        return None if obj.deleted else copy.deepcopy(obj.raw)

    def _stamp_create(self, request: Request) -> None:
        data = request.data
        if not isinstance(data, dict):
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="expected a JSON object")
        meta = data.setdefault("metadata", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message="metadata.name or generateName is required"
                )
            meta["name"] = prefix + secrets.token_hex(3)[:5]
        if request.namespace:
            if meta.get("namespace") not in (None, request.namespace):
                raise kmock.KubernetesError(
                    status=400,
                    reason="BadRequest",
                    message="the namespace of the object does not match the URL",
                )
            meta["namespace"] = request.namespace
        meta["uid"] = str(uuid.uuid4())
        meta["resourceVersion"] = str(next(self._versions))
        meta["generation"] = 1
        meta["creationTimestamp"] = _now()
        meta.pop("deletionTimestamp", None)
        if self._has_status(request):
            data.pop("status", None)

    def _stamp_update(self, request: Request) -> None:
        current = self._current(request)
        if current is None:
            return  # kmock answers 404
        patch = request.data
        if isinstance(patch, dict):
            asked = (patch.get("metadata") or {}).get("resourceVersion")
            if asked is not None and asked != current["metadata"].get("resourceVersion"):
                raise kmock.KubernetesError(
                    status=409,
                    reason="Conflict",
                    message="the object has been modified; please apply your changes to the latest version",
                )
            if self._has_status(request):
                if request.subresource == "status":
                    for key in list(patch):
                        if key not in ("status", "metadata"):
                            del patch[key]
                    patch.pop("metadata", None)
                else:
                    patch.pop("status", None)
            new = kmock_dicts.patch_dict(current, patch)
            if not Apply.wanted(request):
                tracked = Apply.track(current, dict(new), _manager(request), request.subresource or "")
                if tracked is not None:
                    patch.setdefault("metadata", {})["managedFields"] = tracked
        elif isinstance(patch, list):
            new = kmock_dicts.patch_dict(current, patch)
        else:
            raise kmock.KubernetesError(status=400, reason="BadRequest", message="unsupported patch body")
        stamp: dict[str, Any] = {"resourceVersion": str(next(self._versions))}
        generation = current["metadata"].get("generation") or 1
        if _essence(new) != _essence(current):
            stamp["generation"] = generation + 1
        if isinstance(patch, dict):
            patch.setdefault("metadata", {}).update(stamp)
        else:
            patch.extend({"op": "add", "path": f"/metadata/{k}", "value": v} for k, v in stamp.items())


def declare_resources(server: ApiServer, *, pytorchjobs: bool = True, trainjobs: bool = False) -> None:
    """The built-in resources, the DistillationRun CRD's resource and (optionally) Kubeflow's PyTorchJob
    (v1) and Kubeflow Trainer v2's TrainJob with its cluster-scoped ClusterTrainingRuntime."""
    # kmock's load_bundled() reads this file with a deprecated importlib API (a warning, an error here).
    bundled = importlib.resources.files("kmock._internal").joinpath("resources.json.gz").read_bytes()
    server.resources.load_data(gzip.decompress(bundled))
    verbs = {"get", "list", "watch", "create", "patch", "update", "delete"}
    server.resources["distillery.dev/v1alpha1/distillationruns"] = kmock.ResourceInfo(
        kind="DistillationRun",
        singular="distillationrun",
        namespaced=True,
        verbs=verbs,
        shortnames={"drun"},
        subresources={"status"},
    )
    if pytorchjobs:
        server.resources["kubeflow.org/v1/pytorchjobs"] = kmock.ResourceInfo(
            kind="PyTorchJob", singular="pytorchjob", namespaced=True, verbs=verbs, subresources={"status"}
        )
    if trainjobs:
        server.resources["trainer.kubeflow.org/v1alpha1/trainjobs"] = kmock.ResourceInfo(
            kind="TrainJob", singular="trainjob", namespaced=True, verbs=verbs, subresources={"status"}
        )
        server.resources["trainer.kubeflow.org/v1alpha1/clustertrainingruntimes"] = kmock.ResourceInfo(
            kind="ClusterTrainingRuntime", singular="clustertrainingruntime", namespaced=False, verbs=verbs
        )
