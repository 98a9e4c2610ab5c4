"""Whether the operator's code and its test emulator are here (they arrive with the operator's branch).

The chart's tests that start the operator, read its command line and settings, or talk to its API
emulator skip with this reason until both branches are merged.
"""

from __future__ import annotations

import importlib.util

REASON = (
    "needs the operator (distillery_operator.handlers, settings) and its API emulator (tests/kube), "
    "which come with the operator's branch"
)


def _present(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


PRESENT = all(
    _present(m)
    for m in ("distillery_operator.handlers", "distillery_operator.settings", "tests.kube.emulator")
)
