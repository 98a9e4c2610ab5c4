"""Distillation losses that never hold ``[tokens, vocab]`` probabilities for more than one chunk of tokens.

Per supervised token ``i`` (its label is not ``-100``)::

    loss_i = alpha * T^2 * D(teacher_T || student_T) + (1 - alpha) * CE(student, label_i)

and the result is ``sum_i loss_i / normalizer`` (default: the number of supervised tokens), so the loss is
a mean over *response tokens*: prompt and padding positions (label ``-100``) count nowhere, and a batch of
long answers weighs as much per token as a batch of short ones. (The seed's ``kl_div(batchmean)`` over
``[B, T, V]`` divides by the batch size and counts prompt and padding positions: this module does not.)

Conventions: positions are already shifted, i.e. row ``i`` of the student's hidden states (or logits)
predicts ``labels[i]``. ``T^2`` keeps the gradient scale of the soft term independent of ``T`` (Hinton et
al.). Without a teacher the loss is plain cross-entropy (SFT, SeqKD).

The divergences and the teacher signals (dense, top-k with its tail bucket) are described in
:mod:`.divergences`, which holds the mathematics of one chunk.

Memory: the work runs in chunks of ``chunk_tokens`` rows inside one autograd node that computes the gradient
of its inputs during the forward pass and keeps only that gradient (the size of its inputs); with the
hidden-state entry point (:func:`distill_loss`) the LM head is fused in, so neither the logits nor the
probabilities ever exist for more than one chunk. Forward KL and plain CE use closed-form gradients
(``T * (p_student_T - p_teacher_T)`` and ``p_student - onehot``), which need about three ``[chunk, V]``
buffers; reverse KL and JSD differentiate the chunk with autograd (more buffers per chunk, still flat in
the number of tokens).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .divergences import (
    IGNORE_INDEX,
    DenseTeacher,
    DistillConfig,
    Divergence,
    Teacher,
    TopKTeacher,
    acc_dtype,
    chunk_loss,
    upcast,
)

__all__ = [
    "IGNORE_INDEX",
    "DenseTeacher",
    "DistillConfig",
    "Divergence",
    "LossParts",
    "Teacher",
    "TopKTeacher",
    "distill_loss",
    "distill_loss_from_logits",
]


class LossParts(NamedTuple):
    """``total`` is differentiable; ``kd`` and ``ce`` are its two terms (already weighted), for logging."""

    total: Tensor
    kd: Tensor
    ce: Tensor


# ------------------------------------------------------------------------------------------ entry points


def distill_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    *,
    bias: Tensor | None = None,
    teacher: Teacher | None = None,
    config: DistillConfig = DistillConfig(),
    normalizer: float | Tensor | None = None,
) -> LossParts:
    """The loss from the student's final hidden states ``[N, H]`` and LM head ``weight`` ``[V, H]`` (fused)."""
    if hidden.dim() != 2 or labels.shape != hidden.shape[:1]:
        raise ValueError(
            f"hidden must be [N, H] with labels [N]; got {tuple(hidden.shape)}, {tuple(labels.shape)}"
        )
    _check_teacher(teacher, hidden.shape[0], weight.shape[0])
    norm = _normalizer(labels, normalizer)
    total, kd, ce = _FusedDistill.apply(hidden, weight, bias, labels, teacher, config, norm)
    return LossParts(total, kd, ce)


def distill_loss_from_logits(
    logits: Tensor,
    labels: Tensor,
    *,
    teacher: Teacher | None = None,
    config: DistillConfig = DistillConfig(),
    normalizer: float | Tensor | None = None,
) -> LossParts:
    """The same loss from the student's logits (``[..., V]``, labels ``[...]``), for models whose head is
    not a plain linear layer. The logits exist once; the probabilities only per chunk."""
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    flat = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    teacher = _flatten_teacher(teacher)
    _check_teacher(teacher, flat.shape[0], flat.shape[1])
    norm = _normalizer(flat_labels, normalizer)
    total, kd, ce = _LogitsDistill.apply(flat, flat_labels, teacher, config, norm)
    return LossParts(total, kd, ce)


def _normalizer(labels: Tensor, normalizer: float | Tensor | None) -> float:
    if normalizer is None:
        return float(max(int((labels != IGNORE_INDEX).sum()), 1))
    value = float(normalizer)
    if value <= 0:
        raise ValueError(f"normalizer must be > 0, got {value}")
    return value


def _flatten_teacher(teacher: Teacher | None) -> Teacher | None:
    if isinstance(teacher, DenseTeacher) and teacher.logits is not None and teacher.logits.dim() > 2:
        return DenseTeacher(logits=teacher.logits.reshape(-1, teacher.logits.shape[-1]))
    if isinstance(teacher, TopKTeacher) and teacher.ids.dim() > 2:
        k = teacher.ids.shape[-1]
        return TopKTeacher(teacher.ids.reshape(-1, k), teacher.logprobs.reshape(-1, k))
    return teacher


