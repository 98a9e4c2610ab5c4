"""One shard of stage 1, from the stage config to the summary: what ``distillery-trainer collect`` runs.

Reads the prompts, takes the shard's slice, skips what an earlier attempt finished, collects the rest
(:mod:`.collector`), merges the top-k chunks when the shard is complete, and writes the shard's
:class:`CollectionSummary` to ``collect/summary-XXXXX.json`` (also during the run, after every chunk) and
as the pod's termination message. Counters of earlier attempts (requests, cached, paid tokens, wall time)
are carried over from their summary, so the final one covers the whole shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import outputs, redact
from ..api.stage import StageConfig
from ..api.stages import collection_failures
from ..api.summaries import CollectionSummary
from ..cost import tokens_usd
from ..data.topk import file_metadata
from ..layout import RunLayout, atomic_write_json
from ..termination import write_termination_message
from . import identity
from .cache import AnswerCache
from .collector import Collector, Counters, Selection, Settings
from .progress import Progress
from .prompts import Prompt, iter_source, prepare, shard_slice, volume_root
from .ratelimit import RateLimiter
from .store import Recovered, ShardStore
from .teacher import RequestSpec, Teacher, TokenIds, wants_token_ids

log = logging.getLogger("distillery.collect")

EXIT_OK = 0
EXIT_FATAL = 2
EXIT_TOO_MANY_FAILED = 3  # more than collection.maxFailedFraction of the shard's prompts failed


@dataclass
class Options:
    config: StageConfig
    shard: int = 0
    shards: int = 1
    prompts: str | None = None  # overrides spec.data.prompts
    cache_dir: str | None = None  # overrides the config's cacheDir
    tokenizer: str | None = None
    progress_interval: float = 10.0
    chunk_lines: int = 256
    flush_seconds: float = 2.0
    tty: bool | None = None


def redactor(secret: str) -> Any:
    """What masks the key (and anything shaped like one) in a failure's reason before it is written."""
    redact.register([secret])
    return redact.scrub


def load_prompts(opts: Options, layout: RunLayout) -> list[Prompt]:
    spec, cfg = opts.config.spec, opts.config
    source = spec.data.prompts
    hf = source.hf_dataset
    rows = iter_source(
        source,
        volume=volume_root(cfg.artifacts, cfg.run.namespace, cfg.run.name),
        download_dir=layout.collect_dir / ".downloads",
        override=opts.prompts,
    )
    return prepare(
        rows,
        eval_fraction=spec.data.eval_fraction,
        system_prompt=spec.data.system_prompt,
        max_prompts=spec.data.max_prompts,
        messages_field=(hf.messages_field or "messages") if hf else "messages",
        prompt_field=hf.prompt_field if hf else "prompt",
    )


def settings_for(opts: Options) -> tuple[Settings, str]:
    """The request and the collection settings the spec asks for; and the teacher's base URL."""
    spec = opts.config.spec
    endpoint = opts.config.teacher_endpoint()
    sampling = spec.teacher.sampling
    top_k = spec.teacher.logprobs.top_k if spec.teacher.logprobs else None
    samples, selection = 1, "first"
    if spec.training.method == "seqkd" and spec.training.seqkd.samples > 1:
        samples, selection = spec.training.seqkd.samples, spec.training.seqkd.selection
    request = RequestSpec(
        model=endpoint.model,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        max_tokens=sampling.max_tokens,
        seed=sampling.seed,
        n=samples,
        logprobs=top_k is not None or samples > 1,
        top_logprobs=top_k,
        token_ids=top_k is not None and wants_token_ids(endpoint.base_url),
    )
    model_identity = spec.teacher.self_hosted.model if spec.teacher.self_hosted else endpoint.model
    c = spec.collection
    sel: Selection = "first" if selection == "first" else ("all" if selection == "all" else "bestLogprob")
    return (
        Settings(
            request=request,
            model_identity=model_identity,
            endpoint=None if spec.teacher.self_hosted else endpoint.base_url,
            top_k=top_k,
            selection=sel,
            concurrency=c.concurrency,
            max_retries=c.max_retries,
            chunk_lines=opts.chunk_lines,
            flush_seconds=opts.flush_seconds,
        ),
        endpoint.base_url,
    )


