"""The run's PersistentVolumeClaim (``storage.pvc.create``): the builder, the planner's hold before the
collection, the writer's create-only handling, and the reconciler's StorageClass lookup."""

from __future__ import annotations

from typing import Any

import kubernetes_validate
import pytest
from distillery_operator import apply
from distillery_operator.builders.common import Run
from distillery_operator.builders.storage import persistent_volume_claim
from distillery_operator.naming import CLASS_NOT_FOUND, IMMEDIATE, WAIT_FOR_FIRST_CONSUMER, claim_to_create
from distillery_operator.observe import Child, RunView, child_view
from distillery_operator.planner import Capabilities, Desired
from distillery_operator.reconciler import CHILD_INDICES, CLAIM_INDEX, POD_INDEX, RUN_INDEX, Reconciler
from distillery_operator.settings import Settings
from distillery_trainer.api.spec import DistillationRunSpec

from tests.operator.unit.test_planner import UID, World, conditions, kinds, reasons, spec_of
from tests.operator.unit.test_writer import FakeApi, api_error
from tests.support.builders import make_run

CLAIM = "distill-data"
PVC = "PersistentVolumeClaim"
WORKLOADS = {"Job", "PyTorchJob", "Deployment"}


def create(**create: Any) -> dict[str, Any]:
    return {"storage": {"pvc": {"claimName": CLAIM, "create": {"size": "200Gi", **create}}}}


def run(patch: dict[str, Any] | None = None, nodes: int = 1, namespace: str = "team-a") -> Run:
    doc = make_run("r", namespace).spec({**create(), "training": {"resources": {"nodes": nodes}}})
    if patch:
        doc.spec(patch)
    return Run("r", namespace, "uid-1", DistillationRunSpec.model_validate(doc.obj()["spec"]))


# ---------------------------------------------------------------------------------------------- builder


VARIANTS = {
    "defaults": run(),
    "multi-node": run(nodes=2),
    "class-and-modes": run(create(storageClassName="fast-rwx", accessModes=["ReadWriteMany"])),
    "owned": run(create(deleteWithRun=True)),
}


@pytest.mark.parametrize("version", ("1.30", "1.37"))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_the_claim_is_valid_kubernetes(variant: str, version: str) -> None:
    manifest = persistent_volume_claim(VARIANTS[variant], Settings(storage_class="standard"))
    assert manifest is not None
    kubernetes_validate.validate(manifest, version, strict=True)


def test_the_claim_is_named_sized_and_labelled_as_the_spec_says() -> None:
    claim = persistent_volume_claim(run(), Settings())
    assert claim is not None
    meta = claim["metadata"]
    assert (meta["name"], meta["namespace"]) == (CLAIM, "team-a")  # the spec's name, not "<run>-..."
    assert meta["labels"]["distillery.dev/run"] == "r" and meta["labels"]["distillery.dev/stage"] == "storage"
    assert meta["labels"]["app.kubernetes.io/managed-by"] == "distillery-operator"
    assert claim["spec"]["resources"] == {"requests": {"storage": "200Gi"}}
    assert claim["spec"]["volumeMode"] == "Filesystem"


def test_access_modes_follow_the_training_nodes_unless_the_spec_says() -> None:
    modes = {k: persistent_volume_claim(v, Settings())["spec"]["accessModes"] for k, v in VARIANTS.items()}  # type: ignore[index]
    assert modes["defaults"] == ["ReadWriteOnce"]  # one training node: any block storage will do
    assert modes["multi-node"] == ["ReadWriteMany"]  # every training node mounts it
    assert modes["class-and-modes"] == ["ReadWriteMany"]
    one_node_rwx = run(create(accessModes=["ReadWriteMany"]))
    assert persistent_volume_claim(one_node_rwx, Settings())["spec"]["accessModes"] == ["ReadWriteMany"]  # type: ignore[index]


def test_the_storage_class_is_the_specs_else_the_operators_else_the_clusters_default() -> None:
    def klass(r: Run, settings: Settings) -> str | None:
        claim = persistent_volume_claim(r, settings)
        assert claim is not None
        return claim["spec"].get("storageClassName")

    assert klass(VARIANTS["class-and-modes"], Settings(storage_class="standard")) == "fast-rwx"
    assert klass(run(), Settings(storage_class="standard")) == "standard"
    assert klass(run(), Settings()) is None  # unnamed: the DefaultStorageClass admission plugin picks


