"""`distillery demo` runs examples/local-cpu.yaml on the prompts its generator writes; the shipped prompts
file is that generator's output."""

from __future__ import annotations

from pathlib import Path

from distillery_operator.demo.demo import demo_spec
from distillery_operator.demo.task import generate, to_jsonl
from distillery_trainer.api import load_run

from tests.conftest import EXAMPLES


def test_shipped_prompts_are_the_generators_output() -> None:
    assert (EXAMPLES / "data" / "contract-dates.jsonl").read_text() == to_jsonl(generate(400))


def test_generator_is_deterministic_with_references_and_categories() -> None:
    rows = generate(50)
    assert rows == generate(50)
    assert len({r["id"] for r in rows}) == 50
    assert all(r["reference"] in r["messages"][-1]["content"] for r in rows)
    assert {r["category"] for r in rows} <= {"entered-into", "signed-on", "dated", "effective", "made-on"}


def test_demo_spec_is_the_example_with_its_overrides(tmp_path: Path) -> None:
    path = demo_spec(tmp_path, prompts=30, train_seconds=20, requests=5)
    demo, example = load_run(path).spec, load_run(EXAMPLES / "local-cpu.yaml").spec
    assert demo.data.prompts.pvc_path == str((tmp_path / "contract-dates.jsonl").resolve())
    assert (tmp_path / "contract-dates.jsonl").read_text() == to_jsonl(generate(30))
    assert demo.training.max_seconds == 20 and demo.evaluation.load.requests == 5
    same = {"teacher", "student", "collection", "serving", "cost"}
    assert {k: v for k, v in demo.to_dict().items() if k in same} == {
        k: v for k, v in example.to_dict().items() if k in same
    }


def test_demo_on_policy_is_the_example_trained_on_policy(tmp_path: Path) -> None:
    """`distillery demo --method on-policy`: the spec's onPolicy; the teacher, a self-hosted vLLM server,
    is what scores the student's samples (and the example sizes the samples for its short answers)."""
    spec = load_run(demo_spec(tmp_path, prompts=30, train_seconds=None, requests=5, method="on-policy")).spec
    assert spec.training.method == "onPolicy" and spec.teacher.self_hosted is not None
    assert spec.training.on_policy.max_new_tokens == 16
    assert (
        load_run(
            demo_spec(tmp_path, prompts=30, train_seconds=None, requests=5, method="kd")
        ).spec.training.method
        == "kd"
    )
