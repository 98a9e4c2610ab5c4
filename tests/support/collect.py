"""Running ``distillery-trainer collect`` as a pod would: a stage config on disk, a real process, real files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from tests.support.builders import DELETE, make_run


def write_prompts(path: Path, texts: list[str], *, ids: bool = False) -> Path:
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(texts):
            row: dict[str, Any] = {"prompt": text}
            if ids:
                row["id"] = f"p{i:04d}"
            fh.write(json.dumps(row) + "\n")
    return path


def stage_config(
    tmp: Path,
    base_url: str,
    prompts: Path,
    *,
    name: str = "run",
    spec: dict[str, Any] | None = None,
    cache: Path | None = None,
    served_model: str | None = None,
) -> Path:
    """A stage.yaml for an endpoint teacher at ``base_url`` (or a self-hosted one served there)."""
    run = (
        make_run(name)
        .spec(
            {
                "teacher": {"endpoint": {"baseURL": base_url, "model": "fake", "apiKeySecretRef": DELETE}},
                "data": {"prompts": {"pvcPath": str(prompts)}},
            }
        )
        .spec(spec or {})
        .obj()
    )
    config: dict[str, Any] = {"run": {"name": name}, "spec": run["spec"], "artifacts": str(tmp / name)}
    if cache is not None:
        config["cacheDir"] = str(cache)
    if served_model is not None:
        config["teacher"] = {"baseURL": base_url, "model": served_model}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


def collect_cmd(config: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "distillery_trainer.cli", "collect", "--config", str(config), *args]


def run_collect(
    config: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        collect_cmd(config, *args),
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def read_lines(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def answers(collect_dir: Path, shard: int = 0) -> list[dict[str, Any]]:
    return read_lines(collect_dir / f"shard-{shard:05d}.jsonl")


def summary(collect_dir: Path, shard: int = 0) -> dict[str, Any]:
    return dict(json.loads((collect_dir / f"summary-{shard:05d}.json").read_text()))


def assert_each_once(lines: list[dict[str, Any]], expected_ids: set[str]) -> None:
    counts = Counter(line["id"] for line in lines)
    repeated = {k: v for k, v in counts.items() if v > 1}
    assert not repeated, f"answered more than once: {repeated}"
    assert set(counts) == expected_ids, (
        f"missing {expected_ids - set(counts)}, extra {set(counts) - expected_ids}"
    )
