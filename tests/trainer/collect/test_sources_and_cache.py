"""Prompts from a mounted ConfigMap, and a teacher-answer cache that tells endpoints apart: real
``distillery-trainer collect`` processes against the fake OpenAI server on loopback."""

from __future__ import annotations

from pathlib import Path

import pytest
from distillery_trainer.api.spec import ConfigMapKeyRef, PromptSource
from distillery_trainer.collect.cache import cache_key
from distillery_trainer.collect.prompts import PROMPTS_DIR_ENV, PromptError, iter_source

from tests.support.builders import DELETE
from tests.support.collect import answers, run_collect, stage_config, write_prompts
from tests.support.servers.fake_openai import FakeOpenAI, FakeOpenAIConfig


def test_a_config_map_source_reads_the_key_where_the_pod_mounts_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    write_prompts(mount / "prompts.jsonl", ["one", "two"])
    source = PromptSource(config_map_ref=ConfigMapKeyRef(name="prompts", key="prompts.jsonl"))
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(mount))
    rows = [r for _, r in iter_source(source, volume=tmp_path, download_dir=tmp_path)]
    assert rows == [{"prompt": "one"}, {"prompt": "two"}]
    monkeypatch.setenv(PROMPTS_DIR_ENV, str(tmp_path / "elsewhere"))
    with pytest.raises(PromptError, match="configMapRef.*prompts.jsonl"):
        list(iter_source(source, volume=tmp_path, download_dir=tmp_path))


def test_the_cache_key_covers_the_endpoint() -> None:
    request = {"temperature": 0.3}
    messages = [{"role": "user", "content": "hi"}]
    a = cache_key("gpt-4o", request, messages, endpoint="https://a.example/v1")
    b = cache_key("gpt-4o", request, messages, endpoint="https://b.example/v1")
    assert a != b
    assert a == cache_key("gpt-4o", request, messages, endpoint="https://a.example/v1/")  # one URL, one key
    # A self-hosted teacher is keyed by its weights, not by the in-cluster URL it is served at.
    assert cache_key("Qwen/Qwen2.5-7B", request, messages) == cache_key("Qwen/Qwen2.5-7B", request, messages)


@pytest.mark.slow
def test_collection_reads_prompts_from_the_config_map_mount(tmp_path: Path) -> None:
    """The collection pod's layout: the ConfigMap's key is a file in the directory the operator mounts
    (here a directory standing for the mount) and names in DISTILLERY_PROMPTS_DIR."""
    mount = tmp_path / "etc-distillery-prompts"
    mount.mkdir()
    texts = [f"clause {i} says what" for i in range(12)]
    write_prompts(mount / "contracts.jsonl", texts)
    with FakeOpenAI() as server:
        config = stage_config(
            tmp_path,
            server.base_url,
            tmp_path / "unused.jsonl",
            spec={
                "data": {
                    "prompts": {
                        "pvcPath": DELETE,
                        "configMapRef": {"name": "prompts", "key": "contracts.jsonl"},
                    }
                }
            },
        )
        out = run_collect(config, env={PROMPTS_DIR_ENV: str(mount)})
        assert out.returncode == 0, out.stderr
    got = sorted(line["messages"][-1]["content"] for line in answers(tmp_path / "run" / "collect"))
    assert got == sorted(texts)


@pytest.mark.slow
def test_two_endpoints_serving_the_same_model_name_do_not_share_answers(tmp_path: Path) -> None:
    texts = [f"what does clause {i} say" for i in range(10)]
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    cache = tmp_path / "cache"
    first = FakeOpenAIConfig(answer=lambda messages, i: "FROM A", model="same")
    second = FakeOpenAIConfig(answer=lambda messages, i: "FROM B", model="same")
    with FakeOpenAI(first) as a, FakeOpenAI(second) as b:
        out = run_collect(stage_config(tmp_path, a.base_url, prompts, name="ra", cache=cache))
        assert out.returncode == 0, out.stderr
        out = run_collect(stage_config(tmp_path, b.base_url, prompts, name="rb", cache=cache))
        assert out.returncode == 0, out.stderr
        assert b.count("ok") == 10  # asked its own server, not answered from A's cache
        # The same endpoint again is answered from the cache.
        out = run_collect(stage_config(tmp_path, a.base_url, prompts, name="ra2", cache=cache))
        assert out.returncode == 0, out.stderr
        assert a.count("ok") == 10
    assert {line["response"] for line in answers(tmp_path / "rb" / "collect")} == {"FROM B"}
    assert {line["response"] for line in answers(tmp_path / "ra2" / "collect")} == {"FROM A"}
