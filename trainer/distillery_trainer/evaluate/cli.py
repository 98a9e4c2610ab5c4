"""``distillery-trainer evaluate --config FILE``: the evaluation stage's entry point (light to import)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def register(sub: Any) -> None:
    p: argparse.ArgumentParser = sub.add_parser(
        "evaluate",
        help="measure the served student against the teacher: quality retention, latency, cost, the gate",
        description=(
            "Ask the served student (stage config `student`) the held-out prompts of collect/, score its "
            "answers against the references or the teacher's (and with the LLM judge when "
            "evaluation.judge is set), run the latency benchmark (evaluation.load), price the run, and "
            "write eval/results.json, eval/report.md and the termination message. Exit 0 when a "
            "retention figure came out (pass or fail is in the results), 1 when none could."
        ),
    )
    p.add_argument("--config", required=True, metavar="FILE", help="the run's stage config (stage.yaml)")
    p.add_argument(
        "--termination-log",
        metavar="FILE",
        default=None,
        help="where to write the ≤ 4 KiB summary (default: /dev/termination-log when it exists, "
        "or $DISTILLERY_TERMINATION_LOG)",
    )
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from ..api import SpecError, load_stage_config
    from ..outputs import StaleInputs
    from .run import evaluate

    try:
        config = load_stage_config(args.config)
    except (OSError, SpecError) as exc:
        print(f"evaluate: cannot read the stage config: {exc}", file=sys.stderr)
        return 2
    from ..redact import install

    # The teacher's and the judge's keys are masked in everything this process prints or logs.
    install([config.teacher_api_key(), config.judge_api_key()])
    if "://" in config.artifacts:
        print(
            f"evaluate: artifacts {config.artifacts!r} is a URL: evaluation reads and writes a mounted directory "
            "(spec.storage.pvc in a cluster, a local directory for `distillery run`)",
            file=sys.stderr,
        )
        return 2
    try:
        return evaluate(config, termination_path=args.termination_log).exit_code
    except StaleInputs as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
