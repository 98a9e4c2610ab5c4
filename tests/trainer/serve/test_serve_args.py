"""The one vLLM command-line builder the operator's Deployments and the local launcher share."""

from __future__ import annotations

import pytest
from distillery_trainer.api import parse_run
from distillery_trainer.models import ModelNotFound, keep_indices, resolve_model_ref
from distillery_trainer.serve.args import VLLM_IMAGE, VllmServer, cpu_env, score_top_k

from tests.support.builders import make_run


def _flag(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def test_student_args_on_gpu() -> None:
    spec = parse_run(
        make_run().spec({"serving": {"gpus": 2, "maxModelLen": 4096, "extraArgs": ["--seed", "1"]}}).obj()
    ).spec
    s = VllmServer.for_student(spec.serving, "/data/runs/ns/r/student", "r")
    args = s.args()
    assert s.command() == ["python3", "-m", "vllm.entrypoints.openai.api_server"]
    assert _flag(args, "--model") == "/data/runs/ns/r/student"
    assert _flag(args, "--served-model-name") == "r"
    assert _flag(args, "--port") == "8000"
    assert _flag(args, "--tensor-parallel-size") == "2"
    assert _flag(args, "--max-model-len") == "4096"
    assert _flag(args, "--gpu-memory-utilization") == "0.9"
    assert "--enforce-eager" not in args
    assert args[-2:] == ["--seed", "1"]


def test_student_args_on_cpu_and_teacher_logprobs() -> None:
    spec = parse_run(make_run().self_hosted().spec({"teacher": {"logprobs": {"topK": 64}}}).obj()).spec
    s = VllmServer.for_student(spec.serving, "m", "r", gpu=False)
    assert "--enforce-eager" in s.args() and "--gpu-memory-utilization" not in s.args()
    assert spec.teacher.self_hosted is not None
    t = VllmServer.for_teacher(spec.teacher.self_hosted, spec.teacher.logprobs, "Qwen/x", "teacher")
    assert _flag(t.args(), "--max-logprobs") == "64"


def test_an_on_policy_teachers_max_logprobs_covers_its_top_k() -> None:
    """vLLM refuses prompt_logprobs above --max-logprobs: the self-hosted teacher is started with enough."""
    spec = parse_run(
        make_run().self_hosted().spec({"training": {"method": "onPolicy", "onPolicy": {"topK": 50}}}).obj()
    ).spec
    assert spec.teacher.self_hosted is not None and score_top_k(spec) == 50
    t = VllmServer.for_teacher(spec.teacher.self_hosted, None, "m", "teacher", score_top_k=score_top_k(spec))
    assert _flag(t.args(), "--max-logprobs") == "50"
    sft = parse_run(make_run().self_hosted().obj()).spec
    assert score_top_k(sft) == 0


def test_image_is_pinned() -> None:
    assert ":" in VLLM_IMAGE and not VLLM_IMAGE.endswith(":latest")


def test_cpu_env_binds_every_core() -> None:
    assert cpu_env(2, cores=4) == {"VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "0-3"}


def test_keep_indices_evenly_spaced() -> None:
    assert keep_indices(30, 15) == list(range(0, 30, 2))
    assert keep_indices(4, 4) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="keepLayers"):
        keep_indices(4, 5)


def test_pkg_refs_resolve_or_say_what_to_install() -> None:
    with pytest.raises(ModelNotFound, match="not installed"):
        resolve_model_ref("pkg://no_such_package_xyz/model.gguf")
    assert resolve_model_ref("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
