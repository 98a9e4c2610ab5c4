"""`distillery run` and sources that exist only in a cluster: a ConfigMap of prompts is refused with
what to use instead, before any process starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from distillery_operator.local.process import StageFailed
from distillery_operator.local.stages import prompts_args
from distillery_operator.local.state import LocalRun
from distillery_trainer.api import parse_run

from tests.support.builders import DELETE, make_run


def _local(tmp_path: Path, prompts: dict[str, object]) -> LocalRun:
    run = parse_run(make_run("cm").spec({"data": {"prompts": {"pvcPath": DELETE, **prompts}}}).obj())
    return LocalRun(run=run, spec_file=tmp_path / "run.yaml", workdir=tmp_path / "runs", ui=None)  # type: ignore[arg-type]


def test_a_config_map_source_is_refused_with_the_alternative(tmp_path: Path) -> None:
    lr = _local(tmp_path, {"configMapRef": {"name": "prompts", "key": "p.jsonl"}})
    with pytest.raises(StageFailed, match=r"configMapRef.*no ConfigMap.*pvcPath") as err:
        prompts_args(lr)
    assert err.value.stage == "collect"


def test_a_local_file_is_passed_on(tmp_path: Path) -> None:
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n')
    assert prompts_args(_local(tmp_path, {"pvcPath": "p.jsonl"})) == ["--prompts", str(tmp_path / "p.jsonl")]


def test_a_running_shards_retries_are_read_from_this_attempts_progress_lines(tmp_path: Path) -> None:
    """Before any answer reaches a summary file, `distillery run` reads the shards' progress lines in
    their logs: this attempt's (after the line that started it), not an earlier attempt's."""
    from distillery_operator.local.state import live_collection
    from distillery_trainer.api.summaries import CollectionSummary
    from distillery_trainer.progress_line import format_line

    lr = _local(tmp_path, {"pvcPath": "p.jsonl"})
    old = CollectionSummary(shard=0, shards=1, total=9, done=4, retries=2, last_error="HTTP 500: old")
    new = CollectionSummary(shard=0, shards=1, total=9, done=0, retries=3, last_error="HTTP 503: busy")
    lr.logs.mkdir(parents=True)
    (lr.logs / "collect-00000.log").write_text(
        f"\n$ collect\n{format_line('collect', old)}\n\n$ collect\nINFO shard 0/1\n", encoding="utf-8"
    )
    assert live_collection(lr, 1) == []
    with (lr.logs / "collect-00000.log").open("a") as fh:
        fh.write(format_line("collect", new) + "\n")
    assert live_collection(lr, 1) == [new]
