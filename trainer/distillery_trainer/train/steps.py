"""The optimisation steps of one training run: micro-batches with gradient accumulation (no all-reduce
before a step's last micro-batch), mixed precision, gradient clipping, the learning-rate schedule, the time
budget, progress after every step and a checkpoint every ``checkpointEverySteps``. :mod:`.loop` prepares
what the steps need (model, data plan, teacher, resume point) and saves the student after them.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from . import checkpoint
from .batching import Plan, collate
from .examples import ChatFormat, Example
from .guards import check_finite
from .modeling import online_teacher, topk_teacher, unwrap
from .schedule import lr_factor, run_fraction

if TYPE_CHECKING:
    from .batching import Batch
    from .loop import TrainingRun
    from .losses import DistillConfig
    from .onpolicy import OnPolicySteps

log = logging.getLogger(__name__)

MAX_GRAD_NORM = 1.0


def run_steps(
    run: TrainingRun,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    plan: Plan,
    examples: list[Example],
    teacher: Any,
    vocab: int | None,
    compute: torch.dtype | None,
    start: int,
    total: int,
    elapsed0: float,
    tokens_done: float,
    chat: ChatFormat,
    policy: OnPolicySteps | None = None,
) -> tuple[int, float, float, str | None]:
    t, env = run.training, run.env
    pad_id = pad_token_id(chat.tokenizer)
    params = [p for p in module.parameters() if p.requires_grad]
    scaler = torch.amp.GradScaler(env.device.type) if compute == torch.float16 else None
    started = time.monotonic()
    step, elapsed, stop_message = start, elapsed0, None
    rate_tokens, rate_time = 0.0, 0.0
    module.train()
    while step < total:
        fraction = run_fraction(step, total, elapsed, t.max_seconds)
        lr = t.learning_rate * lr_factor(fraction, t.lr_scheduler, t.warmup_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_start = time.monotonic()
        micro = plan.step(step)
        mine = plan.rank_share(micro, env.rank)
        work: list[tuple[Batch, DistillConfig | None, float]]  # what to run, its loss (None: the module's)
        if policy is not None:  # the step's samples (or answers), scored by the teacher's server
            pieces, _ = policy.batches(step, mine, module, _autocast(env.device, compute))
            work = [(p.batch, p.config, p.normalizer) for p in pieces]
        else:
            normalizer = max(plan.supervised_tokens(micro), 1) / env.world_size
            work = [(collate(examples, mb, pad_id, plan.packing), None, normalizer) for mb in mine]
        sums = [0.0, 0.0, 0.0, 0.0]  # loss, kd, ce, input tokens
        for j, (batch, config, normalizer) in enumerate(work):
            if config is not None:  # the part's loss (a plain attribute, no collective)
                unwrap(module).config = config
            batch = batch.to(env.device)
            with _sync(module, last=j == len(work) - 1), _autocast(env.device, compute):
                signal = (
                    online_teacher(teacher, batch, vocab or 0) if teacher is not None else topk_teacher(batch)
                )
                parts = module(batch, signal, normalizer, vocab)
                (scaler.scale(parts.total) if scaler else parts.total).backward()
            sums[0] += float(parts.total.detach())
            sums[1] += float(parts.kd)
            sums[2] += float(parts.ce)
            sums[3] += batch.tokens
        loss, kd, ce, tokens = env.all_reduce(sums, "sum")
        loss, kd, ce = loss / env.world_size, kd / env.world_size, ce / env.world_size
        check_finite(step + 1, loss)
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        if scaler is not None:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        now = time.monotonic()
        (elapsed,) = env.all_reduce([elapsed0 + now - started], "max")
        tokens_done += tokens
        rate_tokens += tokens
        rate_time += now - step_start
        per_step = rate_time / max(step - start, 1)
        eta = (total - step) * per_step
        if t.max_seconds:
            eta = min(eta, max(t.max_seconds - elapsed, 0.0))
        extra = policy.observe(kd, now - step_start) if policy is not None else {}
        run.reporter.update(
            **extra,
            step=step,
            epoch=round(plan.epoch_progress(step), 4),
            loss=loss,
            tokens_per_second=rate_tokens / max(rate_time, 1e-9),
            eta_seconds=eta,
            elapsed_seconds=elapsed,
            gpu_hours=env.gpus * elapsed / 3600.0,
        )
        if env.world_size > 1 and log.isEnabledFor(logging.DEBUG):
            log.debug("rank %d step %d loss %.4f kd %.4f ce %.4f lr %.3g", env.rank, step, loss, kd, ce, lr)
        time_up = bool(t.max_seconds) and elapsed >= (t.max_seconds or math.inf)
        if time_up and step < total:
            stop_message = f"time budget of {t.max_seconds} s reached after {step} of {total} steps"
            log.info("%s", stop_message)
            break
        if step % t.checkpoint_every_steps == 0 and step < total:
            state = {
                "elapsedSeconds": elapsed,
                "tokens": tokens_done,
                "finished": False,
                "method": t.method,
                "loss": loss,
                **(policy.state() if policy is not None else {}),
            }
            checkpoint.save(run.layout.checkpoints_dir, step, module, optimizer, state, env)
    return step, elapsed, tokens_done, stop_message


def pad_token_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def make_optimizer(module: nn.Module, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D parameters)."""
    decay, plain = [], []
    for p in module.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else plain).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr)


@contextlib.contextmanager
def _sync(module: nn.Module, last: bool) -> Iterator[None]:
    """Gradient accumulation: all-reduce only on a step's last micro-batch (DDP no_sync / FSDP2 flag)."""
    if hasattr(module, "no_sync") and not last:
        with module.no_sync():
            yield
        return
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(last)
    yield


def _autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager[Any]:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
