"""`distillery validate` and `distillery crd` as a user runs them: real processes, exit codes, output."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import EXAMPLES, REPO
from tests.support.builders import make_run


def _distillery(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("distillery", path=str(Path(sys.executable).parent))
    cmd = [exe] if exe else [sys.executable, "-m", "distillery_operator.cli"]
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=120)


def test_validate_examples_exit_zero_with_a_summary() -> None:
    cluster = [str(p) for p in sorted(EXAMPLES.glob("*.yaml")) if p.name != "local-cpu.yaml"]
    out = _distillery("validate", *cluster)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("is valid") == 2
    assert "contracts-8b" in out.stdout
    out = _distillery("validate", "--target", "local", str(EXAMPLES / "local-cpu.yaml"))
    assert out.returncode == 0 and "is valid" in out.stdout, out.stderr


def test_validate_checks_a_cluster_run_by_default_and_says_so() -> None:
    """examples/local-cpu.yaml runs on one machine; a cluster needs a volume and models the pods can load."""
    out = _distillery("validate", str(EXAMPLES / "local-cpu.yaml"))
    assert out.returncode == 1
    assert "spec.storage: required in a cluster" in out.stderr
    assert "spec.teacher.selfHosted.model: pkg://<package>/<file> names a model file" in out.stderr
    assert "pvc://" in out.stderr and "--target local" in out.stderr


def test_a_yaml_syntax_error_is_one_line_with_its_line_and_column(tmp_path: Path) -> None:
    f = tmp_path / "run.yaml"
    f.write_text(
        "apiVersion: distillery.dev/v1alpha1\nkind: DistillationRun\nspec:\n  teacher: {endpoint: [\n"
    )
    out = _distillery("validate", str(f))
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    lines = out.stderr.splitlines()
    assert len(lines) == 1 and out.stdout == "", out.stderr
    assert lines[0].startswith(f"{f}:5:1: YAML syntax error: "), lines[0]
    f.write_text("a: 1\n b: 2\n")
    out = _distillery("validate", str(f))
    assert (
        out.returncode == 1
        and f"{f}:2:3: YAML syntax error: mapping values are not allowed here" in out.stderr
    )


def test_validate_invalid_exits_one_with_paths(tmp_path: Path) -> None:
    bad = (
        make_run("bad")
        .spec(
            {
                "collection": {"shards": 0},
                "training": {"method": "kd"},
                "teacher": {"endpoint": {"apiKey": "sk-x"}},
            }
        )
        .obj()
    )
    f = tmp_path / "bad.yaml"
    f.write_text(yaml.safe_dump(bad))
    out = _distillery("validate", str(f))
    assert out.returncode == 1
    assert "spec.collection.shards" in out.stderr
    assert "spec.teacher.endpoint.apiKey" in out.stderr and "never inlined" in out.stderr
    assert "sk-x" not in out.stderr + out.stdout


def test_validate_missing_file_exits_one(tmp_path: Path) -> None:
    out = _distillery("validate", str(tmp_path / "nope.yaml"))
    assert out.returncode == 1 and "no such file" in out.stderr


def test_crd_prints_the_checked_in_file() -> None:
    out = _distillery("crd")
    assert out.returncode == 0
    assert out.stdout == (REPO / "crds" / "distillery.dev_distillationruns.yaml").read_text()


def test_help_is_instant_and_names_the_commands() -> None:
    out = _distillery("--help")
    assert out.returncode == 0
    for cmd in ("validate", "crd"):
        assert cmd in out.stdout


def test_validate_checks_the_platform_policy_only_when_given_one(tmp_path: Path) -> None:
    run = (
        make_run("tenant")
        .storage()
        .spec({"serving": {"extraArgs": ["--max-num-seqs=8 --trust-remote-code"]}})
        .obj()
    )
    f = tmp_path / "run.yaml"
    f.write_text(yaml.safe_dump(run))
    out = _distillery("validate", str(f))
    assert out.returncode == 0 and "is valid" in out.stdout
    assert "policy" in out.stderr and "--policy" in out.stderr  # says the policy was not checked
    values = tmp_path / "values.yaml"
    values.write_text((REPO / "charts" / "distillery" / "values.yaml").read_text())
    out = _distillery("validate", "--policy", str(values), str(f))
    assert out.returncode == 1
    assert "spec.serving.extraArgs[0]: vLLM flag --trust-remote-code" in out.stderr
    assert "policy.vllmArgsAllowlist" in out.stderr
    values.write_text(
        yaml.safe_dump({"policy": {"vllmArgsAllowlist": ["--max-num-seqs", "--trust-remote-code"]}})
    )
    out = _distillery("validate", "--policy", str(values), str(f))
    assert out.returncode == 0, out.stderr


def test_a_failed_stage_shows_the_human_lines_of_its_log_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`distillery run` prints the tail of a failed stage's log: the `distillery-progress {json}` lines in
    it are for the operator, not for a person."""
    from distillery_operator import cli
    from distillery_operator.local import executor
    from distillery_operator.local.process import StageFailed
    from distillery_trainer.api.summaries import CollectionSummary
    from distillery_trainer.progress_line import format_line

    progress = format_line("collect", CollectionSummary(shard=0, shards=1, total=8, done=0))
    log = tmp_path / "collect.log"
    log.write_text(
        "INFO starting shard 0\n"
        + f"{progress}\n" * 20
        + "ERROR connection refused to http://127.0.0.1:9/v1\n"
        + f"2026-01-01T00:00:00 {progress}\n",
        encoding="utf-8",
    )

    def execute(*args: object, **kwargs: object) -> None:
        raise StageFailed("collect", "exit code 1: ERROR connection refused", log)

    monkeypatch.setattr(executor, "execute", execute)
    assert cli._execute(tmp_path / "run.yaml", tmp_path, keep_serving=False) == 1
    err = capsys.readouterr().err
    assert "INFO starting shard 0" in err and "connection refused to http://127.0.0.1:9/v1" in err
    assert "distillery-progress" not in err and '"stage"' not in err


