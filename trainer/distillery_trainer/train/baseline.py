"""The untrained student's answers to the held-out prompts: what distillation bought is measured against
them (``evaluation.baseline``, on by default).

Before the first step, every rank generates its share of the held-out prompts (the ``"split": "eval"``
lines of ``collect/shard-*.jsonl``, at most ``evaluation.maxSamples``: the very prompts, and the subset,
the evaluation scores) with the student as loaded, sampled as the evaluation samples the served student
(:func:`~distillery_trainer.evaluate.run.sampling_of`: the teacher's sampling; greedy at temperature 0),
at most ``teacher.sampling.maxTokens`` new tokens, capped by ``evaluation.load.maxTokens`` when set to
keep it cheap. Rank 0 writes ``train/baseline-answers.jsonl`` atomically (one ``{"id", "answer",
"maxNewTokens"}`` line per prompt); a resumed run finds it and generates nothing. The evaluate stage scores
them with the scorer it scores the student with (``results.baselineScore``).

Not under FSDP with several ranks (the student is loaded on the CPU there, where generating would hold
every rank for long): the evaluation then says the baseline was not measured.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..layout import atomic_write
from .examples import ChatFormat

if TYPE_CHECKING:
    from .loop import TrainingRun

log = logging.getLogger(__name__)
Messages = list[dict[str, Any]]


@torch.no_grad()
def generate(
    model: Any,
    chat: ChatFormat,
    prompts: Sequence[Messages],
    *,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
) -> list[str]:
    """The model's answers (left-padded batches; greedy at temperature 0, else sampled), decoded without
    special tokens."""
    tok = chat.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    device = next(model.parameters()).device
    out: list[str] = []
    was_training = model.training
    model.eval()
    sampled = temperature > 0
    for i in range(0, len(prompts), batch_size):
        ids_list = [chat.prompt(m)[-(max_len - 1) :] for m in prompts[i : i + batch_size]]
        width = max(len(p) for p in ids_list)
        ids = torch.full((len(ids_list), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(ids_list):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        new = max(1, min(max_new_tokens, max_len - width))
        extra: dict[str, Any] = (
            {"do_sample": True, "temperature": temperature, "top_p": top_p}
            if sampled
            else {"do_sample": False}
        )
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=new,
            eos_token_id=sorted(chat.end_ids) or None,
            pad_token_id=pad,
            **extra,
        )
        out += [tok.decode(row[width:], skip_special_tokens=True).strip() for row in gen.tolist()]
    model.train(was_training)
    return out


def max_new_tokens(run: TrainingRun) -> int:
    spec = run.spec
    cap = spec.evaluation.load.max_tokens
    return min(spec.teacher.sampling.max_tokens, cap) if cap else spec.teacher.sampling.max_tokens


def write_baseline(run: TrainingRun, model: Any, chat: ChatFormat, sharded: bool) -> None:
    """Generate and write the baseline answers unless they are there already, or not wanted (every rank
    calls it; the ranks share the prompts)."""
    from ..evaluate.data import load_eval_items
    from ..evaluate.run import sampling_of

    spec, env, layout = run.spec, run.env, run.layout
    if not spec.evaluation.baseline:
        return
    path = layout.baseline_file
    if env.broadcast_object(path.exists() if env.is_main else None):
        log.info("baseline answers already in %s", path)
        return
    if sharded and env.world_size > 1:
        log.warning(
            "no baseline answers under FSDP with %d ranks: the evaluation reports none", env.world_size
        )
        return
    items = load_eval_items(layout, spec.evaluation.max_samples).items
    if not items:
        log.warning("no held-out prompts in %s: no baseline answers", layout.collect_dir)
        return
    sampling = sampling_of(spec)
    limit = max_new_tokens(run)
    mine = items[env.rank :: env.world_size]
    log.info(
        "baseline: the untrained student answers %d held-out prompts (%d on this rank, at most %d tokens)",
        len(items),
        len(mine),
        limit,
    )
    config = getattr(model, "config", None)
    max_len = int(getattr(config, "max_position_embeddings", 0) or run.training.max_seq_length)
    devices: list[int] = []
    if env.device.type == "cuda":
        devices = [env.device.index if env.device.index is not None else torch.cuda.current_device()]
    texts: list[str] | None = None
    with torch.random.fork_rng(devices=devices):  # the training's random stream is left as it was
        torch.manual_seed((sampling.get("seed") or run.training.seed) + env.rank)
        try:
            texts = generate(
                model,
                chat,
                [it.messages for it in mine],
                max_new_tokens=limit,
                max_len=max_len,
                batch_size=run.training.batch_size,
                temperature=float(sampling["temperature"]),
                top_p=float(sampling["top_p"]),
            )
        except RuntimeError as exc:  # e.g. weights that give NaN probabilities: training says more, soon
            log.warning("no baseline answers: the untrained student could not generate (%s)", exc)
    if env.all_reduce([0.0 if texts is not None else 1.0], "max")[0] > 0:
        return  # every rank agrees: no baseline (the evaluation notes it is missing)
    assert texts is not None
    gathered = env.gather_object(list(zip([it.id for it in mine], texts, strict=True)))
    if env.is_main:
        by_id = {i: text for part in gathered for i, text in part}
        lines = [
            json.dumps({"id": it.id, "answer": by_id[it.id], "maxNewTokens": limit}, ensure_ascii=False)
            + "\n"
            for it in items
        ]
        atomic_write(path, "".join(lines))
        log.info("baseline answers written to %s", path)
    env.barrier()
