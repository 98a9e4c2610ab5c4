"""The run's PersistentVolumeClaim, when its spec asks the operator to create one (``storage.pvc.create``).

- Name: ``storage.pvc.claimName``, as given: the same name whether the operator or someone else made it.
- Access modes: the spec's, else ReadWriteMany when training spans several nodes, else ReadWriteOnce.
- StorageClass: the spec's, else the operator's default (``Settings.storage_class``, the chart's
  ``workloads.storageClassName``), else none named, so the cluster's default class applies.
- Lifetime: with ``deleteWithRun`` the run owns the claim (an owner reference: the garbage collector
  deletes it, and the artifacts on it, with the run). Without it, the default, the claim carries the
  run's labels but no owner: deleting the run keeps the data, and a run created again under the same
  name mounts the same claim and resumes from what its stages left there.

The claim is created once and never patched: most of a claim's spec is immutable, and the API server
accepts a larger ``resources.requests.storage`` only where the StorageClass allows expansion, so the
spec's ``create`` section is immutable too (a CEL rule) and a resize is the claim owner's ``kubectl`` edit.
"""

from __future__ import annotations

from typing import Any

from ..settings import Settings
from .common import DATA, Run, finish, labels, owner_reference


def persistent_volume_claim(run: Run, settings: Settings) -> dict[str, Any] | None:
    """The claim to create, or None when the run brings its own (or uses an object store)."""
    storage = run.spec.storage
    pvc = storage.pvc if storage is not None else None
    if pvc is None or pvc.create is None:
        return None
    create = pvc.create
    spec: dict[str, Any] = {
        "accessModes": pvc.access_modes(run.spec.training.resources.nodes),
        "resources": {"requests": {"storage": create.size}},
        "volumeMode": "Filesystem",
    }
    storage_class = create.storage_class_name or settings.storage_class
    if storage_class:
        spec["storageClassName"] = storage_class
    meta: dict[str, Any] = {
        "name": pvc.claim_name,
        "namespace": run.namespace,
        "labels": labels(run, DATA),
    }
    if create.delete_with_run:
        meta["ownerReferences"] = [owner_reference(run)]
    return finish({"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": meta, "spec": spec})
