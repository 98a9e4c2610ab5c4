"""`distillery run` with an on-policy training: the self-hosted teacher is served again for the training
(its samples are scored by the teacher's vLLM server) and the stage config the trainer reads names it; for
any other method the training runs without it. vLLM and the trainer are stood in for: what is checked is
what the executor starts and the config it writes (the real processes run in tests/e2e)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from distillery_operator.local import executor, stages
from distillery_operator.local.servers import Served
from distillery_operator.local.stages import run_train
from distillery_operator.local.state import LocalRun
from distillery_trainer.api import parse_run
from distillery_trainer.api.stage import load_stage_config

from tests.support.builders import make_run


class _Launcher:
    base_url = "http://127.0.0.1:8123/v1"
    proc = None


class _Ui:
    def note(self, stage: str, text: str) -> None:
        pass

    def progress(self, stage: str, st: Any) -> None:
        pass


def _run(tmp_path: Path, method: str, monkeypatch: pytest.MonkeyPatch) -> tuple[list[dict[str, Any]], Any]:
    doc = make_run("op").self_hosted().spec({"training": {"method": method, "onPolicy": {"topK": 50}}}).obj()
    lr = LocalRun(run=parse_run(doc), spec_file=tmp_path / "run.yaml", workdir=tmp_path / "runs", ui=_Ui())  # type: ignore[arg-type]
    lr.layout.root.mkdir(parents=True)
    served: list[dict[str, Any]] = []

    @contextmanager
    def serve_model(**kw: Any) -> Iterator[Served]:
        served.append(kw)
        yield Served(name=kw["name"], model_dir="/models/teacher", launcher=_Launcher())  # type: ignore[arg-type]

    seen: dict[str, Any] = {}

    def run(stage: str, argv: list[str], log: Path, **kw: Any) -> None:
        config = Path(argv[argv.index("--config") + 1])
        seen["config"] = load_stage_config(config)
        seen["serving"] = len(served)

    monkeypatch.setattr(stages, "serve_model", serve_model)
    monkeypatch.setattr(stages.process, "run", run)
    monkeypatch.setattr(stages, "gpu_count", lambda: 0)
    monkeypatch.setattr(stages, "train_done", lambda layout, spec: True)
    run_train(lr)
    assert lr.teacher is None  # served for the training only
    return served, seen


def test_an_on_policy_training_is_run_with_the_teacher_served_and_named_in_its_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    served, seen = _run(tmp_path, "onPolicy", monkeypatch)
    (teacher,) = served
    assert teacher["name"] == "teacher" and teacher["stage"] == "train"
    assert teacher["score_top_k"] == 50  # vLLM's --max-logprobs covers the scoring's top-k
    assert seen["serving"] == 1
    endpoint = seen["config"].teacher_endpoint()
    assert (endpoint.base_url, endpoint.model) == ("http://127.0.0.1:8123/v1", "teacher")


def test_an_sft_training_runs_without_the_teacher(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served, seen = _run(tmp_path, "sft", monkeypatch)
    assert served == [] and seen["config"].teacher is None


class _StageUi(_Ui):
    def stage_started(self, stage: str) -> None:
        pass

    def stage_finished(self, stage: str, message: str, *, reused: bool = False) -> None:
        pass


def test_an_on_policy_run_keeps_one_teacher_server_from_the_collection_through_the_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As the operator keeps ``<run>-teacher``: the server the collection used scores the training's
    samples (a vLLM start on a CPU is a minute and a half)."""
    doc = make_run("op").self_hosted().spec({"training": {"method": "onPolicy"}}).obj()
    lr = LocalRun(
        run=parse_run(doc), spec_file=tmp_path / "run.yaml", workdir=tmp_path / "runs", ui=_StageUi()
    )  # type: ignore[arg-type]
    lr.layout.root.mkdir(parents=True)
    starts: list[str] = []
    teachers: dict[str, str | None] = {}

    @contextmanager
    def serve_model(**kw: Any) -> Iterator[Served]:
        starts.append(kw["stage"])
        yield Served(name=kw["name"], model_dir="/models/teacher", launcher=_Launcher())  # type: ignore[arg-type]

    def stage(name: str) -> Any:
        def run(lr: LocalRun) -> None:
            teachers[name] = lr.stage_config().teacher_endpoint().base_url

        return run

    monkeypatch.setattr(stages, "serve_model", serve_model)
    monkeypatch.setattr(executor, "run_collect", stage("collect"))
    monkeypatch.setattr(stages, "_train", stage("train"))
    executor.collect_and_train(lr)
    assert starts == ["collect"]
    assert teachers == {"collect": _Launcher.base_url, "train": _Launcher.base_url}
    assert lr.teacher is None
