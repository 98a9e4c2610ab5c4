from __future__ import annotations

import json
from pathlib import Path

import pytest
from distillery_trainer.api.summaries import CollectionSummary
from distillery_trainer.termination import LIMIT, compact, write_termination_message


def test_compact_fits_and_marks_truncation() -> None:
    big = {"keep": 1, "huge": "x" * 10_000, "small": [1, 2]}
    text = compact(big)
    assert len(text.encode()) <= LIMIT
    data = json.loads(text)
    assert data["keep"] == 1 and data["truncated"] is True and "huge" not in data


def test_write_to_named_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "termination-log"
    monkeypatch.setenv("DISTILLERY_TERMINATION_LOG", str(target))
    summary = CollectionSummary(
        shard=0, shards=2, total=10, done=9, failed=1, input_tokens=100, output_tokens=50
    )
    assert write_termination_message(summary.to_dict())
    assert json.loads(target.read_text())["outputTokens"] == 50
