"""On-policy distillation: the loss on the teacher's scores of a sample against a direct computation (values
and gradients, reverse KL and JSD, masked prompt tokens, the off-policy share), and the student's samples."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from distillery_trainer.api.spec import OnPolicy
from distillery_trainer.train.distributed import DistEnv
from distillery_trainer.train.examples import ChatFormat, Example
from distillery_trainer.train.losses import TopKTeacher, distill_loss_from_logits
from distillery_trainer.train.modeling import Objective, topk_teacher
from distillery_trainer.train.onpolicy import (
    OnPolicySteps,
    is_on_policy_step,
    loss_config,
    sample,
    scored_batch,
    warmup_steps,
)
from distillery_trainer.train.scoring import Scores, ScoringStats, parse_prompt_logprobs

V, K, PAD = 11, 3, 0


def teacher_logprobs(context: list[int]) -> torch.Tensor:
    """A fixed 'teacher' over V tokens that depends on the previous token (float64, T = 1)."""
    gen = torch.Generator().manual_seed(1000 + context[-1])
    return torch.log_softmax(torch.randn(V, generator=gen, dtype=torch.float64) * 2.0, -1)


def vllm_choice(seq: list[int], k: int) -> dict[str, Any]:
    """What vLLM answers for ``seq`` with prompt_logprobs k: top-k and the token itself, by rank."""
    entries: list[Any] = [None]
    for i in range(1, len(seq)):
        lp = teacher_logprobs(seq[:i])
        order = torch.argsort(lp, descending=True).tolist()
        keep = set(order[:k]) | {seq[i]}
        entries.append(
            {str(t): {"logprob": float(lp[t]), "rank": order.index(t) + 1, "decoded_token": ""} for t in keep}
        )
    return {"prompt_logprobs": entries, "prompt_token_ids": seq}


@dataclass
class FakeScorer:
    """The teacher's server without HTTP: vLLM's answer parsed by the real parser."""

    k: int = K
    stats: ScoringStats = field(default_factory=ScoringStats)
    seen: list[tuple[list[int], list[int]]] = field(default_factory=list)

    def score(self, pairs: Any) -> list[Scores]:
        out = []
        for p, a in pairs:
            seq = [*p, *a]
            self.seen.append((list(p), list(a)))
            out.append(parse_prompt_logprobs(vllm_choice(seq, self.k), seq, len(p), self.k))
            self.stats.tokens += len(seq)
        return out


PAIRS = [([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10, 4, 2])]


def direct_loss(logits: torch.Tensor, pairs: Any, op: OnPolicy) -> torch.Tensor:
    """The on-policy loss written out token by token (see train/onpolicy.py's docstring): both
    distributions over the teacher's top-k, the sampled token and one bucket for every other token."""
    t, beta = op.temperature, op.beta
    total, n = logits.new_zeros(()), 0
    for b, (prompt, answer) in enumerate(pairs):
        seq = [*prompt, *answer]
        for j, token in enumerate(answer):
            pos = len(prompt) + j - 1  # the position whose logits predict answer[j]
            lp = teacher_logprobs(seq[: pos + 1]).float().double()  # the scores travel as float32
            support = sorted(set(torch.argsort(lp, descending=True)[:K].tolist()) | {token})
            # the teacher over its top-k (+ the sampled token) and its tail bucket, known at T = 1 ...
            tail = (1 - lp[support].exp().sum()).clamp_min(1e-6).log().reshape(1)
            q = torch.softmax(torch.cat([lp[support], tail]) / t, -1)
            # ... against the student's full softened distribution, coarsened the same way
            p_full = torch.softmax(logits[b, pos] / t, -1)
            s = torch.cat([p_full[support], (1 - p_full[support].sum()).reshape(1)])
            if op.divergence == "reverseKL":
                d = (s * (s.log() - q.log())).sum()
            else:
                m = beta * q + (1 - beta) * s
                d = beta * (q * (q.log() - m.log())).sum() + (1 - beta) * (s * (s.log() - m.log())).sum()
            total = total + d
            n += 1
    return total * t * t / n


@pytest.mark.parametrize(
    "op",
    [
        OnPolicy(divergence="reverseKL", temperature=1.0),
        OnPolicy(divergence="reverseKL", temperature=0.7),
        OnPolicy(divergence="jsd", beta=0.3, temperature=1.5),
    ],
    ids=["reverse-kl", "reverse-kl-softened", "jsd"],
)
def test_the_loss_is_the_direct_computation_with_prompt_tokens_masked(op: OnPolicy) -> None:
    scorer = FakeScorer()
    batch = scored_batch(PAIRS, scorer.score(PAIRS), PAD, V)
    assert batch.labels.tolist() == [4, 5, 6, 7, 10, 4, 2]  # the answers' tokens only
    width = batch.input_ids.shape[1]
    torch.manual_seed(0)
    logits = torch.randn(len(PAIRS), width, V, dtype=torch.float64, requires_grad=True)
    teacher = TopKTeacher(batch.topk_ids, batch.topk_logprobs.double())
    rows = logits.reshape(-1, V).index_select(0, batch.select)
    parts = distill_loss_from_logits(rows, batch.labels, teacher=teacher, config=loss_config(op))
    (grad,) = torch.autograd.grad(parts.total, logits)

    ref_logits = logits.detach().clone().requires_grad_(True)
    ref = direct_loss(ref_logits, PAIRS, op)
    (ref_grad,) = torch.autograd.grad(ref, ref_logits)
    assert float(parts.ce) == 0.0  # alpha = 1: no cross-entropy on the student's own samples
    assert float(parts.total.detach()) == pytest.approx(float(ref.detach()), rel=1e-9, abs=1e-12)
    assert torch.allclose(grad, ref_grad, atol=1e-10), (grad - ref_grad).abs().max()
    for b, (prompt, answer) in enumerate(PAIRS):  # prompt positions (but the last) and the end: no gradient
        assert grad[b, : len(prompt) - 1].abs().max() == 0
        assert grad[b, len(prompt) + len(answer) - 1 :].abs().max() == 0
        assert grad[b, len(prompt) - 1 : len(prompt) + len(answer) - 1].abs().sum(-1).min() > 0


def test_the_sampled_token_outside_the_teacher_top_k_still_counts() -> None:
    """The sample's own token gets the teacher's judgement even when it is not in its top-k (k = 1)."""
    s = FakeScorer(k=1).score(PAIRS)[0]
    assert s.ids.shape == (4, 2)
    for j, token in enumerate(PAIRS[0][1]):
        row = s.ids[j].tolist()
        assert token in row if np.isfinite(s.logprobs[j, 1]) else token == row[0]


def test_reverse_kl_charges_the_students_mass_outside_the_teachers_top_k() -> None:
    """The collapse path of the first bench run: a student piling its mass on a token the teacher does not
    rank (here 9, outside its top-3, not sampled) must pay for it. Conditioning the student on the
    teacher's top-k (the former loss) left that token's logit without any gradient."""
    (prompt, answer), k = PAIRS[0], K
    scores = FakeScorer().score([(prompt, answer[:1])])
    batch = scored_batch([(prompt, answer[:1])], scores, PAD, V)
    ranked = set(batch.topk_ids[0].tolist())
    outside = next(t for t in range(V - 1, -1, -1) if t not in ranked)
    logits = torch.zeros(1, V, dtype=torch.float64)
    logits[0, outside] = 6.0  # ~97 % of the student's mass off the teacher's top-k
    logits.requires_grad_(True)
    teacher = TopKTeacher(batch.topk_ids, batch.topk_logprobs.double())
    parts = distill_loss_from_logits(
        logits, batch.labels, teacher=teacher, config=loss_config(OnPolicy(divergence="reverseKL"))
    )
    (grad,) = torch.autograd.grad(parts.total, logits)
    assert len(ranked) == k + 1 or len(ranked) == k
    assert float(grad[0, outside]) > 0.01  # descent lowers it (the former loss: exactly 0)
    assert float(parts.total.detach()) > 1.0  # and the divergence says the student is far from the teacher


def test_a_few_on_policy_steps_raise_the_teachers_preferred_tokens() -> None:
    """Sign and alignment end to end: a bigram student trained on its own samples, scored by the fake
    teacher's server, gains probability on the teacher's top-1 after each token and gets closer to it."""
    op = OnPolicy(
        lmbda=1.0, max_new_tokens=3, sftWeight=0, offPolicyDivergence="reverseKL", divergence="reverseKL"
    )
    torch.manual_seed(0)
    student = _Student()
    steps = _steps(op, seed=3)
    objective = Objective(student, loss_config(op))
    contexts = list(range(1, V))
    best = [int(teacher_logprobs([c]).argmax()) for c in contexts]

    def preferred() -> float:
        with torch.no_grad():
            probs = torch.softmax(student.table.weight[contexts], -1)
        return float(probs[range(len(contexts)), best].mean())

    before = preferred()
    optimizer = torch.optim.SGD(objective.parameters(), lr=2.0)
    losses = []
    for step in range(60):
        pieces, on = steps.batches(step, [[[0], [1]]], objective)
        assert on and len(pieces) == 1  # no anchor with sftWeight 0
        parts = objective(pieces[0].batch, topk_teacher(pieces[0].batch), pieces[0].normalizer)
        parts.total.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(parts.total.detach()))
    assert preferred() > before + 0.2, (before, preferred())
    assert sum(losses[-10:]) < sum(losses[:10])


