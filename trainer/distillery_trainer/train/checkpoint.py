"""Resumable checkpoints: ``train/checkpoints/step-000016/`` (the step, six digits), written by rank 0
into a temp directory and renamed into place, so a directory named ``step-*`` is always complete.

Each holds the trainable weights (all of them, or the LoRA adapter) as safetensors, the optimizer state,
every rank's RNG state and ``state.json`` (step, elapsed time, tokens, ranks). A finished training's
checkpoint (``finished`` in its state) holds no optimizer state: nothing steps from it (a changed
training section trains again from step 0), it is what the student is exported again from, and AdamW's
two moments are twice the weights (605 MB of the demo's 0.9 GB checkpoint). The data position needs no
saving: the batch plan is a pure function of the step (:mod:`.batching`). Weights and optimizer state go
through ``torch.distributed.checkpoint.state_dict`` as full (unsharded) state dicts keyed by parameter name,
so one format serves one process, DDP and FSDP, and a checkpoint loads on another number of ranks.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .distributed import DistEnv

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step-(\d+)$")
KEEP = 2


def step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def checkpoints(root: Path) -> list[tuple[int, Path]]:
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := STEP_RE.match(p.name)) and p.is_dir()]
    return sorted(f for f in found if (f[1] / "state.json").exists())


def latest(root: Path) -> Path | None:
    found = checkpoints(root)
    return found[-1][1] if found else None


def read_state(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((path / "state.json").read_text(encoding="utf-8"))
    return data


def _options(**kw: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, ignore_frozen_params=True, **kw)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _dedupe(state: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tied weights (embeddings = LM head) are one tensor under two names: store it once, note the alias."""
    weights: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple[int, tuple[int, ...]], str] = {}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        key = (value.untyped_storage().data_ptr(), tuple(value.shape))
        if key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        weights[name] = value.detach().contiguous()
    return weights, aliases


def _nbytes(obj: Any) -> int:
    """The bytes of every tensor in a (nested) state dict: what saving it writes, give or take a header."""
    if isinstance(obj, torch.Tensor):
        return obj.nelement() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _make_room(root: Path, step: int, need: int) -> None:
    """Remove what the new checkpoint supersedes (all but the newest KEEP - 1), then refuse it if it still does
    not fit: torch.save on a full volume fails with ``unexpected pos``, which names neither."""
    for _, old in checkpoints(root)[: -(KEEP - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)
    free = shutil.disk_usage(root).free
    if need > free:
        mb = 1024 * 1024
        raise OSError(
            errno.ENOSPC,
            f"no space for the step {step} checkpoint in {root}: it needs {need / mb:,.0f} MB and "
            f"{free / mb:,.0f} MB are free; free space on that volume or give the run a "
            "larger one (storage.pvc.create.size in a cluster), then run again to resume from the last checkpoint",
        )


def save(
    root: Path,
    step: int,
    module: nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict[str, Any],
    env: DistEnv,
) -> Path:
    """Collective: every rank takes part (state gathering); rank 0 writes. Returns the checkpoint's path."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    optim_sd: dict[str, Any] | None = None
    if state.get("finished"):  # every rank's state says so: the same collectives on all of them
        model_sd = get_model_state_dict(module, options=_options(cpu_offload=True))
    else:
        model_sd, optim_sd = get_state_dict(module, optimizer, options=_options(cpu_offload=True))
    rngs = env.gather_object(rng_state())
    out = step_dir(root, step)
    if env.is_main:
        root.mkdir(parents=True, exist_ok=True)
        weights, aliases = _dedupe(model_sd)
        _make_room(root, step, _nbytes(weights) + _nbytes(optim_sd) + _nbytes(rngs))
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=root))
        try:
            save_file(weights, str(tmp / "trainable.safetensors"), metadata={"aliases": json.dumps(aliases)})
            if optim_sd is not None:
                torch.save(optim_sd, tmp / "optimizer.pt")
            torch.save(rngs, tmp / "rng.pt")
            (tmp / "state.json").write_text(
                json.dumps({**state, "step": step, "worldSize": env.world_size}, indent=2, sort_keys=True)
                + "\n"
            )
            tmp.chmod(0o755)
            if out.exists():  # a re-run of a step that was saved already
                shutil.rmtree(out)
            os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in checkpoints(root)[:-KEEP]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint %s", out)
    env.barrier()
    return out


def load(path: Path, module: nn.Module, optimizer: torch.optim.Optimizer, env: DistEnv) -> dict[str, Any]:
    """Restore weights, optimizer and (same number of ranks) RNG state; returns ``state.json``."""
    from safetensors import safe_open
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    state = read_state(path)
    file = str(path / "trainable.safetensors")
    model_sd = load_file(file)
    with safe_open(file, framework="pt") as fh:
        aliases = json.loads((fh.metadata() or {}).get("aliases", "{}"))
    for alias, name in aliases.items():
        model_sd[alias] = model_sd[name]
    if state.get("finished") and not (path / "optimizer.pt").exists():
        set_model_state_dict(module, model_sd, options=_options(strict=False))
    else:
        optim_sd = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        set_state_dict(
            module,
            optimizer,
            model_state_dict=model_sd,
            optim_state_dict=optim_sd,
            options=_options(strict=False),
        )
    rngs = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    if len(rngs) == env.world_size:
        set_rng_state(rngs[env.rank])
    else:
        log.warning(
            "checkpoint %s was written by %d ranks, this run has %d: random state not restored",
            path.name,
            len(rngs),
            env.world_size,
        )
    return state
