"""The top-k logprob file format: what collection writes is what training reads."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from distillery_trainer.data.topk import (
    FORMAT,
    TopKFile,
    TopKWriter,
    answer_key,
    tokenizer_identity,
    write_topk,
)

IDENTITY = {"name_or_path": "tiny", "vocab_size": 259, "vocab_hash": "abc"}


def test_round_trip_with_padding_and_metadata(tmp_path: Path) -> None:
    path = tmp_path / "shard-00000.logprobs.safetensors"
    with TopKWriter(path, IDENTITY, top_k=3) as w:
        w.add("a", [5, 6], [[5, 1, 2], [6, 7]], [[-0.1, -2.5, -3.0], [-0.05, None]])
        w.add(answer_key("b", 2), [9], [[9]], [[0.0]])
    f = TopKFile(path)
    assert f.keys() == {"a", "b#2"} and "a" in f and f.get("zzz") is None
    assert f.top_k == 3 and f.tokenizer == IDENTITY and f.metadata["format"] == FORMAT
    a = f.get("a")
    assert a is not None and len(a) == 2
    assert a.tokens.dtype == np.int32 and a.ids.dtype == np.int32 and a.logprobs.dtype == np.float16
    assert a.tokens.tolist() == [5, 6]
    assert a.ids.tolist() == [[5, 1, 2], [6, 7, 0]]
    assert np.allclose(a.logprobs[0], [-0.1, -2.5, -3.0], atol=1e-3)
    assert a.logprobs[1, 1] == -math.inf and a.logprobs[1, 2] == -math.inf  # None and missing: padding


def test_writer_rejects_inconsistent_answers(tmp_path: Path) -> None:
    w = TopKWriter(tmp_path / "x.safetensors", IDENTITY, top_k=2)
    with pytest.raises(ValueError, match="2 tokens but 1 id rows"):
        w.add("a", [1, 2], [[1]], [[0.0]])
    with pytest.raises(ValueError, match="position 0 has 2 ids and 1 logprobs"):
        w.add("a", [1], [[1, 2]], [[0.0]])
    w.add("a", [1], [[1]], [[0.0]])
    with pytest.raises(ValueError, match="twice"):
        w.add("a", [1], [[1]], [[0.0]])


def test_write_is_atomic_and_whole_shard_helper(tmp_path: Path) -> None:
    path = tmp_path / "s.safetensors"
    write_topk(path, [("x", [1, 2], [[1, 3], [2, 3]], [[-0.1, -2.0], [-0.2, -1.0]])], IDENTITY, 2)
    assert [p.name for p in tmp_path.iterdir()] == ["s.safetensors"]
    assert TopKFile(path).get("x") is not None


def test_unknown_format_is_refused(tmp_path: Path) -> None:
    from safetensors.numpy import save_file

    path = tmp_path / "other.safetensors"
    save_file({"a.tokens": np.zeros(1, dtype=np.int32)}, str(path), metadata={"format": "something/else"})
    with pytest.raises(ValueError, match="unknown top-k format"):
        TopKFile(path)


def test_tokenizer_identity_tells_tokenizers_apart(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from tests.trainer.tiny import make_tokenizer

    same = tokenizer_identity(tokenizer)
    assert same == tokenizer_identity(tokenizer)
    assert same["vocab_size"] == len(tokenizer) and len(same["vocab_hash"]) == 16
    other = make_tokenizer(tmp_path / "other", merges=5)
    assert tokenizer_identity(other)["vocab_hash"] != same["vocab_hash"]
    json.dumps(same)  # goes into the file's metadata as JSON