def test_the_warm_up_trains_on_the_collected_answers_with_the_off_policy_divergence() -> None:
    """The defaults (GKD's lmbda 0.5 after a quarter of the planned steps off-policy, SFT on the teacher's
    answers with the anchor at every step) and a step's loss following from whether it is on-policy."""
    op = OnPolicy()
    assert (op.lmbda, op.off_policy_warmup, op.off_policy_divergence, op.sft_weight) == (
        0.5,
        0.25,
        "none",
        1.0,
    )
    assert warmup_steps(op, 32) == 8 and warmup_steps(op, 1) == 1 and warmup_steps(op, 0) == 0
    assert warmup_steps(OnPolicy(offPolicyWarmup=0), 32) == 0
    draws = [is_on_policy_step(7, s, 1.0, warmup=8) for s in range(32)]
    assert draws == [False] * 8 + [True] * 24
    steps = _steps(op, seed=1, total_steps=40)
    assert steps.warmup == 10
    objective = Objective(_Student(), loss_config(op))
    assert not any(steps.batches(s, [[[0], [1]]], objective)[1] for s in range(10))
    assert steps.configs[False].alpha == 0.0 and steps.configs[True].divergence == "jsd"
    assert steps.configs[True].jsd_beta == 0.5
    forward = _steps(OnPolicy(offPolicyDivergence="forwardKL"), seed=1, total_steps=40)
    assert forward.configs[False].divergence == "forwardKL" and forward.configs[False].alpha == 0.5
    assert steps.configs[True].topk_tail == "bucket" and steps.configs[True].alpha == 1.0


