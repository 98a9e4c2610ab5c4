"""Fixtures for the trainer's tests: a tiny tokenizer, a tiny trained teacher (cached across sessions under
``$DISTILLERY_TEST_CACHE`` or ``~/.cache/distillery-tests``), and its collected answers."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import tiny

CACHE = Path(os.environ.get("DISTILLERY_TEST_CACHE") or Path.home() / ".cache" / "distillery-tests")
TEACHER_VERSION = "tiny-teacher-v1"  # bump when tiny.train_teacher or the task changes
TRAIN_PROMPTS = tiny.task_prompts(256, seed=5)
EVAL_PROMPTS = tiny.task_prompts(16, seed=6)
HELD_OUT = tiny.task_prompts(40, seed=77)
TOP_K = 8


@pytest.fixture(scope="package", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors: one thread is as fast, and does not fight the other processes on a shared machine."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    tiny.make_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="session")
def teacher_dir() -> Path:
    """A 2-layer Llama that has learnt the task (~99 % correct), trained once and cached."""
    out = CACHE / TEACHER_VERSION
    if (out / "config.json").exists():
        return out
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{TEACHER_VERSION}.", dir=CACHE))
    tok = tiny.make_tokenizer(tmp)
    tiny.make_llama(tmp, tok, hidden=64, layers=2, heads=4, seed=0)
    tiny.train_teacher(tmp, steps=400, seed=0)
    try:
        os.replace(tmp, out)
    except OSError:  # another session won the race
        shutil.rmtree(tmp, ignore_errors=True)
    return out


@pytest.fixture(scope="session")
def student_dir(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """A fresh, untrained 1-layer Llama with the teacher's tokenizer."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("student")
    tiny.make_llama(out, AutoTokenizer.from_pretrained(teacher_dir), hidden=32, layers=1, heads=2, seed=1)
    return out


@pytest.fixture(scope="session")
def collected(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> Path:
    """The teacher's answers (+ top-8 logprobs) as the collection stage writes them, in two shards."""
    root = tmp_path_factory.mktemp("collected")
    tiny.write_collection(root, teacher_dir, TRAIN_PROMPTS, top_k=TOP_K, eval_prompts=EVAL_PROMPTS, shards=2)
    return root / "collect"


@pytest.fixture(scope="session")
def held_out(teacher_dir: Path) -> tuple[list[str], list[list[int]]]:
    return HELD_OUT, tiny.greedy_answers(teacher_dir, HELD_OUT)


def new_run(tmp_path: Path, collected: Path, name: str = "run") -> Path:
    root = tmp_path / name
    shutil.copytree(collected, root / "collect")
    return root
