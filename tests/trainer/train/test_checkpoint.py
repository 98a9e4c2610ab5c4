"""Checkpoints on a volume that is filling up: the step's checkpoint is refused before anything is written,
with the sizes and the directory, and never costs the last good one.

CI once died with torch's ``RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos
605236928 vs 605236816`` when the demo's optimizer state met a full disk: that message names neither the
disk nor the checkpoint. The free space is faked (``shutil.disk_usage``); the files are real."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from distillery_trainer.train import checkpoint
from distillery_trainer.train.distributed import DistEnv
from torch import nn


def _model() -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-3)
    module(torch.randn(4, 64)).sum().backward()
    optimizer.step()  # AdamW's two moments now exist: the optimizer state is twice the weights
    return module, optimizer


def _fake_free(monkeypatch: pytest.MonkeyPatch, free: int, seen: list[list[str]] | None = None) -> None:
    real = shutil.disk_usage

    def disk_usage(path: Any) -> Any:
        if seen is not None:
            seen.append(sorted(p.name for p in Path(path).iterdir()))
        total, used, _ = real(path)
        return type(real(path))(total, used, free)

    monkeypatch.setattr(checkpoint.shutil, "disk_usage", disk_usage)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir())


def test_a_checkpoint_that_does_not_fit_is_refused_with_the_sizes_and_the_last_one_stays(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    module, optimizer = _model()
    root = tmp_path / "checkpoints"
    good = checkpoint.save(root, 1, module, optimizer, {}, DistEnv())
    need = _size(good)
    _fake_free(monkeypatch, need // 2)
    with pytest.raises(OSError, match="no space") as raised:
        checkpoint.save(root, 2, module, optimizer, {}, DistEnv())
    message = str(raised.value)
    assert str(root) in message and "step 2" in message, message
    assert "MB" in message and "free" in message, message
    assert sorted(p.name for p in root.iterdir()) == [good.name]  # no half-written directory, the last kept
    assert checkpoint.latest(root) == good


def test_the_oldest_checkpoint_makes_room_before_the_new_one_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At most KEEP checkpoints on disk at any moment, not KEEP + 1 while the next one is written."""
    module, optimizer = _model()
    root = tmp_path / "checkpoints"
    for step in range(1, checkpoint.KEEP + 1):
        checkpoint.save(root, step, module, optimizer, {}, DistEnv())
    seen: list[list[str]] = []
    _fake_free(monkeypatch, 10**12, seen)
    checkpoint.save(root, checkpoint.KEEP + 1, module, optimizer, {}, DistEnv())
    assert seen and all(len(names) <= checkpoint.KEEP - 1 for names in seen), seen
    assert [step for step, _ in checkpoint.checkpoints(root)] == list(range(2, checkpoint.KEEP + 2))


def test_a_finished_trainings_checkpoint_holds_no_optimizer_state_and_loads_its_weights(
    tmp_path: Path,
) -> None:
    """Nothing steps from a finished training's checkpoint (a changed training section trains again from
    step 0): it is what re-exports the student, and AdamW's two moments (twice the weights: 605 MB of the
    demo's 0.9 GB checkpoint) would be dead weight on the volume."""
    module, optimizer = _model()
    root = tmp_path / "checkpoints"
    going = checkpoint.save(root, 1, module, optimizer, {"finished": False}, DistEnv())
    done = checkpoint.save(root, 2, module, optimizer, {"finished": True}, DistEnv())
    assert (going / "optimizer.pt").exists() and not (done / "optimizer.pt").exists()
    assert _size(done) < _size(going) / 2
    fresh, fresh_optimizer = _model()
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    state = checkpoint.load(done, fresh, fresh_optimizer, DistEnv())
    assert state["finished"] and state["step"] == 2
    for (name, a), b in zip(module.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