def test_sft_weight_adds_the_cross_entropy_on_the_collected_answers_to_every_step() -> None:
    """The anchor, against the two terms computed apart: an off-policy step's loss is its divergence plus
    sftWeight times the cross-entropy on the same rows (one forward: alpha and the normaliser); an on-policy
    step's is the divergence on the samples plus sftWeight times the cross-entropy on the answers (a second
    part). Gradients are the same sum."""
    from distillery_trainer.train.losses import DistillConfig

    w = 0.7
    torch.manual_seed(0)
    student = _Student()
    answers = [t for _, a in PAIRS for t in a]
    for lmbda in (0.0, 1.0):
        op = OnPolicy(lmbda=lmbda, max_new_tokens=3, sftWeight=w, offPolicyDivergence="forwardKL")
        pieces, on = _steps(op, seed=5).batches(0, [[[0], [1]]], Objective(student, loss_config(op)))
        assert on == (lmbda == 1.0)
        total = sum(
            Objective(student, p.config)(p.batch, topk_teacher(p.batch), p.normalizer).total for p in pieces
        )
        (got,) = torch.autograd.grad(total, student.table.weight)
        first = pieces[0].batch
        n = float(len(first.labels))
        divergence = Objective(student, DistillConfig(**{**vars(loss_config(op, on)), "alpha": 1.0}))
        expected = divergence(first, topk_teacher(first), n).total
        ce = pieces[-1].batch
        assert ce.labels.tolist() == answers
        expected = (
            expected + w * Objective(student, DistillConfig(alpha=0.0))(ce, None, float(len(answers))).total
        )
        (want,) = torch.autograd.grad(expected, student.table.weight)
        assert len(pieces) == (2 if on else 1)
        assert float(total.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_off_policy_steps_without_a_divergence_are_sft_and_score_nothing() -> None:
    """offPolicyDivergence none: an off-policy step is sftWeight times the cross-entropy on the collected
    answers, the teacher's server is not asked, and the running divergence is left as the on-policy steps
    made it."""
    scorer = FakeScorer()
    op = OnPolicy(lmbda=0.0, offPolicyDivergence="none", sftWeight=2.0)
    steps = _steps(op, seed=1, scorer=scorer)
    objective = Objective(_Student(), loss_config(op))
    pieces, on = steps.batches(0, [[[0], [1]]], objective)
    assert not on and scorer.seen == [] and steps.tokens_scored == 0
    (piece,) = pieces
    assert piece.batch.labels.tolist() == [4, 5, 6, 7, 10, 4, 2] and piece.batch.topk_ids is None
    assert piece.config.alpha == 0.0 and piece.normalizer == 3.5  # 7 answer tokens / sftWeight 2
    steps.divergence = 0.25
    assert steps.observe(0.0, 1.0)["divergence"] == 0.25
    with pytest.raises(ValueError, match="sftWeight is 0"):  # a config built without validation
        _steps(OnPolicy(offPolicyDivergence="none", sftWeight=0), seed=1)


def test_which_steps_are_on_policy_follows_from_the_seed_and_lmbda() -> None:
    draws = [is_on_policy_step(7, s, 0.3) for s in range(4000)]
    assert abs(sum(draws) / len(draws) - 0.3) < 0.03
    assert draws == [is_on_policy_step(7, s, 0.3) for s in range(4000)]  # a resumed run agrees
    assert draws != [is_on_policy_step(8, s, 0.3) for s in range(4000)]
    assert not any(is_on_policy_step(7, s, 0.0) for s in range(500))
    assert all(is_on_policy_step(7, s, 1.0) for s in range(500))


# ---------------------------------------------------------------------------------------------- the steps


class _Tok:
    pad_token_id, eos_token_id, chat_template = PAD, 2, "x"


def _examples() -> list[Example]:
    return [Example(np.array([*p, *a], dtype=np.int64), len(p)) for p, a in PAIRS]


def _steps(op: OnPolicy, seed: int, scorer: Any = None, **kw: Any) -> OnPolicySteps:
    """The steps of one rank over the two examples, scored by ``scorer`` (a fresh fake server by default)."""
    return OnPolicySteps(
        op,
        seed=seed,
        env=DistEnv(),
        examples=_examples(),
        chat=ChatFormat(_Tok(), [2]),
        scorer=scorer or FakeScorer(),
        pad_id=PAD,
        vocab=V,
        fsdp=False,
        **kw,
    )


class _Student(torch.nn.Module):
    """A bigram 'student' with ``generate``: enough for the step's plumbing."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(V, V)

    def get_output_embeddings(self) -> None:
        return None

    def forward(self, input_ids: torch.Tensor, **_: Any) -> Any:
        return type("Out", (), {"logits": self.table(input_ids)})()

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **_: Any) -> torch.Tensor:
        out = input_ids
        for _ in range(3):
            probs = torch.softmax(self.table(out[:, -1]), -1)
            out = torch.cat([out, torch.multinomial(probs, 1)], 1)
        return out


def test_off_policy_steps_train_on_the_collected_answers_scored_by_the_teacher() -> None:
    scorer = FakeScorer()
    steps = _steps(OnPolicy(lmbda=0.0, offPolicyDivergence="forwardKL"), seed=1, scorer=scorer)
    objective = Objective(_Student(), loss_config(OnPolicy()))
    pieces, on = steps.batches(0, [[[0], [1]]], objective)
    assert not on and len(pieces) == 1
    assert scorer.seen == [(list(p), list(a)) for p, a in PAIRS]
    assert pieces[0].batch.labels.tolist() == [4, 5, 6, 7, 10, 4, 2]
    # the divergence plus sftWeight (1) times the cross-entropy on the same rows: alpha 1/2, normaliser 7/2
    assert pieces[0].config.alpha == 0.5 and pieces[0].normalizer == 3.5
    assert steps.tokens_scored == sum(len(p) + len(a) for p, a in PAIRS) and steps.samples == 0


def test_on_policy_steps_train_on_the_students_samples() -> None:
    scorer = FakeScorer()
    op = OnPolicy(lmbda=1.0, samples_per_prompt=2, max_new_tokens=3)
    steps = _steps(op, seed=1, scorer=scorer)
    torch.manual_seed(0)
    objective = Objective(_Student(), loss_config(op))
    before = torch.random.get_rng_state()
    pieces, on = steps.batches(0, [[[0], [1]]], objective)
    assert torch.equal(torch.random.get_rng_state(), before)  # sampling leaves the training's RNG alone
    assert on and [p for p, _ in scorer.seen] == [[1, 2, 3], [1, 2, 3], [8, 9], [8, 9]]
    samples = [a for _, a in scorer.seen]
    assert all(1 <= len(a) <= 3 and (2 not in a[:-1]) for a in samples)  # cut after the end token
    assert pieces[0].batch.labels.tolist() == [t for a in samples for t in a]
    assert pieces[0].normalizer == sum(len(a) for a in samples) and steps.samples == 4
    assert pieces[0].config.alpha == 1.0 and pieces[0].config.divergence == "jsd"
    # the anchor: the collected answers of the same prompts, cross-entropy alone over their 7 tokens
    anchor = pieces[1]
    assert len(pieces) == 2 and anchor.batch.labels.tolist() == [4, 5, 6, 7, 10, 4, 2]
    assert anchor.config.alpha == 0.0 and anchor.normalizer == 7.0 and anchor.batch.topk_ids is None
    again = FakeScorer()
    steps.scorer = again  # type: ignore[assignment]
    steps.batches(0, [[[0], [1]]], objective)
    assert [a for _, a in again.seen] == samples  # same (seed, step, rank): same samples
    steps.batches(1, [[[0], [1]]], objective)
    assert [a for _, a in again.seen[4:]] != samples


def test_the_progress_says_how_the_teacher_judges_the_students_samples() -> None:
    """The share of the latest on-policy step's samples that ended (an end-of-turn token within
    maxNewTokens) and the teacher's mean log-probability per token of them: how a collapsing student shows
    (its samples stop ending, the teacher finds them unlikely) before the evaluation does."""
    scorer = FakeScorer()
    op = OnPolicy(lmbda=1.0, samples_per_prompt=3, max_new_tokens=3)
    steps = _steps(op, seed=3, scorer=scorer)
    torch.manual_seed(0)
    objective = Objective(_Student(), loss_config(op))
    steps.batches(0, [[[0], [1]]], objective)
    progress = steps.observe(0.5, 1.0)
    samples = [a for _, a in scorer.seen]
    ended = sum(1 for a in samples if a[-1] == 2) / len(samples)
    assert 0 < ended < 1  # the seed gives both kinds: the figure is a share, not a flag
    tokens = [(p, a) for p, a in scorer.seen]
    lps = [float(teacher_logprobs([*p, *a][: len(p) + j])[a[j]]) for p, a in tokens for j in range(len(a))]
    assert progress["samples_ended"] == pytest.approx(ended)
    assert progress["teacher_logprob"] == pytest.approx(sum(lps) / len(lps), rel=1e-5)
    # an off-policy step (the teacher's own answers) leaves the figures of the latest on-policy step
    steps.op = OnPolicy(lmbda=0.0)
    steps.batches(1, [[[0], [1]]], objective)
    assert steps.observe(0.5, 1.0)["samples_ended"] == pytest.approx(ended)
    restored = _steps(op, seed=3)
    restored.restore(steps.state())
    assert restored.observe(0.5, 1.0)["teacher_logprob"] == pytest.approx(progress["teacher_logprob"])


class _NanScorer(FakeScorer):
    """A teacher whose server answers NaN for one sampled token's logprob (the parser reads it as -inf)."""

    def score(self, pairs: Any) -> list[Scores]:
        out = super().score(pairs)
        out[0].sampled[0] = -math.inf
        return out


