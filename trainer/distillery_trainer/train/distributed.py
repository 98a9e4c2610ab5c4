"""The process group as torchrun (or a plain single process) sets it up: ranks, device, backend, reductions.

Under ``torchrun`` the ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_*`` variables are set and every rank
joins one process group: NCCL when each rank has a GPU, gloo on the CPU. Without them the trainer is one
process and every collective below is a no-op, so the same code runs on 1 process, 2 CPU ranks or N x M GPUs.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def gpus(self) -> int:
        return self.world_size if self.device.type == "cuda" else 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce(self, values: Sequence[float], op: str = "sum") -> list[float]:
        """Reduce a few floats over all ranks (``sum`` or ``max``); every rank gets the result."""
        tensor = torch.tensor(list(values), dtype=torch.float64, device=self._comm_device)
        if self.distributed:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return [float(v) for v in tensor.tolist()]

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.backend == "nccl" else torch.device("cpu")


def init_distributed(timeout_s: float = 1800.0) -> DistEnv:
    """Join torchrun's process group if there is one; pick the device for this rank."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if world <= 1:
        return DistEnv(device=device)
    backend = "nccl" if cuda else "gloo"
    if not dist.is_initialized():
        kwargs: dict[str, Any] = {"backend": backend, "timeout": timedelta(seconds=timeout_s)}
        if cuda:
            kwargs["device_id"] = device
        dist.init_process_group(**kwargs)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device, backend=backend)


def shutdown(env: DistEnv) -> None:
    """Leave the process group: ours, or the one TRL's DPO (accelerate) opened when torchrun started this
    process alone (a world of one, where ours is not needed)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