def test_only_delete_with_run_makes_the_run_own_its_claim() -> None:
    kept = persistent_volume_claim(run(), Settings())
    owned = persistent_volume_claim(VARIANTS["owned"], Settings())
    assert kept is not None and owned is not None
    assert "ownerReferences" not in kept["metadata"]  # deleting the run keeps the data
    assert [o["uid"] for o in owned["metadata"]["ownerReferences"]] == ["uid-1"]


def test_no_claim_is_built_for_a_claim_of_ones_own() -> None:
    own = make_run("r", "ns").storage(CLAIM).obj()["spec"]
    assert (
        persistent_volume_claim(Run("r", "ns", "u", DistillationRunSpec.model_validate(own)), Settings())
        is None
    )
    assert claim_to_create(own) is None
    assert claim_to_create(make_run().spec(create()).obj()["spec"]) == CLAIM


# ---------------------------------------------------------------------------------------------- planner


def world(**more: Any) -> World:
    return World(spec_of(**create(**more)))


def claim(w: World) -> Child:
    return w.children[(PVC, CLAIM)]


def set_claim(w: World, phase: str | None = None, storage_class: str | None = None, **fields: Any) -> None:
    old = w.children.get((PVC, CLAIM)) or Child(kind=PVC, name=CLAIM, uid="someone-elses")
    status = {"phase": phase} if phase else {}
    w.children[(PVC, CLAIM)] = Child(
        **{**old.__dict__, "status": status, "storage_class": storage_class, **fields}
    )


def workloads(out: Any) -> list[tuple[str, str]]:
    return [k for k in kinds(out) if k[0] in WORKLOADS]


def test_the_claim_comes_first_and_no_workload_before_it_is_bound() -> None:
    w = world()
    out = w.plan()
    assert kinds(out)[0] == (PVC, CLAIM) and out.apply[0].exclusive is False and not out.apply[0].mutable
    assert workloads(out) == []  # the ConfigMap may come; no pod before the volume
    st = w.status
    assert st["phase"] == "Pending" and st["collection"]["state"] == "Pending"
    assert conditions(st)["Progressing"] == ("True", "WaitingForStorage")
    assert f"creating PersistentVolumeClaim {CLAIM}" in st["message"]
    assert reasons(out) == ["WaitingForStorage"]


def test_a_pending_claim_holds_the_run_in_pending_naming_the_claim() -> None:
    w = world()
    w.plan()
    assert claim(w).status == {}  # created; no status yet: Pending
    for _ in range(3):
        out = w.plan(advance=600)
        assert (PVC, CLAIM) not in kinds(out)  # created once, never again while it exists
        assert workloads(out) == [] and out.delete == []
    st = w.status
    assert st["phase"] == "Pending"  # waiting, not failed
    progressing = next(c for c in st["conditions"] if c["type"] == "Progressing")
    assert progressing["reason"] == "WaitingForStorage"
    assert f"PersistentVolumeClaim {CLAIM} to be bound" in progressing["message"]
    assert f"kubectl describe pvc {CLAIM} -n ns" in progressing["message"]
    assert "Failed" not in conditions(st) and conditions(st)["Degraded"][0] == "False"
    assert w.plan().events == []  # the WaitingForStorage event was posted once, when the wait began


def test_the_run_proceeds_once_the_claim_is_bound_and_never_touches_it_again() -> None:
    w = world()
    w.plan()
    set_claim(w, "Bound")
    out = w.plan()
    assert ("Job", "r-collect") in kinds(out) and (PVC, CLAIM) not in kinds(out)
    assert w.status["phase"] == "Collecting" and reasons(out) == ["Collecting"]
    # Once the workloads run, the claim is not looked at again: not recreated when it disappears.
    del w.children[(PVC, CLAIM)]
    out = w.plan()
    assert (PVC, CLAIM) not in kinds(out) and w.status["phase"] == "Collecting"


def test_a_claim_made_by_someone_else_is_used_as_is() -> None:
    w = world()
    set_claim(w, "Bound", storage_class="theirs")  # no labels, no owner: not the operator's
    out = w.plan()
    assert (PVC, CLAIM) not in kinds(out)  # neither recreated nor patched
    assert ("Job", "r-collect") in kinds(out)


def test_a_claim_of_ones_own_is_never_waited_on() -> None:
    w = World()  # storage.pvc.claimName without create: the user's claim, mounted as is
    out = w.plan()
    assert (PVC, CLAIM) not in kinds(out) and ("Job", "r-collect") in kinds(out)


