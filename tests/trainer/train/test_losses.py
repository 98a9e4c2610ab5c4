"""The distillation losses against straightforward reference implementations, on random tensors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from distillery_trainer.train.losses import (
    DenseTeacher,
    DistillConfig,
    TopKTeacher,
    distill_loss,
    distill_loss_from_logits,
)

N, V, H = 29, 41, 12
DIVERGENCES = ["forwardKL", "reverseKL", "jsd"]


# ---------------------------------------------------------------------------------------------- references


def ref_divergence(logp_t: torch.Tensor, logp_s: torch.Tensor, divergence: str, beta: float) -> torch.Tensor:
    """Per-row divergence from log-probabilities, written the obvious way (zero-probability terms are 0)."""

    def kl(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
        p = lp.exp()
        return torch.where(p > 0, p * (lp - lq), torch.zeros_like(p)).sum(-1)

    if divergence == "forwardKL":
        return kl(logp_t, logp_s)
    if divergence == "reverseKL":
        return kl(logp_s, logp_t)
    mix = (beta * logp_t.exp() + (1 - beta) * logp_s.exp()).log()
    return beta * kl(logp_t, mix) + (1 - beta) * kl(logp_s, mix)


def ref_dense(logits, labels, teacher_logits, *, temperature, alpha, divergence="forwardKL", beta=0.5):
    valid = labels != -100
    t = temperature
    logp_s = F.log_softmax(logits / t, dim=-1)
    logp_t = F.log_softmax(teacher_logits / t, dim=-1)
    kd = ref_divergence(logp_t, logp_s, divergence, beta)[valid].sum()
    ce = F.cross_entropy(logits[valid], labels[valid], reduction="sum")
    return (alpha * t * t * kd + (1 - alpha) * ce) / valid.sum()


def ref_topk(logits, labels, ids, logprobs, *, temperature, alpha, divergence="forwardKL", beta=0.5):
    """The documented top-k semantics, row by row: teacher renormalised over its top-k, the student's full
    softened distribution coarsened to the k tokens + a tail bucket (reverse KL: conditioned on the top-k)."""
    t = temperature
    total = logits.new_zeros(())
    for i in range(logits.shape[0]):
        if labels[i] == -100:
            continue
        keep = torch.isfinite(logprobs[i])
        tid, tlp = ids[i][keep], logprobs[i][keep]
        q = torch.softmax(tlp / t, dim=-1)
        p_full = torch.softmax(logits[i] / t, dim=-1)
        p_k = p_full[tid]
        if divergence == "reverseKL":
            p_cond = p_k / p_k.sum()
            kd = (p_cond * (p_cond.log() - q.log())).sum()
        else:
            tail = 1 - p_k.sum()
            logq = torch.cat([q.log(), q.new_tensor([-math.inf])])
            logp = torch.cat([p_k.log(), tail.clamp_min(1e-300).log().reshape(1)])
            kd = ref_divergence(logq, logp, divergence, beta)
        ce = F.cross_entropy(logits[i : i + 1], labels[i : i + 1])
        total = total + alpha * t * t * kd + (1 - alpha) * ce
    return total / (labels != -100).sum()


# ---------------------------------------------------------------------------------------------- fixtures


def tensors(seed: int = 0, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, H, generator=g, dtype=dtype).requires_grad_()
    weight = (torch.randn(V, H, generator=g, dtype=dtype) * 0.7).requires_grad_()
    teacher = torch.randn(N, V, generator=g, dtype=dtype) * 2.5
    labels = torch.randint(0, V, (N,), generator=g)
    labels[[0, 1, 2, 9, 17]] = -100  # prompt / padding positions
    return hidden, weight, teacher, labels


def topk_of(teacher_logits: torch.Tensor, k: int) -> TopKTeacher:
    logprobs = F.log_softmax(teacher_logits, dim=-1)
    top = logprobs.topk(k, dim=-1)
    return TopKTeacher(top.indices, top.values)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return torch.autograd.grad(loss, inputs)


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    assert torch.allclose(a.double(), b.double(), atol=tol, rtol=tol), (a - b).abs().max()


# ---------------------------------------------------------------------------------------------- dense


@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_dense_equals_reference_values_and_gradients(divergence: str, teacher_form: str) -> None:
    hidden, weight, teacher_logits, labels = tensors()
    config = DistillConfig(temperature=2.0, alpha=0.4, divergence=divergence, jsd_beta=0.3, chunk_tokens=8)
    if teacher_form == "logits":
        teacher = DenseTeacher(logits=teacher_logits)
    else:  # the teacher's hidden states and head, whose product is the same logits
        t_hidden = torch.linalg.lstsq(weight.detach(), teacher_logits.T).solution.T
        teacher = DenseTeacher(hidden=t_hidden, weight=weight.detach())
        teacher_logits = t_hidden @ weight.detach().T
    out = distill_loss(hidden, weight, labels, teacher=teacher, config=config)
    ref = ref_dense(
        hidden @ weight.T, labels, teacher_logits, temperature=2.0, alpha=0.4, divergence=divergence, beta=0.3
    )
    close(out.total, ref)
    close(out.kd + out.ce, out.total)
    for got, want in zip(grads(out.total, hidden, weight), grads(ref, hidden, weight), strict=True):
        close(got, want)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_logits_entry_point_equals_fused(divergence: str) -> None:
    hidden, weight, teacher_logits, labels = tensors(1)
    config = DistillConfig(temperature=3.0, alpha=0.5, divergence=divergence, chunk_tokens=5)
    logits = (hidden @ weight.T).detach().requires_grad_()
    fused = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    plain = distill_loss_from_logits(
        logits, labels, teacher=DenseTeacher(logits=teacher_logits), config=config
    )
    close(fused.total, plain.total)
    ref = ref_dense(logits, labels, teacher_logits, temperature=3.0, alpha=0.5, divergence=divergence)
    close(grads(plain.total, logits)[0], grads(ref, logits)[0])


def test_logits_entry_point_takes_batch_shapes() -> None:
    _, _, teacher_logits, labels = tensors(2)
    logits = torch.randn(N, V, dtype=torch.float64, requires_grad=True)
    config = DistillConfig(temperature=2.0, alpha=0.5)
    flat = distill_loss_from_logits(
        logits, labels, teacher=DenseTeacher(logits=teacher_logits), config=config
    )
    batched = distill_loss_from_logits(
        logits.reshape(1, N, V),
        labels.reshape(1, N),
        teacher=DenseTeacher(logits=teacher_logits.reshape(1, N, V)),
        config=config,
    )
    close(flat.total, batched.total)


def test_float32_matches_reference() -> None:
    hidden, weight, teacher_logits, labels = tensors(3, dtype=torch.float32)
    config = DistillConfig(temperature=4.0, alpha=0.5, chunk_tokens=7)
    out = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    ref = ref_dense(hidden @ weight.T, labels, teacher_logits, temperature=4.0, alpha=0.5)
    close(out.total, ref, 1e-5)
    for got, want in zip(grads(out.total, hidden, weight), grads(ref, hidden, weight), strict=True):
        close(got, want, 1e-5)


def test_bias_gets_its_gradient() -> None:
    hidden, weight, teacher_logits, labels = tensors(4)
    bias = torch.randn(V, dtype=torch.float64, requires_grad=True)
    config = DistillConfig(temperature=2.0, alpha=0.5, chunk_tokens=6)
    out = distill_loss(
        hidden, weight, labels, bias=bias, teacher=DenseTeacher(logits=teacher_logits), config=config
    )
    ref = ref_dense(hidden @ weight.T + bias, labels, teacher_logits, temperature=2.0, alpha=0.5)
    close(out.total, ref)
    close(grads(out.total, bias)[0], grads(ref, bias)[0])


# ---------------------------------------------------------------------------------------------- masking, chunks


def test_masked_positions_count_nowhere() -> None:
    hidden, weight, teacher_logits, labels = tensors(5)
    config = DistillConfig(temperature=2.0, alpha=0.5, chunk_tokens=4)
    out = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    masked = labels == -100
    noisy_h = hidden.detach().clone()
    noisy_h[masked] += 5.0
    noisy_t = teacher_logits.clone()
    noisy_t[masked] = -noisy_t[masked]
    again = distill_loss(
        noisy_h, weight.detach(), labels, teacher=DenseTeacher(logits=noisy_t), config=config
    )
    close(out.total, again.total)
    g_hidden, _ = grads(out.total, hidden, weight)
    assert torch.all(g_hidden[masked] == 0)
    assert torch.all(g_hidden[~masked].abs().sum(-1) > 0)


def test_mean_is_per_response_token() -> None:
    """Masked positions do not dilute the mean: the loss is the mean over supervised tokens only."""
    hidden, weight, teacher_logits, labels = tensors(6)
    config = DistillConfig(temperature=2.0, alpha=0.5)
    out = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    keep = labels != -100
    only = distill_loss(
        hidden[keep], weight, labels[keep], teacher=DenseTeacher(logits=teacher_logits[keep]), config=config
    )
    close(out.total, only.total)
    summed = distill_loss(
        hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config, normalizer=1.0
    )
    close(summed.total, out.total * keep.sum())


@pytest.mark.parametrize("chunk", [1, 3, 16, 4096])
def test_chunk_size_does_not_change_the_result(chunk: int) -> None:
    hidden, weight, teacher_logits, labels = tensors(7)
    base = distill_loss(
        hidden,
        weight,
        labels,
        teacher=topk_of(teacher_logits, 5),
        config=DistillConfig(temperature=2.0, chunk_tokens=N),
    )
    other = distill_loss(
        hidden,
        weight,
        labels,
        teacher=topk_of(teacher_logits, 5),
        config=DistillConfig(temperature=2.0, chunk_tokens=chunk),
    )
    close(base.total, other.total)
    for a, b in zip(grads(base.total, hidden, weight), grads(other.total, hidden, weight), strict=True):
        close(a, b)


# ---------------------------------------------------------------------------------------------- top-k


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_with_k_equal_to_vocab_equals_dense(divergence: str) -> None:
    hidden, weight, teacher_logits, labels = tensors(8)
    config = DistillConfig(temperature=3.0, alpha=0.6, divergence=divergence, chunk_tokens=6)
    dense = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    topk = distill_loss(hidden, weight, labels, teacher=topk_of(teacher_logits, V), config=config)
    close(dense.total, topk.total)
    for a, b in zip(grads(dense.total, hidden, weight), grads(topk.total, hidden, weight), strict=True):
        close(a, b)


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_topk_equals_its_documented_reference(divergence: str) -> None:
    hidden, weight, teacher_logits, labels = tensors(9)
    teacher = topk_of(teacher_logits, 6)
    config = DistillConfig(temperature=2.0, alpha=0.5, divergence=divergence, jsd_beta=0.4, chunk_tokens=7)
    out = distill_loss(hidden, weight, labels, teacher=teacher, config=config)
    ref = ref_topk(
        hidden @ weight.T,
        labels,
        teacher.ids,
        teacher.logprobs,
        temperature=2.0,
        alpha=0.5,
        divergence=divergence,
        beta=0.4,
    )
    close(out.total, ref)
    for a, b in zip(grads(out.total, hidden, weight), grads(ref, hidden, weight), strict=True):
        close(a, b)


def test_topk_teacher_is_renormalised_and_padding_ignored() -> None:
    hidden, weight, teacher_logits, labels = tensors(10)
    teacher = topk_of(teacher_logits, 4)
    config = DistillConfig(temperature=2.0, alpha=1.0)
    out = distill_loss(hidden, weight, labels, teacher=teacher, config=config)
    # the tail mass the top-k leave out does not matter: shifting every logprob is renormalised away
    shifted = distill_loss(
        hidden, weight, labels, teacher=TopKTeacher(teacher.ids, teacher.logprobs - 0.7), config=config
    )
    close(out.total, shifted.total)
    # padding entries (-inf), even on token ids that exist, count nowhere
    pad_ids = torch.cat([teacher.ids, torch.zeros(N, 3, dtype=torch.long)], dim=1)
    pad_lp = torch.cat([teacher.logprobs, torch.full((N, 3), -math.inf, dtype=teacher.logprobs.dtype)], dim=1)
    padded = distill_loss(hidden, weight, labels, teacher=TopKTeacher(pad_ids, pad_lp), config=config)
    close(out.total, padded.total)


def test_topk_forward_kl_charges_student_mass_outside_the_topk() -> None:
    """The student is not renormalised: moving its mass off the teacher's top-k raises the loss."""
    ids = torch.tensor([[0, 1]])
    logprobs = torch.log(torch.tensor([[0.7, 0.3]], dtype=torch.float64))
    labels = torch.tensor([0])
    config = DistillConfig(temperature=1.0, alpha=1.0)
    on_topk = torch.tensor([[math.log(0.7), math.log(0.3), -30.0, -30.0]], dtype=torch.float64)
    leaky = torch.tensor(
        [[math.log(0.35), math.log(0.15), math.log(0.25), math.log(0.25)]], dtype=torch.float64
    )
    good = distill_loss_from_logits(on_topk, labels, teacher=TopKTeacher(ids, logprobs), config=config).total
    bad = distill_loss_from_logits(leaky, labels, teacher=TopKTeacher(ids, logprobs), config=config).total
    assert good.item() < 1e-9 < math.log(2) - 1e-6 < bad.item() + 1e-12  # KL = log(1 / 0.5) for the leaky one


