"""``distillery-trainer collect`` as a pod runs it: a real process against a real HTTP server on loopback
(the fault-injecting OpenAI-shaped server), real files on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from distillery_trainer.data.topk import TopKReader

from tests.support.collect import (
    answers,
    assert_each_once,
    collect_cmd,
    read_lines,
    run_collect,
    stage_config,
    summary,
    write_prompts,
)
from tests.support.servers.fake_openai import TOO_LONG_MARKER, FakeOpenAI, FakeOpenAIConfig, Faults

pytestmark = pytest.mark.slow


def _texts(n: int, tag: str = "") -> list[str]:
    return [f"what does clause {i} of contract {tag}{i * 7 % 13} say" for i in range(n)]


def test_every_prompt_answered_exactly_once_under_faults(tmp_path: Path) -> None:
    faults = Faults(
        rate_429=0.05,
        rate_500=0.02,
        rate_timeout=0.01,
        timeout_sleep=1.5,
        rate_drop=0.01,
        rate_malformed=0.01,
    )
    texts = _texts(300)
    with FakeOpenAI(FakeOpenAIConfig(faults=faults, seed=1, latency=lambda rng: 0.01)) as server:
        cfg = stage_config(
            tmp_path,
            server.base_url,
            write_prompts(tmp_path / "p.jsonl", texts),
            spec={"collection": {"concurrency": 16, "timeoutSeconds": 0.5, "maxRetries": 10}},
        )
        out = run_collect(cfg, "--chunk-lines", "32")
        assert out.returncode == 0, out.stderr
        stats = dict(server.stats)
        answered = dict(server.prompts_answered)
    assert stats["429"] > 0 and stats["500"] > 0 and stats["timeout"] > 0, stats
    lines = answers(tmp_path / "run" / "collect")
    assert_each_once(lines, {line["id"] for line in lines})
    assert sorted(line["messages"][-1]["content"] for line in lines) == sorted(texts)
    assert all(n == 1 for n in answered.values()) and len(answered) == 300  # one good answer per prompt
    s = summary(tmp_path / "run" / "collect")
    assert (s["done"], s["failed"], s["total"]) == (300, 0, 300)
    assert s["requests"] == stats["requests"] and s["retries"] == stats["requests"] - 300
    assert read_lines(tmp_path / "run" / "collect" / "failures-00000.jsonl") == []


def test_kill_9_mid_shard_then_resume_gives_the_same_set(tmp_path: Path) -> None:
    texts = _texts(240)
    spec = {"teacher": {"logprobs": {"topK": 4}}, "collection": {"concurrency": 4}}
    with FakeOpenAI(FakeOpenAIConfig(latency=lambda rng: 0.04)) as server:
        prompts = write_prompts(tmp_path / "p.jsonl", texts)
        ref_cfg = stage_config(
            tmp_path, server.base_url, prompts, name="ref", spec=spec, cache=tmp_path / "c1"
        )
        assert run_collect(ref_cfg).returncode == 0
        cfg = stage_config(tmp_path, server.base_url, prompts, name="run", spec=spec, cache=tmp_path / "c2")
        shard_file = tmp_path / "run" / "collect" / "shard-00000.jsonl"
        before = server.count("ok")
        proc = subprocess.Popen(collect_cmd(cfg, "--chunk-lines", "8"), stderr=subprocess.DEVNULL)
        try:
            deadline = time.monotonic() + 60
            while len(read_lines(shard_file)) < 60 and time.monotonic() < deadline:
                time.sleep(0.05)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(10)
        killed_at = len(read_lines(shard_file))
        assert 60 <= killed_at < 240
        with shard_file.open("a") as fh:  # and a line the kill tore in half
            fh.write('{"id": "half a li')
        out = run_collect(cfg, "--chunk-lines", "8")
        assert out.returncode == 0, out.stderr
        assert "cut a torn last line" in out.stderr
        asked = server.count("ok") - before
    ref, got = answers(tmp_path / "ref" / "collect"), answers(tmp_path / "run" / "collect")
    assert_each_once(got, {line["id"] for line in ref})
    assert sorted(ref, key=lambda x: x["id"]) == sorted(got, key=lambda x: x["id"])
    assert asked <= 240 + 4  # nothing asked twice but the requests in flight at the kill
    assert summary(tmp_path / "run" / "collect")["done"] == 240
    ref_arrays, arrays = (
        TopKReader.for_shard(tmp_path / "ref" / "collect", 0),
        TopKReader.for_shard(tmp_path / "run" / "collect", 0),
    )
    assert arrays.files == [
        tmp_path / "run" / "collect" / "shard-00000.logprobs.safetensors"
    ]  # chunks merged
    assert arrays.keys() == sorted(line["id"] for line in ref)
    assert all(arrays[k].equals(ref_arrays[k]) for k in arrays)


def test_second_run_is_answered_from_the_cache_with_zero_requests(tmp_path: Path) -> None:
    # seqkd, 3 samples, keep the one the teacher is surest of: sample 2 here
    config = FakeOpenAIConfig(logprob=lambda word, pos, sample: -1.0 + 0.3 * sample)
    spec = {
        "teacher": {"sampling": {"temperature": 0.8}},
        "training": {"method": "seqkd", "seqkd": {"samples": 3, "selection": "bestLogprob"}},
    }
    with FakeOpenAI(config) as server:
        prompts = write_prompts(tmp_path / "p.jsonl", _texts(40), ids=True)
        first = stage_config(
            tmp_path, server.base_url, prompts, name="first", spec=spec, cache=tmp_path / "cache"
        )
        assert run_collect(first).returncode == 0
        asked = server.count("requests")
        second = stage_config(
            tmp_path, server.base_url, prompts, name="second", spec=spec, cache=tmp_path / "cache"
        )
        out = run_collect(second)
        assert out.returncode == 0, out.stderr
        assert server.count("requests") == asked == 40
    a, b = answers(tmp_path / "first" / "collect"), answers(tmp_path / "second" / "collect")
    assert sorted(a, key=lambda x: x["id"]) == sorted(b, key=lambda x: x["id"])
    assert all(line["response"].endswith(" #2") and line["meanLogprob"] == pytest.approx(-0.4) for line in b)
    s = summary(tmp_path / "second" / "collect")
    assert (s["done"], s["cached"], s["requests"], s["inputTokens"]) == (40, 40, 0, 0)


def test_a_400_lands_in_the_failures_file_and_retryable_failures_are_retried(tmp_path: Path) -> None:
    texts = _texts(20)
    texts[3] += " " + TOO_LONG_MARKER
    with FakeOpenAI(FakeOpenAIConfig(faults=Faults(rate_500=1.0))) as server:
        cfg = stage_config(
            tmp_path,
            server.base_url,
            write_prompts(tmp_path / "p.jsonl", texts, ids=True),
            spec={"collection": {"maxRetries": 1, "maxFailedFraction": 0.1}},
        )
        outage = run_collect(cfg)  # an outage: every prompt gives up after 2 attempts, the shard fails
        assert outage.returncode == 3 and "collection.maxFailedFraction" in outage.stderr
        failures = read_lines(tmp_path / "run" / "collect" / "failures-00000.jsonl")
        assert len(failures) == 20 and all(f["retryable"] and f["status"] == 500 for f in failures)
        assert "gave up after 2 attempts" in failures[0]["reason"]

        server.config.faults.rate_500 = 0.0  # the teacher is back: a rerun asks those prompts again
        out = run_collect(cfg)
        assert out.returncode == 0, out.stderr
        before = server.count("requests")
        assert run_collect(cfg).returncode == 0  # and once more: nothing left to ask, the 400 is not retried
        assert server.count("requests") == before
    (failure,) = read_lines(tmp_path / "run" / "collect" / "failures-00000.jsonl")
    assert failure["id"] == "p0003" and failure["kind"] == "context_length" and failure["status"] == 400
    assert "maximum context length" in failure["reason"] and failure["retryable"] is False
    assert_each_once(answers(tmp_path / "run" / "collect"), {f"p{i:04d}" for i in range(20)} - {"p0003"})
    s = summary(tmp_path / "run" / "collect")
    assert (s["done"], s["failed"], s["total"]) == (19, 1, 20)


def test_a_shard_fails_past_max_failed_fraction_and_passes_under_it(tmp_path: Path) -> None:
    texts = _texts(40)
    for i in (2, 11, 25):  # 3 of 40 prompts the teacher answers 400 (7.5 %)
        texts[i] += " " + TOO_LONG_MARKER
    prompts = write_prompts(tmp_path / "p.jsonl", texts, ids=True)
    with FakeOpenAI() as server:
        strict = stage_config(tmp_path, server.base_url, prompts, name="strict")  # the default, 0.02
        out = run_collect(strict)
        assert out.returncode == 3, out.stderr
        message = next(line for line in out.stderr.splitlines() if "maxFailedFraction" in line)
        assert "3 of 40 prompts failed (7.5%) > collection.maxFailedFraction 0.02" in message
        assert "most common failure: context_length (3 prompts): HTTP 400" in message
        s = summary(tmp_path / "strict" / "collect")  # the summary is written all the same
        assert (s["done"], s["failed"], s["total"]) == (37, 3, 40)
        assert (
            s["failureKinds"] == {"context_length": 3}
            and "maximum context length" in (s["failureExamples"]["context_length"])
        )
        lenient = stage_config(
            tmp_path,
            server.base_url,
            prompts,
            name="lenient",
            spec={"collection": {"maxFailedFraction": 0.1}},
        )
        out = run_collect(lenient)
        assert out.returncode == 0, out.stderr
        assert summary(tmp_path / "lenient" / "collect")["failed"] == 3


def test_the_api_key_never_appears_in_logs_or_outputs(tmp_path: Path) -> None:
    key = "sk-distillery-test-7f3a9c1e55d0b2"
    texts = [*_texts(30), f"too long {TOO_LONG_MARKER}"]
    config = FakeOpenAIConfig(api_key=key, faults=Faults(rate_429=0.1, rate_500=0.05), seed=3)
    with FakeOpenAI(config) as server:
        prompts = write_prompts(tmp_path / "p.jsonl", texts)
        spec = {"teacher": {"logprobs": {"topK": 3}}, "collection": {"maxFailedFraction": 0.1}}
        cfg = stage_config(tmp_path, server.base_url, prompts, spec=spec, cache=tmp_path / "cache")
        ok = run_collect(cfg, env={"DISTILLERY_TEACHER_API_KEY": key})
        assert ok.returncode == 0, ok.stderr
        assert all(h == f"Bearer {key}" for h in server.auth_headers)  # it was sent, where it belongs
        other = stage_config(
            tmp_path, server.base_url, prompts, name="other", spec=spec, cache=tmp_path / "c2"
        )
        wrong = run_collect(other, env={"DISTILLERY_TEACHER_API_KEY": key + "-old"})
        assert (
            wrong.returncode == 2 and "Incorrect API key provided: [redacted]" in wrong.stderr
        )  # the server echoed it
    assert len(answers(tmp_path / "run" / "collect")) == 30
    logs = ok.stdout + ok.stderr + wrong.stdout + wrong.stderr
    assert key not in logs
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert key.encode() not in path.read_bytes(), path


def test_a_shard_prints_progress_lines_the_operator_can_parse(tmp_path: Path) -> None:
    """Off a terminal, every progress interval and at the end: the shard's CollectionSummary so far, one line
    of JSON each, counts that only grow, the last one equal to the summary the pod leaves."""
    from distillery_trainer.api.summaries import CollectionSummary
    from distillery_trainer.progress_line import latest_collection, parse_line

    with FakeOpenAI(FakeOpenAIConfig(latency=lambda rng: 0.05)) as server:
        cfg = stage_config(
            tmp_path,
            server.base_url,
            write_prompts(tmp_path / "p.jsonl", _texts(40)),
            spec={"collection": {"concurrency": 2, "shards": 2}},
        )
        out = run_collect(cfg, "--shard", "1", "--progress-interval", "0.2")
    assert out.returncode == 0, out.stderr
    found = [r for line in out.stderr.splitlines() if (r := parse_line(line)) is not None]
    reports = [r for stage, r in found if stage == "collect" and isinstance(r, CollectionSummary)]
    assert len(reports) == len(found) >= 3  # some while it ran, one at the end
    assert [r.done for r in reports] == sorted(r.done for r in reports) and reports[0].done < 20
    assert all((r.shard, r.shards, r.total) == (1, 2, 20) for r in reports)
    last = latest_collection(out.stderr)
    assert last == reports[-1] and last.done == 20
    assert last.to_dict() == summary(tmp_path / "run" / "collect", shard=1)
    assert "shard 1/2: 20/20 answered" in out.stderr  # the human line is still there


# ---------------------------------------------------------------------------------------------- inputs


def _collect_shards(config: Path, shards: int) -> None:
    """Every shard at once, as the pods of the Indexed Job start."""
    procs = [
        subprocess.Popen(
            collect_cmd(config, "--shard", str(i), "--shards", str(shards)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1"},
        )
        for i in range(shards)
    ]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-3000:]


def test_fewer_shards_leave_no_stale_shard_to_read(tmp_path: Path) -> None:
    """collection.shards 8 -> 4 on the same volume: the 8-shard files are set aside (by whichever of the
    new shards got there first) and training, evaluation and the cost summaries see 4 shards."""
    from distillery_trainer.data.shards import read_answers, shard_indices
    from distillery_trainer.layout import RunLayout

    texts = _texts(64)
    with FakeOpenAI() as server:
        prompts = write_prompts(tmp_path / "p.jsonl", texts)
        eight = stage_config(tmp_path, server.base_url, prompts, spec={"collection": {"shards": 8}})
        _collect_shards(eight, 8)
        collect = tmp_path / "run" / "collect"
        assert len(list(collect.glob("shard-*.jsonl"))) == 8
        four = stage_config(tmp_path, server.base_url, prompts, spec={"collection": {"shards": 4}})
        _collect_shards(four, 4)
    layout = RunLayout(tmp_path / "run")
    assert sorted(p.name for p in collect.glob("s*-*.json*")) == [
        *(f"shard-{i:05d}.jsonl" for i in range(4)),
        *(f"summary-{i:05d}.json" for i in range(4)),
    ]
    assert shard_indices(layout) == [0, 1, 2, 3]
    every = read_answers(layout, "train") + read_answers(layout, "eval")
    assert sorted(a.id for a in every) == sorted({a.id for a in every}) and len(every) == 64
    (aside,) = (tmp_path / "run" / "superseded").iterdir()
    assert len(list((aside / "collect").glob("shard-*.jsonl"))) == 8


def test_another_teacher_under_the_same_name_gets_none_of_the_old_answers(tmp_path: Path) -> None:
    """A run deleted and created again with the same name and another teacher: the volume still holds
    the first teacher's answers, and none of them may reach training."""
    from distillery_trainer.data.shards import read_answers
    from distillery_trainer.layout import RunLayout

    texts = _texts(40)
    prompts = write_prompts(tmp_path / "p.jsonl", texts)
    old = FakeOpenAIConfig(answer=lambda messages, i: "OLD TEACHER")
    new = FakeOpenAIConfig(answer=lambda messages, i: "NEW TEACHER", model="other-teacher")
    with FakeOpenAI(old) as first:
        out = run_collect(stage_config(tmp_path, first.base_url, prompts, cache=tmp_path / "cache"))
        assert out.returncode == 0, out.stderr
    with FakeOpenAI(new) as second:
        config = stage_config(
            tmp_path,
            second.base_url,
            prompts,
            cache=tmp_path / "cache",
            spec={"teacher": {"endpoint": {"model": "other"}}},
        )
        out = run_collect(config)
        assert out.returncode == 0, out.stderr
        assert second.count("ok") == 40  # asked again: nothing came from the old answers or their cache
    assert "set aside" in out.stderr
    layout = RunLayout(tmp_path / "run")
    every = read_answers(layout, "train") + read_answers(layout, "eval")
    assert len(every) == 40 and {a.response for a in every} == {"NEW TEACHER"}


