"""The Argo CD health check (``health.lua``) over a table of statuses, run by a real Lua (lupa)."""

from __future__ import annotations

from importlib.resources import files
from typing import Any

import lupa
import pytest

SCRIPT = files("distillery_operator").joinpath("health.lua").read_text(encoding="utf-8")


def health(obj: dict[str, Any]) -> tuple[str, str]:
    lua = lupa.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute(SCRIPT)
    return result["status"], result["message"]


def cond(type_: str, status: str, reason: str, message: str) -> dict[str, Any]:
    return {"type": type_, "status": status, "reason": reason, "message": message}


def run(generation: int = 1, status: dict[str, Any] | None = None) -> dict[str, Any]:
    obj: dict[str, Any] = {"metadata": {"name": "r", "generation": generation}}
    if status is not None:
        obj["status"] = status
    return obj


CASES = [
    ("no status yet", run(), "Progressing", "Waiting for the operator"),
    ("pending", run(status={"phase": "Pending", "observedGeneration": 1}), "Progressing", "Pending"),
    (
        "collecting",
        run(
            status={
                "phase": "Collecting",
                "observedGeneration": 1,
                "conditions": [cond("Progressing", "True", "Collecting", "collect: 3/8 shards done")],
            }
        ),
        "Progressing",
        "collect: 3/8 shards done",
    ),
    (
        "training",
        run(status={"phase": "Training", "observedGeneration": 1, "message": "train: step 40"}),
        "Progressing",
        "train: step 40",
    ),
    ("serving", run(status={"phase": "Serving", "observedGeneration": 1}), "Progressing", "Serving"),
    ("evaluating", run(status={"phase": "Evaluating", "observedGeneration": 1}), "Progressing", "Evaluating"),
    (
        "succeeded",
        run(
            status={
                "phase": "Succeeded",
                "observedGeneration": 1,
                "conditions": [cond("Ready", "True", "QualityGatePassed", "quality retention 0.910 >= 0.9")],
            }
        ),
        "Healthy",
        "quality retention 0.910 >= 0.9",
    ),
    (
        "quality gate failed",
        run(
            status={
                "phase": "Failed",
                "observedGeneration": 1,
                "conditions": [cond("Failed", "True", "QualityGateFailed", "quality retention 0.800 < 0.9")],
            }
        ),
        "Degraded",
        "quality retention 0.800 < 0.9",
    ),
    (
        "failed without conditions",
        run(status={"phase": "Failed", "observedGeneration": 1, "message": "collect failed"}),
        "Degraded",
        "collect failed",
    ),
    (
        "succeeded, but a newer spec",
        run(2, {"phase": "Succeeded", "observedGeneration": 1}),
        "Progressing",
        "generation 2",
    ),
    (
        "failed, but a newer spec",
        run(3, {"phase": "Failed", "observedGeneration": 2}),
        "Progressing",
        "generation 3",
    ),
    ("never observed", run(1, {"phase": "Pending"}), "Progressing", "generation 1"),
    ("no generation at all", {"metadata": {}, "status": {"phase": "Succeeded"}}, "Healthy", "Succeeded"),
]


@pytest.mark.parametrize(("obj", "expected", "message"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_health(obj: dict[str, Any], expected: str, message: str) -> None:
    status, text = health(obj)
    assert status == expected
    assert message in text