def test_fp16_logprobs_rows_without_teacher_and_bf16_autocast() -> None:
    hidden, weight, teacher_logits, labels = tensors(11, dtype=torch.float32)
    teacher = topk_of(teacher_logits, 5)
    teacher = TopKTeacher(teacher.ids.int(), teacher.logprobs.half())
    no_teacher_rows = labels == -100
    teacher.logprobs[no_teacher_rows] = -math.inf  # prompt rows carry no teacher
    config = DistillConfig(temperature=2.0, alpha=0.5, chunk_tokens=8)
    exact = distill_loss(hidden, weight, labels, teacher=teacher, config=config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = distill_loss(hidden, weight, labels, teacher=teacher, config=config)
    assert torch.isfinite(exact.total)
    assert abs(mixed.total.item() - exact.total.item()) < 0.03 * exact.total.item()
    g_h, g_w = grads(mixed.total, hidden, weight)
    assert torch.isfinite(g_h).all() and torch.isfinite(g_w).all()
    assert g_w.dtype == torch.float32


# ---------------------------------------------------------------------------------------------- T^2, alpha


@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_temperature_squared_scaling(temperature: float) -> None:
    """alpha = 1: the loss is exactly T^2 times the mean KL of the softened distributions."""
    hidden, weight, teacher_logits, labels = tensors(12)
    out = distill_loss(
        hidden,
        weight,
        labels,
        teacher=DenseTeacher(logits=teacher_logits),
        config=DistillConfig(temperature=temperature, alpha=1.0),
    )
    keep = labels != -100
    logits = (hidden @ weight.T)[keep]
    kl = F.kl_div(
        F.log_softmax(logits / temperature, -1),
        F.log_softmax(teacher_logits[keep] / temperature, -1),
        log_target=True,
        reduction="sum",
    )
    close(out.total, temperature**2 * kl / keep.sum())
    close(out.kd, out.total)
    assert float(out.ce) == 0.0


def test_alpha_zero_is_cross_entropy_and_no_teacher_is_sft() -> None:
    hidden, weight, teacher_logits, labels = tensors(13)
    ce = F.cross_entropy(hidden @ weight.T, labels, ignore_index=-100)
    zero = distill_loss(
        hidden,
        weight,
        labels,
        teacher=DenseTeacher(logits=teacher_logits),
        config=DistillConfig(temperature=4.0, alpha=0.0),
    )
    sft = distill_loss(hidden, weight, labels, teacher=None, config=DistillConfig(temperature=4.0, alpha=0.9))
    close(zero.total, ce)
    close(sft.total, ce)
    want = grads(ce, hidden, weight)
    for got in (zero.total, sft.total):
        for a, b in zip(grads(got, hidden, weight), want, strict=True):
            close(a, b)
    assert float(zero.kd) == 0.0


def test_alpha_one_ignores_labels() -> None:
    hidden, weight, teacher_logits, labels = tensors(14)
    config = DistillConfig(temperature=2.0, alpha=1.0)
    other = torch.where(labels == -100, labels, (labels + 1) % V)
    a = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits), config=config)
    b = distill_loss(hidden, weight, other, teacher=DenseTeacher(logits=teacher_logits), config=config)
    close(a.total, b.total)


def test_config_and_shape_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="alpha"):
        DistillConfig(alpha=1.5)
    with pytest.raises(ValueError, match="temperature"):
        DistillConfig(temperature=0)
    hidden, weight, teacher_logits, labels = tensors(15)
    with pytest.raises(ValueError, match="aligned"):
        distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits[:-1]))
    with pytest.raises(ValueError, match="vocabulary"):
        distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits[:, :-1]))


def test_one_backward_per_forward() -> None:
    hidden, weight, teacher_logits, labels = tensors(16)
    out = distill_loss(hidden, weight, labels, teacher=DenseTeacher(logits=teacher_logits))
    out.total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward pass"):
        out.total.backward()
