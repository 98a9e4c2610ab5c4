"""The one writer (``apply``), the error mapping and the reconciler's bookkeeping, with a fake API."""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from typing import Any

import aiohttp
import kopf
import pytest
from distillery_operator import apply, errors
from distillery_operator.kube import FIELD_MANAGER, ApiError
from distillery_operator.observe import RunView, child_view
from distillery_operator.planner import Desired
from distillery_operator.reconciler import CHILD_INDICES, POD_INDEX, RUN_INDEX, Reconciler
from distillery_operator.settings import Settings

from tests.operator.unit.test_planner import spec_of
from tests.support.kube.emulator import Apply, Manager, _leaves


def api_error(status: int, message: str = "boom", retry_after: str | None = None) -> ApiError:
    headers = {"Retry-After": retry_after} if retry_after else {}
    return ApiError(status, "Reason", json.dumps({"message": message}), headers)


class FakeApi:
    """Records every call; ``fail`` makes the next calls of a verb raise. Its server-side apply is the
    API emulator's model of it (:class:`tests.support.kube.emulator.Apply`)."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, str]] = []
        self.objects: dict[tuple[str, str], dict[str, Any]] = {}
        self.fail: dict[Any, list[BaseException]] = {}  # by verb, or by (verb, kind)
        self.version = 0
        self.gate: asyncio.Event | None = None
        # A cluster with Kubeflow's v1 training operator, not Trainer v2 (what these tests were written for).
        self.unserved: set[str] = {"trainer.kubeflow.org/v1alpha1/trainjobs"}
        self.missing: set[tuple[str, str]] = set()  # cluster-scoped objects that do not exist

    def _maybe_fail(self, verb: str, kind: str = "") -> None:
        for key in ((verb, kind), verb):
            if self.fail.get(key):
                raise self.fail[key].pop(0)

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.version += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.version)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['name']}")
        return obj

    async def create(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            await self.gate.wait()
        self.calls.append(("create", manifest["kind"], manifest["metadata"]["name"]))
        self._maybe_fail("create", manifest["kind"])
        ref = (manifest["kind"], manifest["metadata"]["name"])
        if ref in self.objects:
            raise api_error(409, "exists")
        self.objects[ref] = self._stamp(manifest)
        return self.objects[ref]

    async def apply(self, namespace: str, manifest: dict[str, Any]) -> dict[str, Any]:
        if self.gate is not None:
            await self.gate.wait()
        kind, name = manifest["kind"], manifest["metadata"]["name"]
        self.calls.append(("apply", kind, name))
        self._maybe_fail("apply", kind)
        current = self.objects.get((kind, name))
        if current is None:
            obj = json.loads(json.dumps(manifest))
            obj["metadata"]["managedFields"] = [Manager(FIELD_MANAGER, "Apply", _leaves(manifest)).render()]
        else:
            obj = Apply.merge(current, manifest, FIELD_MANAGER, force=True)
        self.objects[(kind, name)] = self._stamp(obj)
        return self.objects[(kind, name)]

    async def get(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append(("get", kind, name))
        self._maybe_fail("get")
        if (kind, name) not in self.objects:
            raise api_error(404)
        return self.objects[(kind, name)]

    async def patch(
        self, kind: str, namespace: str, name: str, patch: dict[str, Any], *, sub: str | None = None
    ) -> dict[str, Any]:
        self.calls.append(("patch" + (f"/{sub}" if sub else ""), kind, name))
        self._maybe_fail("patch")
        obj = self.objects.setdefault((kind, name), {"metadata": {"name": name}})
        merged = _merge(obj, patch)
        self.objects[(kind, name)] = self._stamp(merged)
        return self.objects[(kind, name)]

    async def delete(self, kind: str, namespace: str, name: str) -> dict[str, Any]:
        self.calls.append(("delete", kind, name))
        self._maybe_fail("delete")
        if self.objects.pop((kind, name), None) is None:
            raise api_error(404)
        return {}

    async def has_resource(self, api_version: str, plural: str, ttl: float) -> bool:
        return f"{api_version}/{plural}" not in self.unserved

    async def cluster_object_exists(self, kind: str, name: str, ttl: float) -> bool | None:
        self.calls.append(("get", kind, name))
        return (kind, name) not in self.missing

    async def close(self) -> None:
        pass


def _merge(base: Any, patch: Any) -> Any:
    if not isinstance(base, dict) or not isinstance(patch, dict):
        return patch
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merge(base.get(key), value)
    return out


def manifest(
    kind: str = "ConfigMap", name: str = "r-config", data: str = "a", owner: str = "run-uid"
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": "ns",
            "labels": {"distillery.dev/run": "r"},
            "annotations": {"distillery.dev/hash": data},
            "ownerReferences": [{"uid": owner}],
        },
        "data": {"stage.yaml": data},
    }


# ---------------------------------------------------------------------------------------------- patches


def test_merge_patch_turns_old_into_new() -> None:
    old = {"phase": "Training", "results": {"a": 1}, "training": {"step": 3, "loss": 1.0}, "endpoint": "x"}
    new = {"phase": "Serving", "training": {"step": 3}, "serving": {"state": "Running"}}
    patch = apply.merge_patch(old, new)
    assert patch == {
        "phase": "Serving",
        "results": None,
        "training": {"loss": None},
        "serving": {"state": "Running"},
        "endpoint": None,
    }
    assert _merge(old, patch) == new
    assert apply.merge_patch(new, new) == {}


# ---------------------------------------------------------------------------------------------- ensure


async def test_ensure_reads_then_applies_and_then_sends_nothing() -> None:
    api = FakeApi()
    written = await apply.ensure(api, "run-uid", Desired(manifest(data="a"), mutable=True), None)  # type: ignore[arg-type]
    assert written is not None
    assert api.calls == [("get", "ConfigMap", "r-config"), ("apply", "ConfigMap", "r-config")]
    # The index lags: the writer reads the child, sees it is the run's, applies the new manifest.
    api.calls.clear()
    await apply.ensure(api, "run-uid", Desired(manifest(data="b"), mutable=True), None)  # type: ignore[arg-type]
    assert api.calls == [("get", "ConfigMap", "r-config"), ("apply", "ConfigMap", "r-config")]
    assert api.objects[("ConfigMap", "r-config")]["data"]["stage.yaml"] == "b"
    # The index lags and the child is as desired: read, nothing written.
    api.calls.clear()
    await apply.ensure(api, "run-uid", Desired(manifest(data="b"), mutable=True), None)  # type: ignore[arg-type]
    assert api.calls == [("get", "ConfigMap", "r-config")]
    # Known and equal: nothing sent at all.
    api.calls.clear()
    seen = child_view(api.objects[("ConfigMap", "r-config")])
    assert await apply.ensure(api, "run-uid", Desired(manifest(data="b"), mutable=True), seen) is None  # type: ignore[arg-type]
    assert api.calls == []
    # Known, same hash, but someone else took over a field: applied again, no read first.
    drifted = api.objects[("ConfigMap", "r-config")]
    drifted["metadata"]["managedFields"][0]["fieldsV1"].pop("f:data")  # a hand edit took data over
    seen = child_view(drifted)
    assert seen.hash == "b" and not apply.in_line(seen, manifest(data="b"))
    assert await apply.ensure(api, "run-uid", Desired(manifest(data="b"), mutable=True), seen) is not None  # type: ignore[arg-type]
    assert api.calls == [("apply", "ConfigMap", "r-config")]
    assert apply.in_line(child_view(api.objects[("ConfigMap", "r-config")]), manifest(data="b"))


async def test_ensure_never_applies_over_someone_elses_child() -> None:
    api = FakeApi()
    api.objects[("ConfigMap", "r-config")] = manifest(owner="someone-else")
    with pytest.raises(kopf.TemporaryError, match="does not belong to this run"):
        await apply.ensure(api, "run-uid", Desired(manifest(), mutable=True), None)  # type: ignore[arg-type]
    known = child_view(manifest(data="old", owner="someone-else"))
    with pytest.raises(kopf.TemporaryError, match="does not belong to this run"):
        await apply.ensure(api, "run-uid", Desired(manifest(), mutable=True), known)  # type: ignore[arg-type]
    assert [c[0] for c in api.calls] == ["get"]


async def test_ensure_leaves_immutable_children_and_refuses_foreign_ones() -> None:
    api = FakeApi()
    await apply.ensure(api, "run-uid", Desired(manifest("Job", "r-collect", "a"), mutable=False), None)  # type: ignore[arg-type]
    api.calls.clear()
    await apply.ensure(api, "run-uid", Desired(manifest("Job", "r-collect", "b"), mutable=False), None)  # type: ignore[arg-type]
    assert [c[0] for c in api.calls] == ["create", "get"]  # adopted as it is: a Job's template is immutable
    api.objects[("Job", "r-collect")] = manifest("Job", "r-collect", owner="someone-else")
    with pytest.raises(kopf.TemporaryError, match="does not belong to this run"):
        await apply.ensure(api, "run-uid", Desired(manifest("Job", "r-collect"), mutable=False), None)  # type: ignore[arg-type]


async def test_remove_treats_404_as_done_and_maps_other_errors() -> None:
    api = FakeApi()
    assert await apply.remove(api, "Job", "ns", "gone") is False  # type: ignore[arg-type]
    api.objects[("Job", "x")] = manifest("Job", "x")
    api.fail["delete"] = [api_error(500)]
    with pytest.raises(kopf.TemporaryError):
        await apply.remove(api, "Job", "ns", "x")  # type: ignore[arg-type]


async def test_write_status_patches_only_changes() -> None:
    api = FakeApi()
    assert await apply.write_status(api, "ns", "r", {"phase": "A"}, {"phase": "A"}) is False  # type: ignore[arg-type]
    assert api.calls == []
    assert await apply.write_status(api, "ns", "r", {"phase": "A"}, {"phase": "B"}) is True  # type: ignore[arg-type]
    assert api.calls == [("patch/status", "DistillationRun", "r")]


# ---------------------------------------------------------------------------------------------- errors


def test_a_retry_after_date_is_waited_for() -> None:
    """RFC 9110 allows an HTTP-date; a proxy in front of the API server may send one."""
    when = email.utils.formatdate(time.time() + 20, usegmt=True)
    out = errors.translate(api_error(503, retry_after=when), "create Job ns/r-collect")
    assert isinstance(out, kopf.TemporaryError) and out.delay is not None and 15 <= out.delay <= 20


@pytest.mark.parametrize(
    ("exc", "kind", "delay", "text"),
    [
        (api_error(500), kopf.TemporaryError, errors.DEFAULT_DELAY, "500 boom"),
        (api_error(503, retry_after="7"), kopf.TemporaryError, 7.0, "503"),
        # A Retry-After the handler must not sleep on as is: forever, a day, negative, not a number.
        (api_error(429, retry_after="inf"), kopf.TemporaryError, errors.DEFAULT_DELAY, "429"),
        (api_error(429, retry_after="86400"), kopf.TemporaryError, errors.MAX_RETRY_AFTER, "429"),
        (api_error(429, retry_after="-3"), kopf.TemporaryError, errors.DEFAULT_DELAY, "429"),
        (api_error(503, retry_after="soon"), kopf.TemporaryError, errors.DEFAULT_DELAY, "503"),
        (api_error(429), kopf.TemporaryError, errors.DEFAULT_DELAY, "429"),
        (api_error(409), kopf.TemporaryError, errors.CONFLICT_DELAY, "conflict"),
        (api_error(403, "forbidden"), kopf.TemporaryError, errors.FORBIDDEN_DELAY, "RBAC"),
        (api_error(404), kopf.TemporaryError, errors.NOT_FOUND_DELAY, "not found"),
        (api_error(422, "spec.x: Invalid value"), errors.Rejected, None, "spec.x: Invalid value"),
        (api_error(400, "bad"), kopf.PermanentError, None, "rejected by the API server"),
        (aiohttp.ClientConnectionError("refused"), kopf.TemporaryError, errors.DEFAULT_DELAY, "unreachable"),
        (TimeoutError(), kopf.TemporaryError, errors.DEFAULT_DELAY, "unreachable"),
        (ValueError("bad"), kopf.PermanentError, None, "ValueError: bad"),
    ],
)
def test_api_errors_map_to_intent(exc: BaseException, kind: type, delay: float | None, text: str) -> None:
    out = errors.translate(exc, "create Job ns/r-collect")
    assert isinstance(out, kind) and "create Job ns/r-collect" in str(out) and text in str(out)
    if delay is not None:
        assert out.delay == delay


# ---------------------------------------------------------------------------------------------- reconciler


class Harness:
    def __init__(self) -> None:
        self.api = FakeApi()
        self.events: list[tuple[str, str, str]] = []
        self.reconciler = Reconciler(
            self.api,  # type: ignore[arg-type]
            Settings(),
            post_event=lambda ref, type, reason, message: self.events.append((type, reason, message)),
        )
        self.view = RunView.of("r", "ns", "run-uid", 1, spec_of(), {})
        indices: dict[str, Any] = {name: {} for name in CHILD_INDICES}
        indices[RUN_INDEX] = {("ns", "r"): [self.view]}
        indices[POD_INDEX] = {}
        self.reconciler.bind(indices)

    async def settle(self) -> None:
        for _ in range(200):
            await asyncio.sleep(0.01)
            if self.reconciler.queue.idle():
                return


async def test_a_reconcile_applies_the_plan_then_writes_nothing_more() -> None:
    h = Harness()
    h.reconciler.request(("ns", "r"))
    await h.settle()
    assert [c[:2] for c in h.api.calls] == [
        ("get", "ConfigMap"),
        ("apply", "ConfigMap"),
        ("create", "Job"),
        ("patch/status", "DistillationRun"),
    ]
    assert h.events == [("Normal", "Collecting", "collect: 0/2 shards done")]
    # The watch has not delivered the children yet: the reconciler remembers its own writes.
    h.api.calls.clear()
    h.reconciler.request(("ns", "r"))
    await h.settle()
    assert h.api.calls == []


async def test_requests_during_a_reconcile_coalesce_into_one_more() -> None:
    h = Harness()
    h.api.gate = asyncio.Event()
    runs = 0
    original = h.reconciler.reconcile

    async def counting(key: tuple[str, str]) -> float | None:
        nonlocal runs
        runs += 1
        return await original(key)

    h.reconciler.reconcile = counting  # type: ignore[method-assign]
    h.reconciler.request(("ns", "r"))
    await asyncio.sleep(0.02)
    for _ in range(10):
        h.reconciler.request(("ns", "r"))
    h.api.gate.set()
    await h.settle()
    assert runs == 2


async def test_a_flaky_api_is_retried_with_backoff_and_one_warning() -> None:
    h = Harness()
    h.api.fail[("apply", "ConfigMap")] = [api_error(500), api_error(500)]
    h.reconciler.request(("ns", "r"))
    await asyncio.sleep(0.05)
    queue = h.reconciler.queue
    assert queue.failures(("ns", "r")) == 1 and queue.scheduled(("ns", "r"))
    h.reconciler.request(("ns", "r"))  # an event during the back-off waits for the timer
    assert not queue.running(("ns", "r"))
    for _ in range(100):  # 0.5 s, then 1 s: the second retry succeeds
        await asyncio.sleep(0.05)
        if not queue.failures(("ns", "r")) and queue.idle():
            break
    assert queue.failures(("ns", "r")) == 0
    # The ConfigMap failed twice and was created on the third attempt; the Job, created on the first
    # attempt, was not sent again (the reconciler remembers its own writes until the watch shows them).
    assert sum(1 for c in h.api.calls if c[:2] == ("apply", "ConfigMap")) == 3
    assert sum(1 for c in h.api.calls if c[:2] == ("create", "Job")) == 1
    warnings = [e for e in h.events if e[0] == "Warning"]
    assert len(warnings) == 1 and "500" in warnings[0][2] and warnings[0][1] == "Retrying"
    await h.reconciler.close()


REJECTION = (
    'Job.batch "r-collect" is invalid: spec.template.spec.tolerations[0].effect: Invalid value: '
    "\"NoSchedule\": effect must be 'NoExecute' when `tolerationSeconds` is set"
)


async def test_a_child_the_api_server_rejects_fails_the_run_with_its_message_until_the_spec_changes() -> None:
    h = Harness()
    h.api.fail[("create", "Job")] = [api_error(422, REJECTION)]
    h.reconciler.request(("ns", "r"))
    await h.settle()
    status = h.api.objects[("DistillationRun", "r")]["status"]
    assert status["phase"] == "Failed" and REJECTION in status["message"]
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert (failed["status"], failed["reason"]) == ("True", "ChildRejected")
    assert [e[:2] for e in h.events] == [("Warning", "ChildRejected")] and REJECTION in h.events[0][2]
    # Not retried on a timer: nothing changes until the run (or a child) does.
    assert not h.reconciler.queue.scheduled(("ns", "r")) and h.reconciler.queue.failures(("ns", "r")) == 0
    # The spec is fixed (the API server accepts the Job now): the next reconcile goes on.
    h.reconciler.indices[RUN_INDEX][("ns", "r")] = [RunView.of("r", "ns", "run-uid", 2, spec_of(), status)]
    h.reconciler.request(("ns", "r"))
    await h.settle()
    status = h.api.objects[("DistillationRun", "r")]["status"]
    assert status["phase"] == "Collecting" and "Failed" not in {c["type"] for c in status["conditions"]}
    assert ("Job", "r-collect") in h.api.objects
    await h.reconciler.close()


async def test_forget_drops_everything_about_a_deleted_run() -> None:
    h = Harness()
    h.reconciler.request(("ns", "r"))
    await h.settle()
    assert h.reconciler._written and h.reconciler.expectations.pending(("ns", "r"))
    h.reconciler.forget(("ns", "r"), "run-uid")
    assert not h.reconciler._written and not h.reconciler.expectations.pending(("ns", "r"))
