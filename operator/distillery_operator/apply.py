"""The one writer: every create, patch and delete of a child, and every status write, goes through here.

- ``ensure``: a child missing from the index is created; a 409 means it exists (a previous operator
  process made it, or the index lags): read it, check it is this run's, and patch only what differs. A
  child that is known and carries the desired hash is left alone, so a steady run costs no API call.
  A non-exclusive child (the run's PersistentVolumeClaim) is only ever created: one found under its
  name is used as it is, whoever made it.
- ``remove``: delete with background propagation; a 404 is success.
- ``write_status``: a JSON merge patch of what changed in ``status``, nothing when nothing did.

API errors leave as ``kopf.TemporaryError``/``PermanentError`` (:func:`.errors.translate`).
"""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException

from .errors import translate
from .kube import Api
from .naming import HASH_ANNOTATION
from .observe import Child
from .planner import Desired

MANAGED_PARTS = ("spec", "data")


def merge_patch(old: Any, new: Any) -> Any:
    """The RFC 7386 merge patch that turns ``old`` into ``new`` (``{}`` when they are equal)."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    out: dict[str, Any] = {}
    for key, value in new.items():
        if key not in old:
            out[key] = value
        elif isinstance(value, dict) and isinstance(old[key], dict):
            sub = merge_patch(old[key], value)
            if sub != {}:
                out[key] = sub
        elif old[key] != value:
            out[key] = value
    for key in old:
        if key not in new:
            out[key] = None
    return out


def differing(existing: Any, desired: Any) -> Any:
    """The parts of ``desired`` that ``existing`` lacks or has otherwise; keys only ``existing`` has
    (defaults the API server filled in, other controllers' fields) are left alone."""
    if not isinstance(existing, dict) or not isinstance(desired, dict):
        return desired
    out: dict[str, Any] = {}
    for key, value in desired.items():
        if key not in existing:
            out[key] = value
        elif isinstance(value, dict) and isinstance(existing[key], dict):
            sub = differing(existing[key], value)
            if sub != {}:
                out[key] = sub
        elif existing[key] != value:
            out[key] = value
    return out


def _hash(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)


def _what(verb: str, kind: str, namespace: str, name: str) -> str:
    return f"{verb} {kind} {namespace}/{name}"


async def ensure(api: Api, run_uid: str, desired: Desired, observed: Child | None) -> dict[str, Any] | None:
    """Make the child exist as desired; returns the object as the API server answered a write or a read
    (None when the index already showed it as desired and nothing was sent)."""
    manifest = desired.manifest
    kind, name = desired.kind, desired.name
    namespace = manifest["metadata"]["namespace"]
    if observed is not None and not observed.deleting:
        if not desired.mutable or observed.hash == _hash(manifest):
            return None
        existing = await _call(api.get(kind, namespace, name), _what("get", kind, namespace, name))
    else:
        try:
            return await api.create(namespace, manifest)
        except ApiException as exc:
            if exc.status != 409:
                raise translate(exc, _what("create", kind, namespace, name)) from exc
        except Exception as exc:
            raise translate(exc, _what("create", kind, namespace, name)) from exc
        existing = await _call(api.get(kind, namespace, name), _what("get", kind, namespace, name))
    owners = [ref.get("uid") for ref in (existing.get("metadata") or {}).get("ownerReferences") or ()]
    if not desired.exclusive:
        return existing  # a claim: used as it is, whoever made it, and never patched
    if run_uid not in owners:
        raise kopf.TemporaryError(
            f"{kind} {namespace}/{name} exists and does not belong to this run: delete it, or rename the run",
            delay=30,
        )
    if not desired.mutable or _hash(existing) == _hash(manifest):
        return existing
    patch: dict[str, Any] = {}
    meta = differing(
        existing.get("metadata") or {}, {k: manifest["metadata"].get(k) for k in ("labels", "annotations")}
    )
    if meta:
        patch["metadata"] = meta
    for part in MANAGED_PARTS:
        if part in manifest:
            diff = differing(existing.get(part) or {}, manifest[part])
            if diff != {}:
                patch[part] = diff
    if not patch:
        return existing
    return await _call(api.patch(kind, namespace, name, patch), _what("patch", kind, namespace, name))


async def remove(api: Api, kind: str, namespace: str, name: str) -> bool:
    try:
        await api.delete(kind, namespace, name)
        return True
    except ApiException as exc:
        if exc.status == 404:
            return False
        raise translate(exc, _what("delete", kind, namespace, name)) from exc
    except Exception as exc:
        raise translate(exc, _what("delete", kind, namespace, name)) from exc


async def write_status(api: Api, namespace: str, name: str, old: dict[str, Any], new: dict[str, Any]) -> bool:
    patch = merge_patch(old, new)
    if not patch:
        return False
    await _call(
        api.patch("DistillationRun", namespace, name, {"status": patch}, sub="status"),
        _what("patch status of", "DistillationRun", namespace, name),
    )
    return True


async def _call(coro: Any, what: str) -> dict[str, Any]:
    try:
        result: dict[str, Any] = await coro
        return result
    except Exception as exc:
        raise translate(exc, what) from exc
