"""Expectations (``expectations``): this process's own writes shown over a watch that lags them, until
the watch catches up (by resourceVersion, or for a deletion the object gone or replaced) or they
expire."""

from __future__ import annotations

from distillery_operator.expectations import EXPECTATION_TTL, Expectations
from distillery_operator.observe import Child

KEY = ("ns", "r")
JOB = ("Job", "r-collect")


def job(uid: str = "uid-1", rv: str = "5", **status: object) -> Child:
    return Child("Job", "r-collect", uid=uid, resource_version=rv, status=status)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def seen(exp: Expectations, *children: Child, key: tuple[str, str] = KEY) -> dict[tuple[str, str], Child]:
    """What the reconciler observes when the watch shows ``children``."""
    out = {(c.kind, c.name): c for c in children}
    exp.correct(key, out)
    return out


def test_a_written_child_is_shown_until_the_watch_reaches_its_resource_version() -> None:
    exp = Expectations()
    written = job(rv="5", active=1)
    exp.written(KEY, JOB, written)
    assert seen(exp) == {JOB: written}  # not delivered yet: not created twice
    assert seen(exp, job(rv="4")) == {JOB: written}  # an older version of it
    assert seen(exp, job(uid="uid-0", rv="9")) == {JOB: written}  # another object of that name
    assert exp.pending(KEY)
    delivered = job(rv="5", active=2)
    assert seen(exp, delivered) == {JOB: delivered}  # caught up: the watch's view wins from now on
    assert not exp.pending(KEY)
    assert seen(exp) == {}


def test_a_later_resource_version_catches_up_too() -> None:
    exp = Expectations()
    exp.written(KEY, JOB, job(rv="5"))
    newer = job(rv="7", succeeded=1)
    assert seen(exp, newer) == {JOB: newer} and not exp.pending(KEY)
    # resourceVersions that are not numbers are only compared for equality
    exp.written(KEY, JOB, job(rv="abc"))
    assert seen(exp, job(rv="abd")) == {JOB: job(rv="abc")} and exp.pending(KEY)
    assert seen(exp, job(rv="abc")) == {JOB: job(rv="abc")} and not exp.pending(KEY)


def test_a_deleted_child_is_hidden_until_the_watch_shows_it_gone_or_replaced() -> None:
    exp = Expectations()
    exp.deleted(KEY, JOB, "uid-1")
    assert seen(exp, job(uid="uid-1")) == {}  # the watch still shows it: not deleted twice
    assert exp.pending(KEY)
    assert seen(exp) == {} and not exp.pending(KEY)  # gone

    exp.deleted(KEY, JOB, "uid-1")
    replaced = job(uid="uid-2", rv="11")
    assert seen(exp, replaced) == {JOB: replaced} and not exp.pending(KEY)  # a new object of that name


def test_expectations_expire_after_the_ttl() -> None:
    clock = Clock()
    exp = Expectations(clock=clock)
    assert exp.ttl == EXPECTATION_TTL == 30.0
    written = job(rv="5")
    exp.written(KEY, JOB, written)
    exp.deleted(KEY, ("Service", "r-serve"), "uid-s")
    service = Child("Service", "r-serve", uid="uid-s", resource_version="3")
    clock.now += EXPECTATION_TTL
    assert seen(exp, service) == {JOB: written}  # still within the TTL
    clock.now += 0.5
    # The watch never showed them (a write lost, or an event missed): the watch's view wins again.
    assert seen(exp, service) == {("Service", "r-serve"): service}
    assert not exp.pending(KEY)


def test_forget_drops_one_runs_expectations() -> None:
    exp = Expectations()
    other = ("ns", "other")
    exp.written(KEY, JOB, job())
    exp.written(other, JOB, job(uid="uid-9"))
    exp.forget(KEY)
    assert seen(exp) == {} and not exp.pending(KEY)
    assert seen(exp, key=other) == {JOB: job(uid="uid-9")}
