"""``distillery-trainer collect --config FILE [--shard i --shards n]``: argparse only; the work is imported
inside the handler so ``--help`` stays instant."""

from __future__ import annotations

import argparse
import logging
import sys

EXIT_CONFIG = 1


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "collect",
        help="collect the teacher's answers (and top-k logprobs) for one shard of the prompts",
        description="Stage 1: ask the teacher for every prompt of this shard; resumable, rate-limited, cached. "
        "Writes collect/shard-XXXXX.jsonl, failures-XXXXX.jsonl, summary-XXXXX.json (and top-k logprobs).",
    )
    p.add_argument(
        "--config", required=True, help="the stage config (stage.yaml) the operator or `distillery run` wrote"
    )
    p.add_argument(
        "--shard", type=int, default=None, help="this shard's index (default: $JOB_COMPLETION_INDEX, else 0)"
    )
    p.add_argument("--shards", type=int, default=None, help="shards in all (default: spec.collection.shards)")
    p.add_argument(
        "--prompts", default=None, help="read prompts from this JSONL file or saved dataset instead"
    )
    p.add_argument(
        "--cache-dir", default=None, help="the teacher-answer cache (default: the config's cacheDir)"
    )
    p.add_argument(
        "--tokenizer", default=None, help="the teacher's tokenizer (dir or hub id), for white-box identity"
    )
    p.add_argument(
        "--progress-interval", type=float, default=10.0, help="seconds between progress lines off a TTY"
    )
    p.add_argument("--chunk-lines", type=int, default=256, help="answers per write to disk")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    import asyncio

    from ..api.resource import SpecError
    from ..api.stage import load_stage_config
    from .prompts import PromptError, shard_from_env
    from .stage import Options, run_shard

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    for chatty in ("httpx2", "httpx", "openai"):  # a line per request drowns a pod's log
        logging.getLogger(chatty).setLevel(logging.WARNING)
    log = logging.getLogger("distillery.collect")
    try:
        config = load_stage_config(args.config)
        from ..redact import install

        # The key is masked in every log record, traceback and line this process writes (an error
        # message may echo the header it was sent).
        install([config.teacher_api_key()])
        shards = args.shards if args.shards is not None else config.spec.collection.shards
        shard = args.shard if args.shard is not None else shard_from_env()
        if not 0 <= shard < shards:
            raise ValueError(f"--shard {shard} is not in [0, {shards}) (--shards / spec.collection.shards)")
        opts = Options(
            config=config,
            shard=shard,
            shards=shards,
            prompts=args.prompts,
            cache_dir=args.cache_dir,
            tokenizer=args.tokenizer,
            progress_interval=args.progress_interval,
            chunk_lines=max(1, args.chunk_lines),
        )
        _, code = asyncio.run(run_shard(opts))
        return code
    except (SpecError, PromptError, ValueError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return EXIT_CONFIG
