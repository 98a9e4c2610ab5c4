"""``distillery-trainer``: the stage entry points every workload pod (and the local executor) runs.

Each stage lives in its own module with a light ``register(subparsers)`` (argparse only); the stage's
heavy imports (torch, transformers, vLLM) happen inside its handler, so ``--help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

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
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