def test_a_sampled_token_the_teacher_gives_no_finite_logprob_leaves_the_figure_finite() -> None:
    """teacherLogprob goes to status.training, which the API server takes as JSON: an infinite mean
    (-Infinity is not JSON) would fail the status write. It is the mean over the tokens with a finite logprob."""
    scorer = _NanScorer()
    op = OnPolicy(lmbda=1.0, samples_per_prompt=2, max_new_tokens=3)
    steps = _steps(op, seed=3, scorer=scorer)
    torch.manual_seed(0)
    steps.batches(0, [[[0], [1]]], Objective(_Student(), loss_config(op)))
    lps = [
        float(teacher_logprobs([*p, *a][: len(p) + j])[a[j]])
        for i, (p, a) in enumerate(scorer.seen)
        for j in range(len(a))
        if (i, j) != (0, 0)
    ]
    figure = steps.observe(0.5, 1.0)["teacher_logprob"]
    assert math.isfinite(figure) and figure == pytest.approx(sum(lps) / len(lps), rel=1e-5)


def test_samples_of_a_real_student_stop_at_the_end_of_turn(student_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    chat = ChatFormat(tok, [tok.eos_token_id])
    prompts = [
        chat.prompt([{"role": "user", "content": "abcde"}]),
        chat.prompt([{"role": "user", "content": "fg"}]),
    ]
    objective = Objective(model, loss_config(OnPolicy()))
    op = OnPolicy(max_new_tokens=12, samples_per_prompt=3, temperature=1.0)
    kw: dict[str, Any] = dict(
        op=op, end_ids=chat.end_ids, pad_id=tok.pad_token_id, device=torch.device("cpu"), fsdp=False
    )
    first = sample(objective, prompts, seed=5, **kw)
    assert len(first) == 6 and first == sample(objective, prompts, seed=5, **kw)
    assert first != sample(objective, prompts, seed=6, **kw)
    for s in first:
        assert 1 <= len(s) <= 12 and all(t not in chat.end_ids for t in s[:-1])
    assert objective.training  # back to training mode
    assert math.isfinite(float(model.lm_head.weight.detach().sum()))


# ---------------------------------------------------------------------------------------------- the vLLM engine's life


class _FakeEngine:
    """What OnPolicySteps asks of the colocated engine, recorded (the real one: test_onpolicy_vllm.py)."""

    built: list[Any] = []

    def __init__(self, settings: Any, env: DistEnv) -> None:
        self.synced: list[list[str]] = []
        self.sync_seconds: list[float] = []
        self.closed = False
        _FakeEngine.built.append(self)

    def sync(self, weights: Any) -> float:
        self.synced.append([name for name, _ in weights])
        self.sync_seconds.append(0.0)
        return 0.0

    def sample(self, prompts: Any, *, op: OnPolicy, end_ids: set[int], seed: int) -> list[list[int]]:
        return [[4, 2] for _ in prompts for _ in range(op.samples_per_prompt)]

    def close(self) -> None:
        self.closed = True


def _steps_with_engine(monkeypatch: pytest.MonkeyPatch, lmbda: float, **settings: Any) -> OnPolicySteps:
    from distillery_trainer.train import onpolicy
    from distillery_trainer.train.vllm_sampler import EngineSettings

    monkeypatch.setattr(onpolicy, "VllmSampler", _FakeEngine)
    _FakeEngine.built = []
    engine = EngineSettings(
        model="m", tokenizer="m", dtype=torch.float32, max_model_len=64, max_num_seqs=4, **settings
    )
    return _steps(OnPolicy(lmbda=lmbda), seed=1, engine=engine)


def test_the_engine_is_built_at_the_first_on_policy_step_and_synced_when_the_step_changes(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Built from the checkpoint (step 0's weights): no sync at step 0, one at every later step it samples
    at; none on off-policy steps; a resumed run's engine is synced at its first on-policy step."""
    objective = Objective(_Student(), loss_config(OnPolicy()))
    steps = _steps_with_engine(monkeypatch, lmbda=1.0)
    pieces, on = steps.batches(0, [[[0], [1]]], objective)
    (engine,) = _FakeEngine.built
    assert on and engine.synced == []  # the engine holds step 0's weights
    assert pieces[0].batch.labels.tolist() == [4, 2, 4, 2]  # the engine's samples
    steps.batches(1, [[[0], [1]]], objective)
    steps.batches(1, [[[0], [1]]], objective)  # the same step again: the weights have not changed
    steps.batches(2, [[[0], [1]]], objective)
    assert engine.synced == [["table.weight"]] * 2
    steps.close()
    assert engine.closed and steps.engine is None

    off = _steps_with_engine(monkeypatch, lmbda=0.0)
    off.batches(0, [[[0], [1]]], objective)
    off.batches(1, [[[0], [1]]], objective)
    assert _FakeEngine.built == []  # off-policy steps never need it

    resumed = _steps_with_engine(monkeypatch, lmbda=1.0)
    resumed.batches(3, [[[0], [1]]], objective)
    assert len(_FakeEngine.built[0].synced) == 1  # the checkpoint's weights, not step 0's


def test_auto_samples_with_generate_when_the_gpu_share_is_not_free(monkeypatch: pytest.MonkeyPatch) -> None:
    gib = 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *_: (20 * gib, 80 * gib))
    objective = Objective(_Student(), loss_config(OnPolicy()))
    steps = _steps_with_engine(monkeypatch, lmbda=1.0, memory_share=0.3, auto=True)
    pieces, _ = steps.batches(0, [[[0], [1]]], objective)
    assert _FakeEngine.built == [] and steps.engine_settings is None  # 20 GiB free < 0.3 x 80: generate
    assert len(pieces[0].batch.labels) > 0
    fits = _steps_with_engine(monkeypatch, lmbda=1.0, memory_share=0.2, auto=True)
    fits.batches(0, [[[0], [1]]], objective)
    assert len(_FakeEngine.built) == 1
