"""``distillery-trainer train --config FILE``: stage 2, run by every rank (``torchrun ... --no-python
distillery-trainer train --config FILE``) or as one process. Light: argparse here, torch in the handler."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

DESCRIPTION = (
    "Train the student on the collected teacher outputs: sft, logit KD (top-k logprobs or an online teacher), "
    "seqkd, then DPO when enabled. Writes train/checkpoints/, train/progress.json and student/ under the run's "
    "artifacts. One process, or every rank under torchrun (DDP or FSDP; gloo on CPUs, NCCL on GPUs); a "
    "restarted run resumes from its latest checkpoint."
)


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser("train", help="stage 2: train the student", description=DESCRIPTION)
    parser.add_argument("--config", required=True, type=Path, help="the run's stage config (stage.yaml)")
    parser.add_argument(
        "--log-level", default=os.environ.get("DISTILLERY_LOG_LEVEL", "INFO"), help="logging level (INFO)"
    )
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    rank = os.environ.get("RANK", "0")
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s rank{rank} %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    from ..api.resource import SpecError
    from ..api.stage import load_stage_config
    from ..redact import install

    install()  # a Hugging Face token (HF_TOKEN) or a key is masked in everything this process prints
    try:
        cfg = load_stage_config(args.config)
    except (SpecError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from ..api.summaries import TrainingProgress
    from ..data.shards import DataError
    from ..models import ModelNotFound
    from ..outputs import StaleInputs
    from ..termination import write_termination_message
    from .distributed import init_distributed, shutdown
    from .guards import TrainingError
    from .loop import TrainingRun, configure_threads

    configure_threads()
    _quiet_libraries()
    env = init_distributed()
    run = None
    code = 0
    failure = None
    try:
        run = TrainingRun(cfg, env)
        progress = run.run()
        logging.getLogger(__name__).info(
            "training %s: step %d/%s, loss %s",
            progress.state,
            progress.step,
            progress.total_steps,
            progress.loss,
        )
    except (TrainingError, DataError, ModelNotFound, StaleInputs) as exc:
        print(f"error: {exc}", file=sys.stderr)
        failure, code = str(exc), 1
    except BaseException as exc:
        failure = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        if env.is_main:
            summary = (
                run.reporter.progress
                if run is not None
                else TrainingProgress(state="Failed", method=cfg.spec.training.method, message=failure)
            )
            write_termination_message(summary.to_dict())
        shutdown(env)
    return code


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_warning()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
