"""``distillery-trainer``: the stage entry points every workload pod (and the local executor) runs.

Each stage lives in its own module with a light ``register(subparsers)`` (argparse only); the stage's
heavy imports (torch, transformers, vLLM) happen inside its handler, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

# Stage command modules, in pipeline order. Each defines ``register(subparsers) -> None``.
COMMAND_MODULES: tuple[str, ...] = (
    "distillery_trainer.collect.command",
    "distillery_trainer.train.command",
    "distillery_trainer.serve.cli",
    "distillery_trainer.evaluate.cli",
)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="distillery-trainer",
        description="Distillery's stages: collect teacher outputs, train the student, serve it, evaluate it. "
        "Each reads the run's stage config (--config), rendered by the operator or `distillery run`.",
    )
    parser.add_argument("--version", action="version", version=f"distillery-trainer {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="STAGE")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    code = int(args.func(args) or 0)
    if code == 0 and args.command == "train" and os.environ.get("RANK", "0") == "0":
        _record_training(args.config)
    return code


def _record_training(config: Any) -> None:
    """What produced the student, beside it (``student/provenance.json`` and ``README.md``, the model
    card that evaluation completes), written by rank 0 once training saved the student."""
    import json

    from . import provenance
    from .api.stage import load_stage_config
    from .layout import RunLayout

    cfg = load_stage_config(config)
    layout = RunLayout(Path(cfg.artifacts))
    if not (layout.student_dir / "config.json").exists():
        return
    progress: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        progress = json.loads(layout.progress_file.read_text(encoding="utf-8"))
    keys = ("step", "loss", "gpuHours", "elapsedSeconds", "worldSize", "gpus")
    provenance.record_training(layout, cfg.run, cfg.spec, _device(), {k: progress.get(k) for k in keys})


def _device() -> str | None:
    torch = sys.modules.get("torch")  # training imported it; never imported here for this
    if torch is None:
        return None
    if torch.cuda.is_available():
        return f"cuda ({torch.cuda.get_device_name(0)}, {torch.cuda.device_count()} visible)"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


if __name__ == "__main__":
    sys.exit(main())
