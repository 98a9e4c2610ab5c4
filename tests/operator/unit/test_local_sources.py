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