def _check_teacher(teacher: Teacher | None, rows: int, vocab: int) -> None:
    if teacher is None:
        return
    if teacher.rows != rows:
        raise ValueError(f"the teacher has {teacher.rows} rows, the student {rows}: they must be aligned")
    if isinstance(teacher, DenseTeacher):
        t_vocab = (
            teacher.logits.shape[-1] if teacher.logits is not None else teacher.weight.shape[0]  # type: ignore[union-attr]
        )
        if t_vocab != vocab:
            raise ValueError(
                f"teacher vocabulary {t_vocab} != student vocabulary {vocab}: slice both to the shared tokenizer"
            )


# ------------------------------------------------------------------------------------------ autograd nodes


class _FusedDistill(torch.autograd.Function):
    """LM head + loss per chunk; the gradients of ``hidden``, ``weight``, ``bias`` are made in forward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: Tensor,
        weight: Tensor,
        bias: Tensor | None,
        labels: Tensor,
        teacher: Teacher | None,
        config: DistillConfig,
        normalizer: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        grad_h = torch.zeros_like(hidden) if need_h else None
        acc = acc_dtype(weight)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b and bias is not None else None
        kd_sum = hidden.new_zeros((), dtype=acc_dtype(hidden))
        ce_sum = hidden.new_zeros((), dtype=acc_dtype(hidden))
        with torch.no_grad():
            for start in range(0, hidden.shape[0], config.chunk_tokens):
                end = min(start + config.chunk_tokens, hidden.shape[0])
                h = hidden[start:end]
                z = F.linear(h, weight, bias)
                kd, ce, g = chunk_loss(
                    upcast(z), labels[start:end], teacher, start, end, config, normalizer, owned=True
                )
                kd_sum += kd
                ce_sum += ce
                g = g.to(z.dtype)
                del z
                if grad_h is not None:
                    grad_h[start:end] = g @ weight.to(g.dtype)
                if grad_w is not None and g.dtype == grad_w.dtype == h.dtype:
                    grad_w.addmm_(g.t(), h)  # no [V, H] temporary
                elif grad_w is not None:
                    grad_w += g.t() @ h.to(g.dtype)
                if grad_b is not None:
                    grad_b += g.sum(0)
                del g  # before the next chunk's buffers exist
        # Kept on ctx rather than saved: backward hands them over (scaled in place), so autograd can adopt
        # them as .grad without another copy. The node runs backward once (no double backward).
        ctx.grads = (grad_h, grad_w, grad_b)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        total = kd_sum + ce_sum
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return total, kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grads is None:
            raise RuntimeError(
                "the distillation loss supports one backward pass per forward (no retain_graph)"
            )
        grad_h, grad_w, grad_b = ctx.grads
        ctx.grads = None
        w_dtype, b_dtype = ctx.dtypes
        return (
            _scaled(grad_h, grad_total, grad_h.dtype if grad_h is not None else None),
            _scaled(grad_w, grad_total, w_dtype),
            _scaled(grad_b, grad_total, b_dtype),
            None,
            None,
            None,
            None,
        )


def _scaled(grad: Tensor | None, scale: Tensor, dtype: torch.dtype | None) -> Tensor | None:
    if grad is None:
        return None
    if not (scale.numel() == 1 and float(scale) == 1.0):
        grad.mul_(scale.to(grad.dtype))
    return grad if grad.dtype == dtype else grad.to(dtype)


class _LogitsDistill(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        logits: Tensor,
        labels: Tensor,
        teacher: Teacher | None,
        config: DistillConfig,
        normalizer: float,
    ) -> tuple[Tensor, Tensor, Tensor]:
        grad = torch.zeros_like(logits) if logits.requires_grad else None
        kd_sum = logits.new_zeros((), dtype=acc_dtype(logits))
        ce_sum = logits.new_zeros((), dtype=acc_dtype(logits))
        with torch.no_grad():
            for start in range(0, logits.shape[0], config.chunk_tokens):
                end = min(start + config.chunk_tokens, logits.shape[0])
                kd, ce, g = chunk_loss(
                    upcast(logits[start:end]), labels[start:end], teacher, start, end, config, normalizer
                )
                kd_sum += kd
                ce_sum += ce
                if grad is not None:
                    grad[start:end] = g
        ctx.grad = grad
        ctx.dtype = logits.dtype
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return kd_sum + ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:
        if ctx.grad is False:
            raise RuntimeError(
                "the distillation loss supports one backward pass per forward (no retain_graph)"
            )
        grad, ctx.grad = ctx.grad, False
        return _scaled(grad, grad_total, ctx.dtype), None, None, None, None
