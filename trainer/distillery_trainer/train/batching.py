"""Which examples go into which micro-batch of which step on which rank, and the tensors of one micro-batch.

The plan is a pure function of (example lengths, seed, epoch, batch size, ranks, accumulation): every rank
computes the same plan without talking to the others, a restarted run finds its data position from the step
number alone, and each step's loss normaliser (the supervised tokens of the whole step, all ranks) is known
to every rank up front.

- Without packing, examples are bucketed by length (sorted within windows of 64 batches, the batches then
  shuffled) so little compute goes to padding.
- With packing, examples are concatenated into rows of up to ``maxSeqLength`` tokens; position ids restart
  at every example and no attention mask is passed, from which transformers builds a block-diagonal causal
  mask: packed examples do not see each other.

Steps per epoch round up: the last step of an epoch is filled with micro-batches from the epoch's start.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .examples import Example

Row = list[int]  # example indices in one row
MicroBatch = list[Row]
BUCKET_WINDOW = 64


class Plan:
    def __init__(
        self,
        lengths: Sequence[int],
        answer_tokens: Sequence[int],
        *,
        batch_size: int,
        world_size: int,
        accumulation: int,
        seed: int,
        packing: bool,
        max_len: int,
    ) -> None:
        if not lengths:
            raise ValueError("no examples to plan")
        self.lengths = tuple(lengths)
        self.answer_tokens = tuple(answer_tokens)
        self.batch_size = batch_size
        self.world_size = world_size
        self.accumulation = accumulation
        self.seed = seed
        self.packing = packing
        self.max_len = max_len
        self._epochs: dict[int, list[MicroBatch]] = {}

    @property
    def per_step(self) -> int:
        return self.world_size * self.accumulation

    def epoch(self, epoch: int) -> list[MicroBatch]:
        """The epoch's micro-batches, a whole number of steps' worth."""
        if epoch not in self._epochs:
            if len(self._epochs) > 4:
                self._epochs.clear()
            self._epochs[epoch] = self._build(epoch)
        return self._epochs[epoch]

    def _build(self, epoch: int) -> list[MicroBatch]:
        rng = random.Random(self.seed * 1_000_003 + epoch)
        order = list(range(len(self.lengths)))
        rng.shuffle(order)
        if self.packing:
            rows = _pack(order, self.lengths, self.max_len)
            batches = [rows[i : i + self.batch_size] for i in range(0, len(rows), self.batch_size)]
        else:
            batches = []
            window = self.batch_size * BUCKET_WINDOW
            for w in range(0, len(order), window):
                chunk = sorted(order[w : w + window], key=lambda i: self.lengths[i])
                batches += [
                    [[i] for i in chunk[j : j + self.batch_size]]
                    for j in range(0, len(chunk), self.batch_size)
                ]
            rng.shuffle(batches)
        steps = max(1, math.ceil(len(batches) / self.per_step))
        return [batches[i % len(batches)] for i in range(steps * self.per_step)]

    def steps_in_epoch(self, epoch: int) -> int:
        return len(self.epoch(epoch)) // self.per_step

    def locate(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of a 0-based global step."""
        epoch = 0
        while step >= (n := self.steps_in_epoch(epoch)):
            step -= n
            epoch += 1
        return epoch, step

    def total_steps(self, epochs: float) -> int:
        full = int(epochs)
        total = sum(self.steps_in_epoch(e) for e in range(full))
        frac = epochs - full
        if frac > 0:
            total += max(1, round(frac * self.steps_in_epoch(full)))
        return max(total, 1)

    def epoch_progress(self, step: int) -> float:
        """Epochs done after ``step`` steps."""
        epoch, i = self.locate(step)
        return epoch + i / self.steps_in_epoch(epoch)

    def step(self, step: int) -> list[MicroBatch]:
        """All micro-batches of a (0-based) step, every rank's, in rank-major order."""
        epoch, i = self.locate(step)
        return self.epoch(epoch)[i * self.per_step : (i + 1) * self.per_step]

    def rank_share(self, micro: list[MicroBatch], rank: int) -> list[MicroBatch]:
        return micro[rank * self.accumulation : (rank + 1) * self.accumulation]

    def supervised_tokens(self, micro: list[MicroBatch]) -> int:
        return sum(self.answer_tokens[i] for mb in micro for row in mb for i in row)


