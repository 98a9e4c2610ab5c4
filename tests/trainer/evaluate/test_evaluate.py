"""The evaluator against fake OpenAI-shaped servers: retention and its interval against a hand
computation on fixed judge answers, and the error paths (faults, unreadable verdicts) — reported,
never a crash, never a score."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from distillery_trainer.api import load_stage_config
from distillery_trainer.api.status import Results
from distillery_trainer.evaluate.run import evaluate

from tests.support.evalrun import read_items, read_results, stage_config, write_collected
from tests.support.servers.fake_openai import (
    TOO_LONG_MARKER,
    FakeOpenAI,
    FakeOpenAIConfig,
    Faults,
    default_answer,
    sequence_latency,
)
from tests.trainer.evaluate.test_eval_stats import exact_bootstrap, quantile

TEACHER = [8.0, 9.0, 7.5, 9.5, 8.5, 7.0]  # what the fixed judge gives the teacher's answer to question k
STUDENT = [6.5, 8.5, 3.5, 9.0, 5.5, 7.5]  # ... and the student's
BIAS = 0.5  # the judge favours position A by +0.5 and penalises B by -0.5; swapping cancels it


def _answer_in(prompt: str, label: str) -> str:
    m = re.search(rf"\[Answer of Assistant {label}\]\n(.*?)\n\[End of Answer {label}\]", prompt, re.S)
    assert m, prompt
    return m.group(1)


def fixed_judge(messages: list[dict[str, Any]], sample: int) -> str:
    prompt = messages[-1]["content"]
    if "question 6" in prompt:
        return "Both answers have merit; I would rather not pick."  # unreadable: never a score
    scores = []
    for label, bias in (("A", BIAS), ("B", -BIAS)):
        who, k = _answer_in(prompt, label).split(" answer ")
        scores.append((TEACHER if who == "teacher" else STUDENT)[int(k)] + bias)
    return f"A is {'better' if scores[0] > scores[1] else 'worse'}.\n[[A={scores[0]:g}, B={scores[1]:g}]]"


def student_answer(messages: list[dict[str, Any]], sample: int) -> str:
    return "student answer " + messages[-1]["content"].split()[-1]


def test_retention_and_interval_match_a_hand_computation(tmp_path: Path) -> None:
    rows = [
        {
            "id": f"q{k}",
            "messages": [{"role": "user", "content": f"question {k}"}],
            "response": f"teacher answer {k}",
            "category": "a" if k < 3 else "b",
        }
        for k in range(7)
    ]
    write_collected(tmp_path, rows)
    (tmp_path / "collect" / "summary-00000.json").write_text(
        json.dumps(
            {
                "shard": 0,
                "shards": 1,
                "total": 100,
                "done": 100,
                "inputTokens": 50_000,
                "outputTokens": 20_000,
                "costUSD": 0.325,
            }
        )  # fmt: skip
    )
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "progress.json").write_text(json.dumps({"method": "sft", "gpuHours": 0.5}))
    (tmp_path / "train" / "history.jsonl").write_text(
        "".join(json.dumps({"step": s, "loss": 2.0 / s}) + "\n" for s in range(1, 30))
    )
    with (
        FakeOpenAI(FakeOpenAIConfig(answer=student_answer, model="student")) as student,
        FakeOpenAI(FakeOpenAIConfig(answer=fixed_judge, model="judge")) as judge,
    ):
        cfg = stage_config(
            tmp_path,
            student=(student.base_url, "student"),
            teacher=("http://127.0.0.1:9/v1", "teacher"),  # nothing listens: latency not compared
            spec={
                "teacher": {"pricing": {"inputPerMTokUSD": 2.5, "outputPerMTokUSD": 10}},
                "serving": {"gpus": 0},
                "evaluation": {
                    "judge": {"endpoint": {"baseURL": judge.base_url, "model": "judge"}},
                    "minQualityRetention": 0.9,
                    "bootstrapSamples": 100_000,
                    "confidence": 0.9,
                    "load": {"requests": 12, "concurrency": 3},
                },
            },
        )
        term = tmp_path / "termination-log"
        student_dir = load_stage_config(cfg).artifacts
        (Path(student_dir) / "student").mkdir(parents=True, exist_ok=True)  # what training saved
        (Path(student_dir) / "student" / "config.json").write_text("{}")
        out = evaluate(load_stage_config(cfg), termination_path=str(term))
    assert out.exit_code == 0
    doc = read_results(tmp_path)
    res = doc["results"]
    # The model card and the provenance beside the student, their digest in the status's results.
    from distillery_trainer import provenance
    from distillery_trainer.layout import RunLayout

    layout = RunLayout(Path(student_dir))
    record = provenance.read(layout)
    assert record is not None and record.evaluation is not None
    assert record.evaluation["qualityRetention"] == res["qualityRetention"]
    assert res["provenanceDigest"] == provenance.digest_of(layout) is not None
    assert Results.model_validate(json.loads(term.read_text())).provenance_digest == res["provenanceDigest"]
    card = provenance.parse_card((layout.student_dir / "README.md").read_text())
    assert card["model-index"][0]["results"][0]["metrics"][0]["type"] == "quality_retention"
    # By hand: each answer's score is the mean of its two positions, so the bias cancels;
    # retention = sum(STUDENT) / sum(TEACHER) = 40.5 / 49.5 over questions 0-5 (6 has no verdict).
    assert res["qualityRetention"] == pytest.approx(40.5 / 49.5, abs=1e-6)
    assert res["studentScore"] == pytest.approx(40.5 / 6 / 10, abs=1e-6)
    assert res["teacherScore"] == pytest.approx(49.5 / 6 / 10, abs=1e-6)
    assert res["samples"] == 6 and res["metric"].startswith("llm-judge")
    exact = exact_bootstrap(STUDENT, TEACHER)  # all 6**6 resamples
    assert res["retentionInterval"]["low"] == pytest.approx(quantile(exact, 0.05), abs=0.005)
    assert res["retentionInterval"]["high"] == pytest.approx(quantile(exact, 0.95), abs=0.005)
    assert (
        res["gatePassed"] is False and doc["gate"]["conclusive"] is False
    )  # 0.818 < 0.9, interval straddles
    judge_doc = doc["quality"]["judge"]
    assert judge_doc["requested"] == 7 and judge_doc["scored"] == 6
    assert judge_doc["failures"] == {"unparseable": 1}
    # where the answers are within the bias of each other (questions 1, 3, 5) the verdict flips with order
    assert judge_doc["positionConsistency"] == 0.5
    cats = doc["quality"]["categories"]
    assert cats["a"]["retention"] == pytest.approx(18.5 / 24.5, abs=1e-6)
    assert cats["b"]["retention"] == pytest.approx(22.0 / 25.0, abs=1e-6)
    assert cats["b"]["samples"] == 3 and cats["b"]["prompts"] == 4  # question 6 is in b, unscored
    # reference metrics against the teacher's answer: "student answer k" vs "teacher answer k" = 2/3
    assert doc["quality"]["metrics"]["token_f1"]["agreementWithTeacher"] == pytest.approx(2 / 3, abs=1e-6)
    # cost, by hand: training 0.5 h x $2; serving 1 x 1 x $2 x 730 h; teacher 100k requests x
    # (500 in x $2.5 + 200 out x $10) / 1M
    assert res["cost"] == {
        "collectionUSD": 0.325,
        "trainingUSD": 1.0,
        "totalUSD": 1.325,  # collection + training (an sft run: no teacher scoring)
        "servingUSDPerMonth": 1460.0,
        "teacherUSDPerMonth": 325.0,
        "requestsPerMonth": 100000,
        "studentToTeacherCost": 4.492,  # 1460 / 325: the student costs 4.49x the API at this traffic
        "breakEvenRequestsPerMonth": 449231,  # 1460 / $0.00325 a request, rounded up
        "teacherUSDPerMillionOutputTokens": 16.25,  # $0.00325 / 200 output tokens
        "studentUSDPerMillionOutputTokens": 73.0,  # 1460 / (100k x 200 output tokens)
    }
    assert res["latencyMs"]["p95"] >= res["latencyMs"]["p50"] > 0 and res["errors"] == 0
    assert "unreachable" in doc["latency"]["teacherNote"] and "teacherLatencyMs" not in res
    message = term.read_text()
    assert len(message.encode()) <= 4096 and Results.model_validate(json.loads(message)).samples == 6
    report = Path(res["report"]).read_text()
    assert "FAILED" in report and "0.818" in report
    assert "the teacher API is cheaper" in report and "cheaper above 449,231 requests a month" in report
    for png in ("latency.png", "retention_by_category.png", "loss.png"):
        assert (tmp_path / "eval" / png).read_bytes().startswith(b"\x89PNG")


def test_faults_are_reported_and_never_scored(tmp_path: Path) -> None:
    rows = []
    for k in range(24):
        text = f"alpha beta gamma {k}" + (f" {TOO_LONG_MARKER}" if k % 8 == 0 else "")
        text += " NOVERDICT" if k % 5 == 1 else ""
        messages = [{"role": "user", "content": text}]
        rows.append({"id": f"p{k}", "messages": messages, "response": default_answer(messages, 0)})
    write_collected(tmp_path, rows)
    with (tmp_path / "collect" / "shard-00000.jsonl").open("a") as fh:
        fh.write('{"id": "torn", "messages": [{"role": "us')  # a shard torn by a crash

    def flaky_judge(messages: list[dict[str, Any]], sample: int) -> str:
        return "I cannot tell." if "NOVERDICT" in messages[-1]["content"] else "[[A=8, B=6]]"

    faults = Faults(
        rate_429=0.15, retry_after=0.01, rate_500=0.1, rate_malformed=0.1, rate_drop=0.05,
        rate_timeout=0.03, timeout_sleep=2.0,
    )  # fmt: skip
    with (
        FakeOpenAI(FakeOpenAIConfig(faults=faults, seed=3)) as student,
        FakeOpenAI(FakeOpenAIConfig(faults=Faults(rate_500=0.1), answer=flaky_judge, seed=4)) as judge,
    ):
        cfg = stage_config(
            tmp_path,
            student=(student.base_url, "student"),
            spec={
                "collection": {"timeoutSeconds": 1},
                "evaluation": {
                    "judge": {"endpoint": {"baseURL": judge.base_url, "model": "judge"}},
                    "load": {"requests": 40, "concurrency": 8, "compareTeacher": False},
                },
            },
        )
        out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
        assert student.count("429") and student.count("500") and student.count("malformed")
    assert out.exit_code == 0
    doc, items = read_results(tmp_path), read_items(tmp_path)
    q, res = doc["quality"], doc["results"]
    assert doc["data"]["badLines"] == 1 and q["prompts"] == 24
    assert q["studentErrors"].get("http_400") == 3  # the prompts no retry can fix
    failed = [it for it in items if "error" in it]
    assert len(failed) == sum(q["studentErrors"].values()) and q["answered"] == 24 - len(failed)
    assert all("agreement" not in it and "judge" not in it for it in failed)  # no score for a failure
    answered_noverdict = sum(
        1 for it in items if "error" not in it and it["id"] in {f"p{k}" for k in range(1, 24, 5)}
    )
    assert q["judge"]["requested"] == q["answered"]
    assert q["judge"]["failures"].get("unparseable") == answered_noverdict
    assert res["samples"] == q["judge"]["scored"] == q["answered"] - sum(q["judge"]["failures"].values())
    # every scored prompt: judge 8 vs 6 in both orders -> 7 each; agreement 1.0 (same answers)
    assert res["qualityRetention"] == 1.0 and res["studentScore"] == 0.7
    assert q["metrics"]["exact_match"]["agreementWithTeacher"] == 1.0
    load = doc["latency"]["student"]
    assert sum(load["errors"].values()) > 0 and load["succeeded"] + sum(load["errors"].values()) == 40
    assert res["errors"] >= len(failed) + sum(load["errors"].values())
    assert any(n.startswith("3 of 24") or "student answers failed" in n for n in doc["notes"])


def test_nothing_to_evaluate_writes_results_and_exits_one(tmp_path: Path) -> None:
    write_collected(tmp_path, [{"id": "t", "messages": [{"role": "user", "content": "x"}], "response": "y",
                                "split": "train"}])  # fmt: skip
    cfg = stage_config(tmp_path, student=("http://127.0.0.1:9/v1", "student"))
    out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
    assert out.exit_code == 1
    doc = read_results(tmp_path)
    assert doc["results"]["gatePassed"] is False and "no held-out prompts" in doc["gate"]["verdict"]
    # held-out prompts, but nothing serves the student: said at once, not after every request's retries
    write_collected(tmp_path, [{"id": "e", "messages": [{"role": "user", "content": "x"}], "response": "y"}])
    out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
    assert out.exit_code == 1 and "does not answer" in read_results(tmp_path)["gate"]["verdict"]


def test_a_student_that_fails_most_requests_fails_the_gate(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Failed requests are left out of every score, so a student whose server answers 500 to most of them
    once passed with retention 1.000 on the few it answered. The share of failed requests now counts.
    Each request is still retried as the client's policy says, without its waits (25 s of the default
    backoff's sleeps here; the waits are tests/trainer/test_retry.py's)."""
    from distillery_trainer import retry
    from distillery_trainer.evaluate import client

    def without_waits(policy: retry.Backoff, max_retries: int, **kw: Any) -> Any:
        return retry.retrying(retry.Backoff(base=0.001, cap=0.001), max_retries, **kw)

    monkeypatch.setattr(client, "retrying", without_waits)
    rows = []
    for k in range(30):
        messages = [{"role": "user", "content": f"what is clause {k}"}]
        rows.append({"id": f"p{k}", "messages": messages, "response": default_answer(messages, 0)})
    write_collected(tmp_path, rows)
    spec = {"evaluation": {"load": {"requests": 20, "concurrency": 4, "compareTeacher": False}}}
    with FakeOpenAI(FakeOpenAIConfig(faults=Faults(rate_500=0.8), seed=11)) as student:
        cfg = stage_config(tmp_path, student=(student.base_url, "student"), spec=spec)
        out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
        asked = student.stats["requests"]
    assert asked >= 30 + 28 + 30  # the held-out prompts, the load (20 and 8 to warm up) and retries
    doc = read_results(tmp_path)
    res = doc["results"]
    assert res["qualityRetention"] == 1.0  # on what it answered
    assert res["errorFraction"] > 0.2 and res["gatePassed"] is False and out.exit_code == 0
    assert "evaluation.maxErrorFraction 0.02" in doc["gate"]["verdict"]
    assert doc["gate"]["verdict"].startswith("FAILED: ")

    # The same failures under a tolerance the user chose: the retention decides again.
    spec["evaluation"]["maxErrorFraction"] = 1.0  # type: ignore[index]
    with FakeOpenAI(FakeOpenAIConfig(faults=Faults(rate_500=0.8), seed=11)) as student:
        cfg = stage_config(tmp_path, student=(student.base_url, "student"), spec=spec)
        evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
    assert read_results(tmp_path)["results"]["gatePassed"] is True


