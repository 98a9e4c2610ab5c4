"""Which fields of a child the operator's server-side apply owns, as a digest of their shape: what tells
the one writer (:mod:`.apply`) that someone edited a child by hand (the API server moves a field another
writer changes to that writer's ``managedFields`` entry) or removed one of its fields.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from .kube import FIELD_MANAGER

# Set by the API server from the URL, or never tracked as a manager's field.
IDENTITY = ("apiVersion", "kind")
IDENTITY_META = ("name", "namespace")


def applied_shape(body: Mapping[str, Any], manager: str = FIELD_MANAGER) -> str | None:
    """:func:`shape_digest` of the part of ``body`` that ``manager``'s server-side apply owns (its
    ``Apply`` entry in ``metadata.managedFields``); None when it has no such entry. Equal to the digest
    of the manifest it applied until another writer takes one of those fields over (the API server
    moves a field a writer changes to that writer's entry) or removes it."""
    for entry in (body.get("metadata") or {}).get("managedFields") or ():
        if (
            entry.get("manager") == manager
            and entry.get("operation") == "Apply"
            and not entry.get("subresource")
        ):
            return shape_digest(owned_part(body, entry.get("fieldsV1") or {}))
    return None


def owned_part(value: Any, fields: Mapping[str, Any]) -> Any:
    """The part of ``value`` a ``FieldsV1`` set names: ``f:<key>`` for a map's key, ``k:{...}`` (an
    associative list's item by its keys), ``v:<json>`` (a set's item) and ``i:<n>`` (by index); a set
    with no members (``{}``, or ``{".": {}}``) owns the whole value."""
    members = {k: v for k, v in fields.items() if k != "."}
    if not members:
        return value
    if isinstance(value, Mapping):
        return {
            k[2:]: owned_part(value[k[2:]], sub)
            for k, sub in members.items()
            if k.startswith("f:") and k[2:] in value
        }
    if isinstance(value, list):
        out = []
        for index, item in enumerate(value):
            sub = next((s for k, s in members.items() if _names_item(k, index, item)), None)
            if sub is not None:
                out.append(owned_part(item, sub))
        return out
    return value


def _names_item(key: str, index: int, item: Any) -> bool:
    kind, _, raw = key.partition(":")
    try:
        if kind == "i":
            return raw == str(index)
        if kind == "v":
            return bool(json.loads(raw) == item)
        if kind == "k":
            keys = json.loads(raw)
            return isinstance(item, Mapping) and all(item.get(f) == v for f, v in keys.items())
    except ValueError:
        return False
    return False


def shape_digest(obj: Mapping[str, Any]) -> str:
    """A digest of the shape of an object (its keys and list lengths, not its values), identity fields
    left out. Values are the hash annotation's business: the API server normalizes some (quantities),
    which would read as drift forever; who owns which field is what a hand edit changes."""
    top = {k: v for k, v in obj.items() if k not in IDENTITY}
    meta = {k: v for k, v in (top.get("metadata") or {}).items() if k not in IDENTITY_META}
    if meta:
        top["metadata"] = meta
    else:
        top.pop("metadata", None)
    text = json.dumps(_shape(top), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _shape(value: Any) -> Any:
    """Keys and list lengths; a null or an empty list is no field at all (the API server drops both)."""
    if isinstance(value, Mapping):
        return {k: _shape(v) for k, v in value.items() if v is not None and v != []}
    if isinstance(value, list):
        return [_shape(v) for v in value]
    return 0
