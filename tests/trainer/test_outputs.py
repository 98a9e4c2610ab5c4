"""Stage outputs that know their inputs: the record, the set-aside, and several processes claiming at once."""

from __future__ import annotations

import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest
from distillery_trainer import outputs
from distillery_trainer.api.spec import DistillationRunSpec
from distillery_trainer.api.stages import fingerprints
from distillery_trainer.layout import RunLayout

from tests.support.builders import make_run


def spec(**training: object) -> DistillationRunSpec:
    return DistillationRunSpec.model_validate(make_run().spec({"training": training}).obj()["spec"])


def quiet(_: str) -> None:
    pass


def test_a_fresh_stage_records_its_inputs_and_the_same_inputs_resume(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    assert outputs.claim(layout, "train", spec(epochs=1), quiet) is None
    rec = outputs.recorded(layout, "train")
    assert rec is not None and rec.inputs == fingerprints(spec(epochs=1))["train"]
    (layout.train_dir / "progress.json").write_text("{}")
    assert outputs.claim(layout, "train", spec(epochs=1), quiet) is None
    assert (layout.train_dir / "progress.json").exists() and outputs.recorded(layout, "train") == rec


def test_other_inputs_set_every_directory_of_the_stage_aside_and_say_so(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    outputs.claim(layout, "train", spec(epochs=1), quiet)
    (layout.train_dir / "progress.json").write_text('{"step": 3}')
    layout.student_dir.mkdir()
    (layout.student_dir / "config.json").write_text("{}")
    said: list[str] = []
    aside = outputs.claim(layout, "train", spec(epochs=2), said.append)
    assert aside is not None and aside.parent == tmp_path / "superseded"
    assert json.loads((aside / "train" / "progress.json").read_text()) == {"step": 3}
    assert (aside / "student" / "config.json").exists() and not layout.student_dir.exists()
    assert [p.name for p in layout.train_dir.iterdir()] == ["inputs.json"]
    assert "set aside" in said[0] and str(aside) in said[0]
    assert outputs.matches(layout, "train", spec(epochs=2)) and not outputs.matches(
        layout, "train", spec(epochs=7)
    )


def test_only_the_latest_set_aside_outputs_are_kept(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    for epochs in (1, 2, 3, 4):
        outputs.claim(layout, "evaluate", spec(epochs=epochs), quiet)
        (layout.eval_dir / "results.json").write_text(json.dumps({"epochs": epochs}))
    (kept,) = (tmp_path / "superseded").iterdir()
    assert json.loads((kept / "eval" / "results.json").read_text()) == {"epochs": 3}


def test_outputs_written_before_inputs_were_recorded_are_adopted(tmp_path: Path) -> None:
    """An upgrade must not throw away a collection (or restart every run): no record, or a record of an
    older fingerprint scheme, is adopted as it is."""
    layout = RunLayout(tmp_path)
    layout.collect_dir.mkdir()
    (layout.collect_dir / "shard-00000.jsonl").write_text('{"id": "a"}\n')
    said: list[str] = []
    assert outputs.claim(layout, "collect", spec(), said.append) is None
    assert (layout.collect_dir / "shard-00000.jsonl").exists() and "adopted" in said[0]
    assert outputs.matches(layout, "collect", spec())

    old_scheme = RunLayout(tmp_path / "old")
    old_scheme.eval_dir.mkdir(parents=True)
    (old_scheme.eval_dir / "inputs.json").write_text('{"inputs": "0123456789abcdef"}')
    (old_scheme.eval_dir / "results.json").write_text("{}")
    assert outputs.claim(old_scheme, "evaluate", spec(), quiet) is None
    assert (old_scheme.eval_dir / "results.json").exists()


def test_a_later_stage_refuses_outputs_made_for_other_inputs(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    outputs.claim(layout, "collect", spec(), quiet)
    outputs.require(layout, "collect", spec(epochs=5), by="train")  # training inputs are not collection's
    other = DistillationRunSpec.model_validate(make_run().spec({"collection": {"shards": 3}}).obj()["spec"])
    with pytest.raises(outputs.StaleInputs, match="the collect stage must run again first"):
        outputs.require(layout, "collect", other, by="train")


def _claim(root: str, shards: int, barrier: Any, results: Any) -> None:
    layout = RunLayout(Path(root))
    barrier.wait()
    aside = outputs.claim(layout, "collect", spec_with_shards(shards), quiet)
    results.put(str(aside) if aside else "")


def spec_with_shards(shards: int) -> DistillationRunSpec:
    return DistillationRunSpec.model_validate(
        make_run().spec({"collection": {"shards": shards}}).obj()["spec"]
    )


def test_shards_starting_together_set_the_old_collection_aside_once(tmp_path: Path) -> None:
    """The shards of a collection start at once and each claims the directory: exactly one of them sets
    the old outputs aside, every one ends with the new record, and no new shard's file is lost."""
    layout = RunLayout(tmp_path)
    ctx = multiprocessing.get_context("fork")
    for shards in (8, 4, 2):  # each round sets the previous round's collection aside
        outputs.claim(layout, "collect", spec_with_shards(shards + 1), quiet)
        (layout.collect_dir / "shard-00007.jsonl").write_text("old\n")
        barrier, results = ctx.Barrier(6), ctx.Queue()
        procs = [ctx.Process(target=_claim, args=(str(tmp_path), shards, barrier, results)) for _ in range(6)]
        for p in procs:
            p.start()
        asides = [results.get(timeout=30) for _ in procs]
        for p in procs:
            p.join(timeout=30)
            assert p.exitcode == 0
        assert len([a for a in asides if a]) == 1, asides
        rec = outputs.recorded(layout, "collect")
        assert rec is not None and rec.inputs == fingerprints(spec_with_shards(shards))["collect"]
        assert not (layout.collect_dir / "shard-00007.jsonl").exists()
        assert (Path(next(a for a in asides if a)) / "collect" / "shard-00007.jsonl").exists()
        assert list(tmp_path.glob(".collect.*.tmp")) == []  # no temporary directory left behind