SLOW, FAST = 0.6, 0.005  # seconds before the first token: a cold server's first requests, then warm ones


def test_both_endpoints_get_the_same_warm_up_and_it_is_not_counted(tmp_path: Path) -> None:
    """The teacher used to be measured cold and the student warm (it had just answered every held-out
    prompt): in the demo the teacher's first batch was its whole p95. Both now get the same warm-up
    first, outside the figures."""
    rows = []
    for k in range(6):
        messages = [{"role": "user", "content": f"what is clause {k}"}]
        rows.append({"id": f"p{k}", "messages": messages, "response": default_answer(messages, 0)})
    write_collected(tmp_path, rows)
    warm, requests = 4, 20  # the default warm-up: min(2 x concurrency, requests)
    # Each server's first requests of the latency load are slow; the student's come after its 6 answers.
    student_delays = [FAST] * len(rows) + [SLOW] * warm + [FAST] * 100
    teacher_delays = [SLOW] * warm + [FAST] * 100
    spec = {"evaluation": {"load": {"requests": requests, "concurrency": 2}}}
    with (
        FakeOpenAI(FakeOpenAIConfig(latency=sequence_latency(student_delays), model="student")) as student,
        FakeOpenAI(FakeOpenAIConfig(latency=sequence_latency(teacher_delays), model="teacher")) as teacher,
    ):
        cfg = stage_config(
            tmp_path, student=(student.base_url, "student"), teacher=(teacher.base_url, "teacher"), spec=spec
        )
        evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
        assert teacher.count("requests") == warm + requests  # warmed up, then measured
        assert student.count("requests") == len(rows) + warm + requests
    doc = read_results(tmp_path)
    lat = doc["latency"]
    assert (lat["warmupRequests"], lat["requests"], lat["concurrency"]) == (warm, requests, 2)
    for who in ("student", "teacher"):
        load = lat[who]
        assert load["requests"] == requests and load["succeeded"] == requests  # the warm-up is not counted
        assert load["latencyMs"]["max"] < 1000 * SLOW / 2, (who, load["latencyMs"])  # nor in the figures
    assert doc["results"]["teacherLatencyMs"]["p95"] < 1000 * SLOW / 2
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "20 streamed requests at concurrency 2, after 4 warm-up requests that are not counted" in report


