"""This process's own writes that the watch may not have delivered yet (client-go calls these
expectations).

The reconciler observes a run's children through kopf's indices, which lag the API server by a watch
event. A child it created a moment ago would look missing (and be created twice), and one it deleted
would look present. So every write is remembered here, by run and child, until the watch shows it (the
same object at the written resourceVersion or later, or for a deletion the object gone or replaced) or
:data:`EXPECTATION_TTL` seconds have passed; meanwhile :meth:`Expectations.correct` shows the child as
written.
"""

from __future__ import annotations

import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass

from .observe import Child, Key

EXPECTATION_TTL = 30.0

Ref = tuple[str, str]  # (kind, name) of a child


def _version(child: Child) -> int | None:
    try:
        return int(child.resource_version)
    except ValueError:
        return None


@dataclass(frozen=True)
class Expectation:
    """A write of this process's that the watch may not have delivered yet: the child as written, or None
    for one deleted (``gone_uid``)."""

    child: Child | None
    gone_uid: str
    since: float

    def caught_up(self, seen: Child | None) -> bool:
        if self.child is None:
            return seen is None or seen.uid != self.gone_uid
        if seen is None or seen.uid != self.child.uid:
            return False
        if seen.resource_version == self.child.resource_version:
            return True
        mine, theirs = _version(self.child), _version(seen)
        return mine is not None and theirs is not None and theirs > mine


class Expectations:
    """The expectations of every run, by run key and child."""

    def __init__(self, ttl: float = EXPECTATION_TTL, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.clock = clock
        self._pending: dict[Key, dict[Ref, Expectation]] = {}

    def written(self, key: Key, ref: Ref, child: Child) -> None:
        """The run's child ``ref`` was created or changed: the API server answered ``child``."""
        self._pending.setdefault(key, {})[ref] = Expectation(child, "", self.clock())

    def deleted(self, key: Key, ref: Ref, gone_uid: str) -> None:
        """The run's child ``ref`` (uid ``gone_uid``, empty if unknown) was deleted."""
        self._pending.setdefault(key, {})[ref] = Expectation(None, gone_uid, self.clock())

    def correct(self, key: Key, children: MutableMapping[Ref, Child]) -> None:
        """Show the run's ``children`` (as the watch delivered them) with the writes it has not caught up
        with; drop the expectations it has caught up with or that expired."""
        pending = self._pending.get(key)
        if not pending:
            return
        now = self.clock()
        for ref, exp in list(pending.items()):
            seen = children.get(ref)
            if now - exp.since > self.ttl or exp.caught_up(seen):
                del pending[ref]
            elif exp.child is None:
                children.pop(ref, None)
            else:
                children[ref] = exp.child

    def pending(self, key: Key) -> dict[Ref, Expectation]:
        """The run's expectations not yet caught up with (as of the last :meth:`correct`)."""
        return dict(self._pending.get(key) or {})

    def forget(self, key: Key) -> None:
        self._pending.pop(key, None)