@pytest.mark.parametrize(
    ("mode", "held"),
    [
        (IMMEDIATE, True),
        (WAIT_FOR_FIRST_CONSUMER, False),  # the collection's pods are what binds it
        (None, False),  # the class could not be read: the pods wait for their volume themselves
    ],
)
def test_binding_on_first_consumer_does_not_hold_the_run(mode: str | None, held: bool) -> None:
    w = world()
    w.caps = Capabilities(binding_modes={"standard": mode} if mode else {})
    w.plan()
    set_claim(w, storage_class="standard")
    out = w.plan()
    assert (workloads(out) == []) is held
    assert w.status["phase"] == ("Pending" if held else "Collecting")


def test_a_claim_of_a_missing_class_or_a_lost_one_holds_with_the_fix() -> None:
    w = world()
    w.caps = Capabilities(binding_modes={"nope": CLASS_NOT_FOUND})
    w.plan()
    set_claim(w, storage_class="nope")
    w.plan()
    assert w.status["phase"] == "Pending" and "StorageClass nope does not exist" in w.status["message"]
    set_claim(w, "Lost", storage_class="nope")
    out = w.plan()
    assert workloads(out) == [] and "is Lost" in w.status["message"] and w.status["phase"] == "Pending"


def test_a_claim_being_deleted_is_created_again_once_gone() -> None:
    w = world()
    w.plan()
    set_claim(w, "Bound", deleting=True)
    out = w.plan()
    assert workloads(out) == [] and (PVC, CLAIM) not in kinds(out) and "being deleted" in w.status["message"]
    del w.children[(PVC, CLAIM)]
    assert kinds(w.plan())[0] == (PVC, CLAIM)


def test_a_new_claim_name_restarts_from_the_collection_and_waits_for_the_new_claim() -> None:
    w = world()
    w.plan()
    set_claim(w, "Bound")
    w.plan()
    w.collect()
    w.plan()
    assert w.status["phase"] == "Training"
    w.spec = {**w.spec, "storage": {"pvc": {"claimName": "bigger", "create": {"size": "1Ti"}}}}
    w.generation = 2
    w.plan()  # the collection's inputs changed: its Job goes
    out = w.plan()
    assert kinds(out)[0] == (PVC, "bigger") and workloads(out) == []
    assert w.status["phase"] == "Pending"


# ---------------------------------------------------------------------------------------------- writer


def claim_manifest(owner: str | None = None) -> dict[str, Any]:
    manifest = persistent_volume_claim(run(), Settings())
    assert manifest is not None
    if owner:
        manifest["metadata"]["ownerReferences"] = [{"uid": owner}]
    return manifest


async def test_the_writer_creates_a_claim_once_and_uses_an_existing_one_as_it_is() -> None:
    api = FakeApi()
    desired = Desired(claim_manifest(), mutable=False, exclusive=False)
    assert await apply.ensure(api, UID, desired, None) is not None  # type: ignore[arg-type]
    assert api.calls == [("create", PVC, CLAIM)]
    # Someone else's claim of that name (no owner, other size): read back and used, never patched.
    api.calls.clear()
    theirs = claim_manifest(owner="another-run")
    theirs["spec"]["resources"]["requests"]["storage"] = "1Ti"
    api.objects[(PVC, CLAIM)] = theirs
    found = await apply.ensure(api, UID, desired, None)  # type: ignore[arg-type]
    assert api.calls == [("create", PVC, CLAIM), ("get", PVC, CLAIM)]
    assert found is not None and found["spec"]["resources"]["requests"]["storage"] == "1Ti"
    # Known to the index: nothing is sent at all.
    api.calls.clear()
    assert await apply.ensure(api, UID, desired, child_view(theirs)) is None  # type: ignore[arg-type]
    assert api.calls == []


# ---------------------------------------------------------------------------------------------- reconciler


class ClassApi(FakeApi):
    def __init__(self, modes: dict[str, str | None]) -> None:
        super().__init__()
        self.modes = modes
        self.lookups: list[str] = []

    async def binding_mode(self, storage_class: str, ttl: float) -> str | None:
        self.lookups.append(storage_class)
        return self.modes.get(storage_class)


def reconciler(api: FakeApi, spec: dict[str, Any], claims: list[Child]) -> Reconciler:
    rec = Reconciler(api, Settings(), post_event=lambda *a, **k: None)  # type: ignore[arg-type]
    indices: dict[str, Any] = {name: {} for name in CHILD_INDICES}
    indices[RUN_INDEX] = {("ns", "r"): [RunView.of("r", "ns", UID, 1, spec, {})]}
    indices[POD_INDEX] = {}
    indices[CLAIM_INDEX] = {("ns", c.name): [c] for c in claims}
    rec.bind(indices)
    return rec


