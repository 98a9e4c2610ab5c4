"""What the operator asked of the API emulator, recorded across the operator's integration tests, for the
chart's RBAC test (tests/chart/test_rbac.py).

The emulator (``tests/support/kube/emulator.py``) keeps an audit of every request as ``(verb, resource,
namespace)`` in RBAC terms. The tests themselves also talk to it — they play the Job, Deployment and
training controllers (create pods, patch statuses) — so the operator's part is the audit *minus* the
test's own requests, told apart by their credentials (:meth:`AuditRecorder.install`).

:class:`AuditRecorder` is a pytest plugin (registered by ``tests/conftest.py``): after each test that
used the ``cluster`` fixture it keeps one :class:`Record` (the operators' command lines and their
requests). Tests marked ``operator_audit`` run last, so they see every record of the session. A
session that did not run the whole operator suite gets it from a child pytest instead (see
:func:`operator_records`); with ``$DISTILLERY_OPERATOR_AUDIT`` set, the recorder writes its records
there as JSON at the end of the session.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import REPO

MARKER = "operator_audit"
ENV_OUT = "DISTILLERY_OPERATOR_AUDIT"
OPERATOR_TESTS = REPO / "tests" / "operator" / "integration"


@dataclass(frozen=True, order=True)
class ApiRequest:
    verb: str
    group: str  # "" for the core group
    resource: str  # the plural, or plural/subresource
    namespace: str | None  # None: cluster-scoped, or across all namespaces


@dataclass
class Record:
    test: str
    args: list[list[str]]  # each operator's command line after `distillery operator`
    requests: list[ApiRequest]
    failed: bool = False

    def watched(self) -> list[str] | None:
        """The namespaces the operators watched; None when one of them watched the whole cluster."""
        found: list[str] = []
        for args in self.args:
            mine = watched_namespaces(args)
            if mine is None:
                return None
            found += mine
        return sorted(set(found))


def watched_namespaces(args: Iterable[str]) -> list[str] | None:
    """The ``-n/--namespace`` values of a ``distillery operator`` command line; None for none (``-A``)."""
    out: list[str] = []
    items = list(args)
    for i, arg in enumerate(items):
        if arg in ("-n", "--namespace") and i + 1 < len(items):
            out.append(items[i + 1])
        elif arg.startswith("--namespace="):
            out.append(arg.split("=", 1)[1])
    return out or None


def _resource_names(api: Any) -> dict[str, tuple[str, str]]:
    """The emulator's RBAC resource strings back to (group, plural[/sub]) for every resource it serves."""
    from tests.support.kube.emulator import rbac_resource

    names = {"namespaces": ("", "namespaces")}
    for res in api.resources:
        info = api.resources[res]
        for sub in [None, *sorted(info.subresources or ())]:
            plural = f"{res.plural}/{sub}" if sub else res.plural
            names[rbac_resource(res.group or "", res.plural, sub)] = (res.group or "", plural)
    return names


Key = tuple[str, str, str | None]  # an audit entry: (verb, RBAC resource string, namespace)


def operator_requests(api: Any, sent: Counter[Key]) -> list[ApiRequest]:
    """The emulator's audit less the requests the test sent: what the operator asked for."""
    audit = Counter((e.verb, e.resource, e.namespace) for e in api.audit)
    audit.subtract(sent)
    names = _resource_names(api)
    out = set()
    for (verb, resource, namespace), count in audit.items():
        if count > 0:
            group, plural = names.get(resource, ("?", resource))
            out.add(ApiRequest(verb, group, plural, namespace))
    return sorted(out)