def test_without_a_warm_up_the_slow_start_is_in_the_figures(tmp_path: Path) -> None:
    """The test above can fail: with warmupRequests 0 the teacher's slow first requests are its p95."""
    messages = [{"role": "user", "content": "what is clause 1"}]
    write_collected(tmp_path, [{"id": "p1", "messages": messages, "response": default_answer(messages, 0)}])
    spec = {"evaluation": {"load": {"requests": 20, "concurrency": 2, "warmupRequests": 0}}}
    with (
        FakeOpenAI(FakeOpenAIConfig(model="student")) as student,
        FakeOpenAI(FakeOpenAIConfig(latency=sequence_latency([SLOW] * 4 + [FAST] * 100))) as teacher,
    ):
        cfg = stage_config(
            tmp_path, student=(student.base_url, "student"), teacher=(teacher.base_url, "teacher"), spec=spec
        )
        evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
        assert teacher.count("requests") == 20
    assert read_results(tmp_path)["results"]["teacherLatencyMs"]["p95"] >= 1000 * SLOW


def test_the_untrained_students_answers_are_scored_by_the_same_scorer(tmp_path: Path) -> None:
    """Show the lift: train/baseline-answers.jsonl (the student before training) is scored exactly as the
    student is, into results.baselineScore and baselineRetention, the report and the status."""
    rows = []
    for k in range(10):
        messages = [{"role": "user", "content": f"what is clause {k}"}]
        rows.append({"id": f"p{k}", "messages": messages, "response": default_answer(messages, 0)})
    write_collected(tmp_path, rows)
    spec = {"evaluation": {"metrics": ["exact_match"], "load": {"requests": 4, "compareTeacher": False}}}
    with FakeOpenAI(FakeOpenAIConfig(model="student")) as student:  # answers as the teacher did: 1.0
        cfg = stage_config(tmp_path, student=(student.base_url, "student"), spec=spec)
        out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
        doc = read_results(tmp_path)
        assert "baselineScore" not in doc["results"] and out.results.baseline_score is None
        assert "train/baseline-answers.jsonl is absent" in doc["quality"]["baseline"]["note"]
        assert any(n.startswith("no baseline score") for n in doc["notes"])

        # The untrained student got 3 of 10 right (as the teacher answered them), the rest wrong.
        baseline = [
            {"id": r["id"], "answer": r["response"] if k < 3 else "no idea", "maxNewTokens": 1024}
            for k, r in enumerate(rows)
        ]
        (tmp_path / "train").mkdir(exist_ok=True)
        (tmp_path / "train" / "baseline-answers.jsonl").write_text(
            "".join(json.dumps(b) + "\n" for b in baseline)
        )
        out = evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
    res = read_results(tmp_path)["results"]
    assert res["studentScore"] == 1.0 and res["baselineScore"] == pytest.approx(0.3)
    assert res["baselineRetention"] == pytest.approx(0.3)  # agreement: the teacher scores 1.0
    assert out.results.baseline_score == pytest.approx(0.3)  # the status shape (termination message)
    term = Results.model_validate_json((tmp_path / "term").read_text())
    assert term.baseline_score == pytest.approx(0.3) and term.baseline_retention == pytest.approx(0.3)
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "the untrained student scored 0.300 (retention 0.300) on 10 of these prompts" in report
    assert "training took it to 1.000" in report and "untrained student |" in report