def make_plan(
    examples: Sequence[Example],
    *,
    batch_size: int,
    world_size: int,
    accumulation: int,
    seed: int,
    packing: bool,
    max_len: int,
) -> Plan:
    return Plan(
        [max(len(e), e.teacher_length) if packing else len(e) for e in examples],
        [e.n_answer for e in examples],
        batch_size=batch_size,
        world_size=world_size,
        accumulation=accumulation,
        seed=seed,
        packing=packing,
        max_len=max_len,
    )


def _pack(order: Sequence[int], lengths: Sequence[int], max_len: int) -> list[Row]:
    rows: list[Row] = []
    current: Row = []
    used = 0
    for i in order:
        if current and used + lengths[i] > max_len:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += lengths[i]
    if current:
        rows.append(current)
    return rows


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T]
    attention_mask: torch.Tensor | None  # [B, T]; None when packed
    position_ids: torch.Tensor | None  # [B, T]; set when packed
    select: torch.Tensor  # [N] flat positions (b * T + t) whose next token is supervised
    labels: torch.Tensor  # [N] the supervised tokens
    topk_ids: torch.Tensor | None = None  # [N, k]
    topk_logprobs: torch.Tensor | None = None  # [N, k]
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_position_ids: torch.Tensor | None = None
    teacher_select: torch.Tensor | None = None
    tokens: int = 0  # non-padding input tokens

    def to(self, device: torch.device) -> Batch:
        moved = {
            k: (v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v)
            for k, v in vars(self).items()
        }
        return Batch(**moved)


def _rows(
    seqs: list[list[np.ndarray]], prompt_lens: list[list[int]], pad_id: int, packed: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    width = max(sum(len(s) for s in row) for row in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    pos = torch.zeros((len(seqs), width), dtype=torch.long)
    select: list[int] = []
    labels: list[int] = []
    for b, (row, plens) in enumerate(zip(seqs, prompt_lens, strict=True)):
        offset = 0
        for seq, p in zip(row, plens, strict=True):
            n = len(seq)
            ids[b, offset : offset + n] = torch.from_numpy(seq)
            mask[b, offset : offset + n] = 1
            pos[b, offset : offset + n] = torch.arange(n)
            select.extend(b * width + offset + t for t in range(p - 1, n - 1))
            labels.extend(seq[p:].tolist())
            offset += n
        if packed and offset < width:  # padding: a separate segment, attending only to itself
            pos[b, offset:] = torch.arange(width - offset)
    return (
        ids,
        None if packed else mask,
        pos if packed else None,
        torch.tensor(select, dtype=torch.long),
        torch.tensor(labels, dtype=torch.long),
    )


def collate(examples: Sequence[Example], micro: MicroBatch, pad_id: int, packed: bool) -> Batch:
    rows = [[examples[i] for i in row] for row in micro]
    ids, mask, pos, select, labels = _rows(
        [[e.input_ids for e in row] for row in rows],
        [[e.n_prompt for e in row] for row in rows],
        pad_id,
        packed,
    )
    flat = [e for row in rows for e in row]
    batch = Batch(
        input_ids=ids,
        attention_mask=mask,
        position_ids=pos,
        select=select,
        labels=labels,
        tokens=sum(len(e) for e in flat),
    )
    if flat and all(e.topk_ids is not None for e in flat):
        batch.topk_ids = torch.from_numpy(np.concatenate([e.topk_ids for e in flat]).astype(np.int64))  # type: ignore[misc]
        batch.topk_logprobs = torch.from_numpy(np.concatenate([e.topk_logprobs for e in flat]))  # type: ignore[misc]
    if flat and all(e.teacher_prompt is not None for e in flat):
        t_seqs = [
            [np.concatenate([e.teacher_prompt, e.input_ids[e.n_prompt :]]) for e in row] for row in rows
        ]  # type: ignore[list-item]
        t_plens = [[len(e.teacher_prompt) for e in row] for row in rows]  # type: ignore[arg-type]
        t_ids, t_mask, t_pos, t_select, t_labels = _rows(t_seqs, t_plens, pad_id, packed)
        assert torch.equal(t_labels, labels), "teacher and student must supervise the same tokens"
        batch.teacher_input_ids, batch.teacher_attention_mask = t_ids, t_mask
        batch.teacher_position_ids, batch.teacher_select = t_pos, t_select
    return batch
