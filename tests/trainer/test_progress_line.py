"""The progress line a running stage prints to its log and the operator reads back: format, parser, writer."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

from distillery_trainer import progress_line
from distillery_trainer.api.summaries import CollectionSummary, TrainingProgress
from distillery_trainer.progress_line import (
    MAX_BYTES,
    PREFIX,
    emit,
    format_line,
    latest,
    latest_collection,
    latest_training,
    parse_line,
)


def training(step: int = 12, **kw: object) -> TrainingProgress:
    fields: dict[str, object] = {
        "method": "sft",
        "step": step,
        "total_steps": 90,
        "epoch": 0.4,
        "loss": 1.2345,
        "tokens_per_second": 5200.5,
        "eta_seconds": 312.0,
        "elapsed_seconds": 40.0,
        "world_size": 8,
        "gpus": 8,
        "gpu_hours": 0.09,
    }
    return TrainingProgress.model_validate({**fields, **kw})


def shard(done: int = 40, shard: int = 1) -> CollectionSummary:
    return CollectionSummary(shard=shard, shards=4, total=100, done=done, failed=1, prompts_per_second=2.0)


def test_one_line_of_compact_camel_case_json_that_round_trips() -> None:
    line = format_line("train", training())
    assert line.startswith(PREFIX + '{"stage":"train",') and "\n" not in line and ": " not in line
    data = json.loads(line[len(PREFIX) :])
    assert data["totalSteps"] == 90 and data["tokensPerSecond"] == 5200.5 and data["etaSeconds"] == 312.0
    assert parse_line(line) == ("train", training())
    assert parse_line(format_line("collect", shard())) == ("collect", shard())


def test_garbage_partial_and_foreign_lines_are_ignored() -> None:
    good = format_line("train", training())
    for line in (
        "",
        "2026-03-01 12:00:00 rank0 INFO distillery: [####....] sft step 12/90  loss 1.2345",
        good[: len(good) // 2],  # a tail that starts mid-line, or a line cut by limitBytes
        PREFIX + "[1, 2]",
        PREFIX + '{"stage":"serve","step":1}',  # not a stage that reports progress
        PREFIX + '{"stage":"train","method":"sft","step":-3}',  # does not validate
        PREFIX + '{"stage":"collect","shard":0}',  # a required field missing
        PREFIX + "{not json",
    ):
        assert parse_line(line) is None, line


def test_the_latest_valid_line_of_the_stage_wins() -> None:
    log = "\n".join(
        [
            "Traceback (most recent call last):",
            format_line("train", training(step=10)),
            "INFO some library said something",
            format_line("train", training(step=11)),
            format_line("collect", shard()),  # another stage's line (not rank 0's kind)
            format_line("train", training(step=12))[:-9],  # the last one is torn: skipped
            "",
        ]
    )
    found = latest_training(log)
    assert found is not None and found.step == 11
    assert latest_collection(log) == shard()
    assert latest("no progress here\n", "train") is None and latest_training("") is None


def test_a_timestamp_before_the_prefix_and_fields_of_a_newer_trainer_are_tolerated() -> None:
    line = format_line("train", training())
    newer = line[:-1] + ',"learningRate":0.0002}'
    assert parse_line("2026-03-01T12:00:00.123456789Z " + newer) == ("train", training())
    assert latest("a\r" + line + "\r\n", "train") == training()  # carriage returns of a terminal bar


def test_a_long_message_is_cut_to_fit_one_atomic_write() -> None:
    line = format_line("train", training(state="Failed", message="é" * 10_000))
    assert len(line.encode()) <= MAX_BYTES and line.isascii()
    found = parse_line(line)
    assert found is not None and found[1].message and found[1].message.startswith("éé")  # type: ignore[attr-defined]


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_written_only_off_a_terminal_and_never_failing() -> None:
    out = io.StringIO()
    assert emit("collect", shard(), out) is True
    assert out.getvalue() == format_line("collect", shard()) + "\n"
    tty = _Tty()
    assert emit("collect", shard(), tty) is False and tty.getvalue() == ""
    closed = io.StringIO()
    closed.close()
    assert emit("collect", shard(), closed) is False


def test_importing_it_imports_no_torch() -> None:
    code = "import sys, distillery_trainer.progress_line; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", progress_line.__file__


def test_a_failed_stages_telling_line_is_never_a_progress_line(tmp_path: Path) -> None:
    from distillery_operator.local.process import last_error_line

    log = tmp_path / "collect.log"
    last = format_line("collect", shard())  # its JSON has a "failed" key: no error for all that
    log.write_text(f"INFO started\nERROR teacher unreachable: ConnectError\n{last}\n", encoding="utf-8")
    assert last_error_line(log) == "ERROR teacher unreachable: ConnectError"
    log.write_text(f"INFO started\n{last}\n", encoding="utf-8")
    assert last_error_line(log) == "INFO started"
