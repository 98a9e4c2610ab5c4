"""The local executor end to end, as a user runs it: the demo's run reduced (fewer prompts, a shorter
training budget, token F1 deciding retention so a briefly trained student still scores), interrupted
during training and resumed from its checkpoint, then a broken teacher URL.

Real processes throughout: vLLM on the CPU for the teacher and the student, the trainer, the evaluator.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.builders import make_run

pytestmark = pytest.mark.slow


RESUME_AT = 16  # the reduced demo's checkpoint: half way through its 32 steps


def reduced_demo(workdir: Path) -> Path:
    """The demo's run file, as `distillery demo --prompts 80 --requests 16` writes it, scored by token F1
    first, trained for 32 steps: a step budget, not a time budget, so the student learns as much on a CPU
    without native bf16 (4.5 s a step in fp32 on an AVX2-only EPYC: 60 s were 13 steps, which score 0)
    as on one with it. A checkpoint at step 16, for the run interrupted after it to resume from. The
    teacher's latency is not measured (evaluation.load.compareTeacher, a third vLLM start-up and its
    requests): the executor's wiring of it is tests/operator/unit/test_local_on_policy.py's
    test_the_evaluation_compares_the_teacher_served_beside_the_student, the measurement against a real
    vLLM tests/trainer/evaluate/test_evaluate_vllm.py's."""
    from distillery_operator.demo.demo import demo_spec

    path = demo_spec(workdir, prompts=80, train_seconds=None, requests=16)
    doc = yaml.safe_load(path.read_text())
    doc["spec"]["training"]["maxSteps"] = 32
    doc["spec"]["training"]["checkpointEverySteps"] = RESUME_AT
    doc["spec"]["training"].pop("maxSeconds", None)
    doc["spec"]["evaluation"]["metrics"] = ["token_f1", "exact_match"]
    doc["spec"]["evaluation"]["load"]["compareTeacher"] = False
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _as_at_a_terminal() -> None:
    # A shell's background job (`.ci/run &`, nohup) ignores SIGINT, and children inherit that: give
    # `distillery run` the Ctrl-C a person at a terminal has.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def _distillery(*args: str) -> Iterator[subprocess.Popen[str]]:
    """`distillery ARGS` with its output piped; on leaving, killed if still running and its pipe closed
    (a pipe left to the garbage collector fails whichever later test it is collected in)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with subprocess.Popen(
        [sys.executable, "-m", "distillery_operator.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        preexec_fn=_as_at_a_terminal,
    ) as proc:
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()


def _status(root: Path) -> dict[str, Any]:
    return json.loads((root / "status.json").read_text())


def _wait_for(cond: Any, timeout: float, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(
                f"distillery exited early ({proc.returncode}):\n{proc.stdout.read() if proc.stdout else ''}"
            )
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(1)


def _assert_no_stage_process_left(root: Path) -> None:
    """No stage process (collect, train, ...) of the run at ``root`` outlives the interrupted run."""
    leftovers = subprocess.run(["pgrep", "-f", f"--config {root}/stage.yaml"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""


def test_demo_interrupted_in_training_then_resumed(demo_workdir: Path) -> None:
    """Ctrl-C once the training has saved its step-16 checkpoint: the run stops (130) with nothing left
    running; the same command again reuses the collection, resumes the training from step 16 (not from
    0, and without answering the baseline again), finishes its 32 steps and serves, evaluates and
    concludes as an uninterrupted run does."""
    from distillery_trainer.layout import RunLayout
    from distillery_trainer.train import checkpoint

    workdir = demo_workdir
    root = workdir / "local-cpu"
    layout = RunLayout(root)
    spec = reduced_demo(workdir)
    with _distillery("run", str(spec), "--workdir", str(workdir)) as first:
        _wait_for(lambda: checkpoint.latest(layout.checkpoints_dir) is not None, 900, first)
        first.send_signal(signal.SIGINT)
        out, _ = first.communicate(timeout=120)
    assert first.returncode == 130, out
    assert "resume" in out
    status = _status(root)
    assert status["collection"]["state"] == "Succeeded"
    assert "interrupted" in status["message"]
    assert status["training"]["state"] == "Running" and status["training"]["step"] > 0  # stopped in its steps
    assert [step for step, _ in checkpoint.checkpoints(layout.checkpoints_dir)] == [RESUME_AT]
    assert not checkpoint.read_state(checkpoint.checkpoints(layout.checkpoints_dir)[-1][1])["finished"]
    collected = {p.name: p.stat().st_mtime_ns for p in (root / "collect").iterdir()}
    assert any(name.startswith("shard-") for name in collected)
    _assert_no_stage_process_left(root)

    with _distillery("run", str(spec), "--workdir", str(workdir)) as second:
        out, _ = second.communicate(timeout=1500)
    assert second.returncode in (0, 1), out  # 1: the gate failed, which a short budget may do
    assert "reused" in out
    # The finished collection was reused, not redone.
    assert {
        p.name: p.stat().st_mtime_ns for p in (root / "collect").iterdir() if p.name in collected
    } == collected
    # The training went on from its checkpoint: the second run's train stage (its own section of the log)
    # loaded step 16, found the untrained student's answers written, and reported no step before 16.
    resumed = (root / "logs" / "train.log").read_text().split("\n$ ")[-1]
    assert "resuming from" in resumed and f"step-{RESUME_AT:06d} (step {RESUME_AT} of 32)" in resumed
    assert "baseline answers already in" in resumed and "the untrained student answers" not in resumed
    after = resumed.split("resuming from", 1)[1]
    steps = [int(n) for n in re.findall(r"step (\d+)/32", after)]
    assert steps and min(steps) >= RESUME_AT and max(steps) == 32, steps
    progress = json.loads(layout.progress_file.read_text())
    assert progress["step"] == 32 and progress["state"] == "Succeeded"
    last = checkpoint.latest(layout.checkpoints_dir)
    assert last is not None and last.name == "step-000032" and checkpoint.read_state(last)["finished"]

    status = _status(root)
    assert status["phase"] in ("Succeeded", "Failed")
    results = status["results"]
    for key in ("qualityRetention", "retentionInterval", "studentScore", "teacherScore", "baselineScore",
                "latencyMs", "throughputTokensPerSec", "cost", "gatePassed"):  # fmt: skip
        assert key in results, key
    assert 0 < results["qualityRetention"] <= 1.5
    lat = results["latencyMs"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    for key in ("collectionUSD", "trainingUSD", "servingUSDPerMonth"):
        assert key in results["cost"], key
    assert status["training"]["step"] == 32 and status["training"]["state"] == "Succeeded"
    types = {c["type"]: c for c in status["conditions"]}
    assert types["Progressing"]["status"] == "False"
    assert ("Succeeded" in types) != ("Failed" in types)
    assert "quality retention" in out
    # What produced the student, beside it: a model card Hugging Face reads and the provenance file
    # whose digest the status holds, completed by the evaluation with its figures.
    from distillery_trainer import provenance

    record = provenance.read(layout)
    assert record is not None and record.device == "cpu" and record.evaluation is not None
    assert record.evaluation["qualityRetention"] == results["qualityRetention"]
    assert results["provenanceDigest"] == provenance.digest_of(layout)
    assert "model-index" in provenance.parse_card((layout.student_dir / "README.md").read_text())


@pytest.mark.parametrize(
    ("url", "cause"),
    [
        ("http://127.0.0.1:9/v1", "connection refused to http://127.0.0.1:9/v1"),
        ("http://nonexistent.invalid/v1", "unknown host nonexistent.invalid"),
    ],
)
def test_broken_teacher_url_fails_in_seconds_naming_the_stage_and_the_cause(
    tmp_path: Path, url: str, cause: str
) -> None:
    """A wrong baseURL, with the default retries and timeout: not minutes of `collect: 0` ending in
    "request timed out", but a failure in seconds that says what is wrong, with human log lines only."""
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"hello {i}"}) + "\n" for i in range(40)))
    doc = (
        make_run("broken")
        .spec(
            {
                "teacher": {"endpoint": {"baseURL": url, "apiKeySecretRef": None}},
                "data": {"prompts": {"pvcPath": str(prompts)}},
            }
        )
        .obj()
    )
    del doc["spec"]["teacher"]["endpoint"]["apiKeySecretRef"]
    spec = tmp_path / "broken.yaml"
    spec.write_text(yaml.safe_dump(doc))
    started = time.monotonic()
    with _distillery("run", str(spec), "--workdir", str(tmp_path / "runs")) as proc:
        out, _ = proc.communicate(timeout=300)
    took = time.monotonic() - started
    assert proc.returncode == 1, out
    assert took < 30, (took, out)  # two interpreters starting on a shared 2-core machine included
    assert "stage collect failed" in out and cause in out
    assert "collect-00000.log" in out
    assert "distillery-progress" not in out  # the log's tail as a person reads it
    status = _status(tmp_path / "runs" / "broken")
    assert status["phase"] == "Failed"
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CollectionFailed" and cause in failed["message"]


def test_too_many_failed_prompts_fail_the_collection_instead_of_training(tmp_path: Path) -> None:
    """Past collection.maxFailedFraction the collection fails, naming the field, the share and the most
    common reason; nothing is trained on what is left."""
    from tests.support.servers.fake_openai import TOO_LONG_MARKER, FakeOpenAI

    prompts = tmp_path / "prompts.jsonl"
    rows = [
        {"id": f"p{i}", "prompt": f"q {i}" + (f" {TOO_LONG_MARKER}" if i % 5 == 0 else "")} for i in range(40)
    ]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))  # 8 of 40 answered 400: 20 %
    with FakeOpenAI() as teacher:
        doc = (
            make_run("lossy")
            .spec(
                {
                    "teacher": {"endpoint": {"baseURL": teacher.base_url, "apiKeySecretRef": None}},
                    "data": {"prompts": {"pvcPath": str(prompts)}},
                    "collection": {"shards": 2, "maxFailedFraction": 0.1},
                }
            )
            .obj()
        )
        del doc["spec"]["teacher"]["endpoint"]["apiKeySecretRef"]
        spec = tmp_path / "lossy.yaml"
        spec.write_text(yaml.safe_dump(doc))
        with _distillery("run", str(spec), "--workdir", str(tmp_path / "runs")) as proc:
            out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 1, out
    assert "stage collect failed: 8 of 40 prompts failed (20.0%) > collection.maxFailedFraction 0.1" in out
    assert "most common failure: context_length (8 prompts)" in out
    status = _status(tmp_path / "runs" / "lossy")
    failed = next(c for c in status["conditions"] if c["type"] == "Failed")
    assert status["phase"] == "Failed" and failed["reason"] == "CollectionFailed"
    assert status["collection"]["failed"] == 8 and status["training"]["state"] == "Pending"
    assert not (tmp_path / "runs" / "lossy" / "train").exists()


def test_sigterm_stops_the_run_and_every_stage_process(tmp_path: Path) -> None:
    """`kill PID` (a supervisor, a closed session) stops as Ctrl-C does: the stage processes (in their own
    process groups) are stopped, the status says interrupted, and nothing is left running."""
    from tests.support.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q {i}"}) + "\n" for i in range(200)))
    with FakeOpenAI(FakeOpenAIConfig(latency=lambda rng: 0.5)) as teacher:
        doc = (
            make_run("slow")
            .spec(
                {
                    "teacher": {"endpoint": {"baseURL": teacher.base_url, "apiKeySecretRef": None}},
                    "data": {"prompts": {"pvcPath": str(prompts)}},
                    "collection": {"concurrency": 1},
                }
            )
            .obj()
        )
        del doc["spec"]["teacher"]["endpoint"]["apiKeySecretRef"]
        spec = tmp_path / "slow.yaml"
        spec.write_text(yaml.safe_dump(doc))
        root = tmp_path / "runs" / "slow"
        with _distillery("run", str(spec), "--workdir", str(tmp_path / "runs")) as proc:
            _wait_for(lambda: teacher.stats["ok"] >= 3, 120, proc)
            proc.terminate()
            out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 130, out
    assert "resume" in out
    status = _status(root)
    assert "interrupted" in status["message"]
    _assert_no_stage_process_left(root)


def test_a_refused_api_key_is_named_in_the_status_and_never_written(tmp_path: Path) -> None:
    """A planted key the teacher refuses (and echoes back in its 401, as careless servers do): the run
    fails saying why in words, and the key is in no file of the run and not in the output."""
    from tests.support.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig

    key = "sk-planted-0123456789"
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": f"q {i}"}) + "\n" for i in range(5)))
    with FakeOpenAI(FakeOpenAIConfig(api_key="sk-the-right-one-000")) as teacher:
        endpoint = {"baseURL": teacher.base_url, "apiKeySecretRef": None, "apiKeyEnv": "PLANTED_KEY"}
        doc = (
            make_run("refused")
            .spec({"teacher": {"endpoint": endpoint}, "data": {"prompts": {"pvcPath": str(prompts)}}})
            .obj()
        )
        del doc["spec"]["teacher"]["endpoint"]["apiKeySecretRef"]
        spec = tmp_path / "refused.yaml"
        spec.write_text(yaml.safe_dump(doc))
        env = {**os.environ, "PLANTED_KEY": key, "HF_HUB_OFFLINE": "1"}
        out = subprocess.run(
            [sys.executable, "-m", "distillery_operator.cli", "run", str(spec), "--workdir", str(tmp_path / "runs")],
            capture_output=True, text=True, env=env, timeout=300,
        )  # fmt: skip
        assert any(key in h for h in teacher.auth_headers)  # sent, refused, echoed
    assert out.returncode == 1
    status = _status(tmp_path / "runs" / "refused")
    assert "the teacher refused the API key (401 Unauthorized)" in status["message"], status["message"]
    written = {p: p.read_bytes().decode("utf-8", "replace") for p in tmp_path.rglob("*") if p.is_file()}
    assert [str(p) for p, text in written.items() if key in text] == []
    assert key not in out.stdout + out.stderr
