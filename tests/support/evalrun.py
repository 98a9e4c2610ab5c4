"""Build what the evaluation stage reads: collected eval lines under collect/ and a stage config."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from distillery_trainer.api import parse_run
from distillery_trainer.api.stage import RunRef, ServedModel, StageConfig

from tests.support.builders import make_run


def write_collected(root: Path, rows: list[dict[str, Any]], shard: int = 0) -> None:
    """Rows as the collection writes them; each needs id, messages, response (split defaults to eval)."""
    path = root / "collect" / f"shard-{shard:05d}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        for row in rows:
            full = {"finish_reason": "stop", "usage": {}, "split": "eval", **row}
            fh.write(json.dumps(full) + "\n")


def stage_config(
    root: Path,
    *,
    student: tuple[str, str],
    teacher: tuple[str, str] | None = None,
    spec: dict[str, Any] | None = None,
) -> Path:
    """A stage config for run ``eval-test`` with its artifacts at ``root``; returns its path."""
    run = parse_run(make_run("eval-test").spec(spec or {}).obj())
    config = StageConfig(
        run=RunRef(name="eval-test", namespace="tests"),
        spec=run.spec,
        artifacts=str(root),
        student=ServedModel(base_url=student[0], model=student[1]),
        teacher=ServedModel(base_url=teacher[0], model=teacher[1]) if teacher else None,
    )
    path = root / "stage.yaml"
    path.write_text(config.dump(), encoding="utf-8")
    return path


def read_results(root: Path) -> dict[str, Any]:
    return json.loads((root / "eval" / "results.json").read_text(encoding="utf-8"))


def read_items(root: Path) -> list[dict[str, Any]]:
    lines = (root / "eval" / "items.jsonl").read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]
