"""The mathematics of one chunk of rows: the divergence between the softened teacher and student, the
cross-entropy, and their gradient with respect to the chunk's student logits. :mod:`.losses` runs these
chunk by chunk inside its autograd nodes; nothing here holds more than one ``[chunk, V]`` block.

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
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

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
# The least tail mass a top-k teacher is taken to leave (``topk_tail: bucket``).
TAIL_FLOOR = 1.0e-6


@dataclass(frozen=True)
class DistillConfig:
    temperature: float = 1.0
    alpha: float = 0.5
    divergence: Divergence = "forwardKL"
    jsd_beta: float = 0.5
    chunk_tokens: int = 1024
    # Top-k teachers only: ``renormalize`` (the teacher renormalised over its top-k, tail 0; reverse KL on the
    # student conditioned on the top-k) or ``bucket`` (the teacher's own tail mass, 1 - its top-k mass at
    # T = 1, as one more outcome, against the student's mass outside the top-k: see the module's docstring).
    topk_tail: Literal["renormalize", "bucket"] = "renormalize"

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
        if self.topk_tail not in ("renormalize", "bucket"):
            raise ValueError(f"unknown topk_tail {self.topk_tail!r}")


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
                return upcast(self.logits[start:end])
            assert self.hidden is not None and self.weight is not None
            return upcast(F.linear(self.hidden[start:end], self.weight, self.bias))


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
        return self.ids[start:end].long(), upcast(self.logprobs[start:end])


Teacher = DenseTeacher | TopKTeacher


# ------------------------------------------------------------------------------------------ one chunk


def acc_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def upcast(t: Tensor) -> Tensor:
    """The loss is computed in float32 at least (float64 stays float64, for exact tests)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def chunk_loss(
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


def _teacher_rows(teacher: TopKTeacher, start: int, end: int) -> tuple[Tensor, Tensor, Tensor]:
    """The chunk's top-k ids and logprobs and their valid mask (``-inf`` entries are padding); rows without
    a teacher (prompt positions) get a placeholder the mask zeroes later."""
    ids, lp = teacher.chunk(start, end)
    valid = torch.isfinite(lp)
    empty = ~valid.any(dim=1)
    if bool(empty.any()):
        lp = lp.clone()
        lp[empty, 0] = 0.0
        valid = torch.isfinite(lp)
    return ids, lp, valid


def _teacher_topk(teacher: TopKTeacher, start: int, end: int, t: float) -> tuple[Tensor, Tensor, Tensor]:
    """Top-k ids, the teacher's softened log-probabilities renormalised over its top-k, and the valid mask."""
    ids, lp, valid = _teacher_rows(teacher, start, end)
    logq = torch.log_softmax(lp.masked_fill(~valid, float("-inf")) / t, dim=-1)
    return ids, logq.masked_fill(~valid, float("-inf")), valid


def _teacher_topk_bucket(
    teacher: TopKTeacher, start: int, end: int, t: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Top-k ids, the teacher's softened log-probabilities of its top-k and of its **tail bucket** (every other
    token, ``[C, 1]``), and the valid mask. The logprobs are at T = 1 over the whole vocabulary, so the tail's
    mass is known: ``1 - sum(exp(top-k))`` (floored at :data:`TAIL_FLOOR`: a teacher sure of its top-k
    still leaves the student's tail a finite cost). The k + 1 outcomes are softened by ``T`` as they are
    (exact at T = 1; otherwise the tail is softened as one token)."""
    ids, lp, valid = _teacher_rows(teacher, start, end)
    masked = lp.masked_fill(~valid, float("-inf"))
    mass = torch.logsumexp(masked, dim=-1, keepdim=True).exp().clamp(max=1.0 - TAIL_FLOOR)
    log_tail = torch.log1p(-mass).clamp_min(math.log(TAIL_FLOOR))
    logq = torch.log_softmax(torch.cat([masked, log_tail], dim=1) / t, dim=-1)
    return ids, logq[:, :-1].masked_fill(~valid, float("-inf")), logq[:, -1:], valid


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
        elif config.topk_tail == "bucket":
            ids, logq_k, log_tail, keep = _teacher_topk_bucket(teacher, start, end, t)
            logp_k = logp_s.gather(1, ids).masked_fill(~keep, NEG)
            in_topk = torch.zeros_like(logp_s).scatter_add_(1, ids, keep.to(logp_s.dtype)) > 0
            tail = torch.logsumexp(logp_s.masked_fill(in_topk, NEG), dim=-1, keepdim=True)
            student, teacher_k = torch.cat([logp_k, tail], dim=1), torch.cat([logq_k, log_tail], dim=1)
            if config.divergence == "reverseKL":
                kd_rows = _kl(student, teacher_k)
            else:
                kd_rows = _jsd(teacher_k, student, config.jsd_beta)
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