def test_the_teachers_scoring_of_an_on_policy_training_is_priced_in_the_results_and_the_report(
    tmp_path: Path,
) -> None:
    """An onPolicy training's teacher scored 2M tokens of the student's samples (train/progress.json): an
    endpoint teacher prices them as input tokens, 2M x $2.5 / 1M = $5, its own figure and in the total;
    the report's cost table has the column and says how many tokens were scored."""
    messages = [{"role": "user", "content": "what is clause 1"}]
    write_collected(tmp_path, [{"id": "p1", "messages": messages, "response": default_answer(messages, 0)}])
    (tmp_path / "train").mkdir()
    progress = {
        "method": "onPolicy",
        "gpuHours": 0.5,
        "elapsedSeconds": 900.0,
        "teacherTokensScored": 2_000_000,
    }
    (tmp_path / "train" / "progress.json").write_text(json.dumps(progress))
    spec = {
        "teacher": {
            "endpoint": {"baseURL": "http://vllm.example:8000/v1"},  # a vLLM endpoint returns prompt logprobs
            "pricing": {"inputPerMTokUSD": 2.5, "outputPerMTokUSD": 10},
            "logprobs": {"topK": 20},
        },
        "training": {"method": "onPolicy"},
        "evaluation": {"metrics": ["exact_match"], "load": {"requests": 2, "compareTeacher": False}},
    }
    with FakeOpenAI(FakeOpenAIConfig(model="student")) as student:
        cfg = stage_config(tmp_path, student=(student.base_url, "student"), spec=spec)
        evaluate(load_stage_config(cfg), termination_path=str(tmp_path / "term"))
    doc = read_results(tmp_path)
    cost = doc["results"]["cost"]
    assert (cost["teacherScoringUSD"], cost["trainingUSD"], cost["totalUSD"]) == (5.0, 1.0, 6.0)
    assert doc["cost"]["teacherTokensScored"] == 2_000_000 and "teacherGpuHours" not in doc["cost"]
    assert Results.model_validate_json((tmp_path / "term").read_text()).cost.teacher_scoring_usd == 5.0  # type: ignore[union-attr]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "| collection | training | teacher scoring (on-policy) | total (once) |" in report
    assert "| — | $1.00 | $5.00 | $6.00 |" in report
    assert "The teacher scored 2,000,000 tokens of the student's samples (priced as input tokens)." in report