def test_an_unexpected_error_in_a_stage_fails_the_run_in_its_status_and_logs_the_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a stage process failing but the executor itself (here a model cache it cannot write, as a
    dangling link made it once): `distillery run` exits 1 with the error in words, status.json says
    Failed with the stage's reason instead of staying Running forever, and the traceback is in the
    stage's log for a bug report."""
    import json

    from distillery_operator import cli
    from distillery_operator.local import executor

    doc = make_run("crash").obj()
    spec = tmp_path / "crash.yaml"
    spec.write_text(yaml.safe_dump(doc))

    def run_collect(lr: object) -> None:
        raise PermissionError(13, "Permission denied", str(tmp_path / "runs" / ".cache" / "models"))

    monkeypatch.setattr(executor, "run_collect", run_collect)
    assert cli._execute(spec, tmp_path / "runs", keep_serving=False) == 1
    err = capsys.readouterr().err
    assert "stage collect failed: PermissionError: [Errno 13] Permission denied" in err, err
    status = json.loads((tmp_path / "runs" / "crash" / "status.json").read_text())
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "CollectionFailed", status
    assert "PermissionError" in failed["message"] and status["collection"]["state"] == "Failed"
    progressing = next(c for c in status["conditions"] if c["type"] == "Progressing")
    assert progressing["status"] == "False"
    log = (tmp_path / "runs" / "crash" / "logs" / "collect.log").read_text()
    assert "Traceback" in log and "in run_collect" in log


def test_an_unexpected_error_after_a_reused_collection_fails_the_training(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The stage that fails is the one under way, not the first: a collection reused (Succeeded), then
    the training's own set-up raising, is TrainingFailed with the collection left Succeeded."""
    import json

    from distillery_operator import cli
    from distillery_operator.local import executor

    doc = make_run("crash").obj()
    spec = tmp_path / "crash.yaml"
    spec.write_text(yaml.safe_dump(doc))

    def run_train(lr: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(executor, "collect_done", lambda layout, spec: True)
    monkeypatch.setattr(executor, "run_train", run_train)
    assert cli._execute(spec, tmp_path / "runs", keep_serving=False) == 1
    assert "stage train failed: OSError: [Errno 28] No space left on device" in capsys.readouterr().err
    status = json.loads((tmp_path / "runs" / "crash" / "status.json").read_text())
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "TrainingFailed", status
    assert status["collection"]["state"] == "Succeeded" and status["training"]["state"] == "Failed"
