"""What produced a student, beside it: ``student/provenance.json`` (validated by its model) and
``student/README.md`` (a Hugging Face model card whose metadata Hugging Face's own parser reads), written
by training and completed by evaluation, with the file's digest for the status."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from distillery_trainer import provenance
from distillery_trainer.api import parse_run
from distillery_trainer.api.stage import RunRef
from distillery_trainer.api.status import CostResults, Latency, Results
from distillery_trainer.layout import RunLayout

from tests.support.builders import make_run


def _layout(tmp_path: Path, order: list[int]) -> RunLayout:
    layout = RunLayout(tmp_path)
    layout.collect_dir.mkdir(parents=True)
    lines = [
        {
            "id": f"p{i}",
            "messages": [{"role": "user", "content": f"q{i}"}],
            "response": "a",
            "split": "eval" if i == 3 else "train",
        }
        for i in order
    ]
    layout.shard_file(0).write_text("".join(json.dumps(x) + "\n" for x in lines))
    layout.student_dir.mkdir(parents=True)
    (layout.student_dir / "config.json").write_text("{}")
    return layout


def test_training_records_the_provenance_and_evaluation_completes_the_model_card(tmp_path: Path) -> None:
    pytest.importorskip("huggingface_hub")
    spec = parse_run(
        make_run("contracts").spec({"student": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"}}).obj()
    ).spec
    layout = _layout(tmp_path / "a", [0, 1, 2, 3])
    run = RunRef(name="contracts", namespace="team-a")
    provenance.record_training(layout, run, spec, "cpu", {"step": 8, "loss": 1.5, "gpuHours": None})
    trained = provenance.read(layout)
    assert trained is not None and trained.evaluation is None
    assert trained.spec_digest == provenance.spec_digest(spec) and trained.spec_digest.startswith("sha256:")
    assert trained.seed == spec.training.seed and trained.method == spec.training.method
    assert trained.student.model == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert trained.teacher.endpoint == spec.teacher.endpoint.base_url  # type: ignore[union-attr]
    assert trained.prompts is not None and (trained.prompts.train, trained.prompts.eval) == (3, 1)
    assert {"distillery", "torch", "transformers"} <= set(trained.packages) and trained.device == "cpu"
    assert trained.training == {"step": 8, "loss": 1.5}
    assert "Not evaluated yet" in (layout.student_dir / "README.md").read_text()

    results = Results(
        quality_retention=0.91,
        student_score=0.82,
        teacher_score=0.9,
        samples=40,
        latency_ms=Latency(p50=410.0, p95=900.0, p99=1100.0),
        cost=CostResults(serving_usd_per_month=1460.0, break_even_requests_per_month=362_080),
        report="/x/report.md",
    )
    digest = provenance.record_evaluation(
        layout, run, spec, results, {"verdict": "QualityGatePassed", "passed": True}
    )
    raw = (layout.student_dir / "provenance.json").read_bytes()
    assert digest == "sha256:" + hashlib.sha256(raw).hexdigest() == provenance.digest_of(layout)
    done = provenance.Provenance.model_validate_json(raw)  # the schema: the JSON validates
    assert done.trained_at == trained.trained_at and done.device == "cpu"  # training's record, completed
    assert done.evaluation is not None and done.evaluation["qualityRetention"] == 0.91
    assert done.evaluation["latencyMs"]["p95"] == 900.0 and done.evaluation["verdict"] == "QualityGatePassed"
    assert done.evaluation["cost"]["breakEvenRequestsPerMonth"] == 362_080 and "report" not in done.evaluation

    card = (layout.student_dir / "README.md").read_text()
    meta = provenance.parse_card(card)  # huggingface_hub's ModelCard and model-index reader
    assert (
        meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and meta["library_name"] == "transformers"
    )
    assert "knowledge-distillation" in meta["tags"]
    from huggingface_hub import ModelCard

    evals = ModelCard(card).data.eval_results
    assert evals is not None
    by_type = {e.metric_type: e.metric_value for e in evals}
    assert by_type["quality_retention"] == 0.91 and by_type["student_latency_p95_ms"] == 900.0
    assert "| Quality retention (student / teacher) | 0.91 |" in card and done.spec_digest in card


def test_the_prompts_digest_is_the_same_whatever_order_the_teacher_finished_in(tmp_path: Path) -> None:
    a = provenance.prompts_of(_layout(tmp_path / "a", [0, 1, 2, 3]))
    b = provenance.prompts_of(_layout(tmp_path / "b", [3, 1, 0, 2]))
    assert a is not None and a == b


def test_a_card_without_metadata_or_with_broken_results_is_refused() -> None:
    pytest.importorskip("huggingface_hub")
    with pytest.raises(ValueError, match="metadata"):
        provenance.parse_card("# a student\n")
    with pytest.raises(Exception):  # noqa: B017 - huggingface_hub's own error for a malformed model-index
        provenance.parse_card("---\nmodel-index:\n- name: x\n  results:\n  - metrics: 3\n---\n# x\n")
