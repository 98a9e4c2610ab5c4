"""Storage: the claim a run asks the operator to create (``storage.pvc.create``), made and waited on
before the first stage starts. While the run waits it is ``Pending`` with reason ``WaitingForStorage``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distillery_trainer.api.spec import DistillationRunSpec

from ..builders.storage import persistent_volume_claim
from ..naming import CLASS_NOT_FOUND, IMMEDIATE
from ..observe import Observed
from .model import Desired

if TYPE_CHECKING:
    from .walk import Walk


def claim(w: Walk) -> str | None:
    """Before the collection (the first workload) starts: the claim the run asked the operator to
    create exists and can be mounted. Returns why the run waits, or None.

    A missing claim is created (the plan's first child) and never touched again; one of that name
    that the operator did not create is used as is. Pending holds the run, except when its
    StorageClass binds a volume only for the first pod that uses it (WaitForFirstConsumer: the
    collection's pods are what binds it) or the class could not be read (the pods then wait as any
    pod waits for its volume). A claim the run names without ``create`` is the user's: never waited on.
    """
    storage = w.spec.storage
    pvc = storage.pvc if storage is not None else None
    if pvc is None or pvc.create is None:
        return None
    name = pvc.claim_name
    found = w.observed.child("PersistentVolumeClaim", name)
    if found is None:
        manifest = persistent_volume_claim(w.run, w.settings)
        assert manifest is not None
        w.out.apply.insert(0, Desired(manifest, mutable=False, exclusive=False))
        return f"creating PersistentVolumeClaim {name}"
    if found.deleting:
        return (
            f"PersistentVolumeClaim {name} is being deleted (pods may still use it); "
            "the operator creates it again once it is gone"
        )
    phase = found.status.get("phase") or "Pending"
    if phase == "Bound":
        return None
    if phase == "Lost":
        return (
            f"PersistentVolumeClaim {name} is Lost (its PersistentVolume is gone): restore the volume, "
            "or delete the claim and the operator creates a new one"
        )
    klass = found.storage_class
    mode = w.caps.binding_modes.get(klass) if klass else IMMEDIATE
    if mode == CLASS_NOT_FOUND:
        return (
            f"PersistentVolumeClaim {name} is Pending: its StorageClass {klass} does not exist; create "
            "that class, or delete the run and the claim and create the run again naming a class that "
            "exists (storage.pvc.create.storageClassName)"
        )
    if mode != IMMEDIATE:
        return None
    via = f"StorageClass {klass}" if klass else "no StorageClass: a matching PersistentVolume"
    return (
        f"waiting for PersistentVolumeClaim {name} to be bound (Pending; {via}); "
        f"`kubectl describe pvc {name} -n {w.view.namespace}` says why it is not"
    )


def claim_modes(spec: DistillationRunSpec, observed: Observed) -> tuple[str, ...]:
    """The access modes of the run's claim: the claim's own (its spec, as the claim index saw it), else
    those the operator creates it with; () when the run names a claim the operator cannot see."""
    pvc = spec.storage.pvc if spec.storage is not None else None
    if pvc is None:
        return ()
    found = observed.child("PersistentVolumeClaim", pvc.claim_name)
    if found is not None and found.access_modes:
        return found.access_modes
    if pvc.create is not None:
        return tuple(pvc.access_modes(spec.training.resources.nodes))
    return ()