def test_the_same_inputs_resume_and_set_nothing_aside(tmp_path: Path) -> None:
    texts = _texts(30)
    with FakeOpenAI() as server:
        config = stage_config(tmp_path, server.base_url, write_prompts(tmp_path / "p.jsonl", texts))
        assert run_collect(config).returncode == 0
        asked = server.count("ok")
        out = run_collect(config)
        assert out.returncode == 0 and server.count("ok") == asked  # nothing asked twice
    assert "set aside" not in out.stderr and not (tmp_path / "run" / "superseded").exists()


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])  # closed again when the block ends: nothing listens there


@pytest.mark.parametrize("where", ["closed port", "unknown host"])
def test_an_unreachable_teacher_fails_in_seconds_naming_the_cause(tmp_path: Path, where: str) -> None:
    """A wrong baseURL is a configuration error, not load: the first requests cannot connect and none
    ever has, so the shard stops at once (exit 2) saying why, instead of retrying for minutes and then
    calling it a timeout."""
    if where == "closed port":
        url = f"http://127.0.0.1:{_closed_port()}/v1"
        cause = f"connection refused to {url}"
    else:
        url = "http://nonexistent.invalid/v1"
        cause = "unknown host nonexistent.invalid"
    spec = {"collection": {"concurrency": 4, "maxRetries": 8, "timeoutSeconds": 30}}
    cfg = stage_config(tmp_path, url, write_prompts(tmp_path / "p.jsonl", _texts(20)), spec=spec)
    started = time.monotonic()
    out = run_collect(cfg)
    took = time.monotonic() - started
    assert out.returncode == 2, out.stderr
    assert took < 15, took  # the process's start-up included; the retries alone took over a minute
    assert cause in out.stderr and "check teacher.endpoint.baseURL" in out.stderr
    s = summary(tmp_path / "run" / "collect")
    assert cause in s["stopped"] and s["done"] == 0 and s["retries"] == 0


def test_retries_and_the_last_error_show_in_the_progress_while_they_happen(tmp_path: Path) -> None:
    """Errors of a reachable teacher are retried (a teacher that has answered once is reachable: a later
    refused connection is load), and the progress shows how many retries and the last error."""
    faults = Faults(rate_500=0.3)
    with FakeOpenAI(FakeOpenAIConfig(faults=faults, seed=3, latency=lambda rng: 0.01)) as server:
        cfg = stage_config(
            tmp_path,
            server.base_url,
            write_prompts(tmp_path / "p.jsonl", _texts(60)),
            spec={"collection": {"concurrency": 4, "maxRetries": 10}},
        )
        out = run_collect(cfg, "--progress-interval", "0.2")
    assert out.returncode == 0, out.stderr
    s = summary(tmp_path / "run" / "collect")
    assert s["retries"] > 0 and s["lastError"].startswith("HTTP 500"), s
    assert f"{s['retries']} retries (last: HTTP 500" in out.stderr
    assert '"lastError":"HTTP 500' in out.stderr  # the progress line the operator and `distillery run` read
