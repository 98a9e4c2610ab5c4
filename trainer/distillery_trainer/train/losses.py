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

Divergences (``D``), on distributions softened by ``T``:

- ``forwardKL``: ``KL(teacher || student)`` (mean-seeking; the default);
- ``reverseKL``: ``KL(student || teacher)`` (mode-seeking);
- ``jsd``: generalized Jensen-Shannon with ``beta`` as in GKD (Agarwal et al., TRL's
  ``generalized_jsd_loss``): ``M = beta * teacher + (1 - beta) * student``,
  ``D = beta * KL(teacher || M) + (1 - beta) * KL(student || M)``.

Teacher signals:

- :class:`DenseTeacher`: the teacher's full logits, or its hidden states and LM head (online KD); its logits
  are then computed chunk by chunk too.
- :class:`TopKTeacher`: the teacher's top-k log-probabilities (at T = 1) collected with its answers. The
  tail is handled explicitly, as follows. The teacher is **renormalised over its top-k**: its softened
  distribution is ``softmax(logprob_k / T)`` over those k tokens, so its tail mass is 0. The student is
  *not* renormalised: its full-vocabulary softened distribution is coarsened to k + 1 outcomes, the
  teacher's k tokens and one **tail bucket** holding the student's mass on every other token. With forward
  KL and JSD the student therefore pays for mass outside the teacher's top-k (it is moved onto the top-k).
  Reverse KL against a zero teacher tail would be infinite, so it compares the student *conditioned on the
  teacher's top-k* (renormalised over it) and leaves the tail to the cross-entropy term. With k = V every
  variant equals the dense loss exactly. Entries whose logprob is ``-inf`` are padding (fewer than k
  alternatives) and count nowhere.

