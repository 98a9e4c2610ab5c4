"""The one writer: every create, apply and delete of a child, and every status write, goes through here.

- ``ensure``: mutable children (ConfigMap, Service, Deployment) are written with server-side apply
  (:meth:`.kube.Api.apply`: the whole desired manifest, field manager ``distillery``, ``force``), which
  also creates them: the API server then removes a field the operator set before and the manifest no
  longer has (``serving.gpus`` 1 -> 0 drops the GPU limit), keeps what other writers set, and takes back
  a field someone else changed. A child is (re)applied when the index shows it differing from the
  desired one, by this rule: its hash annotation differs from the manifest's, *or* the fields the
  operator's apply owns (``metadata.managedFields``) are not the manifest's fields
  (:func:`.owned.shape_digest`) -- the API server moves a field a hand edit changed to the editor's
  manager, so a hand edit of an owned field reads as drift, while a steady child costs no API call.
  Values are compared through the hash only (the server normalizes some, which would read as drift).
  A child missing from the index is read first: force-applying over an object someone else made would
  take it over. One that exists must belong to the run (``exclusive``), else the reconcile fails.
- Immutable children (Jobs, PyTorchJobs) and the non-exclusive claim are only ever created (``POST``):
  a 409 means it exists (a previous operator process made it, or the index lags): read it and check it is
  this run's; a claim found under its name is used as it is, whoever made it.
- ``remove``: delete with background propagation; a 404 is success.
- ``write_status``: a JSON merge patch of what changed in ``status``, nothing when nothing did.

API errors leave as ``kopf.TemporaryError``/``PermanentError`` (:func:`.errors.translate`).
"""

from __future__ import annotations

from typing import Any

import kopf

from .errors import translate
from .kube import Api, ApiError
from .naming import HASH_ANNOTATION
from .observe import Child, child_view
from .owned import shape_digest
from .planner import Desired


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


def _hash(obj: dict[str, Any]) -> str | None:
    return ((obj.get("metadata") or {}).get("annotations") or {}).get(HASH_ANNOTATION)


def in_line(child: Child, manifest: dict[str, Any]) -> bool:
    """The child as applied from ``manifest``: the same hash, and the operator owns exactly its fields."""
    return child.hash == _hash(manifest) and child.owned == shape_digest(manifest)


def _what(verb: str, kind: str, namespace: str, name: str) -> str:
    return f"{verb} {kind} {namespace}/{name}"


async def ensure(api: Api, run_uid: str, desired: Desired, observed: Child | None) -> dict[str, Any] | None:
    """Make the child exist as desired; returns the object as the API server answered a write or a read
    (None when the index already showed it as desired and nothing was sent)."""
    manifest = desired.manifest
    kind, name = desired.kind, desired.name
    namespace = manifest["metadata"]["namespace"]
    if observed is not None and not observed.deleting:
        if not desired.mutable or in_line(observed, manifest):
            return None
        _check_owner(desired, run_uid, observed.owners, namespace)
        return await _apply(api, desired, namespace)
    if not desired.mutable:
        try:
            return await api.create(namespace, manifest)
        except ApiError as exc:
            if exc.status != 409:
                raise translate(exc, _what("create", kind, namespace, name)) from exc
        except Exception as exc:
            raise translate(exc, _what("create", kind, namespace, name)) from exc
        existing = await _call(api.get(kind, namespace, name), _what("get", kind, namespace, name))
        if desired.exclusive:  # else a claim: used as it is, whoever made it, and never changed
            _check_owner(desired, run_uid, _owners(existing), namespace)
        return existing
    try:
        found: dict[str, Any] | None = await api.get(kind, namespace, name)
    except ApiError as exc:
        if exc.status != 404:
            raise translate(exc, _what("get", kind, namespace, name)) from exc
        found = None
    except Exception as exc:
        raise translate(exc, _what("get", kind, namespace, name)) from exc
    if found is not None:
        _check_owner(desired, run_uid, _owners(found), namespace)
        if in_line(child_view(found), manifest):
            return found
    return await _apply(api, desired, namespace)


def _owners(obj: dict[str, Any]) -> tuple[str, ...]:
    return tuple(ref.get("uid", "") for ref in (obj.get("metadata") or {}).get("ownerReferences") or ())


def _check_owner(desired: Desired, run_uid: str, owners: tuple[str, ...], namespace: str) -> None:
    if run_uid not in owners:
        raise kopf.TemporaryError(
            f"{desired.kind} {namespace}/{desired.name} exists and does not belong to this run: delete it, "
            "or rename the run",
            delay=30,
        )


async def _apply(api: Api, desired: Desired, namespace: str) -> dict[str, Any]:
    return await _call(
        api.apply(namespace, desired.manifest), _what("apply", desired.kind, namespace, desired.name)
    )


async def remove(api: Api, kind: str, namespace: str, name: str) -> bool:
    try:
        await api.delete(kind, namespace, name)
        return True
    except ApiError as exc:
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
