"""White-box answers: parsed from the OpenAI chat-completions shape, stored by data/topk.py, read back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from distillery_trainer.collect.collector import build_record
from distillery_trainer.collect.prompts import Prompt
from distillery_trainer.collect.teacher import (
    Choice,
    Completion,
    TokenIds,
    _bytes_to_unicode,
    parse_completion,
)
from distillery_trainer.data import topk
from distillery_trainer.data.topk import TopK, TopKReader

# What vLLM returns for logprobs=True, top_logprobs=3, return_tokens_as_token_ids=True (and OpenAI, but
# with text tokens): choices[i].logprobs.content[j] = {token, logprob, bytes, top_logprobs: [...]}.
VLLM_BODY = {
    "id": "chatcmpl-1",
    "object": "chat.completion",
    "model": "teacher",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "Hi there"},
            "finish_reason": "stop",
            "logprobs": {
                "content": [
                    {
                        "token": "token_id:28120",
                        "logprob": -0.25,
                        "bytes": [72, 105],
                        "top_logprobs": [
                            {"token": "token_id:28120", "logprob": -0.25, "bytes": [72, 105]},
                            {"token": "token_id:19556", "logprob": -1.75, "bytes": [72, 101, 108, 108, 111]},
                            {"token": "token_id:2", "logprob": -9999.0, "bytes": None},
                        ],
                    },
                    {
                        "token": "token_id:665",
                        "logprob": -0.5,
                        "bytes": [32, 116, 104, 101, 114, 101],
                        "top_logprobs": [{"token": "token_id:665", "logprob": -0.5, "bytes": None}],
                    },
                ]
            },
        }
    ],
    "usage": {"prompt_tokens": 12, "completion_tokens": 2, "total_tokens": 14},
}


def test_logprobs_parsed_from_the_openai_chat_completions_shape() -> None:
    c = parse_completion(json.loads(json.dumps(VLLM_BODY)), top_k=3, token_ids=TokenIds())
    assert (c.prompt_tokens, c.completion_tokens) == (12, 2)
    (choice,) = c.choices
    assert (choice.text, choice.finish_reason, choice.tokens) == ("Hi there", "stop", 2)
    assert choice.mean_logprob == pytest.approx(-0.375)
    arrays = choice.topk
    assert arrays is not None and arrays.k == 3
    assert arrays.tokens.dtype == np.int32 and arrays.tokens.tolist() == [28120, 665]
    assert arrays.ids.dtype == np.int32 and arrays.ids.tolist() == [[28120, 19556, 2], [665, -1, -1]]
    assert arrays.logprobs.dtype == np.float16
    assert arrays.logprobs[0, :2].tolist() == [-0.25, -1.75]
    assert arrays.logprobs[0, 2] == -9999.0 and np.isneginf(arrays.logprobs[1, 1:]).all()  # padding


def test_text_tokens_are_mapped_through_the_teacher_tokenizer(smollm2_dir: Path) -> None:
    """OpenAI returns tokens as text with their bytes: the byte-level BPE vocabulary maps them back."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(smollm2_dir))
    text = " The agreement is dated 3 March 2021, café."
    ids = tok.encode(text, add_special_tokens=False)
    to_byte = {ch: b for b, ch in _bytes_to_unicode().items()}
    content = []
    for tid in ids:
        raw = bytes(to_byte[ch] for ch in tok.convert_ids_to_tokens(tid))  # what OpenAI sends as "bytes"
        content.append(
            {"token": raw.decode(errors="replace"), "logprob": -0.1, "bytes": list(raw), "top_logprobs": []}
        )
    body = {
        "choices": [
            {
                "index": 0,
                "message": {"content": text},
                "finish_reason": "stop",
                "logprobs": {"content": content},
            }
        ]
    }
    c = parse_completion(body, top_k=2, token_ids=TokenIds(tok))
    arrays = c.choices[0].topk
    assert arrays is not None and arrays.tokens.tolist() == ids and c.unmapped_tokens == 0


def _topk(n: int, k: int, seed: int) -> TopK:
    rng = np.random.default_rng(seed)
    return TopK(
        rng.integers(0, 49152, n, dtype=np.int32),
        rng.integers(0, 49152, (n, k), dtype=np.int32),
        topk.to_float16(-rng.exponential(2.0, (n, k))),
    )


def test_topk_files_written_merged_and_read_back(tmp_path: Path) -> None:
    ident = {"name_or_path": "teacher", "vocab_size": 49152, "vocab_sha256": "ab", "loaded": True}
    meta = topk.file_metadata(ident, 20, "teacher")
    a, b, b2, c = _topk(7, 20, 0), _topk(0, 20, 1), _topk(3, 20, 2), _topk(200, 20, 3)
    topk.write_entries(topk.chunk_path(tmp_path, 3, 0), {"a": a, "b": b}, meta)
    topk.write_entries(topk.chunk_path(tmp_path, 3, 1), {"b": b2, "c@1": c, "orphan": a}, meta)
    reader = TopKReader.for_shard(tmp_path, 3)
    assert reader.keys() == ["a", "b", "c@1", "orphan"] and reader.tokenizer == ident and reader.top_k == 20
    assert reader["b"].equals(b2)  # the later chunk wins

    dest = topk.merged_path(tmp_path, 3)
    topk.merge_files(topk.shard_files(tmp_path, 3), dest, keep={"a", "b", topk.entry_key("c", 1)})
    from safetensors.numpy import load_file  # the format is plain safetensors

    tensors = load_file(str(dest))
    assert tensors["c@1.ids"].dtype == np.int32 and tensors["c@1.logprobs"].shape == (200, 20)
    merged = TopKReader([dest])
    assert merged.keys() == ["a", "b", "c@1"] and merged["a"].equals(a) and merged["c@1"].equals(c)
    assert merged.tokenizer == ident and len(merged["b"]) == 3
    # top-20 on disk: 4 + 20 * 6 bytes a token, and the header is small beside it
    big = {f"id-{i:05d}": _topk(150, 20, i) for i in range(40)}
    size = topk.write_entries(tmp_path / "big.safetensors", big, meta)
    assert size / (40 * 150) <= 130


def test_seqkd_keeps_the_best_sample_or_all_of_them() -> None:
    prompt = Prompt(id="p1", messages=[{"role": "user", "content": "q"}], split="train", reference="r")
    arrays = [_topk(n, 2, n) for n in (2, 3, 4)]
    completion = Completion(
        choices=[
            Choice("a", "stop", -1.0, arrays[0], 2),
            Choice("b", "stop", -0.2, arrays[1], 3),
            Choice("c", "length", -0.5, arrays[2], 4),
        ],
        prompt_tokens=5,
        completion_tokens=9,
    )
    best = build_record(prompt, completion, "bestLogprob", 2, cached=False)
    assert [(line["response"], line["meanLogprob"]) for line in best.lines] == [("b", -0.2)]
    assert best.lines[0]["usage"] == {"prompt_tokens": 5, "completion_tokens": 3}
    assert "sample" not in best.lines[0] and best.lines[0]["reference"] == "r"
    assert list(best.arrays) == ["p1"] and best.arrays["p1"].equals(arrays[1])
    every = build_record(prompt, completion, "all", 2, cached=True)
    assert [(line["sample"], line["response"]) for line in every.lines] == [(0, "a"), (1, "b"), (2, "c")]
    assert list(every.arrays) == ["p1@0", "p1@1", "p1@2"] and every.paid_output_tokens == 0
    assert math.isclose(every.lines[2]["meanLogprob"], -0.5)