Memory: the work runs in chunks of ``chunk_tokens`` rows inside one autograd node that computes the gradient
of its inputs during the forward pass and keeps only that gradient (the size of its inputs); with the
hidden-state entry point (:func:`distill_loss`) the LM head is fused in, so neither the logits nor the
probabilities ever exist for more than one chunk. Forward KL and plain CE use closed-form gradients
(``T * (p_student_T - p_teacher_T)`` and ``p_student - onehot``), which need about three ``[chunk, V]``
buffers; reverse KL and JSD differentiate the chunk with autograd (more buffers per chunk, still flat in
the number of tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

Divergence = Literal["forwardKL", "reverseKL", "jsd"]
IGNORE_INDEX = -100
# A "log 0" that keeps gradients finite where -inf would give NaN (logsumexp/softmax over all -inf rows).
NEG = -1.0e30
# Log-probabilities at or below this are zero probabilities (NEG-filled entries, -inf padding).
ZERO_LOGPROB = -1.0e29
# Rows per block where a per-row reduction would otherwise need a [chunk, V] temporary.
ROW_BLOCK = 128


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0
    alpha: float = 0.5
    divergence: Divergence = "forwardKL"
    jsd_beta: float = 0.5
    chunk_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be within [0, 1], got {self.alpha}")
        if not 0.0 < self.jsd_beta < 1.0:
            raise ValueError(f"jsd_beta must be within (0, 1), got {self.jsd_beta}")
        if self.divergence not in ("forwardKL", "reverseKL", "jsd"):
            raise ValueError(f"unknown divergence {self.divergence!r}")
        if self.chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {self.chunk_tokens}")


@dataclass(frozen=True)
class DenseTeacher:
    """The teacher's full distribution per row: ``logits`` ``[N, V]``, or ``hidden`` ``[N, H]`` + its head."""

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None

    def __post_init__(self) -> None:
        if (self.logits is None) == (self.hidden is None or self.weight is None):
            raise ValueError("DenseTeacher needs logits, or hidden and weight")

    @property
    def rows(self) -> int:
        ref = self.logits if self.logits is not None else self.hidden
        assert ref is not None
        return ref.shape[0]

    def chunk(self, start: int, end: int) -> Tensor:
        with torch.no_grad():
            if self.logits is not None:
                return _up(self.logits[start:end])
            assert self.hidden is not None and self.weight is not None
            return _up(F.linear(self.hidden[start:end], self.weight, self.bias))


@dataclass(frozen=True)
class TopKTeacher:
    """The teacher's top-k per row: token ``ids`` ``[N, k]`` and their ``logprobs`` at T = 1 (-inf: padding)."""

    ids: Tensor
    logprobs: Tensor

    def __post_init__(self) -> None:
        if self.ids.shape != self.logprobs.shape or self.ids.dim() != 2:
            raise ValueError(
                f"top-k ids and logprobs must both be [N, k], got {tuple(self.ids.shape)} "
                f"and {tuple(self.logprobs.shape)}"
            )

    @property
    def rows(self) -> int:
        return int(self.ids.shape[0])

    def chunk(self, start: int, end: int) -> tuple[Tensor, Tensor]:
        return self.ids[start:end].long(), _up(self.logprobs[start:end])


Teacher = DenseTeacher | TopKTeacher


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
        acc = _acc(weight)
        grad_w = torch.zeros_like(weight, dtype=acc) if need_w else None
        grad_b = torch.zeros_like(bias, dtype=acc) if need_b and bias is not None else None
        kd_sum = hidden.new_zeros((), dtype=_acc(hidden))
        ce_sum = hidden.new_zeros((), dtype=_acc(hidden))
        with torch.no_grad():
            for start in range(0, hidden.shape[0], config.chunk_tokens):
                end = min(start + config.chunk_tokens, hidden.shape[0])
                h = hidden[start:end]
                z = F.linear(h, weight, bias)
                kd, ce, g = _chunk(
                    _up(z), labels[start:end], teacher, start, end, config, normalizer, owned=True
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
        kd_sum = logits.new_zeros((), dtype=_acc(logits))
        ce_sum = logits.new_zeros((), dtype=_acc(logits))
        with torch.no_grad():
            for start in range(0, logits.shape[0], config.chunk_tokens):
                end = min(start + config.chunk_tokens, logits.shape[0])
                kd, ce, g = _chunk(
                    _up(logits[start:end]), labels[start:end], teacher, start, end, config, normalizer
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


# ------------------------------------------------------------------------------------------ one chunk


def _acc(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _up(t: Tensor) -> Tensor:
    """The loss is computed in float32 at least (float64 stays float64, for exact tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _chunk(
    z: Tensor,
    labels: Tensor,
    teacher: Teacher | None,
    start: int,
    end: int,
    config: DistillConfig,
    normalizer: float,
    owned: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """``(kd_sum, ce_sum, dloss/dz)`` of one chunk of float32 student logits ``z`` ``[C, V]``; ``owned``: ``z``
    may be overwritten (it is not the caller's tensor), which saves a ``[C, V]`` buffer."""
    valid = labels != IGNORE_INDEX
    weights = valid.to(z.dtype) / normalizer
    alpha = config.alpha if teacher is not None else 0.0
    if teacher is None or alpha == 0.0 or config.divergence == "forwardKL":
        return _forward_kl_closed_form(z, labels, valid, weights, teacher, start, end, config, alpha, owned)
    return _autograd_chunk(z, labels, valid, weights, teacher, start, end, config, alpha)


def _ce_closed_form(
    z: Tensor, labels: Tensor, valid: Tensor, weights: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Cross-entropy sum and its gradient ``scale * w * (softmax(z) - onehot)``."""
    safe = labels.clamp_min(0).unsqueeze(1)
    lse = torch.logsumexp(z, dim=-1)
    ce = ((lse - z.gather(1, safe).squeeze(1)) * weights).sum()
    grad = torch.sub(z, lse.unsqueeze(1)).exp_()
    grad.scatter_add_(1, safe, -valid.to(grad.dtype).unsqueeze(1))
    grad.mul_((weights * scale).unsqueeze(1))
    return ce * scale, grad


def _forward_kl_closed_form(
    z: Tensor,
    labels: Tensor,
    valid: Tensor,
    weights: Tensor,
    teacher: Teacher | None,
    start: int,
    end: int,
    config: DistillConfig,
    alpha: float,
    owned: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    ce, grad = _ce_closed_form(z, labels, valid, weights, 1.0 - alpha)
    if teacher is None or alpha == 0.0:
        return z.new_zeros(()), ce, grad
    t = config.temperature
    zt = z.div_(t) if owned else z / t
    lse_s = torch.logsumexp(zt, dim=-1)  # log-normaliser of the softened student
    if isinstance(teacher, DenseTeacher):
        logq = teacher.chunk(start, end)
        logq = logq.div_(t) if teacher.logits is None else logq / t  # made by the head here: overwrite it
        logq.sub_(torch.logsumexp(logq, dim=-1, keepdim=True))
        # KL = sum_v q (log q - z/T) + lse_s, in row blocks so no further [C, V] buffer is needed
        kd_rows = (
            torch.cat(
                [
                    (lq.exp() * (lq - zb)).sum(-1)
                    for lq, zb in zip(logq.split(ROW_BLOCK), zt.split(ROW_BLOCK), strict=True)
                ]
            )
            + lse_s
        )
        q_dense: Tensor | None = logq.exp_()
    else:
        ids, logq_k, _ = _teacher_topk(teacher, start, end, t)
        q_k = logq_k.exp()
        logp_k = zt.gather(1, ids) - lse_s.unsqueeze(1)
        kd_rows = (q_k * (logq_k.clamp_min(ZERO_LOGPROB) - logp_k)).sum(-1)
        q_dense = None
    kd = (kd_rows * weights).sum() * (alpha * t * t)
    # d/dz [T^2 KL(q || softmax(z/T))] = T * (softmax(z/T) - q), scaled by each token's weight
    p = zt.sub_(lse_s.unsqueeze(1)).exp_()
    if q_dense is not None:
        p.sub_(q_dense)
        del q_dense
    else:
        p.scatter_add_(1, ids, -q_k)
    p.mul_((weights * (alpha * t)).unsqueeze(1))
    grad.add_(p)
    return kd, ce, grad


def _teacher_topk(teacher: TopKTeacher, start: int, end: int, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids, the teacher's softened log-probabilities renormalised over its top-k, and the valid mask."""
    ids, lp = teacher.chunk(start, end)
    valid = torch.isfinite(lp)
    empty = ~valid.any(dim=1)
    if bool(empty.any()):  # rows without a teacher (prompt positions): a placeholder the mask zeroes later
        lp = lp.clone()
        lp[empty, 0] = 0.0
        valid = torch.isfinite(lp)
    logq = torch.log_softmax(lp.masked_fill(~valid, float("-inf")) / t, dim=-1)
    return ids, logq.masked_fill(~valid, float("-inf")), valid


def _kl(logp: Tensor, logq: Tensor) -> Tensor:
    """``KL(p || q)`` over the last dim from log-probabilities; zero-probability terms count 0 (no NaN grads)."""
    keep = logp > ZERO_LOGPROB
    lp = logp.masked_fill(~keep, 0.0)
    lq = logq.masked_fill(~keep, 0.0)
    return (lp.exp() * (lp - lq)).masked_fill(~keep, 0.0).sum(-1)


def _jsd(logp_t: Tensor, logp_s: Tensor, beta: float) -> Tensor:
    mix = torch.logsumexp(torch.stack([logp_t + math.log(beta), logp_s + math.log(1.0 - beta)]), dim=0)
    return beta * _kl(logp_t, mix) + (1.0 - beta) * _kl(logp_s, mix)


def _autograd_chunk(
    z: Tensor,
    labels: Tensor,
    valid: Tensor,
    weights: Tensor,
    teacher: Teacher,
    start: int,
    end: int,
    config: DistillConfig,
    alpha: float,
) -> tuple[Tensor, Tensor, Tensor]:
    t = config.temperature
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        logp_s = torch.log_softmax(leaf / t, dim=-1)
        if isinstance(teacher, DenseTeacher):
            logp_t = torch.log_softmax(teacher.chunk(start, end) / t, dim=-1)
            if config.divergence == "reverseKL":
                kd_rows = _kl(logp_s, logp_t)
            else:
                kd_rows = _jsd(logp_t, logp_s, config.jsd_beta)
        else:
            ids, logq_k, keep = _teacher_topk(teacher, start, end, t)
            logp_k = logp_s.gather(1, ids).masked_fill(~keep, NEG)
            if config.divergence == "reverseKL":
                kd_rows = _kl(torch.log_softmax(logp_k, dim=-1), logq_k)
            else:
                in_topk = torch.zeros_like(logp_s).scatter_add_(1, ids, keep.to(logp_s.dtype)) > 0
                tail = torch.logsumexp(logp_s.masked_fill(in_topk, NEG), dim=-1, keepdim=True)
                neg_inf = torch.full_like(tail, float("-inf"))
                kd_rows = _jsd(
                    torch.cat([logq_k, neg_inf], dim=1), torch.cat([logp_k, tail], dim=1), config.jsd_beta
                )
        kd = (kd_rows * weights).sum() * (alpha * t * t)
        ce_rows = F.cross_entropy(leaf, labels, ignore_index=IGNORE_INDEX, reduction="none")
        ce = (ce_rows * weights).sum() * (1.0 - alpha)
        (grad,) = torch.autograd.grad(kd + ce, leaf)
    return kd.detach(), ce.detach(), grad