def make_summary(
    opts: Options, total: int, rec: Recovered, prev: CollectionSummary | None, c: Counters, elapsed: float
) -> CollectionSummary:
    base = prev or CollectionSummary(shard=opts.shard, shards=opts.shards, total=total, done=0)
    done = len(rec.done) + c.done
    input_tokens = base.input_tokens + c.input_tokens
    output_tokens = base.output_tokens + c.output_tokens
    wall = base.wall_seconds + elapsed
    return CollectionSummary(
        shard=opts.shard,
        shards=opts.shards,
        total=total,
        done=done,
        failed=len(rec.failed) + c.failed,
        cached=base.cached + c.cached,
        requests=base.requests + c.requests,
        retries=base.retries + c.retries,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cost_usd=round(tokens_usd(input_tokens, output_tokens, opts.config.spec.teacher.pricing), 6),
        wall_seconds=round(wall, 3),
        prompts_per_second=round(done / wall, 3) if wall > 0 else 0.0,
        last_error=c.last_error,
    )


def failure_breakdown(path: Path, limit: int = 8) -> tuple[dict[str, int], dict[str, str]]:
    """The failures file's prompts by kind (the ``limit`` most common) and one reason of each kind."""
    kinds: Counter[str] = Counter()
    examples: dict[str, str] = {}
    if path.exists():
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            kind = str(entry.get("kind") or "unknown")
            kinds[kind] += 1
            examples.setdefault(kind, str(entry.get("reason") or "")[:160])
    top = dict(kinds.most_common(limit))
    return top, {k: examples[k] for k in top}


