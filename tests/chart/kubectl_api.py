"""The operator tests' API emulator, made to answer a real ``kubectl``.

kubectl reads discovery more strictly than kopf does, and asks for server-side printing: a ``get``
sends ``Accept: application/json;as=Table;g=meta.k8s.io;v=v1`` and prints the columns the server
sends, which for a custom resource are its CRD's ``additionalPrinterColumns``. Three fixes over
:class:`tests.support.kube.emulator.ApiServer`, each what a real API server does:

- ``/api/v1`` reports ``groupVersion: v1`` (kmock says ``/v1``, and kubectl then finds no core kinds),
  and a subresource (``distillationruns/status``) has no short names of its own (kubectl warns that
  ``drun`` is ambiguous otherwise);
- a list carries ``apiVersion`` and ``kind`` (``DistillationRunList``);
- a list asked for as a Table is a ``meta.k8s.io/v1`` Table whose columns are the CRD's printer
  columns, evaluated on each object (simple ``.a.b.c`` JSON paths, all the CRDs here use).
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from typing import Any

import attrs
from kmock._internal.rendering import Payload, Request

from tests.support.kube.emulator import ApiServer

TABLE_ACCEPT = "as=Table"


def json_path(obj: Any, path: str) -> Any:
    """``.status.results.qualityRetention`` of ``obj``, or None where a step is missing."""
    for part in path.strip().lstrip(".").split("."):
        if not isinstance(obj, Mapping) or part not in obj:
            return None
        obj = obj[part]
    return obj


def age(timestamp: str | None, now: datetime.datetime | None = None) -> str:
    """kubectl's short age (``5s``, ``3m``, ``2h``, ``4d``) of an RFC 3339 timestamp."""
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.strptime(timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.UTC)
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


@attrs.define(kw_only=True)
class KubectlApiServer(ApiServer):
    # kind -> the CRD's additionalPrinterColumns (of its served version)
    printer_columns: dict[str, list[dict[str, Any]]] = attrs.field(factory=dict)

    def add_printer_columns(self, crd: Mapping[str, Any]) -> None:
        kind = crd["spec"]["names"]["kind"]
        version = next(v for v in crd["spec"]["versions"] if v.get("served", True))
        self.printer_columns[kind] = list(version.get("additionalPrinterColumns") or ())

    async def _serve_version(self, request: Request) -> Payload:
        payload = await super()._serve_version(request)
        if isinstance(payload, dict):
            if payload.get("groupVersion") == "/v1":
                payload["groupVersion"] = "v1"
            for entry in payload.get("resources") or ():
                if "/" in entry.get("name", ""):
                    entry["shortNames"], entry["categories"] = [], []
        return payload

    async def _serve_list(self, request: Request) -> Payload:
        payload = await super()._serve_list(request)
        if not isinstance(payload, dict) or request.resource is None:
            return payload
        info = self._info(request)
        kind = info.kind if info is not None and info.kind else "Object"
        group, version = request.resource.group or "", request.resource.version or "v1"
        api_version = f"{group}/{version}" if group else version
        for item in payload.get("items") or ():
            item.setdefault("apiVersion", api_version)
            item.setdefault("kind", kind)
        if TABLE_ACCEPT in (request.headers.get("Accept") or ""):
            return self._table(kind, payload)
        return {"apiVersion": api_version, "kind": f"{kind}List", **payload}

    def _table(self, kind: str, payload: dict[str, Any]) -> dict[str, Any]:
        columns = self.printer_columns.get(kind, [])
        definitions = [{"name": "Name", "type": "string", "format": "name", "description": "Name"}]
        definitions += [
            {
                "name": c["name"],
                "type": c["type"],
                "format": c.get("format", ""),
                "description": c.get("description", ""),
                "priority": c.get("priority", 0),
            }
            for c in columns
        ]
        rows = []
        for item in payload.get("items") or ():
            cells: list[Any] = [item["metadata"]["name"]]
            for c in columns:
                value = json_path(item, c["jsonPath"])
                cells.append(age(value) if c["type"] == "date" else value)
            partial = {"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata"}
            rows.append({"cells": cells, "object": {**partial, "metadata": item["metadata"]}})
        return {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "Table",
            "metadata": {"resourceVersion": payload.get("metadata", {}).get("resourceVersion", "")},
            "columnDefinitions": definitions,
            "rows": rows,
        }