@dataclass(eq=False)  # a pytest plugin: hashed by identity
class AuditRecorder:
    records: list[Record] = field(default_factory=list)
    expected: set[str] = field(default_factory=set)  # node ids of the tests that record
    deselected: bool = False  # some recording test was left out of this session
    failures: set[str] = field(default_factory=set)  # node ids of tests that failed (any phase)
    sent: dict[int, Counter[Key]] = field(default_factory=dict)  # id(emulator) -> the test's requests

    def install(self) -> None:
        """Tell the test's own requests from the operator's as the emulator audits them.

        The audit entry does not say who sent the request; the request does: the operator (kopf and its
        REST client) sends the kubeconfig's bearer token, the test's client none. This wraps the
        emulator's ``_audit`` to count the credential-less ones per emulator.
        """
        try:
            from tests.support.kube.emulator import ApiServer
        except ModuleNotFoundError:
            return  # the operator's emulator is not on this branch: nothing records
        original = ApiServer._audit
        sent = self.sent

        def _audit(api: Any, request: Any) -> Any:
            entry = original(api, request)
            if entry is not None and not request.headers.get("Authorization"):
                sent.setdefault(id(api), Counter())[(entry.verb, entry.resource, entry.namespace)] += 1
            return entry

        ApiServer._audit = _audit  # type: ignore[method-assign]

    @staticmethod
    def _records(item: pytest.Item) -> bool:
        return "cluster" in getattr(item, "fixturenames", ()) and not item.get_closest_marker(MARKER)

    def pytest_deselected(self, items: list[pytest.Item]) -> None:
        if any(self._records(i) for i in items):
            self.deselected = True

    @pytest.hookimpl(trylast=True)
    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        late = [i for i in items if i.get_closest_marker(MARKER)]
        items[:] = [i for i in items if not i.get_closest_marker(MARKER)] + late
        self.expected = {i.nodeid for i in items if self._records(i)}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Any:
        cluster = getattr(item, "funcargs", {}).get("cluster") if self._records(item) else None
        yield  # the operators stop in the fixture's teardown: their last requests count too
        if cluster is not None:
            sent = self.sent.pop(id(cluster.api), Counter())
            args = [list(op.args) for op in cluster.operators]
            self.records.append(Record(item.nodeid, args, operator_requests(cluster.api, sent)))

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.failed:
            self.failures.add(report.nodeid)

    def finished(self) -> list[Record]:
        for record in self.records:
            record.failed = record.test in self.failures
        return list(self.records)

    def pytest_sessionfinish(self) -> None:
        out = os.environ.get(ENV_OUT)
        if out:
            Path(out).write_text(json.dumps([asdict(r) for r in self.finished()]), encoding="utf-8")

    def complete(self) -> bool:
        """Whether this session ran every test module of the operator's suite, none deselected."""
        if self.deselected or not OPERATOR_TESTS.is_dir():
            return False
        modules = {p.relative_to(REPO).as_posix() for p in OPERATOR_TESTS.glob("test_*.py")}
        ran = {nodeid.split("::")[0] for nodeid in self.expected}
        return bool(modules) and modules <= ran


def load(path: Path) -> list[Record]:
    data = json.loads(path.read_text(encoding="utf-8"))
    return [Record(r["test"], r["args"], [ApiRequest(**q) for q in r["requests"]], r["failed"]) for r in data]


def operator_records(config: pytest.Config, tmp: Path) -> list[Record]:
    """Every record of the operator's integration tests: this session's when it ran them all, or a child
    pytest's (the operator's suite alone) when it did not."""
    recorder = config.pluginmanager.get_plugin("distillery-operator-audit")
    assert isinstance(recorder, AuditRecorder), "tests/conftest.py registers the audit recorder"
    if recorder.complete():
        return recorder.finished()
    out = tmp / "operator-audit.json"
    env = {**os.environ, ENV_OUT: str(out)}
    cmd = [sys.executable, "-m", "pytest", str(OPERATOR_TESTS), "-q", "-p", "no:cacheprovider"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert out.exists(), f"the operator's tests recorded nothing:\n{done.stdout[-4000:]}{done.stderr[-2000:]}"
    return load(out)
