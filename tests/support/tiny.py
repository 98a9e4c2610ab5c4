"""Tiny, offline, seeded models and data for the trainer's tests: a character-level tokenizer with a ChatML
template, small Llama models, a self-made task (shift every letter by one: ``abcde`` → ``bcdef``), a
stand-in for the collection stage (answers + top-k logprobs, written with the real writer), and stage
configs. Everything is built in well under a second except training the teacher (a few seconds)."""

from __future__ import annotations

import json
import os
import random
import string
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from tests.support.builders import make_run

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LETTERS = string.ascii_lowercase[:12]


def make_tokenizer(out: Path, merges: int = 0) -> Any:
    """A character-level tokenizer (byte-level BPE with no merges) with ChatML special tokens; ``merges``
    makes a different tokenizer (multi-character tokens, another vocabulary)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=len(specials) + 256 + merges,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([string.printable, *(["abcabc defdef"] * 10 if merges else [])], trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<pad>")
    fast.chat_template = CHATML
    fast.save_pretrained(out)
    return fast


def make_llama(
    out: Path, tokenizer: Any, *, hidden: int = 32, layers: int = 1, heads: int = 2, seed: int = 0
) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------------------------------------- the task


def task_prompts(n: int, seed: int, length: int = 5) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(LETTERS) for _ in range(length)) for _ in range(n)]


def shift(text: str) -> str:
    return "".join(LETTERS[(LETTERS.index(c) + 1) % len(LETTERS)] for c in text)


def messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


def train_teacher(model_dir: Path, steps: int = 400, seed: int = 0) -> None:
    """Teach ``model_dir`` the task with a plain loop on ground-truth answers (the test's teacher)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is as fast and does not fight other processes
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    seqs, starts = [], []
    for p in task_prompts(3000, seed + 1):
        prompt = tok.apply_chat_template(messages(p), tokenize=False, add_generation_prompt=True)
        ids = tok(prompt + shift(p) + "<|im_end|>", add_special_tokens=False)["input_ids"]
        seqs.append(ids)
        starts.append(len(tok(prompt, add_special_tokens=False)["input_ids"]))
    data = torch.tensor(seqs)
    labels = data.clone()
    for i, s in enumerate(starts):
        labels[i, :s] = -100
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(data), (64,), generator=gen)
        loss = model(input_ids=data[idx], labels=labels[idx]).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        for g in opt.param_groups:
            g["lr"] = 3e-3 * (1 - step / steps)
    model.save_pretrained(model_dir)
    torch.set_num_threads(threads)


def load(model_dir: str | Path) -> tuple[Any, Any]:
    """(tokenizer, model in eval mode), loaded afresh (the directory may have changed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir).eval()


def _prompt_ids(tok: Any, prompt: str) -> list[int]:
    text = tok.apply_chat_template(messages(prompt), tokenize=False, add_generation_prompt=True)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def _padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[Any, Any]:
    import torch

    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(list(r))
        mask[i, : len(r)] = 1
    return ids, mask


def greedy_answers(model_dir: str | Path, prompts: Sequence[str], max_new_tokens: int = 8) -> list[list[int]]:
    """The model's greedy answer token ids (ending with its end token when it stops). The task's prompts
    all have one length, so they generate as one batch without padding."""
    import torch

    tok, model = load(model_dir)
    rows = [_prompt_ids(tok, p) for p in prompts]
    assert len({len(r) for r in rows}) == 1, "the task's prompts share a length"
    with torch.no_grad():
        gen = model.generate(
            torch.tensor(rows), max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
        )
    out = []
    for row in gen[:, len(rows[0]) :].tolist():
        if tok.eos_token_id in row:
            row = row[: row.index(tok.eos_token_id) + 1]
        out.append(row)
    return out


def _answer_logprobs(
    tok: Any, model: Any, prompts: Sequence[str], answers: Sequence[Sequence[int]]
) -> list[Any]:
    """Teacher-forced log-probabilities at each answer position ([len(answer), V] per prompt)."""
    import torch

    p_rows = [_prompt_ids(tok, p) for p in prompts]
    ids, mask = _padded([p + list(a) for p, a in zip(p_rows, answers, strict=True)], tok.pad_token_id)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), dim=-1)
    return [
        logprobs[i, len(p) - 1 : len(p) - 1 + len(a)]
        for i, (p, a) in enumerate(zip(p_rows, answers, strict=True))
    ]


def agreement(
    student_dir: str | Path, teacher_dir: str | Path, prompts: Sequence[str], answers: Sequence[Sequence[int]]
) -> float:
    """Teacher-forced top-1 agreement with the teacher's answers (a smooth measure of imitation)."""
    import torch

    tok, _ = load(teacher_dir)
    _, model = load(student_dir)
    rows = _answer_logprobs(tok, model, prompts, answers)
    hits = sum(int((r.argmax(-1) == torch.tensor(list(a))).sum()) for r, a in zip(rows, answers, strict=True))
    return hits / max(sum(len(a) for a in answers), 1)


