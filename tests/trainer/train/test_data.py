"""From collected lines to batches: reading shards, chat templates and masks, top-k alignment, the batch
plan (deterministic, resumable, rank shares), packing, the LR schedule and the tokenizer guards."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from distillery_trainer.data.shards import Answer, DataError, read_answers, select_seqkd
from distillery_trainer.data.topk import (
    TopK,
    TopKReader,
    file_metadata,
    to_float16,
    tokenizer_identity,
    write_entries,
)
from distillery_trainer.layout import RunLayout
from distillery_trainer.train.batching import collate, make_plan
from distillery_trainer.train.examples import ChatFormat, Example, build_examples
from distillery_trainer.train.guards import (
    NonFiniteLoss,
    TokenizerMismatch,
    check_finite,
    check_online_tokenizer,
    check_topk_tokenizer,
)
from distillery_trainer.train.schedule import lr_factor, run_fraction

from tests.support.tiny import make_tokenizer, messages


def answer(i: int, response: str = "bcd", finish: str = "stop", **kw: object) -> Answer:
    return Answer(id=f"q{i}", messages=messages(f"abc{i}"), response=response, finish_reason=finish, **kw)  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------- shards


def test_read_answers_train_split_only_in_id_order(tmp_path: Path) -> None:
    layout = RunLayout(tmp_path)
    layout.collect_dir.mkdir(parents=True)
    lines = lambda rows: "\n".join(json.dumps(r) for r in rows) + "\n"  # noqa: E731
    base = {"messages": messages("x"), "finish_reason": "stop", "usage": {}}
    layout.shard_file(1).write_text(lines([{**base, "id": "c", "response": "3", "split": "train"}]))
    layout.shard_file(0).write_text(
        lines(
            [
                {**base, "id": "a", "response": "1", "split": "train", "category": "x"},
                {**base, "id": "b", "response": "2", "split": "eval"},
                {**base, "id": "e", "response": "  ", "split": "train"},
            ]
        )
    )
    got = read_answers(layout)
    assert [(a.id, a.shard) for a in got] == [("a", 0), ("c", 1)]
    assert got[0].extra == {"category": "x"}
    assert [a.id for a in read_answers(layout, "eval")] == ["b"]
    layout.shard_file(2).write_text('{"id": "z", "messages": []}\n')
    with pytest.raises(DataError, match=r"shard-00002.jsonl:1: missing response"):
        read_answers(layout)


def test_answers_are_read_in_the_order_of_their_ids_not_the_order_the_teacher_finished(
    tmp_path: Path,
) -> None:
    """A shard's lines are in the teacher's finishing order; two collections of the same prompts that
    finished in other orders give training the same sequence of answers."""
    base = {"messages": messages("x"), "finish_reason": "stop", "usage": {}, "split": "train"}
    rows = [{**base, "id": f"p{i}", "response": str(i)} for i in range(6)]
    rows += [
        {**base, "id": "p2", "response": "2b", "sample": 1},
        {**base, "id": "p2", "response": "2a", "sample": 0},
    ]
    orders = []
    for name, shard0 in [("a", rows), ("b", rows[::-1])]:
        layout = RunLayout(tmp_path / name)
        layout.collect_dir.mkdir(parents=True)
        layout.shard_file(0).write_text("\n".join(json.dumps(r) for r in shard0) + "\n")
        orders.append([(a.id, a.sample, a.response) for a in read_answers(layout)])
    assert orders[0] == orders[1]
    assert [r for _, _, r in orders[0]] == ["0", "1", "2", "2a", "2b", "3", "4", "5"]


def test_seqkd_selection() -> None:
    rows = [
        answer(1, "x", sample=0, mean_logprob=-0.5),
        answer(1, "y", sample=1, mean_logprob=-0.1),
        answer(2, "z", sample=0),
    ]
    assert [a.response for a in select_seqkd(rows, "bestLogprob")] == ["y", "z"]
    assert len(select_seqkd(rows, "all")) == 3
    assert rows[1].key == "q1@1" and answer(3).key == "q3"


# ---------------------------------------------------------------------------------------------- examples


def test_prompt_is_masked_and_the_answer_ends_with_the_end_of_turn(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tokenizer)
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert chat.closing() == [end]
    examples, stats = build_examples([answer(0, "bcd"), answer(1, "bc", finish="length")], chat, max_len=64)
    first, cut = examples
    text = tokenizer.decode(first.input_ids[: first.n_prompt].tolist())
    assert text == "<|im_start|>user\nabc0<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.decode(first.input_ids[first.n_prompt :].tolist()) == "bcd<|im_end|>"
    assert cut.input_ids[-1] != end  # cut by maxTokens: no end of turn to learn
    batch = collate(examples, [[0], [1]], pad_id=tokenizer.pad_token_id, packed=False)
    flat = batch.input_ids.reshape(-1)
    assert torch.equal(flat[batch.select + 1], batch.labels)  # each selected position predicts its label
    assert (
        batch.labels.tolist()
        == first.input_ids[first.n_prompt :].tolist() + cut.input_ids[cut.n_prompt :].tolist()
    )
    assert batch.attention_mask is not None and int(batch.attention_mask.sum()) == len(first) + len(cut)
    assert stats.examples == 2


def test_long_prompts_dropped_long_answers_truncated(tokenizer) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tokenizer)
    long_prompt = Answer(id="p", messages=messages("x" * 80), response="ok")
    examples, stats = build_examples([answer(0, "b" * 40), long_prompt], chat, max_len=32)
    assert len(examples) == 1 and len(examples[0]) == 32
    assert stats.dropped_long_prompt == 1 and stats.truncated == 1 and len(stats.notes) == 2
    with pytest.raises(DataError, match="none of the 1 training answers"):
        build_examples([long_prompt], chat, max_len=32)


def test_base_model_tokenizer_gets_chatml(tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    tok.chat_template = None
    chat = ChatFormat(tok)
    assert "<|im_start|>" in (tok.chat_template or "")
    assert chat.closing() == [tok.convert_tokens_to_ids("<|im_end|>")]


def _topk_file(path: Path, tok, rows: dict[str, list[int]], k: int = 3) -> TopKReader:  # type: ignore[no-untyped-def]
    entries = {
        key: TopK(
            np.asarray(tokens, dtype=np.int32),
            np.asarray([[t, 5, 6][:k] for t in tokens], dtype=np.int32),
            to_float16(np.asarray([[-0.1, -2.0, -3.0][:k] for _ in tokens], dtype=np.float32)),
        )
        for key, tokens in rows.items()
    }
    write_entries(path, entries, file_metadata(tokenizer_identity(tok), k, "teacher"))
    return TopKReader([path])


def test_topk_examples_use_the_teacher_tokens_and_a_onehot_end(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    chat = ChatFormat(tokenizer)
    end = chat.closing()[0]
    bcd = chat.encode("bcd")
    f = _topk_file(tmp_path / "t.safetensors", tokenizer, {"q0": bcd, "q1": [*bcd, end]})
    examples, stats = build_examples([answer(0), answer(1), answer(2)], chat, max_len=64, topk={0: f})
    assert stats.missing_topk == 1 and len(examples) == 2
    e0, e1 = examples
    assert e0.input_ids[e0.n_prompt :].tolist() == [*bcd, end]  # end of turn added ...
    assert e0.topk_ids is not None and e0.topk_logprobs is not None
    assert e0.topk_ids.shape == (4, 3) and e0.topk_ids[-1, 0] == end
    assert e0.topk_logprobs[-1].tolist() == [0.0, -math.inf, -math.inf]  # ... with a one-hot teacher row
    assert e1.topk_ids is not None and e1.topk_ids.shape == (4, 3)  # the teacher ended itself: nothing added
    batch = collate(examples, [[0, 1]], pad_id=0, packed=True)
    assert batch.topk_ids is not None and batch.topk_ids.shape == (8, 3) and batch.labels.shape == (8,)


# ---------------------------------------------------------------------------------------------- plan


def _examples(lengths: list[int], answer_len: int = 2) -> list[Example]:
    return [Example(np.arange(n, dtype=np.int64) % 50, n - answer_len) for n in lengths]


def test_plan_covers_every_example_once_per_epoch_and_splits_ranks() -> None:
    ex = _examples([5 + i % 7 for i in range(37)])
    plan = make_plan(ex, batch_size=4, world_size=2, accumulation=2, seed=3, packing=False, max_len=64)
    epoch = plan.epoch(0)
    assert len(epoch) % plan.per_step == 0
    seen = [i for mb in epoch for row in mb for i in row]
    assert set(seen) == set(range(37))  # all of them; the last step is filled from the start
    assert plan.steps_in_epoch(0) == math.ceil(math.ceil(37 / 4) / 4)
    micro = plan.step(0)
    r0, r1 = plan.rank_share(micro, 0), plan.rank_share(micro, 1)
    assert len(r0) == len(r1) == 2
    assert not {i for mb in r0 for r in mb for i in r} & {i for mb in r1 for r in mb for i in r}
    assert plan.supervised_tokens(micro) == 2 * sum(len(r) for mb in micro for r in mb)
    # bucketing: a batch holds similar lengths
    spreads = [max(ex[r[0]].__len__() for r in mb) - min(len(ex[r[0]]) for r in mb) for mb in epoch]
    assert np.mean(spreads) < 6


def test_plan_is_deterministic_and_locates_any_step() -> None:
    ex = _examples([5 + i % 7 for i in range(20)])
    a = make_plan(ex, batch_size=3, world_size=1, accumulation=1, seed=1, packing=False, max_len=64)
    b = make_plan(ex, batch_size=3, world_size=1, accumulation=1, seed=1, packing=False, max_len=64)
    spe = a.steps_in_epoch(0)
    assert a.step(spe + 2) == [b.epoch(1)[2]]
    assert a.locate(spe + 2) == (1, 2)
    assert a.epoch(0) != a.epoch(1)  # reshuffled every epoch
    assert a.total_steps(2.5) == 2 * spe + round(0.5 * spe)
    assert a.epoch_progress(spe) == 1.0


def test_packing_fills_rows_and_isolates_examples(tokenizer_dir: Path) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    ex = _examples([7, 9, 5, 11, 6, 8])
    plan = make_plan(ex, batch_size=2, world_size=1, accumulation=1, seed=0, packing=True, max_len=20)
    rows = [row for mb in plan.epoch(0) for row in mb]
    assert all(sum(len(ex[i]) for i in row) <= 20 for row in rows) and len(rows) < len(ex)
    torch.manual_seed(0)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2
        )
    ).eval()
    packed = collate(ex, [[0, 1], [2]], pad_id=0, packed=True)
    assert packed.attention_mask is None and packed.position_ids is not None
    assert packed.position_ids[0, :9].tolist() == [*range(7), 0, 1]
    alone = [collate(ex, [[i]], pad_id=0, packed=False) for i in (0, 1, 2)]
    with torch.no_grad():
        # use_cache=False, as in training: transformers detects packing only without a cache
        out = model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False).logits
        out = out.reshape(-1, 50)
        want = torch.cat(
            [
                model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits.reshape(-1, 50)[b.select]
                for b in alone
            ]
        )
    assert torch.allclose(out[packed.select], want, atol=1e-5)  # no attention across packed examples


# ---------------------------------------------------------------------------------------------- schedule


def test_schedule_warmup_decay_and_time_budget() -> None:
    assert lr_factor(0.01, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(0.1, "cosine", 0.1) == pytest.approx(1.0)
    assert lr_factor(0.55, "cosine", 0.1) == pytest.approx(0.5)
    assert lr_factor(0.55, "linear", 0.1) == pytest.approx(0.5)
    assert lr_factor(0.99, "constant", 0.1) == 1.0
    assert lr_factor(1.0, "cosine", 0.0) == pytest.approx(0.0)
    assert 0 < run_fraction(0, 100) < 0.01 and run_fraction(99, 100) < 1.0
    assert run_fraction(10, 1000, elapsed_s=50, max_seconds=100) == pytest.approx(0.5)  # time drives it
    with pytest.raises(ValueError):
        lr_factor(0.5, "step", 0.0)


# ---------------------------------------------------------------------------------------------- guards


def test_tokenizer_mismatch_is_refused_with_the_fix(tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    other = make_tokenizer(tmp_path / "other", merges=8)
    f = _topk_file(tmp_path / "t.safetensors", other, {"q0": [1, 2]})
    with pytest.raises(TokenizerMismatch) as info:
        check_topk_tokenizer([f], tokenizer, model_vocab=len(tokenizer))
    message = str(info.value)
    assert "sft" in message and "seqkd" in message and "t.safetensors" in message
    check_topk_tokenizer(
        [_topk_file(tmp_path / "ok.safetensors", tokenizer, {"q0": [1, 2]})], tokenizer, len(tokenizer)
    )
    with pytest.raises(TokenizerMismatch, match="beyond or unlike"):  # ids the student's vocabulary lacks
        check_topk_tokenizer(
            [_topk_file(tmp_path / "big.safetensors", tokenizer, {"q": [len(tokenizer) + 3]})],
            tokenizer,
            len(tokenizer),
        )
    with pytest.raises(TokenizerMismatch, match="sft or seqkd"):
        check_online_tokenizer(other, tokenizer)
    check_online_tokenizer(tokenizer, tokenizer)


def test_non_finite_loss_names_the_step() -> None:
    check_finite(3, 1.25)
    with pytest.raises(NonFiniteLoss, match="at step 7") as info:
        check_finite(7, float("nan"))
    assert info.value.step == 7
