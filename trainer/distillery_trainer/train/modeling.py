"""The student (and an online teacher) as modules: loading, LoRA, the objective module DDP/FSDP wrap, saving.

:class:`Objective` holds the student and computes the loss inside its ``forward``: DDP and FSDP see the whole
computation (FSDP unshards the LM head for the fused loss), and the loss runs on the student's final hidden
states and its head weight chunk by chunk (:mod:`.losses`), so full logits are never built. Models whose
head is not a plain linear layer (logit soft-capping) fall back to the logits path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..api.spec import Lora
from ..devices import cpu_has_native_bf16
from .batching import Batch
from .distributed import DistEnv
from .losses import (
    DenseTeacher,
    DistillConfig,
    Teacher,
    TopKTeacher,
    distill_loss,
    distill_loss_from_logits,
)

log = logging.getLogger(__name__)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The mixed-precision compute dtype (None: fp32). Master weights stay fp32 either way.

    bf16 (asked for, or ``auto``) on a CPU is used only where the CPU computes it natively: elsewhere
    torch emulates it, some 30x slower than fp32 (measured on an AMD EPYC with AVX2 only), and bf16 on
    a CPU is only ever asked for speed, so fp32 is used instead and the log says so."""
    if precision == "fp16":
        return torch.float16
    if precision == "fp32":
        return None
    if device.type == "cuda":
        if precision == "bf16" or torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return None
    if cpu_has_native_bf16():
        return torch.bfloat16
    if precision == "bf16":
        log.warning(
            "training.precision bf16: this CPU has no native bf16 (AVX512-BF16 or AMX), where it is "
            "emulated many times slower than fp32; training in fp32 instead"
        )
    return None


def source_dtype(config: Any) -> torch.dtype:
    """The dtype the model was published in (what the saved student keeps); fp32 when unknown."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = getattr(torch, value, None)
    return value if isinstance(value, torch.dtype) else torch.float32


def load_causal_lm(path: str, device: torch.device, dtype: torch.dtype = torch.float32) -> Any:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.to(device)


def apply_lora(model: Any, lora: Lora) -> Any:
    from peft import LoraConfig, get_peft_model

    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha or 2 * lora.rank,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def base_model(model: Any) -> Any:
    """The transformers model under a PEFT wrapper (LoRA layers are injected into it in place)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _fusable(model: Any) -> bool:
    head = model.get_output_embeddings()
    return (
        isinstance(head, nn.Linear)
        and getattr(model.config, "final_logit_softcapping", None) is None
        and getattr(model.config, "logit_scale", None) is None
        and hasattr(model, "get_decoder")
    )


def final_hidden(
    model: Any, ids: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor | None
) -> torch.Tensor:
    out = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=False)
    return out.last_hidden_state


class Objective(nn.Module):
    """The student plus its loss: ``forward(batch, teacher, normalizer) -> LossParts``."""

    def __init__(self, student: Any, config: DistillConfig) -> None:
        super().__init__()
        self.student = student
        self.config = config
        self.fused = _fusable(base_model(student))

    @property
    def vocab(self) -> int:
        return int(base_model(self.student).get_output_embeddings().weight.shape[0])

    def forward(
        self,
        batch: Batch,
        teacher: Teacher | None,
        normalizer: float,
        vocab: int | None = None,
        generate: dict[str, Any] | None = None,
    ) -> Any:
        """The loss parts (:class:`LossParts`); with ``generate``, the student's ``generate(**generate)``
        instead (on-policy samples under FSDP: the root's forward gathers its parameters for the call)."""
        if generate is not None:
            return self.student.generate(**generate)
        model = base_model(self.student)
        if self.fused:
            hidden = final_hidden(model, batch.input_ids, batch.attention_mask, batch.position_ids)
            rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.select)
            head = model.get_output_embeddings()
            weight = head.weight if vocab is None else head.weight[:vocab]
            bias = head.bias if head.bias is None or vocab is None else head.bias[:vocab]
            return distill_loss(
                rows,
                weight,
                batch.labels,
                bias=bias,
                teacher=teacher,
                config=self.config,
                normalizer=normalizer,
            )
        out = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        )
        logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, batch.select)
        if vocab is not None:
            logits = logits[:, :vocab]
        return distill_loss_from_logits(
            logits, batch.labels, teacher=teacher, config=self.config, normalizer=normalizer
        )