def exact_match(student_dir: str | Path, prompts: Sequence[str], answers: Sequence[Sequence[int]]) -> float:
    """Share of prompts where the student's greedy answer is exactly the teacher's (what evaluation sees)."""
    mine = greedy_answers(student_dir, prompts)
    return sum(list(a) == b for a, b in zip(answers, mine, strict=True)) / max(len(prompts), 1)


# ---------------------------------------------------------------------------------------------- collection stand-in


def write_collection(
    root: Path,
    teacher_dir: Path,
    prompts: Sequence[str],
    *,
    top_k: int | None = None,
    eval_prompts: Sequence[str] = (),
    shards: int = 1,
    answers: Sequence[Sequence[int]] | None = None,
) -> list[list[int]]:
    """What the collection stage writes: shard JSONL lines (+ top-k files when ``top_k``)."""
    import numpy as np
    from distillery_trainer.data.topk import (
        TopK,
        file_metadata,
        to_float16,
        tokenizer_identity,
        write_entries,
    )
    from distillery_trainer.layout import RunLayout

    layout = RunLayout(root)
    layout.collect_dir.mkdir(parents=True, exist_ok=True)
    tok, model = load(teacher_dir)
    answers = list(answers) if answers is not None else greedy_answers(teacher_dir, prompts)
    eval_answers = greedy_answers(teacher_dir, eval_prompts) if eval_prompts else []
    items = [(p, a, "train") for p, a in zip(prompts, answers, strict=True)]
    items += [(p, a, "eval") for p, a in zip(eval_prompts, eval_answers, strict=True)]
    for shard in range(shards):
        part = items[shard::shards]
        entries: dict[str, TopK] = {}
        logprobs = (
            _answer_logprobs(tok, model, [p for p, _, _ in part], [a for _, a, _ in part]) if top_k else []
        )
        lines = []
        for i, (p, a, split) in enumerate(part):
            text_ids = [t for t in a if t != tok.eos_token_id]
            line_id = f"s{shard}-{i}"
            lines.append(
                json.dumps(
                    {
                        "id": line_id,
                        "messages": messages(p),
                        "response": tok.decode(text_ids),
                        "finish_reason": "stop" if tok.eos_token_id in a else "length",
                        "usage": {"prompt_tokens": 10, "completion_tokens": len(a)},
                        "split": split,
                    }
                )
            )
            if top_k:
                top = logprobs[i].topk(top_k, dim=-1)
                entries[line_id] = TopK(
                    np.asarray(a, dtype=np.int32),
                    top.indices.numpy().astype(np.int32),
                    to_float16(top.values.float().numpy()),
                )
        layout.shard_file(shard).write_text("\n".join(lines) + "\n")
        if entries:
            meta = file_metadata(tokenizer_identity(tok), int(top_k or 0), "teacher")
            write_entries(layout.logprobs_file(shard), entries, meta)
    return answers


# ---------------------------------------------------------------------------------------------- stage configs


def stage_config(
    root: Path,
    student: Path | str,
    training: dict[str, Any],
    *,
    teacher: dict[str, Any] | None = None,
    student_extra: dict[str, Any] | None = None,
) -> Path:
    spec_patch: dict[str, Any] = {
        "student": {"model": str(student), **(student_extra or {})},
        "training": training,
    }
    builder = make_run("tiny").spec(spec_patch)
    if teacher is not None:
        builder = builder.spec({"teacher": teacher})
    doc = {
        "run": {"name": "tiny", "namespace": "default"},
        "spec": builder.obj()["spec"],
        "artifacts": str(root),
        "cacheDir": str(root / "cache"),
    }
    path = root / "stage.yaml"
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def trainer_cmd() -> list[str]:
    return [sys.executable, "-m", "distillery_trainer.cli"]


def run_train(
    config: Path, *extra: str, timeout: float = 300, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "DISTILLERY_TERMINATION_LOG": str(config.parent / "termination.log"),
        **(env or {}),
    }
    return subprocess.run(
        [*trainer_cmd(), "train", "--config", str(config), *extra],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


def prompt_logprobs(model_dir: Path) -> Any:
    """vLLM's ``prompt_logprobs`` computed by a real model (fp32, on the CPU): for a fake teacher server.
    Entry ``i`` is the distribution of token ``i`` given the tokens before it (top-k and token ``i``)."""
    import threading

    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    lock = threading.Lock()

    def score(ids: list[int], k: int) -> list[dict[str, Any] | None]:
        with lock, torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
        out: list[dict[str, Any] | None] = [None]
        for i in range(1, len(ids)):
            row = logp[i - 1]
            top = torch.topk(row, k)
            entry = {
                str(int(t)): {"logprob": float(v), "rank": r + 1, "decoded_token": ""}
                for r, (v, t) in enumerate(zip(top.values, top.indices, strict=True))
            }
            token = ids[i]
            if str(token) not in entry:
                rank = int((row > row[token]).sum()) + 1
                entry[str(token)] = {"logprob": float(row[token]), "rank": rank, "decoded_token": ""}
            out.append(entry)
        return out

    return score
