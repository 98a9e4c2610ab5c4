"""Pure pieces of collection: the rate limiter, ids and the split, shard slices, backoff with Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import time
from pathlib import Path

import httpx2
import openai
import pytest
from distillery_trainer.api.spec import HFDataset, PromptSource
from distillery_trainer.collect.prompts import (
    PromptError,
    content_id,
    iter_source,
    local_prompts_path,
    prepare,
    shard_from_env,
    shard_slice,
    split_of,
    volume_root,
)
from distillery_trainer.collect.ratelimit import RateLimiter
from distillery_trainer.collect.verdict import FAIL, FATAL, RETRY, classify
from distillery_trainer.retry import Backoff
from distillery_trainer.retry_after import parse_retry_after

# ---------------------------------------------------------------------------------------------- rate limiter


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


async def test_requests_per_minute_spaces_requests_after_a_one_second_burst() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=120, clock=clock, sleep=clock.sleep)  # 2/s, burst of 2
    stamps = []
    for _ in range(6):
        await limiter.acquire()
        stamps.append(clock.now - 1000.0)
    assert stamps == pytest.approx([0.0, 0.0, 0.5, 1.0, 1.5, 2.0])


async def test_tokens_per_minute_charges_estimates_and_settles_usage() -> None:
    clock = FakeClock()
    limiter = RateLimiter(tokens_per_minute=600, clock=clock, sleep=clock.sleep)  # 10 tokens/s, burst 10
    await limiter.acquire(10)
    assert clock.now == 1000.0
    await limiter.acquire(10)  # the bucket is empty: one second
    assert clock.now == pytest.approx(1001.0)
    limiter.settle(estimated=10, actual=2)  # the answer was short: 8 tokens back
    await limiter.acquire(10)
    assert clock.now == pytest.approx(1001.2)
    await limiter.acquire(50)  # bigger than the bucket: waits for a full bucket, then runs into debt
    assert clock.now == pytest.approx(1002.2)
    await limiter.acquire(1)  # ... which the next request pays back
    assert clock.now == pytest.approx(1006.3)


async def test_limiter_serves_waiters_in_order_and_is_free_without_limits() -> None:
    clock = FakeClock()
    limiter = RateLimiter(requests_per_minute=60, clock=clock, sleep=clock.sleep)
    order: list[int] = []

    async def one(i: int) -> None:
        await limiter.acquire()
        order.append(i)

    await asyncio.gather(*(one(i) for i in range(5)))
    assert order == [0, 1, 2, 3, 4]
    assert clock.now == pytest.approx(1004.0)
    free = RateLimiter()
    t = time.monotonic()
    for _ in range(1000):
        await free.acquire(10**6)
    assert time.monotonic() - t < 0.5 and not free.active


# ---------------------------------------------------------------------------------------------- ids and split


def _rows(*rows: dict[str, object]) -> list[tuple[str, dict[str, object]]]:
    return [(f"test:{i + 1}", r) for i, r in enumerate(rows)]


def test_ids_are_given_or_a_content_hash_and_repeats_are_handled() -> None:
    a = prepare(
        iter(_rows({"prompt": "hello"}, {"id": 7, "prompt": "x"}, {"prompt": "hello"})), eval_fraction=0.1
    )
    assert [p.id for p in a] == [content_id([{"role": "user", "content": "hello"}]), "7"]
    b = prepare(iter(_rows({"messages": [{"role": "user", "content": "hello"}]})), eval_fraction=0.1)
    assert b[0].id == a[0].id  # same content, same id, whichever way it was written
    assert len(a[0].id) == 16 and content_id([{"role": "user", "content": "hello!"}]) != a[0].id
    with pytest.raises(PromptError, match=r"test:2: id '1' was already used .* at test:1"):
        prepare(iter(_rows({"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"})), eval_fraction=0.1)
    with pytest.raises(PromptError, match=r"test:1: needs 'messages'"):
        prepare(iter(_rows({"text": "a"})), eval_fraction=0.1)


def test_system_prompt_reference_category_and_max_prompts() -> None:
    rows = _rows(
        {"prompt": "q1", "reference": "r1", "category": "dates"},
        {"messages": [{"role": "system", "content": "own"}, {"role": "user", "content": "q2"}]},
        {"prompt": "q3"},
    )
    ps = prepare(iter(rows), eval_fraction=0.5, system_prompt="be brief", max_prompts=2)
    assert len(ps) == 2
    assert ps[0].messages == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q1"}]
    assert (ps[0].reference, ps[0].category) == ("r1", "dates")
    assert ps[1].messages[0] == {"role": "system", "content": "own"}  # the prompt's own system message wins
    assert ps[0].id == prepare(iter(rows[:1]), eval_fraction=0.5)[0].id  # the system prompt is not in the id


def test_split_is_deterministic_and_close_to_the_fraction() -> None:
    ids = [f"id-{i}" for i in range(20000)]
    splits = [split_of(i, 0.05) for i in ids]
    assert splits == [split_of(i, 0.05) for i in ids]
    assert 0.04 < splits.count("eval") / len(ids) < 0.06
    # growing the fraction only moves prompts from train to eval
    assert all(split_of(i, 0.2) == "eval" for i, s in zip(ids, splits, strict=True) if s == "eval")


def test_prompt_sources_a_saved_dataset_the_volume_and_local_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    ds = datasets.Dataset.from_dict({"question": ["a?", "b?"], "id": ["x", "y"], "reference": ["A", "B"]})
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "ds"))
    source = PromptSource(hf_dataset=HFDataset(name=str(tmp_path / "ds"), prompt_field="question"))
    rows = iter_source(source, volume=tmp_path, download_dir=tmp_path)
    ps = prepare(rows, eval_fraction=0.1, prompt_field="question")
    assert [(p.id, p.messages[0]["content"], p.reference) for p in ps] == [("x", "a?", "A"), ("y", "b?", "B")]

    # pvcPath is relative to the volume's root: the artifacts path minus runs/<namespace>/<name>
    assert volume_root("/data/runs/team-a/contracts", "team-a", "contracts") == Path("/data")
    monkeypatch.setenv("DISTILLERY_VOLUME_ROOT", "/mnt/vol")
    assert volume_root("/data/runs/team-a/contracts", "team-a", "contracts") == Path("/mnt/vol")
    (tmp_path / "p.jsonl").write_text('{"prompt": "q"}\n')
    rows = list(iter_source(PromptSource(pvc_path="p.jsonl"), volume=tmp_path, download_dir=tmp_path))
    assert rows == [(f"{tmp_path / 'p.jsonl'}:1", {"prompt": "q"})]
    url = PromptSource(url=(tmp_path / "p.jsonl").as_uri())
    assert [r for _, r in iter_source(url, volume=Path("/nowhere"), download_dir=tmp_path / "dl")] == [
        {"prompt": "q"}
    ]
    # `distillery run`: relative to the run file
    assert local_prompts_path(PromptSource(pvc_path="p.jsonl"), tmp_path) == tmp_path / "p.jsonl"
    with pytest.raises(PromptError, match="pvcPath: no such file .* --prompts"):
        list(iter_source(PromptSource(pvc_path="nope.jsonl"), volume=tmp_path, download_dir=tmp_path))


# ---------------------------------------------------------------------------------------------- shards


def test_shard_slices_partition_the_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    items = list(range(103))
    slices = [shard_slice(items, i, 8) for i in range(8)]
    assert sorted(x for s in slices for x in s) == items
    assert max(map(len, slices)) - min(map(len, slices)) <= 1
    assert shard_slice(items, 0, 1) == items
    with pytest.raises(ValueError, match="JOB_COMPLETION_INDEX"):
        shard_slice(items, 8, 8)
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "3")
    assert shard_from_env() == 3
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    assert shard_from_env() == 0


# ---------------------------------------------------------------------------------------------- backoff


def _status_error(
    status: int, body: dict[str, object], headers: dict[str, str] | None = None
) -> openai.APIStatusError:
    request = httpx2.Request("POST", "http://teacher/v1/chat/completions")
    response = httpx2.Response(status, headers=headers or {}, json=body, request=request)
    cls = {400: openai.BadRequestError, 401: openai.AuthenticationError, 429: openai.RateLimitError}.get(
        status, openai.InternalServerError
    )
    return cls(str(body), response=response, body=body)


def test_backoff_is_exponential_with_jitter_and_honours_retry_after() -> None:
    b = Backoff(base=0.5, cap=8.0)
    rng = random.Random(0)
    for attempt in range(8):
        d = min(8.0, 0.5 * 2**attempt)
        assert all(d / 2 <= b.delay(attempt, None, rng) <= d for _ in range(50))
    assert all(3.0 <= b.delay(5, 3.0, rng) <= 3.3 for _ in range(50))  # Retry-After wins, plus <= 10 %
    assert b.delay(0, 10_000.0, rng) <= b.max_retry_after * 1.1


def test_retry_after_headers_and_what_each_error_means() -> None:
    assert parse_retry_after({"retry-after-ms": "250", "retry-after": "9"}) == 0.25
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    date = email.utils.formatdate(time.time() + 30, usegmt=True)
    assert 25 < (parse_retry_after({"retry-after": date}) or 0) <= 31
    assert parse_retry_after({"retry-after": "soon"}) is None and parse_retry_after({}) is None

    v = classify(_status_error(429, {"error": {"message": "slow down"}}, {"retry-after": "1.5"}))
    assert (v.action, v.kind, v.retry_after, v.status) == (RETRY, "rate_limited", 1.5, 429)
    v = classify(_status_error(503, {"error": {"message": "busy"}}))
    assert (v.action, v.kind) == (RETRY, "server_error")
    v = classify(
        _status_error(
            400, {"error": {"message": "maximum context length is 8", "code": "context_length_exceeded"}}
        )
    )
    assert (v.action, v.kind) == (FAIL, "context_length") and "maximum context length" in v.reason
    assert classify(_status_error(400, {"error": {"message": "bad top_logprobs"}})).kind == "bad_request"
    assert classify(_status_error(401, {"error": {"message": "no"}})).action == FATAL
    request = httpx2.Request("POST", "http://teacher/v1/chat/completions")
    assert classify(openai.APITimeoutError(request)).action == RETRY
    assert classify(json.JSONDecodeError("x", "", 0)).kind == "malformed"


def test_a_refused_connection_stops_the_shard_only_while_the_teacher_has_never_answered(
    tmp_path: Path,
) -> None:
    """Before any answer, a refused connection is a wrong baseURL (stop, saying so); after one, the
    teacher is there and a refused connection is a restart or load: retried like any dropped one."""
    from distillery_trainer.collect.collector import Collector, Settings
    from distillery_trainer.collect.prompts import Prompt
    from distillery_trainer.collect.store import ShardStore
    from distillery_trainer.collect.teacher import RequestSpec
    from distillery_trainer.layout import RunLayout

    url = "http://127.0.0.1:9/v1"

    class Teacher:
        base_url = url

        def __init__(self, answers_first: int) -> None:
            self.left = answers_first

        async def complete(self, body: dict[str, object]) -> object:
            if self.left > 0:
                self.left -= 1
                return {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}], "usage": {}}
            try:
                raise ConnectionRefusedError(111, "Connect call failed")
            except ConnectionRefusedError as exc:
                raise openai.APIConnectionError(request=httpx2.Request("POST", url)) from exc

    def collector(name: str, teacher: Teacher) -> Collector:
        layout = RunLayout(tmp_path / name)
        layout.collect_dir.mkdir(parents=True)
        settings = Settings(
            request=RequestSpec(model="m", temperature=0.0, top_p=1.0, max_tokens=8),
            model_identity="m",
            endpoint=url,
            concurrency=1,
            max_retries=2,
            backoff=Backoff(base=0.001, cap=0.001),
        )
        return Collector(settings, teacher, ShardStore(layout, 0, None))  # type: ignore[arg-type]

    prompts = [Prompt(f"p{i}", [{"role": "user", "content": f"q{i}"}], "train") for i in range(3)]
    never = collector("never", Teacher(0))
    asyncio.run(never.run(prompts))
    assert (
        never.fatal
        == f"connection refused to {url}: the teacher cannot be reached — check teacher.endpoint.baseURL"
    )
    assert never.counters.requests == 1 and never.counters.retries == 0

    once = collector("once", Teacher(1))
    counters = asyncio.run(once.run(prompts))
    assert once.fatal is None
    assert (counters.done, counters.failed, counters.retries) == (1, 2, 4)
    assert counters.last_error is not None and counters.last_error.startswith("connection error")
