"""`distillery run` with an on-policy training: the self-hosted teacher is served again for the training
(its samples are scored by the teacher's vLLM server) and the stage config the trainer reads names it; for
any other method the training runs without it. Its figures (scored tokens, samples per second, divergence)
reach the status and the train row, and the verdict prices the teacher's scoring. vLLM and the trainer are stood in for: what is checked is
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
from distillery_trainer.api.summaries import TrainingProgress

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


def _local(tmp_path: Path, method: str = "onPolicy", **spec: Any) -> LocalRun:
    doc = (
        make_run("op")
        .self_hosted()
        .spec({"training": {"method": method}, "cost": {"gpuHourUSD": 0.5}, **spec})
        .obj()
    )
    lr = LocalRun(run=parse_run(doc), spec_file=tmp_path / "run.yaml", workdir=tmp_path / "runs", ui=_Ui())  # type: ignore[arg-type]
    lr.layout.train_dir.mkdir(parents=True)
    return lr


def _progress(**kw: Any) -> TrainingProgress:
    return TrainingProgress.model_validate(
        {
            "method": "onPolicy",
            "step": 10,
            "total_steps": 40,
            "loss": 0.5,
            "eta_seconds": 30.0,
            "elapsed_seconds": 7200.0,
            "teacher_tokens_scored": 12_345,
            "teacher_scoring_seconds": 42.5,
            "samples_per_second": 0.8,
            "divergence": 0.321,
            "samples_ended": 0.75,
            "teacher_logprob": -2.5,
            **kw,
        }
    )


def test_the_on_policy_figures_reach_the_local_status_and_the_train_row(tmp_path: Path) -> None:
    """`distillery run` folds rank 0's progress.json into status.training as the operator does: the
    teacher's scored tokens and waiting time, samples per second, the running divergence, the self-hosted
    teacher's device-hours (1 GPU x 2 h); its train row shows them."""
    from distillery_operator.local.state import observe
    from distillery_operator.local.ui import Ui

    lr = _local(tmp_path)
    lr.status.training.state = "Running"
    lr.layout.progress_file.write_text(_progress().model_dump_json(by_alias=True))
    observe(lr)
    t = lr.status.training
    assert (t.teacher_tokens_scored, t.teacher_scoring_seconds, t.samples_per_second) == (12_345, 42.5, 0.8)
    assert (t.divergence, t.teacher_gpu_hours) == (0.321, 2.0)
    assert (t.samples_ended, t.teacher_logprob) == (0.75, -2.5)
    row = Ui().progress_line("train", t)
    assert row == (
        "10/40, loss 0.500, divergence 0.321, 0.80 samples/s, 75% ended, teacher logprob -2.50/tok, "
        "teacher scored 12,345 tok, ETA 30s"
    )


def test_an_sft_trainings_local_status_has_no_on_policy_figures(tmp_path: Path) -> None:
    from distillery_operator.local.state import observe
    from distillery_operator.local.ui import Ui

    lr = _local(tmp_path, "sft")
    lr.status.training.state = "Running"
    sft = TrainingProgress(method="sft", step=10, total_steps=40, loss=0.5, elapsed_seconds=60.0)
    lr.layout.progress_file.write_text(sft.model_dump_json(by_alias=True))
    observe(lr)
    t = lr.status.training.to_dict()
    assert t["step"] == 10 and not {"teacherTokensScored", "divergence", "teacherGpuHours"} & set(t)
    assert Ui().progress_line("train", lr.status.training) == "10/40, loss 0.500"


def test_the_local_verdict_prices_the_teachers_scoring_and_the_summary_shows_it(tmp_path: Path) -> None:
    """conclude (the local verdict) prices the self-hosted teacher kept up for the training as the
    operator does: 2 h of its 1 GPU at $0.5, in the total; the final table shows both."""
    import io

    from distillery_operator.local.ui import Ui
    from rich.console import Console

    lr = _local(tmp_path)
    lr.layout.progress_file.write_text(_progress(gpu_hours=4.0).model_dump_json(by_alias=True))
    lr.layout.results_file.parent.mkdir(parents=True, exist_ok=True)
    lr.layout.results_file.write_text('{"results": {"qualityRetention": 0.95}}')
    executor.conclude(lr)
    assert lr.status.results is not None
    cost = lr.status.results.cost
    assert cost is not None and (cost.teacher_scoring_usd, cost.training_usd) == (1.0, 2.0)
    assert cost.total_usd == 3.0  # no collection summaries here: scoring + training
    buf = io.StringIO()
    Ui(Console(file=buf, width=200, force_terminal=False)).summary("op", lr.status, tmp_path / "s.json")
    out = buf.getvalue()
    assert "teacher scoring cost (onPolicy)" in out and "$1.00" in out
    assert "total cost (once)" in out and "$3.00" in out


@pytest.mark.parametrize("compare", [True, False])
def test_the_evaluation_compares_the_teacher_served_beside_the_student(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, compare: bool
) -> None:
    """evaluation.load.compareTeacher: the self-hosted teacher is served for the evaluate stage only, beside
    the student, and the stage config names both (the evaluate stage measures each the same way); off, the
    student alone. (The e2e demo runs leave it off: a third vLLM start-up on a CPU; the measurement itself
    is tests/trainer/evaluate/test_evaluate_vllm.py's, against a real vLLM.)"""
    doc = (
        make_run("op")
        .self_hosted()
        .spec({"evaluation": {"load": {"requests": 4, "compareTeacher": compare}}})
        .obj()
    )
    lr = LocalRun(
        run=parse_run(doc), spec_file=tmp_path / "run.yaml", workdir=tmp_path / "runs", ui=_StageUi()
    )  # type: ignore[arg-type]
    lr.layout.root.mkdir(parents=True)
    urls = {"op": "http://127.0.0.1:8001/v1", "teacher": "http://127.0.0.1:8002/v1"}
    up: list[str] = []
    started: list[tuple[str, str]] = []

    @contextmanager
    def serve_model(**kw: Any) -> Iterator[Served]:
        launcher = _Launcher()
        launcher.base_url = urls[kw["name"]]
        started.append((kw["stage"], kw["name"]))
        up.append(kw["name"])
        try:
            yield Served(name=kw["name"], model_dir=f"/models/{kw['name']}", launcher=launcher)  # type: ignore[arg-type]
        finally:
            up.remove(kw["name"])

    seen: dict[str, Any] = {}

    def run(stage: str, argv: list[str], log: Path, **kw: Any) -> None:
        seen["stage"], seen["up"] = stage, list(up)
        seen["config"] = load_stage_config(Path(argv[argv.index("--config") + 1]))

    monkeypatch.setattr(stages, "serve_model", serve_model)
    monkeypatch.setattr(stages.process, "run", run)
    monkeypatch.setattr(stages, "evaluate_done", lambda layout, spec: False)
    stages.run_serve_and_evaluate(lr, keep_serving=False)
    config = seen["config"]
    assert seen["stage"] == "evaluate"
    assert (config.student.base_url, config.student.model) == (urls["op"], "op")
    if compare:
        assert started == [("serve", "op"), ("evaluate", "teacher")] and seen["up"] == ["op", "teacher"]
        endpoint = config.teacher_endpoint()
        assert (endpoint.base_url, endpoint.model) == (urls["teacher"], "teacher")
    else:
        assert started == [("serve", "op")] and seen["up"] == ["op"] and config.teacher is None
    assert up == [] and lr.teacher is None and lr.status.evaluation.state == "Succeeded"