def _previous_summary(path: Path, rec: Recovered) -> CollectionSummary | None:
    if not path.exists() or (rec.lines == 0 and not rec.failed and not rec.retrying):
        return None
    try:
        return CollectionSummary.model_validate_json(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


async def run_shard(opts: Options) -> tuple[CollectionSummary, int]:
    cfg = opts.config
    spec = cfg.spec
    if "://" in cfg.artifacts:
        raise ValueError(
            f"artifacts {cfg.artifacts!r} is a URL: collection writes to a mounted directory "
            "(spec.storage.pvc in a cluster, a local directory for `distillery run`)"
        )
    layout = RunLayout(Path(cfg.artifacts))
    outputs.claim(layout, "collect", spec, log.info)
    started = time.monotonic()
    api_key = cfg.teacher_api_key()
    redact = redactor(api_key)

    all_prompts = load_prompts(opts, layout)
    mine = shard_slice(all_prompts, opts.shard, opts.shards)
    settings, base_url = settings_for(opts)
    teacher = Teacher(
        base_url, api_key, timeout=spec.collection.timeout_seconds, concurrency=settings.concurrency
    )
    try:
        token_ids = None
        metadata = None
        if settings.top_k:
            served_root = None
            with contextlib.suppress(Exception):  # only vLLM reports it; anything else just has no root
                models = await teacher.models()
                served_root = next(
                    (m.get("root") for m in models if m.get("id") == settings.request.model), None
                )
            tried = identity.candidates(
                opts.tokenizer,
                served_root,
                spec.teacher.self_hosted.model if spec.teacher.self_hosted else None,
                spec.teacher.endpoint.model if spec.teacher.endpoint else None,
            )
            tokenizer, ident = await asyncio.to_thread(identity.resolve, tried, settings.request.model)
            token_ids = TokenIds(tokenizer)
            metadata = file_metadata(ident, settings.top_k, settings.request.model)

        store = ShardStore(layout, opts.shard, metadata)
        rec = store.recover()
        prev = _previous_summary(layout.summary_file(opts.shard), rec)
        pending = [p for p in mine if p.id not in rec.done and p.id not in rec.failed]
        log.info(
            "shard %d/%d: %d prompts (of %d); %d answered before, %d failed for good before, %d to retry, "
            "%d to ask%s",
            opts.shard,
            opts.shards,
            len(mine),
            len(all_prompts),
            len(rec.done),
            len(rec.failed),
            len(rec.retrying & {p.id for p in pending}),
            len(pending),
            f"; cut a torn last line ({rec.torn_bytes} bytes)" if rec.torn_bytes else "",
        )
        cache_dir = opts.cache_dir or cfg.cache_dir
        cache = AnswerCache(cache_dir) if spec.collection.cache and cache_dir else None

        def on_flush(c: Counters) -> None:
            summary = make_summary(opts, len(mine), rec, prev, c, time.monotonic() - started)
            atomic_write_json(layout.summary_file(opts.shard), summary.to_dict())

        collector = Collector(
            settings,
            teacher,
            store,
            cache=cache,
            limiter=RateLimiter(spec.collection.requests_per_minute, spec.collection.tokens_per_minute),
            token_ids=token_ids,
            redact=redact,
            on_flush=on_flush,
        )
        stop = asyncio.Event()
        caught: list[int] = []
        loop = asyncio.get_running_loop()

        def on_signal(signum: int) -> None:  # a pod's SIGTERM: flush what is answered, then stop
            caught.append(signum)
            stop.set()

        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, on_signal, sig)
        progress = Progress(
            collector.counters,
            total=len(mine),
            before=len(mine) - len(pending),
            before_failed=len(rec.failed),
            shard=opts.shard,
            shards=opts.shards,
            interval=opts.progress_interval,
            tty=opts.tty,
            summary=lambda: make_summary(
                opts, len(mine), rec, prev, collector.counters, time.monotonic() - started
            ),
        )
        ticker = asyncio.create_task(progress.run())
        try:
            counters = await collector.run(pending, stop)
        finally:
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
    finally:
        await teacher.close()

    complete = not stop.is_set() and collector.fatal is None
    if complete and settings.top_k:
        await asyncio.to_thread(store.finalize_arrays)
    summary = make_summary(opts, len(mine), rec, prev, counters, time.monotonic() - started)
    if summary.failed:
        summary.failure_kinds, summary.failure_examples = failure_breakdown(layout.failures_file(opts.shard))
    if collector.fatal is not None:  # the human reason travels with the counts, to the run's status
        summary.stopped = redact(collector.fatal)[:1024]
    atomic_write_json(layout.summary_file(opts.shard), summary.to_dict())
    write_termination_message(summary.to_dict())
    log.info("%s", progress.line())
    progress.emit(summary)
    if counters.unmapped_tokens:
        log.warning(
            "%d tokens came back as text the teacher's tokenizer does not know (id -1)",
            counters.unmapped_tokens,
        )
    if counters.failed:
        log.warning(
            "%d prompts failed (%d retryable: a rerun asks them again); reasons in %s",
            counters.failed,
            counters.failed_retryable,
            layout.failures_file(opts.shard),
        )
    if collector.fatal is not None:
        log.error("stopped: %s", collector.fatal)
        return summary, EXIT_FATAL
    if caught:
        log.warning("stopped by signal %d; answers so far are on disk, a rerun resumes", caught[0])
        return summary, 128 + caught[0]
    too_many = collection_failures([summary], spec.collection)
    if too_many is not None:
        log.error("shard %d/%d failed: %s", opts.shard, opts.shards, too_many)
        return summary, EXIT_TOO_MANY_FAILED
    log.info(
        "shard %d/%d complete: %d answered, %d failed, %d from the cache, %d requests, $%.4f, in %.1fs",
        opts.shard,
        opts.shards,
        summary.done,
        summary.failed,
        summary.cached,
        summary.requests,
        summary.cost_usd,
        summary.wall_seconds,
    )
    return summary, EXIT_OK