def topk_teacher(batch: Batch) -> TopKTeacher | None:
    if batch.topk_ids is None or batch.topk_logprobs is None:
        return None
    return TopKTeacher(batch.topk_ids, batch.topk_logprobs)


@torch.no_grad()
def online_teacher(teacher: Any, batch: Batch, vocab: int) -> DenseTeacher:
    """The teacher's hidden states at the supervised positions and its head: logits are made per chunk."""
    assert batch.teacher_input_ids is not None and batch.teacher_select is not None
    if _fusable(teacher):
        hidden = final_hidden(
            teacher, batch.teacher_input_ids, batch.teacher_attention_mask, batch.teacher_position_ids
        )
        rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, batch.teacher_select)
        head = teacher.get_output_embeddings()
        bias = None if head.bias is None else head.bias[:vocab]
        return DenseTeacher(hidden=rows, weight=head.weight[:vocab], bias=bias)
    out = teacher(
        input_ids=batch.teacher_input_ids,
        attention_mask=batch.teacher_attention_mask,
        position_ids=batch.teacher_position_ids,
        use_cache=False,
    )
    logits = out.logits.reshape(-1, out.logits.shape[-1]).index_select(0, batch.teacher_select)
    return DenseTeacher(logits=logits[:, :vocab])


def wrap(objective: Objective, strategy: str, env: DistEnv, compute_dtype: torch.dtype | None) -> nn.Module:
    """DDP (every rank holds the model) or FSDP2 (parameters sharded per decoder layer) over all ranks."""
    if not env.distributed:
        return objective
    if strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        mesh = init_device_mesh(env.device.type, (env.world_size,))
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
        layers = getattr(base_model(objective.student).get_decoder(), "layers", [])
        for layer in layers:
            fully_shard(layer, mesh=mesh, mp_policy=policy)
        fully_shard(objective, mesh=mesh, mp_policy=policy)
        return objective
    from torch.nn.parallel import DistributedDataParallel

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DistributedDataParallel(objective, device_ids=ids)


def unwrap(module: nn.Module) -> Objective:
    inner = getattr(module, "module", module)
    assert isinstance(inner, Objective)
    return inner


# ---------------------------------------------------------------------------------------------- saving


def replace_dir(tmp: Path, out: Path) -> None:
    """Put a finished directory in place of ``out`` (renames only; a reader sees the old or the new one)."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save_student(
    module: nn.Module,
    tokenizer: Any,
    out: Path,
    *,
    env: DistEnv,
    strategy: str,
    dtype: torch.dtype,
    end_ids: set[int],
    meta: dict[str, Any],
) -> None:
    """The student as a Hugging Face model (LoRA merged, the source dtype) + tokenizer; rank 0 writes.

    Collective under FSDP (the full weights are gathered to rank 0); call it on every rank."""
    objective = unwrap(module)
    full_state = None
    if env.distributed and strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full_state = get_model_state_dict(
            module, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if not env.is_main:
        env.barrier()
        return
    model = objective.student
    if full_state is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(base_model(model).config)
        prefix = "student."
        model.load_state_dict({k[len(prefix) :]: v for k, v in full_state.items() if k.startswith(prefix)})
    try:
        save_hf(model, tokenizer, out, dtype=dtype, end_ids=end_ids, meta=meta)
    finally:
        env.barrier()


def save_hf(
    model: Any, tokenizer: Any, out: Path, *, dtype: torch.dtype, end_ids: set[int], meta: dict[str, Any]
) -> None:
    """Write a Hugging Face directory (LoRA merged, ``dtype``, stopping at the chat's end tokens) in place of
    ``out``, atomically. Rank 0 only."""
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    model = model.to(device="cpu", dtype=dtype)
    gen = getattr(model, "generation_config", None)
    if gen is not None and end_ids:
        current = gen.eos_token_id
        current = [current] if isinstance(current, int) else list(current or [])
        gen.eos_token_id = sorted(set(current) | end_ids)
        if gen.pad_token_id is None and tokenizer.pad_token_id is not None:
            gen.pad_token_id = tokenizer.pad_token_id
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "distillery-training.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        tmp.chmod(0o755)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("saved the student to %s", out)