async def test_the_reconciler_reads_the_class_of_a_pending_claim_only() -> None:
    pending = Child(kind=PVC, name=CLAIM, uid="c", storage_class="standard")
    api = ClassApi({"standard": WAIT_FOR_FIRST_CONSUMER})
    await reconciler(api, spec_of(**create()), [pending]).reconcile(("ns", "r"))
    assert api.lookups == ["standard"]
    assert ("create", "Job", "r-collect") in api.calls  # binds on first consumer: the pods may start
    assert not any(c[1] == PVC for c in api.calls)

    bound = Child(kind=PVC, name=CLAIM, uid="c", storage_class="standard", status={"phase": "Bound"})
    api = ClassApi({})
    await reconciler(api, spec_of(**create()), [bound]).reconcile(("ns", "r"))
    assert api.lookups == [] and ("create", "Job", "r-collect") in api.calls

    api = ClassApi({"standard": IMMEDIATE})
    await reconciler(api, spec_of(**create()), [pending]).reconcile(("ns", "r"))
    assert api.lookups == ["standard"] and not any(c[1] == "Job" for c in api.calls)


async def test_the_class_lookup_is_cached_and_a_forbidden_read_does_not_block() -> None:
    from distillery_operator.kube import Api

    class Fixed(Api):
        def __init__(self, answers: list[Any]) -> None:
            super().__init__(lambda: None)
            self.answers = answers
            self.asked = 0

        async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
            self.asked += 1
            answer = self.answers.pop(0)
            if isinstance(answer, BaseException):
                raise answer
            return dict(answer)

    api = Fixed([{"volumeBindingMode": "WaitForFirstConsumer"}])
    assert await api.binding_mode("gp3", ttl=300) == WAIT_FOR_FIRST_CONSUMER
    assert await api.binding_mode("gp3", ttl=300) == WAIT_FOR_FIRST_CONSUMER and api.asked == 1
    api = Fixed([{}])  # volumeBindingMode unset: the API server's default
    assert await api.binding_mode("old", ttl=300) == IMMEDIATE
    api = Fixed([api_error(404), {"volumeBindingMode": "Immediate"}])
    assert await api.binding_mode("later", ttl=0) == CLASS_NOT_FOUND
    assert await api.binding_mode("later", ttl=0) == IMMEDIATE  # asked again: it may exist now
    api = Fixed([api_error(403)])
    assert await api.binding_mode("secret", ttl=300) is None
    api = Fixed([api_error(500)])
    with pytest.raises(Exception, match="Reason"):
        await api.binding_mode("flaky", ttl=300)


# ---------------------------------------------------------------------------------------------- settings


def test_the_default_storage_class_comes_from_the_environment_or_the_flag() -> None:
    from distillery_operator.cli import build_parser

    assert Settings.from_env({}).storage_class is None
    assert Settings.from_env({"DISTILLERY_STORAGE_CLASS": "fast-rwx"}).storage_class == "fast-rwx"
    args = build_parser().parse_args(["operator", "--storage-class", "filestore"])
    settings = Settings.from_env({"DISTILLERY_STORAGE_CLASS": "fast-rwx"})
    assert settings.with_overrides(storage_class=args.storage_class).storage_class == "filestore"


def test_a_users_readwriteonce_claim_puts_the_evaluation_beside_the_student() -> None:
    """The claim index holds every claim: the reconciler hands the planner the one a run names even when
    the operator did not create it, and its access modes decide whether the evaluation pod must run on
    the served student's node (a ReadWriteOnce volume attaches to one node: Multi-Attach otherwise)."""

    def theirs(modes: list[str]) -> Child:
        return child_view(
            {"kind": PVC, "metadata": {"name": CLAIM, "uid": "c"}, "spec": {"accessModes": modes}}
        )

    claim = theirs(["ReadWriteOnce"])
    assert reconciler(FakeApi(), spec_of(), [claim]).observe(("ns", "r")).child(PVC, CLAIM) == claim
    for modes, beside in ((["ReadWriteOnce"], True), (["ReadWriteMany"], False), (None, False)):
        world = World()
        if modes is not None:
            world.children[(PVC, CLAIM)] = theirs(modes)
        world.to_serving()
        world.roll_out()
        out = world.plan()
        evaluation = next(d.manifest for d in out.apply if (d.kind, d.name) == ("Job", "r-eval"))
        affinity = evaluation["spec"]["template"]["spec"].get("affinity")
        assert (affinity is not None) is beside, modes
        if beside:
            (term,) = affinity["podAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
            serve = world.child("Deployment", "serve").name
            assert term["topologyKey"] == "kubernetes.io/hostname" and serve == "r-serve"
