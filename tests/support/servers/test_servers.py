"""The test servers themselves behave as the OpenAI API does, through the official client."""

from __future__ import annotations

import openai
import pytest

from tests.support.servers.fake_openai import TOO_LONG_MARKER, FakeOpenAI, FakeOpenAIConfig, Faults


def test_fake_answers_like_openai(fake_openai: FakeOpenAI) -> None:
    client = openai.OpenAI(base_url=fake_openai.base_url, api_key="x", max_retries=0)
    r = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "a b c"}], logprobs=True, top_logprobs=3, n=2
    )
    assert [c.message.content for c in r.choices] == ["c b a", "c b a #1"]
    assert r.usage is not None and r.usage.completion_tokens == 7
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content is not None and len(lp.content[0].top_logprobs) == 3
    stream = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "x y"}], stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "y x"
    assert fake_openai.count("ok") == 2


def test_fake_injects_faults_and_400() -> None:
    with FakeOpenAI(FakeOpenAIConfig(faults=Faults(rate_429=1.0))) as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}])
    with FakeOpenAI() as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="context length"):
            client.chat.completions.create(model="m", messages=[{"role": "user", "content": TOO_LONG_MARKER}])
