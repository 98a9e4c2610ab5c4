"""The API model: examples validate everywhere, defaults are as documented, YAML round-trips, no torch."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from distillery_operator.validate import CLUSTER, LOCAL, cel_errors, schema_errors, validate_file
from distillery_trainer.api import DistillationRun, SpecError, dump_yaml, load_run, parse_run
from distillery_trainer.api.resource import load_yaml
from distillery_trainer.api.stage import StageConfig, api_key

from tests.conftest import EXAMPLES, REPO
from tests.support.builders import make_run

EXAMPLE_FILES = sorted(EXAMPLES.glob("*.yaml"))


def test_the_three_examples_exist() -> None:
    assert {p.name for p in EXAMPLE_FILES} >= {"run.yaml", "whitebox-kd.yaml", "local-cpu.yaml"}


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_example_validates_against_crd_schema_rules_and_model(path: Path) -> None:
    doc = load_yaml(path.read_text())
    assert schema_errors(doc) == []
    assert cel_errors(doc) == []
    run = parse_run(doc)
    assert run.metadata.name
    # local-cpu.yaml is for `distillery run` (no volume, pkg:// models): a cluster run refuses it, and says so.
    target = LOCAL if path.name == "local-cpu.yaml" else CLUSTER
    assert all(r.ok for r in validate_file(path, target=target))


def test_seed_example_is_the_seed_case() -> None:
    run = load_run(EXAMPLES / "run.yaml")
    spec = run.spec
    assert spec.teacher.endpoint is not None and spec.teacher.endpoint.model == "gpt-4o"
    assert spec.teacher.endpoint.api_key_secret_ref is not None
    assert spec.student.model == "meta-llama/Llama-3.1-8B-Instruct"
    assert spec.training.method == "sft" and spec.training.dpo.enabled
    assert spec.training.resources.nodes * spec.training.resources.gpus_per_node == 8
    assert spec.evaluation.min_quality_retention == 0.9


def test_whitebox_example_is_kd_on_a_self_hosted_teacher() -> None:
    spec = load_run(EXAMPLES / "whitebox-kd.yaml").spec
    assert spec.teacher.self_hosted is not None and spec.teacher.logprobs is not None
    assert (spec.training.method, spec.training.kd.temperature, spec.training.kd.alpha) == ("kd", 4.0, 0.5)


def test_short_spec_gets_documented_defaults() -> None:
    spec = parse_run(make_run().obj()).spec
    assert spec.teacher.sampling.temperature == 0.3
    assert spec.teacher.sampling.max_tokens == 1024
    assert spec.teacher.logprobs is None and not spec.teacher.white_box
    assert spec.data.eval_fraction == 0.05
    assert (spec.collection.shards, spec.collection.concurrency, spec.collection.max_retries) == (1, 16, 8)
    assert spec.training.method == "sft"
    assert (spec.training.kd.temperature, spec.training.kd.alpha, spec.training.kd.divergence) == (
        4.0,
        0.5,
        "forwardKL",
    )
    assert not spec.training.dpo.enabled and spec.training.dpo.beta == 0.1
    assert spec.training.resources.gpu_resource is None  # the operator's default (nvidia.com/gpu) applies
    assert spec.training.backend == "auto" and spec.training.runtime is None
    assert (spec.serving.engine, spec.serving.replicas, spec.serving.keep) == ("vllm", 1, True)
    assert spec.evaluation.min_quality_retention == 0.9
    assert spec.evaluation.metrics == ["exact_match", "token_f1", "rouge_l"]
    assert (spec.evaluation.load.requests, spec.evaluation.load.concurrency) == (200, 8)
    assert spec.cost.gpu_hour_usd == 2.0
    assert spec.storage is None


@pytest.mark.parametrize("path", EXAMPLE_FILES, ids=lambda p: p.name)
def test_yaml_round_trip_keeps_meaning(path: Path) -> None:
    run = load_run(path)
    again = parse_run(yaml.safe_load(dump_yaml(run)))
    assert again == run
    # Only what the user wrote survives exclude_defaults, and it reloads to the same run.
    short = parse_run(yaml.safe_load(dump_yaml(run, exclude_defaults=True)))
    assert short == run


def test_wire_names_are_camel_case() -> None:
    doc = parse_run(make_run().kd().storage().obj()).to_dict()
    spec = doc["spec"]
    assert "baseURL" in spec["teacher"]["endpoint"] and "apiKeySecretRef" in spec["teacher"]["endpoint"]
    assert "inputPerMTokUSD" in spec["teacher"]["pricing"]
    assert "topK" in spec["teacher"]["logprobs"]
    assert "minQualityRetention" in spec["evaluation"]
    assert "gpuHourUSD" in spec["cost"]
    assert "claimName" in spec["storage"]["pvc"]
    assert "gpusPerNode" in spec["training"]["resources"]


def test_snake_case_also_accepted_in_python() -> None:
    doc = make_run().obj()
    doc["spec"]["data"] = {"prompts": {"pvc_path": "p.jsonl"}, "eval_fraction": 0.1}
    assert parse_run(doc).spec.data.eval_fraction == 0.1


def test_yaml_floats_read_as_kubectl_does() -> None:
    assert load_yaml("lr: 2e-5\nx: 1.0e-4")["lr"] == pytest.approx(2e-5)


def test_spec_error_lists_every_problem() -> None:
    with pytest.raises(SpecError) as err:
        parse_run(make_run().spec({"collection": {"shards": 0}, "serving": {"replicas": 0}}).obj(), "x.yaml")
    text = str(err.value)
    assert "spec.collection.shards" in text and "spec.serving.replicas" in text and text.startswith("x.yaml")


def test_stage_config_carries_the_spec_and_never_a_secret(monkeypatch: pytest.MonkeyPatch) -> None:
    run = parse_run(make_run().obj())
    cfg = StageConfig.model_validate(
        {"run": {"name": "r", "namespace": "ns"}, "spec": run.spec.to_dict(), "artifacts": "/data/runs/ns/r"}
    )
    assert cfg.teacher_endpoint().model == "gpt-4o"
    monkeypatch.setenv("DISTILLERY_TEACHER_API_KEY", "sk-from-secret")
    assert cfg.teacher_api_key() == "sk-from-secret"
    assert "sk-from-secret" not in cfg.dump()
    monkeypatch.delenv("DISTILLERY_TEACHER_API_KEY")
    assert cfg.teacher_api_key() == "EMPTY"
    assert api_key(None, "NOPE") == "EMPTY"


def test_importing_the_api_imports_no_torch() -> None:
    code = (
        "import sys, distillery_trainer.api, distillery_trainer.cli, distillery_operator.crd, "
        "distillery_operator.validate, distillery_operator.cli;"
        "bad = [m for m in ('torch', 'transformers', 'vllm', 'kopf') if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == "[]"


def test_trainer_never_imports_the_operator() -> None:
    offenders = [
        str(p.relative_to(REPO))
        for p in (REPO / "trainer").rglob("*.py")
        if "distillery_operator" in p.read_text()
    ]
    assert offenders == []


def test_model_objects_compare_by_value() -> None:
    a = parse_run(make_run().obj())
    b = DistillationRun.model_validate(a.to_dict())
    assert a == b


def test_the_training_backends_are_the_designs_words() -> None:
    """auto | trainjob | pytorchjob | job (DESIGN.md); anything else is refused by the model and the CRD."""
    assert parse_run(make_run().obj()).spec.training.backend == "auto"
    for word in ("auto", "trainjob", "pytorchjob", "job"):
        run = make_run().spec({"training": {"backend": word}}).obj()
        assert parse_run(run).spec.training.backend == word
        assert not schema_errors(run), word
    assert schema_errors(make_run().spec({"training": {"backend": "kubeflow"}}).obj())
    assert schema_errors(make_run().spec({"training": {"backend": "trainJob"}}).obj())
